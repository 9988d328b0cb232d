// tools/myelin-bench/rdma_check.hpp — why `--transport verbs` cannot run here, in the words
// myelin-info uses. Its own file because <myelin/transport/devices.hpp> and
// <myelin/transport/context.hpp> cannot be included in one translation unit.
#pragma once

#include <string>

namespace myelin::bench_cli {

// Empty when at least one RDMA device opens; otherwise the reason (no verbs backend in this
// build, or no RDMA devices and why).
std::string why_no_rdma();

}  // namespace myelin::bench_cli
