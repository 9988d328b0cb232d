// myelin/broker/broker.hpp
//
// Broker: the routing core, without any network. The daemon (Server) drives it from its event
// loop; a process may also embed it directly and attach LocalSubscriber sessions.
//
// Model
//  - A Session is one consumer: a network connection or an in-process subscriber. It owns two
//    lock-free rings (lanes): control and bulk. Whoever drains a session pops control first, so
//    control traffic is always ahead of bulk at this queue.
//  - publish(topic) gives the message the topic's next sequence number (1, 2, ...) and puts one
//    shared, immutable copy into the matching lane of every session with a matching subscription
//    (a session with several matching subscriptions gets one copy).
//  - Overflow, per topic policy: kBlock refuses the whole publish (nothing is enqueued anywhere)
//    while any matching session's lane is full, so the caller can park it and retry in order;
//    kDropOldest evicts the oldest entry of the full lane, counts the drop and announces it on
//    "$pressure/<topic of the dropped message>" (control lane). Nothing is lost silently.
//  - request(): at-least-once. Routed to one responder subscription (round robin); the attempt
//    number travels in the frame; an attempt beyond the topic's max_delivery_attempts goes to
//    "$dead/<topic>" and the requester gets failed_precondition.
//
// Thread safety: every method may be called from any thread; routing state is under one mutex
// (in the daemon the loop thread routes bulk and the control thread control messages, each for a
// few microseconds at a time). Sessions' rings are drained without that mutex.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <myelin/broker/bounded_queue.hpp>
#include <myelin/broker/frame.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

namespace myelin::broker {

enum class Lane : uint8_t { kControl = 0, kBulk = 1 };
enum class OverflowPolicy : uint8_t { kBlock, kDropOldest };
std::string_view lane_name(Lane lane) noexcept;
Result<Lane> parse_lane(std::string_view text);
std::string_view overflow_policy_name(OverflowPolicy p) noexcept;
Result<OverflowPolicy> parse_overflow_policy(std::string_view text);

// Bounds of the options below, checked by Server::create() (and the daemon's configuration).
inline constexpr size_t kMinLaneCapacity = 2;
inline constexpr size_t kMaxLaneCapacity = size_t{1} << 20;
inline constexpr uint32_t kMaxDeliveryAttemptsLimit = 1'000'000;

struct TopicPolicy {
  std::string pattern = "#";  // topics it applies to (first matching policy wins)
  Lane lane = Lane::kBulk;
  OverflowPolicy overflow = OverflowPolicy::kBlock;
  bool batching = true;  // coalesce small messages on the way out; off for latency paths
  uint32_t max_delivery_attempts = 5;  // 1 .. kMaxDeliveryAttemptsLimit
};

struct BrokerOptions {
  std::vector<TopicPolicy> policies;  // checked in order
  TopicPolicy default_policy;         // for topics no policy matches
  size_t lane_capacity = 1024;        // entries per session lane (kMin/kMaxLaneCapacity)
  // Largest payload a control-lane frame carries (the Server sets its chunk size: control frames
  // are never chunked). A reply or dead letter over it goes on the bulk lane; a publish or request
  // over it on a control-lane topic is refused with invalid_argument (moving it to the bulk lane
  // would reorder its topic).
  size_t max_control_payload = 64 * 1024;
};

// One routed message, shared read-only by every session it was queued for.
struct Message {
  FrameType type = FrameType::kDeliver;  // kDeliver, kRequest, kReply or kError
  Lane lane = Lane::kBulk;
  bool batchable = false;
  std::string topic;
  uint64_t seq = 0;            // topic sequence (deliver), attempt (request), status code (error)
  uint64_t id = 0;             // message id
  uint64_t publish_ts_ns = 0;  // publisher's clock, carried to the subscriber
  int64_t broker_rx_ns = 0;    // broker's receipt, for the publish-to-deliver histogram
  std::shared_ptr<const void> owner;  // keeps `payload` alive
  std::span<const std::byte> payload;
  // `owner` holds other data too (PublishArgs::owner_shared): whoever queues the message further
  // (a connection's send queue) copies the payload rather than keep the owner behind many others.
  bool owner_shared = false;
};
using MessagePtr = std::shared_ptr<const Message>;

// A consumer. Subclasses say how to wake their drainer.
class Session {
 public:
  Session(uint64_t id, std::string identity, size_t lane_capacity)
      : id_(id), identity_(std::move(identity)), control_(lane_capacity), bulk_(lane_capacity) {}
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  virtual ~Session() = default;

