// Frame codec, batch walker, handshake payloads and topic syntax. Everything here reads bytes a
// peer sent, so every length is checked before it is used and no field is trusted.
#include <myelin/broker/frame.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdio>
#include <cstring>

namespace myelin::broker {
namespace {

// On a little-endian host a field is one unaligned load or store (GCC did not merge the byte
// loops: encode_header took ~200 instructions per frame); elsewhere byte by byte.
template <typename T>
T load_le(const std::byte* p) noexcept {
  T v = 0;
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(&v, p, sizeof(T));
  } else {
    for (size_t i = 0; i < sizeof(T); ++i)
      v |= static_cast<T>(std::to_integer<uint8_t>(p[i])) << (8 * i);
  }
  return v;
}
template <typename T>
void store_le(std::byte* p, T v) noexcept {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(p, &v, sizeof(T));
  } else {
    for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
  }
}

constexpr bool level_char_ok(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == '.';
}

// Validates one plain level; `first` allows a leading '$'.
bool plain_level_ok(std::string_view level, bool first) noexcept {
  if (level.empty() || level.size() > 64) return false;
  size_t i = 0;
  if (first && level[0] == '$') {
    if (level.size() == 1) return false;
    i = 1;
  }
  for (; i < level.size(); ++i) {
    if (!level_char_ok(level[i])) return false;
  }
  return true;
}

Status validate_levels(std::string_view text, bool pattern) {
  const char* what = pattern ? "pattern" : "topic";
  if (text.empty()) return invalid_argument("empty ", what);
  if (text.size() > kMaxTopicLength) {
    return invalid_argument(what, " is ", text.size(), " bytes, the limit is ", kMaxTopicLength);
  }
  size_t start = 0;
  bool first = true;
  while (true) {
    const size_t slash = text.find('/', start);
    const std::string_view level = text.substr(
        start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
    const bool last = slash == std::string_view::npos;
    bool ok = plain_level_ok(level, first);
    if (!ok && pattern) ok = level == "*" || (level == "#" && last);
    if (!ok) {
      return invalid_argument("bad level '", level, "' in ", what, " '", text, "'");
    }
    if (last) break;
    start = slash + 1;
    first = false;
  }
  return ok_status();
}

constexpr std::array<bool, 256> kLevelChar = [] {
  std::array<bool, 256> t{};
  for (int c = 0; c < 256; ++c) t[static_cast<size_t>(c)] = level_char_ok(static_cast<char>(c));
  return t;
}();

// One pass that accepts only topics validate_levels(text, false) accepts (levels of 1-64 bytes
// of level characters, a leading '$' on the first level followed by at least one of them); it
// may refuse more: the caller then asks validate_levels.
bool plain_topic_ok(std::string_view t) noexcept {
  if (t.empty() || t.size() > kMaxTopicLength) return false;
  size_t start = 0;
  bool first = true;
  for (size_t i = 0;; ++i) {
    if (i == t.size() || t[i] == '/') {
      const size_t len = i - start;
      if (len == 0 || len > 64 || (first && t[start] == '$' && len < 2)) return false;
      if (i == t.size()) return true;
      start = i + 1;
      first = false;
      continue;
    }
    const auto c = static_cast<unsigned char>(t[i]);
    if (!kLevelChar[c] && !(first && i == 0 && c == '$')) return false;
  }
}

bool batchable_type(FrameType t) noexcept {
  switch (t) {
    case FrameType::kPublish:
    case FrameType::kDeliver:
    case FrameType::kCredit:
    case FrameType::kRequest:
    case FrameType::kReply:
    case FrameType::kHeartbeat:
    case FrameType::kPsPush:
    case FrameType::kPsPull:
    case FrameType::kPsReply:
    case FrameType::kError:
      return true;
    default:
      return false;
  }
}

}  // namespace

std::string_view frame_type_name(FrameType type) noexcept {
  switch (type) {
    case FrameType::kHello:
      return "hello";
    case FrameType::kAuth:
      return "auth";
    case FrameType::kAuthOk:
      return "auth_ok";
    case FrameType::kError:
      return "error";
    case FrameType::kPublish:
      return "publish";
    case FrameType::kDeliver:
      return "deliver";
    case FrameType::kSubscribe:
      return "subscribe";
    case FrameType::kUnsubscribe:
      return "unsubscribe";
    case FrameType::kCredit:
      return "credit";
    case FrameType::kRequest:
      return "request";
    case FrameType::kReply:
      return "reply";
    case FrameType::kBatch:
      return "batch";
    case FrameType::kHeartbeat:
      return "heartbeat";
    case FrameType::kPsPush:
      return "ps_push";
    case FrameType::kPsPull:
      return "ps_pull";
    case FrameType::kPsReply:
      return "ps_reply";
    case FrameType::kGoAway:
      return "goaway";
    case FrameType::kAttach:
      return "attach";
  }
  return "unknown";
}

