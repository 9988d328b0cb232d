// libFuzzer entry point for fuzz_http (see fuzz_targets.hpp).
#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  myelin::broker::fuzz::fuzz_http(data, size);
  return 0;
}
