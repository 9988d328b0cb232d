// myelin/broker/control_cpus.hpp
//
// CPUs kept free of bulk work while control messages flow (ServerOptions::control_cpus,
// ClientOptions::control_cpus, the daemon's `control_cpus`).
//
// On a kernel that does not preempt kernel code (preempt=none or voluntary), a woken control
// thread whose CPU is inside a bulk thread's system call waits until that call returns: a send or
// receive of a few hundred KiB on a loopback or fast TCP connection copies the bytes and runs the
// peer's protocol work in the same call, 0.3 to 1 ms. Priorities, real-time policies and short
// time slices act only once the bulk thread leaves the kernel, so under a flood that keeps every
// CPU in such calls the control tail is set by them. A reservation removes the cause instead:
// while control traffic flows, every bulk thread of the process runs on the CPUs outside the
// reserved set, so a woken control thread finds a reserved CPU free at once.
//
// The reservation is per process and adaptive:
//  - Control threads are not pinned: the broker's control thread and an application's threads
//    in Client::poll() may run on any allowed CPU; the scheduler puts a woken one on an idle CPU,
//    and the reserved CPUs are idle of bulk. A thread that was kept off them for bulk gets its
//    own CPUs back when it turns to control (Client::poll(), a control-lane publish or
//    request), and before it connects a client or starts a broker, whose threads inherit its
//    CPUs.
//  - Bulk threads are the broker's loop thread, every client's I/O thread and every thread that
//    publishes, requests or pushes on the bulk lane (the call itself writes to the socket). Each
//    looks at the reservation at its checkpoints (a loop pass, a bulk publish): while control
//    traffic was seen within `hold_ms`, it runs on the allowed CPUs minus the reserved ones; once
//    control traffic stops for `hold_ms`, it gets its own CPU set back, so bulk alone (a
//    throughput run, a phase without control messages) uses every CPU.
//  - Control traffic is a control-lane publish or request that the broker's control thread
//    receives on a control connection, a control-lane publish or request that a client sends,
//    or a control-lane delivery or request that a client receives (heartbeats, credits,
//    acknowledgements and parameter-server operations do not count).
//  - A client with a control connection and a reservation leaves the bulk connection to its I/O
//    thread: a thread in Client::poll() reads only the control connection, so no bulk read runs on
//    a control thread.
// The cost, on a host where bulk needs every CPU: while control traffic flows, bulk runs on fewer
// CPUs (on two CPUs with one reserved, about a third less bulk throughput was measured); see
// docs/broker.md.
//
// Thread safety: every function is safe from any thread. reserve_control_cpus() sets the
// process's reservation once (the same set again is accepted); keep_bulk_off_control_cpus()
// changes only the calling thread's CPU set.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include <myelin/core/status.hpp>

namespace myelin::broker {

// How long control traffic keeps the reservation in force after the last control message, by
// default.
inline constexpr int64_t kDefaultControlHoldMs = 200;

// Parses a CPU list such as "0", "0, 2" or "0-1,4" (spaces around items allowed; ascending, no
// duplicates in the result); "" and "none" give an empty list. Errors: invalid_argument naming
// the text.
Result<std::vector<int>> parse_control_cpu_list(std::string_view text);

// Checks a reservation against the calling thread's allowed CPUs (sched_getaffinity): every CPU
// allowed, and at least one allowed CPU left for bulk; hold_ms in [1, 3600000]. Empty `cpus`:
// OK (no reservation). Errors: invalid_argument naming `what`, the CPUs and the allowed set.
Status validate_control_cpus(const std::vector<int>& cpus, int64_t hold_ms, std::string_view what);

// Reserves `cpus` for control threads in this process (validated as above against the calling
// thread's own CPUs). Empty: nothing. Calling it again with the same CPUs is accepted (the longer
// hold is kept); other CPUs fail with failed_precondition naming both sets, since a process has
// one reservation. The reservation lasts as long as the process: a failed connect() or a stopped
// Server does not end it.
Status reserve_control_cpus(const std::vector<int>& cpus, int64_t hold_ms);

// The process's reserved CPUs (empty: none).
std::vector<int> reserved_control_cpus();

// Whether this process has a reservation (one load).
bool control_cpus_reserved() noexcept;

// Records that a control message was handled now (one relaxed store; nothing without a
// reservation). Only a process with a reservation acts on it.
void note_control_traffic() noexcept;

// A bulk thread's checkpoint: without a reservation, one load and nothing else. With one, moves
// the calling thread off the reserved CPUs while control traffic was noted within the hold, and
// back to the CPUs it had before once the hold has passed (a CPU set changed meanwhile by other
// means is overwritten by that one). A thread whose CPU set cannot be changed (refused by the
// kernel, or it has no CPU outside the reservation) is left as it is, with one warning, and not
// tried again. May log (and so allocate).
void keep_bulk_off_control_cpus();

// A control thread's checkpoint: a thread that keep_bulk_off_control_cpus() moved gets its own
// CPUs back at once (one thread-local load when it was not moved). The library's own bulk
// threads (mark_this_thread_bulk()) keep their set, so that a handler on a client's I/O thread
// that publishes control does not move it back and forth per message, unless
// `even_library_bulk_thread` (before a thread starts others, which inherit its set). An
// application thread that starts threads of its own after it published bulk calls this first,
// or they inherit the narrowed set.
void restore_this_thread_cpus(bool even_library_bulk_thread = false);

// Marks the calling thread as one of the library's bulk threads (a broker loop, a client I/O
// thread); see restore_this_thread_cpus().
void mark_this_thread_bulk() noexcept;

// Whether the calling thread is kept off the reserved CPUs now (for tests and diagnostics).
bool this_thread_kept_off_control_cpus() noexcept;

}  // namespace myelin::broker
