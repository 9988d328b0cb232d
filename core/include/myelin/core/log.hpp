// myelin/core/log.hpp
//
// A small leveled logger writing single lines to stderr:
//   2026-11-26T02:53:41.123456Z W myelin[1234] rank 3 tcp.cpp:88] closing connection: bad magic
//
// The level comes from set_log_level() (Options structs call it) and, as an overlay read once at
// first use, the environment variable MYELIN_LOG_LEVEL = trace|debug|info|warn|error|off. The
// default is warn so a healthy job prints nothing. A disabled level costs one relaxed atomic load.
//
// Thread safety: every function may be called from any thread; a line is written with one
// write(2) so lines from several threads or processes never interleave.
#pragma once

#include <atomic>
#include <optional>
#include <sstream>
#include <string_view>

namespace myelin {

enum class LogLevel : int { kTrace = 0, kDebug, kInfo, kWarn, kError, kOff };

// Parses "trace", "debug", "info", "warn"/"warning", "error", "off" (case-insensitive).
std::optional<LogLevel> parse_log_level(std::string_view text) noexcept;
std::string_view log_level_name(LogLevel level) noexcept;

void set_log_level(LogLevel level) noexcept;
LogLevel log_level() noexcept;
// A tag printed on every line after the pid, e.g. "rank 3"; empty for none.
void set_log_tag(std::string_view tag);

namespace internal {
extern std::atomic<int> g_log_level;  // pairs with nothing: a plain flag, relaxed everywhere
void init_log_level_once() noexcept;
inline bool log_enabled(LogLevel level) noexcept {
  init_log_level_once();
  return static_cast<int>(level) >= g_log_level.load(std::memory_order_relaxed);
}

class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  LogLine(const LogLine&) = delete;
  LogLine& operator=(const LogLine&) = delete;
  ~LogLine();
  std::ostream& stream() { return os_; }

 private:
  LogLevel level_;
  std::ostringstream os_;
};

struct LogVoidify {
  void operator&(std::ostream&) {}
};
}  // namespace internal
}  // namespace myelin

#define MYELIN_LOG(level)                                     \
  !::myelin::internal::log_enabled(::myelin::LogLevel::level) \
      ? (void)0                                               \
      : ::myelin::internal::LogVoidify() &                    \
            ::myelin::internal::LogLine(::myelin::LogLevel::level, __FILE__, __LINE__).stream()

#define MYELIN_LOG_TRACE MYELIN_LOG(kTrace)
#define MYELIN_LOG_DEBUG MYELIN_LOG(kDebug)
#define MYELIN_LOG_INFO MYELIN_LOG(kInfo)
#define MYELIN_LOG_WARN MYELIN_LOG(kWarn)
#define MYELIN_LOG_ERROR MYELIN_LOG(kError)
