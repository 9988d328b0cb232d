// collectives/src/exchange.cpp
#include "exchange.hpp"

#include <myelin/core/log.hpp>

namespace myelin::collectives::internal {

PendingPool::~PendingPool() {
  if (work_context != nullptr && work.valid()) work_context->deregister(work);
  if (yield_guard.yields() > 0) {
    MYELIN_LOG_DEBUG << "small waits yielded " << yield_guard.yields() << " times ("
                     << yield_guard.long_yields() << " long), held " << yield_guard.holds()
                     << " times (last hold " << yield_guard.hold_ns() / 1'000'000 << " ms)";
  }
}

Exchange::~Exchange() {
  // Normally everything was waited for. After an error the dispatcher has already failed the
  // communicator, which disconnected the endpoints and so completed (cancelled) what was pending;
  // this only catches what is left.
  for (size_t i = first_unwaited_; i < pending_.size(); ++i) {
    Pending& p = pending_[i];
    if (p.waited || p.request.done()) continue;
    const Status s = comm_.context().wait(p.request, deadline_);
    if (!s.ok()) {
      MYELIN_LOG_WARN << "collective left an operation with rank " << p.peer
                      << " in flight: " << s.to_string();
    }
  }
  pending_.clear();
  pending_.swap(comm_.pending_pool().ops);
}

size_t Exchange::segment_elems() const noexcept {
  const size_t e = info_.segment_bytes / elem();
  return e == 0 ? 1 : e;
}

Result<uint8_t*> Exchange::shared_work(size_t bytes) {
  PendingPool& pool = comm_.pending_pool();
  if (pool.work.valid() && pool.work.size() >= bytes)
    return static_cast<uint8_t*>(pool.work.data());
  if (pool.work_context != nullptr && pool.work.valid()) pool.work_context->deregister(pool.work);
  pool.work = transport::MemoryRegion{};
  pool.work_context = &comm_.context();
  // Peers only read it (as the source of messages), never put into it.
  auto region = comm_.context().allocate(bytes, transport::Access::kRemoteRead);
  if (!region.ok()) {
    return std::move(region).status().with_context(::myelin::internal::str_cat(
        "while allocating ", bytes, " bytes of shared working memory for the ring allreduce"));
  }
  pool.work = std::move(region).value();
  return static_cast<uint8_t*>(pool.work.data());
}

Result<size_t> Exchange::post_send(int peer, uint8_t phase, const void* data, size_t bytes) {
  MYELIN_ASSIGN_OR_RETURN(transport::Endpoint * ep, comm_.peer(peer, deadline_));
  Pending p;
  p.request = ep->send(channel_for(tag_, phase), data, bytes);
  p.peer = peer;
  p.bytes = bytes;
  pending_.push_back(std::move(p));
  return pending_.size() - 1;
}

Result<size_t> Exchange::post_recv(int peer, uint8_t phase, void* data, size_t bytes) {
  MYELIN_ASSIGN_OR_RETURN(transport::Endpoint * ep, comm_.peer(peer, deadline_));
  Pending p;
  p.request = ep->recv(channel_for(tag_, phase), data, bytes);
  p.peer = peer;
  p.bytes = bytes;
  p.is_recv = true;
  pending_.push_back(std::move(p));
  return pending_.size() - 1;
}

Result<size_t> Exchange::post_recv_upto(int peer, uint8_t phase, void* data, size_t capacity) {
  MYELIN_ASSIGN_OR_RETURN(size_t h, post_recv(peer, phase, data, capacity));
  pending_[h].exact = false;
  return h;
}

Status Exchange::describe(const Pending& p, Status error) const {
  const std::string what =
      p.is_recv ? ::myelin::internal::str_cat("receiving ", p.bytes, " bytes from rank ", p.peer)
                : ::myelin::internal::str_cat("sending ", p.bytes, " bytes to rank ", p.peer);
  if (error.code() == StatusCode::kTimeout) {
    return timeout_error("rank ", p.peer, " did not respond in time (", what,
                         "): ", error.message());
  }
  return std::move(error).with_context(::myelin::internal::str_cat("while ", what));
}

Status Exchange::wait(size_t handle) {
  Pending& p = pending_[handle];
  if (p.waited) return ok_status();
  p.waited = true;
  if (yield_budget_ns_ > 0 && !p.request.done()) {
    (void)yield_until_done(comm_.context(), p.request, deadline_, yield_budget_ns_,
                           comm_.pending_pool().yield_guard);
  }
  Status s = comm_.context().wait(p.request, deadline_);
  if (!s.ok()) return describe(p, std::move(s));
  if (p.is_recv && p.exact && p.request.bytes() != p.bytes) {
    return invalid_argument("size mismatch: rank ", p.peer, " sent ", p.request.bytes(),
                            " bytes where this rank expected ", p.bytes,
                            " (the ranks called the collective with different counts)");
  }
  while (first_unwaited_ < pending_.size() && pending_[first_unwaited_].waited) ++first_unwaited_;
  return ok_status();
}

Status Exchange::wait_all() {
  for (size_t i = first_unwaited_; i < pending_.size(); ++i) {
    MYELIN_RETURN_IF_ERROR(wait(i));
  }
  return ok_status();
}

void Exchange::settle_sends(Deadline until) {
  for (size_t i = first_unwaited_; i < pending_.size(); ++i) {
    if (!pending_[i].is_recv) settle(i, until);
  }
}

void Exchange::settle(size_t handle, Deadline until) {
  // The Context's wait drives progress in its mode (a yielding one hands the CPU on between
  // polls); its status is the caller's business, read with status_of().
  const transport::Request& r = pending_[handle].request;
  if (!r.done()) (void)comm_.context().wait(r, until);
}

Status Exchange::sendrecv(int send_peer, const void* send, size_t send_bytes, int recv_peer,
                          void* recv, size_t recv_bytes, uint8_t phase) {
  MYELIN_ASSIGN_OR_RETURN(size_t r, post_recv(recv_peer, phase, recv, recv_bytes));
  MYELIN_ASSIGN_OR_RETURN(size_t s, post_send(send_peer, phase, send, send_bytes));
  MYELIN_RETURN_IF_ERROR(wait(r));
  return wait(s);
}

}  // namespace myelin::collectives::internal
