// myelin/transport/options.hpp
//
// How a transport Context is configured. Build an Options with designated initialisers:
//
//   auto ctx = Context::create({.backend = Backend::kTcp, .timeout = std::chrono::seconds(10)});
//
// Environment variables are an overlay, applied only by Options::with_env_overlay():
//   MYELIN_TRANSPORT=auto|shm|tcp|ucx|verbs   MYELIN_DEVICE=<name>   MYELIN_NUMA_NODE=<n>
//   MYELIN_PROGRESS=busy|block|yield|auto     MYELIN_TIMEOUT_MS=<ms>
//   MYELIN_SPIN_US=<us> (spin_before_block)   MYELIN_LOCAL_SIZE=<n> (local_ranks, when unset)
//   MYELIN_TCP_IFACE / MYELIN_TCP_ADDR (address the TCP backend listens on; default: hostname's)
//   MYELIN_TCP_LOCAL_SNDBUF=<bytes> (tcp_local_send_buffer; 0 = the kernel's autotuning)
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <myelin/core/status.hpp>

namespace myelin::transport {

// A transport backend. kAuto picks per peer: shm on the same node, otherwise the best network
// backend present (verbs with an active port, else ucx, else tcp).
enum class Backend : uint8_t { kAuto = 0, kShm, kTcp, kUcx, kVerbs };

std::string_view backend_name(Backend b) noexcept;  // "auto", "shm", "tcp", "ucx", "verbs"
Result<Backend> parse_backend(std::string_view name);

// How waits are driven.
//   kBusyPoll      spins on the progress engine (lowest latency, one core busy per Context).
//   kSpinThenBlock spins for spin_before_block, then sleeps on an fd (eventfd, epoll, completion
//                  channel) until an event or the deadline: a kernel wake-up per sleep.
//   kPollYield     polls like kBusyPoll for a short spin (kYieldSpinPolls polls), then calls
//                  sched_yield() after every poll that finds nothing: the CPU goes to another
//                  runnable process (a peer rank on an oversubscribed node) and comes back
//                  without a kernel wake-up; after spin_before_block of that it sleeps like
//                  kSpinThenBlock where its backends can wake it (TCP, and shm, which a yielding
//                  Context opens for sleeping; not UCX). For more ranks than CPUs on a node.
//   kAuto          kBusyPoll, or kPollYield once the Context learns (Options::local_ranks, or
//                  Context::set_local_ranks(), which a collectives Communicator calls) that more
//                  ranks share this node than it has CPUs (usable_cpus()); a Context whose only
//                  backend is TCP then blocks instead (resolve_progress_mode()). Where such a
//                  TCP-only Context busy-polls, a wait whose thread keeps waiting for a CPU
//                  (other work on the host) blocks for a while instead, then spins again
//                  (docs/transport.md, "auto on a shared host").
// Every mode honours each wait's deadline.
enum class ProgressMode : uint8_t { kBusyPoll = 0, kSpinThenBlock, kPollYield, kAuto };

std::string_view progress_mode_name(ProgressMode m) noexcept;  // "busy", "block", "yield", "auto"
Result<ProgressMode> parse_progress_mode(std::string_view name);

// kPollYield: polls of a wait before its first sched_yield().
constexpr int kYieldSpinPolls = 32;

// CPUs the calling thread may run on: the online CPUs, bounded by this process's cpuset cgroup
// and by the thread's affinity mask (sched_getaffinity); at least 1. Ranks bound to one CPU each
// see 1 here, whether each has a core of its own (srun --cpu-bind, mpirun's binding) or all
// share it (taskset on the launcher): so Options::local_ranks / Context::set_local_ranks() count
// the ranks that share this rank's CPUs, which a collectives Communicator learns from the other
// ranks' masks.
int usable_cpus() noexcept;

// Of `node_ranks` ranks on this node, about how many share this rank's CPUs, for a launcher that
// says only how many ranks the node runs (MYELIN_LOCAL_SIZE): all of them when this thread may
// run on every CPU of the node, else the node's ranks spread evenly over its CPUs —
// ceil(node_ranks x usable_cpus() / node CPUs), at least 1. Ranks bound to one CPU each (srun
// --cpu-bind) then count 1 and busy-poll; ranks all bound to the same CPU cannot be told apart
// from those without the other ranks' masks, which a collectives Communicator exchanges
// (Context::set_local_ranks()). node_ranks <= 0 is returned as it is (unknown).
int ranks_sharing_cpus(int node_ranks) noexcept;

// The mode a Context runs for `requested`: kAuto becomes kPollYield when local_ranks > cpus (both
// known, i.e. > 0) — kSpinThenBlock instead when `tcp_only` (every backend of the Context is TCP,
// whose sockets wake a sleeper in any mode: on loopback, sleeping lets the kernel's delivery run,
// and measured here it beat yielding 2x) — else kBusyPoll; the other modes stay as they are.
// `why` (optional) receives a sentence saying which and why.
ProgressMode resolve_progress_mode(ProgressMode requested, int local_ranks, int cpus,
                                   std::string* why = nullptr, bool tcp_only = false);

struct Options {
  Backend backend = Backend::kAuto;
  // Device to use: verbs device ("mlx5_0", "rxe0"), UCX device list, or network interface for TCP.
  // Empty: the backend chooses (and logs why).
  std::string device;
  // Address the TCP backend listens on ("127.0.0.1", "0.0.0.0", an interface address). Empty: the
  // address of this host's name, falling back to loopback.
  std::string listen_address;
  // NUMA node for buffers and progress; -1 = the node of the device, else no binding.
  int numa_node = -1;
  // kAuto by default: kBusyPoll unless this node is known to be oversubscribed (see above).
  ProgressMode progress = ProgressMode::kAuto;
  // Ranks (processes or threads with a Context each) driving progress on this process's CPUs
  // (usable_cpus(): without pinning, every rank on this node); 0 = unknown. Only
  // ProgressMode::kAuto reads it (MYELIN_LOCAL_SIZE when the overlay finds it unset).
  int local_ranks = 0;
  std::chrono::nanoseconds spin_before_block = std::chrono::microseconds(50);
  // Default deadline for connects and for waits that are not given one.
  std::chrono::milliseconds timeout = std::chrono::seconds(30);
  // Two-sided messages up to this size are copied through bounce buffers (eager); larger ones use
  // rendezvous into the receiver's buffer. 0 = the backend's default.
  size_t eager_limit = 0;
  // Largest two-sided message accepted; larger sends fail with invalid_argument.
  size_t max_message_size = size_t{1} << 32;
  // Send buffer (SO_SNDBUF: the bytes asked for; Linux doubles them) of TCP connections whose two
  // ends are on this host (the peer on loopback, or this host's address at both ends); 0 leaves
  // the kernel's autotuning (up to net.ipv4.tcp_wmem's maximum). Connections to other hosts
  // always keep the autotuning. At most kMaxTcpLocalSendBuffer.
  size_t tcp_local_send_buffer = size_t{256} << 10;
  // Human-readable identity for logs and errors ("rank 3"); empty = "pid N@host".
  std::string name;

  // Returns a copy with MYELIN_* environment variables applied on top; bad values are errors.
  [[nodiscard]] Result<Options> with_env_overlay() const;
  // Checks ranges and combinations.
  [[nodiscard]] Status validate() const;
};

constexpr size_t kMaxTcpLocalSendBuffer = size_t{64} << 20;

// Size classes of two-sided messages; each backend reports its limits.
enum class SizeClass : uint8_t {
  kInline,    // fits in the descriptor itself: no registration, no bounce buffer
  kEager,     // copied through pre-registered bounce buffers on both sides
  kZeroCopy,  // moved straight between registered user buffers (rendezvous / one-sided)
};

struct Limits {
  size_t max_inline = 0;
  size_t eager_limit = 0;
  size_t max_message = 0;
  [[nodiscard]] SizeClass classify(size_t size) const noexcept {
    if (size <= max_inline) return SizeClass::kInline;
    if (size <= eager_limit) return SizeClass::kEager;
    return SizeClass::kZeroCopy;
  }
};

}  // namespace myelin::transport
