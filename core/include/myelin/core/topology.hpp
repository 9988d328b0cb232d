// myelin/core/topology.hpp
//
// The machine's shape as plain values: NUMA nodes, cores and the PCI devices (NICs, GPUs, ...)
// with the NUMA node each one hangs off, plus CPU-pinning helpers. The broker and the transports
// use it for placement: pin an I/O thread on the NUMA node of its NIC, allocate its rings there.
//
// A Topology is read once, from this machine (discover()), from an hwloc XML file
// (from_xml_file(), e.g. the output of `lstopo --of xml` on another server) or from an hwloc
// synthetic description (from_synthetic("pack:2 numa:1 core:8 pu:2")). A Topology is a snapshot
// that owns no OS resource.
//
// Numbering: every CPU number is the operating system's (what taskset, sched_setaffinity and
// /sys/devices/system/cpu use) and every NUMA node number is the kernel's (what numactl and
// mbind use), not hwloc's logical indexes.
//
// Thread safety: Topology is a value type; const methods may be called from any number of
// threads at once. The pinning functions act on the calling thread only.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <myelin/core/status.hpp>

namespace myelin {

// NUMA node number of a device whose locality is not one node (hwloc places it above several
// nodes, e.g. on the machine object of a multi-node server, or a topology without NUMA info).
inline constexpr int kUnknownNumaNode = -1;

struct NumaNode {
  int index = 0;              // kernel NUMA node number
  std::vector<int> cpus;      // OS CPU numbers local to the node, ascending
  uint64_t memory_bytes = 0;  // local memory; 0 when the source does not say
};

struct Core {
  int index = 0;    // OS core number (unique within its package only on some CPUs)
  int package = 0;  // OS package (socket) number; -1 when unknown
  int numa_node = kUnknownNumaNode;
  std::vector<int> cpus;  // hardware threads (PUs) of the core, OS numbers, ascending
};

// The kind of an operating-system device hwloc attaches to a PCI device.
enum class OsDeviceType : uint8_t {
  kBlock,        // disks: "sda", "nvme0n1"
  kGpu,          // display or compute GPU driver handle: "nvidia0", "card0", "rsmi0"
  kNetwork,      // network interface: "eth0", "ib0"
  kOpenFabrics,  // RDMA device: "mlx5_0"
  kDma,          // DMA engine: "dma0chan0"
  kCoprocessor,  // compute API device: "cuda0", "opencl0d0"
  kOther,
};
std::string_view os_device_type_name(OsDeviceType type) noexcept;

struct OsDevice {
  std::string name;
  OsDeviceType type = OsDeviceType::kOther;
};

enum class PciDeviceKind : uint8_t { kNic, kGpu, kOther };
// "nic", "gpu", "other".
std::string_view pci_device_kind_name(PciDeviceKind kind) noexcept;

struct PciDevice {
  std::string bus_id;  // "0000:18:00.0" (domain:bus:device.function, lower-case hex)
  uint16_t vendor_id = 0;
  uint16_t device_id = 0;
  uint16_t class_id = 0;  // PCI class and subclass, e.g. 0x0207 InfiniBand, 0x0302 3D controller
  PciDeviceKind kind = PciDeviceKind::kOther;
  std::string vendor_name;  // from the PCI ids database when hwloc knows it, else empty
  std::string device_name;
  double link_speed_gbytes_per_s = 0;  // PCIe link bandwidth hwloc reports (GB/s); 0 = unknown
  int numa_node = kUnknownNumaNode;
  std::vector<OsDevice> os_devices;  // "mlx5_0", "ib0", "eth0", "cuda0", ...

  // True when `name` is the bus id or the name of one of the OS devices.
  [[nodiscard]] bool matches(std::string_view name) const noexcept;
};

class Topology {
 public:
  // This machine's topology, PCI devices included. The machine is read on the first call (tens of
  // milliseconds: a PCI scan); later calls return copies of that snapshot.
  static Result<Topology> discover();
  // Loads an hwloc 2.x XML export. Errors: kNotFound when the file is missing, kInvalidArgument
  // when hwloc rejects its content.
  static Result<Topology> from_xml_file(const std::string& path);
  // Builds an hwloc synthetic topology (no PCI devices), e.g. "pack:2 numa:1 core:8 pu:2".
  static Result<Topology> from_synthetic(const std::string& description);