void encode_header(const FrameHeader& h, std::span<std::byte, kFrameHeaderSize> out) noexcept {
  std::byte* p = out.data();
  store_le<uint32_t>(p, kFrameMagic);
  p[4] = static_cast<std::byte>(kFrameVersion);
  p[5] = static_cast<std::byte>(h.type);
  p[6] = static_cast<std::byte>(h.flags);
  p[7] = std::byte{0};
  store_le<uint16_t>(p + 8, h.topic_len);
  store_le<uint16_t>(p + 10, 0);
  store_le<uint32_t>(p + 12, h.payload_len);
  store_le<uint64_t>(p + 16, h.seq);
  store_le<uint64_t>(p + 24, h.id);
  store_le<uint64_t>(p + 32, h.timestamp_ns);
}

Status append_frame(std::vector<std::byte>& out, FrameHeader h, std::string_view topic,
                    std::span<const std::byte> payload) {
  if (topic.size() > kMaxTopicLength) {
    return invalid_argument("topic of ", topic.size(), " bytes exceeds ", kMaxTopicLength);
  }
  if (payload.size() > UINT32_MAX) return invalid_argument("frame payload over 4 GiB");
  h.topic_len = static_cast<uint16_t>(topic.size());
  h.payload_len = static_cast<uint32_t>(payload.size());
  // Appended range by range, never resize() then copy: resizing zero-fills the bytes first, a
  // second pass over every payload byte of a batch.
  std::array<std::byte, kFrameHeaderSize> head;
  encode_header(h, head);
  out.insert(out.end(), head.begin(), head.end());
  const auto* t = reinterpret_cast<const std::byte*>(topic.data());
  out.insert(out.end(), t, t + topic.size());
  out.insert(out.end(), payload.begin(), payload.end());
  return ok_status();
}

