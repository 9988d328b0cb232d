// The `auto` rule on hand-built device reports: every branch, and the reason it gives.

#include <myelin/config.hpp>
#include <myelin/transport/devices.hpp>

#include <gtest/gtest.h>

#include <string>

namespace myelin::transport {
namespace {

RdmaDevice device(const std::string& name, bool active) {
  RdmaPort port;
  port.port = 1;
  port.state = active ? "PORT_ACTIVE" : "PORT_DOWN";
  port.active = active;
  port.link_layer = "Ethernet";
  port.lanes = 4;
  port.lane_gbps = 25;
  port.speed_gbps = 100;
  RdmaDevice d;
  d.name = name;
  d.ports.push_back(port);
  return d;
}

UcxResource resource(const std::string& tl, const std::string& dev, const std::string& type) {
  return UcxResource{.component = tl, .md = tl, .transport = tl, .device = dev, .type = type};
}

DeviceReport report_with(bool verbs_in, bool ucx_in) {
  DeviceReport r;
  r.rdma.compiled_in = verbs_in;
  r.ucx.compiled_in = ucx_in;
  return r;
}

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(ChooseBackend, SameNodeIsAlwaysShm) {
  DeviceReport r = report_with(true, true);
  r.rdma.devices.push_back(device("mlx5_0", true));
  const BackendChoice c = choose_backend(r, /*same_node=*/true);
  EXPECT_EQ(c.backend, Backend::kShm);
  EXPECT_TRUE(has(c.reason, "this node")) << c.reason;
}

TEST(ChooseBackend, ActivePortMeansVerbs) {
  DeviceReport r = report_with(true, true);
  r.rdma.devices.push_back(device("mlx5_0", false));
  r.rdma.devices.push_back(device("mlx5_1", true));
  r.ucx.resources.push_back(resource("tcp", "eth0", "net"));
  ASSERT_TRUE(r.rdma.has_active_port());
  const BackendChoice c = choose_backend(r, false);
  EXPECT_EQ(c.backend, Backend::kVerbs);
  EXPECT_TRUE(has(c.reason, "mlx5_1 port 1")) << c.reason;
  EXPECT_TRUE(has(c.reason, "100 Gb/s")) << c.reason;
}

TEST(ChooseBackend, DownPortFallsToUcxWithANetworkTransport) {
  DeviceReport r = report_with(true, true);
  r.rdma.devices.push_back(device("rxe0", false));
  r.ucx.resources.push_back(resource("posix", "memory", "shm"));
  r.ucx.resources.push_back(resource("tcp", "eth0", "net"));
  const BackendChoice c = choose_backend(r, false);
  EXPECT_EQ(c.backend, Backend::kUcx);
  EXPECT_TRUE(has(c.reason, "no RDMA port is ACTIVE (rxe0 port 1 PORT_DOWN)")) << c.reason;
  EXPECT_TRUE(has(c.reason, "tcp/eth0")) << c.reason;
}

TEST(ChooseBackend, LoopbackOnlyUcxFallsToTcp) {
  DeviceReport r = report_with(true, true);
  r.rdma.absent_reason = "ibv_get_device_list found 0 devices";
  r.ucx.resources.push_back(resource("tcp", "lo", "net"));
  r.ucx.resources.push_back(resource("self", "memory0", "self"));
  EXPECT_FALSE(r.ucx.has_network_transport());
  const BackendChoice c = choose_backend(r, false);
  EXPECT_EQ(c.backend, Backend::kTcp);
  EXPECT_TRUE(has(c.reason, "no RDMA devices (ibv_get_device_list found 0 devices)")) << c.reason;
  EXPECT_TRUE(has(c.reason, "UCX sees no network transport")) << c.reason;
}

TEST(ChooseBackend, NothingCompiledInIsTcp) {
  DeviceReport r = report_with(false, false);
  r.ucx.resources.push_back(resource("tcp", "eth0", "net"));  // ignored: UCX not compiled in
  const BackendChoice c = choose_backend(r, false);
  EXPECT_EQ(c.backend, Backend::kTcp);
  EXPECT_TRUE(has(c.reason, "verbs is not compiled in")) << c.reason;
  EXPECT_TRUE(has(c.reason, "UCX is not compiled in")) << c.reason;
}

TEST(UcxReport, TransportNamesAreSortedAndDistinct) {
  UcxReport u;
  u.resources = {resource("tcp", "lo", "net"), resource("self", "memory0", "self"),
                 resource("tcp", "eth0", "net"), resource("cma", "memory", "shm")};
  EXPECT_EQ(u.transport_names(), (std::vector<std::string>{"cma", "self", "tcp"}));
  EXPECT_TRUE(u.has_network_transport());
}

TEST(Probes, ReportWhatIsCompiledIn) {
  const DeviceReport r = probe_devices();
  EXPECT_EQ(r.rdma.compiled_in, MYELIN_HAVE_VERBS != 0);
  EXPECT_EQ(r.ucx.compiled_in, MYELIN_HAVE_UCX != 0);
  // Either devices or a reason, never neither.
  EXPECT_NE(r.rdma.devices.empty(), r.rdma.absent_reason.empty());
  for (const RdmaDevice& d : r.rdma.devices) {
    EXPECT_FALSE(d.name.empty());
    for (const RdmaPort& p : d.ports) EXPECT_EQ(p.active, p.state == "PORT_ACTIVE") << d.name;
  }
}

}  // namespace
}  // namespace myelin::transport
