// transport/src/shm/shm_wire.hpp — the shm backend's formats: the address, the control messages
// sent over the Unix socket, the records carried by the rings, the shared key table, and the
// small RAII/socket helpers they need. Everything a peer reads is validated here or by the ring.
//
// See docs/transport-shm.md for the protocol as a whole.
//
// Thread safety: plain functions and value types; a UniqueFd is a move-only owner.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <myelin/core/cache_line.hpp>
#include <myelin/core/clock.hpp>
#include <myelin/core/status.hpp>

namespace myelin::transport::internal::shm {

// ---- file descriptors ---------------------------------------------------------------------------

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }
  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }
  void reset(int fd = -1) noexcept;
  // Gives up ownership and returns the fd.
  int release() noexcept { return std::exchange(fd_, -1); }

 private:
  int fd_ = -1;
};

// ---- address ------------------------------------------------------------------------------------

inline constexpr uint32_t kAddressMagic = 0x41534d4d;  // "MMSA"
inline constexpr uint16_t kWireVersion = 1;

// What local_address() publishes: the abstract Unix socket to dial, and the owner's identity.
// Layout (little-endian): magic u32, version u16, name length u16, pid i32, uid u32,
// start_time u64, name bytes.
struct ShmAddress {
  int32_t pid = 0;
  uint32_t uid = 0;
  uint64_t start_time = 0;
  std::string socket_name;  // abstract namespace, without the leading NUL
};
std::vector<uint8_t> encode_address(const ShmAddress& a);
Result<ShmAddress> decode_address(std::span<const uint8_t> bytes);

// ---- control messages (SOCK_SEQPACKET, with SCM_RIGHTS) -----------------------------------------

inline constexpr uint32_t kCtlMagic = 0x43534d4d;  // "MMSC"
inline constexpr size_t kMaxCtlText = 2048;
inline constexpr size_t kMaxCtlFds = 4;

enum class CtlType : uint16_t {
  // Sender (the larger address) asks the receiver to dial it back over this socket.
  // text: sender's address.
  kDialMe = 1,
  // The dialer hands over the connection. text: dialer's address; a: ring capacity;
  // fds: [ring dialer->acceptor, ring acceptor->dialer, doorbell of acceptor, doorbell of dialer].
  kHello = 2,
  // Sent by each side once connected. a: CMA probe address, b: probe value, c: 1 when this side
  // may sleep (its producers must ring the doorbell); fds: [key table memfd].
  kInfo = 3,
  // A shared allocation the peer may map. a: allocation id, b: size; fds: [memfd].
  kAlloc = 4,
  // The allocation a was freed: unmap it.
  kFree = 5,
  // a: 1 when the sender can read the receiver's memory with process_vm_readv (CMA).
  kCmaResult = 6,
};

struct CtlHeader {
  uint32_t magic = kCtlMagic;
  uint16_t version = kWireVersion;
  uint16_t type = 0;
  uint64_t a = 0, b = 0, c = 0, d = 0;
  uint32_t text_len = 0;
  uint32_t reserved = 0;
};
static_assert(sizeof(CtlHeader) == 48);

struct CtlMessage {
  CtlHeader header;
  std::vector<uint8_t> text;
  std::vector<UniqueFd> fds;
};

// Sends one message; waits for socket space until `deadline` (control traffic is rare and small).
Status send_ctl(int sock, const CtlHeader& header, std::span<const uint8_t> text,
                std::span<const int> fds, Deadline deadline);
enum class RecvOutcome { kMessage, kEmpty, kClosed };
// Receives one message without blocking. protocol_error for malformed messages.
Result<RecvOutcome> recv_ctl(int sock, CtlMessage& out);

// Abstract-namespace SOCK_SEQPACKET sockets.
Result<UniqueFd> listen_abstract(const std::string& name);
// Connects without waiting for the peer's process to do anything (the kernel queues it).
Result<UniqueFd> connect_abstract(const std::string& name, Deadline deadline);

// ---- ring records -------------------------------------------------------------------------------

enum RecordType : uint32_t {
  kEager = 1,      // EagerHeader + payload
  kRts = 2,        // RtsRecord: a message above the eager limit is ready
  kCts = 3,        // TokenRecord: receiver asks the sender to stream the message
  kData = 4,       // DataHeader + chunk of a streamed message
  kFin = 5,        // FinRecord: receiver is done with the sender's buffer
  kImm = 6,        // ImmRecord: immediate of a put whose data has landed
  kSplit = 7,      // SplitRecord: receiver asks the sender to write the head of a CMA message
  kSplitDone = 8,  // FinRecord: the sender's part of a split message is written (or why not)
};

struct EagerHeader {
  uint32_t channel;
  uint32_t seq;  // endpoint-wide message sequence (eager and RTS), checked by the receiver
};
static_assert(sizeof(EagerHeader) == 8);