  [[nodiscard]] uint64_t id() const noexcept { return id_; }
  [[nodiscard]] const std::string& identity() const noexcept { return identity_; }
  BoundedQueue<MessagePtr>& lane(Lane l) noexcept { return l == Lane::kControl ? control_ : bulk_; }
  // Pops the next message, control lane first. False when both are empty.
  [[nodiscard]] bool try_pop(MessagePtr& out) {
    return control_.try_pop(out) || bulk_.try_pop(out);
  }
  [[nodiscard]] size_t depth() const noexcept { return control_.size() + bulk_.size(); }

  // Called (possibly under the broker mutex, from any thread) after messages were queued on
  // `lane`, so a session whose lanes are drained by different threads wakes only the one that
  // drains that lane. It must not call back into the Broker.
  virtual void on_ready(Lane lane) = 0;

 private:
  friend class Broker;
  uint64_t id_;
  std::string identity_;
  BoundedQueue<MessagePtr> control_;
  BoundedQueue<MessagePtr> bulk_;
  // Per lane, under the Broker's mutex: the owner that the message queued last by reference to a
  // shared owner (PublishArgs::owner_shared) holds. Compared, never dereferenced.
  const void* last_shared_owner_[2] = {nullptr, nullptr};
};

// An in-process subscriber: poll() blocks with a deadline.
class LocalSubscriber final : public Session {
 public:
  using Session::Session;
  void on_ready(Lane lane) override;
  // The next message, control first; timeout_error when none arrives before `deadline`.
  Result<MessagePtr> poll(Deadline deadline);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};

// Counters per topic (a topic appears once something was published to it).
struct TopicStats {
  uint64_t messages_in = 0, bytes_in = 0;
  uint64_t deliveries = 0, delivered_bytes = 0;  // copies queued for sessions
  uint64_t drops = 0;                            // evicted by kDropOldest
  uint64_t stalls = 0;  // publishes refused by kBlock (the producer waited)
  uint64_t dead_letters = 0;
};

enum class PublishOutcome : uint8_t { kAccepted, kBlocked };

// What Broker::publish() found for the topic a publisher used last: the publisher keeps it and
// passes it back (PublishArgs::route), and a publish on the same topic then skips the topic's
// validation, the policy search and the topic table's lookup after one comparison of its bytes.
// It belongs to one publisher and is used by one thread at a time; it is only ever used with the
// Broker that filled it (each Broker has an id of its own in the process: a Broker made where
// another one was destroyed is not taken for it).
class RouteCache {
 private:
  friend class Broker;
  uint64_t broker_ = 0;  // the id of the Broker that filled it (0: none)
  std::string topic_;
  const TopicPolicy* policy_ = nullptr;  // that Broker's policy for topic_
  void* state_ = nullptr;                // that Broker's TopicState for topic_ (never erased)
};

struct PublishArgs {
  std::string_view topic;
  std::span<const std::byte> payload;
  std::shared_ptr<const void> owner;  // keeps payload alive while queued; null: payload is copied
  // `owner` also holds other data (the daemon passes the receive block a frame was decoded from,
  // so a payload is never copied on its way through). A message queued behind many others could
  // keep such a block alive long after the rest of it was used, so the payload is copied instead
  // when a lane it goes to holds kMaxSharedOwnerDepth or more messages, unless the message queued
  // there last by reference holds the same owner (the lane then keeps no further block: one read's
  // worth of messages from one publisher share one block). A lane holds at most
  // kMaxSharedOwnerDepth + 1 shared owners.
  bool owner_shared = false;
  uint64_t id = 0;
  uint64_t publish_ts_ns = 0;
  uint64_t attempt = 1;         // requests only
  uint64_t from_session = 0;    // requester, for request()
  RouteCache* route = nullptr;  // publish(): the publisher's memo of its last topic (optional)
  int64_t received_ns = 0;      // when the broker received it (monotonic_ns(); 0: now)
};

class Broker {
 public:
  // See PublishArgs::owner_shared.
  // 8: a slow subscriber pins at most 9 blocks per lane and 8 for its send queue (each about
  // 1 MiB); at 32 that was up to about 70-100 MiB per slow session.
  static constexpr size_t kMaxSharedOwnerDepth = 8;

