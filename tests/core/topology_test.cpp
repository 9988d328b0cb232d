#include <myelin/core/topology.hpp>

#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace myelin {
namespace {

const std::string kFixture =
    std::string(MYELIN_TOPOLOGY_FIXTURE_DIR) + "/two_socket_gpu_server.xml";

std::vector<int> range(int first, int last) {
  std::vector<int> v;
  for (int i = first; i <= last; ++i) v.push_back(i);
  return v;
}

// The calling thread's affinity read straight from the kernel, independent of the helper under
// test.
std::vector<int> kernel_affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  EXPECT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  std::vector<int> out;
  for (int i = 0; i < CPU_SETSIZE; ++i) {
    if (CPU_ISSET(i, &set)) out.push_back(i);
  }
  return out;
}

std::vector<int> intersect(const std::vector<int>& a, const std::vector<int>& b) {
  std::vector<int> out;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(out));
  return out;
}

// Runs `body` on a fresh thread so that pinning it never leaks into other tests.
template <typename F>
void on_fresh_thread(F body) {
  std::thread t(body);
  t.join();
}

TEST(TopologySynthetic, TwoPackagesTwoNodes) {
  auto topo = Topology::from_synthetic("pack:2 numa:1 core:8 pu:2");
  ASSERT_TRUE(topo.ok()) << topo.status();
  EXPECT_EQ(topo->source(), "synthetic:pack:2 numa:1 core:8 pu:2");
  EXPECT_EQ(topo->package_count(), 2);
  EXPECT_EQ(topo->cpus(), range(0, 31));
  ASSERT_EQ(topo->numa_nodes().size(), 2u);
  EXPECT_EQ(topo->numa_nodes()[0].index, 0);
  EXPECT_EQ(topo->numa_nodes()[0].cpus, range(0, 15));
  EXPECT_EQ(topo->numa_nodes()[1].index, 1);
  EXPECT_EQ(topo->numa_nodes()[1].cpus, range(16, 31));
  ASSERT_EQ(topo->cores().size(), 16u);
  for (const Core& c : topo->cores()) {
    ASSERT_EQ(c.cpus.size(), 2u);
    const int expected_node = c.cpus[0] < 16 ? 0 : 1;
    EXPECT_EQ(c.numa_node, expected_node);
    EXPECT_EQ(c.package, expected_node);
  }
  EXPECT_TRUE(topo->pci_devices().empty());

  auto cpus = topo->cpus_of_numa_node(1);
  ASSERT_TRUE(cpus.ok()) << cpus.status();
  EXPECT_EQ(*cpus, range(16, 31));
  EXPECT_EQ(topo->numa_node_of_cpu(17).value(), 1);
  EXPECT_EQ(topo->numa_node_of_cpu(3).value(), 0);
  EXPECT_EQ(topo->numa_node_of_cpu(32).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(topo->cpus_of_numa_node(2).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(topo->numa_node_of_device("mlx5_0").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(topo->numa_node_of_gpu(0).status().code(), StatusCode::kNotFound);
}

TEST(TopologySynthetic, FourNodesOnOnePackage) {
  auto topo = Topology::from_synthetic("pack:1 numa:4 core:2 pu:1");
  ASSERT_TRUE(topo.ok()) << topo.status();
  ASSERT_EQ(topo->numa_nodes().size(), 4u);
  for (int n = 0; n < 4; ++n) {
    EXPECT_EQ(topo->cpus_of_numa_node(n).value(), range(2 * n, 2 * n + 1)) << "node " << n;
  }
}

TEST(TopologySynthetic, RejectsBadDescription) {
  auto topo = Topology::from_synthetic("pack:two core:banana");
  ASSERT_FALSE(topo.ok());
  EXPECT_EQ(topo.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(topo.status().message().find("pack:two"), std::string_view::npos);
}

class TopologyXml : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = Topology::from_xml_file(kFixture);
    ASSERT_TRUE(t.ok()) << t.status();
    topo_ = std::move(t).value();
  }
  int node_of(std::string_view name) {
    auto n = topo_.numa_node_of_device(name);
    EXPECT_TRUE(n.ok()) << n.status();
    return n.value_or(-100);
  }
  Topology topo_ = Topology::from_synthetic("pack:1 core:1 pu:1").value();
};

TEST_F(TopologyXml, MachineShape) {
  EXPECT_EQ(topo_.source(), "xml:" + kFixture);
  EXPECT_EQ(topo_.host_name(), "gpu-node-07");
  EXPECT_EQ(topo_.package_count(), 2);
  EXPECT_EQ(topo_.cpus(), range(0, 15));
  ASSERT_EQ(topo_.numa_nodes().size(), 2u);
  const std::vector<int> node0 = {0, 1, 2, 3, 8, 9, 10, 11};
  const std::vector<int> node1 = {4, 5, 6, 7, 12, 13, 14, 15};
  EXPECT_EQ(topo_.cpus_of_numa_node(0).value(), node0);
  EXPECT_EQ(topo_.cpus_of_numa_node(1).value(), node1);
  EXPECT_EQ(format_cpu_list(node1), "4-7,12-15");
  EXPECT_EQ(topo_.numa_nodes()[0].memory_bytes, 256ull << 30);
  EXPECT_EQ(topo_.numa_nodes()[1].memory_bytes, 256ull << 30);
  EXPECT_EQ(topo_.numa_node_of_cpu(12).value(), 1);
  EXPECT_EQ(topo_.numa_node_of_cpu(8).value(), 0);

  ASSERT_EQ(topo_.cores().size(), 8u);
  const Core& c = topo_.cores()[5];  // second core of package 1: PUs 5 and 13
  EXPECT_EQ(c.package, 1);
  EXPECT_EQ(c.index, 1);
  EXPECT_EQ(c.numa_node, 1);
  EXPECT_EQ(c.cpus, (std::vector<int>{5, 13}));
}

TEST_F(TopologyXml, NumaNodeOfEachNicAndGpu) {
  EXPECT_EQ(node_of("mlx5_0"), 0);
  EXPECT_EQ(node_of("ib0"), 0);
  EXPECT_EQ(node_of("mlx5_1"), 0);
  EXPECT_EQ(node_of("eth2"), 0);
  EXPECT_EQ(node_of("eth0"), 0);
  EXPECT_EQ(node_of("cuda0"), 0);
  EXPECT_EQ(node_of("nvidia0"), 0);
  EXPECT_EQ(node_of("mlx5_2"), 1);
  EXPECT_EQ(node_of("ib1"), 1);
  EXPECT_EQ(node_of("cuda1"), 1);
  EXPECT_EQ(node_of("nvidia1"), 1);
  EXPECT_EQ(node_of("nvme0n1"), 1);
  // Above both sockets: no single node.
  EXPECT_EQ(node_of("eno1"), kUnknownNumaNode);
  // By PCI bus id, with and without the domain, any case.
  EXPECT_EQ(node_of("0000:17:00.0"), 0);
  EXPECT_EQ(node_of("82:00.0"), 1);
  EXPECT_EQ(node_of("0000:C1:00.0"), kUnknownNumaNode);
  // GPUs by CUDA number.
  EXPECT_EQ(topo_.numa_node_of_gpu(0).value(), 0);
  EXPECT_EQ(topo_.numa_node_of_gpu(1).value(), 1);
  EXPECT_EQ(topo_.numa_node_of_gpu(2).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(topo_.numa_node_of_gpu(-1).status().code(), StatusCode::kInvalidArgument);

  auto missing = topo_.numa_node_of_device("mlx5_9");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("mlx5_9"), std::string_view::npos);
  EXPECT_EQ(topo_.numa_node_of_device("").status().code(), StatusCode::kInvalidArgument);
}

TEST_F(TopologyXml, DeviceKindsAndIds) {
  std::vector<std::string> nic_ids;
  for (const PciDevice& d : topo_.nics()) nic_ids.push_back(d.bus_id);
  EXPECT_EQ(nic_ids, (std::vector<std::string>{"0000:01:00.0", "0000:17:00.0", "0000:19:00.0",
                                               "0000:81:00.0", "0000:c1:00.0"}));
  const std::vector<PciDevice> gpus = topo_.gpus();
  ASSERT_EQ(gpus.size(), 2u);
  EXPECT_EQ(gpus[0].bus_id, "0000:18:00.0");
  EXPECT_EQ(gpus[0].vendor_id, 0x10de);
  EXPECT_EQ(gpus[0].device_id, 0x20b0);
  EXPECT_EQ(gpus[0].class_id, 0x0302);
  EXPECT_EQ(gpus[0].device_name, "GA100 [A100 SXM4 40GB]");
  EXPECT_EQ(gpus[1].bus_id, "0000:82:00.0");
  EXPECT_EQ(gpus[1].numa_node, 1);

  // The BMC's VGA chip and the NVMe disk are neither.
  auto vga = topo_.find_device("card0");
  ASSERT_TRUE(vga.ok()) << vga.status();
  EXPECT_EQ(vga->kind, PciDeviceKind::kOther);
  EXPECT_EQ(topo_.find_device("nvme0n1")->kind, PciDeviceKind::kOther);

  auto ib = topo_.find_device("mlx5_0");
  ASSERT_TRUE(ib.ok()) << ib.status();
  EXPECT_EQ(ib->bus_id, "0000:17:00.0");
  EXPECT_EQ(ib->vendor_id, 0x15b3);
  EXPECT_EQ(ib->class_id, 0x0207);
  EXPECT_NEAR(ib->link_speed_gbytes_per_s, 31.5, 0.1);
  ASSERT_EQ(ib->os_devices.size(), 2u);
  EXPECT_EQ(ib->os_devices[0].name, "ib0");
  EXPECT_EQ(ib->os_devices[0].type, OsDeviceType::kNetwork);
  EXPECT_EQ(ib->os_devices[1].name, "mlx5_0");
  EXPECT_EQ(ib->os_devices[1].type, OsDeviceType::kOpenFabrics);
  EXPECT_EQ(topo_.find_device("cuda1")->os_devices[0].type, OsDeviceType::kCoprocessor);
  EXPECT_EQ(pci_device_kind_name(PciDeviceKind::kGpu), "gpu");
  EXPECT_EQ(os_device_type_name(OsDeviceType::kOpenFabrics), "openfabrics");
}

TEST(TopologyXmlErrors, MissingAndInvalidFiles) {
  auto missing = Topology::from_xml_file("/nonexistent/topology.xml");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);

  char path[] = "/tmp/myelin_topology_test_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  const char junk[] = "<?xml version=\"1.0\"?><not-a-topology/>";
  ASSERT_EQ(write(fd, junk, sizeof(junk) - 1), static_cast<ssize_t>(sizeof(junk) - 1));
  close(fd);
  auto bad = Topology::from_xml_file(path);
  unlink(path);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);

  auto dir = Topology::from_xml_file("/tmp");
  ASSERT_FALSE(dir.ok());
  EXPECT_EQ(dir.status().code(), StatusCode::kInvalidArgument);
}

