// collectives/src/schedule.hpp — the pure arithmetic of the algorithms: block partitions,
// folding of non-power-of-two rank counts, binomial trees, dissemination partners. No I/O, so
// every rule is unit-tested on its own (tests/collectives/schedule_test.cpp). Not public API.
#pragma once

#include <cstddef>
#include <vector>

namespace myelin::collectives::internal {

// A run of elements.
struct Range {
  size_t offset = 0;
  size_t count = 0;
};

// Block i of `count` elements cut into n nearly equal blocks: the first count % n blocks hold one
// element more. Blocks are contiguous, in order, and cover [0, count).
Range balanced_block(size_t count, int n, int i) noexcept;
// The union of blocks [first, last) of the same partition.
Range balanced_blocks(size_t count, int n, int first, int last) noexcept;

// Largest power of two <= n (n >= 1).
int largest_pof2(int n) noexcept;

// Folding for recursive halving/doubling with n ranks that is not a power of two: with
// pof2 = largest_pof2(n) and rem = n - pof2, each of the first 2*rem ranks pairs up (even rank
// with the odd one after it); the even rank hands its data to the odd one and sits out the
// power-of-two part, then gets the result back. Every other rank keeps going with a new rank
// number, so exactly pof2 ranks take part.
struct Fold {
  int pof2 = 1;
  int rem = 0;
  int new_rank = 0;  // -1 when this rank sits out
  int partner = -1;  // the rank it exchanges with before/after (-1 for none)
};
Fold fold(int rank, int n) noexcept;
// Real rank of a participant's new rank.
int unfold(int new_rank, int rem) noexcept;

// Binomial tree rooted at `root` over n ranks: the parent (-1 at the root) and the children of
// `rank`, children in the order a broadcast sends to them (farthest subtree first), which is also
// the reverse of the order a reduce receives from them.
struct TreeNode {
  int parent = -1;
  std::vector<int> children;
};
TreeNode binomial_tree(int rank, int n, int root);

// Ring neighbours.
inline int ring_next(int rank, int n) noexcept {
  return (rank + 1) % n;
}
inline int ring_prev(int rank, int n) noexcept {
  return (rank + n - 1) % n;
}

// Dissemination barrier: in round k (distance 2^k) rank r signals r + 2^k and waits for r - 2^k
// (mod n); ceil(log2 n) rounds.
int dissemination_rounds(int n) noexcept;

// Recursive halving for new rank `r` among pof2 participants: at step i (mask = pof2 >> (i+1)),
// the block range [lo, hi) in units of pof2 blocks it keeps and the one it sends to r ^ mask.
struct HalvingStep {
  int partner = 0;  // new rank
  int keep_lo = 0, keep_hi = 0;
  int send_lo = 0, send_hi = 0;
};
std::vector<HalvingStep> halving_steps(int new_rank, int pof2);

}  // namespace myelin::collectives::internal
