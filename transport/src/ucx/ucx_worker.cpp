// UCP context/worker setup and the receive path: active messages matched to posted recvs.
#include "ucx/ucx_worker.hpp"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <random>
#include <unordered_set>

#include <myelin/core/clock.hpp>
#include <myelin/core/log.hpp>

#include "ucx/ucx_wire.hpp"

namespace myelin::transport::internal::ucx {

Status ucs_to_status(ucs_status_t status, std::string_view what) {
  const char* text = ucs_status_string(status);
  switch (status) {
    case UCS_OK:
      return ok_status();
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return invalid_argument(what, ": ", text);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
      return resource_exhausted(what, ": ", text);
    case UCS_ERR_UNSUPPORTED:
      return unsupported(what, ": ", text);
    case UCS_ERR_NO_DEVICE:
    case UCS_ERR_NO_ELEM:
      return unavailable(what, ": ", text);
    case UCS_ERR_CANCELED:
      return cancelled(what, ": ", text);
    case UCS_ERR_TIMED_OUT:
      return timeout_error(what, ": ", text);
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
      return peer_failed(what, ": ", text);
    case UCS_ERR_IO_ERROR:
      return io_error(what, ": ", text);
    default:
      return internal_error(what, ": ", text, " (ucs status ", static_cast<int>(status), ")");
  }
}

Result<PeerAddress> parse_peer_address(std::span<const uint8_t> bytes) {
  if (bytes.size() < kAddressFixedSize) {
    return invalid_argument("ucx address of ", bytes.size(), " bytes is shorter than its ",
                            kAddressFixedSize, "-byte header");
  }
  WireReader in(bytes);
  if (in.u32() != kAddressMagic) return invalid_argument("ucx address has a bad magic");
  const uint16_t version = in.u16();
  if (version != kAddressVersion) {
    return invalid_argument("ucx address version ", version, " is not the supported ",
                            kAddressVersion);
  }
  (void)in.u16();
  PeerAddress out;
  out.context_id = in.u64();
  out.pid = in.u32();
  out.start_time = in.u64();
  out.cma_probe = in.u64();
  const uint16_t node_length = in.u16();
  if (bytes.size() < kAddressFixedSize + node_length) {
    return invalid_argument("ucx address announces a ", node_length,
                            "-byte node id that does not fit in it");
  }
  out.node_id.assign(reinterpret_cast<const char*>(bytes.data()) + in.offset(), node_length);
  in.skip(node_length);
  const uint32_t length = in.u32();
  const size_t rest = bytes.size() - in.offset();
  if (length == 0 || length != rest) {
    return invalid_argument("ucx address announces a ", length, "-byte worker address but carries ",
                            rest);
  }
  out.worker_address.assign(bytes.begin() + static_cast<ptrdiff_t>(in.offset()), bytes.end());
  return out;
}

namespace {

// Start time of a process (field 22 of /proc/<pid>/stat), or nullopt when it does not exist.
std::optional<uint64_t> process_start_time(uint32_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%u/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return std::nullopt;
  char buf[1024];
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return std::nullopt;
  int field = 2;
  while (*p != '\0' && field < 22) {
    if (*p == ' ') ++field;
    ++p;
  }
  if (field != 22) return std::nullopt;
  return std::strtoull(p, nullptr, 10);
}

// The ids of this process's live workers (any thread may create or destroy a Context).
std::mutex local_workers_mutex;
std::unordered_set<uint64_t>& local_workers() {
  static std::unordered_set<uint64_t> ids;
  return ids;
}
bool is_local_worker(uint64_t id) {
  std::lock_guard<std::mutex> lock(local_workers_mutex);
  return local_workers().count(id) != 0;
}

// Whether a process exists and has not exited (a zombie has no memory left to read).
bool process_running(uint32_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%u/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return false;
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');  // the state follows the command name: ") S ..."
  return p != nullptr && p[1] == ' ' && p[2] != 'Z' && p[2] != 'X' && p[2] != '\0';
}

}  // namespace

namespace {

struct ConfigDeleter {
  void operator()(ucp_config_t* c) const noexcept { ucp_config_release(c); }
};

uint64_t random_context_id() {
  std::random_device rd;
  uint64_t id = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  id ^= static_cast<uint64_t>(monotonic_ns()) * 0x9e3779b97f4a7c15ULL;
  id ^= static_cast<uint64_t>(getpid()) << 17;
  return id == 0 ? 1 : id;
}

// A plain decimal byte count, or nullopt ("auto", "8k", garbage).
std::optional<size_t> plain_byte_count(const char* text) {
  if (text == nullptr || *text == '\0') return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text, &end, 10);
  if (errno != 0 || *end != '\0') return std::nullopt;
  return static_cast<size_t>(v);
}

}  // namespace

// Completion of a rendezvous receive into a posted recv buffer.
struct RendezvousRecv {
  RequestStateRef state;
  size_t length;
  UcxWorker* worker;
  uint64_t peer_id;
};

void UcxWorker::on_rendezvous_done(void* request, ucs_status_t status, size_t /*length*/,
                                   void* user_data) {
  std::unique_ptr<RendezvousRecv> op(static_cast<RendezvousRecv*>(user_data));
  ucp_request_free(request);
  if (status == UCS_OK) {
    op->state->complete(ok_status(), op->length);
    return;
  }
  // The forced close of a failed peer's endpoint cancels the transfer: report why it failed.
  auto it = op->worker->inboxes_.find(op->peer_id);
  if (it != op->worker->inboxes_.end() && !it->second->failure.ok()) {
    op->state->complete(it->second->failure, 0);
    return;
  }
  op->state->complete(ucs_to_status(status, "ucx rendezvous receive"), 0);
}

Result<std::shared_ptr<UcxWorker>> UcxWorker::create(const Options& options,
                                                     const ContextInfo& info) {
  std::shared_ptr<UcxWorker> w(new UcxWorker(options, info));
  MYELIN_RETURN_IF_ERROR(w->init());
  return w;
}

