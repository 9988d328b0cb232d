// Invariant check failures: print everything we know, then abort.
#include <myelin/core/check.hpp>

#include <unistd.h>

#include <cstdlib>
#include <string>

namespace myelin::internal {

CheckFailure::CheckFailure(const char* file, int line, const char* expr) {
  os_ << "myelin: check failed at " << file << ":" << line << ": " << expr << " ";
}

CheckFailure::CheckFailure(const char* file, int line, const char* expr,
                           const std::string& operands) {
  os_ << "myelin: check failed at " << file << ":" << line << ": " << expr << " " << operands
      << " ";
}

CheckFailure::~CheckFailure() {
  std::string text = os_.str();
  text += "\n";
  // One write so the message survives even if the abort races other output.
  [[maybe_unused]] ssize_t n = ::write(STDERR_FILENO, text.data(), text.size());
  std::abort();
}

}  // namespace myelin::internal
