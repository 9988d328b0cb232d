// Scheduling of the threads that carry only bulk traffic (see scheduling.hpp).
#include <myelin/broker/scheduling.hpp>

#include <pthread.h>
#include <sched.h>

namespace myelin::broker {

std::string_view bulk_scheduling_name(BulkScheduling s) noexcept {
  switch (s) {
    case BulkScheduling::kNormal:
      return "normal";
    case BulkScheduling::kIdle:
      return "idle";
  }
  return "invalid";
}

Result<BulkScheduling> parse_bulk_scheduling(std::string_view text) {
  if (text == "normal") return BulkScheduling::kNormal;
  if (text == "idle") return BulkScheduling::kIdle;
  return invalid_argument("scheduling '", text, "' is neither normal nor idle");
}

Status validate_bulk_scheduling(BulkScheduling s, std::string_view what) {
  if (s == BulkScheduling::kNormal || s == BulkScheduling::kIdle) return ok_status();
  return invalid_argument(what, " ", static_cast<int>(s), " is neither normal (0) nor idle (1)");
}

Status apply_bulk_scheduling_to_this_thread(BulkScheduling s) {
  MYELIN_RETURN_IF_ERROR(validate_bulk_scheduling(s, "scheduling"));
  if (s == BulkScheduling::kNormal) return ok_status();
  // SCHED_IDLE takes no priority (it must be 0). pthread_setschedparam acts on this thread only
  // and returns the error number instead of setting errno.
  const sched_param param{};
  const int rc = ::pthread_setschedparam(::pthread_self(), SCHED_IDLE, &param);
  if (rc != 0) return errno_status("pthread_setschedparam(SCHED_IDLE)", rc);
  return ok_status();
}

std::string_view control_scheduling_name(ControlScheduling s) noexcept {
  switch (s) {
    case ControlScheduling::kNormal:
      return "normal";
    case ControlScheduling::kRealtime:
      return "rr";
  }
  return "invalid";
}

Result<ControlScheduling> parse_control_scheduling(std::string_view text) {
  if (text == "normal") return ControlScheduling::kNormal;
  if (text == "rr") return ControlScheduling::kRealtime;
  return invalid_argument("scheduling '", text, "' is neither normal nor rr");
}

Status validate_control_scheduling(ControlScheduling s, std::string_view what) {
  if (s == ControlScheduling::kNormal || s == ControlScheduling::kRealtime) return ok_status();
  return invalid_argument(what, " ", static_cast<int>(s), " is neither normal (0) nor rr (1)");
}

namespace {
// this_thread_is_realtime()'s answer, asked again every kRealtimeRecheck calls.
constexpr int kRealtimeRecheck = 64;
struct RealtimeCache {
  bool realtime = false;
  int calls_left = 0;
};
thread_local RealtimeCache tl_realtime;
}  // namespace

Status apply_control_scheduling_to_this_thread(ControlScheduling s) {
  MYELIN_RETURN_IF_ERROR(validate_control_scheduling(s, "scheduling"));
  if (s == ControlScheduling::kNormal) return ok_status();
  sched_param param{};
  param.sched_priority = ::sched_get_priority_min(SCHED_RR);
  const int rc = ::pthread_setschedparam(::pthread_self(), SCHED_RR, &param);
  if (rc != 0) return errno_status("pthread_setschedparam(SCHED_RR)", rc);
  tl_realtime = RealtimeCache{.realtime = true, .calls_left = kRealtimeRecheck};
  return ok_status();
}

bool this_thread_is_realtime() noexcept {
  if (--tl_realtime.calls_left <= 0) {
    // 0: the calling thread.
    const int policy = ::sched_getscheduler(0);
    tl_realtime.realtime = policy == SCHED_FIFO || policy == SCHED_RR;
    tl_realtime.calls_left = kRealtimeRecheck;
  }
  return tl_realtime.realtime;
}

}  // namespace myelin::broker