Status UcxWorker::init() {
  ucp_config_t* raw_config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &raw_config);
  if (st != UCS_OK) return ucs_to_status(st, "reading the UCX configuration");
  std::unique_ptr<ucp_config_t, ConfigDeleter> config(raw_config);

  if (!options_.device.empty()) {
    st = ucp_config_modify(config.get(), "NET_DEVICES", options_.device.c_str());
    if (st != UCS_OK)
      return ucs_to_status(st, "setting UCX NET_DEVICES to '" + options_.device + "'");
  }
  // The rendezvous threshold is our eager limit: set it explicitly so limits() tells the truth.
  size_t eager = kDefaultEagerLimit;
  if (options_.eager_limit != 0) {
    eager = options_.eager_limit;
  } else if (auto env = plain_byte_count(std::getenv("UCX_RNDV_THRESH"))) {
    eager = *env;
  }
  st = ucp_config_modify(config.get(), "RNDV_THRESH", std::to_string(eager).c_str());
  if (st != UCS_OK) return ucs_to_status(st, "setting UCX RNDV_THRESH");
  const int64_t ms = std::clamp<int64_t>(options_.timeout.count() / 4, 100, 20'000);
  check_interval_ns_ = ms * 1'000'000;
  if (std::getenv("UCX_KEEPALIVE_INTERVAL") == nullptr) {
    st = ucp_config_modify(config.get(), "KEEPALIVE_INTERVAL", (std::to_string(ms) + "ms").c_str());
    if (st != UCS_OK) return ucs_to_status(st, "setting UCX KEEPALIVE_INTERVAL");
  }
  // With UCX's default (a bounded number of endpoints checked per round), UCX 1.13 was seen never
  // to check a shared-memory endpoint whose peer was killed; checking every endpoint each round
  // costs a pid lookup (shm) or a tiny message (tcp) per peer and interval.
  if (std::getenv("UCX_KEEPALIVE_NUM_EPS") == nullptr) {
    st = ucp_config_modify(config.get(), "KEEPALIVE_NUM_EPS", "inf");
    if (st != UCS_OK) return ucs_to_status(st, "setting UCX KEEPALIVE_NUM_EPS");
  }

  // Shared-memory transports only detect a dead peer when their error handling is on; without it
  // UCX refuses UCP_ERR_HANDLING_MODE_PEER endpoints over them. It is a transport-level setting
  // that ucp_config_modify() would also push onto every other transport (which then warn), so it
  // goes through the environment UCX reads when it opens interfaces; a user's value wins.
  setenv("UCX_POSIX_ERROR_HANDLING", "y", 0);
  setenv("UCX_SYSV_ERROR_HANDLING", "y", 0);

  if (const char* cma = std::getenv("MYELIN_UCX_CMA"); cma != nullptr && *cma != '\0') {
    if (std::strcmp(cma, "off") == 0) {
      cma_threshold_ = SIZE_MAX;
    } else if (auto bytes = plain_byte_count(cma); bytes && *bytes > 0 && cma[0] != '-') {
      cma_threshold_ = *bytes;
    } else {
      return invalid_argument("MYELIN_UCX_CMA='", cma,
                              "' is neither 'off' nor a positive byte count");
    }
  }

  const bool blocking = options_.progress == ProgressMode::kSpinThenBlock;
  polls_per_clock_read_ = options_.progress == ProgressMode::kSpinThenBlock ? 1 : 64;
  polls_to_clock_read_ = polls_per_clock_read_;
  ucp_params_t params{};
  params.field_mask =
      UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_RMA | (blocking ? UCP_FEATURE_WAKEUP : 0);
  params.mt_workers_shared = 0;
  params.name = "myelin";
  ucp_context_h ctx = nullptr;
  st = ucp_init(&params, config.get(), &ctx);
  if (st != UCS_OK) return ucs_to_status(st, "initialising UCX (ucp_init)");
  context_ = std::make_shared<UcpContext>(ctx);

  ucp_worker_params_t wparams{};
  wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wparams.thread_mode = UCS_THREAD_MODE_SINGLE;
  st = ucp_worker_create(ctx, &wparams, &worker_);
  if (st != UCS_OK) return ucs_to_status(st, "creating the UCX worker");

  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  st = ucp_worker_get_address(worker_, &addr, &addr_len);
  if (st != UCS_OK) return ucs_to_status(st, "getting the UCX worker address");
  id_ = random_context_id();
  last_cma_cookie_ = random_context_id();  // cookies start at a random point (next_cma_cookie)
  {
    std::lock_guard<std::mutex> lock(local_workers_mutex);
    local_workers().insert(id_);
  }
  WireWriter out(address_);
  out.u32(kAddressMagic);
  out.u16(kAddressVersion);
  out.u16(0);
  out.u64(id_);
  const auto pid = static_cast<uint32_t>(getpid());
  out.u32(pid);
  out.u64(process_start_time(pid).value_or(0));
  out.u64(
      reinterpret_cast<uintptr_t>(&id_));  // the cma probe: a peer that reads id_ here can read us
  const std::string& node = info_.node_id;
  out.u16(static_cast<uint16_t>(std::min<size_t>(node.size(), 0xffff)));
  out.bytes(node.data(), std::min<size_t>(node.size(), 0xffff));
  out.u32(static_cast<uint32_t>(addr_len));
  out.bytes(addr, addr_len);
  ucp_worker_release_address(worker_, addr);

  if (blocking) {
    st = ucp_worker_get_efd(worker_, &event_fd_);
    if (st != UCS_OK) return ucs_to_status(st, "getting the UCX worker event fd");
  }

  for (const auto& [id, cb] :
       {std::pair{kAmMessageId, &UcxWorker::on_message},
        std::pair{kAmPackedId, &UcxWorker::on_packed},
        std::pair{kAmImmediateId, &UcxWorker::on_immediate},
        std::pair{kAmCmaId, &UcxWorker::on_cma},
        std::pair{kAmCmaHelloId, &UcxWorker::on_cma_control<kAmCmaHelloId>},
        std::pair{kAmCmaAckId, &UcxWorker::on_cma_control<kAmCmaAckId>},
        std::pair{kAmCmaWithdrawId, &UcxWorker::on_cma_control<kAmCmaWithdrawId>}}) {
    ucp_am_handler_param_t am{};
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                    UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    am.id = id;
    am.flags = UCP_AM_FLAG_WHOLE_MSG;
    am.cb = cb;
    am.arg = this;
    st = ucp_worker_set_am_recv_handler(worker_, &am);
    if (st != UCS_OK) return ucs_to_status(st, "installing the UCX active-message handlers");
  }

  limits_.max_inline = 0;  // UCX picks short/bcopy per lane and does not publish the bound
  limits_.eager_limit = eager;
  limits_.max_message = options_.max_message_size;
  MYELIN_LOG_DEBUG << "ucx worker for " << info_.name << ": id " << id_ << ", rndv threshold "
                   << eager << " bytes, cma from "
                   << (cma_threshold_ == SIZE_MAX ? std::string("off")
                                                  : std::to_string(cma_threshold_))
                   << ", " << (blocking ? "blocking" : "busy") << " progress";
  return ok_status();
}

