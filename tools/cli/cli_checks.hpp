// tools/cli/cli_checks.hpp — option checks shared by the command-line tools (CLI11 validators).
//
// Each check runs on the option's text before CLI11 converts it, so "-1" is refused before it can
// wrap into an unsigned option, "nan" and "inf" never reach a float option, and the bounds in the
// messages are short ("[1, 100000000]", not DBL_MAX's 309 digits). A failed check is a usage error
// like any other CLI11 error.
//
// Thread safety: none needed (used while parsing the command line).
#pragma once

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <CLI/CLI.hpp>

namespace myelin::tools {

// The longest timeout, grace period or duration any tool accepts, in seconds (10^7 s, about 116
// days). Larger values are refused: "effectively never" is 0 where a tool documents 0 as "none".
inline constexpr double kMaxTimeoutSeconds = 1e7;

// A bound as people write it: "0", "0.5", "1e+07".
inline std::string readable_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

// A finite number in [lo, hi]; (lo, hi] when `lo_open`.
inline CLI::Validator finite_number(double lo, double hi, bool lo_open = false) {
  const std::string range =
      std::string(lo_open ? "(" : "[") + readable_number(lo) + ", " + readable_number(hi) + "]";
  return CLI::Validator(
      [lo, hi, lo_open, range](std::string& text) -> std::string {
        const char* begin = text.c_str();
        char* end = nullptr;
        errno = 0;
        const double v = std::strtod(begin, &end);
        if (text.empty() || end == begin || *end != '\0') return "'" + text + "' is not a number";
        if (!std::isfinite(v) || errno == ERANGE) {
          return "'" + text + "' is not a finite number in " + range;
        }
        if (v < lo || (lo_open && v == lo) || v > hi) return text + " is not in " + range;
        return {};
      },
      "NUMBER in " + range);
}

// An integer in [lo, hi], written in decimal.
inline CLI::Validator integer_in(long long lo, long long hi) {
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return CLI::Validator(
      [lo, hi, range](std::string& text) -> std::string {
        long long v = 0;
        const char* end = text.data() + text.size();
        const auto [ptr, ec] = std::from_chars(text.data(), end, v);
        if (ec == std::errc::result_out_of_range) return text + " is not in " + range;
        if (ec != std::errc() || ptr != end) return "'" + text + "' is not an integer";
        if (v < lo || v > hi) return text + " is not in " + range;
        return {};
      },
      "INTEGER in " + range);
}

// Any text but the empty one.
inline CLI::Validator non_empty() {
  return CLI::Validator(
      [](std::string& text) -> std::string { return text.empty() ? "must not be empty" : ""; },
      "NOT EMPTY");
}

}  // namespace myelin::tools
