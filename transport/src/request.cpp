// RequestState's cold paths (description, end of life) and RequestStatePool's list management.
#include <myelin/transport/request.hpp>

namespace myelin::transport {

std::string RequestState::description() const {
  if (op_ == nullptr) return "request";
  std::string s(op_);
  s += " on channel " + std::to_string(channel_);
  if (peer_) s += " with " + *peer_;
  return s;
}

void RequestState::free_unlisted() noexcept {
  Home* home = home_;
  delete this;
  // A pooled state freed because its list was full, or because the pool is gone; in that case the
  // last of the pool's states frees the list's head as well.
  if (home != nullptr && --home->attached == 0 && !home->pool_alive) delete home;
}

std::pair<Request, RequestStateRef> Request::make_pending() {
  return pending_from(new RequestState(nullptr));
}

RequestStatePool::RequestStatePool(size_t capacity) : home_(new RequestState::Home) {
  home_->capacity = capacity;
}

RequestStatePool::~RequestStatePool() {
  home_->pool_alive = false;
  home_->capacity = 0;  // states returning from now on are freed (RequestState::release)
  while (RequestState* state = home_->free) {
    home_->free = state->next_free_;
    delete state;
    --home_->attached;
  }
  home_->free_count = 0;
  if (home_->attached == 0) delete home_;
}

std::pair<Request, RequestStateRef> RequestStatePool::pending_from_new() {
  auto* state = new RequestState(home_);
  ++home_->attached;
  return Request::pending_from(state);
}

}  // namespace myelin::transport
