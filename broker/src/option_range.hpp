// Range check shared by the server's and the client's option validation.
#pragma once

#include <cstdint>
#include <type_traits>

#include <myelin/core/status.hpp>

namespace myelin::broker::internal {

// ok, or invalid_argument naming the option, its value and the bounds (inclusive), so that a
// configuration error names its key. Compared as int64_t or uint64_t by the value's signedness:
// every option's type converts without loss.
template <typename V, typename L, typename H>
Status check_range(const char* name, V v, L lo, H hi) {
  using C = std::conditional_t<std::is_signed_v<V>, int64_t, uint64_t>;
  if (static_cast<C>(v) < static_cast<C>(lo) || static_cast<C>(v) > static_cast<C>(hi)) {
    return invalid_argument(name, " ", v, " outside ", lo, " .. ", hi);
  }
  return ok_status();
}

}  // namespace myelin::broker::internal
