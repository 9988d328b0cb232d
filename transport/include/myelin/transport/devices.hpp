// myelin/transport/devices.hpp
//
// What network hardware this process can use, and which backend `auto` picks from it.
//
//   probe_rdma_devices()  every RDMA device libibverbs opens, its ports (state, link layer, MTU,
//                         speed) and GID tables (with the RoCE version of each entry), or why
//                         there are none.
//   probe_ucx()           UCX's version and every (transport, device) pair UCT offers here.
//   choose_backend()      the rule Backend::kAuto follows, with the reason in words:
//                           peer on the same node          -> shm
//                           remote, an ACTIVE verbs port   -> verbs
//                           remote, UCX sees a network tl  -> ucx (when compiled in)
//                           otherwise                      -> tcp
//
// Probing is a report, not an operation that fails: a missing library, device or permission is
// recorded in the report's `absent_reason` / per-device `error` so that myelin-info can print it
// and a backend can log it. The probes open and close every device they look at (the RDMA probe
// also reads sysfs); they take milliseconds and are meant for start-up, not for a hot path.
//
// Thread safety: the probes may run concurrently with each other; the structs are plain values.
// Nothing here includes a libibverbs or UCX header: backends compiled out still report why.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <myelin/transport/options.hpp>

namespace myelin::transport {

struct GidEntry {
  int index = 0;
  std::string gid;     // "fe80:0000:0000:0000:b8ce:f6ff:fe00:0002"
  std::string type;    // "IB", "RoCE v1", "RoCE v2"
  std::string netdev;  // the network interface of a RoCE GID ("eth2"); empty for IB
};

struct RdmaPort {
  int port = 0;                // 1-based port number
  std::string state;           // "PORT_ACTIVE", "PORT_DOWN", ... (ibv_port_state_str)
  bool active = false;         // state == ACTIVE: the port can carry traffic now
  std::string link_layer;      // "InfiniBand", "Ethernet", "unspecified"
  int active_mtu = 0;          // bytes: 256 .. 4096
  int max_mtu = 0;             // bytes
  int lanes = 0;               // link width: 1, 2, 4, 8, 12; 0 when unknown
  double lane_gbps = 0;        // rate per lane as ibv_devinfo prints it (SDR 2.5 .. NDR 100)
  double speed_gbps = 0;       // lanes * lane_gbps
  uint16_t lid = 0;            // InfiniBand local id; 0 on RoCE
  std::vector<GidEntry> gids;  // valid entries only
  std::string error;           // why the port or its GID table could not be read, else empty
};

struct RdmaDevice {
  std::string name;       // "mlx5_0", "rxe0"
  std::string node_guid;  // "b8ce:f603:00a1:b2c0"
  std::string transport;  // "InfiniBand" (IB and RoCE), "iWARP", ...
  int numa_node = -1;     // from /sys/class/infiniband/<name>/device/numa_node; -1 unknown
  std::vector<RdmaPort> ports;
  std::string error;  // why the device could not be opened or queried, else empty
};

struct RdmaReport {
  bool compiled_in = false;  // MYELIN_HAVE_VERBS
  std::vector<RdmaDevice> devices;
  // When `devices` is empty: one line saying why ("ibv_get_device_list found 0 devices;
  // /sys/class/infiniband is absent — no RDMA NIC or rdma_rxe/ib_uverbs not loaded").
  std::string absent_reason;
  // True when some port of some device is ACTIVE.
  [[nodiscard]] bool has_active_port() const noexcept;
};

struct UcxResource {
  std::string component;  // UCT component: "tcp", "posix", "sysv", "self", "cma", "ib", ...
  std::string md;         // memory domain: "tcp", "posix", "mlx5_0", ...
  std::string transport;  // tl name: "tcp", "posix", "sysv", "self", "cma", "rc_mlx5", "ud_verbs"
  std::string device;     // "eth0", "lo", "memory", "mlx5_0:1"
  std::string type;       // "net", "shm", "acc", "self"
};

struct UcxReport {
  bool compiled_in = false;  // MYELIN_HAVE_UCX
  std::string version;       // ucp_get_version_string(), e.g. "1.13.1"
  std::vector<UcxResource> resources;
  // Errors met while probing (a memory domain that did not open, ...), one per line; empty when
  // everything was readable. When !compiled_in, why.
  std::string error;
  // True when some resource is of type "net" on a device other than the loopback "lo" (tcp on
  // eth0 counts; so do rc/ud/dc on RDMA devices).
  [[nodiscard]] bool has_network_transport() const noexcept;
  // The distinct transport names, sorted: {"cma", "posix", "self", "sysv", "tcp"}.
  [[nodiscard]] std::vector<std::string> transport_names() const;
};

struct DeviceReport {
  RdmaReport rdma;
  UcxReport ucx;
};

struct BackendChoice {
  Backend backend = Backend::kTcp;
  std::string reason;  // one sentence: which facts led there
};

RdmaReport probe_rdma_devices();
UcxReport probe_ucx();
// Both probes.
DeviceReport probe_devices();

// The backend Backend::kAuto uses for a peer (see the rule at the top). Never kAuto.
BackendChoice choose_backend(const DeviceReport& report, bool same_node);

}  // namespace myelin::transport
