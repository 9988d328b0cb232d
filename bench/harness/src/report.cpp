// Rendering of benchmark rows as a table, JSON lines or CSV.
#include <myelin/bench/report.hpp>

#include <cmath>
#include <cstdio>

#include <myelin/core/check.hpp>

namespace myelin::bench {

namespace {
std::string plain(const Value& v) {
  if (const auto* u = std::get_if<uint64_t>(&v)) return std::to_string(*u);
  if (const auto* d = std::get_if<double>(&v)) return json_number(*d);
  return std::get<std::string>(v);
}
std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}
}  // namespace

std::string json_quote(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  // Six significant digits (small figures such as GB/s of 8-byte messages keep theirs); large
  // ones in plain notation with one decimal.
  if (std::fabs(v) >= 1e5) {
    std::snprintf(buf, sizeof(buf), "%.1f", v);
  } else {
    std::snprintf(buf, sizeof(buf), "%.6g", v);
  }
  return buf;
}

Report::Report(std::ostream& out, Format format, std::vector<Column> columns)
    : out_(out), format_(format), columns_(std::move(columns)) {}

void Report::begin() {
  if (format_ == Format::kJson) return;
  std::string line;
  if (format_ == Format::kCsv) {
    for (size_t i = 0; i < columns_.size(); ++i) line += (i ? "," : "") + columns_[i].key;
  } else {
    bool first = true;
    for (const Column& c : columns_) {
      if (c.title.empty()) continue;
      // The first column gives up one character to the leading '#'.
      const int width = first ? c.width - 1 : c.width;
      char buf[128];
      std::snprintf(buf, sizeof(buf), "%s%*s", first ? "#" : " ", width, c.title.c_str());
      line += buf;
      first = false;
    }
  }
  out_ << line << '\n';
  out_.flush();
}

void Report::row(const std::vector<Value>& values) {
  MYELIN_CHECK_EQ(values.size(), columns_.size())
      << "report row for " << columns_.size() << " columns";
  std::string line;
  if (format_ == Format::kJson) {
    line = "{";
    for (size_t i = 0; i < columns_.size(); ++i) {
      if (i) line += ',';
      line += json_quote(columns_[i].key) + ':';
      const Value& v = values[i];
      line +=
          std::holds_alternative<std::string>(v) ? json_quote(std::get<std::string>(v)) : plain(v);
    }
    line += '}';
  } else if (format_ == Format::kCsv) {
    for (size_t i = 0; i < columns_.size(); ++i) {
      if (i) line += ',';
      line += csv_field(plain(values[i]));
    }
  } else {
    bool first = true;
    for (size_t i = 0; i < columns_.size(); ++i) {
      const Column& c = columns_[i];
      if (c.title.empty()) continue;
      char buf[128];
      const Value& v = values[i];
      if (const auto* u = std::get_if<uint64_t>(&v)) {
        std::snprintf(buf, sizeof(buf), "%*llu", c.width, static_cast<unsigned long long>(*u));
      } else if (const auto* d = std::get_if<double>(&v)) {
        std::snprintf(buf, sizeof(buf), "%*.*f", c.width, c.precision, *d);
      } else {
        std::snprintf(buf, sizeof(buf), "%*s", c.width, std::get<std::string>(v).c_str());
      }
      if (!first) line += ' ';
      line += buf;
      first = false;
    }
  }
  out_ << line << '\n';
  out_.flush();
}

void Report::comment(std::string_view text) {
  if (format_ != Format::kTable) return;
  out_ << "# " << text << '\n';
  out_.flush();
}

}  // namespace myelin::bench
