// The logger: one write(2) per line, level from options with MYELIN_LOG_LEVEL as an overlay.
#include <myelin/core/log.hpp>

#include <sys/syscall.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <string>

#include <myelin/core/clock.hpp>

namespace myelin {
namespace internal {
std::atomic<int> g_log_level{static_cast<int>(LogLevel::kWarn)};

namespace {
std::once_flag g_env_once;
std::mutex g_tag_mu;
std::string g_tag;  // guarded by g_tag_mu

const char* base_name(const char* path) {
  const char* slash = path;
  for (const char* p = path; *p; ++p) {
    if (*p == '/') slash = p + 1;
  }
  return slash;
}
}  // namespace

void init_log_level_once() noexcept {
  std::call_once(g_env_once, [] {
    if (const char* env = std::getenv("MYELIN_LOG_LEVEL")) {
      if (auto level = parse_log_level(env)) {
        g_log_level.store(static_cast<int>(*level), std::memory_order_relaxed);
      }
    }
  });
}

LogLine::LogLine(LogLevel level, const char* file, int line) : level_(level) {
  const int64_t now = realtime_ns();
  const time_t secs = static_cast<time_t>(now / 1'000'000'000);
  tm utc;
  gmtime_r(&secs, &utc);
  char stamp[64];
  const size_t n = strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &utc);
  snprintf(stamp + n, sizeof(stamp) - n, ".%06ldZ",
           static_cast<long>((now % 1'000'000'000) / 1000));
  static constexpr char kLetters[] = "TDIWE";
  os_ << stamp << ' ' << kLetters[static_cast<int>(level)] << " myelin[" << ::getpid() << ':'
      << ::syscall(SYS_gettid) << ']';
  {
    std::lock_guard<std::mutex> lock(g_tag_mu);
    if (!g_tag.empty()) os_ << ' ' << g_tag;
  }
  os_ << ' ' << base_name(file) << ':' << line << "] ";
}

LogLine::~LogLine() {
  (void)level_;
  std::string text = os_.str();
  text += '\n';
  [[maybe_unused]] ssize_t n = ::write(STDERR_FILENO, text.data(), text.size());
}
}  // namespace internal

std::optional<LogLevel> parse_log_level(std::string_view text) noexcept {
  std::string lower;
  for (char c : text)
    lower.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  if (lower == "trace") return LogLevel::kTrace;
  if (lower == "debug") return LogLevel::kDebug;
  if (lower == "info") return LogLevel::kInfo;
  if (lower == "warn" || lower == "warning") return LogLevel::kWarn;
  if (lower == "error") return LogLevel::kError;
  if (lower == "off" || lower == "none") return LogLevel::kOff;
  return std::nullopt;
}

std::string_view log_level_name(LogLevel level) noexcept {
  switch (level) {
    case LogLevel::kTrace:
      return "trace";
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
    case LogLevel::kOff:
      return "off";
  }
  return "unknown";
}

void set_log_level(LogLevel level) noexcept {
  internal::init_log_level_once();  // so a later first use does not overwrite this with the env
  internal::g_log_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

LogLevel log_level() noexcept {
  internal::init_log_level_once();
  return static_cast<LogLevel>(internal::g_log_level.load(std::memory_order_relaxed));
}

void set_log_tag(std::string_view tag) {
  std::lock_guard<std::mutex> lock(internal::g_tag_mu);
  internal::g_tag.assign(tag);
}

}  // namespace myelin
