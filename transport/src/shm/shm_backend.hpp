// transport/src/shm/shm_backend.hpp — the shared-memory backend: peers on the same node.
//
// Each ShmBackend listens on an abstract-namespace SOCK_SEQPACKET Unix socket (named in its
// address together with its pid and process start time). connect() is symmetric without a
// rendezvous: the side with the smaller address dials (creates the two ring segments and
// doorbells and passes them with SCM_RIGHTS); the larger side sends a one-line "dial me" and
// returns a pending endpoint at once; the smaller side's progress() answers it. A side that
// receives a connection before its own connect() keeps it until connect() claims it.
//
// Memory: allocate_shared() hands out memfd-backed mappings whose fds are sent to every connected
// peer (once per allocation), so large messages and put/get to them are one memcpy in the peer.
// register_memory() fills a slot of the key table (a memfd the peers map read-only in spirit):
// a RemoteKey names a slot and a token, so deregistered keys are refused. Ordinary user memory is
// reachable remotely only through process_vm_readv/writev (CMA) where ptrace rules permit it;
// otherwise put/get on it fail with unsupported.
//
// Waiting: wait_fd() is an epoll fd over the listening socket, every control socket and every
// inbound doorbell eventfd; arm_wait() announces sleepers on the inbound rings' WaitWords so that
// producers ring the doorbell only when someone sleeps.
//
// Thread safety: none; the Context's progress thread only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include <myelin/core/shm_segment.hpp>

#include "backend.hpp"
#include "shm/shm_endpoint.hpp"
#include "shm/shm_wire.hpp"

namespace myelin::transport::internal {

Result<std::unique_ptr<BackendContext>> create_shm_backend(const Options& options,
                                                           const ContextInfo& info);

namespace shm {

struct SharedAlloc {
  uint64_t id = 0;
  std::byte* base = nullptr;
  size_t size = 0;
  int fd = -1;  // owned by the AllocBook
};

// The backend's shared allocations. Shared with the deleters of the memory handed out, which may
// run after the backend is gone (a MemoryRegion outliving its Context).
struct AllocBook {
  std::map<uintptr_t, SharedAlloc> by_base;
  std::vector<uint64_t> freed;  // ids to announce to peers
  ~AllocBook();
};

// The key table and its free slots; shared with the registrations that hold slots.
struct KeyTable {
  ShmSegment segment;
  KeySlot* slots = nullptr;
  std::vector<uint32_t> free_slots;
  uint64_t next_token = 0;
  void release(uint32_t slot, uint64_t token) noexcept;
  // Lends [where, where + length) to peers for one split message (a kGrant slot, remote write).
  // False when the table is full.
  [[nodiscard]] bool grant(void* where, size_t length, uint32_t& slot, uint64_t& token) noexcept;
  // One attempt to take grant `token` back (shm_wire.hpp has the token word's states); never
  // waits. kTaken: it was still bare, so no writer has started and none will (the caller copies
  // the head itself if it wants it); kWritten: the writer wrote all of it; in both cases the slot
  // is free again. kBusy: a writer holds it, try again later. kLost: the word holds something a
  // writer may never set; the slot is retired (never reused).
  enum class Revoke : uint8_t { kTaken, kWritten, kBusy, kLost };
  [[nodiscard]] Revoke try_revoke(uint32_t slot, uint64_t token) noexcept;
  // try_revoke() until it is not kBusy or `deadline` passes (then kBusy: the slot is retired, as
  // the writer may still set it back, and the caller must say so).
  [[nodiscard]] Revoke revoke(uint32_t slot, uint64_t token, Deadline deadline) noexcept;
};

// When the receiver of a CMA rendezvous message splits the copy with the sender (see
// docs/transport-shm.md, "Split copy"). MYELIN_SHM_SPLIT: "off" or "0"; "auto" or "auto:<bytes>";
// "<bytes>" (always, from that size on). Unset: ShmBackend::kDefaultSplitMode.
enum class SplitMode : uint8_t {
  kOff,
  kAuto,  // from the threshold on, while this process and its connected peers fit the online CPUs
  kOn,    // from the threshold on, always
};
// Parses a MYELIN_SHM_SPLIT value; false (outputs untouched) when it is none of the above.
[[nodiscard]] bool parse_split_setting(std::string_view text, SplitMode& mode,
                                       size_t& threshold) noexcept;

class ShmBackend final : public BackendContext {
 public:
  // 262144 is the threshold measured in docs/performance.md (below it the hand-over, one ring
  // record each way, costs more than the parallel copy saves: ~20 us of copying at ~12 GB/s).
  static constexpr size_t kDefaultSplitThreshold = 262144;
  // Without MYELIN_SHM_SPLIT: auto. docs/performance.md, "Transport: shm": 2 ranks on 2 CPUs
  // 1.86x tag_bw (1.0x without the split); 4 busy ranks on 2 CPUs: auto does not split (forced,
  // the split ran 1.3x slower there).
  static constexpr SplitMode kDefaultSplitMode = SplitMode::kAuto;

