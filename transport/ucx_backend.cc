// ucx backend: RDMA WRITE WITH IMM semantics over UCX's UCP layer.
//
// Why writes are active messages and not ucp_put_nbx + a notification:
//  * The RemoteRegion callers exchange is {key, addr, length} only, and a put
//    lands its bytes before the target can look at them. A forged or stale
//    RemoteRegion would let bytes land outside a live registration (UCX's tcp
//    and shared-memory transports do not bounds-check rkey accesses), so the
//    initiator would have to learn every remote registration's true bounds
//    and packed rkey through a side protocol, and still race deregistration.
//  * With an active message the target sees {key, offset, length} first and
//    validates them against its own registration table before any byte
//    lands: small payloads are copied in by the handler, large ones are
//    pulled in by ucp_am_recv_data_nbx straight into the registered region
//    (UCX's rendezvous: cma / put_zcopy / RDMA zero-copy, using the region's
//    ucp_mem_h). Refused writes never touch target memory, need no rkey
//    exchange, and stale keys are refused because keys are never reused.
//  * Latency: one message (data + immediate) instead of put + fence + AM.
//
// Connection setup: UCX 1.13's client-server path (ucp_listener) only ever
// picks tcp lanes, so shared memory (posix / sysv / cma) could not be used.
// Instead each backend listens on a small TCP socket of its own and two
// peers swap their ucp worker addresses over it; both then create an
// endpoint with UCP_EP_PARAM_FIELD_REMOTE_ADDRESS, so UCX chooses lanes from
// everything UCX_TLS / UCX_NET_DEVICES allow. UCX pairs the two endpoints
// (its wireup matches them by connection sequence number), so a message's
// reply_ep is the receiver's own endpoint for that peer.
//
//   client -> server  {u64 magic "ZWUCXhs2", u32 version, u32 rank,
//                      u32 address_bytes, u32 0} + worker address
//   server -> client  {u64 magic, u32 version, u32 code (0 accepted, else
//                      refused), u32 bytes, u32 0} + worker address, or the
//                      refusal's reason as text
//
// Every length is checked before anything is read into a buffer, every read
// and write has a deadline, and a peer that hangs up mid-handshake is named.
// The server creates its endpoint and reports kPeerConnected before it
// answers, so nothing the client sends can arrive before the server knows it.
//
// Data protocol (UCP AM ids; headers in host byte order: UCX itself assumes
// peers of one architecture). Every message is sent with
// UCP_AM_SEND_FLAG_REPLY so the receiver learns the endpoint it came from.
//
//   WRITE     2  {u64 ack, u64 seq, u64 key, u64 offset, u32 imm, u32 0} + payload.
//   SEND      3  {u64 ack, u64 seq} + payload (at most kUcxMaxControlBytes).
//   ACK       4  {u64 ack, u64 nack_seq, u32 code, u32 0}.
//   READ_REQ  5  {u64 id, u64 key, u64 offset, u64 length}, no payload.
//   READ_RESP 6  {u64 id, u32 code, u32 0} + the bytes (none if refused).
//   RING      7  {u64 bytes} + SegmentWire: the sender's mailbox.
//   MAP_REQ   8  {u64 key}: how may I map your region `key`?
//   MAP_RESP  9  {u64 key, u64 length, u32 code, u32 0} + SegmentWire
//                (code 0), or nothing (not offered).
//   DOORBELL 10  no header: a mailbox slot is waiting and you were asleep.
//
// Data messages (WRITE, SEND, mailbox slots) are numbered 1, 2, ... per
// connection and direction in posting order (`seq`); UCX delivers one
// endpoint's messages in order, the mailbox is read in order, and the target
// merges the two streams by number (below).
// The target completes them in that order (a rendezvous write holds back the
// completions behind it until its bytes are in place) and reports how many it
// has completed with a cumulative `ack`, piggy-backed on its own WRITE / SEND
// headers or sent as an ACK once Poll has handed every completion it covers
// to the application (at once when Poll runs dry, every kAckEvery messages
// while it is kept busy), or by the fallback thread while the owner is away.
// A refused WRITE is reported by an ACK whose nack_seq names it, sent before
// any ack covering it. The initiator's kWriteDone / kSendDone come, in posting
// order, once the ack covers the operation and UCX has released the source
// buffer: as with RDMA RC and the tcp backend, a completion means the target
// accepted the bytes.
//
// Reads (numbered 1, 2, ... per connection) are served in arrival order, and
// behind any write still landing, so a read sees the writes posted before
// it. The target checks key and range against its own table, as for writes,
// and answers with the bytes straight from the registered region (a
// rendezvous for large ones: UCX moves them zero-copy); the initiator places
// them into its registered range and reports kReadDone. The target reports
// nothing.
//
// Direct writes (shared memory). A write into memory the target got from
// AllocateMemory (a sealed memfd of its own, registered with UCX: see
// Segment for why not UCX's own allocation) to a peer on the same host
// whose mailbox we could map skips UCX's data path: the initiator memcpy's
// the bytes into its own mapping of the target's memory and publishes a
// 64-byte slot {seq, key, offset, length, imm, ack} in the target's
// mailbox, a ring of kRingSlots slots the target allocated the same way and
// announced (RING) when the endpoint was made. The slot's stamp is stored
// last with release semantics; the target's progress reads it with acquire,
// so the bytes are in place when the kWriteImm goes out. Which regions: the
// initiator asks once per key (MAP_REQ); the target offers only memory it
// allocated, with its true length, so the initiator checks every direct
// write against the target's own bounds and sends anything else as an
// active message (which the target refuses as usual: nothing is written).
// A freed allocation's pages stay alive only in the initiator's mapping, so
// a write through a stale mapping can never touch memory the target reuses;
// the target, which checks every slot against its own table, refuses it
// (unknown key) and the initiator drops the mapping. The target returns
// credits by storing how many slots it has taken in the mailbox header; a
// full mailbox, or an active-message write still unacknowledged (bytes land
// in posting order), sends the write as an active message instead. Acks
// ride on slots as on WRITE headers; as a slot may overtake an ACK carrying
// a refusal, each slot says how many refusals its writer has sent, and an
// ack that would cover one not yet received waits for it. Mailboxes raise
// no event: a target about to sleep in Poll stores a fresh generation
// number in its mailboxes' `sleeping` word (then a fence, then one more
// look), and a writer that sees a new one after its slot (fence in between)
// sends a DOORBELL active message, once per sleep. A peer that dies is seen
// as before (UCX's error callback or the liveness socket): its pending
// operations fail, and its mailbox and mappings are released. Only where
// UCX_TLS lets UCX use shared memory itself (UCX_TLS=tcp keeps everything
// on UCX's transports) and ZIPWIRE_UCX_DIRECT is not 0.
#include "transport/ucx_backend.h"

#include <arpa/inet.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <ucp/api/ucp.h>
#include <ucs/debug/log_def.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/log.h"
#include "transport/backend_util.h"

namespace zipwire::transport {
namespace {

using Clock = std::chrono::steady_clock;

enum AmId : unsigned {
  kAmWrite = 2,
  kAmSend = 3,
  kAmAck = 4,
  kAmReadReq = 5,
  kAmReadResp = 6,
  kAmRing = 7,
  kAmMapReq = 8,
  kAmMapResp = 9,
  kAmDoorbell = 10,
};
enum NackCode : uint32_t { kNackUnknownKey = 1, kNackOutOfRange = 2, kNackNeedsRendezvous = 3 };

constexpr uint64_t kHandshakeMagic = 0x3273686b58435557ull;  // "WUCXkhs2" little-endian
constexpr uint32_t kWireVersion = 3;
constexpr uint32_t kHandshakeAccepted = 0;
constexpr uint32_t kHandshakeRefused = 1;
constexpr uint32_t kFlagPeerErrors = 1;
constexpr size_t kHandshakeHdrBytes = 24;
// A worker address is a few hundred bytes (one entry per transport and
// device); anything far above that is not one.
constexpr uint32_t kMaxWorkerAddressBytes = 64 << 10;
constexpr uint32_t kMaxRefusalBytes = 1024;
// The server answers one handshake at a time; one peer that stalls holds the
// others back at most this long (or connect_timeout, if shorter).
constexpr auto kServerHandshakeTimeout = std::chrono::milliseconds(5000);
// The target acks at least this often while it keeps receiving, so a sender
// with a deep queue is never starved of completions by a busy receiver.
constexpr uint64_t kAckEvery = 32;
constexpr int kMaxProgressRounds = 64;
constexpr auto kMaxSleepSlice = std::chrono::milliseconds(100);
constexpr unsigned kRingFirstRounds = 16;
// DeregisterMemory waits at most this long for peers' reads of the region.
constexpr auto kDeregisterReadWait = std::chrono::milliseconds(2000);

struct WriteHdr {
  uint64_t ack;
  uint64_t seq;
  uint64_t key;
  uint64_t offset;
  uint32_t imm;
  uint32_t reserved;
};
struct SendHdr {
  uint64_t ack;
  uint64_t seq;
};
struct AckHdr {
  uint64_t ack;
  uint64_t nack_seq;
  uint32_t code;
  uint32_t reserved;
};
struct ReadReqHdr {
  uint64_t id;
  uint64_t key;
  uint64_t offset;
  uint64_t length;
};
struct ReadRespHdr {
  uint64_t id;
  uint32_t code;
  uint32_t reserved;
};
struct RingHdr {  // kAmRing: our mailbox for the receiver's writes; payload: SegmentWire
  uint64_t bytes;
};
struct MapReqHdr {
  uint64_t key;
};
struct MapRespHdr {  // payload: SegmentWire when code == 0
  uint64_t key;
  uint64_t length;
  uint32_t code;  // 0: mappable; else the region is not (or no longer) offered for direct writes
  uint32_t reserved;
};
constexpr size_t kMaxHdrBytes = 40;
static_assert(sizeof(WriteHdr) <= kMaxHdrBytes && sizeof(AckHdr) <= kMaxHdrBytes &&
              sizeof(ReadReqHdr) <= kMaxHdrBytes && sizeof(ReadRespHdr) <= kMaxHdrBytes &&
              sizeof(RingHdr) <= kMaxHdrBytes && sizeof(MapRespHdr) <= kMaxHdrBytes);

// The mailbox (see "Direct writes" above): a ring of one-cache-line slots in
// shared memory the target allocated, written by the peer. Header: at 0
// `consumed` (slots the target has taken, for the writer's credits; the
// writer reads it only when it runs short), at 256 `sleeping` (non-zero
// while a thread of the target sleeps in Poll: the writer, which reads it
// after every slot, then rings the doorbell). They sit 256 bytes apart so
// that the writer's reads of `sleeping` never pull in `consumed` (adjacent-
// line prefetch): the target's store to it stays local, and its next locked
// instruction (the mutex) does not wait on the other core.
constexpr uint64_t kRingSlots = 256;
constexpr size_t kSlotBytes = 64;
constexpr size_t kRingHeaderBytes = 512;
constexpr size_t kRingBytes = kRingHeaderBytes + kRingSlots * kSlotBytes;
constexpr size_t kRingConsumedAt = 0;
constexpr size_t kRingSleepingAt = 256;
// Writes of at most kInlineBytes travel in the slot and the target copies
// them into place: the target then reads one cache line the writer touched,
// not two (the slot and the bytes), a cross-core miss less per message.
constexpr size_t kInlineBytes = 8;
constexpr uint32_t kSlotInline = 1;
struct alignas(64) RingSlot {
  uint64_t stamp;  // ring position + 1, stored last (release): the slot is complete
  uint64_t seq;    // data message number (shared with the active-message path)
  uint64_t key;
  uint64_t offset;
  uint64_t ack;  // piggy-backed, as in WriteHdr
  uint32_t length;
  uint32_t imm;
  uint32_t nacks;  // refusals the writer has sent us so far (see ApplySlotAckLocked)
  uint32_t flags;  // kSlotInline: the bytes are in `data`
  uint8_t data[kInlineBytes];
};
static_assert(sizeof(RingSlot) == kSlotBytes);
static_assert(kUcxMaxWriteBytes <= UINT32_MAX, "a slot's length is 32 bits");
static_assert(std::atomic_ref<uint64_t>::is_always_lock_free &&
              std::atomic_ref<uint32_t>::is_always_lock_free);

// Another process writes these words: every access is atomic.
inline std::atomic_ref<uint64_t> Word64(uint8_t* p) {
  return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p));
}
inline std::atomic_ref<uint32_t> Word32(uint8_t* p) {
  return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(p));
}

using internal::RangeInside;

#if defined(__x86_64__)
bool HasErms() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 9)) != 0;
}
const bool kHasErms = HasErms();
#endif

// The direct path's copy into the target's memory. Where the CPU has fast
// string moves (ERMS), `rep movsb` for large writes: glibc's memcpy leaves
// it for its vector loop above the L2 size on AMD, which measured 17% slower
// for 1 MiB here (50 vs 58.6 GB/s in one process; write_bw 36.9 -> 46.4 GB/s
// against ucp_put_bw's 43.7-46.7, which also copies with rep movsb).
inline void CopyToPeer(void* dst, const void* src, size_t n) {
#if defined(__x86_64__)
  if (kHasErms && n >= 4096) {
    asm volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

std::string RangeString(uint64_t offset, uint64_t length) {
  // Appended piecewise: gcc 12 -O3 flags "[" + to_string(...) with a bogus -Wrestrict.
  std::string out = "[";
  out.append(std::to_string(offset)).append(", +").append(std::to_string(length)).append(")");
  return out;
}

std::string SockaddrString(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    port = ntohs(in6->sin6_port);
    return "[" + std::string(host) + "]:" + std::to_string(port);
  }
  return "?";
}

// Resolves a numeric or named host and a port into a socket address.
Status Resolve(const std::string& host, const std::string& port, bool passive, sockaddr_storage* out,
               socklen_t* len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return Unavailable("cannot resolve '" + host + ":" + port + "': " + gai_strerror(rc));
  }
  std::memcpy(out, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Handshake socket I/O: non-blocking, every wait bounded by `deadline`.

using internal::GetLE;
using internal::PutLE;

// A file descriptor closed when it goes out of scope.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { Reset(); }
  int get() const { return fd_; }
  int Release() { return std::exchange(fd_, -1); }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

int MsLeft(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(left, 0, 1000000));
}

// Waits for `events` on fd; false at the deadline.
bool WaitFd(int fd, short events, Clock::time_point deadline) {
  while (true) {
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, MsLeft(deadline));
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) return true;  // let the read / write report it
  }
}

Status WriteAll(int fd, const uint8_t* p, size_t n, Clock::time_point deadline, const std::string& who) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!WaitFd(fd, POLLOUT, deadline)) return Timeout(who + " stalled during the ucx handshake");
      continue;
    }
    return Unavailable(who + " went away during the ucx handshake: " + std::strerror(errno));
  }
  return Status::Ok();
}

Status ReadAll(int fd, uint8_t* p, size_t n, Clock::time_point deadline, const std::string& who) {
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return Unavailable(who + " closed the connection during the ucx handshake");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (!WaitFd(fd, POLLIN, deadline))
        return Timeout("no answer from " + who + " during the ucx handshake");
      continue;
    }
    return Unavailable(who + " went away during the ucx handshake: " + std::strerror(errno));
  }
  return Status::Ok();
}

struct HandshakeHdr {
  uint64_t magic = kHandshakeMagic;
  uint32_t version = kWireVersion;
  uint32_t word = 0;   // client: its rank; server: accepted / refused
  uint32_t bytes = 0;  // what follows
  uint32_t flags = 0;  // server: kFlagPeerErrors if its endpoint has UCX peer-failure handling
};

