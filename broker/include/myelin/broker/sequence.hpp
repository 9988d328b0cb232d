// myelin/broker/sequence.hpp
//
// Sequence numbers and gap detection. The broker numbers every message of a topic 1, 2, 3, ...;
// a subscriber that sees a jump knows exactly how many messages of that topic it missed (dropped
// by an overflow policy, or published while it was not subscribed). Comparison is serial-number
// arithmetic (RFC 1982 style) on 64 bits, so it stays correct across wrap-around.
//
// Thread safety: GapDetector is a value owned by one receiver thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace myelin::broker {

// Signed distance from `from` to `to`, correct across wrap-around while |distance| < 2^63.
[[nodiscard]] constexpr int64_t seq_distance(uint64_t from, uint64_t to) noexcept {
  return static_cast<int64_t>(to - from);
}
[[nodiscard]] constexpr bool seq_before(uint64_t a, uint64_t b) noexcept {
  return seq_distance(a, b) > 0;
}

// What one arrival means for its stream.
struct SeqEvent {
  uint64_t missed = 0;            // messages skipped before this one (0: in order)
  bool duplicate_or_old = false;  // at or before the last one seen: out of order
};

// Tracks the last sequence number per key (topic). The first message of a key sets the baseline.
class GapDetector {
 public:
  GapDetector() = default;
  // A copy or a move starts without the remembered entry (it points into one map).
  GapDetector(const GapDetector& o) : last_(o.last_), missed_total_(o.missed_total_) {}
  GapDetector(GapDetector&& o) noexcept
      : last_(std::move(o.last_)), missed_total_(o.missed_total_) {
    o.recent_ = nullptr;
  }
  GapDetector& operator=(const GapDetector& o) {
    if (this != &o) {
      last_ = o.last_;
      recent_ = nullptr;
      missed_total_ = o.missed_total_;
    }
    return *this;
  }
  GapDetector& operator=(GapDetector&& o) noexcept {
    if (this != &o) {
      last_ = std::move(o.last_);
      recent_ = o.recent_ = nullptr;
      missed_total_ = o.missed_total_;
    }
    return *this;
  }
  ~GapDetector() = default;

  SeqEvent observe(std::string_view key, uint64_t seq) {
    // A stream mostly repeats its key: the entry of the last one is compared first (entries
    // stay where they are while the map grows; forget() clears it).
    std::pair<const std::string, uint64_t>* e = recent_;
    if (e == nullptr || e->first != key) {
      auto [it, fresh] = last_.try_emplace(std::string(key), seq);
      recent_ = &*it;
      if (fresh) return {};
      e = recent_;
    }
    SeqEvent ev;
    const int64_t d = seq_distance(e->second, seq);
    if (d <= 0) {
      ev.duplicate_or_old = true;
      return ev;
    }
    ev.missed = static_cast<uint64_t>(d - 1);
    e->second = seq;
    missed_total_ += ev.missed;
    return ev;
  }
  [[nodiscard]] uint64_t missed_total() const noexcept { return missed_total_; }
  void forget(std::string_view key) {
    recent_ = nullptr;
    last_.erase(std::string(key));
  }

 private:
  std::unordered_map<std::string, uint64_t> last_;
  std::pair<const std::string, uint64_t>* recent_ = nullptr;  // an entry of last_, or null
  uint64_t missed_total_ = 0;
};

}  // namespace myelin::broker
