// The routing core. One mutex guards routing state; sessions drain their rings without it.
#include <myelin/broker/broker.hpp>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

namespace myelin::broker {
namespace {

constexpr size_t kMaxTrackedAttempts = 1 << 16;
constexpr size_t kMaxTopicsTracked = 10000;
// How long a push waits for a drainer to hand back a ring cell it has claimed (see
// enqueue_locked()).
constexpr int64_t kHandBackWaitNs = 2'000'000;

std::shared_ptr<const void> own_copy(std::span<const std::byte> payload,
                                     std::span<const std::byte>* view) {
  auto buf = std::make_shared<std::vector<std::byte>>(payload.begin(), payload.end());
  *view = std::span<const std::byte>(buf->data(), buf->size());
  return buf;
}

// A message with `a`'s id, timestamps and payload: shared with a.owner, or copied without one or
// with `copy`. The caller sets lane and batching.
std::shared_ptr<Message> message_from(const PublishArgs& a, FrameType type, std::string topic,
                                      uint64_t seq, bool copy = false) {
  auto m = std::make_shared<Message>();
  m->type = type;
  m->topic = std::move(topic);
  m->seq = seq;
  m->id = a.id;
  m->publish_ts_ns = a.publish_ts_ns;
  m->broker_rx_ns = a.received_ns != 0 ? a.received_ns : monotonic_ns();
  if (a.owner && !copy) {
    m->owner = a.owner;
    m->payload = a.payload;
    m->owner_shared = a.owner_shared;
  } else {
    m->owner = own_copy(a.payload, &m->payload);
  }
  return m;
}

std::vector<std::string_view> split_levels(std::string_view s) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (true) {
    const size_t e = s.find('/', start);
    out.push_back(
        s.substr(start, e == std::string_view::npos ? std::string_view::npos : e - start));
    if (e == std::string_view::npos) break;
    start = e + 1;
  }
  return out;
}

}  // namespace

std::string_view lane_name(Lane lane) noexcept {
  return lane == Lane::kControl ? "control" : "bulk";
}
Result<Lane> parse_lane(std::string_view t) {
  if (t == "control") return Lane::kControl;
  if (t == "bulk") return Lane::kBulk;
  return invalid_argument("lane '", t, "' is neither control nor bulk");
}
std::string_view overflow_policy_name(OverflowPolicy p) noexcept {
  return p == OverflowPolicy::kBlock ? "block" : "drop_oldest";
}
Result<OverflowPolicy> parse_overflow_policy(std::string_view t) {
  if (t == "block") return OverflowPolicy::kBlock;
  if (t == "drop_oldest") return OverflowPolicy::kDropOldest;
  return invalid_argument("overflow policy '", t, "' is neither block nor drop_oldest");
}

void LocalSubscriber::on_ready(Lane) {
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
}

Result<MessagePtr> LocalSubscriber::poll(Deadline deadline) {
  MessagePtr m;
  std::unique_lock<std::mutex> lock(mu_);
  while (!try_pop(m)) {
    if (deadline.expired()) return timeout_error("no message for local subscriber ", id());
    if (deadline.is_never())
      cv_.wait(lock);
    else
      cv_.wait_for(lock, std::chrono::nanoseconds(deadline.remaining_ns()));
  }
  return m;
}

namespace {
std::atomic<uint64_t> next_broker_id{1};
}  // namespace

Broker::Broker(BrokerOptions options)
    : opt_(std::move(options)), id_(next_broker_id.fetch_add(1, std::memory_order_relaxed)) {}

void Broker::add_session(std::shared_ptr<Session> s) {
  std::lock_guard<std::mutex> lock(mu_);
  sessions_[s->id()] = std::move(s);
  ++subs_gen_;
}

void Broker::remove_session(uint64_t session_id) {
  std::lock_guard<std::mutex> lock(mu_);
  sessions_.erase(session_id);
  std::erase_if(subs_, [&](const Sub& s) { return s.session_id == session_id; });
  ++subs_gen_;  // cached targets may point at the session
  std::erase_if(pending_, [&](const auto& kv) { return kv.second.requester == session_id; });
}

Status Broker::subscribe(uint64_t session_id, uint64_t sub_id, std::string_view pattern,
                         bool responder) {
  MYELIN_RETURN_IF_ERROR(validate_pattern(pattern));
  std::lock_guard<std::mutex> lock(mu_);
  if (!sessions_.count(session_id)) return not_found("session ", session_id);
  for (const Sub& s : subs_) {
    if (s.session_id == session_id && s.sub_id == sub_id) {
      return already_exists("subscription ", sub_id, " of session ", session_id);
    }
  }
  subs_.push_back(Sub{session_id, sub_id, std::string(pattern), responder});
  ++subs_gen_;
  return ok_status();
}