namespace {

// decode_frame(); a topic of the same bytes as `valid_topic` (one that passed validate_topic()
// before, empty: none) is not validated again, and *validated says whether the frame's topic
// passed validate_topic() (so the caller may pass it as `valid_topic` for the next frame).
Result<DecodeOutcome> decode_one(std::span<const std::byte> in, const DecodeLimits& limits,
                                 FrameView* out, size_t* consumed, std::string_view valid_topic,
                                 bool* validated) {
  *consumed = 0;
  *validated = false;
  // Validate whatever part of the header has arrived, so garbage is refused early.
  if (in.size() >= 4 && load_le<uint32_t>(in.data()) != kFrameMagic) {
    char text[64];
    std::snprintf(text, sizeof(text), "bad frame magic 0x%08x (expected 0x%08x)",
                  load_le<uint32_t>(in.data()), kFrameMagic);
    return protocol_error(std::string_view(text));
  }
  if (in.size() < kFrameHeaderSize) return DecodeOutcome::kNeedMore;
  const std::byte* p = in.data();
  const uint8_t version = std::to_integer<uint8_t>(p[4]);
  if (version != kFrameVersion) {
    return protocol_error("frame version ", static_cast<int>(version), ", expected ",
                          static_cast<int>(kFrameVersion));
  }
  const uint8_t type = std::to_integer<uint8_t>(p[5]);
  if (type == 0 || type > kMaxFrameType)
    return protocol_error("unknown frame type ", static_cast<int>(type));
  FrameHeader h;
  h.type = static_cast<FrameType>(type);
  h.flags = std::to_integer<uint8_t>(p[6]);
  if (h.flags & ~kKnownFlags)
    return protocol_error("unknown frame flags ", static_cast<int>(h.flags));
  if (p[7] != std::byte{0} || load_le<uint16_t>(p + 10) != 0) {
    return protocol_error("reserved header bytes are not zero");
  }
  h.topic_len = load_le<uint16_t>(p + 8);
  h.payload_len = load_le<uint32_t>(p + 12);
  h.seq = load_le<uint64_t>(p + 16);
  h.id = load_le<uint64_t>(p + 24);
  h.timestamp_ns = load_le<uint64_t>(p + 32);
  if (h.topic_len > kMaxTopicLength) return protocol_error("topic length ", h.topic_len);
  if (h.payload_len > limits.max_frame_payload) {
    return protocol_error("frame payload ", h.payload_len, " exceeds the limit ",
                          limits.max_frame_payload);
  }
  const bool chunked = h.flags & (kFlagMore | kFlagContinuation);
  if (chunked) {
    if (h.flags & kFlagControl) return protocol_error("control frames cannot be chunked");
    if (h.type != FrameType::kDeliver && h.type != FrameType::kPublish &&
        h.type != FrameType::kRequest && h.type != FrameType::kReply &&
        h.type != FrameType::kPsPush && h.type != FrameType::kPsReply) {
      return protocol_error(frame_type_name(h.type), " frames cannot be chunked");
    }
    if ((h.flags & kFlagContinuation) && h.topic_len != 0) {
      return protocol_error("a continuation chunk carries a topic");
    }
  }
  const size_t total = kFrameHeaderSize + h.topic_len + static_cast<size_t>(h.payload_len);
  if (in.size() < total) return DecodeOutcome::kNeedMore;
  out->header = h;
  out->topic = std::string_view(reinterpret_cast<const char*>(p + kFrameHeaderSize), h.topic_len);
  out->payload = in.subspan(kFrameHeaderSize + h.topic_len, h.payload_len);
  const bool needs_topic = !(h.flags & kFlagContinuation) &&
                           (h.type == FrameType::kPublish || h.type == FrameType::kDeliver ||
                            h.type == FrameType::kRequest || h.type == FrameType::kPsPush ||
                            h.type == FrameType::kPsPull);
  if (needs_topic) {
    // The same bytes as a topic that passed already pass again: a batch of one publisher's
    // messages mostly repeats one topic.
    if (valid_topic.empty() || out->topic != valid_topic) {
      Status s = validate_topic(out->topic);
      if (!s.ok()) return protocol_error(frame_type_name(h.type), " frame: ", s.message());
    }
    *validated = true;
  } else if (h.type == FrameType::kSubscribe) {
    Status s = validate_pattern(out->topic);
    if (!s.ok()) return protocol_error("subscribe frame: ", s.message());
  }
  *consumed = total;
  return DecodeOutcome::kFrame;
}

}  // namespace

Result<DecodeOutcome> decode_frame(std::span<const std::byte> in, const DecodeLimits& limits,
                                   FrameView* out, size_t* consumed) {
  bool validated = false;
  return decode_one(in, limits, out, consumed, {}, &validated);
}

Status for_each_in_batch(std::span<const std::byte> payload, const DecodeLimits& limits,
                         const std::function<Status(const FrameView&)>& fn) {
  if (payload.empty()) return protocol_error("empty batch frame");
  size_t off = 0;
  std::string_view valid_topic;  // the last inner topic validate_topic() accepted (in `payload`)
  while (off < payload.size()) {
    FrameView f;
    size_t used = 0;
    bool validated = false;
    MYELIN_ASSIGN_OR_RETURN(DecodeOutcome outcome, decode_one(payload.subspan(off), limits, &f,
                                                              &used, valid_topic, &validated));
    if (validated) valid_topic = f.topic;
    if (outcome == DecodeOutcome::kNeedMore) {
      return protocol_error("truncated inner frame at byte ", off, " of a ", payload.size(),
                            "-byte batch");
    }
    if (!batchable_type(f.header.type)) {
      return protocol_error(frame_type_name(f.header.type), " frames cannot be batched");
    }
    if (f.header.flags & (kFlagMore | kFlagContinuation)) {
      return protocol_error("chunks cannot be batched");
    }
    MYELIN_RETURN_IF_ERROR(fn(f));
    off += used;
  }
  return ok_status();
}

bool valid_identity(std::string_view id) noexcept {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    if (!level_char_ok(c)) return false;
  }
  return true;
}

Result<std::array<std::byte, kNonceSize>> parse_hello(const FrameView& f) {
  if (f.header.type != FrameType::kHello) {
    return protocol_error("expected hello, got ", frame_type_name(f.header.type));
  }
  if (f.payload.size() != kNonceSize || !f.topic.empty()) {
    return protocol_error("hello carries ", f.payload.size(), " bytes, expected ", kNonceSize);
  }
  std::array<std::byte, kNonceSize> nonce;
  std::memcpy(nonce.data(), f.payload.data(), kNonceSize);
  return nonce;
}