  explicit Broker(BrokerOptions options);
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;

  void add_session(std::shared_ptr<Session> s);
  // Removes the session, its subscriptions and its pending requests.
  void remove_session(uint64_t session_id);

  // `responder`: the subscription receives requests instead of publishes.
  Status subscribe(uint64_t session_id, uint64_t sub_id, std::string_view pattern,
                   bool responder = false);
  Status unsubscribe(uint64_t session_id, uint64_t sub_id);

  // Topic must be valid; clients may not publish '$' topics (the server checks that).
  Result<PublishOutcome> publish(const PublishArgs& args);
  // Routes a request to one responder. Errors (the caller reports them to the requester):
  // unavailable when no responder is subscribed; failed_precondition when dead-lettered.
  Result<PublishOutcome> request(const PublishArgs& args);
  // Routes a reply (or an error, when `error` is not OK) to the requester of message `id`.
  // False when the requester is gone or its lane is full (counted; it will retry). A reply over
  // max_control_payload goes on the bulk lane, others on the control lane.
  bool reply(uint64_t id, std::span<const std::byte> payload, std::shared_ptr<const void> owner,
             const Status& error = ok_status());

  [[nodiscard]] const TopicPolicy& policy_for(std::string_view topic) const;
  [[nodiscard]] std::map<std::string, TopicStats> topic_stats() const;
  [[nodiscard]] uint64_t replies_dropped() const;
  [[nodiscard]] size_t session_count() const;

 private:
  struct Sub {
    uint64_t session_id, sub_id;
    std::string pattern;
    bool responder;
  };
  struct Pending {
    uint64_t requester;
    std::string topic;
  };
  // What the broker keeps per topic: its sequence, its counters and the sessions its publishes
  // go to (rebuilt when subscriptions or sessions change), so a publish matches the
  // subscriptions once per topic and change instead of once per message.
  struct TopicState {
    uint64_t seq = 0;
    TopicStats* stats = nullptr;    // in stats_ (map nodes stay put), or its "(other)" series
    uint64_t targets_gen = 0;       // subs_gen_ the targets were found for; 0: never
    std::vector<Session*> targets;  // non-responder subscribers, each once; see sessions_
  };
  // Hashes std::string and std::string_view alike (lookups by view without a copy).
  struct TopicHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  TopicState& topic_locked(std::string_view topic);
  TopicStats& stats_locked(std::string_view topic) { return *topic_locked(topic).stats; }
  void announce_drop_locked(const Session& s, const Message& dropped);
  bool enqueue_locked(Session& s, MessagePtr m, const TopicPolicy& p, bool announce);
  // invalid_argument for a payload over max_control_payload on a control-lane topic.
  Status check_control_size(const TopicPolicy& p, const PublishArgs& a) const;
  // The control lane, or the bulk lane for a payload a control frame cannot carry.
  Lane lane_for_size(size_t payload_bytes) const noexcept {
    return payload_bytes > opt_.max_control_payload ? Lane::kBulk : Lane::kControl;
  }

  BrokerOptions opt_;
  const uint64_t id_;  // unique in the process, never 0 (RouteCache)
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, std::shared_ptr<Session>> sessions_;
  std::vector<Sub> subs_;
  std::unordered_map<std::string, TopicState, TopicHash, std::equal_to<>> topics_;
  uint64_t subs_gen_ = 1;  // changes with subs_ and sessions_
  std::map<std::string, TopicStats> stats_;
  std::unordered_map<uint64_t, Pending> pending_;    // request id -> requester
  std::unordered_map<uint64_t, uint32_t> attempts_;  // request id -> attempts seen
  std::vector<uint64_t> attempts_fifo_;              // eviction order for attempts_
  size_t rr_ = 0;
  uint64_t replies_dropped_ = 0;
};

// Subscription patterns an ACL entry allows: true when every topic `requested` can match is also
// matched by `allowed` ('*' in allowed covers one plain or '*' level; '#' covers anything).
[[nodiscard]] bool pattern_covers(std::string_view allowed, std::string_view requested) noexcept;

}  // namespace myelin::broker