TEST(TopologyDiscover, ConsistentWithThisMachine) {
  auto topo = Topology::discover();
  ASSERT_TRUE(topo.ok()) << topo.status();
  EXPECT_EQ(topo->source(), "discovered");
  ASSERT_FALSE(topo->numa_nodes().empty());
  ASSERT_FALSE(topo->cores().empty());
  // Every CPU this thread may use is in the topology and in exactly one NUMA node.
  auto allowed = current_thread_cpus();
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  EXPECT_EQ(*allowed, kernel_affinity());
  for (int cpu : *allowed) {
    EXPECT_TRUE(std::binary_search(topo->cpus().begin(), topo->cpus().end(), cpu)) << cpu;
    EXPECT_TRUE(topo->numa_node_of_cpu(cpu).ok()) << cpu;
  }
  size_t node_cpus = 0;
  for (const NumaNode& n : topo->numa_nodes()) node_cpus += n.cpus.size();
  EXPECT_EQ(node_cpus, topo->cpus().size());
  // The NUMA node hwloc gives each PCI device agrees with the kernel's, where the kernel knows.
  for (const PciDevice& d : topo->pci_devices()) {
    std::ifstream f("/sys/bus/pci/devices/" + d.bus_id + "/numa_node");
    int sysfs_node = -1;
    if (f >> sysfs_node && sysfs_node >= 0) {
      EXPECT_EQ(d.numa_node, sysfs_node) << d.bus_id;
    }
    if (d.numa_node != kUnknownNumaNode) {
      EXPECT_TRUE(topo->numa_node(d.numa_node).ok());
    }
  }
}

