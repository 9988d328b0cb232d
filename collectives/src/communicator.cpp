// collectives/src/communicator.cpp
#include <myelin/collectives/communicator.hpp>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <string>
#include <string_view>

#include <myelin/core/log.hpp>
#include <myelin/transport/node.hpp>

#include "exchange.hpp"

namespace myelin::collectives {

namespace {
// Largest CPU number a published CPU list may name (a bound on the bitmap a peer's text can make).
constexpr long kMaxCpu = (1L << 20) - 1;

// The calling thread's affinity mask as a Linux CPU list ("0-3,8"); empty when it cannot be read
// (then this rank counts as sharing every other rank's CPUs).
std::string this_thread_cpu_list() {
  for (size_t ncpus = CPU_SETSIZE; ncpus <= static_cast<size_t>(kMaxCpu) + 1; ncpus *= 2) {
    cpu_set_t* set = CPU_ALLOC(ncpus);
    if (set == nullptr) return {};
    const size_t bytes = CPU_ALLOC_SIZE(ncpus);
    if (sched_getaffinity(0, bytes, set) != 0) {
      const int err = errno;
      CPU_FREE(set);
      if (err == EINVAL) continue;  // the kernel has more CPUs than the set holds
      return {};
    }
    std::string out;
    for (size_t c = 0; c < ncpus; ++c) {
      if (!CPU_ISSET_S(c, bytes, set)) continue;
      size_t hi = c;
      while (hi + 1 < ncpus && CPU_ISSET_S(hi + 1, bytes, set)) ++hi;
      if (!out.empty()) out += ',';
      out += std::to_string(c);
      if (hi > c) out += "-" + std::to_string(hi);
      c = hi;
    }
    CPU_FREE(set);
    return out;
  }
  return {};
}

// A CPU list as a bitmap (bit c of word c / 64); empty text gives an empty bitmap ("unknown").
Result<std::vector<uint64_t>> parse_cpu_list(std::string_view text) {
  std::vector<uint64_t> bits;
  size_t i = 0;
  auto number = [&](long* v) {
    const size_t start = i;
    long n = 0;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9' && n <= kMaxCpu) {
      n = n * 10 + (text[i] - '0');
      ++i;
    }
    *v = n;
    return i > start && n <= kMaxCpu;
  };
  while (i < text.size()) {
    long lo = 0;
    long hi = 0;
    if (!number(&lo)) return invalid_argument("bad CPU number at offset ", i, " of '", text, "'");
    hi = lo;
    if (i < text.size() && text[i] == '-') {
      ++i;
      if (!number(&hi) || hi < lo) {
        return invalid_argument("bad CPU range at offset ", i, " of '", text, "'");
      }
    }
    if (i < text.size()) {
      if (text[i] != ',' || i + 1 == text.size()) {
        return invalid_argument("unexpected '", text.substr(i, 1), "' at offset ", i, " of '", text,
                                "'");
      }
      ++i;
    }
    if (bits.size() <= static_cast<size_t>(hi) / 64) bits.resize(static_cast<size_t>(hi) / 64 + 1);
    for (long c = lo; c <= hi; ++c) bits[static_cast<size_t>(c) / 64] |= uint64_t{1} << (c % 64);
  }
  return bits;
}

// Whether two ranks may run on a common CPU; an unknown mask (empty) may run anywhere.
bool share_a_cpu(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b) {
  if (a.empty() || b.empty()) return true;
  for (size_t w = 0; w < std::min(a.size(), b.size()); ++w) {
    if ((a[w] & b[w]) != 0) return true;
  }
  return false;
}
}  // namespace

Communicator::Communicator(const CommunicatorOptions& options)
    : options_(options),
      rank_(options.rank),
      size_(options.size),
      pending_pool_(std::make_unique<internal::PendingPool>()) {}

Communicator::~Communicator() = default;

Result<std::unique_ptr<Communicator>> Communicator::create(const CommunicatorOptions& options) {
  if (options.context == nullptr) return invalid_argument("communicator needs a transport Context");
  if (options.store == nullptr) return invalid_argument("communicator needs a bootstrap Store");
  if (options.size < 1)
    return invalid_argument("communicator size must be >= 1, got ", options.size);
  if (options.rank < 0 || options.rank >= options.size) {
    return invalid_argument("rank ", options.rank, " outside [0, ", options.size, ")");
  }
  if (options.timeout.count() <= 0) {
    return invalid_argument("communicator timeout must be positive, got ", options.timeout.count(),
                            " ms");
  }
  std::unique_ptr<Communicator> comm(new Communicator(options));
  MYELIN_RETURN_IF_ERROR(comm->init().with_context(::myelin::internal::str_cat(
      "creating the communicator of rank ", options.rank, " of ", options.size)));
  return comm;
}

