// transport/src/verbs/verbs_device.cpp — device, port, GID and MTU selection.
#include "verbs/verbs_device.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

#include <myelin/core/log.hpp>

namespace myelin::transport::internal::verbs {

void log_destroy_failure(const char* what, int rc) noexcept {
  MYELIN_LOG_WARN << what << " failed: " << std::strerror(rc < 0 ? -rc : rc) << " (" << rc << ")";
}

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.release();
  }
  return *this;
}
Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

const char* mtu_name(ibv_mtu mtu) noexcept {
  switch (mtu) {
    case IBV_MTU_256:
      return "256";
    case IBV_MTU_512:
      return "512";
    case IBV_MTU_1024:
      return "1024";
    case IBV_MTU_2048:
      return "2048";
    case IBV_MTU_4096:
      return "4096";
  }
  return "?";
}

namespace {

bool is_ipv4_mapped(const ibv_gid& g) {
  for (int i = 0; i < 10; ++i) {
    if (g.raw[i] != 0) return false;
  }
  return g.raw[10] == 0xff && g.raw[11] == 0xff;
}

const char* gid_type_name(uint32_t t) {
  switch (t) {
    case IBV_GID_TYPE_IB:
      return "IB";
    case IBV_GID_TYPE_ROCE_V1:
      return "RoCE v1";
    case IBV_GID_TYPE_ROCE_V2:
      return "RoCE v2";
  }
  return "unknown";
}

// Chooses the GID of a RoCE port: override, IPv4-mapped RoCE v2, any RoCE v2, v1, index 0.
Status choose_roce_gid(ibv_context* ctx, PortChoice& p) {
  if (const char* env = std::getenv("MYELIN_VERBS_GID_INDEX"); env != nullptr && *env != 0) {
    char* end = nullptr;
    const long idx = std::strtol(env, &end, 10);
    if (*end != 0 || idx < 0 || idx > 1024) {
      return invalid_argument("MYELIN_VERBS_GID_INDEX='", env, "' is not a GID index");
    }
    ibv_gid_entry e{};
    if (int rc = ibv_query_gid_ex(ctx, p.port, static_cast<uint32_t>(idx), &e, 0)) {
      return errno_status("MYELIN_VERBS_GID_INDEX=" + std::to_string(idx) + ": no such GID", rc,
                          StatusCode::kInvalidArgument);
    }
    p.gid_index = static_cast<int>(idx);
    p.gid = e.gid;
    p.gid_type = e.gid_type;
    p.ndev_ifindex = e.ndev_ifindex;
    p.reason += ", GID " + std::to_string(idx) + " (" + gid_type_name(e.gid_type) +
                ", from MYELIN_VERBS_GID_INDEX)";
    return ok_status();
  }
  std::vector<ibv_gid_entry> table(256);
  const ssize_t n = ibv_query_gid_table(ctx, table.data(), table.size(), 0);
  if (n < 0) return errno_status("ibv_query_gid_table", static_cast<int>(-n));
  int best = -1, best_rank = -1;
  for (ssize_t i = 0; i < n; ++i) {
    const ibv_gid_entry& e = table[static_cast<size_t>(i)];
    if (e.port_num != p.port) continue;
    int rank = 0;
    if (e.gid_type == IBV_GID_TYPE_ROCE_V2)
      rank = is_ipv4_mapped(e.gid) ? 3 : 2;
    else if (e.gid_type == IBV_GID_TYPE_ROCE_V1)
      rank = 1;
    if (rank > best_rank) {
      best_rank = rank;
      best = static_cast<int>(i);
    }
  }
  if (best < 0) return unavailable("port ", int{p.port}, " has no GID (is the netdev up?)");
  const ibv_gid_entry& e = table[static_cast<size_t>(best)];
  p.gid_index = static_cast<int>(e.gid_index);
  p.gid = e.gid;
  p.gid_type = e.gid_type;
  p.ndev_ifindex = e.ndev_ifindex;
  p.reason += ", GID " + std::to_string(e.gid_index) + " (" + gid_type_name(e.gid_type) +
              (best_rank == 3 ? ", IPv4-mapped" : "") + ")";
  return ok_status();
}

// Fills `p` for an ACTIVE port of `ctx`; `want_port` 0 = first ACTIVE one.
Status choose_port(ibv_context* ctx, const ibv_device_attr& attr, uint8_t want_port,
                   PortChoice& p) {
  const char* dev = ibv_get_device_name(ctx->device);
  for (uint8_t port = 1; port <= attr.phys_port_cnt; ++port) {
    if (want_port != 0 && port != want_port) continue;
    ibv_port_attr pa{};
    if (int rc = ibv_query_port(ctx, port, &pa)) return errno_status("ibv_query_port", rc);
    if (pa.state != IBV_PORT_ACTIVE) {
      if (want_port != 0) {
        return unavailable(dev, " port ", int{port}, " is ", ibv_port_state_str(pa.state),
                           ", not ACTIVE");
      }
      continue;
    }
    p.port = port;
    p.link_layer = pa.link_layer;
    p.lid = pa.lid;
    p.active_mtu = pa.active_mtu;
    p.max_msg_sz = pa.max_msg_sz;
    p.reason = std::string(dev) + " port " + std::to_string(port) + " ACTIVE, " +
               (pa.link_layer == IBV_LINK_LAYER_ETHERNET ? "RoCE" : "InfiniBand") + ", MTU " +
               mtu_name(pa.active_mtu);
    if (p.is_roce()) return choose_roce_gid(ctx, p);
    if (pa.lid == 0)
      return unavailable(dev, " port ", int{port}, " has no LID (no subnet manager?)");
    p.gid_index = 0;
    if (ibv_query_gid(ctx, port, 0, &p.gid) != 0) std::memset(&p.gid, 0, sizeof p.gid);
    p.gid_type = IBV_GID_TYPE_IB;
    p.reason += ", LID " + std::to_string(pa.lid);
    return ok_status();
  }
  return unavailable(dev, " has no ACTIVE port",
                     want_port != 0 ? " " + std::to_string(want_port) : std::string());
}

int read_numa_node(const char* dev) {
  std::ifstream f(std::string("/sys/class/infiniband/") + dev + "/device/numa_node");
  int node = -1;
  if (f >> node) return node;
  return -1;
}

}  // namespace