Status Broker::unsubscribe(uint64_t session_id, uint64_t sub_id) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = std::erase_if(
      subs_, [&](const Sub& s) { return s.session_id == session_id && s.sub_id == sub_id; });
  if (n == 0) return not_found("subscription ", sub_id, " of session ", session_id);
  ++subs_gen_;
  return ok_status();
}

const TopicPolicy& Broker::policy_for(std::string_view topic) const {
  for (const TopicPolicy& p : opt_.policies) {
    if (topic_matches(p.pattern, topic)) return p;
  }
  return opt_.default_policy;
}

Broker::TopicState& Broker::topic_locked(std::string_view topic) {
  auto it = topics_.find(topic);
  if (it != topics_.end()) return it->second;
  TopicState& t = topics_[std::string(topic)];
  // Bound the label set: past the limit, new topics share one series.
  t.stats = stats_.size() >= kMaxTopicsTracked ? &stats_["(other)"] : &stats_[std::string(topic)];
  return t;
}

bool Broker::enqueue_locked(Session& s, MessagePtr m, const TopicPolicy& p, bool announce) {
  auto& q = s.lane(m->lane);
  // Only this thread pushes (under mu_). A push can still fail with room in the ring: a drainer
  // on another thread has claimed the oldest cell and not yet handed it back (a few
  // instructions, unless that thread is preempted right there). Such a push is retried; only a
  // ring that is full counts as full.
  int64_t give_up_ns = 0;
  MessagePtr dropped;
  for (int attempt = 0;; ++attempt) {
    MessagePtr copy = m;
    if (q.try_push(std::move(copy))) return true;
    if (q.size() >= q.capacity()) {
      if (p.overflow == OverflowPolicy::kBlock) return false;
      // Evict the oldest and retry.
      if (q.try_pop(dropped)) {
        stats_locked(dropped->topic).drops++;
        if (announce) announce_drop_locked(s, *dropped);
        dropped.reset();
      }
      continue;
    }
    if (attempt < 64) continue;
    const int64_t now = monotonic_ns();
    if (give_up_ns == 0) give_up_ns = now + kHandBackWaitNs;
    if (now < give_up_ns) {
      std::this_thread::yield();
      continue;
    }
    // The drainer stayed away past the bound: this message is the one dropped, counted and
    // announced like an eviction (never lost without a word).
    stats_locked(m->topic).drops++;
    if (announce) announce_drop_locked(s, *m);
    return false;
  }
}

void Broker::announce_drop_locked(const Session& s, const Message& dropped) {
  std::string topic = "$pressure/";
  const std::string_view t = dropped.topic.size() && dropped.topic[0] == '$'
                                 ? std::string_view(dropped.topic).substr(1)
                                 : std::string_view(dropped.topic);
  topic.append(t);
  if (topic.size() > kMaxTopicLength) topic = "$pressure/overflow";
  std::string text = internal::str_cat("dropped seq ", dropped.seq, " of ", dropped.topic,
                                       " for session ", s.id(), " (", s.identity(), ")");
  auto m = std::make_shared<Message>();
  m->type = FrameType::kDeliver;
  m->lane = Lane::kControl;
  m->topic = topic;
  m->seq = ++topic_locked(topic).seq;
  m->publish_ts_ns = static_cast<uint64_t>(monotonic_ns());
  m->broker_rx_ns = monotonic_ns();
  auto buf = std::make_shared<std::string>(std::move(text));
  m->payload =
      std::span<const std::byte>(reinterpret_cast<const std::byte*>(buf->data()), buf->size());
  m->owner = buf;
  TopicStats& st = stats_locked(topic);
  st.messages_in++;
  TopicPolicy pp;
  pp.overflow = OverflowPolicy::kDropOldest;
  for (auto& [sid, sess] : sessions_) {
    bool match = false;
    for (const Sub& sub : subs_) {
      if (sub.session_id == sid && !sub.responder && topic_matches(sub.pattern, topic))
        match = true;
    }
    if (!match) continue;
    // No announcement of drops of announcements: they are counted in the pressure topic's stats.
    if (enqueue_locked(*sess, m, pp, /*announce=*/false)) {
      st.deliveries++;
      sess->on_ready(Lane::kControl);
    }
  }
}

