#include <myelin/broker/secret.hpp>

#include <myelin/core/file.hpp>

namespace myelin::broker {

Result<std::string> parse_secret_text(std::string_view text, std::string_view path) {
  const size_t eol = text.find('\n');
  std::string_view first = text.substr(0, eol);
  if (!first.empty() && first.back() == '\r') first.remove_suffix(1);
  if (eol != std::string_view::npos) {
    const std::string_view rest = text.substr(eol + 1);
    if (rest.find_first_not_of("\r\n") != std::string_view::npos) {
      return invalid_argument("secret file '", path,
                              "' has more than one line (the secret is its first line alone)");
    }
  }
  if (first.size() < kMinSecretBytes) {
    return invalid_argument("secret file '", path, "': the job secret holds ", first.size(),
                            " bytes; it must be at least ", kMinSecretBytes);
  }
  return std::string(first);
}

Result<std::string> read_secret_file(const std::string& path) {
  MYELIN_ASSIGN_OR_RETURN(std::string text,
                          read_regular_file(path, kMaxSecretFileBytes, "secret file"));
  return parse_secret_text(text, path);
}

}  // namespace myelin::broker
