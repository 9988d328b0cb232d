#include "auth.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <vector>

namespace myelin::broker::internal {
namespace {
// HMAC(secret, label a b [token session_le64] identity).
Mac hmac(std::string_view secret, std::string_view label, const Nonce& a, const Nonce& b,
         std::string_view identity, const Token* token = nullptr, uint64_t session = 0) {
  std::vector<unsigned char> msg;
  msg.insert(msg.end(), label.begin(), label.end());
  for (std::byte x : a) msg.push_back(std::to_integer<unsigned char>(x));
  for (std::byte x : b) msg.push_back(std::to_integer<unsigned char>(x));
  if (token) {
    for (std::byte x : *token) msg.push_back(std::to_integer<unsigned char>(x));
    for (int i = 0; i < 8; ++i) msg.push_back(static_cast<unsigned char>(session >> (8 * i)));
  }
  msg.insert(msg.end(), identity.begin(), identity.end());
  Mac out{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), msg.data(), msg.size(),
       reinterpret_cast<unsigned char*>(out.data()), &len);
  return out;
}
}  // namespace

Result<Nonce> random_nonce() {
  Nonce n;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(n.data()), static_cast<int>(n.size())) != 1) {
    return internal_error("RAND_bytes failed");
  }
  return n;
}

Mac client_mac(std::string_view secret, const Nonce& sn, const Nonce& cn, std::string_view id) {
  return hmac(secret, "myelin/c", sn, cn, id);
}
Mac server_proof(std::string_view secret, const Nonce& sn, const Nonce& cn, std::string_view id,
                 const Token* token, uint64_t session) {
  return hmac(secret, "myelin/s", cn, sn, id, token, session);
}
Result<Token> random_token() {
  Token t;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(t.data()), static_cast<int>(t.size())) != 1) {
    return internal_error("RAND_bytes failed");
  }
  return t;
}
Mac attach_mac(std::string_view secret, const Nonce& sn, const Nonce& cn, const Token& token,
               uint64_t session, std::string_view id) {
  return hmac(secret, "myelin/a", sn, cn, id, &token, session);
}
Mac attach_proof(std::string_view secret, const Nonce& sn, const Nonce& cn, const Token& token,
                 uint64_t session, std::string_view id) {
  return hmac(secret, "myelin/t", cn, sn, id, &token, session);
}
bool mac_equal(const Mac& a, const Mac& b) noexcept {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace myelin::broker::internal