Status Broker::check_control_size(const TopicPolicy& p, const PublishArgs& a) const {
  if (p.lane != Lane::kControl || a.payload.size() <= opt_.max_control_payload) return ok_status();
  return invalid_argument("a message of ", a.payload.size(), " bytes on control-lane topic '",
                          a.topic, "' exceeds one control frame (", opt_.max_control_payload,
                          " bytes)");
}

Result<PublishOutcome> Broker::publish(const PublishArgs& a) {
  RouteCache* route = a.route;
  const bool cached = route && route->broker_ == id_ && route->topic_ == a.topic;
  if (!cached) MYELIN_RETURN_IF_ERROR(validate_topic(a.topic));
  const TopicPolicy& p = cached ? *route->policy_ : policy_for(a.topic);
  MYELIN_RETURN_IF_ERROR(check_control_size(p, a));
  std::lock_guard<std::mutex> lock(mu_);
  TopicState& ts = cached ? *static_cast<TopicState*>(route->state_) : topic_locked(a.topic);
  if (route && !cached) {
    route->broker_ = id_;
    route->topic_.assign(a.topic);
    route->policy_ = &p;
    route->state_ = &ts;
  }
  if (ts.targets_gen != subs_gen_) {
    // Targets, one per session.
    ts.targets.clear();
    for (const Sub& sub : subs_) {
      if (sub.responder || !topic_matches(sub.pattern, a.topic)) continue;
      auto it = sessions_.find(sub.session_id);
      if (it == sessions_.end()) continue;
      if (std::find(ts.targets.begin(), ts.targets.end(), it->second.get()) == ts.targets.end()) {
        ts.targets.push_back(it->second.get());
      }
    }
    ts.targets_gen = subs_gen_;
  }
  const std::vector<Session*>& targets = ts.targets;
  TopicStats& st = *ts.stats;
  const int lane = static_cast<int>(p.lane);
  // A lane that holds kMaxSharedOwnerDepth or more messages takes no further shared owner: the
  // payload is copied unless the lane's last shared owner is this one (no further block then).
  bool copy = false;
  for (Session* s : targets) {
    auto& q = s->lane(p.lane);
    const size_t depth = q.size();
    // Only this thread (under mu_) pushes, drainers only pop: room seen now stays.
    if (p.overflow == OverflowPolicy::kBlock && depth >= q.capacity()) {
      st.stalls++;
      return PublishOutcome::kBlocked;
    }
    copy = copy || (depth >= kMaxSharedOwnerDepth && s->last_shared_owner_[lane] != a.owner.get());
  }
  copy = copy && a.owner_shared;
  const uint64_t seq = ++ts.seq;
  auto m = message_from(a, FrameType::kDeliver, std::string(a.topic), seq, copy);
  m->lane = p.lane;
  m->batchable = p.batching;
  st.messages_in++;
  st.bytes_in += a.payload.size();
  for (Session* s : targets) {
    if (m->owner_shared) s->last_shared_owner_[lane] = a.owner.get();
    if (enqueue_locked(*s, m, p, /*announce=*/true)) {
      st.deliveries++;
      st.delivered_bytes += a.payload.size();
      s->on_ready(p.lane);
    }
  }
  return PublishOutcome::kAccepted;
}

