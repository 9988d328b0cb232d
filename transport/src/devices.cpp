// Device probing through libibverbs and UCT, and the auto-selection rule built on it.

#include <myelin/transport/devices.hpp>

#include <myelin/config.hpp>

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <string_view>

#if MYELIN_HAVE_VERBS
#include <endian.h>
#include <infiniband/verbs.h>
#include <net/if.h>
#endif

#if MYELIN_HAVE_UCX
#include <ucp/api/ucp.h>
#include <ucs/type/status.h>
#include <uct/api/uct.h>
#endif

namespace myelin::transport {

namespace {

constexpr const char* kSysInfiniband = "/sys/class/infiniband";

bool path_exists(const char* path) {
  struct stat st {};
  return ::stat(path, &st) == 0;
}

// Names in a directory, sorted, without "." and ".."; empty when it cannot be read.
std::vector<std::string> list_dir(const char* path) {
  std::vector<std::string> names;
  std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir(path), &::closedir);
  if (!dir) return names;
  while (const dirent* e = ::readdir(dir.get())) {
    const std::string_view n = e->d_name;
    if (n != "." && n != "..") names.emplace_back(n);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string join(const std::vector<std::string>& items, std::string_view sep) {
  std::string out;
  for (const std::string& s : items) {
    if (!out.empty()) out += sep;
    out += s;
  }
  return out;
}

// Why libibverbs found no device, from what sysfs shows. `verbs_said` is the first half of the
// sentence ("ibv_get_device_list found 0 devices").
std::string explain_no_rdma(const std::string& verbs_said) {
  std::string why = verbs_said + "; ";
  if (!path_exists(kSysInfiniband)) {
    return why + kSysInfiniband + " is absent — no RDMA NIC or rdma_rxe/ib_uverbs not loaded";
  }
  const std::vector<std::string> names = list_dir(kSysInfiniband);
  if (names.empty()) {
    return why + kSysInfiniband +
           " is empty — no RDMA NIC, or its kernel driver (mlx5_ib, rdma_rxe, ...) not loaded";
  }
  why += std::string(kSysInfiniband) + " lists " + join(names, ", ") +
         " but libibverbs opened none — ";
  if (!path_exists("/dev/infiniband")) {
    return why + "/dev/infiniband is absent (ib_uverbs not loaded)";
  }
  return why +
         "the user-space provider (ibverbs-providers) is missing or /dev/infiniband/uverbs* "
         "is not accessible to this user";
}

#if MYELIN_HAVE_VERBS

struct DeviceListDeleter {
  void operator()(ibv_device** list) const noexcept { ibv_free_device_list(list); }
};
struct ContextDeleter {
  void operator()(ibv_context* ctx) const noexcept { ibv_close_device(ctx); }
};

int mtu_bytes(ibv_mtu mtu) {
  const int v = static_cast<int>(mtu);
  return v >= IBV_MTU_256 && v <= IBV_MTU_4096 ? 128 << v : 0;
}

// Per-lane rate of ibv_port_attr::active_speed in Gb/s, as ibv_devinfo prints it.
double lane_rate_gbps(uint8_t speed) {
  switch (speed) {
    case 1:
      return 2.5;  // SDR
    case 2:
      return 5.0;  // DDR
    case 4:
      return 10.0;  // QDR
    case 8:
      return 10.0;  // FDR10
    case 16:
      return 14.0;  // FDR
    case 32:
      return 25.0;  // EDR
    case 64:
      return 50.0;  // HDR
    case 128:
      return 100.0;  // NDR
    default:
      return 0;
  }
}

int lane_count(uint8_t width) {
  switch (width) {
    case 1:
      return 1;
    case 2:
      return 4;
    case 4:
      return 8;
    case 8:
      return 12;
    case 16:
      return 2;
    default:
      return 0;
  }
}

std::string link_layer_name(uint8_t layer) {
  switch (layer) {
    case IBV_LINK_LAYER_INFINIBAND:
      return "InfiniBand";
    case IBV_LINK_LAYER_ETHERNET:
      return "Ethernet";
    default:
      return "unspecified";
  }
}

std::string transport_name(ibv_transport_type t) {
  switch (t) {
    case IBV_TRANSPORT_IB:
      return "InfiniBand";
    case IBV_TRANSPORT_IWARP:
      return "iWARP";
    case IBV_TRANSPORT_USNIC:
      return "usNIC";
    case IBV_TRANSPORT_USNIC_UDP:
      return "usNIC UDP";
    case IBV_TRANSPORT_UNSPECIFIED:
      return "unspecified";
    default:
      return "unknown";
  }
}

std::string gid_type_name(uint32_t type) {
  switch (type) {
    case IBV_GID_TYPE_IB:
      return "IB";
    case IBV_GID_TYPE_ROCE_V1:
      return "RoCE v1";
    case IBV_GID_TYPE_ROCE_V2:
      return "RoCE v2";
    default:
      return "unknown";
  }
}

std::string format_gid(const ibv_gid& gid) {
  char buf[48];
  int at = 0;
  for (int i = 0; i < 16; i += 2) {
    at += std::snprintf(buf + at, sizeof(buf) - static_cast<size_t>(at), "%s%02x%02x",
                        i == 0 ? "" : ":", gid.raw[i], gid.raw[i + 1]);
  }
  return buf;
}

std::string format_guid(__be64 guid_be) {
  const uint64_t g = be64toh(guid_be);
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%04x:%04x:%04x:%04x", static_cast<unsigned>(g >> 48) & 0xffff,
                static_cast<unsigned>(g >> 32) & 0xffff, static_cast<unsigned>(g >> 16) & 0xffff,
                static_cast<unsigned>(g) & 0xffff);
  return buf;
}

int sysfs_numa_node(const std::string& device) {
  std::ifstream f(std::string(kSysInfiniband) + "/" + device + "/device/numa_node");
  int node = -1;
  if (!(f >> node)) return -1;
  return node;
}

std::string errno_text(int err) {
  return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")";
}

void probe_device(ibv_device* dev, RdmaDevice& out) {
  out.name = ibv_get_device_name(dev);
  out.node_guid = format_guid(ibv_get_device_guid(dev));
  out.transport = transport_name(dev->transport_type);
  out.numa_node = sysfs_numa_node(out.name);

  std::unique_ptr<ibv_context, ContextDeleter> ctx(ibv_open_device(dev));
  if (!ctx) {
    out.error = "ibv_open_device: " + errno_text(errno);
    return;
  }
  ibv_device_attr attr{};
  if (const int rc = ibv_query_device(ctx.get(), &attr); rc != 0) {
    out.error = "ibv_query_device: " + errno_text(rc);
    return;
  }
  size_t gid_capacity = 0;
  for (int p = 1; p <= attr.phys_port_cnt; ++p) {
    RdmaPort port;
    port.port = p;
    ibv_port_attr pa{};
    if (const int rc = ibv_query_port(ctx.get(), static_cast<uint8_t>(p), &pa); rc != 0) {
      port.error = "ibv_query_port: " + errno_text(rc);
      out.ports.push_back(std::move(port));
      continue;
    }
    port.state = ibv_port_state_str(pa.state);
    port.active = pa.state == IBV_PORT_ACTIVE;
    port.link_layer = link_layer_name(pa.link_layer);
    port.active_mtu = mtu_bytes(pa.active_mtu);
    port.max_mtu = mtu_bytes(pa.max_mtu);
    port.lanes = lane_count(pa.active_width);
    port.lane_gbps = lane_rate_gbps(pa.active_speed);
    port.speed_gbps = port.lanes * port.lane_gbps;
    port.lid = pa.lid;
    gid_capacity += static_cast<size_t>(std::max(0, pa.gid_tbl_len));
    out.ports.push_back(std::move(port));
  }
  if (gid_capacity == 0) return;
  std::vector<ibv_gid_entry> entries(gid_capacity);
  const ssize_t n = ibv_query_gid_table(ctx.get(), entries.data(), entries.size(), 0);
  if (n < 0) {
    for (RdmaPort& port : out.ports) {
      if (port.error.empty())
        port.error = "ibv_query_gid_table: " + errno_text(static_cast<int>(-n));
    }
    return;
  }
  for (ssize_t i = 0; i < n; ++i) {
    const ibv_gid_entry& e = entries[static_cast<size_t>(i)];
    GidEntry gid;
    gid.index = static_cast<int>(e.gid_index);
    gid.gid = format_gid(e.gid);
    gid.type = gid_type_name(e.gid_type);
    char ifname[IF_NAMESIZE] = {};
    if (e.ndev_ifindex != 0 && if_indextoname(e.ndev_ifindex, ifname) != nullptr) {
      gid.netdev = ifname;
    }
    for (RdmaPort& port : out.ports) {
      if (port.port == static_cast<int>(e.port_num)) port.gids.push_back(std::move(gid));
    }
  }
  for (RdmaPort& port : out.ports) {
    std::sort(port.gids.begin(), port.gids.end(),
              [](const GidEntry& a, const GidEntry& b) { return a.index < b.index; });
  }
}

#endif  // MYELIN_HAVE_VERBS

#if MYELIN_HAVE_UCX

struct ComponentListDeleter {
  void operator()(uct_component_h* list) const noexcept { uct_release_component_list(list); }
};
struct MdConfigDeleter {
  void operator()(uct_md_config_t* config) const noexcept { uct_config_release(config); }
};
struct MdDeleter {
  void operator()(uct_md* md) const noexcept { uct_md_close(md); }
};
struct TlListDeleter {
  void operator()(uct_tl_resource_desc_t* list) const noexcept {
    uct_release_tl_resource_list(list);
  }
};

std::string device_type_name(uct_device_type_t type) {
  switch (type) {
    case UCT_DEVICE_TYPE_NET:
      return "net";
    case UCT_DEVICE_TYPE_SHM:
      return "shm";
    case UCT_DEVICE_TYPE_ACC:
      return "acc";
    case UCT_DEVICE_TYPE_SELF:
      return "self";
    default:
      return "other";
  }
}

void add_error(std::string& errors, const std::string& line) {
  if (!errors.empty()) errors += '\n';
  errors += line;
}

void probe_component(uct_component_h component, UcxReport& out) {
  uct_component_attr_t attr{};
  attr.field_mask = UCT_COMPONENT_ATTR_FIELD_NAME | UCT_COMPONENT_ATTR_FIELD_MD_RESOURCE_COUNT;
  if (const ucs_status_t st = uct_component_query(component, &attr); st != UCS_OK) {
    add_error(out.error, std::string("uct_component_query: ") + ucs_status_string(st));
    return;
  }
  const std::string component_name = attr.name;
  std::vector<uct_md_resource_desc_t> mds(attr.md_resource_count);
  if (mds.empty()) return;
  attr.field_mask = UCT_COMPONENT_ATTR_FIELD_MD_RESOURCES;
  attr.md_resources = mds.data();
  if (const ucs_status_t st = uct_component_query(component, &attr); st != UCS_OK) {
    add_error(out.error,
              "uct_component_query(" + component_name + " MDs): " + ucs_status_string(st));
    return;
  }
  for (const uct_md_resource_desc_t& md_desc : mds) {
    const std::string md_name = md_desc.md_name;
    uct_md_config_t* raw_config = nullptr;
    if (const ucs_status_t st = uct_md_config_read(component, nullptr, nullptr, &raw_config);
        st != UCS_OK) {
      add_error(out.error, "uct_md_config_read(" + md_name + "): " + ucs_status_string(st));
      continue;
    }
    std::unique_ptr<uct_md_config_t, MdConfigDeleter> config(raw_config);
    uct_md_h raw_md = nullptr;
    if (const ucs_status_t st = uct_md_open(component, md_name.c_str(), config.get(), &raw_md);
        st != UCS_OK) {
      add_error(out.error, "uct_md_open(" + md_name + "): " + ucs_status_string(st));
      continue;
    }
    std::unique_ptr<uct_md, MdDeleter> md(raw_md);
    uct_tl_resource_desc_t* raw_tls = nullptr;
    unsigned num_tls = 0;
    if (const ucs_status_t st = uct_md_query_tl_resources(md.get(), &raw_tls, &num_tls);
        st != UCS_OK) {
      add_error(out.error, "uct_md_query_tl_resources(" + md_name + "): " + ucs_status_string(st));
      continue;
    }
    std::unique_ptr<uct_tl_resource_desc_t, TlListDeleter> tls(raw_tls);
    for (unsigned i = 0; i < num_tls; ++i) {
      out.resources.push_back(UcxResource{.component = component_name,
                                          .md = md_name,
                                          .transport = raw_tls[i].tl_name,
                                          .device = raw_tls[i].dev_name,
                                          .type = device_type_name(raw_tls[i].dev_type)});
    }
  }
}

#endif  // MYELIN_HAVE_UCX

std::string describe_port(const RdmaDevice& d, const RdmaPort& p) {
  char speed[32];
  std::snprintf(speed, sizeof(speed), "%g Gb/s", p.speed_gbps);
  return d.name + " port " + std::to_string(p.port) + " (" + p.link_layer + ", " +
         (p.speed_gbps > 0 ? std::string(speed) : std::string("speed unknown")) + ")";
}

// Why verbs is not the pick for a remote peer.
std::string why_not_verbs(const RdmaReport& rdma) {
  if (!rdma.compiled_in) return "verbs is not compiled in";
  if (rdma.devices.empty()) return "no RDMA devices (" + rdma.absent_reason + ")";
  std::vector<std::string> ports;
  for (const RdmaDevice& d : rdma.devices) {
    if (!d.error.empty()) ports.push_back(d.name + ": " + d.error);
    for (const RdmaPort& p : d.ports) {
      ports.push_back(d.name + " port " + std::to_string(p.port) + " " +
                      (p.error.empty() ? p.state : p.error));
    }
  }
  return "no RDMA port is ACTIVE (" + join(ports, ", ") + ")";
}

}  // namespace

bool RdmaReport::has_active_port() const noexcept {
  for (const RdmaDevice& d : devices) {
    for (const RdmaPort& p : d.ports) {
      if (p.active) return true;
    }
  }
  return false;
}

bool UcxReport::has_network_transport() const noexcept {
  return std::any_of(resources.begin(), resources.end(), [](const UcxResource& r) {
    return r.type == "net" && r.device != "lo";  // loopback reaches no other node
  });
}

std::vector<std::string> UcxReport::transport_names() const {
  std::set<std::string> names;
  for (const UcxResource& r : resources) names.insert(r.transport);
  return {names.begin(), names.end()};
}

RdmaReport probe_rdma_devices() {
  RdmaReport report;
#if MYELIN_HAVE_VERBS
  report.compiled_in = true;
  int num = 0;
  errno = 0;
  std::unique_ptr<ibv_device*, DeviceListDeleter> list(ibv_get_device_list(&num));
  if (!list) {
    // libibverbs answers ENOSYS when the kernel exposes no RDMA core at all.
    const int err = errno;
    report.absent_reason = explain_no_rdma(
        err == ENOSYS
            ? "ibv_get_device_list found 0 devices, errno ENOSYS: the kernel offers no RDMA "
              "support"
            : "ibv_get_device_list failed: " + errno_text(err));
    return report;
  }
  for (int i = 0; i < num; ++i) {
    RdmaDevice dev;
    probe_device(list.get()[i], dev);
    report.devices.push_back(std::move(dev));
  }
  std::sort(report.devices.begin(), report.devices.end(),
            [](const RdmaDevice& a, const RdmaDevice& b) { return a.name < b.name; });
  if (report.devices.empty()) {
    report.absent_reason = explain_no_rdma("ibv_get_device_list found 0 devices");
  }
#else
  report.absent_reason = explain_no_rdma(
      "the verbs backend is not compiled in (libibverbs-dev/librdmacm-dev were missing at "
      "configure time, or MYELIN_WITH_VERBS=OFF)");
#endif
  return report;
}

UcxReport probe_ucx() {
  UcxReport report;
#if MYELIN_HAVE_UCX
  report.compiled_in = true;
  report.version = ucp_get_version_string();
  uct_component_h* raw = nullptr;
  unsigned num = 0;
  if (const ucs_status_t st = uct_query_components(&raw, &num); st != UCS_OK) {
    report.error = std::string("uct_query_components: ") + ucs_status_string(st);
    return report;
  }
  std::unique_ptr<uct_component_h, ComponentListDeleter> components(raw);
  for (unsigned i = 0; i < num; ++i) probe_component(raw[i], report);
#else
  report.error =
      "the UCX backend is not compiled in (libucx-dev was missing at configure time, or "
      "MYELIN_WITH_UCX=OFF)";
#endif
  return report;
}

DeviceReport probe_devices() {
  return DeviceReport{probe_rdma_devices(), probe_ucx()};
}

BackendChoice choose_backend(const DeviceReport& report, bool same_node) {
  if (same_node) {
    return {Backend::kShm, "the peer is on this node: shared-memory rings, no NIC involved"};
  }
  for (const RdmaDevice& d : report.rdma.devices) {
    for (const RdmaPort& p : d.ports) {
      if (p.active) return {Backend::kVerbs, "ACTIVE RDMA port " + describe_port(d, p)};
    }
  }
  const std::string no_verbs = why_not_verbs(report.rdma);
  if (report.ucx.compiled_in && report.ucx.has_network_transport()) {
    std::vector<std::string> nets;
    for (const UcxResource& r : report.ucx.resources) {
      if (r.type == "net" && r.device != "lo") nets.push_back(r.transport + "/" + r.device);
    }
    return {Backend::kUcx, no_verbs + "; UCX sees network transports " + join(nets, ", ")};
  }
  const std::string no_ucx = report.ucx.compiled_in
                                 ? "UCX sees no network transport (only shared memory/self)"
                                 : "UCX is not compiled in";
  return {Backend::kTcp, no_verbs + "; " + no_ucx + "; TCP sockets work everywhere"};
}

}  // namespace myelin::transport
