// tools/myelin-train/trainer.hpp — one process's part of a myelin-train run.
//
// Roles: a worker computes gradients on its shard of each global batch and exchanges them
// (allreduce mode: through collectives; ps mode: push/pull through parameter servers); a server
// (ps mode only) holds a shard of the parameters in an embedded broker. Control messages — the
// step barrier at each check point with the learning rate decided by worker 0, and stop — travel
// on the broker's control lane ("ctrl/step"), hosted by worker 0 (allreduce mode) or server 0
// (ps mode), or by an external broker (TrainConfig::broker). Everything else is found through the
// bootstrap store.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <myelin/core/status.hpp>

#include "model.hpp"

namespace myelin::train {

enum class Mode { kAllreduce, kPs };

struct TrainConfig {
  Mode mode = Mode::kAllreduce;
  int workers = 4;
  int servers = 2;  // ps mode
  ModelShape shape;
  size_t global_batch = 64;
  uint64_t steps = 60;
  float lr = 0.05f;
  float lr_decay = 0.5f;      // applied at a check point when the loss stopped improving
  uint64_t check_every = 10;  // steps between control check points
  double target_loss = 0;     // stop early below this global loss (0: never)
  uint64_t seed = 1;
  std::string transport = "auto";
  std::string algorithm = "auto";      // allreduce algorithm
  std::string progress_mode = "auto";  // busy|block|auto (block when ranks outnumber cores)
  bool deterministic = false;          // allgather + rank-ordered sum: bit-exact with the reference
  bool verify = false;                 // worker 0 replays the run serially and compares
  bool json = false;
  bool progress = true;  // live progress line (only on a terminal)
  int64_t timeout_ms = 60000;
  std::string secret;      // job secret for the broker (MYELIN_JOB_SECRET)
  std::string store_spec;  // bootstrap store (MYELIN_STORE)
  // An external control broker (host:port, e.g. a myelin-broker started by the batch script):
  // when set, no role hosts the control broker and everyone connects here with `secret`.
  std::string broker;
};

// What the serial replay must reproduce of a run's learning-rate schedule.
struct ScheduleState {
  float lr = 0;
  double best_loss = 1e300;
  bool stop = false;
};
// The schedule rule worker 0 applies at a check point, shared with the serial replay.
void apply_check_point(const TrainConfig& config, uint64_t step, double global_loss,
                       ScheduleState& state);

// Runs this process's role; returns the process exit code's Status.
Status run_worker(const TrainConfig& config, int rank);
Status run_server(const TrainConfig& config, int server_index);

// The serial reference: the same model, data, shards, summation order and schedule as the
// distributed run, in one process. Returns the final parameters.
std::vector<float> serial_reference(const TrainConfig& config, std::vector<double>* losses);

}  // namespace myelin::train