UcxWorker::~UcxWorker() {
  deferred_.clear();
  std::vector<uint64_t> ids;
  ids.reserve(inboxes_.size());
  for (const auto& [id, inbox] : inboxes_) ids.push_back(id);
  for (uint64_t id : ids) drop_inbox(id);
  // Releases queued by drop_inbox run now, before the worker goes.
  for (auto& action : deferred_) action();
  deferred_.clear();
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  std::lock_guard<std::mutex> lock(local_workers_mutex);
  local_workers().erase(id_);
}

Result<Inbox*> UcxWorker::claim_inbox(uint64_t peer_id, const std::string& peer_name) {
  Inbox& inbox = inbox_for(peer_id);
  if (inbox.claimed) {
    return already_exists("an endpoint to ucx peer ", peer_name, " (context id ", peer_id,
                          ") already exists");
  }
  inbox.claimed = true;
  inbox.peer_name = peer_name;
  inbox.peer_label = std::make_shared<const std::string>(peer_name);
  return &inbox;
}

Inbox& UcxWorker::find_inbox(uint64_t peer_id) {
  auto& slot = inboxes_[peer_id];
  if (!slot) {
    slot = std::make_unique<Inbox>();
    slot->peer_id = peer_id;
  }
  last_inbox_ = slot.get();
  return *slot;
}

void UcxWorker::drop_inbox(uint64_t peer_id) {
  auto it = inboxes_.find(peer_id);
  if (it == inboxes_.end()) return;
  Inbox& inbox = *it->second;
  unslot_fast();
  for (auto& [channel, stream] : inbox.channels) {
    for (auto& m : stream.ready) release(m);
    for (auto& [seq, m] : stream.early) release(m);
    stream.posted.for_each([&, channel = channel](PostedRecv& r) {
      r.state->complete(cancelled("recv on channel ", channel, " from ", inbox.peer_name,
                                  " cancelled: endpoint disconnected"),
                        0);
    });
  }
  std::erase_if(cma_reads_, [&](CmaRead& read) {
    if (read.recv.peer_id != peer_id) return false;
    read.recv.state->complete(cancelled("recv on channel ", read.channel, " from ", inbox.peer_name,
                                        " cancelled: endpoint disconnected"),
                              0);
    return true;
  });
  if (last_inbox_ == &inbox) last_inbox_ = nullptr;
  inboxes_.erase(it);
}

void UcxWorker::fail_inbox(Inbox& inbox, const Status& failure) {
  if (inbox.failure.ok()) inbox.failure = failure;
  unslot_fast();
  for (auto& [channel, stream] : inbox.channels) {
    while (!stream.posted.empty()) {
      PostedRecv r = std::move(stream.posted.front());
      stream.posted.pop_front();
      r.state->complete(inbox.failure, 0);
    }
  }
}

void UcxWorker::watch_process(uint32_t pid, uint64_t start_time, std::weak_ptr<void> owner,
                              std::function<void()> on_dead) {
  if (pid == 0) return;
  watches_.push_back(ProcessWatch{pid, start_time, std::move(owner), std::move(on_dead)});
  if (next_check_ns_ == 0) next_check_ns_ = coarse_monotonic_ns() + check_interval_ns_;
}

