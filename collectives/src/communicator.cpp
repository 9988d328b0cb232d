// collectives/src/communicator.cpp
#include <myelin/collectives/communicator.hpp>

#include <unistd.h>

#include <fstream>
#include <string>

#include <myelin/core/log.hpp>
#include <myelin/transport/node.hpp>

#include "exchange.hpp"

namespace myelin::collectives {

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
  MYELIN_RETURN_IF_ERROR(store.set(prefix + "node/" + std::to_string(rank_), node_id));

  std::vector<std::string> ids(static_cast<size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) {
      ids[static_cast<size_t>(r)] = node_id;
      continue;
    }
    MYELIN_ASSIGN_OR_RETURN(auto bytes, store.get(prefix + "node/" + std::to_string(r), deadline));
    ids[static_cast<size_t>(r)].assign(bytes.begin(), bytes.end());
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
  // this node holds more ranks than CPUs (spinning ranks would starve the peers they wait for).
  const transport::ProgressMode mode =
      options_.context->set_local_ranks(static_cast<int>(node_ranks_.size()));
  MYELIN_LOG_DEBUG << "communicator rank " << rank_ << ": progress "
                   << transport::progress_mode_name(mode) << " ("
                   << options_.context->progress_reason() << ")";
  MYELIN_LOG_DEBUG << "communicator rank " << rank_ << " of " << size_ << ": " << node_count_
                   << " node(s), " << node_ranks_.size() << " rank(s) on this node";
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
