// myelin/transport/bootstrap.hpp
//
// Bootstrap: the stores ranks exchange addresses through, and rank/size discovery.
//
//   MYELIN_ASSIGN_OR_RETURN(RankInfo me, discover_rank());            // Slurm, launcher or single
//   MYELIN_ASSIGN_OR_RETURN(auto store, connect_store(me.store_spec, me.rank));
//   MYELIN_RETURN_IF_ERROR(store->set(address_key(me.rank), ctx->address()));
//   ... later, lazily: ctx->connect(*store->get(address_key(peer), deadline))
//
// Stores:
//   - TcpStoreServer: a thread serving a Store over TCP. Protocol (little-endian): each request is
//     len u32 (≤ 16 MiB + 1 KiB) | op u8 (1 set, 2 get, 3 add, 4 contains) | key_len u16 (1..1024)
//     | key | op body (set: value_len u32 | value; add: delta i64). Each response is
//     len u32 | status u8 (0 ok, 1 not found, 2 bad request, 3 not a counter) | body (get: value;
//     add: i64; contains: u8). A malformed request gets "bad request" and its connection is closed.
//   - TcpStore: its client. Connects with a deadline, retrying with exponential backoff and jitter;
//     get() polls with backoff until the key exists or the deadline passes, and waits for each
//     answer no longer than that deadline (a store that accepts but never answers fails get() by
//     then, give or take 100 ms). set(), add() and contains() take no deadline: each waits for its
//     answer at most the request timeout (set_request_timeout(), 30 s by default).
//   - FileStore: one file per key in a directory on a shared filesystem; set() writes a temporary
//     file then renames it (readers never see a partial value); add() serialises through flock().
// Counters (add) are stored as decimal text, so get() of a counter returns e.g. "3".
//
// Thread safety: every Store may be used from several threads (calls are serialised inside).
// TcpStoreServer's methods may be called from any thread; its destructor stops and joins it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>
#include <myelin/transport/store.hpp>

namespace myelin::transport {

// The key a rank publishes its Context address under: "myelin/addr/<rank>".
std::string address_key(int rank);

class TcpStoreServer {
 public:
  // Listens on host:port (host: an IPv4 address or name; "" or "0.0.0.0" = all; port 0 = any).
  static Result<std::unique_ptr<TcpStoreServer>> start(const std::string& host, uint16_t port);
  ~TcpStoreServer();
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;
  [[nodiscard]] uint16_t port() const noexcept;

 private:
  struct Impl;
  explicit TcpStoreServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class TcpStore final : public Store {
 public:
  static Result<std::unique_ptr<TcpStore>> connect(const std::string& host, uint16_t port,
                                                   Deadline deadline);
  ~TcpStore() override;
  // How long set(), add() and contains() wait for the store's answer, and the most any one answer
  // to get() is waited for. Callers with a deadline of their own (a tool's --timeout) set it.
  void set_request_timeout(std::chrono::nanoseconds timeout);
  static constexpr std::chrono::nanoseconds kDefaultRequestTimeout = std::chrono::seconds(30);
  using Store::set;
  Status set(std::string_view key, std::span<const uint8_t> value) override;
  Result<std::vector<uint8_t>> get(std::string_view key, Deadline deadline) override;
  Result<int64_t> add(std::string_view key, int64_t delta) override;
  Result<bool> contains(std::string_view key) override;

 private:
  struct Impl;
  explicit TcpStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class FileStore final : public Store {
 public:
  // Creates the directory if needed.
  static Result<std::unique_ptr<FileStore>> open(const std::string& directory);
  using Store::set;
  Status set(std::string_view key, std::span<const uint8_t> value) override;
  Result<std::vector<uint8_t>> get(std::string_view key, Deadline deadline) override;
  Result<int64_t> add(std::string_view key, int64_t delta) override;
  Result<bool> contains(std::string_view key) override;

 private:
  explicit FileStore(std::string directory) : dir_(std::move(directory)) {}
  [[nodiscard]] std::string path_for(std::string_view key) const;
  std::string dir_;
};

// "tcp://host:port": rank 0 starts a TcpStoreServer there and every rank (rank 0 included)
// returns a client; "file:///path": a FileStore. Other specs are invalid_argument.
Result<std::unique_ptr<Store>> connect_store(std::string_view spec, int rank,
                                             Deadline deadline = Deadline::after_ms(60000));

// Who this process is in the job.
struct RankInfo {
  int rank = 0;
  int size = 1;
  int local_rank = 0;  // among the ranks on this node
  int local_size = 1;
  std::string node_id;     // node name (Slurm) or this host's name
  std::string source;      // "slurm", "launcher", "explicit" or "single"
  std::string store_spec;  // from MYELIN_STORE ("tcp://host:port"); empty when not given
};

// Builds a RankInfo from explicit values, checking them (local_* < 0: rank/size on one node).
Result<RankInfo> make_rank_info(int rank, int size, int local_rank = -1, int local_size = -1);

// Reads the environment (getenv by default; tests pass their own lookup):
//   - a local launcher: MYELIN_RANK, MYELIN_SIZE, optional MYELIN_LOCAL_RANK/MYELIN_LOCAL_SIZE,
//     MYELIN_STORE=host:port (or a tcp:// / file:// spec);
//   - else Slurm: SLURM_PROCID, SLURM_NTASKS (or SLURM_NPROCS), SLURM_LOCALID, SLURM_NODEID,
//     SLURM_JOB_NODELIST (node names, e.g. "n[1-3],gpu7"), SLURM_NTASKS_PER_NODE or
//     SLURM_TASKS_PER_NODE ("2(x3),1") for local_size, MYELIN_STORE;
//   - else a single process (rank 0 of 1).
// Missing companions, non-integers and inconsistent values are invalid_argument naming the
// variables.
using EnvLookup = std::function<const char*(const char*)>;
Result<RankInfo> discover_rank(const EnvLookup& env = {});

// Expands a Slurm hostlist ("n[01-03,7],login") into names; invalid_argument when malformed.
Result<std::vector<std::string>> expand_hostlist(std::string_view list);

}  // namespace myelin::transport
