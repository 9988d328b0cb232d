// transport/src/verbs/verbs_handles.hpp — RAII owners for every libibverbs / librdmacm handle.
//
// Each owner is a std::unique_ptr with a deleter that calls the matching destroy function, so a
// handle is released exactly once, in reverse order of declaration when several live in one
// struct. Members that use a handle must be declared after the handle they use (a QP after its
// CQ and PD, an MR after its PD) so destruction order is right without hand-written destructors.
// Destroy errors are logged, never thrown: a failed destroy at teardown leaves nothing to retry.
//
// Thread safety: none (values owned by one Context).
#pragma once

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <memory>

namespace myelin::transport::internal::verbs {

// Logs a failed destroy call (errno-style return value) with the handle kind.
void log_destroy_failure(const char* what, int rc) noexcept;

struct DeviceListDeleter {
  void operator()(ibv_device** list) const noexcept { ibv_free_device_list(list); }
};
struct ContextDeleter {
  void operator()(ibv_context* c) const noexcept {
    if (int rc = ibv_close_device(c)) log_destroy_failure("ibv_close_device", rc);
  }
};
struct PdDeleter {
  void operator()(ibv_pd* p) const noexcept {
    if (int rc = ibv_dealloc_pd(p)) log_destroy_failure("ibv_dealloc_pd", rc);
  }
};
struct CompChannelDeleter {
  void operator()(ibv_comp_channel* c) const noexcept {
    if (int rc = ibv_destroy_comp_channel(c)) log_destroy_failure("ibv_destroy_comp_channel", rc);
  }
};
struct CqDeleter {
  void operator()(ibv_cq* c) const noexcept {
    if (int rc = ibv_destroy_cq(c)) log_destroy_failure("ibv_destroy_cq", rc);
  }
};
struct QpDeleter {
  void operator()(ibv_qp* q) const noexcept {
    if (int rc = ibv_destroy_qp(q)) log_destroy_failure("ibv_destroy_qp", rc);
  }
};
struct MrDeleter {
  void operator()(ibv_mr* m) const noexcept {
    if (int rc = ibv_dereg_mr(m)) log_destroy_failure("ibv_dereg_mr", rc);
  }
};
struct AhDeleter {
  void operator()(ibv_ah* a) const noexcept {
    if (int rc = ibv_destroy_ah(a)) log_destroy_failure("ibv_destroy_ah", rc);
  }
};
struct RdmaDeviceListDeleter {
  void operator()(ibv_context** list) const noexcept { rdma_free_devices(list); }
};
struct EventChannelDeleter {
  void operator()(rdma_event_channel* c) const noexcept { rdma_destroy_event_channel(c); }
};
// An rdma_cm_id that owns a QP made with rdma_create_qp() destroys it first.
struct CmIdDeleter {
  void operator()(rdma_cm_id* id) const noexcept {
    if (id->qp != nullptr) rdma_destroy_qp(id);
    if (int rc = rdma_destroy_id(id)) log_destroy_failure("rdma_destroy_id", rc);
  }
};

using DeviceListPtr = std::unique_ptr<ibv_device*, DeviceListDeleter>;
using ContextPtr = std::unique_ptr<ibv_context, ContextDeleter>;
using PdPtr = std::unique_ptr<ibv_pd, PdDeleter>;
using CompChannelPtr = std::unique_ptr<ibv_comp_channel, CompChannelDeleter>;
using CqPtr = std::unique_ptr<ibv_cq, CqDeleter>;
using QpPtr = std::unique_ptr<ibv_qp, QpDeleter>;
using MrPtr = std::unique_ptr<ibv_mr, MrDeleter>;
using AhPtr = std::unique_ptr<ibv_ah, AhDeleter>;
using RdmaDeviceListPtr = std::unique_ptr<ibv_context*, RdmaDeviceListDeleter>;
using EventChannelPtr = std::unique_ptr<rdma_event_channel, EventChannelDeleter>;
using CmIdPtr = std::unique_ptr<rdma_cm_id, CmIdDeleter>;

// Owns a file descriptor (epoll set).
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();
  [[nodiscard]] int get() const noexcept { return fd_; }
  int release() noexcept {
    int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_ = -1;
};

}  // namespace myelin::transport::internal::verbs
