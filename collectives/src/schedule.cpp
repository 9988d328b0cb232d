// collectives/src/schedule.cpp
#include "schedule.hpp"

#include <algorithm>

namespace myelin::collectives::internal {

Range balanced_block(size_t count, int n, int i) noexcept {
  const size_t base = count / static_cast<size_t>(n);
  const size_t extra = count % static_cast<size_t>(n);
  const auto ui = static_cast<size_t>(i);
  return Range{ui * base + std::min(ui, extra), base + (ui < extra ? 1 : 0)};
}

Range balanced_blocks(size_t count, int n, int first, int last) noexcept {
  if (first >= last) return Range{balanced_block(count, n, first).offset, 0};
  const Range a = balanced_block(count, n, first);
  const Range b = balanced_block(count, n, last - 1);
  return Range{a.offset, b.offset + b.count - a.offset};
}

int largest_pof2(int n) noexcept {
  int p = 1;
  while (p * 2 <= n) p *= 2;
  return p;
}

Fold fold(int rank, int n) noexcept {
  Fold f;
  f.pof2 = largest_pof2(n);
  f.rem = n - f.pof2;
  if (rank < 2 * f.rem) {
    if (rank % 2 == 0) {
      f.new_rank = -1;
      f.partner = rank + 1;
    } else {
      f.new_rank = rank / 2;
      f.partner = rank - 1;
    }
  } else {
    f.new_rank = rank - f.rem;
  }
  return f;
}

int unfold(int new_rank, int rem) noexcept {
  return new_rank < rem ? new_rank * 2 + 1 : new_rank + rem;
}

TreeNode binomial_tree(int rank, int n, int root) {
  TreeNode node;
  const int vrank = (rank - root + n) % n;
  int mask = 1;
  while (mask < n) {
    if (vrank & mask) {
      node.parent = ((vrank - mask) + root) % n;
      break;
    }
    mask <<= 1;
  }
  // Children are vrank + m for the masks below the one where we found our parent.
  for (mask >>= 1; mask > 0; mask >>= 1) {
    if (vrank + mask < n) node.children.push_back((vrank + mask + root) % n);
  }
  return node;
}

int dissemination_rounds(int n) noexcept {
  int rounds = 0;
  for (int k = 1; k < n; k <<= 1) ++rounds;
  return rounds;
}

std::vector<HalvingStep> halving_steps(int new_rank, int pof2) {
  std::vector<HalvingStep> steps;
  int lo = 0;
  int hi = pof2;
  for (int mask = pof2 >> 1; mask > 0; mask >>= 1) {
    const int mid = (lo + hi) / 2;
    HalvingStep s;
    s.partner = new_rank ^ mask;
    if ((new_rank & mask) == 0) {
      s.keep_lo = lo, s.keep_hi = mid, s.send_lo = mid, s.send_hi = hi;
    } else {
      s.keep_lo = mid, s.keep_hi = hi, s.send_lo = lo, s.send_hi = mid;
    }
    lo = s.keep_lo;
    hi = s.keep_hi;
    steps.push_back(s);
  }
  return steps;
}

}  // namespace myelin::collectives::internal