enum class RtsKind : uint32_t {
  kSharedRegion = 1,  // the bytes lie in the sender's shared allocation `where` at `offset`
  kCma = 2,           // the bytes lie at address `where` in the sender (process_vm_readv)
  kStream = 3,        // send a CTS and the sender streams kData records
};
struct RtsRecord {
  uint32_t channel;
  uint32_t seq;
  uint64_t size;
  uint64_t token;
  uint32_t kind;  // RtsKind
  uint32_t reserved;
  uint64_t where;
  uint64_t offset;
};
static_assert(sizeof(RtsRecord) == 48);

struct TokenRecord {
  uint64_t token;
};
struct DataHeader {
  uint64_t token;
  uint64_t offset;
};
struct FinRecord {
  uint64_t token;
  uint32_t code;    // StatusCode the receiver saw (kOk, kOutOfRange); kSplitDone: the sender's
  uint32_t detail;  // kSplitDone: errno of the sender's failed process_vm_writev, else 0
};
struct ImmRecord {
  uint32_t value;
  uint32_t reserved;
};
// Split copy of a large CMA message: while the receiver reads [length, size) of the sender's
// buffer with process_vm_readv, the sender writes [0, length) into the receiver's buffer with
// process_vm_writev, so both processes copy at once. The receiver lends that part of its buffer
// through a grant: key table slot `slot` holding token `grant` (kind kGrant, remote write).
struct SplitRecord {
  uint64_t token;   // the rendezvous (RtsRecord::token)
  uint64_t grant;   // token of the grant slot
  uint64_t length;  // bytes the sender writes, from the start of the message
  uint32_t slot;    // key table slot of the grant
  uint32_t reserved;
};
static_assert(sizeof(SplitRecord) == 32);

// kInfo flags (CtlHeader::c).
inline constexpr uint64_t kInfoMaySleep = 1;  // this side may sleep: ring its doorbell
inline constexpr uint64_t kInfoSplit = 2;     // this side handles kSplit / kSplitDone records

// ---- the key table ------------------------------------------------------------------------------
// A memfd per backend (sent in kInfo) holding one slot per registration. A RemoteKey's shm blob
// names a slot and its token; the peer checks the token (acquire) before it touches the memory,
// so a deregistered (stale) or foreign key is refused.

inline constexpr uint32_t kKeySlots = 8192;
enum class KeyKind : uint64_t { kShared = 1, kCma = 2, kGrant = 3 };
// A grant's token word moves through these values (G is the grant's token, below 2^62):
//
//   G ──(writer: CAS G -> G|kGrantBusy)──> G|kGrantBusy ──(writer: store G|kGrantDone)──>
//   G|kGrantDone │                                         └──(writer failed: store G, "hand
//   back")──> G └──(owner: CAS G -> 0, "revoke"/"steal")──> 0            (owner: G|kGrantDone -> 0,
//   slot reused)
//
// The writer (the peer sending the message) may only take a bare G; the owner (the receiver) may
// only take a bare G or reset a G|kGrantDone. So exactly one of them copies the head: a writer
// whose compare-exchange fails writes nothing, and an owner whose compare-exchange fails on
// G|kGrantBusy waits for G|kGrantDone or G (never frees the memory under a writer). Tokens never
// repeat, so a late writer's compare-exchange from G also fails once the slot holds a newer grant.
// Memory orders and their pairings are at each access (KeyTable::grant/try_revoke and
// ShmEndpoint::serve_split).
inline constexpr uint64_t kGrantBusy = uint64_t{1} << 63;
inline constexpr uint64_t kGrantDone = uint64_t{1} << 62;

struct alignas(kCacheLine) KeySlot {
  std::atomic<uint64_t> token;   // 0 = free; written last on register (release), first on drop
  std::atomic<uint64_t> kind;    // KeyKind
  std::atomic<uint64_t> access;  // Access bits
  std::atomic<uint64_t> where;   // kShared: allocation id; kCma: address in the owner
  std::atomic<uint64_t> offset;  // kShared: offset in the allocation
  std::atomic<uint64_t> length;
};
static_assert(sizeof(KeySlot) == kCacheLine);
static_assert(std::atomic<uint64_t>::is_always_lock_free);

inline constexpr uint32_t kKeyBlobMagic = 0x4b534d4d;  // "MMSK"
struct KeyBlob {
  uint32_t magic = kKeyBlobMagic;
  uint16_t version = kWireVersion;
  uint16_t reserved = 0;
  uint32_t slot = 0;
  uint32_t reserved2 = 0;
  uint64_t token = 0;
};
static_assert(sizeof(KeyBlob) == 24);
Result<KeyBlob> decode_key_blob(std::span<const uint8_t> bytes);

}  // namespace myelin::transport::internal::shm
