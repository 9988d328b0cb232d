// Private: challenge-response authentication on a shared job secret (HMAC-SHA256, libcrypto).
//   server -> client  hello:   server nonce Ns (32 random bytes)
//   client -> server  auth:    identity, client nonce Nc, HMAC(secret, "myelin/c" Ns Nc identity)
//   server -> client  auth_ok: HMAC(secret, "myelin/s" Nc Ns identity)   (the client checks it too)
// The secret never crosses the wire; fresh nonces on both sides stop replays in either direction.
// Protocol 2 adds the control connection's attach, bound to one session:
//   auth_ok on the main connection also carries a random session token T and the session id S
//   (in its header); from protocol 3 its proof covers both: HMAC(secret, "myelin/s" Nc Ns T S
//   identity), so a client attaches only with a token the broker gave it, never one put in on
//   the way (protocol 2 peers get the proof without them)
//   a second connection gets its own hello (server nonce Ns')
//   client -> server  attach:  identity, session id S, client nonce Nc',
//                              HMAC(secret, "myelin/a" Ns' Nc' T S identity)
//   server -> client  auth_ok: HMAC(secret, "myelin/t" Nc' Ns' T S identity)
// A forged attach lacks the secret; a replayed one was made for another server nonce; an attach
// for a session with another token (a stale or guessed session id) fails the MAC too.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <myelin/broker/frame.hpp>
#include <myelin/core/status.hpp>

namespace myelin::broker::internal {

using Nonce = std::array<std::byte, kNonceSize>;
using Mac = std::array<std::byte, kMacSize>;

Result<Nonce> random_nonce();
Mac client_mac(std::string_view secret, const Nonce& server_nonce, const Nonce& client_nonce,
               std::string_view identity);
using Token = std::array<std::byte, kSessionTokenSize>;
// Protocols 1 and 2: `token` null. Protocol 3: the session token and id auth_ok carries.
Mac server_proof(std::string_view secret, const Nonce& server_nonce, const Nonce& client_nonce,
                 std::string_view identity, const Token* token = nullptr, uint64_t session = 0);
Result<Token> random_token();
Mac attach_mac(std::string_view secret, const Nonce& server_nonce, const Nonce& client_nonce,
               const Token& token, uint64_t session, std::string_view identity);
Mac attach_proof(std::string_view secret, const Nonce& server_nonce, const Nonce& client_nonce,
                 const Token& token, uint64_t session, std::string_view identity);
// Constant-time comparison.
[[nodiscard]] bool mac_equal(const Mac& a, const Mac& b) noexcept;

}  // namespace myelin::broker::internal
