// libFuzzer entry point for fuzz_batch (see fuzz_targets.hpp).
#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  myelin::broker::fuzz::fuzz_batch(data, size);
  return 0;
}