uint64_t encode_versions(VersionRange r) noexcept {
  return (static_cast<uint64_t>(r.min) << 32) | r.max;
}

Result<VersionRange> decode_versions(uint64_t seq) {
  if (seq == 0) return VersionRange{1, 1};
  VersionRange r{static_cast<uint32_t>(seq >> 32), static_cast<uint32_t>(seq & 0xFFFFFFFFu)};
  if (r.min == 0 || r.min > r.max) {
    return protocol_error("bad protocol version range ", r.min, "..", r.max);
  }
  return r;
}

Result<uint32_t> negotiate_version(VersionRange ours, VersionRange theirs, std::string_view peer) {
  const uint32_t v = std::min(ours.max, theirs.max);
  if (v < ours.min || v < theirs.min) {
    return unsupported(peer, " speaks protocol versions ", theirs.min, "..", theirs.max,
                       ", this side ", ours.min, "..", ours.max, ": no common version (upgrade ",
                       theirs.max < ours.min ? "the peer" : "this side", ")");
  }
  return v;
}

Result<AuthRequest> parse_auth(const FrameView& f) {
  if (f.header.type != FrameType::kAuth) {
    return protocol_error("expected auth, got ", frame_type_name(f.header.type));
  }
  if (f.payload.size() != kNonceSize + kMacSize) {
    return protocol_error("auth carries ", f.payload.size(), " bytes, expected ",
                          kNonceSize + kMacSize);
  }
  if (!valid_identity(f.topic)) return protocol_error("bad client identity '", f.topic, "'");
  AuthRequest r;
  MYELIN_ASSIGN_OR_RETURN(r.versions, decode_versions(f.header.seq));
  r.identity = std::string(f.topic);
  std::memcpy(r.client_nonce.data(), f.payload.data(), kNonceSize);
  std::memcpy(r.mac.data(), f.payload.data() + kNonceSize, kMacSize);
  return r;
}

Result<AttachRequest> parse_attach(const FrameView& f) {
  if (f.header.type != FrameType::kAttach) {
    return protocol_error("expected attach, got ", frame_type_name(f.header.type));
  }
  if (f.payload.size() != kNonceSize + kMacSize) {
    return protocol_error("attach carries ", f.payload.size(), " bytes, expected ",
                          kNonceSize + kMacSize);
  }
  if (!valid_identity(f.topic)) return protocol_error("bad client identity '", f.topic, "'");
  if (f.header.id == 0) return protocol_error("attach to session 0");
  AttachRequest r;
  MYELIN_ASSIGN_OR_RETURN(r.versions, decode_versions(f.header.seq));
  if (r.versions.max < 2) {
    return protocol_error("attach from a client speaking protocol ", r.versions.max,
                          " (control connections need 2)");
  }
  r.identity = std::string(f.topic);
  r.session = f.header.id;
  std::memcpy(r.client_nonce.data(), f.payload.data(), kNonceSize);
  std::memcpy(r.mac.data(), f.payload.data() + kNonceSize, kMacSize);
  return r;
}

Result<AuthOk> parse_auth_ok(const FrameView& f) {
  if (f.header.type != FrameType::kAuthOk) {
    return protocol_error("expected auth_ok, got ", frame_type_name(f.header.type));
  }
  if ((f.payload.size() != kMacSize && f.payload.size() != kMacSize + kSessionTokenSize) ||
      !f.topic.empty()) {
    return protocol_error("auth_ok carries ", f.payload.size(), " bytes, expected ", kMacSize,
                          " or ", kMacSize + kSessionTokenSize);
  }
  AuthOk r;
  std::memcpy(r.proof.data(), f.payload.data(), kMacSize);
  if (f.payload.size() > kMacSize) {
    r.has_token = true;
    std::memcpy(r.token.data(), f.payload.data() + kMacSize, kSessionTokenSize);
  }
  return r;
}

namespace {
// Bytes of address space a reassembly reserves at its first chunk (see Reassembler::add()).
constexpr size_t kReassemblyReserve = 1 << 20;
}  // namespace