TEST(TopologyDiscover, LaterCallsReturnTheSameSnapshot) {
  auto a = Topology::discover();
  auto b = Topology::discover();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->cpus(), b->cpus());
  ASSERT_EQ(a->pci_devices().size(), b->pci_devices().size());
  for (size_t i = 0; i < a->pci_devices().size(); ++i) {
    EXPECT_EQ(a->pci_devices()[i].bus_id, b->pci_devices()[i].bus_id);
  }
}

TEST(Pinning, EachAllowedCpuChangesAffinity) {
  const std::vector<int> allowed = kernel_affinity();
  ASSERT_FALSE(allowed.empty());
  on_fresh_thread([&] {
    for (int cpu : allowed) {
      Status s = pin_current_thread_to_cpus({cpu});
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(kernel_affinity(), std::vector<int>{cpu});
      EXPECT_EQ(current_thread_cpus().value(), std::vector<int>{cpu});
    }
    Status all = pin_current_thread_to_cpus(allowed);
    ASSERT_TRUE(all.ok()) << all;
    EXPECT_EQ(kernel_affinity(), allowed);
  });
}

TEST(Pinning, RejectsBadCpus) {
  on_fresh_thread([] {
    const std::vector<int> before = kernel_affinity();
    EXPECT_EQ(pin_current_thread_to_cpus({-1}).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(pin_current_thread_to_cpus({CPU_SETSIZE}).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(pin_current_thread_to_cpus({}).code(), StatusCode::kInvalidArgument);
    const long configured = sysconf(_SC_NPROCESSORS_CONF);
    if (configured > 0 && configured < CPU_SETSIZE) {
      Status s = pin_current_thread_to_cpus({static_cast<int>(configured)});  // one past the last
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
      EXPECT_NE(s.message().find("offline"), std::string_view::npos) << s;
    }
    EXPECT_EQ(kernel_affinity(), before);  // a refused pin leaves the affinity alone
  });
}

TEST(Pinning, NumaNodeOfDiscoveredTopology) {
  auto topo = Topology::discover();
  ASSERT_TRUE(topo.ok()) << topo.status();
  const std::vector<int> allowed = kernel_affinity();
  for (const NumaNode& n : topo->numa_nodes()) {
    const std::vector<int> expected = intersect(n.cpus, allowed);
    if (expected.empty()) continue;  // a node outside this process's cpuset
    on_fresh_thread([&] {
      Status s = topo->pin_current_thread_to_numa_node(n.index);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(kernel_affinity(), expected) << "node " << n.index;
    });
  }
  EXPECT_EQ(topo->pin_current_thread_to_numa_node(4096).code(), StatusCode::kNotFound);
}

TEST(Pinning, NumaNodeOfForeignTopology) {
  // The fixture's node 1 holds CPUs 4-7,12-15: usable where this machine has them, refused with
  // a clear error where it has none of them.
  auto topo = Topology::from_xml_file(kFixture);
  ASSERT_TRUE(topo.ok()) << topo.status();
  const std::vector<int> expected =
      intersect(topo->cpus_of_numa_node(1).value(), kernel_affinity());
  on_fresh_thread([&] {
    Status s = topo->pin_current_thread_to_numa_node(1);
    if (expected.empty()) {
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
      EXPECT_NE(s.message().find("NUMA node 1"), std::string_view::npos) << s;
    } else {
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(kernel_affinity(), expected);
    }
  });
}

TEST(FormatCpuList, Ranges) {
  EXPECT_EQ(format_cpu_list({}), "");
  EXPECT_EQ(format_cpu_list({5}), "5");
  EXPECT_EQ(format_cpu_list({0, 1, 2, 3, 8, 10}), "0-3,8,10");
  EXPECT_EQ(format_cpu_list({0, 2, 3}), "0,2-3");
}

}  // namespace
}  // namespace myelin
