// myelin/core/check.hpp
//
// Invariant checks. A failed check is a bug in myelin (or memory corruption), never bad input: bad
// input gets a Status. A failed check prints the file, line, expression, both operands of a
// comparison and an optional streamed message, then aborts.
//
//   MYELIN_CHECK(ring.capacity() > 0) << "ring " << name;
//   MYELIN_CHECK_EQ(header->magic, kMagic);
//   MYELIN_DCHECK_LT(index, size);   // compiled out in NDEBUG builds
//
// Thread safety: may be used from any thread.
#pragma once

#include <sstream>
#include <string>

namespace myelin::internal {

// Collects the message of a failed check and aborts in its destructor.
class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* expr);
  CheckFailure(const char* file, int line, const char* expr, const std::string& operands);
  CheckFailure(const CheckFailure&) = delete;
  CheckFailure& operator=(const CheckFailure&) = delete;
  [[noreturn]] ~CheckFailure();
  std::ostream& stream() { return os_; }

 private:
  std::ostringstream os_;
};

// Makes `MYELIN_CHECK(x) << ...;` a single expression whose stream is only built on failure.
struct CheckVoidify {
  void operator&(std::ostream&) {}
};

template <typename A, typename B>
std::string format_operands(const A& a, const B& b) {
  std::ostringstream os;
  os << "(" << a << " vs. " << b << ")";
  return os.str();
}

}  // namespace myelin::internal

#define MYELIN_CHECK(cond)                       \
  (__builtin_expect(static_cast<bool>(cond), 1)) \
      ? (void)0                                  \
      : ::myelin::internal::CheckVoidify() &     \
            ::myelin::internal::CheckFailure(__FILE__, __LINE__, #cond).stream()

#define MYELIN_CHECK_OP(a, b, op)                                                   \
  for (bool myelin_check_ok_ = true; myelin_check_ok_; myelin_check_ok_ = false)    \
    for (const auto& myelin_a_ = (a); myelin_check_ok_; myelin_check_ok_ = false)   \
      for (const auto& myelin_b_ = (b); myelin_check_ok_; myelin_check_ok_ = false) \
        if (__builtin_expect(static_cast<bool>(myelin_a_ op myelin_b_), 1)) {       \
        } else                                                                      \
          ::myelin::internal::CheckFailure(                                         \
              __FILE__, __LINE__, #a " " #op " " #b,                                \
              ::myelin::internal::format_operands(myelin_a_, myelin_b_))            \
              .stream()

#define MYELIN_CHECK_EQ(a, b) MYELIN_CHECK_OP(a, b, ==)
#define MYELIN_CHECK_NE(a, b) MYELIN_CHECK_OP(a, b, !=)
#define MYELIN_CHECK_LT(a, b) MYELIN_CHECK_OP(a, b, <)
#define MYELIN_CHECK_LE(a, b) MYELIN_CHECK_OP(a, b, <=)
#define MYELIN_CHECK_GT(a, b) MYELIN_CHECK_OP(a, b, >)
#define MYELIN_CHECK_GE(a, b) MYELIN_CHECK_OP(a, b, >=)

#ifdef NDEBUG
#define MYELIN_DCHECK(cond) \
  while (false) MYELIN_CHECK(cond)
#define MYELIN_DCHECK_OP(a, b, op) \
  while (false) MYELIN_CHECK_OP(a, b, op)
#else
#define MYELIN_DCHECK(cond) MYELIN_CHECK(cond)
#define MYELIN_DCHECK_OP(a, b, op) MYELIN_CHECK_OP(a, b, op)
#endif
#define MYELIN_DCHECK_EQ(a, b) MYELIN_DCHECK_OP(a, b, ==)
#define MYELIN_DCHECK_NE(a, b) MYELIN_DCHECK_OP(a, b, !=)
#define MYELIN_DCHECK_LT(a, b) MYELIN_DCHECK_OP(a, b, <)
#define MYELIN_DCHECK_LE(a, b) MYELIN_DCHECK_OP(a, b, <=)
#define MYELIN_DCHECK_GT(a, b) MYELIN_DCHECK_OP(a, b, >)
#define MYELIN_DCHECK_GE(a, b) MYELIN_DCHECK_OP(a, b, >=)
