// myelin-info: what myelin sees on this machine — topology, RDMA devices and ports, UCX
// transports — and which backend `auto` would pick for a peer on this node and on another node.
//
//   myelin-info                     human-readable report
//   myelin-info --json              the same as one JSON object (keys myelin, topology, rdma, ucx,
//                                   backend)
//   myelin-info --topology-xml F    read the topology from an hwloc XML export instead
//   myelin-info --synthetic DESC    or from an hwloc synthetic description
//
// Exit status: 0 on success, 1 when the topology cannot be read, 2 on a usage error.

#include <myelin/config.hpp>
#include <myelin/core/topology.hpp>
#include <myelin/transport/devices.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli_checks.hpp"

#include <cstdio>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>

namespace {

using myelin::Topology;
using myelin::transport::BackendChoice;
using myelin::transport::DeviceReport;
using nlohmann::json;

std::string hex4(unsigned v) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "%04x", v & 0xffffu);
  return buf;
}

std::string gib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f GiB", static_cast<double>(bytes) / (1ull << 30));
  return buf;
}

std::string plural(size_t n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

json numa_json(int node) {
  return node == myelin::kUnknownNumaNode ? json(nullptr) : json(node);
}

json topology_json(const Topology& t) {
  json j;
  j["source"] = t.source();
  j["host"] = t.host_name();
  j["packages"] = t.package_count();
  j["cpus"] = t.cpus();
  j["cpu_list"] = myelin::format_cpu_list(t.cpus());
  j["numa_nodes"] = json::array();
  for (const myelin::NumaNode& n : t.numa_nodes()) {
    j["numa_nodes"].push_back({{"index", n.index},
                               {"cpus", n.cpus},
                               {"cpu_list", myelin::format_cpu_list(n.cpus)},
                               {"memory_bytes", n.memory_bytes}});
  }
  j["cores"] = json::array();
  for (const myelin::Core& c : t.cores()) {
    j["cores"].push_back({{"index", c.index},
                          {"package", c.package},
                          {"numa_node", numa_json(c.numa_node)},
                          {"cpus", c.cpus}});
  }
  j["pci_devices"] = json::array();
  for (const myelin::PciDevice& d : t.pci_devices()) {
    json os = json::array();
    for (const myelin::OsDevice& o : d.os_devices) {
      os.push_back({{"name", o.name}, {"type", std::string(myelin::os_device_type_name(o.type))}});
    }
    j["pci_devices"].push_back({{"bus_id", d.bus_id},
                                {"kind", std::string(myelin::pci_device_kind_name(d.kind))},
                                {"vendor_id", "0x" + hex4(d.vendor_id)},
                                {"device_id", "0x" + hex4(d.device_id)},
                                {"class_id", "0x" + hex4(d.class_id)},
                                {"vendor_name", d.vendor_name},
                                {"device_name", d.device_name},
                                {"link_speed_gbytes_per_s", d.link_speed_gbytes_per_s},
                                {"numa_node", numa_json(d.numa_node)},
                                {"os_devices", os}});
  }
  return j;
}

json rdma_json(const myelin::transport::RdmaReport& r) {
  json j;
  j["compiled_in"] = r.compiled_in;
  j["absent_reason"] = r.devices.empty() ? json(r.absent_reason) : json(nullptr);
  j["has_active_port"] = r.has_active_port();
  j["devices"] = json::array();
  for (const auto& d : r.devices) {
    json ports = json::array();
    for (const auto& p : d.ports) {
      json gids = json::array();
      for (const auto& g : p.gids) {
        gids.push_back(
            {{"index", g.index}, {"gid", g.gid}, {"type", g.type}, {"netdev", g.netdev}});
      }
      ports.push_back({{"port", p.port},
                       {"state", p.state},
                       {"active", p.active},
                       {"link_layer", p.link_layer},
                       {"active_mtu", p.active_mtu},
                       {"max_mtu", p.max_mtu},
                       {"lanes", p.lanes},
                       {"lane_gbps", p.lane_gbps},
                       {"speed_gbps", p.speed_gbps},
                       {"lid", p.lid},
                       {"gids", gids},
                       {"error", p.error.empty() ? json(nullptr) : json(p.error)}});
    }
    j["devices"].push_back({{"name", d.name},
                            {"node_guid", d.node_guid},
                            {"transport", d.transport},
                            {"numa_node", numa_json(d.numa_node)},
                            {"ports", ports},
                            {"error", d.error.empty() ? json(nullptr) : json(d.error)}});
  }
  return j;
}

json ucx_json(const myelin::transport::UcxReport& u) {
  json j;
  j["compiled_in"] = u.compiled_in;
  j["version"] = u.compiled_in ? json(u.version) : json(nullptr);
  j["transports"] = u.transport_names();
  j["has_network_transport"] = u.has_network_transport();
  j["resources"] = json::array();
  for (const auto& r : u.resources) {
    j["resources"].push_back({{"component", r.component},
                              {"md", r.md},
                              {"transport", r.transport},
                              {"device", r.device},
                              {"type", r.type}});
  }
  j["error"] = u.error.empty() ? json(nullptr) : json(u.error);
  return j;
}

json choice_json(const BackendChoice& c) {
  return {{"backend", std::string(myelin::transport::backend_name(c.backend))},
          {"reason", c.reason}};
}

void print_topology(std::ostream& os, const Topology& t) {
  os << "Topology (" << t.source();
  if (!t.host_name().empty()) os << ", host " << t.host_name();
  os << ")\n";
  os << "  " << plural(static_cast<size_t>(t.package_count()), "package", "packages") << ", "
     << plural(t.numa_nodes().size(), "NUMA node", "NUMA nodes") << ", "
     << plural(t.cores().size(), "core", "cores") << ", " << plural(t.cpus().size(), "CPU", "CPUs")
     << "\n";
  for (const myelin::NumaNode& n : t.numa_nodes()) {
    os << "  NUMA node " << n.index << ": CPUs " << myelin::format_cpu_list(n.cpus);
    if (n.memory_bytes > 0) os << ", " << gib(n.memory_bytes);
    os << "\n";
  }
  if (t.pci_devices().empty()) {
    os << "  no PCI devices in this topology\n";
    return;
  }
  os << "  PCI devices (bus id, kind, vendor:device, NUMA node, OS devices):\n";
  for (const myelin::PciDevice& d : t.pci_devices()) {
    std::string kind(myelin::pci_device_kind_name(d.kind));
    kind.resize(7, ' ');
    os << "    " << d.bus_id << "  " << kind << hex4(d.vendor_id) << ":" << hex4(d.device_id)
       << "  node "
       << (d.numa_node == myelin::kUnknownNumaNode ? std::string("?") : std::to_string(d.numa_node))
       << " ";
    for (const myelin::OsDevice& o : d.os_devices) os << " " << o.name;
    if (!d.device_name.empty()) os << "  [" << d.device_name << "]";
    os << "\n";
  }
}

void print_rdma(std::ostream& os, const myelin::transport::RdmaReport& r) {
  os << "RDMA devices (libibverbs" << (r.compiled_in ? "" : ", not compiled in") << ")\n";
  if (r.devices.empty()) {
    os << "  no RDMA devices: " << r.absent_reason << "\n";
    return;
  }
  for (const auto& d : r.devices) {
    os << "  " << d.name << "  " << d.transport << "  node GUID " << d.node_guid << "  NUMA node "
       << (d.numa_node < 0 ? std::string("?") : std::to_string(d.numa_node)) << "\n";
    if (!d.error.empty()) os << "    error: " << d.error << "\n";
    for (const auto& p : d.ports) {
      os << "    port " << p.port << ": ";
      if (!p.state.empty()) {
        char speed[64];
        std::snprintf(speed, sizeof(speed), "%dx %g Gb/s = %g Gb/s", p.lanes, p.lane_gbps,
                      p.speed_gbps);
        os << p.state << ", " << p.link_layer << ", MTU " << p.active_mtu << " (max " << p.max_mtu
           << "), " << (p.speed_gbps > 0 ? speed : "speed unknown");
        if (p.lid != 0) os << ", LID " << p.lid;
      }
      if (!p.error.empty()) os << (p.state.empty() ? "" : "; ") << "error: " << p.error;
      os << "\n";
      for (const auto& g : p.gids) {
        os << "      GID " << g.index << "  " << g.gid << "  " << g.type;
        if (!g.netdev.empty()) os << "  " << g.netdev;
        os << "\n";
      }
    }
  }
}

void print_ucx(std::ostream& os, const myelin::transport::UcxReport& u) {
  if (!u.compiled_in) {
    os << "UCX: " << u.error << "\n";
    return;
  }
  os << "UCX " << u.version << "\n";
  std::string names;
  for (const std::string& n : u.transport_names()) names += (names.empty() ? "" : ", ") + n;
  os << "  transports: " << (names.empty() ? "none" : names) << "\n";
  for (const auto& r : u.resources) {
    std::string tl = r.transport;
    std::string dev = r.device;
    tl.resize(std::max<size_t>(tl.size(), 10), ' ');
    dev.resize(std::max<size_t>(dev.size(), 10), ' ');
    os << "    " << tl << dev << r.type << "  (component " << r.component << ", md " << r.md
       << ")\n";
  }
  if (!u.error.empty()) {
    std::istringstream lines(u.error);
    for (std::string line; std::getline(lines, line);) os << "  error: " << line << "\n";
  }
}

void print_choice(std::ostream& os, const char* label, const BackendChoice& c) {
  os << "  " << label << myelin::transport::backend_name(c.backend) << " — " << c.reason << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"myelin-info: topology, RDMA devices, UCX transports and the backend `auto` picks"};
  bool as_json = false;
  std::string xml_path;
  std::string synthetic;
  app.add_flag("--json", as_json, "print one JSON object instead of the human report");
  // An empty value is refused: it would quietly describe this machine instead.
  auto* xml_opt = app.add_option("--topology-xml", xml_path,
                                 "read the topology from an hwloc XML export (lstopo --of xml)")
                      ->check(myelin::tools::non_empty());
  app.add_option("--synthetic", synthetic,
                 "use an hwloc synthetic topology, e.g. \"pack:2 numa:1 core:8 pu:2\"")
      ->excludes(xml_opt)
      ->check(myelin::tools::non_empty());
  app.set_version_flag("--version", MYELIN_VERSION_STRING);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "myelin-info: " << e.what() << "\n\n" << app.help();
    return 2;
  }

  std::optional<Topology> topology;
  std::string topology_error;
  {
    auto t = !xml_path.empty()    ? Topology::from_xml_file(xml_path)
             : !synthetic.empty() ? Topology::from_synthetic(synthetic)
                                  : Topology::discover();
    if (t.ok()) {
      topology = std::move(t).value();
    } else {
      topology_error = t.status().to_string();
    }
  }
  const DeviceReport devices = myelin::transport::probe_devices();
  const BackendChoice same_node = myelin::transport::choose_backend(devices, true);
  const BackendChoice remote = myelin::transport::choose_backend(devices, false);

  if (as_json) {
    json j;
    j["myelin"] = {{"version", MYELIN_VERSION_STRING},
                   {"build_type", MYELIN_BUILD_TYPE},
                   {"verbs_compiled_in", MYELIN_HAVE_VERBS != 0},
                   {"ucx_compiled_in", MYELIN_HAVE_UCX != 0}};
    j["topology"] = topology ? topology_json(*topology) : json{{"error", topology_error}};
    j["rdma"] = rdma_json(devices.rdma);
    j["ucx"] = ucx_json(devices.ucx);
    j["backend"] = {{"same_node", choice_json(same_node)}, {"remote", choice_json(remote)}};
    std::cout << j.dump(2) << "\n";
  } else {
    std::ostream& os = std::cout;
    os << "myelin-info " << MYELIN_VERSION_STRING << " (" << MYELIN_BUILD_TYPE
       << " build; verbs backend " << (MYELIN_HAVE_VERBS ? "compiled in" : "not compiled in")
       << ", ucx backend " << (MYELIN_HAVE_UCX ? "compiled in" : "not compiled in") << ")\n\n";
    if (topology) {
      print_topology(os, *topology);
    } else {
      os << "Topology\n  error: " << topology_error << "\n";
    }
    os << "\n";
    print_rdma(os, devices.rdma);
    os << "\n";
    print_ucx(os, devices.ucx);
    os << "\nBackend `auto` would pick\n";
    print_choice(os, "same-node peer: ", same_node);
    print_choice(os, "remote peer:    ", remote);
  }
  if (!topology) {
    std::cerr << "myelin-info: cannot read the topology: " << topology_error << "\n";
    return 1;
  }
  return 0;
}
