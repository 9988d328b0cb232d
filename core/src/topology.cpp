// Topology: copies what myelin needs out of an hwloc topology into plain values.

#include <myelin/core/topology.hpp>

#include <hwloc.h>
#include <pthread.h>
#include <sched.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <memory>
#include <utility>

namespace myelin {

namespace {

struct HwlocTopologyDeleter {
  void operator()(hwloc_topology* topo) const noexcept { hwloc_topology_destroy(topo); }
};
using HwlocTopologyPtr = std::unique_ptr<hwloc_topology, HwlocTopologyDeleter>;

Result<HwlocTopologyPtr> init_topology() {
  hwloc_topology_t raw = nullptr;
  if (hwloc_topology_init(&raw) != 0) return errno_status("hwloc_topology_init", errno);
  HwlocTopologyPtr topo(raw);
  // I/O objects are dropped by default; keep the PCI devices (and the bridges leading to them)
  // that hwloc deems useful: network, storage, GPUs, accelerators and their OS devices.
  if (hwloc_topology_set_io_types_filter(topo.get(), HWLOC_TYPE_FILTER_KEEP_IMPORTANT) != 0) {
    return errno_status("hwloc_topology_set_io_types_filter", errno);
  }
  return topo;
}

std::vector<int> bitmap_to_vector(hwloc_const_bitmap_t set) {
  std::vector<int> out;
  if (set == nullptr || hwloc_bitmap_weight(set) < 0) return out;
  for (int i = hwloc_bitmap_first(set); i != -1; i = hwloc_bitmap_next(set, i)) out.push_back(i);
  return out;
}

// The single NUMA node of a nodeset, or kUnknownNumaNode when it names none or several.
int single_node(hwloc_const_nodeset_t nodeset) {
  if (nodeset == nullptr || hwloc_bitmap_weight(nodeset) != 1) return kUnknownNumaNode;
  return hwloc_bitmap_first(nodeset);
}

OsDeviceType map_osdev_type(hwloc_obj_osdev_type_t type) {
  switch (type) {
    case HWLOC_OBJ_OSDEV_BLOCK:
      return OsDeviceType::kBlock;
    case HWLOC_OBJ_OSDEV_GPU:
      return OsDeviceType::kGpu;
    case HWLOC_OBJ_OSDEV_NETWORK:
      return OsDeviceType::kNetwork;
    case HWLOC_OBJ_OSDEV_OPENFABRICS:
      return OsDeviceType::kOpenFabrics;
    case HWLOC_OBJ_OSDEV_DMA:
      return OsDeviceType::kDma;
    case HWLOC_OBJ_OSDEV_COPROC:
      return OsDeviceType::kCoprocessor;
  }
  return OsDeviceType::kOther;
}

constexpr uint16_t kVendorNvidia = 0x10de;
constexpr uint16_t kVendorAmd = 0x1002;

// GPUs: a compute API or GPU driver handle says so; otherwise the PCI class does (3D controller
// 0x0302, "other display" 0x0380 used by datacenter accelerators, and VGA 0x0300 only from the
// GPU vendors, so that a server's BMC graphics chip is not counted). NICs: network controllers
// (0x02xx), InfiniBand on the serial-bus class (0x0c06), or anything carrying a netdev or an
// RDMA device.
PciDeviceKind classify(const PciDevice& dev) {
  bool has_gpu_osdev = false;
  bool has_net_osdev = false;
  for (const OsDevice& os : dev.os_devices) {
    if (os.type == OsDeviceType::kCoprocessor) has_gpu_osdev = true;
    if (os.type == OsDeviceType::kGpu &&
        (os.name.rfind("nvidia", 0) == 0 || os.name.rfind("rsmi", 0) == 0)) {
      has_gpu_osdev = true;
    }
    if (os.type == OsDeviceType::kNetwork || os.type == OsDeviceType::kOpenFabrics) {
      has_net_osdev = true;
    }
  }
  const uint16_t cls = dev.class_id;
  const bool gpu_vendor = dev.vendor_id == kVendorNvidia || dev.vendor_id == kVendorAmd;
  if (has_gpu_osdev || cls == 0x0302 || cls == 0x0380 || (cls == 0x0300 && gpu_vendor)) {
    return PciDeviceKind::kGpu;
  }
  if ((cls >> 8) == 0x02 || cls == 0x0c06 || has_net_osdev) return PciDeviceKind::kNic;
  return PciDeviceKind::kOther;
}

std::string format_bus_id(const hwloc_obj_attr_u::hwloc_pcidev_attr_s& pci) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%04x:%02x:%02x.%01x", static_cast<unsigned>(pci.domain),
                static_cast<unsigned>(pci.bus), static_cast<unsigned>(pci.dev),
                static_cast<unsigned>(pci.func));
  return buf;
}