Status Communicator::init() {
  const Deadline deadline = Deadline::after(options_.timeout);
  transport::Store& store = *options_.store;
  const std::string prefix = options_.key_prefix + "/";
  if (options_.publish_address) {
    const auto& addr = options_.context->address();
    MYELIN_RETURN_IF_ERROR(
        store.set(prefix + "addr/" + std::to_string(rank_), std::span<const uint8_t>(addr)));
  }
  const std::string node_id =
      options_.node_id.empty() ? transport::local_node_id() : options_.node_id;
  if (node_id.find('\n') != std::string::npos) {
    return invalid_argument("node id '", node_id, "' holds a line break");
  }
  // "<node id>\n<CPU list of this rank's affinity mask>": the node groups ranks, the masks tell
  // which of a node's ranks compete for the same CPUs (for the progress mode below).
  const std::string cpus = this_thread_cpu_list();
  MYELIN_RETURN_IF_ERROR(
      store.set(prefix + "node/" + std::to_string(rank_), node_id + "\n" + cpus));

  std::vector<std::string> ids(static_cast<size_t>(size_));
  std::vector<std::vector<uint64_t>> masks(static_cast<size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    std::string value = node_id + "\n" + cpus;
    if (r != rank_) {
      MYELIN_ASSIGN_OR_RETURN(auto bytes,
                              store.get(prefix + "node/" + std::to_string(r), deadline));
      value.assign(bytes.begin(), bytes.end());
    }
    const size_t nl = value.find('\n');
    if (nl == std::string::npos) {
      return invalid_argument("rank ", r, " published its node id without a CPU list: '", value,
                              "' (a communicator of another version?)");
    }
    ids[static_cast<size_t>(r)] = value.substr(0, nl);
    auto mask = parse_cpu_list(std::string_view(value).substr(nl + 1));
    if (!mask.ok()) {
      return std::move(mask).status().with_context(
          ::myelin::internal::str_cat("reading the CPU list rank ", r, " published"));
    }
    masks[static_cast<size_t>(r)] = std::move(mask).value();
  }
  node_of_.assign(static_cast<size_t>(size_), -1);
  std::vector<std::string> nodes;
  for (int r = 0; r < size_; ++r) {
    int idx = -1;
    for (size_t i = 0; i < nodes.size(); ++i) {
      if (nodes[i] == ids[static_cast<size_t>(r)]) idx = static_cast<int>(i);
    }
    if (idx < 0) {
      idx = static_cast<int>(nodes.size());
      nodes.push_back(ids[static_cast<size_t>(r)]);
    }
    node_of_[static_cast<size_t>(r)] = idx;
  }
  node_count_ = static_cast<int>(nodes.size());
  for (int r = 0; r < size_; ++r) {
    if (node_of_[static_cast<size_t>(r)] == node_of_[static_cast<size_t>(rank_)]) {
      node_ranks_.push_back(r);
    }
  }
  endpoints_.assign(static_cast<size_t>(size_), nullptr);
  // Progress mode: a Context in ProgressMode::kAuto polls and yields instead of spinning when
  // more ranks compete for this rank's CPUs than there are of them (spinning ranks would starve
  // the peers they wait for). The Context counts the CPUs this thread may use
  // (transport::usable_cpus(), the affinity mask included); the competitors are this node's ranks
  // whose masks share a CPU with this one: all of them without pinning, this rank alone when a
  // launcher gave each rank a core of its own, both when two ranks were bound to one CPU.
  int sharing = 0;
  for (int r : node_ranks_) {
    if (share_a_cpu(masks[static_cast<size_t>(r)], masks[static_cast<size_t>(rank_)])) ++sharing;
  }
  const transport::ProgressMode mode = options_.context->set_local_ranks(sharing);
  MYELIN_LOG_DEBUG << "communicator rank " << rank_ << ": progress "
                   << transport::progress_mode_name(mode) << " ("
                   << options_.context->progress_reason() << ")";
  MYELIN_LOG_DEBUG << "communicator rank " << rank_ << " of " << size_ << ": " << node_count_
                   << " node(s), " << node_ranks_.size() << " rank(s) on this node, " << sharing
                   << " sharing its CPUs (" << (cpus.empty() ? "mask unknown" : cpus) << ")";
  return ok_status();
}

Result<transport::Endpoint*> Communicator::peer(int rank, Deadline deadline) {
  MYELIN_CHECK(rank >= 0 && rank < size_ && rank != rank_) << "peer " << rank;
  auto& slot = endpoints_[static_cast<size_t>(rank)];
  if (slot != nullptr) return slot;
  const std::string key = options_.key_prefix + "/addr/" + std::to_string(rank);
  auto addr = options_.store->get(key, deadline);
  if (!addr.ok()) {
    return std::move(addr).status().with_context(
        ::myelin::internal::str_cat("looking up the address of rank ", rank));
  }
  auto ep = options_.context->connect(std::span<const uint8_t>(*addr), deadline);
  if (!ep.ok()) {
    return std::move(ep).status().with_context(
        ::myelin::internal::str_cat("connecting to rank ", rank));
  }
  slot = *ep;
  MYELIN_LOG_DEBUG << "rank " << rank_ << " connected to rank " << rank << " over "
                   << transport::backend_name(slot->backend());
  return slot;
}

void Communicator::fail(const Status& error) {
  if (failure_.ok()) failure_ = error;
  for (auto& ep : endpoints_) {
    if (ep != nullptr) {
      options_.context->disconnect(ep);
      ep = nullptr;
    }
  }
}

uint8_t* Communicator::scratch(int slot, size_t bytes) {
  MYELIN_CHECK(slot >= 0 && slot < 4) << "scratch slot " << slot;
  auto& buf = scratch_[slot];
  if (buf.size() < bytes || buf.empty()) buf.resize(bytes < 64 ? 64 : bytes);
  return buf.data();
}

}  // namespace myelin::collectives
