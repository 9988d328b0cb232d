#include "config.hpp"

#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include <toml++/toml.h>

#include <myelin/broker/secret.hpp>
#include <myelin/core/file.hpp>

namespace myelin::broker::tool {
namespace {

Status check_keys(const toml::table& t, const std::set<std::string>& allowed,
                  const std::string& where) {
  for (const auto& [k, v] : t) {
    if (!allowed.count(std::string(k.str())))
      return invalid_argument("unknown key '", message_excerpt(k.str()), "' in ", where);
  }
  return ok_status();
}

template <typename T>
Status get(const toml::table& t, const char* key, T* out) {
  const toml::node* n = t.get(key);
  if (!n) return ok_status();
  if constexpr (std::is_same_v<T, std::string>) {
    auto v = n->value<std::string>();
    if (!v) return invalid_argument("'", key, "' must be a string");
    *out = *v;
  } else if constexpr (std::is_same_v<T, bool>) {
    auto v = n->value<bool>();
    if (!v) return invalid_argument("'", key, "' must be a boolean");
    *out = *v;
  } else if constexpr (std::is_floating_point_v<T>) {
    auto v = n->value<double>();
    if (!v) return invalid_argument("'", key, "' must be a number");
    if (!std::isfinite(*v) || *v < 0) {
      return invalid_argument("'", key, "' = ", *v, " must be a finite number >= 0");
    }
    *out = static_cast<T>(*v);
  } else {
    static_assert(sizeof(T) == 0, "integers: get_int() with the key's range");
  }
  return ok_status();
}

// An integer key within lo..hi (both inclusive): a value outside the range, or one the option's
// type could not hold, is an error naming the key and the range, never truncated.
template <typename T>
Status get_int(const toml::table& t, const char* key, int64_t lo, int64_t hi, T* out) {
  static_assert(std::is_integral_v<T>);
  const toml::node* n = t.get(key);
  if (!n) return ok_status();
  auto v = n->value_exact<int64_t>();
  if (!v) return invalid_argument("'", key, "' must be an integer ", lo, " .. ", hi);
  if (*v < lo || *v > hi) {
    return invalid_argument("'", key, "' = ", *v, " outside ", lo, " .. ", hi);
  }
  *out = static_cast<T>(*v);
  return ok_status();
}

Status get_list(const toml::table& t, const char* key, std::vector<std::string>* out) {
  const toml::node* n = t.get(key);
  if (!n) return ok_status();
  const toml::array* a = n->as_array();
  if (!a) return invalid_argument("'", key, "' must be an array of strings");
  out->clear();
  for (const auto& e : *a) {
    auto v = e.value<std::string>();
    if (!v) return invalid_argument("'", key, "' must be an array of strings");
    out->push_back(*v);
  }
  return ok_status();
}

// A string key parsed by `parse` (one of the scheduling parsers); `names` lists the accepted
// values for the error of a key that is not a string.
template <typename T, typename Parse>
Status get_parsed(const toml::table& t, const char* key, const char* names, Parse parse, T* out) {
  const toml::node* n = t.get(key);
  if (!n) return ok_status();
  auto v = n->value<std::string>();
  if (!v) return invalid_argument("'", key, "' must be a string: ", names);
  auto parsed = parse(*v);
  if (!parsed.ok()) {
    return std::move(parsed).status().with_context(std::string("'") + key + "'");
  }
  *out = *parsed;
  return ok_status();
}

}  // namespace

Status load_config_file(const std::string& path, ServerOptions* o) {
  MYELIN_ASSIGN_OR_RETURN(const std::string text,
                          read_regular_file(path, kMaxConfigFileBytes, "config"));
  toml::table root;
  try {
    root = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << message_excerpt(e.description()) << " at line " << e.source().begin.line;
    return invalid_argument("config '", path, "': ", msg.str());
  }
  MYELIN_RETURN_IF_ERROR(check_keys(root, {"broker", "topic", "client", "ps"}, path));
  for (const char* table : {"broker", "ps"}) {
    if (root.contains(table) && !root[table].as_table()) {
      return invalid_argument("[", table, "] must be a table");
    }
  }
  if (const toml::table* b = root["broker"].as_table()) {
    // clang-format off
    MYELIN_RETURN_IF_ERROR(check_keys(
        *b,
        {"listen", "metrics_listen", "secret_file", "lane_capacity", "chunk_bytes", "batch_bytes",
         "batch_count", "batch_window_us", "publish_credits", "socket_buffer_bytes",
         "bulk_socket_buffer_bytes", "bulk_inflight_bytes", "heartbeat_ms", "control_thread",
         "loop_nice", "loop_scheduling", "control_scheduling", "spin_before_block_us", "numa_node",
         "nic", "control_cpus", "control_cpus_hold_ms"},
        "[broker]"));
    // clang-format on
    MYELIN_RETURN_IF_ERROR(get(*b, "listen", &o->listen));
    MYELIN_RETURN_IF_ERROR(get(*b, "metrics_listen", &o->metrics_listen));
    std::string secret_file;
    MYELIN_RETURN_IF_ERROR(get(*b, "secret_file", &secret_file));
    if (!secret_file.empty()) {
      MYELIN_ASSIGN_OR_RETURN(o->secret, broker::read_secret_file(secret_file));
    }
    MYELIN_RETURN_IF_ERROR(
        get_int(*b, "lane_capacity", kMinLaneCapacity, kMaxLaneCapacity, &o->broker.lane_capacity));
    MYELIN_RETURN_IF_ERROR(
        get_int(*b, "chunk_bytes", kMinChunkBytes, kMaxChunkBytes, &o->chunk_bytes));
    MYELIN_RETURN_IF_ERROR(get_int(*b, "batch_bytes", 0, kMaxBatchBytes, &o->batch_bytes));
    MYELIN_RETURN_IF_ERROR(get_int(*b, "batch_count", 0, kMaxBatchCount, &o->batch_count));
    MYELIN_RETURN_IF_ERROR(
        get_int(*b, "batch_window_us", 0, kMaxBatchWindowUs, &o->batch_window_us));
    MYELIN_RETURN_IF_ERROR(
        get_int(*b, "publish_credits", 1, kMaxPublishCredits, &o->publish_credits));
    MYELIN_RETURN_IF_ERROR(
        get_int(*b, "socket_buffer_bytes", 0, kMaxSocketBufferBytes, &o->socket_buffer_bytes));
    MYELIN_RETURN_IF_ERROR(get_int(*b, "bulk_socket_buffer_bytes", 0, kMaxSocketBufferBytes,
                                   &o->bulk_socket_buffer_bytes));
    MYELIN_RETURN_IF_ERROR(
        get_int(*b, "bulk_inflight_bytes", 0, kMaxBulkInflightBytes, &o->bulk_inflight_bytes));
    MYELIN_RETURN_IF_ERROR(
        get_int(*b, "heartbeat_ms", kMinHeartbeatMs, kMaxHeartbeatMs, &o->heartbeat_ms));
    MYELIN_RETURN_IF_ERROR(get(*b, "control_thread", &o->control_thread));
    if (const toml::node* n = b->get("loop_nice")) {
      auto v = n->value<int64_t>();
      if (!v || *v < 0 || *v > 19) return invalid_argument("'loop_nice' must be an integer 0..19");
      o->loop_nice = static_cast<int>(*v);
    }
    MYELIN_RETURN_IF_ERROR(get_parsed(*b, "loop_scheduling", "\"normal\" or \"idle\"",
                                      parse_bulk_scheduling, &o->loop_scheduling));
    MYELIN_RETURN_IF_ERROR(get_parsed(*b, "control_scheduling", "\"normal\" or \"rr\"",
                                      parse_control_scheduling, &o->control_scheduling));
    if (const toml::node* n = b->get("spin_before_block_us")) {
      auto v = n->value<int64_t>();
      if (!v || *v < 0 || *v > 100'000)
        return invalid_argument("'spin_before_block_us' must be an integer 0..100000");
      o->spin_before_block_us = *v;
    }
    MYELIN_RETURN_IF_ERROR(get_int(*b, "numa_node", -1, kMaxNumaNode, &o->numa_node));
    MYELIN_RETURN_IF_ERROR(get(*b, "nic", &o->nic));
    MYELIN_RETURN_IF_ERROR(get_parsed(*b, "control_cpus", "a CPU list such as \"0\" or \"0-1,4\"",
                                      parse_control_cpu_list, &o->control_cpus));
    if (const toml::node* n = b->get("control_cpus_hold_ms")) {
      auto v = n->value<int64_t>();
      if (!v || *v < 1 || *v > 3'600'000)
        return invalid_argument("'control_cpus_hold_ms' must be an integer 1..3600000");
      o->control_cpus_hold_ms = *v;
    }
  }
  if (const toml::node* tn = root.get("topic")) {
    const toml::array* arr = tn->as_array();
    if (!arr) return invalid_argument("'topic' must be an array of tables ([[topic]])");
    for (const auto& e : *arr) {
      const toml::table* t = e.as_table();
      if (!t) return invalid_argument("'topic' must be an array of tables ([[topic]])");
      MYELIN_RETURN_IF_ERROR(check_keys(
          *t, {"pattern", "lane", "overflow", "batching", "max_delivery_attempts"}, "[[topic]]"));
      TopicPolicy p;
      if (!t->contains("pattern")) return invalid_argument("[[topic]] needs a 'pattern'");
      MYELIN_RETURN_IF_ERROR(get(*t, "pattern", &p.pattern));
      Status ps = validate_pattern(p.pattern);
      if (!ps.ok()) return std::move(ps).with_context("[[topic]] pattern");
      std::string lane = "bulk", overflow = "block";
      MYELIN_RETURN_IF_ERROR(get(*t, "lane", &lane));
      MYELIN_RETURN_IF_ERROR(get(*t, "overflow", &overflow));
      MYELIN_ASSIGN_OR_RETURN(p.lane, parse_lane(lane));
      MYELIN_ASSIGN_OR_RETURN(p.overflow, parse_overflow_policy(overflow));
      MYELIN_RETURN_IF_ERROR(get(*t, "batching", &p.batching));
      MYELIN_RETURN_IF_ERROR(get_int(*t, "max_delivery_attempts", 1, kMaxDeliveryAttemptsLimit,
                                     &p.max_delivery_attempts));
      o->broker.policies.push_back(p);
    }
  }
  if (const toml::node* cn = root.get("client")) {
    const toml::array* arr = cn->as_array();
    if (!arr) return invalid_argument("'client' must be an array of tables ([[client]])");
    for (const auto& e : *arr) {
      const toml::table* t = e.as_table();
      if (!t) return invalid_argument("'client' must be an array of tables ([[client]])");
      MYELIN_RETURN_IF_ERROR(check_keys(
          *t, {"identity", "publish", "subscribe", "rate_limit_msgs", "rate_limit_burst"},
          "[[client]]"));
      AclEntry a;
      if (!t->contains("identity")) return invalid_argument("[[client]] needs an 'identity'");
      MYELIN_RETURN_IF_ERROR(get(*t, "identity", &a.identity));
      MYELIN_RETURN_IF_ERROR(get_list(*t, "publish", &a.publish));
      MYELIN_RETURN_IF_ERROR(get_list(*t, "subscribe", &a.subscribe));
      MYELIN_RETURN_IF_ERROR(get(*t, "rate_limit_msgs", &a.rate_limit_msgs_per_s));
      MYELIN_RETURN_IF_ERROR(get(*t, "rate_limit_burst", &a.rate_limit_burst));
      o->acl.push_back(a);
    }
  }
  if (const toml::table* p = root["ps"].as_table()) {
    MYELIN_RETURN_IF_ERROR(check_keys(
        *p,
        {"enabled", "workers", "mode", "aggregation", "optimizer", "lr", "momentum", "staleness"},
        "[ps]"));
    MYELIN_RETURN_IF_ERROR(get(*p, "enabled", &o->enable_ps));
    MYELIN_RETURN_IF_ERROR(get_int(*p, "workers", 1, kMaxPsWorkers, &o->ps.num_workers));
    std::string mode = "sync", agg = "mean", optimizer = "sgd";
    double lr = 0.1, momentum = 0.9;
    MYELIN_RETURN_IF_ERROR(get(*p, "mode", &mode));
    MYELIN_RETURN_IF_ERROR(get(*p, "aggregation", &agg));
    MYELIN_RETURN_IF_ERROR(get(*p, "optimizer", &optimizer));
    MYELIN_RETURN_IF_ERROR(get(*p, "lr", &lr));
    MYELIN_RETURN_IF_ERROR(get(*p, "momentum", &momentum));
    MYELIN_RETURN_IF_ERROR(
        get_int(*p, "staleness", 0, std::numeric_limits<int64_t>::max(), &o->ps.staleness_bound));
    if (!(lr > 0)) return invalid_argument("[ps] 'lr' = ", lr, " must be positive");
    if (mode != "sync" && mode != "async")
      return invalid_argument("[ps] mode '", message_excerpt(mode), "': sync or async");
    if (agg != "sum" && agg != "mean")
      return invalid_argument("[ps] aggregation '", message_excerpt(agg), "': sum or mean");
    o->ps.mode = mode == "sync" ? PsMode::kSync : PsMode::kAsync;
    o->ps.aggregation = agg == "sum" ? Aggregation::kSum : Aggregation::kMean;
    if (optimizer == "sgd")
      o->ps.optimizer = std::make_shared<SgdOptimizer>(static_cast<float>(lr));
    else if (optimizer == "momentum")
      o->ps.optimizer =
          std::make_shared<MomentumOptimizer>(static_cast<float>(lr), static_cast<float>(momentum));
    else
      return invalid_argument("[ps] optimizer '", message_excerpt(optimizer), "': sgd or momentum");
  }
  return ok_status();
}

}  // namespace myelin::broker::tool
