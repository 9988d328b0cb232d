// The large end of the collectives matrix: 2^20 + 3 elements (4 MiB of f32 per rank, an odd count
// that no rank count divides and that spans many 256 KiB pipeline segments), on 2, 3, 4, 5 and 8
// forked ranks over TCP, nodes of 3 ranks emulated from 4 ranks up (as in multiproc_test.cpp).
//
// What runs here (the small counts 0, 1, 7, 1023 of every type, op, algorithm and rank count 1-8
// are in multiproc_test.cpp; docs/collectives.md "Tests" has the whole map):
//   allreduce  every algorithm (auto and each forced one) x {f32 sum, i32 max, bf16 sum} x in place
//              and out of place. f32 sum uses inexact random data: every element must lie within
//              the n * eps * sum|x| rounding bound of the exact sum, and every rank must end with
//              the same bits. i32 max and bf16 sum use the exactly representable data of data.hpp
//              and must equal the reference bit for bit.
//   reduce_scatter f32 sum, allgather bf16, broadcast i32 (binomial and chain), reduce i32 max,
//              alltoall u8 at the same count, alternately in place and out of place.
// Labelled slow (each case takes seconds on two cores); the CI release stage runs it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "data.hpp"
#include "multiproc.hpp"

namespace myelin::collectives::testing {
namespace {

constexpr size_t kLarge = (size_t{1} << 20) + 3;

std::string label(std::string_view coll, Algorithm a, DataType t, ReduceOp op, bool in_place) {
  return ::myelin::internal::str_cat(coll, " ", algorithm_name(a), " ", dtype_name(t), " ",
                                     reduce_op_name(op), " n=", kLarge,
                                     in_place ? " in-place" : " out-of-place");
}

// FNV-1a over the bytes: a cheap fingerprint to compare results across ranks.
uint64_t fingerprint(const uint8_t* p, size_t bytes) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001B3ull;
  return h;
}

// Every rank ended with the same bytes: allgather the fingerprints and compare.
Status same_on_every_rank(RankCtx& rc, const uint8_t* p, size_t bytes, const std::string& what) {
  const uint64_t mine = fingerprint(p, bytes);
  std::vector<uint64_t> all(static_cast<size_t>(rc.size));
  MYELIN_RETURN_IF_ERROR(allgather(*rc.comm, &mine, all.data(), 1, DataType::kI64).status());
  for (int r = 0; r < rc.size; ++r) {
    if (all[static_cast<size_t>(r)] != mine) {
      return internal_error(what, ": rank ", r, " ended with different bits than rank ", rc.rank);
    }
  }
  return ok_status();
}

// Inexact f32 input in [-1, 1]: sums round, so the check is the rounding bound.
float random_value(int rank, size_t i) {
  return static_cast<float>(static_cast<double>(mix(rank * 977 + i * 131 + 5) % 20001) / 10000.0 -
                            1.0);
}

Status check_f32_sum_random(RankCtx& rc, Algorithm algo, bool in_place) {
  const std::string what = label("allreduce", algo, DataType::kF32, ReduceOp::kSum, in_place);
  std::vector<float> in(kLarge);
  for (size_t i = 0; i < kLarge; ++i) in[i] = random_value(rc.rank, i);
  std::vector<float> out(in_place ? 0 : kLarge + 1, -7.0f);  // one guard element past the end
  float* recv = in_place ? in.data() : out.data();
  auto used = allreduce(*rc.comm, in.data(), recv, kLarge, DataType::kF32, ReduceOp::kSum,
                        {.algorithm = algo});
  if (!used.ok()) return std::move(used).status().with_context(what);
  if (algo != Algorithm::kAuto && *used != algo)
    return internal_error(what, ": ran another algorithm");
  if (!in_place && out.back() != -7.0f) return internal_error(what, ": wrote past the end");
  for (size_t i = 0; i < kLarge; ++i) {
    double exact = 0, magnitude = 0;
    for (int r = 0; r < rc.size; ++r) {
      const double x = random_value(r, i);
      exact += x;
      magnitude += std::abs(x);
    }
    const double bound = rc.size * 0x1p-24 * magnitude + 1e-30;
    if (std::abs(static_cast<double>(recv[i]) - exact) > bound) {
      return internal_error(what, ": element ", i, " is ", recv[i], ", exact sum ", exact,
                            " (bound ", bound, ") on rank ", rc.rank);
    }
  }
  return same_on_every_rank(rc, reinterpret_cast<const uint8_t*>(recv), kLarge * sizeof(float),
                            what);
}

// Exact data: the reference is computed once per (type, op) and shared by every algorithm.
struct Exact {
  DataType type;
  ReduceOp op;
  uint64_t salt;
  std::vector<uint8_t> want;
};

Status check_exact(RankCtx& rc, Algorithm algo, const Exact& e, bool in_place) {
  const std::string what = label("allreduce", algo, e.type, e.op, in_place);
  auto in = input(rc.rank, kLarge, e.type, e.op, e.salt);
  std::vector<uint8_t> out(in_place ? 0 : in.size() + 1, 0xEE);
  uint8_t* recv = in_place ? in.data() : out.data();
  auto used = allreduce(*rc.comm, in.data(), recv, kLarge, e.type, e.op, {.algorithm = algo});
  if (!used.ok()) return std::move(used).status().with_context(what);
  if (algo != Algorithm::kAuto && *used != algo)
    return internal_error(what, ": ran another algorithm");
  if (!in_place && out.back() != 0xEE) return internal_error(what, ": wrote past the end");
  const long bad = first_difference(recv, e.want.data(), kLarge, e.type);
  if (bad >= 0) return internal_error(what, ": wrong element ", bad, " on rank ", rc.rank);
  return ok_status();
}

WorldSpec spec_for(int ranks) {
  WorldSpec s;
  s.ranks = ranks;
  s.ranks_per_node = ranks >= 4 ? 3 : 0;
  s.timeout = std::chrono::seconds(60);
  return s;
}

class CollectivesLarge : public ::testing::TestWithParam<int> {};

TEST_P(CollectivesLarge, AllreduceEveryAlgorithm) {
  const auto out = run_world(spec_for(GetParam()), [](RankCtx& rc) -> Status {
    const Exact exact[] = {
        {DataType::kI32, ReduceOp::kMax, 11,
         expected_reduction(rc.size, kLarge, DataType::kI32, ReduceOp::kMax, 11)},
        {DataType::kBF16, ReduceOp::kSum, 12,
         expected_reduction(rc.size, kLarge, DataType::kBF16, ReduceOp::kSum, 12)},
    };
    for (Algorithm algo : {Algorithm::kAuto, Algorithm::kRing, Algorithm::kHalvingDoubling,
                           Algorithm::kRecursiveDoubling, Algorithm::kHierarchical}) {
      for (bool in_place : {false, true}) {
        MYELIN_RETURN_IF_ERROR(check_f32_sum_random(rc, algo, in_place));
        for (const Exact& e : exact) MYELIN_RETURN_IF_ERROR(check_exact(rc, algo, e, in_place));
      }
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

TEST_P(CollectivesLarge, OtherCollectives) {
  const auto out = run_world(spec_for(GetParam()), [](RankCtx& rc) -> Status {
    const auto n = static_cast<size_t>(rc.size);
    const auto me = static_cast<size_t>(rc.rank);
    {  // reduce_scatter f32 sum, out of place: n * kLarge in, block `me` out.
      const uint64_t salt = 21;
      auto in = input(rc.rank, n * kLarge, DataType::kF32, ReduceOp::kSum, salt);
      const auto keep = in;
      const auto want =
          expected_reduction(rc.size, kLarge, DataType::kF32, ReduceOp::kSum, salt, kLarge * me);
      std::vector<uint8_t> got(kLarge * 4);
      const std::string what =
          label("reduce_scatter", Algorithm::kRing, DataType::kF32, ReduceOp::kSum, false);
      auto r =
          reduce_scatter(*rc.comm, in.data(), got.data(), kLarge, DataType::kF32, ReduceOp::kSum);
      if (!r.ok()) return std::move(r).status().with_context(what);
      const long bad = first_difference(got.data(), want.data(), kLarge, DataType::kF32);
      if (bad >= 0) return internal_error(what, ": wrong element ", bad, " on rank ", rc.rank);
      if (in != keep) return internal_error(what, ": the send buffer changed");
    }
    {  // allgather bf16, in place.
      const uint64_t salt = 22;
      std::vector<uint8_t> all;
      for (int r = 0; r < rc.size; ++r) {
        auto part = input(r, kLarge, DataType::kBF16, ReduceOp::kSum, salt);
        all.insert(all.end(), part.begin(), part.end());
      }
      const auto want = all;
      for (size_t r = 0; r < n; ++r) {  // clear everyone's block but mine
        if (r != me) std::memset(all.data() + r * kLarge * 2, 0, kLarge * 2);
      }
      const std::string what =
          label("allgather", Algorithm::kRing, DataType::kBF16, ReduceOp::kSum, true);
      auto r =
          allgather(*rc.comm, all.data() + me * kLarge * 2, all.data(), kLarge, DataType::kBF16);
      if (!r.ok()) return std::move(r).status().with_context(what);
      const long bad = first_difference(all.data(), want.data(), n * kLarge, DataType::kBF16);
      if (bad >= 0) return internal_error(what, ": wrong element ", bad, " on rank ", rc.rank);
    }
    for (Algorithm algo : {Algorithm::kBinomialTree, Algorithm::kChain}) {  // broadcast i32
      const int root = rc.size - 1;
      const uint64_t salt = algo == Algorithm::kChain ? 23 : 24;
      const auto want = input(root, kLarge, DataType::kI32, ReduceOp::kSum, salt);
      auto buf = rc.rank == root ? want : std::vector<uint8_t>(want.size(), 0);
      const bool in_place = algo == Algorithm::kChain;
      std::vector<uint8_t> dst(in_place ? 0 : want.size(), 0);
      uint8_t* recv = in_place ? buf.data() : dst.data();
      const std::string what = label("broadcast", algo, DataType::kI32, ReduceOp::kSum, in_place);
      auto r = broadcast(*rc.comm, buf.data(), recv, kLarge, DataType::kI32,
                         {.algorithm = algo, .root = root});
      if (!r.ok()) return std::move(r).status().with_context(what);
      const long bad = first_difference(recv, want.data(), kLarge, DataType::kI32);
      if (bad >= 0) return internal_error(what, ": wrong element ", bad, " on rank ", rc.rank);
    }
    {  // reduce i32 max to the middle rank, in place.
      const int root = rc.size / 2;
      const uint64_t salt = 25;
      auto in = input(rc.rank, kLarge, DataType::kI32, ReduceOp::kMax, salt);
      const auto keep = in;
      const std::string what =
          label("reduce", Algorithm::kBinomialTree, DataType::kI32, ReduceOp::kMax, true);
      auto r = reduce(*rc.comm, in.data(), in.data(), kLarge, DataType::kI32, ReduceOp::kMax,
                      {.root = root});
      if (!r.ok()) return std::move(r).status().with_context(what);
      if (rc.rank == root) {
        const auto want = expected_reduction(rc.size, kLarge, DataType::kI32, ReduceOp::kMax, salt);
        const long bad = first_difference(in.data(), want.data(), kLarge, DataType::kI32);
        if (bad >= 0) return internal_error(what, ": wrong element ", bad, " on the root");
      } else if (in != keep) {
        return internal_error(what, ": a non-root's buffer changed");
      }
    }
    {  // alltoall u8, out of place: block j of rank i is input(i, first = j * kLarge).
      const uint64_t salt = 26;
      auto in = input(rc.rank, n * kLarge, DataType::kU8, ReduceOp::kSum, salt);
      std::vector<uint8_t> want;
      for (int i = 0; i < rc.size; ++i) {
        auto part = input(i, kLarge, DataType::kU8, ReduceOp::kSum, salt, kLarge * me);
        want.insert(want.end(), part.begin(), part.end());
      }
      std::vector<uint8_t> got(n * kLarge, 0);
      const std::string what =
          label("alltoall", Algorithm::kPairwise, DataType::kU8, ReduceOp::kSum, false);
      auto r = alltoall(*rc.comm, in.data(), got.data(), kLarge, DataType::kU8);
      if (!r.ok()) return std::move(r).status().with_context(what);
      const long bad = first_difference(got.data(), want.data(), n * kLarge, DataType::kU8);
      if (bad >= 0) return internal_error(what, ": wrong element ", bad, " on rank ", rc.rank);
    }
    return ok_status();
  });
  EXPECT_TRUE(out.all_ok()) << out.summary();
}

INSTANTIATE_TEST_SUITE_P(Ranks, CollectivesLarge, ::testing::Values(2, 3, 4, 5, 8),
                         [](const auto& p) { return std::to_string(p.param) + "ranks"; });

}  // namespace
}  // namespace myelin::collectives::testing
