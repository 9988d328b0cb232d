// transport/src/verbs/verbs_device.hpp — opening a verbs device and choosing port, GID and MTU.
//
// Device::open() picks the device (Options::device "name" or "name:port"; empty = the first
// device with an ACTIVE port), the port (first ACTIVE one unless named) and the GID:
//   - link layer Ethernet (RoCE): MYELIN_VERBS_GID_INDEX if set, else the RoCE v2 GID that is an
//     IPv4-mapped address of the port's netdev, else any RoCE v2 GID, else RoCE v1, else index 0;
//   - link layer InfiniBand: LID addressing (no GRH inside the subnet), GID index 0 for the record.
// The path MTU is the port's active MTU (the lower of the two ends is used per connection).
// In rdmacm mode the ibv_context comes from rdma_get_devices() so QPs made with rdma_create_qp()
// share our PD and CQ; otherwise the device is opened with ibv_open_device().
//
// Thread safety: immutable after open(); the handles are used from the Context's thread.
// Ownership: Device owns the context (unless librdmacm does), the PD, the completion channel and
// the CQ; everything else (QPs, MRs) holds a shared_ptr<Device> so it is destroyed first.
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <memory>
#include <string>

#include <myelin/core/status.hpp>

#include "verbs/verbs_handles.hpp"

namespace myelin::transport::internal::verbs {

struct PortChoice {
  uint8_t port = 1;
  uint8_t link_layer = IBV_LINK_LAYER_UNSPECIFIED;
  uint16_t lid = 0;
  ibv_mtu active_mtu = IBV_MTU_1024;
  uint32_t max_msg_sz = 0;
  int gid_index = 0;
  ibv_gid gid{};
  uint32_t gid_type = 0;  // IBV_GID_TYPE_*
  uint32_t ndev_ifindex = 0;
  std::string reason;  // why this device/port/GID ("rxe0 port 1 ACTIVE, RoCE v2 GID 1 ...")
  [[nodiscard]] bool is_roce() const noexcept { return link_layer == IBV_LINK_LAYER_ETHERNET; }
};

class Device {
 public:
  // `spec`: "", "rxe0" or "rxe0:1". `from_rdma_cm`: take the context from librdmacm.
  static Result<std::shared_ptr<Device>> open(const std::string& spec, bool from_rdma_cm);

  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  ~Device();

  [[nodiscard]] ibv_context* context() const noexcept { return ctx_; }
  [[nodiscard]] ibv_pd* pd() const noexcept { return pd_.get(); }
  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  [[nodiscard]] const PortChoice& port() const noexcept { return port_; }
  [[nodiscard]] const ibv_device_attr& attr() const noexcept { return attr_; }
  // NUMA node of the device (from sysfs), -1 when unknown.
  [[nodiscard]] int numa_node() const noexcept { return numa_node_; }

 private:
  Device() = default;
  RdmaDeviceListPtr rdma_list_;  // keeps librdmacm's device array (and contexts) in use
  ContextPtr owned_ctx_;         // set when we opened the device ourselves
  ibv_context* ctx_ = nullptr;
  PdPtr pd_;
  std::string name_;
  PortChoice port_;
  ibv_device_attr attr_{};
  int numa_node_ = -1;
};

// True when the device has at least one ACTIVE port (for auto selection and myelin-info).
bool any_active_port(std::string* reason);

const char* mtu_name(ibv_mtu mtu) noexcept;

}  // namespace myelin::transport::internal::verbs