std::vector<uint8_t> EncodeHandshake(const HandshakeHdr& h, std::span<const uint8_t> body) {
  // Sized once and filled in place (gcc 12 flags insert() here with a bogus -Warray-bounds).
  std::vector<uint8_t> out(kHandshakeHdrBytes + body.size(), 0);
  PutLE<uint64_t>(out.data(), h.magic);
  PutLE<uint32_t>(out.data() + 8, h.version);
  PutLE<uint32_t>(out.data() + 12, h.word);
  PutLE<uint32_t>(out.data() + 16, h.bytes);
  PutLE<uint32_t>(out.data() + 20, h.flags);
  if (!body.empty()) std::memcpy(out.data() + kHandshakeHdrBytes, body.data(), body.size());
  return out;
}

// Reads and checks a handshake header; `max_bytes` bounds what may follow.
Result<HandshakeHdr> ReadHandshake(int fd, Clock::time_point deadline, const std::string& who,
                                   uint32_t max_bytes) {
  uint8_t raw[kHandshakeHdrBytes];
  ZW_RETURN_IF_ERROR(ReadAll(fd, raw, sizeof(raw), deadline, who));
  HandshakeHdr h;
  h.magic = GetLE<uint64_t>(&raw[0]);
  h.version = GetLE<uint32_t>(&raw[8]);
  h.word = GetLE<uint32_t>(&raw[12]);
  h.bytes = GetLE<uint32_t>(&raw[16]);
  h.flags = GetLE<uint32_t>(&raw[20]);
  if (h.magic != kHandshakeMagic) return Corrupt(who + " is not a zipwire ucx backend (bad handshake magic)");
  if (h.version != kWireVersion) {
    return Corrupt(who + " speaks ucx wire version " + std::to_string(h.version) + ", expected " +
                   std::to_string(kWireVersion));
  }
  if (h.bytes > max_bytes) {
    return Corrupt(who + " announced " + std::to_string(h.bytes) + " handshake bytes (at most " +
                   std::to_string(max_bytes) + ")");
  }
  return h;
}

// UCX logs an ERROR when an endpoint cannot get peer-failure handling; while
// this thread probes for exactly that, the line is expected and dropped.
thread_local bool g_quiet_ucx_errors = false;
ucs_log_func_rc_t QuietUcxErrors(const char*, unsigned, const char*, ucs_log_level_t level,
                                 const ucs_log_component_config_t*, const char*, va_list) {
  return g_quiet_ucx_errors && level <= UCS_LOG_LEVEL_WARN ? UCS_LOG_FUNC_RC_STOP : UCS_LOG_FUNC_RC_CONTINUE;
}

