// tests/verbs/verbs_peer.cpp — the peer process of the multi-process verbs tests.
//   verbs_peer [CONNECT_DELAY_MS]
// Prints its verbs address (hex, one line), reads the test's address (hex, one line) from stdin,
// waits CONNECT_DELAY_MS (default 0) without progressing — a peer that is late to connect —
// connects, then serves forever: a message on channel 0 holding a uint64 N is answered by an
// N-byte message on channel 1. The test kills it; it never exits on its own except on error
// (exit status 2 with the reason on stderr) or when stdin closes before an address arrives.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "verbs_test_util.hpp"

using namespace myelin;
using namespace myelin::transport;

int main(int argc, char** argv) {
  const long delay_ms = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 0;
  if (delay_ms < 0 || delay_ms > 600000) {
    std::cerr << "verbs_peer: bad connect delay '" << argv[1] << "'\n";
    return 2;
  }
  auto backend = verbs_test::make_backend("peer");
  if (!backend.ok()) {
    std::cerr << "verbs_peer: " << backend.status() << "\n";
    return 2;
  }
  for (uint8_t b : (*backend)->local_address()) std::printf("%02x", b);
  std::printf("\n");
  std::fflush(stdout);
  std::string hex;
  if (!std::getline(std::cin, hex)) return 0;
  std::vector<uint8_t> peer;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    peer.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  // Simulates a peer busy elsewhere: what the test sent meanwhile waits unread (or is lost).
  std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
  auto ep = (*backend)->connect(peer, "test", Deadline::after(std::chrono::seconds(30)));
  if (!ep.ok()) {
    std::cerr << "verbs_peer: " << ep.status() << "\n";
    return 2;
  }
  std::vector<uint8_t> payload;
  uint64_t want = 0;
  Request r = (*ep)->recv(0, &want, sizeof want, nullptr);
  std::vector<Request> sends;
  for (;;) {
    (*backend)->progress();
    if (!(*ep)->status().ok()) {
      std::cerr << "verbs_peer: " << (*ep)->status() << "\n";
      return 2;
    }
    if (r.done()) {
      payload.assign(want, 0x5c);
      sends.push_back((*ep)->send(1, payload.data(), payload.size(), nullptr));
      r = (*ep)->recv(0, &want, sizeof want, nullptr);
    }
  }
}