std::string info_or_empty(hwloc_obj_t obj, const char* name) {
  const char* v = hwloc_obj_get_info_by_name(obj, name);
  return v ? std::string(v) : std::string();
}

std::string to_lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

Status set_affinity(const std::vector<int>& cpus) {
  if (cpus.empty()) return invalid_argument("cannot pin a thread to an empty CPU set");
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int cpu : cpus) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) {
      return invalid_argument("CPU ", cpu, " is outside [0, ", CPU_SETSIZE, ")");
    }
    CPU_SET(cpu, &set);
  }
  const int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
  if (rc != 0) {
    Status s = errno_status("pthread_setaffinity_np", rc,
                            rc == EINVAL ? StatusCode::kInvalidArgument : StatusCode::kIoError);
    s.with_context(
        "cannot pin the thread to CPUs " + format_cpu_list(cpus) +
        (rc == EINVAL ? " (offline, absent or outside this process's allowed set)" : ""));
    return s;
  }
  return ok_status();
}

}  // namespace

// Fills a Topology from a loaded hwloc topology; a friend of Topology.
class TopologyBuilder {
 public:
  static Topology build(hwloc_topology_t topo, std::string source) {
    Topology t;
    t.source_ = std::move(source);
    hwloc_obj_t root = hwloc_get_root_obj(topo);
    t.host_name_ = info_or_empty(root, "HostName");
    t.package_count_ = std::max(0, hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_PACKAGE));
    t.cpus_ = bitmap_to_vector(root->cpuset);

    for (hwloc_obj_t n = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_NUMANODE, nullptr);
         n != nullptr; n = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_NUMANODE, n)) {
      NumaNode node;
      node.index = static_cast<int>(n->os_index);
      node.cpus = bitmap_to_vector(n->cpuset);
      node.memory_bytes = n->attr ? n->attr->numanode.local_memory : 0;
      t.numa_nodes_.push_back(std::move(node));
    }
    std::sort(t.numa_nodes_.begin(), t.numa_nodes_.end(),
              [](const NumaNode& a, const NumaNode& b) { return a.index < b.index; });

    for (hwloc_obj_t c = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_CORE, nullptr); c != nullptr;
         c = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_CORE, c)) {
      Core core;
      core.index = static_cast<int>(c->os_index);
      hwloc_obj_t pkg = hwloc_get_ancestor_obj_by_type(topo, HWLOC_OBJ_PACKAGE, c);
      core.package = pkg ? static_cast<int>(pkg->os_index) : -1;
      core.numa_node = single_node(c->nodeset);
      core.cpus = bitmap_to_vector(c->cpuset);
      t.cores_.push_back(std::move(core));
    }

    for (hwloc_obj_t p = hwloc_get_next_pcidev(topo, nullptr); p != nullptr;
         p = hwloc_get_next_pcidev(topo, p)) {
      const auto& pci = p->attr->pcidev;
      PciDevice dev;
      dev.bus_id = format_bus_id(pci);
      dev.vendor_id = pci.vendor_id;
      dev.device_id = pci.device_id;
      dev.class_id = pci.class_id;
      dev.vendor_name = info_or_empty(p, "PCIVendor");
      dev.device_name = info_or_empty(p, "PCIDevice");
      dev.link_speed_gbytes_per_s = pci.linkspeed;
      hwloc_obj_t local = hwloc_get_non_io_ancestor_obj(topo, p);
      dev.numa_node = local ? single_node(local->nodeset) : kUnknownNumaNode;
      for (hwloc_obj_t child = p->io_first_child; child != nullptr; child = child->next_sibling) {
        if (child->type != HWLOC_OBJ_OS_DEVICE || child->name == nullptr) continue;
        dev.os_devices.push_back({child->name, map_osdev_type(child->attr->osdev.type)});
      }
      dev.kind = classify(dev);
      t.pci_.push_back(std::move(dev));
    }
    std::sort(t.pci_.begin(), t.pci_.end(),
              [](const PciDevice& a, const PciDevice& b) { return a.bus_id < b.bus_id; });
    return t;
  }
};