Result<std::shared_ptr<Device>> Device::open(const std::string& spec, bool from_rdma_cm) {
  std::string want_name = spec;
  uint8_t want_port = 0;
  if (auto colon = spec.rfind(':'); colon != std::string::npos) {
    want_name = spec.substr(0, colon);
    const int port = std::atoi(spec.c_str() + colon + 1);
    if (port <= 0 || port > 255) return invalid_argument("verbs device '", spec, "': bad port");
    want_port = static_cast<uint8_t>(port);
  }
  std::shared_ptr<Device> d(new Device());
  // Candidate contexts: from librdmacm, or opened by us one at a time.
  std::vector<ibv_context*> rdma_ctxs;
  DeviceListPtr list;
  int n = 0;
  if (from_rdma_cm) {
    d->rdma_list_.reset(rdma_get_devices(&n));
    if (!d->rdma_list_) {
      return errno_status("rdma_get_devices (is rdma_ucm loaded?)", errno,
                          StatusCode::kUnavailable);
    }
  } else {
    list.reset(ibv_get_device_list(&n));
    if (!list) return errno_status("ibv_get_device_list", errno, StatusCode::kUnavailable);
  }
  if (n == 0) return unavailable("no RDMA device found");
  std::string tried;
  for (int i = 0; i < n; ++i) {
    ibv_context* ctx = nullptr;
    ContextPtr owned;
    const char* name = from_rdma_cm ? ibv_get_device_name(d->rdma_list_.get()[i]->device)
                                    : ibv_get_device_name(list.get()[i]);
    if (!want_name.empty() && want_name != name) continue;
    if (from_rdma_cm) {
      ctx = d->rdma_list_.get()[i];
    } else {
      owned.reset(ibv_open_device(list.get()[i]));
      if (!owned) {
        tried += std::string(" ") + name + ": ibv_open_device failed;";
        continue;
      }
      ctx = owned.get();
    }
    ibv_device_attr attr{};
    if (int rc = ibv_query_device(ctx, &attr)) {
      tried += std::string(" ") + name + ": ibv_query_device " + std::strerror(rc) + ";";
      continue;
    }
    PortChoice port;
    Status st = choose_port(ctx, attr, want_port, port);
    if (!st.ok()) {
      if (!want_name.empty()) return std::move(st).with_context("verbs device " + want_name);
      tried += " " + st.to_string() + ";";
      continue;
    }
    d->owned_ctx_ = std::move(owned);
    d->ctx_ = ctx;
    d->attr_ = attr;
    d->port_ = port;
    d->name_ = name;
    d->numa_node_ = read_numa_node(name);
    d->pd_.reset(ibv_alloc_pd(ctx));
    if (!d->pd_) return errno_status("ibv_alloc_pd", errno, StatusCode::kDeviceFailed);
    if (want_name.empty()) d->port_.reason += " (first device with an ACTIVE port)";
    return d;
  }
  if (!want_name.empty()) return not_found("verbs device '", want_name, "' not found");
  return unavailable("no verbs device with an ACTIVE port:", tried);
}

Device::~Device() = default;

bool any_active_port(std::string* reason) {
  auto d = Device::open("", false);
  if (!d.ok()) {
    if (reason) *reason = d.status().to_string();
    return false;
  }
  if (reason) *reason = (*d)->port().reason;
  return true;
}

}  // namespace myelin::transport::internal::verbs
