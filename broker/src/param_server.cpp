#include <myelin/broker/param_server.hpp>

#include <algorithm>

namespace myelin::broker {

uint32_t shard_of(std::string_view key, uint32_t num_servers) noexcept {
  uint64_t h = 1469598103934665603ull;
  for (char c : key) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ull;
  }
  return num_servers == 0 ? 0 : static_cast<uint32_t>(h % num_servers);
}

void SgdOptimizer::apply(std::string_view, std::span<float> p, std::span<const float> g) {
  for (size_t i = 0; i < p.size(); ++i) p[i] -= lr_ * g[i];
}

void MomentumOptimizer::apply(std::string_view key, std::span<float> p, std::span<const float> g) {
  auto& v = velocity_[std::string(key)];
  if (v.size() != p.size()) v.assign(p.size(), 0.0f);
  for (size_t i = 0; i < p.size(); ++i) {
    v[i] = mu_ * v[i] + g[i];
    p[i] -= lr_ * v[i];
  }
}

ParameterServer::ParameterServer(ParameterServerOptions o) : opt_(std::move(o)) {
  if (!opt_.optimizer) opt_.optimizer = std::make_shared<SgdOptimizer>(1.0f);
  if (opt_.num_workers == 0) opt_.num_workers = 1;
}

Status ParameterServer::init_key(std::string_view key, std::vector<float> initial) {
  std::lock_guard<std::mutex> lock(mu_);
  auto [it, fresh] = keys_.try_emplace(std::string(key));
  if (!fresh) return already_exists("parameter key '", key, "'");
  it->second.acc.assign(initial.size(), 0.0f);
  it->second.params = std::move(initial);
  return ok_status();
}

Status ParameterServer::push(uint32_t worker, std::string_view key, std::span<const float> grad,
                             uint64_t step) {
  if (worker >= opt_.num_workers) {
    return invalid_argument("worker ", worker, " out of range (", opt_.num_workers, " workers)");
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = keys_.find(std::string(key));
  if (it == keys_.end()) return not_found("parameter key '", key, "'");
  Key& k = it->second;
  if (grad.size() != k.params.size()) {
    return invalid_argument("gradient for '", key, "' has ", grad.size(), " elements, expected ",
                            k.params.size());
  }
  const float scale =
      opt_.aggregation == Aggregation::kMean ? 1.0f / static_cast<float>(opt_.num_workers) : 1.0f;
  if (opt_.mode == PsMode::kAsync) {
    if (step > k.version)
      return failed_precondition("push for version ", step, " ahead of ", k.version);
    if (k.version - step > opt_.staleness_bound) {
      return out_of_range("push for version ", step, " is ", k.version - step,
                          " versions stale, bound ", opt_.staleness_bound);
    }
    for (size_t i = 0; i < grad.size(); ++i) k.acc[i] = grad[i] * scale;
    opt_.optimizer->apply(key, k.params, k.acc);
    k.version++;
    cv_.notify_all();
    return ok_status();
  }
  if (step != k.version) {
    return failed_precondition("push for step ", step, " of '", key, "' while step ", k.version,
                               " is open");
  }
  if (!k.pushed.insert(worker).second) {
    return already_exists("worker ", worker, " already pushed step ", step, " of '", key, "'");
  }
  for (size_t i = 0; i < grad.size(); ++i) k.acc[i] += grad[i];
  if (k.pushed.size() == opt_.num_workers) {
    for (float& a : k.acc) a *= scale;
    opt_.optimizer->apply(key, k.params, k.acc);
    std::fill(k.acc.begin(), k.acc.end(), 0.0f);
    k.pushed.clear();
    k.version++;
    cv_.notify_all();
  }
  return ok_status();
}

Result<bool> ParameterServer::try_pull(std::string_view key, uint64_t min_version,
                                       std::vector<float>* out, uint64_t* version) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = keys_.find(std::string(key));
  if (it == keys_.end()) return not_found("parameter key '", key, "'");
  if (it->second.version < min_version) return false;
  *out = it->second.params;
  *version = it->second.version;
  return true;
}

Result<uint64_t> ParameterServer::pull(std::string_view key, uint64_t min_version,
                                       std::span<float> out, Deadline deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = keys_.find(std::string(key));
  if (it == keys_.end()) return not_found("parameter key '", key, "'");
  Key& k = it->second;
  if (out.size() != k.params.size()) {
    return invalid_argument("pull buffer for '", key, "' has ", out.size(), " elements, expected ",
                            k.params.size());
  }
  while (k.version < min_version) {
    if (deadline.expired()) {
      return timeout_error("'", key, "' is at version ", k.version, ", waited for ", min_version);
    }
    if (deadline.is_never())
      cv_.wait(lock);
    else
      cv_.wait_for(lock, std::chrono::nanoseconds(deadline.remaining_ns()));
  }
  std::copy(k.params.begin(), k.params.end(), out.begin());
  return k.version;
}

Result<size_t> ParameterServer::key_size(std::string_view key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = keys_.find(std::string(key));
  if (it == keys_.end()) return not_found("parameter key '", key, "'");
  return it->second.params.size();
}

}  // namespace myelin::broker