std::string_view os_device_type_name(OsDeviceType type) noexcept {
  switch (type) {
    case OsDeviceType::kBlock:
      return "block";
    case OsDeviceType::kGpu:
      return "gpu";
    case OsDeviceType::kNetwork:
      return "network";
    case OsDeviceType::kOpenFabrics:
      return "openfabrics";
    case OsDeviceType::kDma:
      return "dma";
    case OsDeviceType::kCoprocessor:
      return "coprocessor";
    case OsDeviceType::kOther:
      return "other";
  }
  return "other";
}

std::string_view pci_device_kind_name(PciDeviceKind kind) noexcept {
  switch (kind) {
    case PciDeviceKind::kNic:
      return "nic";
    case PciDeviceKind::kGpu:
      return "gpu";
    case PciDeviceKind::kOther:
      return "other";
  }
  return "other";
}

bool PciDevice::matches(std::string_view name) const noexcept {
  if (name == bus_id) return true;
  for (const OsDevice& os : os_devices) {
    if (os.name == name) return true;
  }
  return false;
}

namespace {

// This machine, read once per process. The hwloc topology stays loaded for the life of the
// process (like the one numa_memory.cpp holds) and is deliberately never destroyed, so no exit-time
// destructor races threads still running: destroying the last hwloc topology unloads hwloc's PCI
// plugin and libpciaccess with it, stranding the allocations libpciaccess keeps in its globals,
// and a PCI scan costs tens of milliseconds that callers asking again need not pay.
struct Machine {
  hwloc_topology_t hwloc = nullptr;
  Result<Topology> snapshot = internal_error("topology not read");
};

const Machine& machine() {
  static const Machine* const the_machine = [] {
    auto* m = new Machine();
    Result<HwlocTopologyPtr> topo = init_topology();
    if (!topo.ok()) {
      m->snapshot = std::move(topo).status();
    } else if (hwloc_topology_load(topo->get()) != 0) {
      m->snapshot = errno_status("hwloc_topology_load", errno);
    } else {
      m->snapshot = TopologyBuilder::build(topo->get(), "discovered");
      m->hwloc = topo->release();
    }
    return m;
  }();
  return *the_machine;
}

}  // namespace

Result<Topology> Topology::discover() {
  return machine().snapshot;
}

Result<Topology> Topology::from_xml_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return errno_status("topology XML '" + path + "'", errno,
                        errno == ENOENT ? StatusCode::kNotFound : StatusCode::kIoError);
  }
  if (!S_ISREG(st.st_mode)) return invalid_argument("topology XML '", path, "' is not a file");
  MYELIN_ASSIGN_OR_RETURN(HwlocTopologyPtr topo, init_topology());
  if (hwloc_topology_set_xml(topo.get(), path.c_str()) != 0 ||
      hwloc_topology_load(topo.get()) != 0) {
    return invalid_argument("hwloc cannot load topology XML '", path,
                            "' (not a valid hwloc XML export)");
  }
  return TopologyBuilder::build(topo.get(), "xml:" + path);
}