Result<PublishOutcome> Broker::request(const PublishArgs& a) {
  MYELIN_RETURN_IF_ERROR(validate_topic(a.topic));
  const TopicPolicy& p = policy_for(a.topic);
  MYELIN_RETURN_IF_ERROR(check_control_size(p, a));
  std::lock_guard<std::mutex> lock(mu_);
  TopicStats& st = stats_locked(a.topic);
  // Count attempts per id, bounded.
  auto [it, fresh] = attempts_.try_emplace(a.id, 0);
  if (fresh) {
    attempts_fifo_.push_back(a.id);
    if (attempts_fifo_.size() > kMaxTrackedAttempts) {
      attempts_.erase(attempts_fifo_.front());
      attempts_fifo_.erase(attempts_fifo_.begin(),
                           attempts_fifo_.begin() + kMaxTrackedAttempts / 2);
    }
  }
  it->second = std::max<uint32_t>(it->second + 1,
                                  static_cast<uint32_t>(std::min<uint64_t>(a.attempt, UINT32_MAX)));
  if (it->second > p.max_delivery_attempts) {
    // Dead letter: deliver the request itself to "$dead/<topic>" subscribers.
    std::string dead = "$dead/" + std::string(a.topic);
    if (dead.size() > kMaxTopicLength) dead = "$dead/overflow";
    const uint64_t seq = ++topic_locked(dead).seq;
    // Dead letters are rare and may wait long: never with a shared owner.
    auto m = message_from(a, FrameType::kDeliver, dead, seq, a.owner_shared);
    m->lane = lane_for_size(a.payload.size());
    st.dead_letters++;
    TopicPolicy pp;
    pp.overflow = OverflowPolicy::kDropOldest;
    for (const Sub& sub : subs_) {
      if (sub.responder || !topic_matches(sub.pattern, dead)) continue;
      auto sit = sessions_.find(sub.session_id);
      if (sit != sessions_.end() && enqueue_locked(*sit->second, m, pp, true))
        sit->second->on_ready(m->lane);
    }
    attempts_.erase(a.id);
    return failed_precondition("request ", a.id, " on ", a.topic, " dead-lettered to ", dead,
                               " after ", p.max_delivery_attempts, " delivery attempts");
  }
  std::vector<const Sub*> responders;
  for (const Sub& sub : subs_) {
    if (sub.responder && topic_matches(sub.pattern, a.topic) && sessions_.count(sub.session_id)) {
      responders.push_back(&sub);
    }
  }
  if (responders.empty()) return unavailable("no responder for ", a.topic);
  Session& target = *sessions_.at(responders[rr_++ % responders.size()]->session_id);
  auto m = message_from(a, FrameType::kRequest, std::string(a.topic), a.attempt,
                        a.owner_shared && target.lane(p.lane).size() >= kMaxSharedOwnerDepth);
  m->lane = p.lane;
  m->batchable = p.batching;
  TopicPolicy blocking = p;
  blocking.overflow = OverflowPolicy::kBlock;  // never evict someone else's request
  if (!enqueue_locked(target, m, blocking, false)) {
    st.stalls++;
    return PublishOutcome::kBlocked;
  }
  st.messages_in++;
  st.bytes_in += a.payload.size();
  st.deliveries++;
  pending_[a.id] = Pending{a.from_session, std::string(a.topic)};
  target.on_ready(p.lane);
  return PublishOutcome::kAccepted;
}

bool Broker::reply(uint64_t id, std::span<const std::byte> payload,
                   std::shared_ptr<const void> owner, const Status& error) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pending_.find(id);
  if (it == pending_.end()) return false;  // duplicate reply, or requester gone
  auto sit = sessions_.find(it->second.requester);
  if (sit == sessions_.end()) {
    pending_.erase(it);
    return false;
  }
  auto m = std::make_shared<Message>();
  m->type = error.ok() ? FrameType::kReply : FrameType::kError;
  m->topic = it->second.topic;
  m->id = id;
  m->broker_rx_ns = monotonic_ns();
  if (error.ok()) {
    if (owner) {
      m->owner = std::move(owner);
      m->payload = payload;
    } else {
      m->owner = own_copy(payload, &m->payload);
    }
  } else {
    m->seq = static_cast<uint64_t>(error.code());
    auto text = std::make_shared<std::string>(error.message());
    m->payload =
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(text->data()), text->size());
    m->owner = text;
  }
  m->lane = lane_for_size(m->payload.size());
  pending_.erase(it);
  MessagePtr copy = m;
  if (!sit->second->lane(m->lane).try_push(std::move(copy))) {
    replies_dropped_++;  // the requester retries: at-least-once
    return false;
  }
  sit->second->on_ready(m->lane);
  attempts_.erase(id);
  return true;
}

std::map<std::string, TopicStats> Broker::topic_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}
uint64_t Broker::replies_dropped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return replies_dropped_;
}
size_t Broker::session_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sessions_.size();
}

bool pattern_covers(std::string_view allowed, std::string_view requested) noexcept {
  const auto a = split_levels(allowed);
  const auto r = split_levels(requested);
  if (!r.empty() && !r[0].empty() && r[0][0] == '$' && !a.empty() && (a[0] == "*" || a[0] == "#")) {
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "#") return i < r.size();  // covers one or more remaining levels, wildcards too
    if (i >= r.size()) return false;
    if (r[i] == "#") return false;  // requested reaches deeper than a non-'#' allowed level
    if (a[i] == "*") continue;      // covers a plain level or '*'
    if (a[i] != r[i]) return false;
  }
  return a.size() == r.size();
}

}  // namespace myelin::broker
