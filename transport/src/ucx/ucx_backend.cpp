// The UCX BackendContext: glue between the transport Context and UcxWorker/UcxEndpoint.
#include "ucx/ucx_backend.hpp"

#include <cstdint>
#include <map>

#include <myelin/core/log.hpp>

#include "ucx/ucx_endpoint.hpp"
#include "ucx/ucx_memory.hpp"
#include "ucx/ucx_worker.hpp"

namespace myelin::transport::internal {
namespace {

class UcxBackend final : public BackendContext {
 public:
  explicit UcxBackend(std::shared_ptr<ucx::UcxWorker> worker) : worker_(std::move(worker)) {}

  [[nodiscard]] Backend kind() const noexcept override { return Backend::kUcx; }
  [[nodiscard]] Limits limits() const noexcept override { return worker_->limits(); }
  [[nodiscard]] std::vector<uint8_t> local_address() const override { return worker_->address(); }

  Result<std::unique_ptr<Endpoint>> connect(std::span<const uint8_t> peer_address,
                                            const std::string& peer_name,
                                            Deadline /*deadline*/) override {
    // Never blocks: UCX wires the endpoint up in the background from the worker address, and the
    // peer learns who we are from the sender id in our first message.
    Result<ucx::PeerAddress> peer = ucx::parse_peer_address(peer_address);
    if (!peer.ok()) {
      return std::move(peer).status().with_context("connecting to " + peer_name + " over ucx");
    }
    MYELIN_ASSIGN_OR_RETURN(auto ep, ucx::UcxEndpoint::create(worker_, *peer, peer_name));
    MYELIN_LOG_DEBUG << "ucx: endpoint to " << peer_name << " (context " << peer->context_id
                     << ") created";
    return std::unique_ptr<Endpoint>(std::move(ep));
  }

  Result<std::unique_ptr<BackendRegistration>> register_memory(const RegionState& region) override {
    MYELIN_RETURN_IF_ERROR(check_not_straddling(region));
    MYELIN_ASSIGN_OR_RETURN(auto reg,
                            ucx::UcxRegistration::create(*worker_, region, allocation_of(region)));
    return std::unique_ptr<BackendRegistration>(std::move(reg));
  }

  // UCX-allocated memory (shared memory under posix): the handle keeps the allocation, and with
  // it the ucp_mem_h, alive; registrations of regions inside it reuse that mapping.
  Result<std::shared_ptr<void>> allocate_shared(size_t size) override {
    MYELIN_ASSIGN_OR_RETURN(auto alloc, ucx::UcxAllocation::create(worker_->context(), size));
    prune_allocations();
    allocations_.insert_or_assign(reinterpret_cast<uintptr_t>(alloc->data()), alloc);
    MYELIN_LOG_DEBUG << "ucx: allocated " << alloc->size() << " bytes at " << alloc->data();
    void* data = alloc->data();
    return std::shared_ptr<void>(std::move(alloc), data);  // shares the allocation's lifetime
  }

  size_t progress() override { return worker_->progress(); }
  // The busy wait's polls with the worker's progress inline: a message that completes the
  // request returns from here straight to the wait.
  bool poll_until_done(const Request& request, uint32_t polls) override {
    ucx::UcxWorker& worker = *worker_;
    for (uint32_t i = 0; i < polls; ++i) {
      worker.progress();
      if (request.done()) return true;
    }
    return false;
  }
  [[nodiscard]] int wait_fd() const noexcept override { return worker_->event_fd(); }
  bool arm_wait() override { return worker_->arm(); }

 private:
  // The live allocation that holds [region.data, region.data + region.size), if any.
  std::shared_ptr<ucx::UcxAllocation> allocation_of(const RegionState& region) const {
    auto it = allocations_.upper_bound(reinterpret_cast<uintptr_t>(region.data));
    if (it == allocations_.begin()) return nullptr;
    std::shared_ptr<ucx::UcxAllocation> alloc = std::prev(it)->second.lock();
    if (alloc && alloc->contains(region.data, region.size)) return alloc;
    return nullptr;
  }
  // A region lies wholly inside one live allocation or outside all of them. One that runs past an
  // allocation's end (or starts before it and ends inside) also covers the memory next to it,
  // which is not the caller's: another mapping, often UCX's own shared memory (a worker's fifo,
  // its request pool), where a put would land.
  Status check_not_straddling(const RegionState& region) const {
    if (region.data == nullptr || region.size == 0) return ok_status();  // refused on registering
    const auto start = reinterpret_cast<uintptr_t>(region.data);
    const uintptr_t last =
        region.size - 1 > UINTPTR_MAX - start ? UINTPTR_MAX : start + region.size - 1;
    auto it = allocations_.upper_bound(start);
    if (it != allocations_.begin()) --it;
    for (; it != allocations_.end() && it->first <= last; ++it) {
      std::shared_ptr<ucx::UcxAllocation> alloc = it->second.lock();
      if (!alloc) continue;
      const uintptr_t alloc_start = it->first;
      const uintptr_t alloc_last = alloc_start + alloc->size() - 1;
      if (alloc_last < start || alloc->contains(region.data, region.size)) continue;
      if (start >= alloc_start) {
        return invalid_argument("the region of ", region.size, " bytes at offset ",
                                start - alloc_start, " of a ucx allocation of ", alloc->size(),
                                " bytes runs ", last - alloc_last, " byte(s) past its end");
      }
      return invalid_argument("the region of ", region.size, " bytes starts ", alloc_start - start,
                              " byte(s) before a ucx allocation of ", alloc->size(),
                              " bytes and overlaps it");
    }
    return ok_status();
  }
  void prune_allocations() {
    std::erase_if(allocations_, [](const auto& entry) { return entry.second.expired(); });
  }

  std::shared_ptr<ucx::UcxWorker> worker_;
  // allocate_shared()'s allocations by start address; entries expire with their memory.
  std::map<uintptr_t, std::weak_ptr<ucx::UcxAllocation>> allocations_;
};

}  // namespace

Result<std::unique_ptr<BackendContext>> create_ucx_backend(const Options& options,
                                                           const ContextInfo& info) {
  Result<std::shared_ptr<ucx::UcxWorker>> worker = ucx::UcxWorker::create(options, info);
  if (!worker.ok()) return std::move(worker).status().with_context("opening the ucx backend");
  return std::unique_ptr<BackendContext>(std::make_unique<UcxBackend>(std::move(*worker)));
}

}  // namespace myelin::transport::internal