void UcxWorker::check_processes() {
  next_check_ns_ = coarse_monotonic_ns() + check_interval_ns_;
  for (size_t i = 0; i < watches_.size();) {
    ProcessWatch& w = watches_[i];
    bool drop = w.owner.expired();
    if (!drop) {
      const auto start = process_start_time(w.pid);
      if (!start || (w.start_time != 0 && *start != w.start_time)) {
        auto on_dead = std::move(w.on_dead);
        drop = true;
        watches_.erase(watches_.begin() + static_cast<ptrdiff_t>(i));
        on_dead();
        continue;
      }
    }
    if (drop) {
      watches_.erase(watches_.begin() + static_cast<ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
}

void UcxWorker::run_timers(int64_t now) {
  std::vector<std::function<void()>> due;
  std::erase_if(timers_, [&](auto& timer) {
    if (timer.first > now) return false;
    due.push_back(std::move(timer.second));
    return true;
  });
  for (auto& action : due) action();
}

size_t UcxWorker::progress_own_work() {
  size_t events = 0;
  if (polls_to_clock_read_ == 0) {
    polls_to_clock_read_ = polls_per_clock_read_;
    if (!watches_.empty() || !timers_.empty()) {
      const int64_t now = coarse_monotonic_ns();
      if (now >= next_check_ns_) check_processes();
      if (!timers_.empty()) run_timers(now);
    }
  }
  if (!deferred_.empty()) events += run_deferred();
  if (!cma_reads_.empty()) events += advance_cma_read();
  own_work_pending_ = !deferred_.empty() || !cma_reads_.empty();
  return events;
}

size_t UcxWorker::run_deferred() {
  size_t events = 0;
  while (!deferred_.empty()) {
    std::vector<std::function<void()>> actions;
    actions.swap(deferred_);
    for (auto& action : actions) action();
    events += actions.size();
  }
  return events;
}

bool UcxWorker::arm() {
  // A cma read in progress is work pending too: its next piece comes from progress(), and no UCX
  // event would wake a sleeper for it.
  if (!deferred_.empty() || !cma_reads_.empty()) return false;
  const ucs_status_t st = ucp_worker_arm(worker_);
  if (st == UCS_ERR_BUSY) return false;
  if (st != UCS_OK) {
    MYELIN_LOG_WARN << "ucp_worker_arm failed: " << ucs_status_string(st)
                    << "; the Context keeps spinning";
    return false;
  }
  return true;
}

ucs_status_t UcxWorker::on_message(void* arg, const void* header, size_t header_length, void* data,
                                   size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxWorker*>(arg);
  if (header_length != sizeof(AmHeader)) {
    MYELIN_LOG_WARN << "ucx: dropping a message with a " << header_length
                    << "-byte header (expected " << sizeof(AmHeader) << ")";
    return UCS_OK;
  }
  AmHeader h;
  std::memcpy(&h, header, sizeof h);
  Inbox& inbox = self->inbox_for(h.sender_id);
  self->in_callback_ = true;
  const ucs_status_t ret = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0 &&
                                   self->deliver_to_posted(inbox, h, data, length)
                               ? UCS_OK
                               : self->handle_message(inbox, h, data, length, param->recv_attr);
  self->in_callback_ = false;
  return ret;
}

namespace {
// The warning for a malformed packed message, out of line: its stream code would otherwise give
// the hot callback a large stack frame and registers to save.
[[gnu::cold, gnu::noinline]] void warn_bad_packed(size_t header_length, size_t length) {
  MYELIN_LOG_WARN << "ucx: dropping a packed message with a " << header_length
                  << "-byte header and " << length << " bytes of data (expected none and "
                  << sizeof(AmHeader) << " to " << sizeof(AmHeader) + kPackedLimit << ")";
}
}  // namespace

ucs_status_t UcxWorker::on_packed(void* arg, const void* /*header*/, size_t header_length,
                                  void* data, size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxWorker*>(arg);
  FastRecv& f = self->fast_;
  // The next message of the fast recv's stream, eager, no AM header, fitting the recv (at most
  // kPackedLimit bytes; length < sizeof(AmHeader) wraps around and fails the bound): straight
  // into the recv buffer, the recv complete, nothing else touched.
  const size_t payload_length = length - sizeof(AmHeader);
  if (f.stream != nullptr && header_length == 0 && payload_length <= f.limit &&
      (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) [[likely]] {
    uint64_t words[2];
    std::memcpy(words, data, sizeof words);
    if (words[0] == f.sender_id && words[1] == f.key) [[likely]] {
      // Up to 16 bytes here (inline moves, no call: nothing to save); more with memcpy in
      // complete_fast(), reached by a jump.
      if (payload_length > 16) return self->complete_fast(data, payload_length);
      copy_bytes(f.data, static_cast<const uint8_t*>(data) + sizeof(AmHeader), payload_length);
      f.state->complete(Status(), payload_length);
      ++f.stream->next_sequence;
      f.stream = nullptr;
      return UCS_OK;
    }
  }
  return on_packed_general(self, header_length, data, length, param);
}

ucs_status_t UcxWorker::complete_fast(const void* data, size_t payload_length) {
  FastRecv& f = fast_;
  std::memcpy(f.data, static_cast<const uint8_t*>(data) + sizeof(AmHeader), payload_length);
  f.state->complete(Status(), payload_length);
  ++f.stream->next_sequence;
  f.stream = nullptr;
  return UCS_OK;
}

ucs_status_t UcxWorker::on_packed_general(UcxWorker* self, size_t header_length, void* data,
                                          size_t length, const ucp_am_recv_param_t* param) {
  // Eager by construction (the sender packs only what UCX sends at once); UCS_OK also refuses
  // any rendezvous payload a stranger sent.
  if (header_length != 0 || length - sizeof(AmHeader) > kPackedLimit ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) [[unlikely]] {
    // (length < sizeof(AmHeader) wraps around in the subtraction and fails the bound.)
    warn_bad_packed(header_length, length);
    return UCS_OK;
  }
  AmHeader h;
  std::memcpy(&h, data, sizeof h);
  const uint8_t* payload = static_cast<const uint8_t*>(data) + sizeof(AmHeader);
  const size_t payload_length = length - sizeof(AmHeader);
  Inbox& inbox = self->inbox_for(h.sender_id);
  self->in_callback_ = true;
  if (!self->deliver_to_posted(inbox, h, payload, payload_length)) {
    // Kept as a copy of the payload (never UCX's descriptor, which holds the header too): at
    // most kPackedLimit bytes.
    (void)self->handle_message(inbox, h, const_cast<uint8_t*>(payload), payload_length,
                               param->recv_attr & ~uint64_t{UCP_AM_RECV_ATTR_FLAG_DATA});
  }
  self->in_callback_ = false;
  return UCS_OK;
}

void UcxWorker::unslot_fast() {
  ChannelStream* stream = std::exchange(fast_.stream, nullptr);
  if (stream == nullptr) return;
  stream->posted.push_front(
      PostedRecv{std::move(fast_.state), fast_.data, fast_.capacity, fast_.peer_id});
}

ucs_status_t UcxWorker::on_immediate(void* arg, const void* header, size_t header_length,
                                     void* /*data*/, size_t length,
                                     const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxWorker*>(arg);
  // An immediate is a header alone; UCS_OK also refuses any rendezvous payload a stranger sent.
  if (header_length != sizeof(AmHeader) || length != 0 ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
    MYELIN_LOG_WARN << "ucx: dropping an immediate with a " << header_length << "-byte header and "
                    << length << " bytes of payload (expected " << sizeof(AmHeader) << " and 0)";
    return UCS_OK;
  }
  AmHeader h;
  std::memcpy(&h, header, sizeof h);
  self->handle_immediate(self->inbox_for(h.sender_id), h);
  return UCS_OK;
}

ucs_status_t UcxWorker::on_cma(void* arg, const void* header, size_t header_length, void* /*data*/,
                               size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxWorker*>(arg);
  if (header_length != sizeof(CmaHeader) || length != 0 ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
    MYELIN_LOG_WARN << "ucx: dropping a cma message with a " << header_length << "-byte header and "
                    << length << " bytes of payload (expected " << sizeof(CmaHeader) << " and 0)";
    return UCS_OK;
  }
  CmaHeader h;
  std::memcpy(&h, header, sizeof h);
  ArrivedMessage m;
  m.kind = ArrivedMessage::Kind::kCma;
  m.length = h.length;
  m.remote_address = h.address;
  m.cookie = h.cookie;
  m.guard_address = h.guard;
  m.channel = h.am.value;
  self->in_callback_ = true;
  self->accept_in_sequence(self->inbox_for(h.am.sender_id), h.am, std::move(m));
  self->in_callback_ = false;
  return UCS_OK;
}

template <unsigned Id>
ucs_status_t UcxWorker::on_cma_control(void* arg, const void* header, size_t header_length,
                                       void* /*data*/, size_t length,
                                       const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxWorker*>(arg);
  constexpr size_t expected = Id == kAmCmaHelloId ? sizeof(AmHeader) : sizeof(CmaAck);
  if (header_length != expected || length != 0 ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
    MYELIN_LOG_WARN << "ucx: dropping a cma control message (id " << Id << ") with a "
                    << header_length << "-byte header and " << length << " bytes of payload";
    return UCS_OK;
  }
  if constexpr (Id == kAmCmaHelloId) {
    AmHeader h;
    std::memcpy(&h, header, sizeof h);
    Inbox& inbox = self->inbox_for(h.sender_id);
    inbox.peer_reads_us = h.value == 1 && self->cma_threshold_ != SIZE_MAX;
    MYELIN_LOG_DEBUG << "ucx: context " << h.sender_id << (h.value == 1 ? " reads" : " cannot read")
                     << " this process's memory";
  } else {
    CmaAck a;
    std::memcpy(&a, header, sizeof a);
    Inbox& inbox = self->inbox_for(a.sender_id);
    if constexpr (Id == kAmCmaAckId) {
      if (inbox.on_cma_ack) {
        inbox.on_cma_ack(a.cookie, a.error);
      } else if (a.error == ECANCELED) {
        // The confirmation of a withdraw whose message was read (and acked) before the withdraw
        // arrived: the sender's endpoint has gone meanwhile, nothing is lost.
        MYELIN_LOG_DEBUG << "ucx: a withdraw confirmation from context " << a.sender_id
                         << " after its endpoint closed";
      } else {
        MYELIN_LOG_WARN << "ucx: dropping a cma ack from context " << a.sender_id
                        << ", which has no endpoint here";
      }
    } else {
      // From here no piece of that message is read: every read checks `withdrawn` before each
      // piece, and reads advance only in progress(), never inside this callback. The
      // confirmation (an ack with ECANCELED, sent after this callback) is what lets the sender
      // hand its buffer back. Only a message still queued or being read is remembered: one
      // already read was acked before this withdraw (acks travel in order), nothing reads it
      // again, and its cookie would never leave the list.
      if (self->cma_outstanding(inbox, a.cookie)) inbox.withdrawn.push_back(a.cookie);
      const bool was_in_callback = self->in_callback_;
      self->in_callback_ = true;  // defers the send until the callback has returned
      self->send_cma_ack(a.sender_id, a.cookie, ECANCELED);
      self->in_callback_ = was_in_callback;
    }
  }
  return UCS_OK;
}

void UcxWorker::accept_in_sequence(Inbox& inbox, const AmHeader& h, ArrivedMessage m) {
  ChannelStream& stream = inbox.stream(h.value);
  if (fast_.stream == &stream) unslot_fast();
  const uint64_t sequence = extend_sequence(h.sequence, stream.next_sequence);
  if (sequence == kStaleSequence || sequence < stream.next_sequence ||
      stream.early.count(sequence) != 0) {
    MYELIN_LOG_WARN << "ucx: dropping a duplicate message (sequence " << h.sequence
                    << ") on channel " << h.value << " from context " << h.sender_id;
    release(m);
    return;
  }
  if (sequence != stream.next_sequence) {
    stream.early.emplace(sequence, std::move(m));
    return;
  }
  ++stream.next_sequence;
  deliver_in_order(stream, std::move(m));
  drain_early(stream);
}

bool UcxWorker::cma_outstanding(const Inbox& inbox, uint64_t cookie) const {
  auto is_it = [cookie](const ArrivedMessage& m) {
    return m.kind == ArrivedMessage::Kind::kCma && m.cookie == cookie;
  };
  for (const CmaRead& read : cma_reads_) {
    if (read.recv.peer_id == inbox.peer_id && read.cookie == cookie) return true;
  }
  for (const auto& [channel, stream] : inbox.channels) {
    if (std::any_of(stream.ready.begin(), stream.ready.end(), is_it)) return true;
    for (const auto& [sequence, m] : stream.early) {
      if (is_it(m)) return true;
    }
  }
  return false;
}

void UcxWorker::forget_withdrawn(Inbox& inbox, uint64_t cookie) {
  if (auto w = std::find(inbox.withdrawn.begin(), inbox.withdrawn.end(), cookie);
      w != inbox.withdrawn.end()) {
    inbox.withdrawn.erase(w);
  }
}

void UcxWorker::start_cma(Inbox& inbox, const PeerAddress& peer, ucp_ep_h ep) {
  inbox.peer_pid = peer.pid;
  inbox.peer_start_time = peer.start_time;
  inbox.can_read_peer = false;
  if (cma_threshold_ != SIZE_MAX && peer.cma_probe != 0 && peer.pid != 0) {
    uint64_t seen = 0;
    iovec local{&seen, sizeof seen};
    iovec remote{reinterpret_cast<void*>(static_cast<uintptr_t>(peer.cma_probe)), sizeof seen};
    // A peer in this very process is readable; no syscall (process_vm_readv of this process's
    // own memory at connect time was seen to stall a later posix put in the tests, not
    // understood; reads of messages are unaffected and still use it).
    const bool local_peer = is_local_worker(peer.context_id);
    const ssize_t n =
        local_peer ? static_cast<ssize_t>(sizeof seen)
                   : process_vm_readv(static_cast<pid_t>(peer.pid), &local, 1, &remote, 1, 0);
    if (local_peer) seen = peer.context_id;
    const int err = errno;
    inbox.can_read_peer = n == static_cast<ssize_t>(sizeof seen) && seen == peer.context_id;
    if (!inbox.can_read_peer) {
      MYELIN_LOG_INFO << "ucx: large messages from " << inbox.peer_name
                      << " go by ucx rendezvous: this process cannot read its memory ("
                      << (n < 0 ? std::strerror(err) : "the probe did not find its context id")
                      << ")";
    }
  }
  // Sent from the next progress(), not from inside connect(): a hello sent at once, while UCX
  // was still wiring the new endpoint up, was seen (posix) to leave a later put's flush on that
  // endpoint pending for good.
  defer(
      [this, peer_id = inbox.peer_id, ep, hello = AmHeader{id_, 0, inbox.can_read_peer ? 1u : 0u}] {
        auto it = inboxes_.find(peer_id);
        if (it == inboxes_.end() || it->second->reply_ep != ep) return;  // closed meanwhile
        const ucs_status_t st = send_small_am(ep, kAmCmaHelloId, &hello, sizeof hello);
        if (st != UCS_OK) {
          MYELIN_LOG_INFO << "ucx: the cma hello to " << it->second->peer_name
                          << " was not sent: " << ucs_status_string(st);
        }
      });
}

ucs_status_t UcxWorker::send_small_am(ucp_ep_h ep, unsigned id, const void* header, size_t length) {
  if (ep == nullptr) return UCS_ERR_NOT_CONNECTED;
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL;
  ucs_status_ptr_t p = ucp_am_send_nbx(ep, id, header, length, nullptr, 0, &param);
  if (p == nullptr) return UCS_OK;
  if (UCS_PTR_IS_PTR(p)) {  // not expected with FORCE_IMM_CMPL; let UCX finish it
    ucp_request_free(p);
    return UCS_OK;
  }
  if (UCS_PTR_STATUS(p) != UCS_ERR_NO_RESOURCE) return UCS_PTR_STATUS(p);
  // UCX reads the header until the send completes: a copy lives until then.
  auto copy = std::make_unique<std::vector<uint8_t>>(static_cast<const uint8_t*>(header),
                                                     static_cast<const uint8_t*>(header) + length);
  ucp_request_param_t full{};
  full.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  full.cb.send = [](void* request, ucs_status_t, void* user_data) {
    ucp_request_free(request);
    delete static_cast<std::vector<uint8_t>*>(user_data);
  };
  full.user_data = copy.get();
  p = ucp_am_send_nbx(ep, id, copy->data(), length, nullptr, 0, &full);
  if (UCS_PTR_IS_PTR(p)) {
    (void)copy.release();  // the callback frees it
    return UCS_OK;
  }
  return p == nullptr ? UCS_OK : UCS_PTR_STATUS(p);
}

void UcxWorker::send_cma_ack(uint64_t peer_id, uint64_t cookie, uint32_t error) {
  if (in_callback_) {
    defer([this, peer_id, cookie, error] { send_cma_ack(peer_id, cookie, error); });
    return;
  }
  auto it = inboxes_.find(peer_id);
  if (it == inboxes_.end() || it->second->reply_ep == nullptr) return;  // its endpoint is gone
  const CmaAck ack{id_, cookie, error, 0};
  const ucs_status_t st = send_small_am(it->second->reply_ep, kAmCmaAckId, &ack, sizeof ack);
  if (st != UCS_OK) {
    MYELIN_LOG_INFO << "ucx: the cma ack to " << it->second->peer_name
                    << " was not sent: " << ucs_status_string(st);
  }
}

void UcxWorker::start_cma_read(ArrivedMessage& message, PostedRecv recv, uint32_t channel) {
  auto it = inboxes_.find(recv.peer_id);
  Inbox* inbox = it == inboxes_.end() ? nullptr : it->second.get();
  if (inbox == nullptr || !inbox->can_read_peer) {
    // Only a sender whose hello we answered with "readable" sends these.
    recv.state->complete(protocol_error("recv on channel ", channel, " from ",
                                        inbox ? inbox->peer_name : std::string("a peer"),
                                        ": a cma message from a process this one cannot read"),
                         0);
    send_cma_ack(recv.peer_id, message.cookie, EPERM);
    return;
  }
  cma_reads_.push_back(CmaRead{std::move(recv), message.remote_address, message.length, 0,
                               message.cookie, message.guard_address, channel});
  own_work_pending_ = true;
  if (!in_callback_ && cma_reads_.size() == 1) advance_cma_read();
}

size_t UcxWorker::advance_cma_read() {
  CmaRead& read = cma_reads_.front();
  auto it = inboxes_.find(read.recv.peer_id);
  MYELIN_CHECK(it != inboxes_.end()) << "a cma read outlived its inbox";
  Inbox& inbox = *it->second;
  // A withdrawn message first, even when the peer failed since (a forced close reaches this side
  // as a peer error): its cookie leaves the list with it, as every cookie does once its read or
  // recv comes to it, and the recv says what happened to the message.
  if (auto w = std::find(inbox.withdrawn.begin(), inbox.withdrawn.end(), read.cookie);
      w != inbox.withdrawn.end()) {
    inbox.withdrawn.erase(w);
    finish_cma_read(
        cancelled("recv on channel ", read.channel, " from ", inbox.peer_name,
                  ": the sender disconnected before its ", read.length, "-byte message was read"),
        ECANCELED);
    return 1;
  }
  if (!inbox.failure.ok()) {
    finish_cma_read(inbox.failure, ECANCELED);
    return 1;
  }
  if (read.done < read.length) {
    const size_t piece = std::min(kCmaPiece, read.length - read.done);
    // The piece, then the guard (see UcxWorker::cma_threshold): a guard that still holds the
    // cookie after a piece was read means the sender had not given the send up when the piece
    // was read, and the pid was still its process.
    uint64_t guard = 0;
    iovec local[2] = {{static_cast<uint8_t*>(read.recv.data) + read.done, piece},
                      {&guard, sizeof guard}};
    iovec remote[2] = {
        {reinterpret_cast<void*>(static_cast<uintptr_t>(read.remote_address + read.done)), piece},
        {reinterpret_cast<void*>(static_cast<uintptr_t>(read.guard_address)), sizeof guard}};
    const auto pid = static_cast<pid_t>(inbox.peer_pid);
#if defined(__x86_64__) || defined(__i386__)
    // One system call: the kernel copies the remote ranges in array order (a partial transfer
    // stops at the range that failed), and x86 does not let a load pass an older load, so the
    // guard is read after every byte of the piece.
    const ssize_t n = process_vm_readv(pid, local, 2, remote, 2, 0);
    const bool guard_read = n == static_cast<ssize_t>(piece + sizeof guard);
#else
    const ssize_t n = process_vm_readv(pid, local, 1, remote, 1, 0);
    const bool guard_read =
        n == static_cast<ssize_t>(piece) &&
        process_vm_readv(pid, &local[1], 1, &remote[1], 1, 0) == static_cast<ssize_t>(sizeof guard);
#endif
    if (n > 0) {
      const size_t got = std::min(static_cast<size_t>(n), piece);
      read.done += got;
      // A partial piece: the rest comes at the next progress(), with the guard after it.
      if (got == piece && (!guard_read || guard != read.cookie)) {
        const auto start = process_start_time(inbox.peer_pid);
        if (!start || (inbox.peer_start_time != 0 && *start != inbox.peer_start_time)) {
          next_check_ns_ = 0;  // the watch fails the endpoint at the next progress()
          finish_cma_read(peer_failed("peer ", inbox.peer_name, " (ucx): its process ",
                                      inbox.peer_pid, " is gone (recv on channel ", read.channel,
                                      " from it, reading its ", read.length, "-byte message)"),
                          ECANCELED);
        } else {
          // Nobody is waiting for an ack: the sender completed its send when it cleared the guard.
          finish_cma_read(cancelled("recv on channel ", read.channel, " from ", inbox.peer_name,
                                    ": the sender gave its ", read.length,
                                    "-byte message up (its endpoint failed or closed) before it "
                                    "was read"),
                          ECANCELED);
        }
        return 1;
      }
    } else {
      const int err = n == 0 ? EFAULT : errno;
      if (err == EINTR) return 0;
      const std::string what = ::myelin::internal::str_cat(
          "recv on channel ", read.channel, " from ", inbox.peer_name, ": reading its ",
          read.length, "-byte message from process ", inbox.peer_pid);
      if (err == ESRCH || !process_running(inbox.peer_pid)) {
        // The watch fails the endpoint at the next progress().
        next_check_ns_ = 0;
        finish_cma_read(
            peer_failed("peer ", inbox.peer_name, " (ucx): its process ", inbox.peer_pid,
                        " is gone (", what, ": ", std::strerror(err), ")"),
            static_cast<uint32_t>(err));
      } else {
        finish_cma_read(errno_status(what, err), static_cast<uint32_t>(err));
      }
      return 1;
    }
  }
  if (read.done == read.length) finish_cma_read(ok_status(), 0);
  return 1;
}

void UcxWorker::finish_cma_read(Status status, uint32_t error) {
  CmaRead read = std::move(cma_reads_.front());
  cma_reads_.pop_front();
  const bool ok = status.ok();
  read.recv.state->complete(std::move(status), ok ? read.length : 0);
  if (ok) request_pool_.recycle(std::move(read.recv.state));
  // A failed endpoint's peer gets no ack: its process is gone or its endpoint failed.
  if (error != ECANCELED) send_cma_ack(read.recv.peer_id, read.cookie, error);
}

ucs_status_t UcxWorker::handle_message(Inbox& inbox, const AmHeader& h, void* data, size_t length,
                                       uint64_t recv_attr) {
  ChannelStream& stream = inbox.stream(h.value);
  if (fast_.stream == &stream) unslot_fast();
  const bool rendezvous = (recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  const bool persistent = (recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) != 0;
  const uint64_t sequence = extend_sequence(h.sequence, stream.next_sequence);

  // Fast path: the next message in order and a recv is waiting for it: straight into its buffer.
  // (A posted recv means nothing is ready: post_recv takes a ready message before it posts.)
  if (!stream.posted.empty() && sequence == stream.next_sequence) {
    ++stream.next_sequence;
    PostedRecv recv = std::move(stream.posted.front());
    stream.posted.pop_front();
    ucs_status_t ret = UCS_OK;  // UCS_OK on a rendezvous descriptor refuses its payload
    if (length > recv.capacity) {
      recv.state->complete(
          out_of_range("message of ", length, " bytes on channel ", h.value, " from ",
                       inbox.peer_name, " does not fit the ", recv.capacity, "-byte recv buffer"),
          0);
    } else if (!rendezvous) {
      if (length != 0) std::memcpy(recv.data, data, length);
      recv.state->complete(ok_status(), length);
      request_pool_.recycle(std::move(recv.state));
    } else {
      defer([this, data, length, r = std::move(recv)]() mutable {
        start_rendezvous(data, length, std::move(r));
      });
      ret = UCS_INPROGRESS;
    }
    if (!stream.early.empty()) drain_early(stream);
    return ret;
  }
  if (sequence == kStaleSequence || sequence < stream.next_sequence ||
      stream.early.count(sequence) != 0) {
    MYELIN_LOG_WARN << "ucx: dropping a duplicate message (sequence " << h.sequence
                    << ") on channel " << h.value << " from context " << h.sender_id;
    return UCS_OK;
  }
  ArrivedMessage m;
  m.length = length;
  ucs_status_t ret = UCS_OK;
  if (rendezvous) {
    m.kind = ArrivedMessage::Kind::kRendezvous;
    m.desc = data;
    ret = UCS_INPROGRESS;
  } else if (persistent) {
    m.kind = ArrivedMessage::Kind::kUcxData;
    m.desc = data;
    ret = UCS_INPROGRESS;
  } else {
    const auto* p = static_cast<const uint8_t*>(data);
    m.bytes.assign(p, p + length);
  }
  if (sequence == stream.next_sequence) {
    ++stream.next_sequence;
    stream.ready.push_back(std::move(m));  // no recv is posted (fast path above), so it waits
    drain_early(stream);
  } else {
    stream.early.emplace(sequence, std::move(m));
  }
  return ret;
}

void UcxWorker::handle_immediate(Inbox& inbox, const AmHeader& h) {
  const uint64_t sequence = extend_sequence(h.sequence, inbox.next_immediate_sequence);
  if (sequence == inbox.next_immediate_sequence) {
    ++inbox.next_immediate_sequence;
    inbox.immediates.push_back(h.value);
    for (auto it = inbox.early_immediates.begin();
         it != inbox.early_immediates.end() && it->first == inbox.next_immediate_sequence;
         it = inbox.early_immediates.erase(it)) {
      ++inbox.next_immediate_sequence;
      inbox.immediates.push_back(it->second);
    }
  } else if (sequence > inbox.next_immediate_sequence && sequence != kStaleSequence) {
    inbox.early_immediates.emplace(sequence, h.value);
  } else {
    MYELIN_LOG_WARN << "ucx: dropping a duplicate immediate (sequence " << h.sequence << ")";
  }
}

void UcxWorker::drain_early(ChannelStream& stream) {
  while (!stream.early.empty() && stream.early.begin()->first == stream.next_sequence) {
    ArrivedMessage m = std::move(stream.early.begin()->second);
    stream.early.erase(stream.early.begin());
    ++stream.next_sequence;
    deliver_in_order(stream, std::move(m));
  }
}

void UcxWorker::deliver_in_order(ChannelStream& stream, ArrivedMessage message) {
  if (stream.posted.empty()) {
    stream.ready.push_back(std::move(message));
    return;
  }
  PostedRecv recv = std::move(stream.posted.front());
  stream.posted.pop_front();
  // Only called for messages already held (owned bytes or persisted descriptors).
  if (message.length > recv.capacity) {
    if (message.kind == ArrivedMessage::Kind::kCma) {
      if (auto it = inboxes_.find(recv.peer_id); it != inboxes_.end()) {
        forget_withdrawn(*it->second, message.cookie);
      }
      send_cma_ack(recv.peer_id, message.cookie, 0);  // consumed, as a refused rendezvous
    }
    release(message);
    recv.state->complete(out_of_range("message of ", message.length, " bytes does not fit the ",
                                      recv.capacity, "-byte recv buffer"),
                         0);
    return;
  }
  switch (message.kind) {
    case ArrivedMessage::Kind::kOwned:
      if (message.length != 0) std::memcpy(recv.data, message.bytes.data(), message.length);
      recv.state->complete(ok_status(), message.length);
      request_pool_.recycle(std::move(recv.state));
      break;
    case ArrivedMessage::Kind::kUcxData:
      std::memcpy(recv.data, message.desc, message.length);
      release(message);
      recv.state->complete(ok_status(), message.length);
      request_pool_.recycle(std::move(recv.state));
      break;
    case ArrivedMessage::Kind::kRendezvous:
      if (in_callback_) {
        defer([this, desc = message.desc, len = message.length, r = std::move(recv)]() mutable {
          start_rendezvous(desc, len, std::move(r));
        });
      } else {
        start_rendezvous(message.desc, message.length, std::move(recv));
      }
      break;
    case ArrivedMessage::Kind::kCma:
      start_cma_read(message, std::move(recv), message.channel);
      break;
  }
}

Request UcxWorker::take_ready(Inbox& inbox, ChannelStream& stream, uint32_t channel, void* data,
                              size_t capacity) {
  if (!stream.ready.empty()) {
    ArrivedMessage m = std::move(stream.ready.front());
    stream.ready.pop_front();
    if (m.length > capacity) {
      if (m.kind == ArrivedMessage::Kind::kCma) {
        forget_withdrawn(inbox, m.cookie);
        send_cma_ack(inbox.peer_id, m.cookie, 0);
      }
      release(m);
      return Request::failed(out_of_range("message of ", m.length, " bytes on channel ", channel,
                                          " from ", inbox.peer_name, " does not fit the ", capacity,
                                          "-byte recv buffer"));
    }
    switch (m.kind) {
      case ArrivedMessage::Kind::kOwned:
        if (m.length != 0) std::memcpy(data, m.bytes.data(), m.length);
        return Request::completed(m.length);
      case ArrivedMessage::Kind::kUcxData:
        std::memcpy(data, m.desc, m.length);
        release(m);
        return Request::completed(m.length);
      case ArrivedMessage::Kind::kRendezvous: {
        auto [request, state] = request_pool_.make_pending();
        state->describe("recv", channel, inbox.peer_label);
        start_rendezvous(m.desc, m.length,
                         PostedRecv{std::move(state), data, capacity, inbox.peer_id});
        return std::move(request);
      }
      case ArrivedMessage::Kind::kCma: {
        auto [request, state] = request_pool_.make_pending();
        state->describe("recv", channel, inbox.peer_label);
        start_cma_read(m, PostedRecv{std::move(state), data, capacity, inbox.peer_id}, channel);
        return std::move(request);
      }
    }
  }
  if (!inbox.failure.ok()) return Request::failed(inbox.failure);
  auto [request, state] = request_pool_.make_pending();
  state->describe("recv", channel, inbox.peer_label);
  stream.posted.push_back(PostedRecv{std::move(state), data, capacity, inbox.peer_id});
  return std::move(request);
}

void UcxWorker::start_rendezvous(void* desc, size_t length, PostedRecv recv) {
  auto op =
      std::make_unique<RendezvousRecv>(RendezvousRecv{recv.state, length, this, recv.peer_id});
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.recv_am = &on_rendezvous_done;
  param.user_data = op.get();
  ucs_status_ptr_t p = ucp_am_recv_data_nbx(worker_, desc, recv.data, length, &param);
  if (p == nullptr) {
    recv.state->complete(ok_status(), length);
  } else if (UCS_PTR_IS_ERR(p)) {
    recv.state->complete(ucs_to_status(UCS_PTR_STATUS(p), "ucx rendezvous receive"), 0);
  } else {
    (void)op.release();  // on_rendezvous_done owns it now
  }
}

void UcxWorker::release(ArrivedMessage& message) {
  if (message.kind == ArrivedMessage::Kind::kOwned || message.desc == nullptr) return;
  void* desc = message.desc;
  message.desc = nullptr;
  if (in_callback_) {
    defer([this, desc] { ucp_am_data_release(worker_, desc); });
  } else {
    ucp_am_data_release(worker_, desc);
  }
}

}  // namespace myelin::transport::internal::ucx
