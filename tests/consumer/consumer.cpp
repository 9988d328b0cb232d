// Built against the installed myelin: proves headers, libraries and the CMake/pkg-config files.
#include <myelin/config.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

#include <cstdio>

int main() {
  myelin::Result<int> r = myelin::invalid_argument("installed tree works");
  if (r.ok() || r.status().code() != myelin::StatusCode::kInvalidArgument) return 1;
  if (myelin::Deadline::after_ms(1000).expired()) return 1;
  std::printf("myelin %s consumer ok\n", MYELIN_VERSION_STRING);
  return 0;
}