Result<bool> Reassembler::add(const FrameView& chunk, AssembledMessage* done) {
  const uint8_t fl = chunk.header.flags;
  if (fl & kFlagControl) return protocol_error("control-lane chunk");
  if (!(fl & kFlagContinuation)) {
    if (open_) return protocol_error("a new chunked message began inside message ", cur_.header.id);
    open_ = true;
    cur_.header = chunk.header;
    cur_.header.flags = static_cast<uint8_t>(fl & ~(kFlagMore | kFlagContinuation));
    cur_.topic = std::string(chunk.topic);
    // The total size is not known until the last chunk. Grown a chunk at a time, the buffer is
    // reallocated and copied at every doubling: the last copy of a 1 MiB message moves 512 KiB
    // at once (50-100 us in the broker's loop, where control frames wait). Address space for
    // the common sizes is reserved up front instead; pages are touched only as chunks land.
    cur_.payload = std::make_shared<std::vector<std::byte>>();
    cur_.payload->reserve(std::min<size_t>(limits_.max_message, kReassemblyReserve));
    cur_.payload->insert(cur_.payload->end(), chunk.payload.begin(), chunk.payload.end());
  } else {
    if (!open_) return protocol_error("continuation chunk with no message open");
    if (chunk.header.id != cur_.header.id || chunk.header.type != cur_.header.type) {
      open_ = false;
      return protocol_error("continuation chunk of message ", chunk.header.id, " inside message ",
                            cur_.header.id);
    }
    if (cur_.payload->size() + chunk.payload.size() > limits_.max_message) {
      open_ = false;
      return protocol_error("chunked message exceeds the limit of ", limits_.max_message, " bytes");
    }
    cur_.payload->insert(cur_.payload->end(), chunk.payload.begin(), chunk.payload.end());
  }
  if (fl & kFlagMore) return false;
  open_ = false;
  // The message keeps its buffer for as long as it is queued or held (by every subscriber, and
  // by the application on the client side), and heap memory once written stays with the process:
  // one that used less than half of the reservation gives the rest back (one copy of under
  // 512 KiB), so a message never holds more than twice its size, as with growth by doubling.
  if (cur_.payload->size() < cur_.payload->capacity() / 2) cur_.payload->shrink_to_fit();
  cur_.header.payload_len =
      static_cast<uint32_t>(std::min<size_t>(cur_.payload->size(), UINT32_MAX));
  *done = std::move(cur_);
  cur_ = AssembledMessage{};
  return true;
}

Status validate_topic(std::string_view topic) {
  // Every publish and every delivery is checked: one pass over the bytes decides the common case,
  // and only a topic it does not accept goes the long way (which words the error).
  if (plain_topic_ok(topic)) return ok_status();
  return validate_levels(topic, false);
}
Status validate_pattern(std::string_view pattern) {
  return validate_levels(pattern, true);
}

bool topic_matches(std::string_view pattern, std::string_view topic) noexcept {
  if (!topic.empty() && topic[0] == '$' && !pattern.empty() &&
      (pattern[0] == '*' || pattern[0] == '#')) {
    return false;
  }
  // A pattern equal to the topic matches it: every level is equal, or a wildcard that matches
  // that level ('*') or it and the rest ('#'); and a topic starting with '$' then has a pattern
  // that does not start with a wildcard. (A subscription to one exact topic is the common case.)
  if (pattern == topic) return true;
  // One pass over both, level by level, with plain loops: levels are short, and a find() per
  // level (a memchr call each) cost more than the bytes it scanned (a subscriber matches every
  // delivery against each of its subscriptions).
  const size_t pn = pattern.size(), tn = topic.size();
  size_t pi = 0, ti = 0;
  while (true) {
    size_t pe = pi;
    while (pe < pn && pattern[pe] != '/') ++pe;
    const std::string_view plevel = pattern.substr(pi, pe - pi);
    if (plevel == "#") return ti <= tn;  // one or more levels remain
    if (ti > tn) return false;
    size_t te = ti;
    if (plevel == "*") {
      while (te < tn && topic[te] != '/') ++te;
    } else {
      size_t k = pi;
      while (k < pe && te < tn && pattern[k] == topic[te]) {
        ++k;
        ++te;
      }
      if (k != pe || (te < tn && topic[te] != '/')) return false;  // the levels differ
    }
    const bool plast = pe == pn, tlast = te == tn;
    if (plast || tlast) return plast && tlast;
    pi = pe + 1;
    ti = te + 1;
  }
}

}  // namespace myelin::broker
