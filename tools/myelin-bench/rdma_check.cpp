#include "rdma_check.hpp"

#include <myelin/transport/devices.hpp>

namespace myelin::bench_cli {

std::string why_no_rdma() {
  const transport::RdmaReport rdma = transport::probe_rdma_devices();
  if (!rdma.compiled_in) return "this build of myelin has no verbs backend";
  if (rdma.devices.empty()) return "no RDMA devices: " + rdma.absent_reason;
  return {};
}

}  // namespace myelin::bench_cli