// UCX parses a worker address trusting it (ucp_address_unpack asserts, i.e.
// aborts the process, on an unknown address version), so what a peer sent
// is checked first as far as its format is known outside UCX: long enough
// for the header byte and the worker's 64-bit uuid, and the same address
// format version (the header's low four bits) as our own UCX writes.
constexpr size_t kMinWorkerAddressBytes = 9;
Status CheckWorkerAddress(std::span<const uint8_t> peer, std::span<const uint8_t> own,
                          const std::string& who) {
  if (peer.size() < kMinWorkerAddressBytes) {
    return Corrupt(who + " sent a ucp worker address of " + std::to_string(peer.size()) + " bytes");
  }
  if ((peer[0] & 0x0f) != (own[0] & 0x0f)) {
    return Corrupt(who + " sent a ucp worker address of format version " + std::to_string(peer[0] & 0x0f) +
                   ", ours is " + std::to_string(own[0] & 0x0f) + " (a different UCX, or not an address)");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Shared-memory segments for AllocateMemory and the mailboxes: a sealed
// memfd (it can grow, never shrink, so a mapping of it can never fault), which
// a peer on the same host opens through /proc/<pid>/fd/<fd> as UCX's posix
// transport does, checked by boot id, device and inode. Not UCX's own
// ucp_mem_map(UCP_MEM_MAP_ALLOCATE) + ucp_rkey_ptr: UCX 1.13's rkey unpack
// crashes (a NULL dereference in ucp_rkey_destroy on its error path) when
// the segment is gone, which happens whenever a peer frees or exits before
// we map what it announced, and an open() that fails is just an error.

struct Segment {
  uint8_t* addr = nullptr;
  size_t bytes = 0;  // mapped (whole pages)
  int fd = -1;       // -1 for a peer's segment mapped here
  uint64_t dev = 0;
  uint64_t ino = 0;
};

// What a peer needs to map a segment; sent as a message payload.
struct SegmentWire {
  uint32_t pid;
  int32_t fd;
  uint64_t dev;
  uint64_t ino;
  uint64_t bytes;
  char boot_id[40];  // /proc/sys/kernel/random/boot_id: the same kernel
};
static_assert(sizeof(SegmentWire) == 72);

std::string ReadBootId() {
  char buf[64] = {};
  Fd f(::open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC));
  if (f.get() < 0) return {};
  ssize_t n = ::read(f.get(), buf, sizeof(buf) - 1);
  if (n <= 0) return {};
  std::string id(buf, static_cast<size_t>(n));
  while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
  return id.size() < sizeof(SegmentWire::boot_id) ? id : std::string();
}

Result<Segment> CreateSegment(size_t length) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  if (length > SIZE_MAX - page) return InvalidArgument("segment of " + std::to_string(length) + " bytes");
  Segment seg;
  seg.bytes = (length + page - 1) / page * page;
  Fd fd(::memfd_create("zipwire-ucx", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd.get() < 0) return IoError(std::string("memfd_create: ") + std::strerror(errno));
  if (::ftruncate(fd.get(), static_cast<off_t>(seg.bytes)) != 0) {
    return Status(errno == ENOMEM || errno == ENOSPC ? StatusCode::kResourceExhausted : StatusCode::kIoError,
                  "ftruncate of a " + std::to_string(seg.bytes) + "-byte memfd: " + std::strerror(errno));
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
    return IoError(std::string("sealing a memfd: ") + std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return IoError(std::string("fstat of a memfd: ") + std::strerror(errno));
  void* p = ::mmap(nullptr, seg.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) {
    return Status(
        errno == ENOMEM ? StatusCode::kResourceExhausted : StatusCode::kIoError,
        "mmap of " + std::to_string(seg.bytes) + " bytes of shared memory: " + std::strerror(errno));
  }
  seg.addr = static_cast<uint8_t*>(p);
  seg.fd = fd.Release();
  seg.dev = st.st_dev;
  seg.ino = st.st_ino;
  return seg;
}

void DestroySegment(Segment& seg) {
  if (seg.addr != nullptr) ::munmap(seg.addr, seg.bytes);
  if (seg.fd >= 0) ::close(seg.fd);
  seg = Segment{};
}

SegmentWire DescribeSegment(const Segment& seg, const std::string& boot_id) {
  SegmentWire w{};
  w.pid = static_cast<uint32_t>(::getpid());
  w.fd = seg.fd;
  w.dev = seg.dev;
  w.ino = seg.ino;
  w.bytes = seg.bytes;
  std::memcpy(w.boot_id, boot_id.data(), std::min(boot_id.size(), sizeof(w.boot_id) - 1));
  return w;
}

// Maps a peer's segment of at least `need` bytes, or says why not (another
// host or container, the peer freed it or exited, no permission, ...).
Result<Segment> MapPeerSegment(const SegmentWire& w, uint64_t need, const std::string& boot_id) {
  if (boot_id.empty() || std::strncmp(w.boot_id, boot_id.c_str(), sizeof(w.boot_id)) != 0) {
    return Unavailable("another host");
  }
  if (w.bytes < need || w.bytes > (uint64_t{1} << 46) || w.fd < 0) return Corrupt("bad segment description");
  const std::string path = "/proc/" + std::to_string(w.pid) + "/fd/" + std::to_string(w.fd);
  Fd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (fd.get() < 0) return Unavailable("open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || st.st_dev != w.dev || st.st_ino != w.ino ||
      static_cast<uint64_t>(st.st_size) < w.bytes) {
    return Unavailable(path + " is not the segment announced (freed meanwhile)");
  }
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0 || !(seals & F_SEAL_SHRINK)) return Unavailable(path + " is not sealed against shrinking");
  void* p = ::mmap(nullptr, w.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return Unavailable(std::string("mmap of a peer's segment: ") + std::strerror(errno));
  Segment seg;
  seg.addr = static_cast<uint8_t*>(p);
  seg.bytes = w.bytes;
  return seg;
}

// Whether UCX_TLS lets UCX itself use shared memory: direct writes are its
// shared-memory path, so UCX_TLS=tcp (or ^sm) keeps everything on UCX's
// transports, as asked.
bool UcxTlsAllowsSharedMemory() {
  const char* env = std::getenv("UCX_TLS");
  if (env == nullptr || *env == '\0') return true;
  std::string v(env);
  const bool negated = v[0] == '^';
  if (negated) v.erase(0, 1);
  bool sm = false, posix = false, sysv = false, all = false;
  size_t pos = 0;
  while (pos <= v.size()) {
    size_t end = v.find(',', pos);
    if (end == std::string::npos) end = v.size();
    const std::string t = v.substr(pos, end - pos);
    sm |= t == "sm" || t == "shm";
    posix |= t == "posix";
    sysv |= t == "sysv";
    all |= t == "all";
    pos = end + 1;
  }
  if (negated) return !(sm || (posix && sysv));
  return all || sm || posix || sysv;
}

using internal::CompletionRing;

class UcxBackend;
struct Conn;

enum class OpKind : uint8_t { kWrite, kSend, kRead, kReadResp, kCtrl };

// One outbound message. Pooled; lives until it is finished (its completion
// pushed, or for control messages at once) and UCX has released its requests.
struct Op {
  OpKind kind = OpKind::kCtrl;
  bool local_done = false;    // UCX no longer needs the source buffer
  bool finished = false;      // its completion went out (or it needs none)
  bool request_live = false;  // a UCX send request still references this op
  bool recv_live = false;     // kRead: a UCX receive into the local range is in flight
  bool am_write = false;      // kWrite sent as an active message (not through the mailbox)
  Conn* conn = nullptr;
  uint64_t seq = 0;  // data message number, or read id
  uint64_t context = 0;
  uint64_t key = 0;  // kWrite: remote key (for messages); kRead / kReadResp: the local region's key
  uint64_t offset = 0;
  uint64_t length = 0;
  Status status;               // OK, or why the target refused it
  std::vector<uint8_t> owned;  // PostSend's copy
  size_t hdr_len = 0;
  alignas(8) uint8_t hdr[kMaxHdrBytes] = {};  // UCX may read it until completion
};

// An inbound data message whose completion waits: for its rendezvous bytes,
// or behind one that does (completions go out in arrival order). A read
// request queued behind a landing write is one too (read_req set).
struct RxSlot {
  Conn* conn = nullptr;
  uint64_t seq = 0;
  bool ready = false;
  bool request_live = false;
  bool orphaned = false;  // its connection failed; freed by the UCX callback
  bool read_req = false;
  uint32_t nack = 0;
  ReadReqHdr read{};
  Completion c;
};

enum class ConnState : uint8_t { kOpen, kClosed };

struct Conn {
  UcxBackend* backend = nullptr;
  ucp_ep_h ep = nullptr;
  PeerId peer = kInvalidPeer;
  std::string address;
  int sock = -1;  // the handshake socket, kept as a liveness signal; closed by the socket thread
  ConnState state = ConnState::kOpen;
  Status failure;
  // The application has been handed a completion carrying `failure`; from
  // then on posts fail at once. Before that, a post that races with the
  // failure is accepted and completes with it (as on tcp, where the failure
  // shows only once progress notices it).
  bool failure_reported = false;

  // Outbound.
  uint64_t next_seq = 1;
  uint64_t peer_acked = 0;
  std::deque<Op*> unacked;  // posting order
  uint64_t next_read_id = 1;
  std::deque<Op*> reads;  // PostReads awaiting their bytes, posting order

  // Inbound.
  uint64_t rx_seq = 0;   // data messages seen
  uint64_t rx_done = 0;  // data messages completed (in order)
  uint64_t ack_sent = 0;
  bool ack_queued = false;
  std::deque<RxSlot*> rx_pending;
  uint64_t read_reqs_seen = 0;

  // Direct writes (shm peers). Outbound: the peer's mailbox, mapped here
  // (tx_ring set once that worked), and the peer's allocated regions we
  // learnt to map, by key (base null: not mappable, or not any more).
  struct RemoteMap {
    uint8_t* base = nullptr;
    uint64_t length = 0;  // the region's true length, as its owner said
    Segment mapping;
  };
  uint8_t* tx_ring = nullptr;
  Segment tx_ring_map;
  uint64_t tx_ring_pos = 0;       // slots written
  uint64_t tx_ring_consumed = 0;  // the peer's `consumed`, last read
  uint64_t tx_inline_end = 0;     // ring position after the last inline slot
  std::unordered_map<uint64_t, RemoteMap> remote_maps;
  uint64_t am_writes_unacked = 0;  // AM writes not yet acked: direct writes wait behind them
  uint64_t last_map_key = 0;       // one-entry cache in front of remote_maps (entries are never erased)
  RemoteMap* last_map = nullptr;
  uint32_t doorbell_gen = 0;  // the peer's sleep generation we last rang the doorbell for
  // Inbound: our mailbox for the peer's direct writes.
  uint8_t* rx_ring = nullptr;
  Segment rx_ring_seg;
  uint64_t rx_ring_pos = 0;  // slots taken
  // Refusals sent / received, so that an ack piggy-backed on a mailbox slot
  // (which may overtake the active messages) never covers a write whose
  // refusal has not arrived yet.
  uint32_t nacks_sent = 0;
  uint32_t nacks_seen = 0;
  uint64_t deferred_ack = 0;
  uint32_t deferred_nacks = 0;

  std::string Name() const { return "peer " + std::to_string(peer) + " (" + address + ")"; }
};

class UcxBackend final : public Backend {
 public:
  UcxBackend(const BackendOptions& options, std::chrono::microseconds spin,
             std::chrono::microseconds idle_progress, bool want_peer_errors, bool direct)
      : options_(options),
        spin_(spin),
        idle_progress_(idle_progress),
        want_peer_errors_(want_peer_errors),
        direct_(direct),
        self_(options.self) {
    caps_.name = "ucx";
    caps_.supports_write_imm = true;
    caps_.supports_remote = true;
    caps_.zero_copy = true;
    caps_.memory_kinds = {MemoryKind::kHost};
    caps_.max_control_bytes = kUcxMaxControlBytes;
    caps_.max_write_bytes = kUcxMaxWriteBytes;
    caps_.supports_read = true;
    caps_.supports_alloc = true;
  }

  ~UcxBackend() override {
    Close();
    if (wake_fd_ >= 0) ::close(wake_fd_);
    if (loop_ctl_fd_ >= 0) ::close(loop_ctl_fd_);
    for (RxSlot* s : orphans_) delete s;
  }

  Status Init();

  const Capabilities& capabilities() const override { return caps_; }
  void SetLocalRank(PeerId self) override { self_.store(self); }
  Result<std::string> Listen() override;
  Status Connect(PeerId peer, const std::string& address) override;
  Result<MemoryRegion> RegisterMemory(void* addr, size_t length, MemoryKind kind) override;
  Result<MemoryRegion> AllocateMemory(size_t length, MemoryKind kind) override;
  Status DeregisterMemory(const MemoryRegion& region) override;
  Status PostWrite(PeerId peer, const MemoryRegion& local, uint64_t local_offset, const RemoteRegion& remote,
                   uint64_t remote_offset, uint64_t length, uint32_t imm, uint64_t context) override;
  Status PostRead(PeerId peer, const MemoryRegion& local, uint64_t local_offset, const RemoteRegion& remote,
                  uint64_t remote_offset, uint64_t length, uint64_t context) override;
  Status PostSend(PeerId peer, std::span<const uint8_t> message, uint64_t context) override;
  size_t Poll(std::span<Completion> out, std::chrono::milliseconds timeout) override;
  void Close() override;

 private:
  struct Region {
    void* addr = nullptr;
    size_t length = 0;
    MemoryKind kind = MemoryKind::kHost;
    ucp_mem_h memh = nullptr;
    uint32_t reads_in_flight = 0;  // peers' reads UCX is still sending from here
    bool allocated = false;        // AllocateMemory: ours (seg), peers on this host may map it
    Segment seg;
  };

  // UCX callbacks (run inside ucp_worker_progress, so with mu_ held).
  static void SendCb(void* request, ucs_status_t status, void* user_data);
  static void RecvCb(void* request, ucs_status_t status, size_t length, void* user_data);
  static void CloseCb(void* request, ucs_status_t status, void* user_data);
  static void ErrCb(void* arg, ucp_ep_h ep, ucs_status_t status);
  static void ReadRecvCb(void* request, ucs_status_t status, size_t length, void* user_data);
  static ucs_status_t WriteCb(void* arg, const void* header, size_t header_length, void* data, size_t length,
                              const ucp_am_recv_param_t* param);
  static ucs_status_t SendMsgCb(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t AckCb(void* arg, const void* header, size_t header_length, void* data, size_t length,
                            const ucp_am_recv_param_t* param);
  static ucs_status_t ReadReqCb(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t ReadRespCb(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t RingCb(void* arg, const void* header, size_t header_length, void* data, size_t length,
                             const ucp_am_recv_param_t* param);
  static ucs_status_t MapReqCb(void* arg, const void* header, size_t header_length, void* data, size_t length,
                               const ucp_am_recv_param_t* param);
  static ucs_status_t MapRespCb(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t DoorbellCb(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param);

  // Marks owner activity for the fallback thread. A counter, not a time
  // stamp: a clock read costs ~70 ns on kvm-clock, as much as a round of
  // progress, and the hot paths would pay it on every call.
  // Not an atomic increment: a lost update still changes the value, which
  // is all the fallback thread looks at, and costs no locked instruction.
  void Touch() { activity_.store(activity_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed); }
  void Wake();

  // Connection setup (handshake socket; takes mu_ itself).
  bool ProbePeerErrors();
  void SocketLoop();
  void KickSocketLoop();
  void ServeHandshake(Fd sock, const std::string& address);
  Status ClientHandshake(int fd, PeerId peer, const std::string& address, Clock::time_point deadline,
                         std::vector<uint8_t>* peer_worker, std::string* refusal, bool* peer_errors);

  // Everything below runs with mu_ held.
  Conn* NewConnLocked(PeerId peer, std::string address, ConnState state);
  Status CreateEpLocked(Conn* c, const std::vector<uint8_t>& worker_address, bool peer_errors);
  Conn* ConnOf(const ucp_am_recv_param_t* param);
  Op* AllocOpLocked(OpKind kind, Conn* c);
  void MaybeFreeOpLocked(Op* op);
  void IssueLocked(Op* op, unsigned id, const void* buffer, size_t length, ucp_mem_h memh, MemoryKind kind,
                   uint32_t flags);
  void SendAckLocked(Conn* c, uint64_t ack, uint64_t nack_seq = 0, uint32_t code = 0);
  void FlushAcksLocked(uint64_t min_unacked = 1);
  size_t PopLocked(std::span<Completion> out);
  Status FailedPostLocked(Conn* c, CompletionType type, uint64_t context);
  void PushCompletionLocked(Completion c);
  void FinishOpLocked(Op* op, const Status& status);
  void FinishReadLocked(Op* op, const Status& status);
  void ServeReadLocked(Conn* c, const ReadReqHdr& req);
  void EndServeLocked(Op* op);
  void CompleteFrontLocked(Conn* c);
  bool ApplyAckLocked(Conn* c, uint64_t ack);
  void DrainRxLocked(Conn* c);
  // `completion` null: the caller already queued it (Emplace).
  void RxDoneLocked(Conn* c, uint64_t seq, uint32_t nack, Completion* completion);
  void FailConnLocked(Conn* c, const Status& status, bool emit_peer_error);
  void ProtocolErrorLocked(Conn* c, const std::string& what);
  void CloseEpLocked(Conn* c, bool force = true);
  void CloseUcpEpLocked(ucp_ep_h ep, bool force);
  void RunDeferredClosesLocked();
  unsigned ProgressOnceLocked();
  bool ProgressLocked();
  void WatchRingsUnlocked(std::unique_lock<std::mutex>& lk);
  ucs_status_t OnData(Conn* c, bool is_write, const void* header, size_t header_length, void* data,
                      size_t length, const ucp_am_recv_param_t* param);
  void OnAck(Conn* c, const void* header, size_t header_length);
  void OnReadReq(Conn* c, const void* header, size_t header_length, size_t length);
  ucs_status_t OnReadResp(Conn* c, const void* header, size_t header_length, void* data, size_t length,
                          const ucp_am_recv_param_t* param);

  Region* FindRegionLocked(uint64_t key) { return region_cache_.Find(regions_, key); }
  Conn* FindPeerLocked(PeerId peer) {
    Conn** c = peer_cache_.Find(by_peer_, peer);
    return c != nullptr ? *c : nullptr;
  }
  void ForgetPeerCacheLocked() { peer_cache_.Forget(); }

  // Direct writes (mailbox); all with mu_ held.
  void SetupRxRingLocked(Conn* c);
  void OnRing(Conn* c, const void* header, size_t header_length, const void* data, size_t length,
              const ucp_am_recv_param_t* param);
  void OnMapReq(Conn* c, const void* header, size_t header_length);
  void OnMapResp(Conn* c, const void* header, size_t header_length, const void* data, size_t length,
                 const ucp_am_recv_param_t* param);
  void SendCtrlLocked(Conn* c, unsigned id, const void* hdr, size_t hdr_len, std::vector<uint8_t> payload);
  const Conn::RemoteMap* DirectTargetLocked(Conn* c, const RemoteRegion& remote);
  bool PostDirectLocked(Conn* c, const Conn::RemoteMap& m, const uint8_t* src, uint64_t key,
                        uint64_t remote_offset, uint64_t length, uint32_t imm, uint64_t seq);
  bool PollRingLocked(Conn* c, uint64_t max_seq);
  bool PollRingsLocked();
  bool CatchUpLocked(Conn* c, uint64_t seq);
  void DeliverLocked(Conn* c, uint64_t seq, uint32_t nack, Completion&& comp);
  void ApplySlotAckLocked(Conn* c, uint64_t ack, uint32_t nacks);
  void SetSleepingLocked(bool sleeping);
  void ReleaseDirectLocked(Conn* c);
  void ReleaseDeferredLocked();

  void FallbackProgressLoop();

  BackendOptions options_;
  std::chrono::microseconds spin_;
  std::chrono::microseconds idle_progress_;
  bool want_peer_errors_;
  bool direct_;  // ZIPWIRE_UCX_DIRECT: offer and use mailboxes / direct writes
  Capabilities caps_;
  std::atomic<PeerId> self_;
  bool cuda_ = false;  // this UCX build handles CUDA memory

  // Guards all UCX calls and all state below: UCX runs in serialized mode and
  // its callbacks fire inside ucp_worker_progress, i.e. with mu_ held.
  std::mutex mu_;
  std::condition_variable pollers_cv_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::vector<uint8_t> worker_address_;  // what peers need to reach this worker
  Fd listen_sock_;
  std::string listen_address_;
  // UCX's shared-memory transports have no peer-failure handling: endpoints
  // that must use them are created without (UCP_ERR_HANDLING_MODE_NONE).
  // Set once at Init (ProbePeerErrors).
  bool peer_errors_ = true;
  // The socket thread: serves handshakes and watches every connection's
  // handshake socket, kept open as its liveness signal (EOF: the peer's
  // process exited or its backend closed), which is how a peer's loss shows
  // on endpoints without UCX peer-failure handling.
  int loop_ctl_fd_ = -1;
  std::atomic<bool> loop_stop_{false};
  std::thread socket_thread_;
  int efd_ = -1;
  int wake_fd_ = -1;
  bool closed_ = false;
  int pollers_ = 0;                                        // threads inside Poll
  int sleepers_ = 0;                                       // of which asleep on the event fd
  std::unordered_set<void*> closing_;                      // endpoint close requests in flight
  int in_ucx_ = 0;                                         // > 0 while UCX may be calling us back
  int ring_watchers_ = 0;                                  // > 0: a Poll reads mailboxes without mu_
  std::vector<std::pair<ucp_ep_h, bool>> deferred_close_;  // {ep, force}
  CompletionRing completions_;
  std::unordered_map<uint64_t, Region> regions_;
  uint64_t next_key_ = 1;
  std::vector<std::unique_ptr<Conn>> conns_;  // every connection ever made (callbacks hold raw pointers)
  std::unordered_map<PeerId, Conn*> by_peer_;
  std::unordered_map<ucp_ep_h, Conn*> by_ep_;  // live endpoints only
  std::vector<std::unique_ptr<Op>> ops_;       // owns every op
  std::vector<Op*> free_ops_;
  std::vector<Conn*> ack_dirty_;
  std::unordered_set<RxSlot*> orphans_;
  std::vector<Conn*> ring_conns_;           // open connections with a mailbox of ours to poll
  std::vector<Segment> deferred_segments_;  // released outside ring polling
  std::string boot_id_;                     // this kernel's, for peers' segments
  uint32_t sleeping_flag_ = 0;              // what our mailboxes' `sleeping` words say
  uint32_t sleep_gen_ = 0;                  // a new non-zero value for every sleep
  unsigned ring_first_ = 0;                 // Poll rounds in a row that skipped UCX progress
  // One-entry caches in front of regions_ and by_peer_ for the write and
  // mailbox paths (a hash lookup is a 64-bit division, ~10% of a shared-
  // memory message's software path). Unordered_map elements stay put, so
  // the pointers hold until the entry is erased or replaced (reset there).
  internal::LookupCache<std::unordered_map<uint64_t, Region>> region_cache_;
  internal::LookupCache<std::unordered_map<PeerId, Conn*>> peer_cache_;

  std::atomic<uint64_t> activity_{0};
  std::mutex helper_mu_;
  std::condition_variable helper_cv_;
  bool helper_stop_ = false;
  std::thread helper_;
};

// ---------------------------------------------------------------------------
// Setup

Status UcxBackend::Init() {
  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) return Unavailable(std::string("ucp_config_read: ") + ucs_status_string(st));
  // Rendezvous by put (the sender moves the bytes, as with RDMA WRITE)
  // unless UCX_RNDV_SCHEME says otherwise: with get_zcopy (UCX's "auto" on
  // cma and tcp) the target copies, so a write waits for the target's
  // process to be scheduled. Measured with perf/peers_ucx.sh on a loaded
  // 2-core VM: about 2-3x the shared-memory bandwidth of get_zcopy.
  if (std::getenv("UCX_RNDV_SCHEME") == nullptr) {
    ucp_config_modify(config, "RNDV_SCHEME", "put_zcopy");  // best effort: a UCX without it keeps its own
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.name = "zipwire";
  st = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  if (st != UCS_OK) return Unavailable(std::string("ucp_init: ") + ucs_status_string(st));

  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(context_, &attr) == UCS_OK) {
    cuda_ = (attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
  }
  if (cuda_) caps_.memory_kinds.push_back(MemoryKind::kCuda);

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // mu_ serialises every call
  st = ucp_worker_create(context_, &wp, &worker_);
  if (st != UCS_OK) return Unavailable(std::string("ucp_worker_create: ") + ucs_status_string(st));
  st = ucp_worker_get_efd(worker_, &efd_);
  if (st != UCS_OK) return Unavailable(std::string("ucp_worker_get_efd: ") + ucs_status_string(st));

  ucp_address_t* address = nullptr;
  size_t address_length = 0;
  st = ucp_worker_get_address(worker_, &address, &address_length);
  if (st != UCS_OK) return Unavailable(std::string("ucp_worker_get_address: ") + ucs_status_string(st));
  const auto* bytes = reinterpret_cast<const uint8_t*>(address);
  worker_address_.assign(bytes, bytes + address_length);
  ucp_worker_release_address(worker_, address);
  if (worker_address_.empty() || worker_address_.size() > kMaxWorkerAddressBytes) {
    return Internal("ucp worker address of " + std::to_string(worker_address_.size()) + " bytes");
  }
  peer_errors_ = want_peer_errors_ && ProbePeerErrors();
  boot_id_ = ReadBootId();
  direct_ = direct_ && !boot_id_.empty() && UcxTlsAllowsSharedMemory();

  struct Handler {
    unsigned id;
    ucp_am_recv_callback_t cb;
  };
  for (const Handler& h :
       {Handler{kAmWrite, &WriteCb}, Handler{kAmSend, &SendMsgCb}, Handler{kAmAck, &AckCb},
        Handler{kAmReadReq, &ReadReqCb}, Handler{kAmReadResp, &ReadRespCb}, Handler{kAmRing, &RingCb},
        Handler{kAmMapReq, &MapReqCb}, Handler{kAmMapResp, &MapRespCb}, Handler{kAmDoorbell, &DoorbellCb}}) {
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                    UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = h.id;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    hp.cb = h.cb;
    hp.arg = this;
    st = ucp_worker_set_am_recv_handler(worker_, &hp);
    if (st != UCS_OK)
      return Unavailable(std::string("ucp_worker_set_am_recv_handler: ") + ucs_status_string(st));
  }
  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return IoError(std::string("eventfd: ") + std::strerror(errno));
  loop_ctl_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (loop_ctl_fd_ < 0) return IoError(std::string("eventfd: ") + std::strerror(errno));
  Touch();
  helper_ = std::thread([this] { FallbackProgressLoop(); });
  socket_thread_ = std::thread([this] { SocketLoop(); });
  return Status::Ok();
}

Result<std::string> UcxBackend::Listen() {
  Touch();
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("ucx backend closed");
  if (listen_sock_.get() >= 0)
    return FailedPrecondition("ucx backend already listening on " + listen_address_);
  sockaddr_storage ss{};
  socklen_t len = 0;
  const std::string where = options_.listen_host + ":" + std::to_string(options_.listen_port);
  Status rs = Resolve(options_.listen_host, std::to_string(options_.listen_port), true, &ss, &len);
  if (!rs.ok()) return rs.WithContext("cannot listen on " + where);
  Fd sock(::socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (sock.get() < 0) return IoError("cannot listen on " + where + ": socket: " + std::strerror(errno));
  int one = 1;
  ::setsockopt(sock.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(sock.get(), reinterpret_cast<const sockaddr*>(&ss), len) != 0 ||
      ::listen(sock.get(), 128) != 0) {
    return Unavailable("cannot listen on " + where + ": " + std::strerror(errno));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  if (::getsockname(sock.get(), reinterpret_cast<sockaddr*>(&bound), &bound_len) != 0) {
    return IoError(std::string("getsockname: ") + std::strerror(errno));
  }
  uint16_t port = 0;
  if (bound.ss_family == AF_INET) {
    port = ntohs(reinterpret_cast<const sockaddr_in*>(&bound)->sin_port);
  } else if (bound.ss_family == AF_INET6) {
    port = ntohs(reinterpret_cast<const sockaddr_in6*>(&bound)->sin6_port);
  }
  listen_sock_ = std::move(sock);
  listen_address_ = options_.listen_host + ":" + std::to_string(port);
  KickSocketLoop();
  return listen_address_;
}

Conn* UcxBackend::NewConnLocked(PeerId peer, std::string address, ConnState state) {
  conns_.push_back(std::make_unique<Conn>());
  Conn* c = conns_.back().get();
  c->backend = this;
  c->peer = peer;
  c->address = std::move(address);
  c->state = state;
  return c;
}

Status UcxBackend::CreateEpLocked(Conn* c, const std::vector<uint8_t>& worker_address, bool peer_errors) {
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(worker_address.data());
  ep.err_mode = peer_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  ep.err_handler.cb = &ErrCb;
  ep.err_handler.arg = c;
  ucs_status_t st = ucp_ep_create(worker_, &ep, &c->ep);
  if (st != UCS_OK) {
    c->ep = nullptr;
    c->state = ConnState::kClosed;
    c->failure = Unavailable(c->Name() + ": ucp_ep_create: " + ucs_status_string(st));
    return c->failure;
  }
  by_ep_[c->ep] = c;
  if (CurrentLogLevel() >= LogLevel::kDebug) ucp_ep_print_info(c->ep, stderr);  // the lanes UCX chose
  if (direct_) SetupRxRingLocked(c);
  // A thread asleep in Poll must drive the endpoint's wireup.
  if (sleepers_ > 0) Wake();
  return Status::Ok();
}

// Whether endpoints can have UCX peer-failure handling with the transports
// UCX_TLS allows, tried on an endpoint to our own worker before any peer's:
// a failed ucp_ep_create still uses up a connection number, after which UCX
// would no longer pair that peer's endpoint with ours. Both sides of a
// connection use the server's choice (handshake flag).
bool UcxBackend::ProbePeerErrors() {
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(worker_address_.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = [](void*, ucp_ep_h, ucs_status_t) {};
  ucp_ep_h probe = nullptr;
  g_quiet_ucx_errors = true;
  ucs_log_push_handler(&QuietUcxErrors);
  ucs_status_t st = ucp_ep_create(worker_, &ep, &probe);
  ucs_log_pop_handler();
  g_quiet_ucx_errors = false;
  if (st != UCS_OK) {
    ZW_LOG(kInfo, "ucx: the transports in use have no peer-failure handling ("
                      << ucs_status_string(st)
                      << "); a lost peer shows through "
                         "its liveness socket");
    return false;
  }
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t r = ucp_ep_close_nbx(probe, &prm);
  if (r != nullptr && !UCS_PTR_IS_ERR(r)) {
    const auto deadline = Clock::now() + std::chrono::seconds(1);
    while (ucp_request_check_status(r) == UCS_INPROGRESS && Clock::now() < deadline) {
      ucp_worker_progress(worker_);
    }
    ucp_request_free(r);
  }
  return true;
}

void UcxBackend::KickSocketLoop() {
  uint64_t one = 1;
  ssize_t rc = ::write(loop_ctl_fd_, &one, sizeof(one));
  static_cast<void>(rc);  // EAGAIN: already signalled
}

// Serves handshakes one at a time (each bounded) and watches the liveness
// sockets, until Close. The set is rebuilt on every wake-up; wake-ups are
// rare (a connection made or lost).
void UcxBackend::SocketLoop() {
  std::vector<pollfd> fds;
  std::vector<Conn*> watched;
  while (!loop_stop_.load()) {
    fds.assign(1, pollfd{loop_ctl_fd_, POLLIN, 0});
    watched.clear();
    int listen_fd = -1;
    {
      std::lock_guard lk(mu_);
      if (closed_) break;
      listen_fd = listen_sock_.get();
      if (listen_fd >= 0) fds.push_back({listen_fd, POLLIN, 0});
      for (auto& c : conns_) {
        if (c->sock < 0) continue;
        if (c->state == ConnState::kClosed) {
          ::close(c->sock);  // the peer learns that we dropped it
          c->sock = -1;
          continue;
        }
        fds.push_back({c->sock, POLLIN, 0});
        watched.push_back(c.get());
      }
    }
    int rc = ::poll(fds.data(), fds.size(), -1);
    if (rc < 0) {
      if (errno == EINTR) continue;
      ZW_LOG(kError, "ucx: socket thread: poll: " << std::strerror(errno));
      return;
    }
    if (fds[0].revents != 0) {
      uint64_t v;
      ssize_t r = ::read(loop_ctl_fd_, &v, sizeof(v));
      static_cast<void>(r);
    }
    const size_t first_conn = listen_fd >= 0 ? 2 : 1;
    for (size_t i = first_conn; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      uint8_t byte;
      ssize_t r = ::recv(fds[i].fd, &byte, 1, MSG_DONTWAIT);
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
      Conn* c = watched[i - first_conn];
      std::lock_guard lk(mu_);
      if (closed_ || c->state == ConnState::kClosed) continue;
      // Whatever the peer sent before it went is taken in first.
      ProgressLocked();
      if (c->state == ConnState::kClosed) continue;
      FailConnLocked(
          c,
          PeerClosed(c->Name() + (r > 0 ? " sent bytes on its liveness socket"
                                        : " went away (its process exited or its backend closed)")),
          true);
    }
    if (listen_fd >= 0 && (fds[1].revents & POLLIN)) {
      sockaddr_storage from{};
      socklen_t from_len = sizeof(from);
      Fd sock(
          ::accept4(listen_fd, reinterpret_cast<sockaddr*>(&from), &from_len, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (sock.get() < 0) continue;  // the client gave up, or EMFILE: it retries
      int one = 1;
      ::setsockopt(sock.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      ServeHandshake(std::move(sock), SockaddrString(reinterpret_cast<const sockaddr*>(&from)));
    }
  }
}

void UcxBackend::ServeHandshake(Fd sock, const std::string& address) {
  const auto deadline =
      Clock::now() + std::min<Clock::duration>(options_.connect_timeout, kServerHandshakeTimeout);
  const std::string who = "the client at " + address;
  auto refuse = [&](const std::string& why) {
    ZW_LOG(kWarn, "ucx: refusing connection from " << address << ": " << why);
    const std::string text = why.substr(0, kMaxRefusalBytes);
    HandshakeHdr h;
    h.word = kHandshakeRefused;
    h.bytes = static_cast<uint32_t>(text.size());
    auto wire = EncodeHandshake(h, {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
    static_cast<void>(WriteAll(sock.get(), wire.data(), wire.size(), deadline, who));
  };
  auto hdr = ReadHandshake(sock.get(), deadline, who, kMaxWorkerAddressBytes);
  if (!hdr.ok()) {
    ZW_LOG(kWarn, "ucx: dropping connection from " << address << ": " << hdr.status().message());
    if (hdr.status().code() == StatusCode::kCorrupt) refuse(hdr.status().message());
    return;
  }
  const PeerId rank = hdr->word;
  if (hdr->bytes == 0) return refuse("empty worker address");
  std::vector<uint8_t> peer_worker(hdr->bytes);
  if (Status st = ReadAll(sock.get(), peer_worker.data(), peer_worker.size(), deadline, who); !st.ok()) {
    ZW_LOG(kWarn, "ucx: dropping connection from " << address << ": " << st.message());
    return;
  }
  if (Status st = CheckWorkerAddress(peer_worker, worker_address_, who); !st.ok())
    return refuse(st.message());
  Conn* c = nullptr;
  {
    std::lock_guard lk(mu_);
    if (closed_) return;
    if (rank == kInvalidPeer || rank == self_.load()) {
      return refuse("invalid rank " + std::to_string(rank));
    }
    auto it = by_peer_.find(rank);
    if (it != by_peer_.end() && it->second->state != ConnState::kClosed) {
      return refuse("duplicate rank " + std::to_string(rank) + " (already connected via " +
                    it->second->address + ")");
    }
    // Endpoint first: whatever the client sends once it has our answer then
    // finds a connection that knows it.
    c = NewConnLocked(rank, address, ConnState::kOpen);
    Status st = CreateEpLocked(c, peer_worker, peer_errors_);
    if (!st.ok()) return refuse(st.message());
    by_peer_[rank] = c;
    ForgetPeerCacheLocked();
    Completion up;
    up.type = CompletionType::kPeerConnected;
    up.peer = rank;
    PushCompletionLocked(std::move(up));
  }
  HandshakeHdr h;
  h.word = kHandshakeAccepted;
  h.bytes = static_cast<uint32_t>(worker_address_.size());
  {
    std::lock_guard lk(mu_);
    h.flags = peer_errors_ ? kFlagPeerErrors : 0;
  }
  auto wire = EncodeHandshake(h, worker_address_);
  Status st = WriteAll(sock.get(), wire.data(), wire.size(), deadline, who);
  std::lock_guard lk(mu_);
  if (!st.ok()) {
    FailConnLocked(c, PeerClosed(c->Name() + ": " + st.message()), true);
    return;
  }
  // This thread watches it from its next round on.
  c->sock = sock.Release();
}

// One attempt: hello out, answer in. `refusal` is set if the peer said no.
Status UcxBackend::ClientHandshake(int fd, PeerId peer, const std::string& address,
                                   Clock::time_point deadline, std::vector<uint8_t>* peer_worker,
                                   std::string* refusal, bool* peer_errors) {
  const std::string who = "peer " + std::to_string(peer) + " at " + address;
  HandshakeHdr h;
  h.word = self_.load();
  h.bytes = static_cast<uint32_t>(worker_address_.size());
  auto wire = EncodeHandshake(h, worker_address_);
  ZW_RETURN_IF_ERROR(WriteAll(fd, wire.data(), wire.size(), deadline, who));
  ZW_ASSIGN_OR_RETURN(HandshakeHdr answer, ReadHandshake(fd, deadline, who, kMaxWorkerAddressBytes));
  if (answer.word != kHandshakeAccepted && answer.word != kHandshakeRefused) {
    return Corrupt(who + " answered the handshake with code " + std::to_string(answer.word));
  }
  if (answer.word == kHandshakeRefused) {
    if (answer.bytes > kMaxRefusalBytes) return Corrupt(who + " sent an oversized refusal");
    std::string why(answer.bytes, '\0');
    ZW_RETURN_IF_ERROR(ReadAll(fd, reinterpret_cast<uint8_t*>(why.data()), why.size(), deadline, who));
    *refusal = why.empty() ? "refused" : why;
    return Status::Ok();
  }
  if (answer.bytes == 0) return Corrupt(who + " sent an empty worker address");
  *peer_errors = (answer.flags & kFlagPeerErrors) != 0;
  peer_worker->resize(answer.bytes);
  ZW_RETURN_IF_ERROR(ReadAll(fd, peer_worker->data(), peer_worker->size(), deadline, who));
  return CheckWorkerAddress(*peer_worker, worker_address_, who);
}

Status UcxBackend::Connect(PeerId peer, const std::string& address) {
  Touch();
  const PeerId self = self_.load();
  if (self == kInvalidPeer) return FailedPrecondition("Connect: call SetLocalRank first");
  if (peer == kInvalidPeer || peer == self) {
    return InvalidArgument("Connect: invalid peer rank " + std::to_string(peer));
  }
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return InvalidArgument("Connect: address '" + address + "' is not host:port");
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  sockaddr_storage ss{};
  socklen_t len = 0;
  Status rs = Resolve(host, address.substr(colon + 1), false, &ss, &len);
  if (!rs.ok()) return rs.WithContext("peer " + std::to_string(peer));
  auto already = [&]() -> Status {
    auto it = by_peer_.find(peer);
    if (it != by_peer_.end() && it->second->state != ConnState::kClosed) {
      return Status(StatusCode::kAlreadyExists,
                    "peer " + std::to_string(peer) + " is already connected (" + it->second->address + ")");
    }
    return Status::Ok();
  };
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("ucx backend closed");
    ZW_RETURN_IF_ERROR(already());
  }

  // Retries while nobody listens yet (the peer may still be starting);
  // anything the peer says or does once connected is final.
  const auto deadline = Clock::now() + options_.connect_timeout;
  std::string last_error = "timed out";
  Fd sock;
  while (true) {
    sock = Fd(::socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (sock.get() < 0) return IoError(std::string("socket: ") + std::strerror(errno));
    int rc = ::connect(sock.get(), reinterpret_cast<const sockaddr*>(&ss), len);
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      if (WaitFd(sock.get(), POLLOUT, deadline)) {
        socklen_t elen = sizeof(err);
        ::getsockopt(sock.get(), SOL_SOCKET, SO_ERROR, &err, &elen);
      } else {
        err = ETIMEDOUT;
      }
    }
    if (err == 0) break;
    last_error = std::strerror(err);
    if (Clock::now() >= deadline) {
      return Unavailable("cannot connect to peer " + std::to_string(peer) + " at " + address + " within " +
                         std::to_string(options_.connect_timeout.count()) + " ms: " + last_error);
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    std::this_thread::sleep_for(std::min<std::chrono::milliseconds>(left, std::chrono::milliseconds(20)));
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("ucx backend closed");
  }
  int one = 1;
  ::setsockopt(sock.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  std::vector<uint8_t> peer_worker;
  std::string refusal;
  bool peer_errors = true;
  Status hs = ClientHandshake(sock.get(), peer, address, deadline, &peer_worker, &refusal, &peer_errors);
  if (!hs.ok()) {
    return Status(hs.code() == StatusCode::kCorrupt ? StatusCode::kCorrupt : StatusCode::kUnavailable,
                  "cannot connect to peer " + std::to_string(peer) + ": " + hs.message());
  }
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("ucx backend closed");
  ZW_RETURN_IF_ERROR(already());
  Conn* c = NewConnLocked(peer, address, ConnState::kOpen);
  by_peer_[peer] = c;
  ForgetPeerCacheLocked();
  if (!refusal.empty()) {
    // As on tcp, the connection is made and the refusal shows on the
    // operations posted to it (e.g. a duplicate rank).
    ZW_LOG(kWarn, "ucx: " << c->Name() << " refused the connection: " << refusal);
    c->state = ConnState::kClosed;
    c->failure = PeerClosed(c->Name() + " refused the connection: " + refusal);
    return Status::Ok();
  }
  // The same error handling as the server's endpoint: UCX pairs only alike ones.
  Status st = CreateEpLocked(c, peer_worker, peer_errors);
  if (!st.ok()) {
    by_peer_.erase(peer);
    ForgetPeerCacheLocked();
    return st;
  }
  c->sock = sock.Release();
  KickSocketLoop();
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Registration

Result<MemoryRegion> UcxBackend::RegisterMemory(void* addr, size_t length, MemoryKind kind) {
  if (kind == MemoryKind::kCuda && !cuda_) {
    return NotSupported("this UCX build has no CUDA support (ucx backend cannot register " +
                        std::string(MemoryKindName(kind)) + " memory); stage through registered host memory");
  }
  if (kind != MemoryKind::kHost && kind != MemoryKind::kCuda) {
    return NotSupported(std::string("ucx backend: unsupported memory kind ") + MemoryKindName(kind));
  }
  if (addr == nullptr || length == 0) return InvalidArgument("RegisterMemory: null address or zero length");
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("ucx backend closed");
  ucp_mem_map_params_t mp{};
  mp.field_mask =
      UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  mp.address = addr;
  mp.length = length;
  mp.memory_type = kind == MemoryKind::kCuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
  ucp_mem_h memh = nullptr;
  ucs_status_t st = ucp_mem_map(context_, &mp, &memh);
  if (st != UCS_OK) {
    return Status(st == UCS_ERR_NO_MEMORY ? StatusCode::kResourceExhausted : StatusCode::kIoError,
                  "ucp_mem_map of " + std::to_string(length) + " bytes: " + ucs_status_string(st));
  }
  MemoryRegion r{addr, length, kind, next_key_++};
  regions_.emplace(r.key, Region{addr, length, kind, memh, 0, false, Segment{}});
  return r;
}

// Shared memory of our own (a sealed memfd, see Segment), registered with
// UCX like any other memory: active messages reach it as usual, and a peer
// on this host may map it and write it with a plain copy (as ucx_perftest's
// buffers from ucp_mem_map(UCP_MEM_MAP_ALLOCATE), which UCX's posix
// transport maps for ucp_put).
Result<MemoryRegion> UcxBackend::AllocateMemory(size_t length, MemoryKind kind) {
  if (kind != MemoryKind::kHost) {
    return NotSupported(std::string("ucx backend: AllocateMemory offers host memory only, not ") +
                        MemoryKindName(kind));
  }
  if (length == 0) return InvalidArgument("AllocateMemory: zero length");
  ZW_ASSIGN_OR_RETURN(Segment seg, CreateSegment(length));
  std::lock_guard lk(mu_);
  if (closed_) {
    DestroySegment(seg);
    return Cancelled("ucx backend closed");
  }
  ucp_mem_map_params_t mp{};
  mp.field_mask =
      UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  mp.address = seg.addr;
  mp.length = length;
  mp.memory_type = UCS_MEMORY_TYPE_HOST;
  ucp_mem_h memh = nullptr;
  ucs_status_t st = ucp_mem_map(context_, &mp, &memh);
  if (st != UCS_OK) {
    DestroySegment(seg);
    return Status(st == UCS_ERR_NO_MEMORY ? StatusCode::kResourceExhausted : StatusCode::kIoError,
                  "ucp_mem_map of " + std::to_string(length) + " bytes: " + ucs_status_string(st));
  }
  MemoryRegion r{seg.addr, length, kind, next_key_++};
  Region reg{seg.addr, length, kind, memh, 0, /*allocated=*/true, seg};
  regions_.emplace(r.key, reg);
  return r;
}

Status UcxBackend::DeregisterMemory(const MemoryRegion& region) {
  std::lock_guard lk(mu_);
  auto it = regions_.find(region.key);
  if (it == regions_.end() || it->second.addr != region.addr) {
    return NotFound("DeregisterMemory: key " + std::to_string(region.key) + " is not a live registration");
  }
  if (it->second.reads_in_flight > 0 && worker_) {
    // UCX is still sending peers' reads from this memory: let them finish
    // (bounded), then cut off the connections of any that did not, so that
    // nothing reads the memory once this returns.
    const auto deadline = Clock::now() + kDeregisterReadWait;
    while (it->second.reads_in_flight > 0 && Clock::now() < deadline) {
      if (!ProgressLocked()) std::this_thread::yield();
      it = regions_.find(region.key);
    }
    if (it->second.reads_in_flight > 0) {
      for (const auto& op : ops_) {
        if (op->kind == OpKind::kReadResp && op->request_live && op->key == region.key) {
          FailConnLocked(op->conn,
                         PeerClosed(op->conn->Name() + ": its read of key " + std::to_string(region.key) +
                                    " did not finish before the region was deregistered"),
                         true);
        }
      }
      ProgressLocked();
    }
  }
  if (it->second.memh && context_) ucp_mem_unmap(context_, it->second.memh);
  // Allocated memory goes now; a peer's mapping of it keeps its own pages
  // alive (never anything of ours), and we refuse what it writes there.
  DestroySegment(it->second.seg);
  regions_.erase(it);
  region_cache_.Forget();
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Posting

Op* UcxBackend::AllocOpLocked(OpKind kind, Conn* c) {
  Op* op;
  if (free_ops_.empty()) {
    ops_.push_back(std::make_unique<Op>());
    op = ops_.back().get();
  } else {
    op = free_ops_.back();
    free_ops_.pop_back();
  }
  op->kind = kind;
  op->local_done = false;
  op->finished = kind == OpKind::kCtrl || kind == OpKind::kReadResp;
  op->request_live = false;
  op->recv_live = false;
  op->conn = c;
  op->seq = 0;
  op->am_write = false;
  op->status = Status::Ok();
  return op;
}

void UcxBackend::MaybeFreeOpLocked(Op* op) {
  if (op->finished && !op->request_live && !op->recv_live) free_ops_.push_back(op);
}

// Hands one message to UCX. Data ops are already queued on conn->unacked.
void UcxBackend::IssueLocked(Op* op, unsigned id, const void* buffer, size_t length, ucp_mem_h memh,
                             MemoryKind kind, uint32_t flags) {
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS |
                     UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  prm.cb.send = &SendCb;
  prm.user_data = op;
  prm.flags = UCP_AM_SEND_FLAG_REPLY | flags;
  prm.memory_type = kind == MemoryKind::kCuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
  if (memh) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    prm.memh = memh;
  }
  Conn* c = op->conn;
  ucs_status_ptr_t r = ucp_am_send_nbx(c->ep, id, op->hdr, op->hdr_len, buffer, length, &prm);
  if (r == nullptr) {
    op->local_done = true;
    if (op->kind == OpKind::kReadResp) EndServeLocked(op);
    MaybeFreeOpLocked(op);
    return;
  }
  if (UCS_PTR_IS_ERR(r)) {
    op->local_done = true;
    ucs_status_t st = UCS_PTR_STATUS(r);
    if (op->kind == OpKind::kReadResp) EndServeLocked(op);
    if (op->kind == OpKind::kCtrl || op->kind == OpKind::kReadResp) MaybeFreeOpLocked(op);
    // The endpoint is broken; its error handler may not have run yet.
    FailConnLocked(c, PeerClosed(c->Name() + ": send failed: " + ucs_status_string(st)), true);
    return;
  }
  op->request_live = true;
  // A thread asleep in Poll must drive this request.
  if (sleepers_ > 0) Wake();
}

Status UcxBackend::PostWrite(PeerId peer, const MemoryRegion& local, uint64_t local_offset,
                             const RemoteRegion& remote, uint64_t remote_offset, uint64_t length,
                             uint32_t imm, uint64_t context) {
  ZW_RETURN_IF_ERROR(internal::CheckRemoteRange("PostWrite", remote, remote_offset, length));
  ZW_RETURN_IF_ERROR(internal::CheckPostLength("PostWrite", length, kUcxMaxWriteBytes));
  Touch();
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("ucx backend closed");
  Region* reg = FindRegionLocked(local.key);
  ZW_RETURN_IF_ERROR(internal::CheckLocalRange(
      "PostWrite", local, reg != nullptr && reg->addr == local.addr && reg->length == local.length,
      local_offset, length));
  Conn* c = FindPeerLocked(peer);
  if (c == nullptr) return FailedPrecondition("peer " + std::to_string(peer) + " is not connected");
  if (c->state == ConnState::kClosed) return FailedPostLocked(c, CompletionType::kWriteDone, context);
  Op* op = AllocOpLocked(OpKind::kWrite, c);
  op->seq = c->next_seq++;
  op->context = context;
  op->key = remote.key;
  op->offset = remote_offset;
  op->length = length;
  const uint8_t* src = static_cast<const uint8_t*>(local.addr) + local_offset;
  if (c->tx_ring != nullptr && reg->kind == MemoryKind::kHost) {
    // Direct: the bytes and the slot are in the target's memory when this
    // returns; the op waits for its ack like any other.
    const Conn::RemoteMap* m = DirectTargetLocked(c, remote);
    if (m != nullptr && PostDirectLocked(c, *m, src, remote.key, remote_offset, length, imm, op->seq)) {
      op->local_done = true;
      c->unacked.push_back(op);
      return Status::Ok();
    }
  }
  WriteHdr h{c->rx_done, op->seq, remote.key, remote_offset, imm, 0};
  c->ack_sent = c->rx_done;  // piggy-backed
  std::memcpy(op->hdr, &h, sizeof(h));
  op->hdr_len = sizeof(h);
  op->am_write = true;
  ++c->am_writes_unacked;
  c->unacked.push_back(op);
  // CUDA-capable builds send every write by rendezvous: the target then
  // places even small payloads with UCX's memory-type-aware copies.
  IssueLocked(op, kAmWrite, src, length, reg->memh, reg->kind, cuda_ ? UCP_AM_SEND_FLAG_RNDV : 0);
  return Status::Ok();
}

Status UcxBackend::PostRead(PeerId peer, const MemoryRegion& local, uint64_t local_offset,
                            const RemoteRegion& remote, uint64_t remote_offset, uint64_t length,
                            uint64_t context) {
  ZW_RETURN_IF_ERROR(internal::CheckRemoteRange("PostRead", remote, remote_offset, length));
  ZW_RETURN_IF_ERROR(internal::CheckPostLength("PostRead", length, kUcxMaxWriteBytes));
  Touch();
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("ucx backend closed");
  auto reg = regions_.find(local.key);
  ZW_RETURN_IF_ERROR(internal::CheckLocalRange(
      "PostRead", local,
      reg != regions_.end() && reg->second.addr == local.addr && reg->second.length == local.length,
      local_offset, length));
  auto it = by_peer_.find(peer);
  if (it == by_peer_.end()) return FailedPrecondition("peer " + std::to_string(peer) + " is not connected");
  Conn* c = it->second;
  if (c->state == ConnState::kClosed) return FailedPostLocked(c, CompletionType::kReadDone, context);
  Op* op = AllocOpLocked(OpKind::kRead, c);
  op->seq = c->next_read_id++;
  op->context = context;
  op->key = local.key;
  op->offset = local_offset;
  op->length = length;
  ReadReqHdr h{op->seq, remote.key, remote_offset, length};
  std::memcpy(op->hdr, &h, sizeof(h));
  op->hdr_len = sizeof(h);
  c->reads.push_back(op);
  IssueLocked(op, kAmReadReq, nullptr, 0, nullptr, MemoryKind::kHost, 0);
  return Status::Ok();
}

Status UcxBackend::PostSend(PeerId peer, std::span<const uint8_t> message, uint64_t context) {
  if (message.size() > kUcxMaxControlBytes) {
    return InvalidArgument("PostSend of " + std::to_string(message.size()) +
                           " bytes exceeds max_control_bytes " + std::to_string(kUcxMaxControlBytes));
  }
  Touch();
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("ucx backend closed");
  auto it = by_peer_.find(peer);
  if (it == by_peer_.end()) return FailedPrecondition("peer " + std::to_string(peer) + " is not connected");
  Conn* c = it->second;
  if (c->state == ConnState::kClosed) return FailedPostLocked(c, CompletionType::kSendDone, context);
  Op* op = AllocOpLocked(OpKind::kSend, c);
  op->seq = c->next_seq++;
  op->context = context;
  op->length = message.size();
  op->owned.assign(message.begin(), message.end());
  SendHdr h{c->rx_done, op->seq};
  c->ack_sent = c->rx_done;
  std::memcpy(op->hdr, &h, sizeof(h));
  op->hdr_len = sizeof(h);
  c->unacked.push_back(op);
  IssueLocked(op, kAmSend, op->owned.data(), op->owned.size(), nullptr, MemoryKind::kHost, 0);
  return Status::Ok();
}

void UcxBackend::SendAckLocked(Conn* c, uint64_t ack, uint64_t nack_seq, uint32_t code) {
  if (c->state == ConnState::kClosed || c->ep == nullptr) return;
  Op* op = AllocOpLocked(OpKind::kCtrl, c);
  AckHdr h{ack, nack_seq, code, 0};
  c->ack_sent = ack;
  std::memcpy(op->hdr, &h, sizeof(h));
  op->hdr_len = sizeof(h);
  IssueLocked(op, kAmAck, nullptr, 0, nullptr, MemoryKind::kHost, 0);
}

// Sends the acks held back for piggy-backing, for connections with at least
// `min_unacked` messages unacknowledged. Callers make sure every completion
// an ack covers has been handed out by Poll (or that the owner is away, as
// for the fallback thread), so a kWriteDone at the initiator means the target
// application has seen the write, as with the tcp backend.
void UcxBackend::FlushAcksLocked(uint64_t min_unacked) {
  size_t keep = 0;
  for (Conn* c : ack_dirty_) {
    if (c->state != ConnState::kClosed && c->rx_done - c->ack_sent >= min_unacked) {
      SendAckLocked(c, c->rx_done);
    }
    if (c->state != ConnState::kClosed && c->rx_done > c->ack_sent) {
      ack_dirty_[keep++] = c;
    } else {
      c->ack_queued = false;
    }
  }
  ack_dirty_.resize(keep);
}

// A post to a failed connection: refused at once if the application has
// already been told of the failure, else accepted and failed as a completion.
Status UcxBackend::FailedPostLocked(Conn* c, CompletionType type, uint64_t context) {
  if (c->failure_reported) return c->failure;
  Completion done;
  done.type = type;
  done.status = c->failure;
  done.peer = c->peer;
  done.context = context;
  PushCompletionLocked(std::move(done));
  return Status::Ok();
}

// Hands out completions. Once the queue is empty every ack is safe to send;
// a receiver that is kept busy acks every kAckEvery messages so that its
// senders' windows keep moving, and holds smaller acks for piggy-backing.
size_t UcxBackend::PopLocked(std::span<Completion> out) {
  size_t n = completions_.PopInto(out);
  for (size_t i = 0; i < n; ++i) {
    if (out[i].status.ok() || out[i].status.code() == StatusCode::kOutOfRange) continue;
    auto it = by_peer_.find(out[i].peer);
    if (it != by_peer_.end() && it->second->state == ConnState::kClosed) it->second->failure_reported = true;
  }
  if (n > 0 && completions_.empty() && !ack_dirty_.empty()) FlushAcksLocked(kAckEvery);
  return n;
}

// ---------------------------------------------------------------------------
// Completions (initiator side)

void UcxBackend::PushCompletionLocked(Completion c) {
  completions_.Push(std::move(c));
  if (sleepers_ > 0) Wake();
}

void UcxBackend::FinishOpLocked(Op* op, const Status& status) {
  op->finished = true;
  if (op->am_write) {
    op->am_write = false;
    --op->conn->am_writes_unacked;
  }
  Completion& done = completions_.Emplace();  // in place: one per operation
  done.type = op->kind == OpKind::kWrite  ? CompletionType::kWriteDone
              : op->kind == OpKind::kRead ? CompletionType::kReadDone
                                          : CompletionType::kSendDone;
  if (!status.ok()) done.status = status;
  done.peer = op->conn->peer;
  done.context = op->context;
  if (sleepers_ > 0) Wake();
  MaybeFreeOpLocked(op);
}

void UcxBackend::CompleteFrontLocked(Conn* c) {
  while (!c->unacked.empty()) {
    Op* op = c->unacked.front();
    if (op->seq > c->peer_acked || !op->local_done) break;
    c->unacked.pop_front();
    FinishOpLocked(op, op->status);
  }
}

bool UcxBackend::ApplyAckLocked(Conn* c, uint64_t ack) {
  if (ack >= c->next_seq) {
    ProtocolErrorLocked(c, "ack for message " + std::to_string(ack) + " never sent");
    return false;
  }
  if (ack > c->peer_acked) {
    c->peer_acked = ack;
    CompleteFrontLocked(c);
  }
  return true;
}

void UcxBackend::SendCb(void* request, ucs_status_t status, void* user_data) {
  ucp_request_free(request);
  auto* op = static_cast<Op*>(user_data);
  Conn* c = op->conn;
  UcxBackend* self = c->backend;
  op->request_live = false;
  op->local_done = true;
  if (op->kind == OpKind::kReadResp) self->EndServeLocked(op);
  if (op->kind == OpKind::kCtrl || op->kind == OpKind::kReadResp) {
    self->MaybeFreeOpLocked(op);
    return;
  }
  if (op->finished) {
    self->MaybeFreeOpLocked(op);
    return;
  }
  if (status != UCS_OK) {
    self->FailConnLocked(c, PeerClosed(c->Name() + ": send failed: " + ucs_status_string(status)), true);
    return;
  }
  if (op->kind == OpKind::kWrite || op->kind == OpKind::kSend) self->CompleteFrontLocked(c);
}

// A read finishes once its bytes are in place (or it failed); reads may
// finish out of posting order when large ones land at different times.
void UcxBackend::FinishReadLocked(Op* op, const Status& status) {
  Conn* c = op->conn;
  auto it = std::find(c->reads.begin(), c->reads.end(), op);
  if (it != c->reads.end()) c->reads.erase(it);
  FinishOpLocked(op, status);
}

void UcxBackend::EndServeLocked(Op* op) {
  auto it = regions_.find(op->key);
  if (it != regions_.end() && it->second.reads_in_flight > 0) --it->second.reads_in_flight;
}

// ---------------------------------------------------------------------------
// Receiving

Conn* UcxBackend::ConnOf(const ucp_am_recv_param_t* param) {
  if (closed_ || !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) return nullptr;
  auto it = by_ep_.find(param->reply_ep);
  return it == by_ep_.end() ? nullptr : it->second;
}

ucs_status_t UcxBackend::WriteCb(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c == nullptr) return UCS_OK;  // a dropped connection; a rendezvous is declined
  return self->OnData(c, true, header, header_length, data, length, param);
}

ucs_status_t UcxBackend::SendMsgCb(void* arg, const void* header, size_t header_length, void* data,
                                   size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c == nullptr) return UCS_OK;
  return self->OnData(c, false, header, header_length, data, length, param);
}

ucs_status_t UcxBackend::AckCb(void* arg, const void* header, size_t header_length, void*, size_t,
                               const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c != nullptr) self->OnAck(c, header, header_length);
  return UCS_OK;
}

ucs_status_t UcxBackend::ReadReqCb(void* arg, const void* header, size_t header_length, void*, size_t length,
                                   const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c != nullptr) self->OnReadReq(c, header, header_length, length);
  return UCS_OK;
}

ucs_status_t UcxBackend::ReadRespCb(void* arg, const void* header, size_t header_length, void* data,
                                    size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c == nullptr) return UCS_OK;  // a dropped connection; a rendezvous is declined
  return self->OnReadResp(c, header, header_length, data, length, param);
}

ucs_status_t UcxBackend::OnData(Conn* c, bool is_write, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
  if (c->state == ConnState::kClosed) return UCS_OK;
  const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  RxSlot slot;
  Completion& comp = slot.c;
  uint8_t* dest = nullptr;
  ucp_mem_h memh = nullptr;
  MemoryKind kind = MemoryKind::kHost;
  if (is_write) {
    WriteHdr h{};
    if (header_length != sizeof(h)) {
      ProtocolErrorLocked(c, "malformed write header");
      return UCS_OK;
    }
    std::memcpy(&h, header, sizeof(h));
    if (!ApplyAckLocked(c, h.ack) || !CatchUpLocked(c, h.seq)) return UCS_OK;
    comp.type = CompletionType::kWriteImm;
    comp.imm = h.imm;
    comp.key = h.key;
    comp.offset = h.offset;
    comp.length = length;
    // The initiator's RemoteRegion is not trusted: only our own table says
    // where bytes may land, and nothing lands before this check.
    auto reg = regions_.find(h.key);
    if (reg == regions_.end()) {
      slot.nack = kNackUnknownKey;
    } else if (!RangeInside(h.offset, length, reg->second.length)) {
      slot.nack = kNackOutOfRange;
    } else if (reg->second.kind != MemoryKind::kHost && !rndv) {
      slot.nack = kNackNeedsRendezvous;
    } else {
      dest = static_cast<uint8_t*>(reg->second.addr) + h.offset;
      memh = reg->second.memh;
      kind = reg->second.kind;
    }
  } else {
    SendHdr h{};
    if (header_length != sizeof(h) || length > kUcxMaxControlBytes) {
      ProtocolErrorLocked(c, "malformed control message");
      return UCS_OK;
    }
    std::memcpy(&h, header, sizeof(h));
    if (!ApplyAckLocked(c, h.ack) || !CatchUpLocked(c, h.seq)) return UCS_OK;
    comp.type = CompletionType::kRecvMessage;
    comp.message.resize(length);
    dest = comp.message.data();
  }
  comp.peer = c->peer;
  slot.conn = c;
  slot.seq = ++c->rx_seq;  // CatchUpLocked made sure it is this message's number
  if (slot.nack != 0 || length == 0 || !rndv) {
    // Complete here. A declined rendezvous completes the sender's request
    // with OK; the nack tells it why.
    if (slot.nack == 0 && length > 0) std::memcpy(dest, data, length);
    if (c->rx_pending.empty()) {
      RxDoneLocked(c, slot.seq, slot.nack, &comp);
    } else {
      slot.ready = true;
      c->rx_pending.push_back(new RxSlot(std::move(slot)));
      DrainRxLocked(c);
    }
    return UCS_OK;
  }
  // Rendezvous: UCX moves the bytes straight into place.
  auto* s = new RxSlot(std::move(slot));
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  prm.cb.recv_am = &RecvCb;
  prm.user_data = s;
  prm.memory_type = kind == MemoryKind::kCuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
  if (memh) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    prm.memh = memh;
  }
  // For a control message the destination is the completion's own vector,
  // which moved with the slot.
  if (!is_write) dest = s->c.message.data();
  ucs_status_ptr_t r = ucp_am_recv_data_nbx(worker_, data, dest, length, &prm);
  if (UCS_PTR_IS_ERR(r)) {
    delete s;
    FailConnLocked(
        c, PeerClosed(c->Name() + ": rendezvous receive failed: " + ucs_status_string(UCS_PTR_STATUS(r))),
        true);
    return UCS_INPROGRESS;  // UCX owns the descriptor once asked to receive it
  }
  s->ready = r == nullptr;
  s->request_live = r != nullptr;
  c->rx_pending.push_back(s);
  DrainRxLocked(c);
  return UCS_INPROGRESS;
}

void UcxBackend::RecvCb(void* request, ucs_status_t status, size_t, void* user_data) {
  ucp_request_free(request);
  auto* s = static_cast<RxSlot*>(user_data);
  s->request_live = false;
  if (s->orphaned) {
    s->conn->backend->orphans_.erase(s);
    delete s;
    return;
  }
  Conn* c = s->conn;
  UcxBackend* self = c->backend;
  if (status != UCS_OK) {
    self->FailConnLocked(
        c, PeerClosed(c->Name() + ": rendezvous receive failed: " + ucs_status_string(status)), true);
    return;
  }
  s->ready = true;
  self->DrainRxLocked(c);
}

// Completions go out in arrival order: a rendezvous in flight holds back
// everything behind it.
void UcxBackend::DrainRxLocked(Conn* c) {
  while (!c->rx_pending.empty() && c->rx_pending.front()->ready) {
    RxSlot* s = c->rx_pending.front();
    c->rx_pending.pop_front();
    if (s->read_req) {
      ServeReadLocked(c, s->read);
    } else {
      RxDoneLocked(c, s->seq, s->nack, &s->c);
    }
    delete s;
  }
}

void UcxBackend::RxDoneLocked(Conn* c, uint64_t seq, uint32_t nack, Completion* completion) {
  c->rx_done = seq;
  if (nack != 0) {
    // The refusal goes out now, ahead of any ack covering it; it acks
    // nothing new itself (earlier completions may not be handed out yet).
    ++c->nacks_sent;
    SendAckLocked(c, c->ack_sent, seq, nack);
  } else if (completion != nullptr) {
    PushCompletionLocked(std::move(*completion));
  } else if (sleepers_ > 0) {
    Wake();  // the caller queued the completion in place
  }
  if (!c->ack_queued) {
    c->ack_queued = true;
    ack_dirty_.push_back(c);
  }
}

void UcxBackend::OnAck(Conn* c, const void* header, size_t header_length) {
  if (c->state == ConnState::kClosed) return;
  AckHdr h{};
  if (header_length != sizeof(h)) {
    ProtocolErrorLocked(c, "malformed ack");
    return;
  }
  std::memcpy(&h, header, sizeof(h));
  if (h.nack_seq != 0) {
    Op* refused = nullptr;
    for (Op* op : c->unacked) {
      if (op->seq == h.nack_seq) {
        refused = op;
        break;
      }
    }
    if (refused == nullptr || refused->kind != OpKind::kWrite) {
      ProtocolErrorLocked(c, "nack for message " + std::to_string(h.nack_seq) + " not awaiting an ack");
      return;
    }
    const char* why = h.code == kNackUnknownKey        ? "unknown key (never registered or deregistered)"
                      : h.code == kNackOutOfRange      ? "range outside its registration"
                      : h.code == kNackNeedsRendezvous ? "device memory needs a rendezvous write"
                                                       : "refused";
    refused->status =
        OutOfRange(c->Name() + " refused the write of " + RangeString(refused->offset, refused->length) +
                   " to key " + std::to_string(refused->key) + ": " + why);
    ++c->nacks_seen;
    if (h.code == kNackUnknownKey) {
      // A region we map directly is gone: forget the mapping (UCX detaches).
      auto it = c->remote_maps.find(refused->key);
      if (it != c->remote_maps.end() && it->second.base != nullptr) {
        deferred_segments_.push_back(it->second.mapping);
        it->second = Conn::RemoteMap{};
      }
    }
  }
  if (!ApplyAckLocked(c, h.ack)) return;
  if (c->deferred_ack != 0 && c->nacks_seen >= c->deferred_nacks) {
    const uint64_t ack = std::exchange(c->deferred_ack, 0);
    ApplyAckLocked(c, ack);
  }
}

// Target side of a read: served in order, after the writes before it landed.
void UcxBackend::OnReadReq(Conn* c, const void* header, size_t header_length, size_t length) {
  if (c->state == ConnState::kClosed) return;
  ReadReqHdr h{};
  if (header_length != sizeof(h) || length != 0) {
    ProtocolErrorLocked(c, "malformed read request");
    return;
  }
  std::memcpy(&h, header, sizeof(h));
  if (h.id != c->read_reqs_seen + 1) {
    ProtocolErrorLocked(c, "read request " + std::to_string(h.id) + " out of sequence");
    return;
  }
  c->read_reqs_seen = h.id;
  // Mailbox writes posted before this read: their slots are visible by now
  // (as for CatchUpLocked), and inline ones land only when taken.
  if (c->rx_ring != nullptr) PollRingLocked(c, UINT64_MAX);
  if (c->state == ConnState::kClosed) return;
  if (c->rx_pending.empty()) {
    ServeReadLocked(c, h);
    return;
  }
  auto* s = new RxSlot();
  s->conn = c;
  s->ready = true;
  s->read_req = true;
  s->read = h;
  c->rx_pending.push_back(s);
}

void UcxBackend::ServeReadLocked(Conn* c, const ReadReqHdr& req) {
  if (c->state == ConnState::kClosed) return;
  // As for writes, only our own table says what may be read.
  uint32_t code = 0;
  auto reg = regions_.find(req.key);
  if (reg == regions_.end()) {
    code = kNackUnknownKey;
  } else if (!RangeInside(req.offset, req.length, reg->second.length)) {
    code = kNackOutOfRange;
  }
  Op* op = AllocOpLocked(OpKind::kReadResp, c);
  ReadRespHdr h{req.id, code, 0};
  std::memcpy(op->hdr, &h, sizeof(h));
  op->hdr_len = sizeof(h);
  if (code != 0 || req.length == 0) {
    op->key = 0;
    IssueLocked(op, kAmReadResp, nullptr, 0, nullptr, MemoryKind::kHost, 0);
    return;
  }
  Region& r = reg->second;
  op->key = req.key;
  ++r.reads_in_flight;
  IssueLocked(op, kAmReadResp, static_cast<const uint8_t*>(r.addr) + req.offset, req.length, r.memh, r.kind,
              cuda_ ? UCP_AM_SEND_FLAG_RNDV : 0);
}

// Initiator side: the bytes (or the refusal) for the oldest read in flight.
ucs_status_t UcxBackend::OnReadResp(Conn* c, const void* header, size_t header_length, void* data,
                                    size_t length, const ucp_am_recv_param_t* param) {
  if (c->state == ConnState::kClosed) return UCS_OK;
  ReadRespHdr h{};
  if (header_length != sizeof(h)) {
    ProtocolErrorLocked(c, "malformed read response");
    return UCS_OK;
  }
  std::memcpy(&h, header, sizeof(h));
  Op* op = nullptr;
  for (Op* r : c->reads) {
    if (r->seq == h.id && !r->recv_live) {
      op = r;
      break;
    }
  }
  if (op == nullptr) {
    ProtocolErrorLocked(c, "response for read " + std::to_string(h.id) + " not awaiting one");
    return UCS_OK;
  }
  if (h.code != 0) {
    if (length != 0) {
      ProtocolErrorLocked(c, "refused read carries bytes");
      return UCS_OK;
    }
    const char* why = h.code == kNackUnknownKey   ? "unknown key (never registered or deregistered)"
                      : h.code == kNackOutOfRange ? "range outside its registration"
                                                  : "refused";
    FinishReadLocked(
        op, OutOfRange(c->Name() + " refused the read of " + RangeString(0, op->length) + ": " + why));
    return UCS_OK;
  }
  if (length != op->length) {
    ProtocolErrorLocked(c, "read " + std::to_string(h.id) + " answered with " + std::to_string(length) +
                               " bytes, asked for " + std::to_string(op->length));
    return UCS_OK;
  }
  // The local region may have been deregistered while the read was out.
  auto reg = regions_.find(op->key);
  if (reg == regions_.end()) {
    FinishReadLocked(op, FailedPrecondition("PostRead: local region key " + std::to_string(op->key) +
                                            " was deregistered before the bytes arrived"));
    return UCS_OK;  // a rendezvous is declined
  }
  if (length == 0) {
    FinishReadLocked(op, Status::Ok());
    return UCS_OK;
  }
  uint8_t* dest = static_cast<uint8_t*>(reg->second.addr) + op->offset;
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    if (reg->second.kind != MemoryKind::kHost) {
      FinishReadLocked(op, Internal("device memory read arrived eagerly"));
      return UCS_OK;
    }
    std::memcpy(dest, data, length);
    FinishReadLocked(op, Status::Ok());
    return UCS_OK;
  }
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                     UCP_OP_ATTR_FIELD_MEMORY_TYPE | UCP_OP_ATTR_FIELD_MEMH;
  prm.cb.recv_am = &ReadRecvCb;
  prm.user_data = op;
  prm.memory_type = reg->second.kind == MemoryKind::kCuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
  prm.memh = reg->second.memh;
  ucs_status_ptr_t r = ucp_am_recv_data_nbx(worker_, data, dest, length, &prm);
  if (UCS_PTR_IS_ERR(r)) {
    FailConnLocked(
        c, PeerClosed(c->Name() + ": read receive failed: " + ucs_status_string(UCS_PTR_STATUS(r))), true);
    return UCS_INPROGRESS;
  }
  if (r == nullptr) {
    FinishReadLocked(op, Status::Ok());
  } else {
    op->recv_live = true;
  }
  return UCS_INPROGRESS;
}

void UcxBackend::ReadRecvCb(void* request, ucs_status_t status, size_t, void* user_data) {
  ucp_request_free(request);
  auto* op = static_cast<Op*>(user_data);
  Conn* c = op->conn;
  UcxBackend* self = c->backend;
  op->recv_live = false;
  if (op->finished) {  // its connection failed meanwhile
    self->MaybeFreeOpLocked(op);
    return;
  }
  if (status != UCS_OK) {
    self->FailConnLocked(c, PeerClosed(c->Name() + ": read receive failed: " + ucs_status_string(status)),
                         true);
    return;
  }
  self->FinishReadLocked(op, Status::Ok());
}

// ---------------------------------------------------------------------------
// Direct writes through shared memory (see the file comment)

void UcxBackend::SendCtrlLocked(Conn* c, unsigned id, const void* hdr, size_t hdr_len,
                                std::vector<uint8_t> payload) {
  if (c->state == ConnState::kClosed || c->ep == nullptr) return;
  Op* op = AllocOpLocked(OpKind::kCtrl, c);
  if (hdr_len > 0) std::memcpy(op->hdr, hdr, hdr_len);
  op->hdr_len = hdr_len;
  op->owned = std::move(payload);
  IssueLocked(op, id, op->owned.data(), op->owned.size(), nullptr, MemoryKind::kHost, 0);
}

// Our mailbox for this peer's direct writes, announced to it. A peer on
// another host (or one that cannot open it) keeps to active messages.
void UcxBackend::SetupRxRingLocked(Conn* c) {
  auto seg = CreateSegment(kRingBytes);
  if (!seg.ok()) {
    ZW_LOG(kDebug, "ucx: no mailbox for " << c->Name() << ": " << seg.status().message());
    return;
  }
  c->rx_ring_seg = *seg;
  c->rx_ring = seg->addr;  // zero-filled
  Word32(c->rx_ring + kRingSleepingAt).store(sleeping_flag_, std::memory_order_relaxed);
  ring_conns_.push_back(c);
  RingHdr h{kRingBytes};
  const SegmentWire w = DescribeSegment(*seg, boot_id_);
  const auto* b = reinterpret_cast<const uint8_t*>(&w);
  SendCtrlLocked(c, kAmRing, &h, sizeof(h), std::vector<uint8_t>(b, b + sizeof(w)));
}

void UcxBackend::OnRing(Conn* c, const void* header, size_t header_length, const void* data, size_t length,
                        const ucp_am_recv_param_t* param) {
  if (c->state == ConnState::kClosed) return;
  RingHdr h{};
  if (header_length != sizeof(h) || length != sizeof(SegmentWire) ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    ProtocolErrorLocked(c, "malformed mailbox announcement");
    return;
  }
  std::memcpy(&h, header, sizeof(h));
  if (h.bytes != kRingBytes || c->tx_ring != nullptr) {
    ProtocolErrorLocked(c, "unexpected mailbox announcement");
    return;
  }
  if (!direct_) return;
  SegmentWire w;
  std::memcpy(&w, data, sizeof(w));
  auto seg = MapPeerSegment(w, kRingBytes, boot_id_);
  if (!seg.ok()) {
    ZW_LOG(kDebug, "ucx: " << c->Name() << ": its mailbox is not reachable (" << seg.status().message()
                           << "); writes stay active messages");
    return;
  }
  ZW_LOG(kDebug, "ucx: " << c->Name() << ": mailbox mapped; writes to its allocated memory go direct");
  c->tx_ring_map = *seg;
  c->tx_ring = seg->addr;
}

void UcxBackend::OnMapReq(Conn* c, const void* header, size_t header_length) {
  if (c->state == ConnState::kClosed) return;
  MapReqHdr h{};
  if (header_length != sizeof(h)) {
    ProtocolErrorLocked(c, "malformed map request");
    return;
  }
  std::memcpy(&h, header, sizeof(h));
  MapRespHdr r{h.key, 0, 1, 0};
  std::vector<uint8_t> payload;
  // Only memory we allocated is offered: a peer's mapping of it keeps its
  // pages alive after we free it, so a write through a stale mapping can
  // never reach memory reused for something else here.
  auto it = regions_.find(h.key);
  if (direct_ && it != regions_.end() && it->second.allocated) {
    const SegmentWire w = DescribeSegment(it->second.seg, boot_id_);
    const auto* b = reinterpret_cast<const uint8_t*>(&w);
    payload.assign(b, b + sizeof(w));
    r.length = it->second.length;
    r.code = 0;
  }
  SendCtrlLocked(c, kAmMapResp, &r, sizeof(r), std::move(payload));
}

void UcxBackend::OnMapResp(Conn* c, const void* header, size_t header_length, const void* data, size_t length,
                           const ucp_am_recv_param_t* param) {
  if (c->state == ConnState::kClosed) return;
  MapRespHdr h{};
  if (header_length != sizeof(h) || (length != 0 && length != sizeof(SegmentWire)) ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    ProtocolErrorLocked(c, "malformed map response");
    return;
  }
  std::memcpy(&h, header, sizeof(h));
  auto it = c->remote_maps.find(h.key);
  if (it == c->remote_maps.end() || it->second.base != nullptr) {
    ProtocolErrorLocked(c, "map response for key " + std::to_string(h.key) + " never asked for");
    return;
  }
  if (h.code != 0 || length == 0) return;  // not offered: writes to it stay active messages
  SegmentWire w;
  std::memcpy(&w, data, sizeof(w));
  auto seg = MapPeerSegment(w, h.length, boot_id_);
  if (!seg.ok()) return;  // e.g. freed meanwhile
  it->second = Conn::RemoteMap{seg->addr, h.length, *seg};
}

// The mapping for writes to `remote`, or null (active message). The first
// write to a key asks the target for its rkey; the answer is kept for the
// connection's life (keys are never reused).
const Conn::RemoteMap* UcxBackend::DirectTargetLocked(Conn* c, const RemoteRegion& remote) {
  if (c->last_map != nullptr && c->last_map_key == remote.key) {
    return c->last_map->base != nullptr ? c->last_map : nullptr;
  }
  auto [it, fresh] = c->remote_maps.try_emplace(remote.key);
  if (fresh) {
    MapReqHdr h{remote.key};
    SendCtrlLocked(c, kAmMapReq, &h, sizeof(h), {});
  }
  c->last_map_key = remote.key;
  c->last_map = &it->second;
  return it->second.base != nullptr ? &it->second : nullptr;
}

// Copies the bytes into the peer's memory and publishes a slot; false (the
// caller sends an active message instead) if the range is outside what the
// target told us, the mailbox is full, or an active-message write is still
// in flight (a later write's bytes must not land before its bytes do).
bool UcxBackend::PostDirectLocked(Conn* c, const Conn::RemoteMap& m, const uint8_t* src, uint64_t key,
                                  uint64_t remote_offset, uint64_t length, uint32_t imm, uint64_t seq) {
  // Outside the region's true bounds: the active message lets the target
  // refuse it, and no byte is written here.
  if (c->am_writes_unacked > 0 || !RangeInside(remote_offset, length, m.length)) return false;
  const bool inline_bytes = length <= kInlineBytes;
  // A free slot: consumed >= pos + 1 - kRingSlots. And an inline write lands
  // only when the target takes its slot, so a later write's bytes (copied
  // now) wait until it has: posting order.
  uint64_t need_consumed = c->tx_ring_pos + 1 > kRingSlots ? c->tx_ring_pos + 1 - kRingSlots : 0;
  if (!inline_bytes) need_consumed = std::max(need_consumed, c->tx_inline_end);
  if (c->tx_ring_consumed < need_consumed) {
    const uint64_t consumed = Word64(c->tx_ring + kRingConsumedAt).load(std::memory_order_acquire);
    if (consumed > c->tx_ring_pos) return false;  // not a count we published slots for
    c->tx_ring_consumed = consumed;
    if (consumed < need_consumed) return false;
  }
  uint8_t* slot = c->tx_ring + kRingHeaderBytes + (c->tx_ring_pos % kRingSlots) * kSlotBytes;
  RingSlot v{};
  v.seq = seq;
  v.key = key;
  v.offset = remote_offset;
  v.ack = c->rx_done;
  v.length = static_cast<uint32_t>(length);
  v.imm = imm;
  v.nacks = c->nacks_sent;
  if (inline_bytes) {
    v.flags = kSlotInline;
    if (length > 0) std::memcpy(v.data, src, length);
    c->tx_inline_end = c->tx_ring_pos + 1;
  } else {
    CopyToPeer(m.base + remote_offset, src, length);
  }
  c->ack_sent = c->rx_done;  // piggy-backed
  std::memcpy(slot + sizeof(uint64_t), reinterpret_cast<const uint8_t*>(&v) + sizeof(uint64_t),
              kSlotBytes - sizeof(uint64_t));
  // Publishes the slot: the target's acquire load of the stamp sees the
  // bytes and the slot. A seq_cst exchange rather than a release store and
  // a fence (one xchg instead of mov + mfence on x86): the Dekker pairing
  // with the target's SetSleepingLocked (see its comment in Poll) needs the
  // store ordered before the load of `sleeping`.
  Word64(slot).exchange(++c->tx_ring_pos, std::memory_order_seq_cst);
  const uint32_t gen = Word32(c->tx_ring + kRingSleepingAt).load(std::memory_order_seq_cst);
  if (gen != 0 && gen != c->doorbell_gen) {
    c->doorbell_gen = gen;  // once per sleep
    SendCtrlLocked(c, kAmDoorbell, nullptr, 0, {});
  }
  return true;
}

// Takes the peer's slots in order, up to data message `max_seq` (an active
// message with a later number is being delivered). Stops at a slot whose
// message is not next: an active message ahead of it is still on its way.
bool UcxBackend::PollRingLocked(Conn* c, uint64_t max_seq) {
  bool any = false;
  while (c->rx_ring != nullptr && c->state != ConnState::kClosed) {
    uint8_t* slot = c->rx_ring + kRingHeaderBytes + (c->rx_ring_pos % kRingSlots) * kSlotBytes;
    if (Word64(slot).load(std::memory_order_acquire) != c->rx_ring_pos + 1) break;
    RingSlot v;
    std::memcpy(&v, slot, sizeof(v));  // once: the peer may scribble on it meanwhile
    if (v.seq > max_seq || v.seq > c->rx_seq + 1) break;
    if (v.seq != c->rx_seq + 1) {
      ProtocolErrorLocked(c, "mailbox slot for message " + std::to_string(v.seq) + " out of sequence");
      break;
    }
    ++c->rx_ring_pos;
    Word64(c->rx_ring + kRingConsumedAt).store(c->rx_ring_pos, std::memory_order_release);
    any = true;
    ApplySlotAckLocked(c, v.ack, v.nacks);
    if (c->state == ConnState::kClosed) break;
    // The writer checked the range against what we told it; our own table
    // still decides (the region may have been freed since: the bytes then
    // went to pages only the writer still maps).
    uint32_t nack = 0;
    Region* reg = FindRegionLocked(v.key);
    if (reg == nullptr || !reg->allocated) {
      nack = kNackUnknownKey;
    } else if (!RangeInside(v.offset, v.length, reg->length) ||
               ((v.flags & kSlotInline) && v.length > kInlineBytes)) {
      nack = kNackOutOfRange;
    } else if ((v.flags & kSlotInline) && v.length > 0) {
      std::memcpy(static_cast<uint8_t*>(reg->addr) + v.offset, v.data, v.length);
    }
    const uint64_t seq = ++c->rx_seq;
    auto fill = [&](Completion& comp) {
      comp.type = CompletionType::kWriteImm;
      comp.peer = c->peer;
      comp.imm = v.imm;
      comp.key = v.key;
      comp.offset = v.offset;
      comp.length = v.length;
    };
    if (nack == 0 && c->rx_pending.empty()) {
      // The common case (accepted, nothing ahead of it) fills the completion
      // queue's slot in place; RxDoneLocked's bookkeeping follows.
      fill(completions_.Emplace());
      RxDoneLocked(c, seq, 0, nullptr);
    } else {
      Completion comp;
      fill(comp);
      DeliverLocked(c, seq, nack, std::move(comp));
    }
  }
  return any;
}

bool UcxBackend::PollRingsLocked() {
  bool any = false;
  bool stale = false;
  for (size_t i = 0; i < ring_conns_.size(); ++i) {
    Conn* c = ring_conns_[i];
    if (c->rx_ring == nullptr) {
      stale = true;
      continue;
    }
    any |= PollRingLocked(c, UINT64_MAX);
  }
  if (stale) std::erase_if(ring_conns_, [](Conn* c) { return c->rx_ring == nullptr; });
  return any;
}

// Before active message `seq` is taken in: the mailbox slots numbered before
// it. The writer published them before it sent the message, so they are
// visible by now.
bool UcxBackend::CatchUpLocked(Conn* c, uint64_t seq) {
  if (seq != c->rx_seq + 1 && c->rx_ring != nullptr && seq > 0) PollRingLocked(c, seq - 1);
  if (c->state == ConnState::kClosed) return false;
  if (seq != c->rx_seq + 1) {
    ProtocolErrorLocked(c, "message " + std::to_string(seq) + " out of sequence (expected " +
                               std::to_string(c->rx_seq + 1) + ")");
    return false;
  }
  return true;
}

void UcxBackend::DeliverLocked(Conn* c, uint64_t seq, uint32_t nack, Completion&& comp) {
  if (c->rx_pending.empty()) {
    RxDoneLocked(c, seq, nack, &comp);
    return;
  }
  auto* s = new RxSlot();
  s->conn = c;
  s->seq = seq;
  s->ready = true;
  s->nack = nack;
  s->c = std::move(comp);
  c->rx_pending.push_back(s);
  DrainRxLocked(c);
}

// An ack read from a mailbox slot may have overtaken a refusal (an active
// message) for a write it covers: it waits until that refusal is in.
void UcxBackend::ApplySlotAckLocked(Conn* c, uint64_t ack, uint32_t nacks) {
  if (nacks > c->nacks_seen) {
    c->deferred_ack = std::max(c->deferred_ack, ack);
    c->deferred_nacks = std::max(c->deferred_nacks, nacks);
    return;
  }
  ApplyAckLocked(c, ack);
}

void UcxBackend::SetSleepingLocked(bool sleeping) {
  uint32_t v = 0;
  if (sleeping) {
    if (++sleep_gen_ == 0) ++sleep_gen_;
    v = sleep_gen_;
  }
  if (v == 0 && sleeping_flag_ == 0) return;
  sleeping_flag_ = v;
  for (Conn* c : ring_conns_) {
    if (c->rx_ring != nullptr) Word32(c->rx_ring + kRingSleepingAt).store(v, std::memory_order_relaxed);
  }
  if (sleeping) std::atomic_thread_fence(std::memory_order_seq_cst);
}

// A failed connection's mappings and mailbox go; UCX calls for them wait
// until UCX is not calling us back (ReleaseDeferredLocked).
void UcxBackend::ReleaseDirectLocked(Conn* c) {
  if (c->tx_ring != nullptr) deferred_segments_.push_back(c->tx_ring_map);
  c->tx_ring_map = Segment{};
  c->tx_ring = nullptr;
  for (auto& [key, m] : c->remote_maps) {
    if (m.base != nullptr) deferred_segments_.push_back(m.mapping);
  }
  c->remote_maps.clear();
  c->last_map = nullptr;
  if (c->rx_ring != nullptr) deferred_segments_.push_back(c->rx_ring_seg);
  c->rx_ring_seg = Segment{};
  c->rx_ring = nullptr;
}

void UcxBackend::ReleaseDeferredLocked() {
  if (in_ucx_ > 0 || ring_watchers_ > 0 || deferred_segments_.empty()) return;
  for (Segment& seg : deferred_segments_) DestroySegment(seg);
  deferred_segments_.clear();
}

ucs_status_t UcxBackend::RingCb(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c != nullptr) self->OnRing(c, header, header_length, data, length, param);
  return UCS_OK;
}

ucs_status_t UcxBackend::MapReqCb(void* arg, const void* header, size_t header_length, void*, size_t,
                                  const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c != nullptr) self->OnMapReq(c, header, header_length);
  return UCS_OK;
}

ucs_status_t UcxBackend::MapRespCb(void* arg, const void* header, size_t header_length, void* data,
                                   size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c != nullptr) self->OnMapResp(c, header, header_length, data, length, param);
  return UCS_OK;
}

// Its arrival woke the sleeping Poll; the mailboxes are read by progress.
ucs_status_t UcxBackend::DoorbellCb(void*, const void*, size_t, void*, size_t, const ucp_am_recv_param_t*) {
  return UCS_OK;
}

// ---------------------------------------------------------------------------
// Failure and shutdown

void UcxBackend::ErrCb(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* c = static_cast<Conn*>(arg);
  UcxBackend* self = c->backend;
  if (c->state == ConnState::kClosed) return;
  self->FailConnLocked(c, PeerClosed(c->Name() + " failed: " + ucs_status_string(status)), true);
}

void UcxBackend::ProtocolErrorLocked(Conn* c, const std::string& what) {
  ZW_LOG(kWarn, "ucx: dropping connection " << c->Name() << ": " << what);
  FailConnLocked(c, PeerClosed(c->Name() + ": protocol error: " + what), true);
}

void UcxBackend::FailConnLocked(Conn* c, const Status& status, bool emit_peer_error) {
  if (c->state == ConnState::kClosed) return;
  const bool was_open = c->state == ConnState::kOpen;
  c->state = ConnState::kClosed;
  c->failure = status;
  by_ep_.erase(c->ep);
  // In posting order; ops still referenced by a UCX request are recycled
  // when it completes.
  std::deque<Op*> pending;
  pending.swap(c->unacked);
  for (Op* op : pending) FinishOpLocked(op, status);
  pending.clear();
  pending.swap(c->reads);
  for (Op* op : pending) FinishOpLocked(op, status);
  for (RxSlot* s : c->rx_pending) {
    if (s->request_live) {
      s->orphaned = true;
      orphans_.insert(s);
    } else {
      delete s;
    }
  }
  c->rx_pending.clear();
  ReleaseDirectLocked(c);
  if (emit_peer_error && was_open) {
    Completion err;
    err.type = CompletionType::kPeerError;
    err.status = status;
    err.peer = c->peer;
    PushCompletionLocked(std::move(err));
  }
  CloseEpLocked(c);
  if (c->sock >= 0 && !closed_) KickSocketLoop();  // it closes the socket: the peer learns
}

void UcxBackend::CloseCb(void* request, ucs_status_t, void* user_data) {
  static_cast<UcxBackend*>(user_data)->closing_.erase(request);
  ucp_request_free(request);
}

// A forced close drops whatever is still queued; a flushing one first sends
// it, which may wait on the peer (Close bounds that wait).
void UcxBackend::CloseEpLocked(Conn* c, bool force) {
  if (c->ep == nullptr) return;
  ucp_ep_h ep = c->ep;
  c->ep = nullptr;
  if (in_ucx_ > 0) {
    // Inside a UCX callback (e.g. UCX failing the endpoint's requests one by
    // one): closing it now would re-enter UCX; done once progress returns.
    deferred_close_.push_back({ep, force});
    return;
  }
  CloseUcpEpLocked(ep, force);
}

void UcxBackend::CloseUcpEpLocked(ucp_ep_h ep, bool force) {
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  if (force) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
  }
  prm.cb.send = &CloseCb;
  prm.user_data = this;
  ++in_ucx_;
  ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &prm);
  --in_ucx_;
  if (r != nullptr && !UCS_PTR_IS_ERR(r)) closing_.insert(r);
  RunDeferredClosesLocked();
}

void UcxBackend::RunDeferredClosesLocked() {
  while (in_ucx_ == 0 && !deferred_close_.empty()) {
    auto [ep, force] = deferred_close_.back();
    deferred_close_.pop_back();
    CloseUcpEpLocked(ep, force);
  }
}

unsigned UcxBackend::ProgressOnceLocked() {
  ++in_ucx_;
  unsigned n = ucp_worker_progress(worker_);
  --in_ucx_;
  RunDeferredClosesLocked();
  return n;
}

void UcxBackend::Close() {
  {
    std::lock_guard lk(mu_);
    if (closed_) return;
    closed_ = true;
  }
  {
    std::lock_guard lk(helper_mu_);
    helper_stop_ = true;
  }
  helper_cv_.notify_all();
  if (helper_.joinable()) helper_.join();
  if (socket_thread_.joinable()) {
    // A handshake in progress finishes first (bounded by its deadline).
    loop_stop_.store(true);
    KickSocketLoop();
    socket_thread_.join();
  }
  listen_sock_.Reset();
  std::unique_lock lk(mu_);
  // Pollers notice closed_ once they wake; the worker must outlive their
  // last look at its event fd.
  Wake();
  pollers_cv_.wait_for(lk, std::chrono::seconds(2), [&] { return pollers_ == 0; });
  if (!worker_) {  // Init failed part-way
    if (context_) ucp_cleanup(context_);
    context_ = nullptr;
    return;
  }
  const Status cancelled = Cancelled("ucx backend closed");
  std::vector<Conn*> live;
  for (auto& c : conns_) {
    if (c->state != ConnState::kClosed) live.push_back(c.get());
  }
  // Best effort: acknowledge what already landed so that the peer's writes
  // which did complete here are not reported as failed.
  for (Conn* c : live) {
    if (c->state == ConnState::kOpen && c->rx_done > c->ack_sent) {
      SendAckLocked(c, c->rx_done);
    }
  }
  for (Conn* c : live) {
    // With nothing of ours in flight, a flushing close gets those acks (and
    // e.g. a goodbye's ack) out before the disconnect reaches the peer;
    // otherwise the pending operations are cancelled and dropped.
    const bool idle = c->unacked.empty() && c->reads.empty();
    ucp_ep_h ep = c->ep;
    by_ep_.erase(ep);
    c->ep = nullptr;  // keep FailConnLocked from force-closing it
    FailConnLocked(c, cancelled, false);
    c->ep = ep;
    CloseEpLocked(c, /*force=*/!idle);
  }
  // A flushing close completes once the peer answers the disconnect; one
  // that is not progressing gets a bounded wait, after which destroying the
  // worker tears the endpoint down anyway (the peer still sees it go).
  const auto deadline = Clock::now() + std::chrono::milliseconds(200);
  while (!closing_.empty() && Clock::now() < deadline) {
    if (ProgressOnceLocked() == 0) {
      lk.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      lk.lock();
    }
  }
  for (void* r : closing_) ucp_request_free(r);  // UCX finishes them without us
  closing_.clear();
  ReleaseDeferredLocked();
  for (auto& [key, r] : regions_) {
    if (r.memh) ucp_mem_unmap(context_, r.memh);
    r.memh = nullptr;
    DestroySegment(r.seg);  // allocated memory is the backend's: gone with it
  }
  ucp_worker_destroy(worker_);
  worker_ = nullptr;
  ucp_cleanup(context_);
  context_ = nullptr;
  efd_ = -1;
  // Last: a peer watching these learns we are gone only once everything
  // above (acks, the flushing disconnects) has left.
  for (auto& c : conns_) {
    if (c->sock >= 0) ::close(c->sock);
    c->sock = -1;
  }
}

// ---------------------------------------------------------------------------
// Progress

bool UcxBackend::ProgressLocked() {
  ReleaseDeferredLocked();
  bool any = PollRingsLocked();
  for (int i = 0; i < kMaxProgressRounds && ProgressOnceLocked() != 0; ++i) any = true;
  return any;
}

void UcxBackend::Wake() {
  uint64_t one = 1;
  ssize_t rc = ::write(wake_fd_, &one, sizeof(one));
  static_cast<void>(rc);  // EAGAIN: already signalled
}

size_t UcxBackend::Poll(std::span<Completion> out, std::chrono::milliseconds timeout) {
  if (out.empty()) return 0;
  Touch();
  std::unique_lock lk(mu_);
  if (size_t n = PopLocked(out)) return n;
  if (closed_) return 0;
  ++pollers_;
  size_t n = 0;
  bool second = false;   // timeout 0: two rounds, no clock
  bool spinning = true;  // inside the busy-poll phase: the clock is read every kClockEvery rounds
                         // (the first time only after that many: a shared-memory message is
                         // often there within them, and a read costs ~50 ns on kvm-clock)
  unsigned since_clock = 0;
  Clock::time_point deadline, spin_until;
  bool timed = false;
  constexpr unsigned kClockEvery = 32;
  while (!closed_) {
    // Mailbox messages go out at once (latency: a round of UCX progress
    // costs as much as the rest of the path); UCX's own progress still
    // runs at least every kRingFirstRounds rounds, so that active messages
    // never starve behind a busy mailbox.
    if (!PollRingsLocked() || ++ring_first_ >= kRingFirstRounds) {
      ring_first_ = 0;
      ProgressLocked();
    }
    if ((n = PopLocked(out)) > 0) break;
    // Nothing to hand back: acks held for piggy-backing go out now.
    FlushAcksLocked();
    if (timeout.count() == 0) {
      if (second) break;
      second = true;
      WatchRingsUnlocked(lk);
      continue;
    }
    if (spinning && ++since_clock < kClockEvery) {
      WatchRingsUnlocked(lk);
      continue;
    }
    since_clock = 0;
    const auto now = Clock::now();
    if (!timed) {
      timed = true;
      deadline = now + timeout;
      spin_until = std::min(deadline, now + spin_);
    }
    if (now >= deadline) break;
    spinning = now < spin_until;
    if (spinning) {
      // Busy-poll briefly: a sleep / wake-up costs more than a ping-pong's
      // whole software path. Let posting threads in between rounds.
      WatchRingsUnlocked(lk);
      continue;
    }
    ucs_status_t st = ucp_worker_arm(worker_);
    if (st == UCS_ERR_BUSY) continue;  // events arrived meanwhile
    if (!ring_conns_.empty()) {
      // Mailbox writes raise no event: tell the writers we sleep (they then
      // ring the doorbell, an active message), then look once more. With
      // the fence in SetSleepingLocked and the writer's after its slot,
      // either we see the slot or the writer sees the flag.
      SetSleepingLocked(true);
      if (PollRingsLocked()) {
        if (sleepers_ == 0) SetSleepingLocked(false);
        continue;
      }
    }
    ++sleepers_;
    const int efd = efd_;
    lk.unlock();
    auto wait = std::min<Clock::duration>(deadline - now, kMaxSleepSlice);
    if (st != UCS_OK) wait = std::min<Clock::duration>(wait, std::chrono::microseconds(200));
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wait).count();
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {efd, POLLIN, 0}};
    ::ppoll(fds, st == UCS_OK ? 2 : 1, &ts, nullptr);
    if (fds[0].revents & POLLIN) {
      uint64_t v;
      ssize_t rc = ::read(wake_fd_, &v, sizeof(v));
      static_cast<void>(rc);
    }
    lk.lock();
    if (--sleepers_ == 0) SetSleepingLocked(false);
  }
  if (n == 0) n = PopLocked(out);
  if (--pollers_ == 0 && closed_) {
    pollers_cv_.notify_all();
    Wake();  // another poller may still be asleep
  }
  Touch();
  return n;
}

// Between two busy-poll rounds, with mu_ released (posting threads get in):
// watches the next slot of each mailbox for a while, so that a slot is seen
// within a load or two of landing rather than after the rest of a round
// (UCX's progress, the lock): on shared memory that round is a large part of
// a ping-pong's one-way time. Returns when a slot is stamped or after
// kWatchLoads looks; the next round takes it. The mappings stay valid
// meanwhile: ReleaseDeferredLocked waits while ring_watchers_ > 0.
void UcxBackend::WatchRingsUnlocked(std::unique_lock<std::mutex>& lk) {
  constexpr size_t kWatchMax = 8;  // mailboxes watched (the rest wait for the round)
  constexpr int kWatchLoads = 16;  // with a pause each: ~0.3 us, a few rounds of UCX progress
  const uint8_t* stamp[kWatchMax];
  uint64_t want[kWatchMax];
  size_t n = 0;
  for (Conn* c : ring_conns_) {
    if (c->rx_ring == nullptr || c->state == ConnState::kClosed) continue;
    stamp[n] = c->rx_ring + kRingHeaderBytes + (c->rx_ring_pos % kRingSlots) * kSlotBytes;
    want[n] = c->rx_ring_pos + 1;
    if (++n == kWatchMax) break;
  }
  if (n == 0) {
    lk.unlock();
    lk.lock();
    return;
  }
  ++ring_watchers_;
  lk.unlock();
  for (int i = 0; i < kWatchLoads; ++i) {
    bool seen = false;
    for (size_t k = 0; k < n; ++k) {
      seen |= Word64(const_cast<uint8_t*>(stamp[k])).load(std::memory_order_acquire) == want[k];
    }
    if (seen) break;
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  lk.lock();
  --ring_watchers_;
}

// Makes progress only while the owner is away (no Poll or post for a whole
// period of idle_progress_): keeps acks flowing and incoming data served so
// a peer's completions never wait on this process calling Poll again.
void UcxBackend::FallbackProgressLoop() {
  const auto period = std::max<std::chrono::microseconds>(idle_progress_, std::chrono::microseconds(100));
  uint64_t seen = activity_.load(std::memory_order_relaxed);
  std::unique_lock hl(helper_mu_);
  while (!helper_stop_) {
    helper_cv_.wait_for(hl, period);
    if (helper_stop_) break;
    const uint64_t now = activity_.load(std::memory_order_relaxed);
    if (now != seen) {
      seen = now;
      continue;
    }
    std::unique_lock lk(mu_, std::try_to_lock);
    if (!lk.owns_lock() || closed_ || pollers_ > 0) continue;
    ProgressLocked();
    FlushAcksLocked();
  }
}

}  // namespace

Result<std::unique_ptr<Backend>> CreateUcxBackend(const BackendOptions& options) {
  ZW_ASSIGN_OR_RETURN(uint64_t spin_us, EnvUint("UCX_SPIN_US", 50));
  ZW_ASSIGN_OR_RETURN(uint64_t idle_us, EnvUint("UCX_IDLE_PROGRESS_US", 1000));
  if (idle_us == 0) return InvalidArgument("ZIPWIRE_UCX_IDLE_PROGRESS_US must be positive");
  ZW_ASSIGN_OR_RETURN(uint64_t peer_errors, EnvUint("UCX_PEER_ERRORS", 1));
  if (peer_errors > 1) return InvalidArgument("ZIPWIRE_UCX_PEER_ERRORS must be 0 or 1");
  ZW_ASSIGN_OR_RETURN(uint64_t direct, EnvUint("UCX_DIRECT", 1));
  if (direct > 1) return InvalidArgument("ZIPWIRE_UCX_DIRECT must be 0 or 1");
  auto backend =
      std::make_unique<UcxBackend>(options, std::chrono::microseconds(spin_us),
                                   std::chrono::microseconds(idle_us), peer_errors == 1, direct == 1);
  ZW_RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace zipwire::transport