  static Result<std::unique_ptr<ShmBackend>> create(const Options& options,
                                                    const ContextInfo& info);
  ~ShmBackend() override;

  [[nodiscard]] Backend kind() const noexcept override { return Backend::kShm; }
  [[nodiscard]] Limits limits() const noexcept override;
  [[nodiscard]] std::vector<uint8_t> local_address() const override { return address_bytes_; }
  Result<std::unique_ptr<Endpoint>> connect(std::span<const uint8_t> peer_address,
                                            const std::string& peer_name,
                                            Deadline deadline) override;
  Result<std::unique_ptr<BackendRegistration>> register_memory(const RegionState& region) override;
  Result<std::shared_ptr<void>> allocate_shared(size_t size) override;
  size_t progress() override;
  [[nodiscard]] int wait_fd() const noexcept override { return epoll_.get(); }
  bool arm_wait() override;

  // ---- for endpoints ----
  [[nodiscard]] const Options& options() const noexcept { return options_; }
  [[nodiscard]] size_t eager_limit() const noexcept { return eager_limit_; }
  [[nodiscard]] size_t ring_capacity() const noexcept { return ring_capacity_; }
  [[nodiscard]] const std::vector<uint8_t>& address_bytes() const noexcept {
    return address_bytes_;
  }
  [[nodiscard]] const std::string& name() const noexcept { return info_.name; }
  // The shared allocation holding [p, p+n), or null.
  [[nodiscard]] const SharedAlloc* find_alloc(const void* p, size_t n) const noexcept;
  [[nodiscard]] const std::map<uintptr_t, SharedAlloc>& allocs() const noexcept {
    return book_->by_base;
  }
  [[nodiscard]] int key_table_fd() const noexcept { return keys_->segment.fd(); }
  [[nodiscard]] KeyTable& keys() noexcept { return *keys_; }
  [[nodiscard]] uint64_t probe_address() const noexcept {
    return reinterpret_cast<uintptr_t>(&probe_value_);
  }
  [[nodiscard]] uint64_t probe_value() const noexcept { return probe_value_; }
  // False when MYELIN_SHM_CMA=0: large messages and plain-memory put/get then avoid
  // process_vm_readv/writev (as where ptrace rules forbid it).
  [[nodiscard]] bool cma_allowed() const noexcept { return cma_allowed_; }
  // Whether a CMA message of `size` bytes is to be split: the sender writes the head while the
  // receiver reads the rest (MYELIN_SHM_SPLIT; auto: only while this process and the peers it is
  // connected to number at most the online CPUs).
  [[nodiscard]] bool split_wanted(size_t size) const noexcept;
  [[nodiscard]] bool may_sleep() const noexcept {
    return options_.progress == ProgressMode::kSpinThenBlock;
  }
  void attach(ShmEndpoint* ep);
  void detach(ShmEndpoint* ep) noexcept;
  void watch(int fd);
  void unwatch(int fd) noexcept;
  // Runs the slow path soon (a pending endpoint waits for its kHello).
  void want_service() noexcept { service_soon_ = true; }

 private:
  ShmBackend(const Options& options, const ContextInfo& info) : options_(options), info_(info) {}
  void service();
  void accept_new();
  void handle_incoming();

  Options options_;
  ContextInfo info_;
  size_t eager_limit_ = 0;
  size_t ring_capacity_ = 0;
  std::vector<uint8_t> address_bytes_;
  UniqueFd listen_;
  UniqueFd epoll_;
  std::shared_ptr<AllocBook> book_;
  std::shared_ptr<KeyTable> keys_;
  uint64_t next_alloc_id_ = 1;
  uint64_t probe_value_ = 0;
  bool cma_allowed_ = true;
  SplitMode split_mode_ = kDefaultSplitMode;
  size_t split_threshold_ = kDefaultSplitThreshold;
  size_t online_cpus_ = 1;
  struct Incoming {
    UniqueFd sock;
    int64_t since_ns;
  };
  std::vector<Incoming> incoming_;
  std::vector<ShmEndpoint*> live_;
  std::map<std::vector<uint8_t>, std::unique_ptr<ShmEndpoint>> unclaimed_;
  uint32_t ticks_ = 0;
  bool armed_ = false;
  bool service_soon_ = false;
};

}  // namespace shm
}  // namespace myelin::transport::internal
