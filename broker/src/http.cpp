// The one HTTP parser: request heads from /metrics and /healthz scrapers (bytes from a peer).
#include <myelin/broker/server.hpp>

namespace myelin::broker {
namespace {
constexpr size_t kMaxHttpHead = 8192;
}  // namespace

Result<bool> parse_http_get(std::string_view head, std::string* path) {
  const size_t end = head.find("\r\n\r\n");
  if (end == std::string_view::npos) {
    if (head.size() > kMaxHttpHead)
      return protocol_error("HTTP request head over ", kMaxHttpHead, " bytes");
    return false;
  }
  const size_t eol = head.find("\r\n");
  const std::string_view line = head.substr(0, eol);
  const size_t sp1 = line.find(' ');
  if (sp1 == std::string_view::npos) return protocol_error("malformed HTTP request line");
  const size_t sp2 = line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos) return protocol_error("malformed HTTP request line");
  const std::string_view method = line.substr(0, sp1);
  const std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const std::string_view version = line.substr(sp2 + 1);
  if (version != "HTTP/1.0" && version != "HTTP/1.1")
    return protocol_error("unsupported HTTP version");
  if (target.empty() || target[0] != '/') return protocol_error("bad HTTP target");
  for (char c : target) {
    if (c <= 0x20 || c >= 0x7f) return protocol_error("bad character in HTTP target");
  }
  if (method != "GET") return unsupported("HTTP method '", method, "'");
  const size_t q = target.find('?');
  *path = std::string(target.substr(0, q));
  return true;
}

}  // namespace myelin::broker
