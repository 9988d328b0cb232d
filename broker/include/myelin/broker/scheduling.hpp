// myelin/broker/scheduling.hpp
//
// How a thread that carries only bulk traffic is scheduled against the threads that carry control
// messages: the broker's loop thread (ServerOptions::loop_scheduling, with the control thread) and
// the client's I/O thread (ClientOptions::io_thread_scheduling, with a control connection and a
// thread in poll()).
//
//  - kNormal: the default policy (SCHED_OTHER) at the thread's nice value.
//  - kIdle: SCHED_IDLE. The thread runs whenever no thread of another policy wants its CPU, and a
//    woken thread of another policy preempts it at once (the kernel's fair scheduler, CFS and
//    EEVDF alike), instead of waiting for the end of its slice or for a lag to be earned back
//    as a lowered nice value does. The cost: while other work keeps every CPU busy the thread
//    gets a very small share (weight 3 against 1024 for nice 0, below nice 19's 15), so bulk slows
//    to a crawl on a host busy with other work. The preemption holds between threads of one
//    scheduling group (one process, or processes of one autogroup session or cgroup); across
//    groups the groups compete, not the threads. A thread may lower itself to SCHED_IDLE without
//    privilege, but may not return to SCHED_OTHER without CAP_SYS_NICE or an RLIMIT_NICE that
//    allows its nice value (20 for nice 0), so a thread that took it keeps it until it ends.
//
// And how a thread that carries control messages is scheduled: the broker's control thread
// (ServerOptions::control_scheduling), and an application's own threads that call
// Client::poll() for control messages, which it may put under it with
// apply_control_scheduling_to_this_thread().
//
//  - kNormal: as the thread is.
//  - kRealtime ("rr"): SCHED_RR at the lowest real-time priority (1). A woken real-time thread
//    runs at once, ahead of every SCHED_OTHER thread on its CPU, where a fair-class thread may wait
//    for the running one's slice or for the next tick (milliseconds) on a host whose CPUs bulk
//    keeps busy. It needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1; without them
//    apply_control_scheduling_to_this_thread() fails and the thread keeps its policy. A
//    real-time thread does not spin before it sleeps (spin_before_block_us): the broker's
//    control thread under it and a Client::poll() caller under a real-time policy sleep at once,
//    since a real-time spinner's yields give way to real-time threads only and would keep bulk
//    off its CPU for the whole spin. The kernel's real-time throttling (sched_rt_runtime_us, by
//    default 0.95 s of every second) bounds what real-time threads take of a CPU.
//
// Thread safety: every function is safe from any thread; the apply_* functions change only the
// calling thread.
#pragma once

#include <cstdint>
#include <string_view>

#include <myelin/core/status.hpp>

namespace myelin::broker {

enum class BulkScheduling : uint8_t {
  kNormal = 0,
  kIdle = 1,
};

// "normal" or "idle"; "invalid" for a value outside the enumeration.
std::string_view bulk_scheduling_name(BulkScheduling s) noexcept;

// Parses "normal" or "idle". Errors: invalid_argument naming the text and the accepted values.
Result<BulkScheduling> parse_bulk_scheduling(std::string_view text);

// OK for a value of the enumeration; invalid_argument (naming `what`) for anything else, such as
// an integer cast into it.
Status validate_bulk_scheduling(BulkScheduling s, std::string_view what);

// Gives the calling thread this scheduling: kNormal leaves it as it is, kIdle switches it to
// SCHED_IDLE. Errors: errno_status of pthread_setschedparam (the thread keeps its policy then).
Status apply_bulk_scheduling_to_this_thread(BulkScheduling s);

enum class ControlScheduling : uint8_t {
  kNormal = 0,
  kRealtime = 1,
};

// "normal" or "rr"; "invalid" for a value outside the enumeration.
std::string_view control_scheduling_name(ControlScheduling s) noexcept;

// Parses "normal" or "rr". Errors: invalid_argument naming the text and the accepted values.
Result<ControlScheduling> parse_control_scheduling(std::string_view text);

// OK for a value of the enumeration; invalid_argument (naming `what`) for anything else.
Status validate_control_scheduling(ControlScheduling s, std::string_view what);

// Gives the calling thread this scheduling: kNormal leaves it as it is, kRealtime switches it to
// SCHED_RR at priority 1. Errors: errno_status of pthread_setschedparam (EPERM without
// CAP_SYS_NICE or RLIMIT_RTPRIO; the thread keeps its policy then).
Status apply_control_scheduling_to_this_thread(ControlScheduling s);

// Whether the calling thread runs under a real-time policy (SCHED_FIFO or SCHED_RR). Cached per
// thread: apply_control_scheduling_to_this_thread() sets it, and one system call every 64th call
// refreshes it, so a policy changed by other means is seen within 64 calls.
bool this_thread_is_realtime() noexcept;

}  // namespace myelin::broker