  // "discovered", "xml:<path>" or "synthetic:<description>".
  [[nodiscard]] const std::string& source() const noexcept { return source_; }
  // The host name recorded by hwloc (empty for synthetic topologies).
  [[nodiscard]] const std::string& host_name() const noexcept { return host_name_; }
  [[nodiscard]] int package_count() const noexcept { return package_count_; }
  // Every CPU (hardware thread) of the machine, OS numbers, ascending.
  [[nodiscard]] const std::vector<int>& cpus() const noexcept { return cpus_; }
  // Sorted by index. A machine without NUMA information has one node 0 holding every CPU.
  [[nodiscard]] const std::vector<NumaNode>& numa_nodes() const noexcept { return numa_nodes_; }
  // In topology order (package by package).
  [[nodiscard]] const std::vector<Core>& cores() const noexcept { return cores_; }
  // In PCI bus order.
  [[nodiscard]] const std::vector<PciDevice>& pci_devices() const noexcept { return pci_; }
  [[nodiscard]] std::vector<PciDevice> nics() const { return devices_of_kind(PciDeviceKind::kNic); }
  [[nodiscard]] std::vector<PciDevice> gpus() const { return devices_of_kind(PciDeviceKind::kGpu); }

  // The node with kernel number `node`; kNotFound when there is none.
  [[nodiscard]] Result<NumaNode> numa_node(int node) const;
  // OS CPU numbers of NUMA node `node`; kNotFound when there is no such node.
  [[nodiscard]] Result<std::vector<int>> cpus_of_numa_node(int node) const;
  // The NUMA node of OS CPU `cpu`; kNotFound when the topology has no such CPU.
  [[nodiscard]] Result<int> numa_node_of_cpu(int cpu) const;

  // The PCI device with this bus id ("0000:18:00.0", also "18:00.0" for domain 0) or with an OS
  // device of this name ("mlx5_0", "ib0", "eth0", "cuda0", "nvidia0"); kNotFound otherwise.
  [[nodiscard]] Result<PciDevice> find_device(std::string_view name) const;
  // The NUMA node that device hangs off; kUnknownNumaNode when hwloc places it above several
  // nodes; kNotFound when no device matches (see find_device).
  [[nodiscard]] Result<int> numa_node_of_device(std::string_view name) const;
  // The NUMA node of GPU number `gpu` as CUDA numbers them with CUDA_DEVICE_ORDER=PCI_BUS_ID:
  // the OS device "cuda<gpu>" or "nvidia<gpu>" when hwloc reports one, else the gpu-th GPU in PCI
  // bus order. kNotFound when there are not that many GPUs.
  [[nodiscard]] Result<int> numa_node_of_gpu(int gpu) const;

  // Restricts the calling thread to the CPUs of NUMA node `node`. kNotFound for an unknown node;
  // kInvalidArgument when none of them is online and allowed here (e.g. a topology read from a
  // bigger machine). Like sched_setaffinity, the kernel keeps only the online, allowed ones.
  [[nodiscard]] Status pin_current_thread_to_numa_node(int node) const;

 private:
  [[nodiscard]] std::vector<PciDevice> devices_of_kind(PciDeviceKind kind) const;
  friend class TopologyBuilder;

  std::string source_;
  std::string host_name_;
  int package_count_ = 0;
  std::vector<int> cpus_;
  std::vector<NumaNode> numa_nodes_;
  std::vector<Core> cores_;
  std::vector<PciDevice> pci_;
};

// Pinning to one CPU is pin_current_thread_to_cpu(int) in <myelin/core/numa_memory.hpp>.
// Restricts the calling thread to a set of OS CPUs (at least one); the kernel keeps the online,
// allowed ones and fails with kInvalidArgument when there are none, or when a number is negative
// or beyond CPU_SETSIZE.
[[nodiscard]] Status pin_current_thread_to_cpus(const std::vector<int>& cpus);
// The OS CPUs the calling thread may run on (sched_getaffinity), ascending.
[[nodiscard]] Result<std::vector<int>> current_thread_cpus();

// Formats CPU numbers as a list of ranges: {0,1,2,3,8,10} -> "0-3,8,10"; {} -> "".
std::string format_cpu_list(const std::vector<int>& cpus);

}  // namespace myelin
