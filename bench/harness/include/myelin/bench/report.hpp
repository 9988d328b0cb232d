// myelin/bench/report.hpp — one description of a result row, three renderings: the human table
// (perftest / nccl-tests style, right-aligned columns under a `#`-prefixed heading), JSON lines
// (one object per row, keys in column order) and CSV (a key line, then one line per row).
//
//   Report r(std::cout, Format::kTable, {{"size", "size(B)", 12, 0}, {"p50_us", "p50(us)", 9, 2}});
//   r.begin();
//   r.row({uint64_t{64}, 1.25});
//
// Columns whose `title` is empty appear in JSON and CSV only (e.g. "bench", "transport", which the
// table states once in its header). A row must hold one value per column (checked: a mismatch is
// a programming error and aborts).
//
// Thread safety: none. Ownership: the stream is borrowed and must outlive the Report.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <myelin/core/status.hpp>

namespace myelin::bench {

enum class Format : uint8_t { kTable, kJson, kCsv };

struct Column {
  std::string key;    // JSON / CSV name ("p50_us")
  std::string title;  // table heading ("p50(us)"); empty: not shown in the table
  int width = 10;     // table width
  int precision = 2;  // digits after the point for doubles in the table (JSON/CSV keep more)
};

using Value = std::variant<uint64_t, double, std::string>;

class Report {
 public:
  Report(std::ostream& out, Format format, std::vector<Column> columns);

  // Table: the heading line ("#" + titles); CSV: the key line; JSON: nothing.
  void begin();
  // One result; flushed at once so a long sweep shows its rows as they come.
  void row(const std::vector<Value>& values);
  // A "# ..." line in the table; nothing in JSON and CSV (they stay machine-readable).
  void comment(std::string_view text);

  [[nodiscard]] Format format() const noexcept { return format_; }
  [[nodiscard]] const std::vector<Column>& columns() const noexcept { return columns_; }

 private:
  std::ostream& out_;
  Format format_;
  std::vector<Column> columns_;
};

// JSON string literal (quotes included) with ", \ and control characters escaped.
std::string json_quote(std::string_view s);
// A finite double with enough digits to read back the figure ("1.2345"); "null" if not finite.
std::string json_number(double v);

}  // namespace myelin::bench
