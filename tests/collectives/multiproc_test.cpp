// Every collective, algorithm (forced and auto), type and op at counts 0, 1, 7 and 1023, in place
// and out of place, on 1..8 real processes over TCP (and shared memory where the transport has
// it), against references computed in the test; failures (SIGKILL, SIGSTOP, mismatched calls)
// turn into errors on every survivor within the timeout. The 2^20 + 3 element cases are in
// large_test.cpp.
#include <gtest/gtest.h>

#include <signal.h>

#include <string>
#include <vector>

#include "data.hpp"
#include "multiproc.hpp"

namespace myelin::collectives::testing {
namespace {

using transport::Backend;

const size_t kCounts[] = {0, 1, 7, 1023};

Status mismatch(std::string_view what, size_t index, const RankCtx& rc) {
  return internal_error(what, ": wrong element ", index, " on rank ", rc.rank);
}

std::string label(std::string_view coll, Algorithm a, DataType t, ReduceOp op, size_t count,
                  bool in_place) {
  return ::myelin::internal::str_cat(coll, " ", algorithm_name(a), " ", dtype_name(t), " ",
                                     reduce_op_name(op), " n=", count,
                                     in_place ? " in-place" : " out-of-place");
}

Status check_allreduce(RankCtx& rc, Algorithm algo, DataType t, ReduceOp op, size_t count,
                       bool in_place, size_t segment, uint64_t salt) {
  auto in = input(rc.rank, count, t, op, salt);
  const auto want = expected_reduction(rc.size, count, t, op, salt);
  std::vector<uint8_t> out(in.size() + 1, 0xEE);  // one guard byte past the end
  void* recv = in_place ? in.data() : out.data();
  const std::string what = label("allreduce", algo, t, op, count, in_place);
  auto used = allreduce(*rc.comm, in.data(), recv, count, t, op,
                        {.algorithm = algo, .segment_size = segment});
  if (!used.ok()) return std::move(used).status().with_context(what);
  if (algo != Algorithm::kAuto && *used != algo)
    return internal_error(what, ": ran another algorithm");
  const long bad = first_difference(static_cast<uint8_t*>(recv), want.data(), count, t);
  if (bad >= 0) return mismatch(what, static_cast<size_t>(bad), rc);
  if (!in_place && out.back() != 0xEE) return internal_error(what, ": wrote past the end");
  return ok_status();
}

class Collectives : public ::testing::TestWithParam<int> {
 protected:
  WorldSpec spec() const {
    WorldSpec s;
    s.ranks = GetParam();
    s.ranks_per_node = GetParam() >= 4 ? 3 : 0;  // emulate nodes of 3 ranks from 4 ranks up
    return s;
  }
};

TEST_P(Collectives, Allreduce) {
  const auto out = run_world(spec(), [](RankCtx& rc) -> Status {
    uint64_t salt = 1;
    for (Algorithm algo : {Algorithm::kAuto, Algorithm::kRing, Algorithm::kHalvingDoubling,
                           Algorithm::kRecursiveDoubling, Algorithm::kHierarchical}) {
      for (DataType t : kAllDataTypes) {
        for (ReduceOp op : kAllReduceOps) {
          for (size_t count : kCounts) {
            for (bool in_place : {false, true}) {
              // A small segment makes the ring pipeline run several segments per block.
              const size_t segment = (algo == Algorithm::kRing && count == 1023) ? 256 : 0;
              MYELIN_RETURN_IF_ERROR(
                  check_allreduce(rc, algo, t, op, count, in_place, segment, ++salt));
            }
          }
        }
      }
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

TEST_P(Collectives, ReduceScatterAndAllgather) {
  const auto out = run_world(spec(), [](RankCtx& rc) -> Status {
    const auto n = static_cast<size_t>(rc.size);
    uint64_t salt = 100;
    for (DataType t : kAllDataTypes) {
      const size_t es = dtype_size(t);
      for (ReduceOp op : kAllReduceOps) {
        for (size_t count : kCounts) {
          for (bool in_place : {false, true}) {
            ++salt;
            // reduce_scatter: n * count in, block rank out.
            auto in = input(rc.rank, n * count, t, op, salt);
            const auto want = expected_reduction(rc.size, count, t, op, salt, count * rc.rank);
            std::vector<uint8_t> dst(count * es);
            void* recv = in_place ? in.data() + count * es * rc.rank : dst.data();
            const std::string what =
                label("reduce_scatter", Algorithm::kRing, t, op, count, in_place);
            auto r = reduce_scatter(*rc.comm, in.data(), recv, count, t, op,
                                    {.segment_size = count == 1023 ? size_t{512} : size_t{0}});
            if (!r.ok()) return std::move(r).status().with_context(what);
            const long bad = first_difference(static_cast<uint8_t*>(recv), want.data(), count, t);
            if (bad >= 0) return mismatch(what, static_cast<size_t>(bad), rc);
          }
        }
      }
      for (size_t count : kCounts) {
        for (bool in_place : {false, true}) {
          ++salt;
          std::vector<uint8_t> all(n * count * es, 0);
          std::vector<uint8_t> want;
          for (int r = 0; r < rc.size; ++r) {
            auto part = input(r, count, t, ReduceOp::kSum, salt);
            want.insert(want.end(), part.begin(), part.end());
          }
          auto mine = input(rc.rank, count, t, ReduceOp::kSum, salt);
          const void* send = mine.data();
          if (in_place) {
            std::copy(mine.begin(), mine.end(),
                      all.begin() + static_cast<long>(count * es * rc.rank));
            send = all.data() + count * es * rc.rank;
          }
          const std::string what =
              label("allgather", Algorithm::kRing, t, ReduceOp::kSum, count, in_place);
          auto r = allgather(*rc.comm, send, all.data(), count, t,
                             {.segment_size = count == 1023 ? size_t{300} : size_t{0}});
          if (!r.ok()) return std::move(r).status().with_context(what);
          const long bad = first_difference(all.data(), want.data(), n * count, t);
          if (bad >= 0) return mismatch(what, static_cast<size_t>(bad), rc);
        }
      }
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

TEST_P(Collectives, BroadcastAndReduce) {
  const auto out = run_world(spec(), [](RankCtx& rc) -> Status {
    uint64_t salt = 5000;
    for (int root : {0, rc.size - 1, rc.size / 2}) {
      for (DataType t : kAllDataTypes) {
        const size_t es = dtype_size(t);
        for (size_t count : kCounts) {
          for (Algorithm algo : {Algorithm::kAuto, Algorithm::kBinomialTree, Algorithm::kChain}) {
            for (bool in_place : {false, true}) {
              ++salt;
              const auto want = input(root, count, t, ReduceOp::kSum, salt);
              auto src = rc.rank == root ? want : std::vector<uint8_t>(count * es, 0);
              std::vector<uint8_t> dst(count * es, 0);
              void* recv = in_place ? src.data() : dst.data();
              const std::string what = label("broadcast", algo, t, ReduceOp::kSum, count, in_place);
              auto r = broadcast(*rc.comm, src.data(), recv, count, t,
                                 {.algorithm = algo, .segment_size = 128, .root = root});
              if (!r.ok()) return std::move(r).status().with_context(what);
              const long bad = first_difference(static_cast<uint8_t*>(recv), want.data(), count, t);
              if (bad >= 0) return mismatch(what, static_cast<size_t>(bad), rc);
            }
          }
          for (ReduceOp op : kAllReduceOps) {
            for (bool in_place : {false, true}) {
              ++salt;
              auto in = input(rc.rank, count, t, op, salt);
              const auto keep = in;
              const auto want = expected_reduction(rc.size, count, t, op, salt);
              std::vector<uint8_t> dst(count * es, 0);
              void* recv = in_place ? in.data() : dst.data();
              const std::string what =
                  label("reduce", Algorithm::kBinomialTree, t, op, count, in_place);
              auto r = reduce(*rc.comm, in.data(), recv, count, t, op, {.root = root});
              if (!r.ok()) return std::move(r).status().with_context(what);
              if (rc.rank == root) {
                const long bad =
                    first_difference(static_cast<uint8_t*>(recv), want.data(), count, t);
                if (bad >= 0) return mismatch(what, static_cast<size_t>(bad), rc);
              } else if (in != keep) {
                return internal_error(what, ": a non-root's send buffer changed");
              }
            }
          }
        }
      }
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

TEST_P(Collectives, BarrierAndAlltoall) {
  const auto out = run_world(spec(), [](RankCtx& rc) -> Status {
    // A barrier really waits: after it, every rank's "arrived" file exists.
    for (int round = 0; round < 3; ++round) {
      write_file(rc.dir + "/arrived." + std::to_string(round) + "." + std::to_string(rc.rank), "x");
      MYELIN_RETURN_IF_ERROR(barrier(*rc.comm).status());
      for (int r = 0; r < rc.size; ++r) {
        if (!fs::exists(rc.dir + "/arrived." + std::to_string(round) + "." + std::to_string(r))) {
          return internal_error("barrier round ", round, " returned before rank ", r, " arrived");
        }
      }
    }
    const auto n = static_cast<size_t>(rc.size);
    uint64_t salt = 9000;
    for (DataType t : kAllDataTypes) {
      const size_t es = dtype_size(t);
      for (size_t count : kCounts) {
        for (bool in_place : {false, true}) {
          ++salt;
          // Block j of rank i's input is input(i, count, first = j * count).
          auto in = input(rc.rank, n * count, t, ReduceOp::kSum, salt);
          std::vector<uint8_t> want;
          for (int i = 0; i < rc.size; ++i) {
            auto part = input(i, count, t, ReduceOp::kSum, salt, count * rc.rank);
            want.insert(want.end(), part.begin(), part.end());
          }
          std::vector<uint8_t> dst(n * count * es, 0);
          void* recv = in_place ? in.data() : dst.data();
          const std::string what =
              label("alltoall", Algorithm::kPairwise, t, ReduceOp::kSum, count, in_place);
          auto r = alltoall(*rc.comm, in.data(), recv, count, t);
          if (!r.ok()) return std::move(r).status().with_context(what);
          const long bad = first_difference(static_cast<uint8_t*>(recv), want.data(), n * count, t);
          if (bad >= 0) return mismatch(what, static_cast<size_t>(bad), rc);
        }
      }
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

INSTANTIATE_TEST_SUITE_P(Ranks, Collectives, ::testing::Range(1, 9),
                         [](const auto& p) { return std::to_string(p.param) + "ranks"; });

// Same-node peers over the transport's automatic choice (shared memory where it exists).
TEST(CollectivesAuto, AllreduceOverAutoBackend) {
  for (int n : {2, 3, 4}) {
    WorldSpec s;
    s.ranks = n;
    s.backend = Backend::kAuto;
    const auto out = run_world(s, [](RankCtx& rc) -> Status {
      uint64_t salt = 77;
      for (Algorithm algo :
           {Algorithm::kRing, Algorithm::kHalvingDoubling, Algorithm::kRecursiveDoubling}) {
        for (DataType t : {DataType::kF32, DataType::kBF16, DataType::kI64}) {
          for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
            MYELIN_RETURN_IF_ERROR(check_allreduce(rc, algo, t, op, 1023, false, 512, ++salt));
          }
        }
      }
      // Ring blocks of 256 KiB and more, default segment: shared-memory messages large enough
      // for the transport's large-message paths, out of place (received into the output) and in
      // place.
      for (bool in_place : {false, true}) {
        MYELIN_RETURN_IF_ERROR(check_allreduce(rc, Algorithm::kRing, DataType::kF32, ReduceOp::kSum,
                                               (size_t{1} << 18) + 3, in_place, 0, ++salt));
      }
      return ok_status();
    });
    EXPECT_TRUE(out.all_ok()) << n << " ranks:" << out.summary();
  }
}

// Auto progress over the automatic backend (shared memory between these ranks): 4 and 5 ranks
// outnumber this machine's CPUs, so the Contexts poll and yield.
TEST(CollectivesAutoShm, YieldingRanksAllreduceEverySize) {
  for (int n : {4, 5}) {
    WorldSpec s;
    s.ranks = n;
    s.backend = Backend::kAuto;
    s.progress = transport::ProgressMode::kAuto;
    const auto out = run_world(s, [](RankCtx& rc) -> Status {
      const auto want = rc.size > transport::usable_cpus() ? transport::ProgressMode::kPollYield
                                                           : transport::ProgressMode::kBusyPoll;
      if (rc.comm->context().progress_mode() != want) {
        return internal_error("progress ", rc.comm->context().progress_reason());
      }
      uint64_t salt = 300;
      for (size_t count : {size_t{1}, size_t{1024}, size_t{4097}, (size_t{1} << 18) + 3}) {
        for (bool in_place : {false, true}) {
          MYELIN_RETURN_IF_ERROR(check_allreduce(rc, Algorithm::kAuto, DataType::kF32,
                                                 ReduceOp::kSum, count, in_place, 0, ++salt));
        }
      }
      return ok_status();
    });
    EXPECT_TRUE(out.all_ok()) << n << " ranks:" << out.summary();
  }
}

// The ring allreduce between three or more shm peers reduces into the Communicator's shared
// working memory and gathers the blocks from there (ring_allreduce.cpp): every type and op, blocks
// that are empty (count < ranks), several segments per block, messages above the eager limit in
// place and out of place; the working memory grows between calls and shrinks never. Every rank
// ends with identical bits. Nine ranks (above the direct allgather's limit of 8), and five ranks
// in emulated nodes of 3 (a group that spans nodes), reduce-scatter through it and gather around
// the ring.
TEST(CollectivesShmRing, EveryTypeAndOpThroughSharedWorkingMemory) {
  for (int n : {3, 4, 5, 9, -5}) {
    WorldSpec s;
    s.ranks = n < 0 ? -n : n;
    s.ranks_per_node = n < 0 ? 3 : 0;
    s.backend = Backend::kShm;
    const auto out = run_world(s, [](RankCtx& rc) -> Status {
      uint64_t salt = 900;
      for (DataType t : kAllDataTypes) {
        for (ReduceOp op : kAllReduceOps) {
          for (size_t count : {size_t{1}, size_t{7}, size_t{1023}}) {
            for (bool in_place : {false, true}) {
              const size_t segment = count == 1023 ? 256 : 0;
              MYELIN_RETURN_IF_ERROR(
                  check_allreduce(rc, Algorithm::kRing, t, op, count, in_place, segment, ++salt));
            }
          }
        }
      }
      for (DataType t : {DataType::kF32, DataType::kF64, DataType::kBF16}) {
        for (bool in_place : {false, true}) {
          // 2^18 + 3 elements: blocks of 64 KiB and more, above the eager limit; with 64 KiB
          // segments several per block; then a small call again into the grown memory.
          MYELIN_RETURN_IF_ERROR(check_allreduce(rc, Algorithm::kRing, t, ReduceOp::kSum,
                                                 (size_t{1} << 18) + 3, in_place, 0, ++salt));
          MYELIN_RETURN_IF_ERROR(check_allreduce(rc, Algorithm::kRing, t, ReduceOp::kMax,
                                                 (size_t{1} << 18) + 3, in_place, 65536, ++salt));
          MYELIN_RETURN_IF_ERROR(
              check_allreduce(rc, Algorithm::kRing, t, ReduceOp::kSum, 7, in_place, 0, ++salt));
        }
      }
      // Identical bits on every rank for inexact float sums.
      std::vector<float> buf(100003);
      for (size_t i = 0; i < buf.size(); ++i) {
        buf[i] = 1.0f / static_cast<float>(1 + (i * 7 + static_cast<size_t>(rc.rank) * 13) % 997);
      }
      MYELIN_RETURN_IF_ERROR(allreduce(*rc.comm, buf.data(), buf.data(), buf.size(), DataType::kF32,
                                       ReduceOp::kSum, {.algorithm = Algorithm::kRing})
                                 .status());
      std::vector<float> all(buf.size() * static_cast<size_t>(rc.size));
      MYELIN_RETURN_IF_ERROR(
          allgather(*rc.comm, buf.data(), all.data(), buf.size(), DataType::kF32).status());
      for (int r = 0; r < rc.size; ++r) {
        if (std::memcmp(all.data() + buf.size() * static_cast<size_t>(r), buf.data(),
                        buf.size() * sizeof(float)) != 0) {
          return internal_error("rank ", r, " ended with different bits than rank ", rc.rank);
        }
      }
      return ok_status();
    });
    EXPECT_TRUE(out.all_ok()) << s.ranks << " ranks (nodes of " << s.ranks_per_node
                              << "):" << out.summary();
  }
}

// A group on one node that mixes shm and TCP (rank 2 opens TCP alone): the ranks whose next rank
// is a shm peer reduce-scatter through the shared working memory, the others do not, and no rank
// takes the direct allgather (rank 2 is not a shm peer of anyone), so every rank sends and
// receives the same messages. Several consecutive calls in and out of place, sizes that grow and
// shrink, blocks that are empty and several segments per block.
TEST(CollectivesShmRing, GroupMixingShmAndTcpAgreesOnTheMessages) {
  WorldSpec s;
  s.ranks = 5;
  s.backend_of_rank = {Backend::kAuto, Backend::kAuto, Backend::kTcp, Backend::kAuto,
                       Backend::kAuto};
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    // The mix is real: rank 1 reaches rank 0 over shm and rank 2 over TCP.
    if (rc.rank == 1) {
      const Deadline d = Deadline::after_ms(20000);
      MYELIN_ASSIGN_OR_RETURN(transport::Endpoint * to0, rc.comm->peer(0, d));
      MYELIN_ASSIGN_OR_RETURN(transport::Endpoint * to2, rc.comm->peer(2, d));
      if (to0->backend() != Backend::kShm || to2->backend() != Backend::kTcp) {
        return internal_error("rank 1 reaches rank 0 over ",
                              transport::backend_name(to0->backend()), " and rank 2 over ",
                              transport::backend_name(to2->backend()), ", not shm and tcp");
      }
    }
    uint64_t salt = 4000;
    for (size_t count : {size_t{3}, size_t{1023}, (size_t{1} << 18) + 3, size_t{7}}) {
      for (bool in_place : {false, true}) {
        for (auto [t, op] : {std::pair{DataType::kF32, ReduceOp::kSum},
                             std::pair{DataType::kI64, ReduceOp::kMax}}) {
          const size_t segment = count == 1023 ? 256 : 65536;
          MYELIN_RETURN_IF_ERROR(
              check_allreduce(rc, Algorithm::kRing, t, op, count, in_place, segment, ++salt));
        }
      }
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

// Reuse of the shared working memory from call to call: one rank starts every call late (a
// deliberate lag, not a wait), so its peers' requests wait for it unreceived and it copies out of
// their working memory after they posted them. A peer may write its working memory for the next
// call only once this rank has copied (its sends complete then), so every call's data arrives
// intact: values differ from call to call, sizes grow and shrink, in place and out of place.
TEST(CollectivesShmRing, LateRankCopiesEveryCallIntactFromReusedWorkingMemory) {
  WorldSpec s;
  s.ranks = 4;
  s.backend = Backend::kShm;
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    uint64_t salt = 7000;
    for (int call = 0; call < 24; ++call) {
      if (rc.rank == 2) std::this_thread::sleep_for(std::chrono::milliseconds(3));
      const size_t count =
          call % 3 == 2 ? size_t{1023} : (size_t{1} << 16) + static_cast<size_t>(call);
      MYELIN_RETURN_IF_ERROR(check_allreduce(rc, Algorithm::kRing, DataType::kI32, ReduceOp::kSum,
                                             count, call % 2 == 0, 0, ++salt));
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

// Inexact float data: the result stays within the rounding bound of n - 1 additions, and every
// rank ends with the same bits.
TEST(CollectivesFloat, RandomDataWithinErrorBoundAndIdenticalOnAllRanks) {
  WorldSpec s;
  s.ranks = 5;
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    const size_t count = 4099;
    for (Algorithm algo :
         {Algorithm::kRing, Algorithm::kHalvingDoubling, Algorithm::kRecursiveDoubling}) {
      for (DataType t : {DataType::kF32, DataType::kF16, DataType::kBF16}) {
        const size_t es = dtype_size(t);
        auto value = [&](int r, size_t i) {
          const float x =
              static_cast<float>(static_cast<double>(mix(r * 977 + i) % 20001) / 10000.0 - 1.0);
          return t == DataType::kF32   ? x
                 : t == DataType::kF16 ? f16_to_float(float_to_f16(x))
                                       : bf16_to_float(float_to_bf16(x));
        };
        std::vector<uint8_t> buf(count * es);
        for (size_t i = 0; i < count; ++i)
          store_value(buf.data() + i * es, t, value(rc.rank, i), 0);
        MYELIN_RETURN_IF_ERROR(allreduce(*rc.comm, buf.data(), buf.data(), count, t, ReduceOp::kSum,
                                         {.algorithm = algo})
                                   .status());
        const double eps = t == DataType::kF32 ? 0x1p-24 : t == DataType::kF16 ? 0x1p-11 : 0x1p-8;
        for (size_t i = 0; i < count; ++i) {
          double exact = 0, magnitude = 0;
          for (int r = 0; r < rc.size; ++r) {
            exact += value(r, i);
            magnitude += std::abs(value(r, i));
          }
          double got = 0;
          if (t == DataType::kF32) {
            float f;
            std::memcpy(&f, buf.data() + i * 4, 4);
            got = f;
          } else {
            uint16_t h;
            std::memcpy(&h, buf.data() + i * 2, 2);
            got = t == DataType::kF16 ? f16_to_float(h) : bf16_to_float(h);
          }
          const double bound = rc.size * eps * magnitude + 1e-30;
          if (std::abs(got - exact) > bound) {
            return internal_error(algorithm_name(algo), " ", dtype_name(t), " element ", i, ": ",
                                  got, " vs exact ", exact, " (bound ", bound, ")");
          }
        }
        // Identical bits everywhere: allgather everyone's result and compare.
        std::vector<uint8_t> all(buf.size() * static_cast<size_t>(rc.size));
        MYELIN_RETURN_IF_ERROR(allgather(*rc.comm, buf.data(), all.data(), count, t).status());
        for (int r = 0; r < rc.size; ++r) {
          if (std::memcmp(all.data() + buf.size() * r, buf.data(), buf.size()) != 0) {
            return internal_error(algorithm_name(algo), " ", dtype_name(t), ": rank ", r,
                                  " ended with different bits");
          }
        }
      }
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

// ---- failures ----

// Survivors loop on allreduce until it fails; they pass when the error names the operation and a
// rank, and a later call says the communicator must be rebuilt.
Status survive(RankCtx& rc, int victim, std::chrono::milliseconds timeout) {
  std::vector<float> buf(1 << 18, 1.0f);
  for (int i = 0; i < 100000; ++i) {
    if (i == 1 && rc.rank == 0) write_file(rc.dir + "/started", "1");
    auto r = allreduce(*rc.comm, buf.data(), buf.data(), buf.size(), DataType::kF32, ReduceOp::kMax,
                       {.algorithm = Algorithm::kRing, .timeout = timeout});
    if (r.ok()) continue;
    if (rc.rank == victim) return internal_error("the victim saw an error instead of dying");
    const std::string msg = r.status().to_string();
    write_file(rc.dir + "/error." + std::to_string(rc.rank), msg);
    if (msg.find("allreduce") == std::string::npos || msg.find("rank ") == std::string::npos) {
      return internal_error("error does not name the operation and a rank: ", msg);
    }
    auto again = barrier(*rc.comm);
    if (again.ok() || again.status().code() != StatusCode::kFailedPrecondition ||
        again.status().to_string().find("rebuilt") == std::string::npos) {
      return internal_error("a failed communicator kept working: ", again.status().to_string());
    }
    return ok_status();
  }
  return internal_error("allreduce never failed");
}

// Waits (up to 60 s) for `dir`/started, sends `sig` to rank `victim`, waits until every other rank
// of `ranks` has written `dir`/error.<rank> (within `timeout` plus slack for several processes on
// two busy cores), then kills the victim for good. Returns the seconds from the signal to the
// last report (or to the end of the wait).
double inject_and_await_reports(const std::vector<pid_t>& pids, const std::string& dir, int victim,
                                int sig, int ranks, std::chrono::milliseconds timeout) {
  const Deadline started = Deadline::after(std::chrono::seconds(60));
  while (!fs::exists(dir + "/started") && !started.expired()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  kill(pids[victim], sig);
  const int64_t injected = monotonic_ns();
  const Deadline report = Deadline::after(timeout + std::chrono::seconds(10));
  for (int r = 0; r < ranks; ++r) {
    while (r != victim && !fs::exists(dir + "/error." + std::to_string(r)) && !report.expired()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  const double seconds = static_cast<double>(monotonic_ns() - injected) / 1e9;
  kill(pids[victim], SIGKILL);
  return seconds;
}

void fault_test(int sig, transport::ProgressMode progress, Backend backend = Backend::kTcp) {
  constexpr int kVictim = 2;
  const auto timeout = std::chrono::milliseconds(3000);
  WorldSpec s;
  s.ranks = 4;
  s.progress = progress;
  s.backend = backend;
  double seconds = 0;
  const auto out = run_world(
      s, [&](RankCtx& rc) { return survive(rc, kVictim, timeout); },
      [&](const std::vector<pid_t>& pids, const std::string& dir) {
        seconds = inject_and_await_reports(pids, dir, kVictim, sig, s.ranks, timeout);
      },
      std::chrono::seconds(60));
  for (int r = 0; r < s.ranks; ++r) {
    if (r == kVictim) continue;
    EXPECT_EQ(out.exit_codes[r], 0) << out.summary();
    const std::string err = read_file(out.dir + "/error." + std::to_string(r));
    EXPECT_NE(err.find("allreduce"), std::string::npos) << err;
  }
  // The victim's neighbour waits on it directly; its error names it.
  EXPECT_NE(read_file(out.dir + "/error.3").find("rank 2"), std::string::npos)
      << read_file(out.dir + "/error.3");
  EXPECT_LT(seconds, 3.0 + 10.0) << out.summary();
}

// Every progress mode keeps each wait's deadline: block sleeps in the kernel, yield and auto (4
// ranks on this 2-core machine: yield, or busy where there are 4 or more CPUs) poll and hand the
// CPU on, busy spins.
class CollectivesFailure : public ::testing::TestWithParam<transport::ProgressMode> {};

TEST_P(CollectivesFailure, KilledRankFailsEverySurvivor) {
  fault_test(SIGKILL, GetParam());
}
TEST_P(CollectivesFailure, StoppedRankFailsEverySurvivorWithinTimeout) {
  fault_test(SIGSTOP, GetParam());
}

// Over shm the 1 MiB ring allreduce runs through the shared working memory: a rank killed or
// stopped while its peers copy out of its memory, or it out of theirs.
TEST_P(CollectivesFailure, KilledRankFailsEverySurvivorOverShm) {
  fault_test(SIGKILL, GetParam(), Backend::kShm);
}
TEST_P(CollectivesFailure, StoppedRankFailsEverySurvivorOverShm) {
  fault_test(SIGSTOP, GetParam(), Backend::kShm);
}

// Small allreduces (the descriptor rides with the data): a rank stopped or killed mid-loop.
TEST_P(CollectivesFailure, StoppedRankFailsSmallAllreduces) {
  constexpr int kVictim = 1;
  const auto timeout = std::chrono::milliseconds(2000);
  WorldSpec s;
  s.ranks = 5;
  s.progress = GetParam();
  double seconds = 0;
  const auto out = run_world(
      s,
      [&](RankCtx& rc) -> Status {
        std::vector<float> buf(1000, 1.0f);
        for (int i = 0; i < 1000000; ++i) {
          if (i == 10 && rc.rank == 0) write_file(rc.dir + "/started", "1");
          auto r = allreduce(*rc.comm, buf.data(), buf.data(), buf.size(), DataType::kF32,
                             ReduceOp::kMax, {.timeout = timeout});
          if (r.ok()) continue;
          if (rc.rank == kVictim) return internal_error("the victim saw an error");
          write_file(rc.dir + "/error." + std::to_string(rc.rank), r.status().to_string());
          return ok_status();
        }
        return internal_error("allreduce never failed");
      },
      [&](const std::vector<pid_t>& pids, const std::string& dir) {
        seconds = inject_and_await_reports(pids, dir, kVictim, SIGSTOP, s.ranks, timeout);
      },
      std::chrono::seconds(60));
  for (int r = 0; r < s.ranks; ++r) {
    if (r == kVictim) continue;
    EXPECT_EQ(out.exit_codes[r], 0) << out.summary();
    EXPECT_NE(read_file(out.dir + "/error." + std::to_string(r)).find("allreduce"),
              std::string::npos)
        << out.summary();
  }
  EXPECT_LT(seconds, 2.0 + 10.0) << out.summary();
}

INSTANTIATE_TEST_SUITE_P(Progress, CollectivesFailure,
                         ::testing::Values(transport::ProgressMode::kSpinThenBlock,
                                           transport::ProgressMode::kPollYield,
                                           transport::ProgressMode::kAuto),
                         [](const auto& p) { return std::string(progress_mode_name(p.param)); });

// Both counts take the small recursive doubling (descriptor with the data) on 3 and 4 ranks.
class CollectivesMismatch : public ::testing::TestWithParam<int> {};

TEST_P(CollectivesMismatch, MismatchedCountsAreAClearError) {
  WorldSpec s;
  s.ranks = GetParam();
  s.timeout = std::chrono::milliseconds(5000);
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    const size_t count = rc.rank == 1 ? 8 : 7;
    std::vector<int32_t> buf(count, 1);
    auto r = allreduce(*rc.comm, buf.data(), buf.data(), count, DataType::kI32, ReduceOp::kSum);
    if (r.ok()) return internal_error("mismatched allreduce succeeded");
    write_file(rc.dir + "/error." + std::to_string(rc.rank), r.status().to_string());
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
  int clear = 0;
  for (int r = 0; r < s.ranks; ++r) {
    const std::string err = read_file(out.dir + "/error." + std::to_string(r));
    if (err.find("mismatched collective calls") != std::string::npos &&
        err.find("7 x i32") != std::string::npos && err.find("8 x i32") != std::string::npos) {
      ++clear;
    }
  }
  // Every rank hears from the odd one, or from a rank that heard from it and says so.
  std::string errors;
  for (int r = 0; r < s.ranks; ++r) {
    errors += "\n" + read_file(out.dir + "/error." + std::to_string(r));
  }
  EXPECT_EQ(clear, s.ranks) << errors;
}
INSTANTIATE_TEST_SUITE_P(Ranks, CollectivesMismatch, ::testing::Values(3, 4, 5),
                         [](const auto& p) { return std::to_string(p.param) + "ranks"; });

// One rank's count is past the small-allreduce limit (it runs halving-doubling with a separate
// descriptor), the others' within it: every rank fails within the timeout, and the odd rank
// names both calls.
TEST(CollectivesMismatchAcrossTheLimit, EveryRankFailsWithinTheTimeout) {
  WorldSpec s;
  s.ranks = 4;
  s.timeout = std::chrono::milliseconds(3000);
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    const size_t count = rc.rank == 1 ? 4097 : 4096;
    std::vector<float> buf(count, 1.0f);
    const int64_t start = monotonic_ns();
    auto r = allreduce(*rc.comm, buf.data(), buf.data(), count, DataType::kF32, ReduceOp::kSum);
    if (r.ok()) return internal_error("mismatched allreduce succeeded");
    if (monotonic_ns() - start > 3'000'000'000LL + 2'000'000'000LL) {
      return internal_error("the error came after the timeout: ", r.status().to_string());
    }
    write_file(rc.dir + "/error." + std::to_string(rc.rank), r.status().to_string());
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
  const std::string odd = read_file(out.dir + "/error.1");
  EXPECT_NE(odd.find("mismatched collective calls"), std::string::npos) << odd;
  EXPECT_NE(odd.find("4096 x f32"), std::string::npos) << odd;
  EXPECT_NE(odd.find("4097 x f32"), std::string::npos) << odd;
}

// Small allreduces carry the descriptor in their data messages (on two ranks one message each
// way): both sides of the size limit, every op, in place and out, in every progress mode.
class CollectivesSmall : public ::testing::TestWithParam<std::tuple<int, transport::ProgressMode>> {
};

TEST_P(CollectivesSmall, FastPathAndOrdinaryPathAroundTheLimit) {
  WorldSpec s;
  s.ranks = std::get<0>(GetParam());
  s.progress = std::get<1>(GetParam());
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    uint64_t salt = 500;
    for (size_t count : {size_t{4095}, size_t{4096}, size_t{4097}}) {  // f32: 16 KiB is the limit
      for (ReduceOp op : kAllReduceOps) {
        for (bool in_place : {false, true}) {
          MYELIN_RETURN_IF_ERROR(check_allreduce(rc, Algorithm::kAuto, DataType::kF32, op, count,
                                                 in_place, 0, ++salt));
        }
      }
    }
    // Forced recursive doubling above the limit takes the ordinary path.
    MYELIN_RETURN_IF_ERROR(check_allreduce(rc, Algorithm::kRecursiveDoubling, DataType::kI64,
                                           ReduceOp::kSum, 4097, false, 0, ++salt));
    // Every type and op through the small path, counts 0, 1, 7, 1023, and a burst of calls
    // (each call's messages must pair with the same call on every rank).
    for (DataType t : kAllDataTypes) {
      for (ReduceOp op : kAllReduceOps) {
        for (size_t count : kCounts) {
          for (bool in_place : {false, true}) {
            MYELIN_RETURN_IF_ERROR(check_allreduce(rc, Algorithm::kRecursiveDoubling, t, op, count,
                                                   in_place, 0, ++salt));
          }
        }
      }
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}
INSTANTIATE_TEST_SUITE_P(
    RanksAndProgress, CollectivesSmall,
    ::testing::Combine(::testing::Values(2, 3, 4, 5, 7, 8),
                       ::testing::Values(transport::ProgressMode::kSpinThenBlock,
                                         transport::ProgressMode::kPollYield)),
    [](const auto& p) {
      return std::to_string(std::get<0>(p.param)) + "ranks_" +
             std::string(progress_mode_name(std::get<1>(p.param)));
    });

// Every collective and algorithm in the poll-and-yield mode (2..8 processes on 2 cores), and in
// auto (over TCP alone: block with more ranks than CPUs, else busy); a smaller matrix than
// Collectives. The shm variant of auto (yield) runs in CollectivesAutoShm.
class CollectivesYield : public ::testing::TestWithParam<std::tuple<int, transport::ProgressMode>> {
};

TEST_P(CollectivesYield, EveryCollective) {
  WorldSpec s;
  s.ranks = std::get<0>(GetParam());
  s.progress = std::get<1>(GetParam());
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    uint64_t salt = 900;
    for (Algorithm algo : {Algorithm::kAuto, Algorithm::kRing, Algorithm::kHalvingDoubling,
                           Algorithm::kRecursiveDoubling}) {
      for (DataType t : {DataType::kF32, DataType::kBF16, DataType::kI64}) {
        for (size_t count : {size_t{1}, size_t{1023}, size_t{70001}}) {
          MYELIN_RETURN_IF_ERROR(check_allreduce(rc, algo, t, ReduceOp::kSum, count, count == 1023,
                                                 algo == Algorithm::kRing ? 4096 : 0, ++salt));
        }
      }
    }
    std::vector<int32_t> all(static_cast<size_t>(rc.size) * 33);
    std::vector<int32_t> mine(33, rc.rank);
    MYELIN_RETURN_IF_ERROR(
        allgather(*rc.comm, mine.data(), all.data(), mine.size(), DataType::kI32).status());
    for (size_t i = 0; i < all.size(); ++i) {
      if (all[i] != static_cast<int32_t>(i / 33)) return mismatch("allgather", i, rc);
    }
    std::vector<int64_t> b(5000, rc.rank == rc.size - 1 ? 42 : 0);
    MYELIN_RETURN_IF_ERROR(
        broadcast(*rc.comm, b.data(), b.data(), b.size(), DataType::kI64, {.root = rc.size - 1})
            .status());
    for (size_t i = 0; i < b.size(); ++i) {
      if (b[i] != 42) return mismatch("broadcast", i, rc);
    }
    for (int i = 0; i < 20; ++i) MYELIN_RETURN_IF_ERROR(barrier(*rc.comm).status());
    // These ranks use TCP alone: auto blocks when they outnumber the CPUs.
    const auto want = std::get<1>(GetParam()) == transport::ProgressMode::kPollYield
                          ? transport::ProgressMode::kPollYield
                      : rc.comm->size() > transport::usable_cpus()
                          ? transport::ProgressMode::kSpinThenBlock
                          : transport::ProgressMode::kBusyPoll;
    if (rc.comm->context().progress_mode() != want) {
      return internal_error(
          "progress mode ", progress_mode_name(rc.comm->context().progress_mode()), ", expected ",
          progress_mode_name(want), " (", rc.comm->context().progress_reason(), ")");
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}
INSTANTIATE_TEST_SUITE_P(RanksAndProgress, CollectivesYield,
                         ::testing::Combine(::testing::Values(2, 3, 4, 6, 8),
                                            ::testing::Values(transport::ProgressMode::kPollYield,
                                                              transport::ProgressMode::kAuto)),
                         [](const auto& p) {
                           return std::to_string(std::get<0>(p.param)) + "ranks_" +
                                  std::string(progress_mode_name(std::get<1>(p.param)));
                         });

// Mismatched counts on two ranks, both on the fast path (7 / 8) and one on each side of its
// limit (4096 / 4097 f32): every rank names both calls.
TEST(CollectivesMismatchTwoRanks, MismatchedCountsAreAClearError) {
  for (const auto& counts :
       {std::pair<size_t, size_t>{7, 8}, std::pair<size_t, size_t>{4096, 4097}}) {
    WorldSpec s;
    s.ranks = 2;
    s.timeout = std::chrono::milliseconds(5000);
    const auto out = run_world(s, [&](RankCtx& rc) -> Status {
      const size_t count = rc.rank == 1 ? counts.second : counts.first;
      std::vector<float> buf(count, 1.0f);
      auto r = allreduce(*rc.comm, buf.data(), buf.data(), count, DataType::kF32, ReduceOp::kSum);
      if (r.ok()) return internal_error("mismatched allreduce succeeded");
      write_file(rc.dir + "/error." + std::to_string(rc.rank), r.status().to_string());
      return ok_status();
    });
    EXPECT_TRUE(out.all_ok()) << out.summary();
    for (int r = 0; r < 2; ++r) {
      const std::string err = read_file(out.dir + "/error." + std::to_string(r));
      EXPECT_NE(err.find("mismatched collective calls"), std::string::npos) << err;
      EXPECT_NE(err.find(std::to_string(counts.first) + " x f32"), std::string::npos) << err;
      EXPECT_NE(err.find(std::to_string(counts.second) + " x f32"), std::string::npos) << err;
    }
  }
}

TEST(CollectivesArguments, BadArgumentsAreRejectedBeforeAnyTraffic) {
  WorldSpec s;
  s.ranks = 1;
  const auto out = run_world(s, [](RankCtx& rc) -> Status {
    float x = 0;
    if (broadcast(*rc.comm, &x, &x, 1, DataType::kF32, {.root = 3}).status().code() !=
        StatusCode::kInvalidArgument) {
      return internal_error("bad root accepted");
    }
    if (allreduce(*rc.comm, nullptr, &x, 1, DataType::kF32, ReduceOp::kSum).status().code() !=
        StatusCode::kInvalidArgument) {
      return internal_error("null buffer accepted");
    }
    if (allgather(*rc.comm, &x, &x, 1, DataType::kF32, {.algorithm = Algorithm::kChain})
            .status()
            .code() != StatusCode::kInvalidArgument) {
      return internal_error("unsupported algorithm accepted");
    }
    return allreduce(*rc.comm, &x, &x, 1, DataType::kF32, ReduceOp::kSum).status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

}  // namespace
}  // namespace myelin::collectives::testing
