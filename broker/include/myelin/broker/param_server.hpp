// myelin/broker/param_server.hpp
//
// Parameter server shard: keys (tensors of f32) sharded over server ranks by shard_of(); each rank
// holds a ParameterServer for its keys. Workers push gradients for a step and pull parameters.
//
//  - Synchronous mode: step s of a key completes when all `num_workers` workers pushed step s;
//    then the gradients are aggregated (sum or mean), the optimiser updates the parameters and the
//    key's version becomes s + 1. A push for another step is refused (failed_precondition), a
//    second push of one worker for the same step is refused (already_exists).
//  - Asynchronous, bounded staleness: a push computed on version v is applied at once (mean
//    divides by num_workers) when version - v <= staleness_bound, else refused (out_of_range);
//    every applied push advances the version by one.
//  - pull(key, min_version) returns the parameters once the key's version >= min_version, waiting
//    until a deadline.
// The optimiser is a hook; plain SGD and momentum SGD are built in.
//
// Thread safety: every method may be called from any thread (one mutex; waiters use a condvar).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

namespace myelin::broker {

// Which server rank owns `key` (FNV-1a of the key, modulo the number of servers).
[[nodiscard]] uint32_t shard_of(std::string_view key, uint32_t num_servers) noexcept;

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // Applies an aggregated gradient to `params` (same size). Called under the server's lock.
  virtual void apply(std::string_view key, std::span<float> params,
                     std::span<const float> grad) = 0;
};

class SgdOptimizer final : public Optimizer {
 public:
  explicit SgdOptimizer(float lr) : lr_(lr) {}
  void apply(std::string_view key, std::span<float> params, std::span<const float> grad) override;

 private:
  float lr_;
};

// v = mu * v + g; p -= lr * v (velocity kept per key).
class MomentumOptimizer final : public Optimizer {
 public:
  MomentumOptimizer(float lr, float momentum) : lr_(lr), mu_(momentum) {}
  void apply(std::string_view key, std::span<float> params, std::span<const float> grad) override;

 private:
  float lr_, mu_;
  std::unordered_map<std::string, std::vector<float>> velocity_;
};

enum class PsMode : uint8_t { kSync, kAsync };
enum class Aggregation : uint8_t { kSum, kMean };

struct ParameterServerOptions {
  uint32_t num_workers = 1;
  PsMode mode = PsMode::kSync;
  Aggregation aggregation = Aggregation::kMean;
  uint64_t staleness_bound = 0;          // async only
  std::shared_ptr<Optimizer> optimizer;  // null: SGD with lr 1 (params -= aggregated gradient)
};

class ParameterServer {
 public:
  explicit ParameterServer(ParameterServerOptions o);

  // Creates a key with initial parameters (version 0). Errors: already_exists.
  Status init_key(std::string_view key, std::vector<float> initial);
  // Errors: not_found (key), invalid_argument (size or worker out of range), failed_precondition
  // / already_exists / out_of_range as described above.
  Status push(uint32_t worker, std::string_view key, std::span<const float> grad, uint64_t step);
  // Copies the parameters into `out` (must have the key's size) once version >= min_version;
  // returns the version. Errors: not_found, invalid_argument (size), timeout_error.
  Result<uint64_t> pull(std::string_view key, uint64_t min_version, std::span<float> out,
                        Deadline deadline);
  // Non-blocking pull: false while version < min_version.
  Result<bool> try_pull(std::string_view key, uint64_t min_version, std::vector<float>* out,
                        uint64_t* version);
  Result<size_t> key_size(std::string_view key) const;
  [[nodiscard]] const ParameterServerOptions& options() const noexcept { return opt_; }

 private:
  struct Key {
    std::vector<float> params, acc;
    uint64_t version = 0;
    std::set<uint32_t> pushed;  // sync: workers that pushed the current step
  };
  ParameterServerOptions opt_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<std::string, Key> keys_;
};

}  // namespace myelin::broker