Result<Topology> Topology::from_synthetic(const std::string& description) {
  MYELIN_ASSIGN_OR_RETURN(HwlocTopologyPtr topo, init_topology());
  if (hwloc_topology_set_synthetic(topo.get(), description.c_str()) != 0) {
    return invalid_argument("hwloc rejects the synthetic topology '", description, "'");
  }
  if (hwloc_topology_load(topo.get()) != 0) {
    return errno_status("hwloc_topology_load(synthetic '" + description + "')", errno);
  }
  return TopologyBuilder::build(topo.get(), "synthetic:" + description);
}

std::vector<PciDevice> Topology::devices_of_kind(PciDeviceKind kind) const {
  std::vector<PciDevice> out;
  for (const PciDevice& d : pci_) {
    if (d.kind == kind) out.push_back(d);
  }
  return out;
}

Result<NumaNode> Topology::numa_node(int node) const {
  for (const NumaNode& n : numa_nodes_) {
    if (n.index == node) return n;
  }
  return not_found("NUMA node ", node, " does not exist (", numa_nodes_.size(),
                   " nodes in topology ", source_, ")");
}

Result<std::vector<int>> Topology::cpus_of_numa_node(int node) const {
  MYELIN_ASSIGN_OR_RETURN(NumaNode n, numa_node(node));
  return std::move(n.cpus);
}

Result<int> Topology::numa_node_of_cpu(int cpu) const {
  for (const NumaNode& n : numa_nodes_) {
    if (std::binary_search(n.cpus.begin(), n.cpus.end(), cpu)) return n.index;
  }
  return not_found("CPU ", cpu, " is in no NUMA node of topology ", source_);
}

Result<PciDevice> Topology::find_device(std::string_view name) const {
  if (name.empty()) return invalid_argument("empty device name");
  // A bus id without its domain ("18:00.0") means domain 0; hex digits compare lower-case.
  std::string bus = to_lower(name);
  if (bus.size() == 7 && bus[2] == ':' && bus[5] == '.') bus = "0000:" + bus;
  for (const PciDevice& d : pci_) {
    if (d.bus_id == bus || d.matches(name)) return d;
  }
  return not_found("no PCI device named '", name, "' in topology ", source_);
}

Result<int> Topology::numa_node_of_device(std::string_view name) const {
  MYELIN_ASSIGN_OR_RETURN(PciDevice d, find_device(name));
  return d.numa_node;
}

Result<int> Topology::numa_node_of_gpu(int gpu) const {
  if (gpu < 0) return invalid_argument("GPU number ", gpu, " is negative");
  for (const char* prefix : {"cuda", "nvidia"}) {
    const std::string name = prefix + std::to_string(gpu);
    for (const PciDevice& d : pci_) {
      if (d.matches(name)) return d.numa_node;
    }
  }
  const std::vector<PciDevice> all = gpus();
  if (static_cast<size_t>(gpu) < all.size()) return all[static_cast<size_t>(gpu)].numa_node;
  return not_found("GPU ", gpu, " does not exist (", all.size(), " GPUs in topology ", source_,
                   ")");
}

Status Topology::pin_current_thread_to_numa_node(int node) const {
  MYELIN_ASSIGN_OR_RETURN(NumaNode n, numa_node(node));
  if (n.cpus.empty()) {
    return invalid_argument("NUMA node ", node, " has no CPUs (a memory-only node)");
  }
  return set_affinity(n.cpus).with_context("while pinning to NUMA node " + std::to_string(node));
}

Status pin_current_thread_to_cpus(const std::vector<int>& cpus) {
  return set_affinity(cpus);
}

Result<std::vector<int>> current_thread_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  const int rc = pthread_getaffinity_np(pthread_self(), sizeof(set), &set);
  if (rc != 0) return errno_status("pthread_getaffinity_np", rc);
  std::vector<int> out;
  for (int i = 0; i < CPU_SETSIZE; ++i) {
    if (CPU_ISSET(i, &set)) out.push_back(i);
  }
  return out;
}

std::string format_cpu_list(const std::vector<int>& cpus) {
  std::string out;
  size_t i = 0;
  while (i < cpus.size()) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += std::to_string(cpus[i]);
    if (j > i) out += '-' + std::to_string(cpus[j]);
    i = j + 1;
  }
  return out;
}

}  // namespace myelin
