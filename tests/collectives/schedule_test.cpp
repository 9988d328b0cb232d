// Unit tests of the algorithms' arithmetic (partitions, folding, trees, halving ranges) and of
// the selection table. No processes.
#include <gtest/gtest.h>

#include <set>

#include <myelin/collectives/collectives.hpp>

#include "schedule.hpp"

namespace myelin::collectives::internal {
namespace {

TEST(Schedule, BalancedBlocksCoverEverythingInOrder) {
  for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{1023}, size_t{1048579}}) {
    for (int n = 1; n <= 9; ++n) {
      size_t next = 0;
      for (int i = 0; i < n; ++i) {
        const Range b = balanced_block(count, n, i);
        EXPECT_EQ(b.offset, next);
        EXPECT_LE(b.count, count / static_cast<size_t>(n) + 1);
        next += b.count;
      }
      EXPECT_EQ(next, count);
      const Range all = balanced_blocks(count, n, 0, n);
      EXPECT_EQ(all.offset, 0u);
      EXPECT_EQ(all.count, count);
    }
  }
}

TEST(Schedule, FoldLeavesAPowerOfTwoOfParticipants) {
  for (int n = 1; n <= 33; ++n) {
    std::set<int> new_ranks;
    for (int r = 0; r < n; ++r) {
      const Fold f = fold(r, n);
      EXPECT_EQ(f.pof2 + f.rem, n);
      EXPECT_EQ(f.pof2 & (f.pof2 - 1), 0) << f.pof2;
      if (f.new_rank >= 0) {
        EXPECT_TRUE(new_ranks.insert(f.new_rank).second);
        EXPECT_EQ(unfold(f.new_rank, f.rem), r);
      } else {
        // The folded rank's partner takes part and names it back.
        ASSERT_GE(f.partner, 0);
        EXPECT_EQ(fold(f.partner, n).partner, r);
        EXPECT_GE(fold(f.partner, n).new_rank, 0);
      }
    }
    EXPECT_EQ(static_cast<int>(new_ranks.size()), largest_pof2(n));
  }
}

TEST(Schedule, BinomialTreeIsASpanningTreeOfLogDepth) {
  for (int n = 1; n <= 17; ++n) {
    for (int root = 0; root < n; ++root) {
      int edges = 0;
      for (int r = 0; r < n; ++r) {
        const TreeNode t = binomial_tree(r, n, root);
        EXPECT_EQ(t.parent < 0, r == root);
        for (int c : t.children) {
          EXPECT_EQ(binomial_tree(c, n, root).parent, r);
          ++edges;
        }
        int depth = 0;
        for (int x = r; x != root; x = binomial_tree(x, n, root).parent) ++depth;
        EXPECT_LE(depth, dissemination_rounds(n));
      }
      EXPECT_EQ(edges, n - 1);
    }
  }
}

TEST(Schedule, HalvingEndsWithOwnBlockAndPartnersAgree) {
  for (int pof2 = 1; pof2 <= 64; pof2 *= 2) {
    for (int r = 0; r < pof2; ++r) {
      const auto steps = halving_steps(r, pof2);
      ASSERT_EQ(static_cast<int>(steps.size()), dissemination_rounds(pof2));
      if (!steps.empty()) {
        EXPECT_EQ(steps.back().keep_lo, r);
        EXPECT_EQ(steps.back().keep_hi, r + 1);
      }
      for (size_t i = 0; i < steps.size(); ++i) {
        const auto theirs = halving_steps(steps[i].partner, pof2)[i];
        EXPECT_EQ(theirs.partner, r);
        EXPECT_EQ(theirs.keep_lo, steps[i].send_lo);  // what I send is what they keep
        EXPECT_EQ(theirs.keep_hi, steps[i].send_hi);
      }
    }
  }
}

TEST(Schedule, DisseminationRounds) {
  EXPECT_EQ(dissemination_rounds(1), 0);
  EXPECT_EQ(dissemination_rounds(2), 1);
  EXPECT_EQ(dissemination_rounds(5), 3);
  EXPECT_EQ(dissemination_rounds(8), 3);
  EXPECT_EQ(dissemination_rounds(9), 4);
}

TEST(Selection, TableAndSupport) {
  EXPECT_EQ(select_algorithm(Collective::kAllreduce, 4096, 8, 1), Algorithm::kRecursiveDoubling);
  EXPECT_EQ(select_algorithm(Collective::kAllreduce, 128 * 1024, 8, 1),
            Algorithm::kHalvingDoubling);
  EXPECT_EQ(select_algorithm(Collective::kAllreduce, 64 << 20, 7, 1), Algorithm::kRing);
  EXPECT_EQ(select_algorithm(Collective::kAllreduce, 64 << 20, 8, 2), Algorithm::kHierarchical);
  EXPECT_EQ(select_algorithm(Collective::kAllreduce, 64 << 20, 2, 2), Algorithm::kRing);
  EXPECT_EQ(select_algorithm(Collective::kBroadcast, 1024, 8, 1), Algorithm::kBinomialTree);
  EXPECT_EQ(select_algorithm(Collective::kBroadcast, 8 << 20, 8, 1), Algorithm::kChain);
  EXPECT_EQ(select_algorithm(Collective::kBarrier, 0, 8, 1), Algorithm::kDissemination);
  // Whatever the table picks, the collective implements it.
  for (auto c :
       {Collective::kAllreduce, Collective::kReduceScatter, Collective::kAllgather,
        Collective::kBroadcast, Collective::kReduce, Collective::kBarrier, Collective::kAlltoall}) {
    for (size_t bytes : {size_t{0}, size_t{4096}, size_t{1} << 20, size_t{1} << 28}) {
      for (int n = 1; n <= 9; ++n) {
        for (int nodes = 1; nodes <= n; ++nodes) {
          EXPECT_TRUE(supports(c, select_algorithm(c, bytes, n, nodes)));
        }
      }
    }
  }
  EXPECT_FALSE(supports(Collective::kBroadcast, Algorithm::kRing));
  EXPECT_EQ(*parse_algorithm("ring"), Algorithm::kRing);
  EXPECT_EQ(*parse_algorithm("rabenseifner"), Algorithm::kHalvingDoubling);
  EXPECT_EQ(parse_algorithm("bruck").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace myelin::collectives::internal
