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
// Thread safety: every function is safe from any thread; apply_to_this_thread() changes only the
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

}  // namespace myelin::broker
