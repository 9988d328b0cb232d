// collectives/src/selection.cpp — names and the selection table (docs/collectives.md explains the
// thresholds; they come from the measurements there).
#include <myelin/collectives/collectives.hpp>

namespace myelin::collectives {

std::string_view collective_name(Collective c) noexcept {
  switch (c) {
    case Collective::kAllreduce:
      return "allreduce";
    case Collective::kReduceScatter:
      return "reduce_scatter";
    case Collective::kAllgather:
      return "allgather";
    case Collective::kBroadcast:
      return "broadcast";
    case Collective::kReduce:
      return "reduce";
    case Collective::kBarrier:
      return "barrier";
    case Collective::kAlltoall:
      return "alltoall";
  }
  return "?";
}

namespace {
constexpr Algorithm kAllAlgorithms[] = {Algorithm::kAuto,
                                        Algorithm::kRing,
                                        Algorithm::kHalvingDoubling,
                                        Algorithm::kRecursiveDoubling,
                                        Algorithm::kHierarchical,
                                        Algorithm::kBinomialTree,
                                        Algorithm::kChain,
                                        Algorithm::kDissemination,
                                        Algorithm::kPairwise};
}  // namespace

std::string_view algorithm_name(Algorithm a) noexcept {
  switch (a) {
    case Algorithm::kAuto:
      return "auto";
    case Algorithm::kRing:
      return "ring";
    case Algorithm::kHalvingDoubling:
      return "halving_doubling";
    case Algorithm::kRecursiveDoubling:
      return "recursive_doubling";
    case Algorithm::kHierarchical:
      return "hierarchical";
    case Algorithm::kBinomialTree:
      return "binomial_tree";
    case Algorithm::kChain:
      return "chain";
    case Algorithm::kDissemination:
      return "dissemination";
    case Algorithm::kPairwise:
      return "pairwise";
  }
  return "?";
}

Result<Algorithm> parse_algorithm(std::string_view name) {
  for (Algorithm a : kAllAlgorithms) {
    if (name == algorithm_name(a)) return a;
  }
  if (name == "rabenseifner" || name == "hd") return Algorithm::kHalvingDoubling;
  if (name == "rd") return Algorithm::kRecursiveDoubling;
  if (name == "tree" || name == "binomial") return Algorithm::kBinomialTree;
  return invalid_argument("unknown collective algorithm '", name,
                          "' (expected auto, ring, halving_doubling, recursive_doubling, "
                          "hierarchical, binomial_tree, chain, dissemination or pairwise)");
}

bool supports(Collective c, Algorithm a) noexcept {
  if (a == Algorithm::kAuto) return true;
  switch (c) {
    case Collective::kAllreduce:
      return a == Algorithm::kRing || a == Algorithm::kHalvingDoubling ||
             a == Algorithm::kRecursiveDoubling || a == Algorithm::kHierarchical;
    case Collective::kReduceScatter:
    case Collective::kAllgather:
      return a == Algorithm::kRing;
    case Collective::kBroadcast:
      return a == Algorithm::kBinomialTree || a == Algorithm::kChain;
    case Collective::kReduce:
      return a == Algorithm::kBinomialTree;
    case Collective::kBarrier:
      return a == Algorithm::kDissemination;
    case Collective::kAlltoall:
      return a == Algorithm::kPairwise;
  }
  return false;
}

// Thresholds (bytes per rank). Small allreduces are latency-bound: recursive doubling needs
// log2 p messages against 2 (p - 1) for the ring. In between, halving-doubling moves as little
// data as the ring in 2 log2 p steps. Large ones are bandwidth-bound and the pipelined ring keeps
// every link busy. With more than one rank per node on more than one node, the hierarchical
// algorithm keeps same-node traffic off the network.
constexpr size_t kRecursiveDoublingMax = 16 * 1024;
constexpr size_t kHalvingDoublingMax = 512 * 1024;
constexpr size_t kBinomialBroadcastMax = 128 * 1024;

Algorithm select_algorithm(Collective c, size_t bytes, int ranks, int nodes) noexcept {
  switch (c) {
    case Collective::kAllreduce:
      if (nodes > 1 && ranks > nodes) return Algorithm::kHierarchical;
      if (bytes <= kRecursiveDoublingMax) return Algorithm::kRecursiveDoubling;
      if (bytes <= kHalvingDoublingMax) return Algorithm::kHalvingDoubling;
      return Algorithm::kRing;
    case Collective::kReduceScatter:
    case Collective::kAllgather:
      return Algorithm::kRing;
    case Collective::kBroadcast:
      return bytes <= kBinomialBroadcastMax || ranks <= 2 ? Algorithm::kBinomialTree
                                                          : Algorithm::kChain;
    case Collective::kReduce:
      return Algorithm::kBinomialTree;
    case Collective::kBarrier:
      return Algorithm::kDissemination;
    case Collective::kAlltoall:
      return Algorithm::kPairwise;
  }
  return Algorithm::kRing;
}

}  // namespace myelin::collectives
