// Ranks as threads of one process: each thread owns a transport Context and a Communicator, and
// all of them share one bootstrap FileStore (documented thread-safe). This is the threaded use the
// collectives allow ("different communicators on different Contexts are independent"); it checks
// that nothing in the library is shared between them unguarded (the kernel choice, the scratch
// buffers, logging). Labelled concurrency: the TSan stage of CI runs it.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <myelin/collectives/collectives.hpp>
#include <myelin/transport/bootstrap.hpp>
#include <myelin/transport/context.hpp>

#include "data.hpp"
#include "multiproc.hpp"

namespace myelin::collectives::testing {
namespace {

using transport::Backend;

Status run_rank(int rank, int n, Backend backend, transport::Store& store,
                const std::string& prefix) {
  transport::Options o;
  o.backend = backend;
  o.listen_address = "127.0.0.1";
  o.progress = transport::ProgressMode::kSpinThenBlock;  // n threads on 2 cores
  o.timeout = std::chrono::seconds(30);
  o.name = "thread rank " + std::to_string(rank);
  MYELIN_ASSIGN_OR_RETURN(auto ctx, transport::Context::create(o));
  CommunicatorOptions co;
  co.rank = rank;
  co.size = n;
  co.context = ctx.get();
  co.store = &store;
  co.key_prefix = prefix;
  co.timeout = std::chrono::seconds(30);
  MYELIN_ASSIGN_OR_RETURN(auto comm, Communicator::create(co));
  uint64_t salt = 300;
  for (int round = 0; round < 2; ++round) {
    for (Algorithm algo : {Algorithm::kAuto, Algorithm::kRing, Algorithm::kHalvingDoubling,
                           Algorithm::kRecursiveDoubling}) {
      for (size_t count : {size_t{1}, size_t{1023}, size_t{70001}}) {
        for (auto [t, op] :
             {std::pair{DataType::kF32, ReduceOp::kSum}, std::pair{DataType::kBF16, ReduceOp::kMax},
              std::pair{DataType::kI64, ReduceOp::kProd}}) {
          ++salt;
          auto buf = input(rank, count, t, op, salt);
          const auto want = expected_reduction(n, count, t, op, salt);
          auto r = allreduce(*comm, buf.data(), buf.data(), count, t, op,
                             {.algorithm = algo, .segment_size = 16384});
          const std::string what = ::myelin::internal::str_cat(
              "allreduce ", algorithm_name(algo), " ", dtype_name(t), " ", reduce_op_name(op),
              " n=", count, " on thread rank ", rank);
          if (!r.ok()) return std::move(r).status().with_context(what);
          if (first_difference(buf.data(), want.data(), count, t) >= 0) {
            return internal_error(what, ": wrong result");
          }
        }
      }
    }
    // The other collectives once per round, with the scratch buffers of the last allreduce
    // reused at another size.
    std::vector<int32_t> all(static_cast<size_t>(n) * 513, -1);
    std::vector<int32_t> mine(513, rank);
    MYELIN_RETURN_IF_ERROR(allgather(*comm, mine.data(), all.data(), 513, DataType::kI32).status());
    for (size_t i = 0; i < all.size(); ++i) {
      if (all[i] != static_cast<int32_t>(i / 513)) {
        return internal_error("allgather on thread rank ", rank, ": wrong element ", i);
      }
    }
    MYELIN_RETURN_IF_ERROR(barrier(*comm).status());
  }
  return ok_status();
}

class CollectivesThreads : public ::testing::TestWithParam<Backend> {};

TEST_P(CollectivesThreads, IndependentCommunicatorsInOneProcess) {
  constexpr int kRanks = 4;
  const std::string dir = make_temp_dir();
  ASSERT_FALSE(dir.empty());
  auto store = transport::FileStore::open(dir + "/store");
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const std::string prefix =
      ::myelin::internal::str_cat("threads-", transport::backend_name(GetParam()));
  std::vector<Status> results(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      results[static_cast<size_t>(r)] = run_rank(r, kRanks, GetParam(), **store, prefix);
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_TRUE(results[static_cast<size_t>(r)].ok())
        << "rank " << r << ": " << results[static_cast<size_t>(r)].to_string();
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}

INSTANTIATE_TEST_SUITE_P(Backends, CollectivesThreads,
                         ::testing::Values(Backend::kTcp, Backend::kAuto), [](const auto& p) {
                           return std::string(transport::backend_name(p.param));
                         });

}  // namespace
}  // namespace myelin::collectives::testing
