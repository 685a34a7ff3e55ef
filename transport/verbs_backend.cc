// verbs backend: the backend contract on libibverbs RC queue pairs.
//
// Connection setup. Listen() opens a TCP side channel; Connect() dials it and
// the two sides swap one fixed 240-byte hello each (magic, version, rank, QP
// count, LID, GID, MTU, QP numbers and PSNs). The acceptor moves its QPs to
// RTS before replying, the connector moves its QPs to RTS and then sends one
// READY byte, and only then does the acceptor report kPeerConnected: neither
// side can post to a QP whose peer is not yet ready. The side channel stays
// open for the connection's life; EOF on it is how a closed or dead peer is
// noticed at once (RC retry exhaustion is the backstop, kPeerClosed too).
// With ZIPWIRE_IB_CM=rdmacm the same QPs are connected through rdma_cm
// instead (verbs_cm.h: one cm_id per QP, private data for the rank), and
// RDMA_CM_EVENT_DISCONNECTED plays the side channel's EOF.
//
// Data path. All two-sided traffic is SENDs on QP 0 into a ring of posted
// receive buffers, each starting with a 40-byte header laid out like the tcp
// backend's (type, code, imm, cumulative ack, key, offset, length). A
// PostWrite is an RDMA WRITE (no immediate) of the user's bytes straight from
// and into registered memory, followed on the same RC QP by a META message
// carrying {imm, key, offset, length}; RC ordering guarantees the bytes have
// landed when META is delivered, and the user's 32-bit immediate travels
// intact. (Write-with-imm would save a work request, but its 32 bits cannot
// hold the key/offset/length the target must check.) A write small enough to
// share one MTU-sized packet with its header (both ends host memory) goes
// eagerly instead: one SEND carrying header and bytes, which the target checks
// against its own table and copies into place before reporting kWriteImm; one
// packet instead of two is most of a small write's latency. With ZIPWIRE_IB_QPS > 1
// a large write's stripes go out signalled on all QPs, and META follows on
// QP 0 once every stripe's completion (the responder's ack) is in.
//
// Mailbox (the small-write fast path, after MVAPICH's RDMA fast path). Each
// side registers a ring of kMboxSlots x 256 B per peer and announces it (MBOX,
// the first message on a new connection). A host-to-host write whose record
// [payload padded to 8 | 24-byte header | stamp m], ending at the slot's end,
// fits the QP's inline limit (payload up to 224 B, offset below 4 GiB) is ONE
// inline RDMA WRITE into slot m % slots of the peer's ring: no receive
// buffer, no receive completion, no SEND. The target's progress pass reads the
// next slot's last word (record m is there when it reads m; the slot's
// previous record had m - slots), checks and
// copies the bytes exactly as for an eager SEND (NACK on refusal), and reports
// kWriteImm. Credits: record m's slot is free again once the target's
// cumulative ack covers its sequence number, so credits ride on the acks
// (piggy-backed or bare) with no extra traffic; without a free slot a small
// write falls back to the eager SEND.
// Order: records and SEND-path messages (META, eager, SEND) share one
// sequence, and each carries its low 16 bits (header `reserved`). RC delivers
// everything on QP 0 in order and places a record before any later message's
// completion, so the target processes strictly by sequence: a SEND whose tag
// is ahead first takes the records before it from the mailbox; and a pass
// notes which records are complete *before* draining the CQ and processes
// only those after it, so a control message (ack, NACK) posted before a record
// is always seen first. (A record's ack may then trail a control message's;
// the newer ack wins.)
// Waking: a record raises no completion, so a target asleep on its completion
// channel would not see it. The initiator writes a plain record only when it
// processed something from that peer in this or the previous progress pass
// (a ping-pong: the peer is spinning); otherwise the record goes as RDMA WRITE
// WITH IMM, whose receive completion wakes the target (a doorbell; the
// immediate names the record, and the target processes the records up to
// it). A Poll with mailbox peers also never sleeps longer than 1 ms, which
// bounds the rare miss (a peer that went to sleep right after answering).
// While spinning, Poll reads only the next stamps of up to 4 mailboxes
// between full passes, so a record is seen within nanoseconds.
//
// Completion semantics match the tcp backend: META and SEND messages are
// numbered in posting order; the target acknowledges cumulatively once its
// Poll has processed them, piggy-backed on any message it sends; a bare ACK
// goes out only when the application let a whole further progress pass go by
// without answering, when kAckBatch messages wait, or from the helper thread
// (so a ping-pong costs one packet each way, a stream one ACK per pass). An
// initiator's kWriteDone / kSendDone comes from that ack.
// A META the target refuses (key not live, range outside it) is NACKed.
//
// Range safety. A remote write outside the target's memory region would
// break the RC connection (remote access error), so the initiator never
// issues one: it learns each remote key's true bounds once, by a QUERY that
// the target answers from its own table (REPLY: live or not, addr, length),
// and refuses out-of-bounds or dead-key writes locally with kOutOfRange
// naming the peer. DeregisterMemory sends UNREG to every peer so caches
// forget the key. Deregistering memory a peer is still writing into is a
// program error (as with any RDMA); it fails that connection, nothing worse.
//
// Keys. MemoryRegion.key = (serial << 32) | rkey, serial a per-backend
// counter that is never reused: a stale key never matches a new
// registration, even when the provider hands out the same rkey again.
//
// Flow control. The send queue is accounted in software (signal every
// kSignalEvery WRs, so completions free slots); what does not fit waits in a
// per-peer queue in posting order. Receive overrun is left to RC's RNR retry
// (rnr_retry 7 = unbounded): a receiver that polls catches up, one that
// closes is noticed through the side channel.
//
// Threads. One mutex guards the state; posts go straight to ibv_post_send.
// Poll busy-polls the CQ for ZIPWIRE_IB_SPIN_US, then arms the completion
// channel and sleeps in poll() on its fd (plus an eventfd the helper thread
// pokes). The helper thread accepts side-channel connections, watches the
// side channels for EOF, and makes progress only while the owner is idle; it
// takes no lock and reads no clock of the owner's while the owner is busy.
// It runs each handshake itself, bounded by 5 s: a client that connects and
// says nothing delays other accepts (not established peers) by that much.
//
// Limits (per peer): 256 receive buffers of 16 KiB + 64 B (4.2 MiB), 64
// send slots (1 MiB) and a 32 KiB mailbox registered on QP 0; the shared CQ (up to 32768 entries)
// reserves 256 + 512 x QPs entries per peer, so about 40 single-QP peers.

#include "transport/verbs_backend.h"

#include <arpa/inet.h>
#include <endian.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/log.h"
#include "transport/backend_util.h"
#include "transport/gpu_memory.h"
#include "transport/registration_cache.h"
#include "transport/verbs_cm.h"

namespace zipwire::transport {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kHeaderBytes = internal::kMessageHeaderBytes;
constexpr size_t kSlotBytes = 16448;  // header + kVerbsMaxControlBytes, 64-byte multiple
static_assert(kSlotBytes >= kHeaderBytes + kVerbsMaxControlBytes);
constexpr uint32_t kRecvDepth = 256;   // receive buffers per peer (QP 0)
constexpr uint32_t kSendDepth = 512;   // send WRs per QP
constexpr uint32_t kSignalEvery = 32;  // selective signalling period
constexpr uint32_t kSendSlots = 64;    // registered buffers for messages too big to inline
constexpr size_t kPollBatch = 32;
constexpr size_t kMaxWcPerProgress = 1024;  // completion moderation per pass
constexpr uint64_t kAckBatch = 32;          // unacknowledged messages that force a bare ACK
constexpr uint8_t kPort = 1;
constexpr uint64_t kRecvBit = uint64_t{1} << 63;

constexpr uint64_t kHelloMagic = 0x3176005642495a57ull;  // "WZIBV\0v1"
// 2: eager writes, REPLY says the memory kind; 3: mailboxes, sequence tags;
// 4: compact mailbox records ending at the slot's end.
constexpr uint32_t kWireVersion = 4;

// The mailbox (see "Mailbox" above): kMboxSlots records of kMboxSlotBytes in
// registered memory at the target, written by the peer with one inline RDMA
// WRITE each: [payload, padded to 8 | 24-byte header | stamp], at the slot's end.
constexpr uint32_t kMboxSlots = 128;
constexpr size_t kMboxSlotBytes = 256;
// A record's own compact header (see PostMbox) and its stamp.
constexpr size_t kMboxHeaderBytes = 24;
constexpr size_t kMboxOverhead = kMboxHeaderBytes + 8;
constexpr size_t kMboxMaxPayload = kMboxSlotBytes - kMboxOverhead;  // 224
constexpr size_t MboxRecordBytes(uint64_t payload) { return kMboxOverhead + ((payload + 7) & ~uint64_t{7}); }
constexpr size_t kHelloBytes = 240;
constexpr size_t kReasonBytes = 64;

enum MsgType : uint8_t {
  kMeta = 1,
  kSend = 2,
  kAck = 3,
  kNack = 4,
  kQuery = 5,
  kReply = 6,
  kUnreg = 7,
  kEager = 8,  // a small write whose bytes ride in the message (copied at the target)
  kRead = 9,   // never on the wire: a PostRead's Op
  kMbox = 10,  // announces our mailbox: key = its rkey, offset = its address, length = slots
};
// REPLY codes: the key is dead, live in host memory, live in other memory.
enum ReplyCode : uint8_t { kReplyDead = 0, kReplyHost = 1, kReplyDevice = 2 };
enum NackCode : uint8_t { kNackUnknownKey = 1, kNackOutOfRange = 2 };

using internal::GetLE;
using internal::PutLE;

using Header = internal::MessageHeader;
using internal::DecodeHeader;
using internal::EncodeHeader;

using internal::RangeInside;

// A record's header (layout in PostMbox): the general Header's fields in 24
// bytes. Offset and ack travel as 32 bits (MboxFits keeps offsets below
// 4 GiB); the ack is widened against `acked`, the newest ack the target has,
// to the nearest value (a record's ack may trail a little; ApplyAck judges).
void EncodeMboxHeader(const Header& h, uint8_t* out) {
  PutLE<uint16_t>(out, h.reserved);
  out[2] = static_cast<uint8_t>(h.length);
  out[3] = h.type;
  PutLE<uint32_t>(out + 4, h.imm);
  PutLE<uint32_t>(out + 8, static_cast<uint32_t>(h.ack));
  PutLE<uint32_t>(out + 12, static_cast<uint32_t>(h.offset));
  PutLE<uint64_t>(out + 16, h.key);
}
Header DecodeMboxHeader(const uint8_t* in, uint64_t acked) {
  Header h;
  h.reserved = GetLE<uint16_t>(in);
  h.length = in[2];
  h.type = in[3];
  h.imm = GetLE<uint32_t>(in + 4);
  const uint32_t ack32 = GetLE<uint32_t>(in + 8);
  h.ack = acked + static_cast<uint64_t>(
                      static_cast<int64_t>(static_cast<int32_t>(ack32 - static_cast<uint32_t>(acked))));
  h.offset = GetLE<uint32_t>(in + 12);
  h.key = GetLE<uint64_t>(in + 16);
  return h;
}

// The side channel's handshake record (both directions).
struct Hello {
  uint32_t status = 0;  // reply: 0 accepted, 1 refused (reason says why)
  uint32_t rank = 0;
  uint32_t nqps = 0;
  uint32_t lid = 0;
  uint32_t mtu = 0;
  uint8_t gid[16] = {};
  uint32_t qpn[kVerbsMaxQps] = {};
  uint32_t psn[kVerbsMaxQps] = {};
  std::string reason;
};

void EncodeHello(const Hello& h, uint8_t out[kHelloBytes]) {
  std::memset(out, 0, kHelloBytes);
  PutLE<uint64_t>(out, kHelloMagic);
  PutLE<uint32_t>(out + 8, kWireVersion);
  PutLE<uint32_t>(out + 12, h.status);
  PutLE<uint32_t>(out + 16, h.rank);
  PutLE<uint32_t>(out + 20, h.nqps);
  PutLE<uint32_t>(out + 24, h.lid);
  PutLE<uint32_t>(out + 28, h.mtu);
  std::memcpy(out + 32, h.gid, 16);
  for (size_t i = 0; i < kVerbsMaxQps; ++i) {
    PutLE<uint32_t>(out + 48 + 4 * i, h.qpn[i]);
    PutLE<uint32_t>(out + 112 + 4 * i, h.psn[i]);
  }
  std::memcpy(out + 176, h.reason.data(), std::min(h.reason.size(), kReasonBytes - 1));
}

// Returns an empty string, or what is wrong with the bytes.
std::string DecodeHello(const uint8_t in[kHelloBytes], Hello* h) {
  if (GetLE<uint64_t>(in) != kHelloMagic) return "not a zipwire verbs hello";
  uint32_t version = GetLE<uint32_t>(in + 8);
  if (version != kWireVersion) {
    return "wire version " + std::to_string(version) + ", expected " + std::to_string(kWireVersion);
  }
  h->status = GetLE<uint32_t>(in + 12);
  h->rank = GetLE<uint32_t>(in + 16);
  h->nqps = GetLE<uint32_t>(in + 20);
  h->lid = GetLE<uint32_t>(in + 24);
  h->mtu = GetLE<uint32_t>(in + 28);
  std::memcpy(h->gid, in + 32, 16);
  for (size_t i = 0; i < kVerbsMaxQps; ++i) {
    h->qpn[i] = GetLE<uint32_t>(in + 48 + 4 * i);
    h->psn[i] = GetLE<uint32_t>(in + 112 + 4 * i);
  }
  const char* r = reinterpret_cast<const char*>(in + 176);
  h->reason.assign(r, strnlen(r, kReasonBytes - 1));
  if (h->nqps == 0 || h->nqps > kVerbsMaxQps) return "bad QP count " + std::to_string(h->nqps);
  if (h->mtu < IBV_MTU_256 || h->mtu > IBV_MTU_4096) return "bad MTU " + std::to_string(h->mtu);
  return "";
}

// Blocking-with-deadline socket I/O for the handshake.
bool WaitFd(int fd, short events, Clock::time_point deadline) {
  while (true) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return false;
  }
}

std::string IoAll(int fd, uint8_t* buf, size_t n, bool write, Clock::time_point deadline) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = write ? ::send(fd, buf + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT)
                      : ::recv(fd, buf + done, n - done, MSG_DONTWAIT);
    if (r > 0) {
      done += static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return "connection closed";
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return std::strerror(errno);
    if (!WaitFd(fd, write ? POLLOUT : POLLIN, deadline)) return "timed out";
  }
  return "";
}

std::string GidString(const uint8_t gid[16]) {
  char buf[INET6_ADDRSTRLEN] = {};
  inet_ntop(AF_INET6, gid, buf, sizeof(buf));
  return buf;
}

// A posted-but-unfinished PostWrite / PostSend, waiting for send-queue room,
// a remote key's bounds, or its stripes.
struct Op {
  uint8_t type = 0;  // kMeta (a write) or kSend
  uint64_t context = 0;
  // kMeta
  const uint8_t* local = nullptr;
  std::shared_ptr<ibv_mr> mr;  // keeps a deregistered source alive until done
  uint64_t length = 0;
  uint64_t key = 0;
  uint64_t remote_offset = 0;
  uint32_t imm = 0;
  bool local_host = false;   // the CPU may read the source (eager writes)
  bool remote_host = false;  // ... and write the target (from the key's REPLY)
  // kSend
  std::vector<uint8_t> payload;
  // Striping: bytes issued so far and stripes posted but not completed.
  bool started = false;
  uint64_t issued = 0;
  uint32_t stripes_inflight = 0;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
};

struct Unacked {
  uint64_t seq;
  uint8_t type;
  uint64_t context;
  uint64_t key, offset, length;
  std::shared_ptr<ibv_mr> mr;  // the source registration (writes)
};

struct Nack {
  uint64_t seq;
  uint8_t code;
};

struct RemoteInfo {
  enum State : uint8_t { kPending, kLive, kDead } state = kPending;
  bool host = false;  // the target can copy eager bytes into it
  uint64_t addr = 0;
  uint64_t length = 0;
};

struct Conn;

struct Signaled {
  uint64_t wr;
  Op* stripe;    // non-null: a stripe of this op
  int32_t slot;  // >= 0: a send slot this WR used
};

struct Qp {
  Conn* conn = nullptr;
  ibv_qp* qp = nullptr;
  uint32_t uid = 0;
  uint32_t psn = 0;
  uint64_t posted = 0;     // WRs posted
  uint64_t completed = 0;  // WRs known finished (through signalled ones)
  std::deque<Signaled> signaled;
  uint32_t Free() const { return kSendDepth - static_cast<uint32_t>(posted - completed); }
};

struct Conn {
  PeerId peer = kInvalidPeer;
  std::string address;
  std::vector<std::unique_ptr<Qp>> qps;
  std::vector<uint8_t> recv_slab, send_slab;
  std::vector<uint32_t> free_slots;  // of send_slab
  uint32_t max_inline = 0;           // what the provider granted for these QPs
  uint32_t mtu_bytes = 256;          // the path MTU, set at RTR
  ibv_mr* recv_mr = nullptr;
  ibv_mr* send_mr = nullptr;
  int side_fd = -1;  // owned by the helper thread once established
  bool established = false;
  bool open = false;
  bool error_delivered = false;  // its kPeerError went out through Poll
  Status failure;

  // Initiator side.
  uint64_t next_seq = 1;
  uint64_t peer_acked = 0;
  uint64_t last_eager_seq = 0;  // the newest eager write: its bytes land by the target's CPU
  std::deque<std::unique_ptr<Op>> data_q;
  std::deque<Header> ctrl_q;
  std::deque<Unacked> unacked;
  std::deque<Nack> peer_nacks;
  std::deque<std::unique_ptr<Op>> reads;  // fully posted PostReads, in completion order (QP 0)
  // Completions that came before the connection was opened (a peer may post
  // the moment its side is up); replayed by OpenLocked after kPeerConnected,
  // so nothing is lost or reordered.
  std::vector<ibv_wc> early;
  std::unordered_map<uint64_t, RemoteInfo> remote;
  // The last key PostWrite looked up (entries are never erased, and element
  // pointers survive rehashing): one hash lookup less per small write.
  uint64_t last_remote_key = 0;
  RemoteInfo* last_remote = nullptr;
  // Target side.
  uint64_t rx_seq = 0;
  uint64_t ack_sent = 0;
  bool ack_dirty = false;
  uint64_t ack_arm_pass = 0;  // the progress pass that first left a message unacknowledged
  uint64_t last_rx_pass = 0;  // the progress pass that last processed a message from the peer

  // Our mailbox, which the peer writes (target side).
  std::vector<uint64_t> mbox_mem;  // kMboxSlots * kMboxSlotBytes bytes, 8-byte aligned
  ibv_mr* mbox_mr = nullptr;
  uint64_t mbox_next = 1;      // the stamp expected in slot mbox_next % kMboxSlots
  uint64_t mbox_peek_end = 1;  // records seen complete before this pass drained the CQ
  // The peer's mailbox (initiator side), once its kMbox announcement came.
  bool peer_mbox = false;
  uint64_t peer_mbox_addr = 0;
  uint32_t peer_mbox_rkey = 0;
  uint64_t mbox_sent = 0;          // records written (stamps 1..mbox_sent)
  uint64_t mbox_freed = 0;         // records the peer has acknowledged (slots free again)
  std::vector<uint64_t> mbox_seq;  // per slot: the sequence number of the record in it

  std::string Name() const { return "peer " + std::to_string(peer) + " (" + address + ")"; }
};

// Registrations are shared with the operations that read from them, so a
// DeregisterMemory while writes are still queued defers ibv_dereg_mr until
// they finish (the tcp backend reads such memory too).
struct Region {
  MemoryRegion region;
  std::shared_ptr<ibv_mr> mr;
};

class VerbsBackend final : public Backend {
 public:
  VerbsBackend(const BackendOptions& options) : options_(options), self_(options.self) {
    caps_.name = "verbs";
    caps_.supports_write_imm = true;
    caps_.supports_remote = true;
    caps_.zero_copy = true;
    caps_.memory_kinds = {MemoryKind::kHost};
    caps_.max_control_bytes = kVerbsMaxControlBytes;
    caps_.max_write_bytes = kVerbsMaxWriteBytes;
    caps_.supports_read = true;
  }
  ~VerbsBackend() override;

  Status Init(uint32_t nqps, uint64_t stripe_bytes, std::chrono::microseconds spin,
              std::chrono::microseconds idle_progress, size_t reg_cache_entries, bool mailbox);

  const Capabilities& capabilities() const override { return caps_; }
  void SetLocalRank(PeerId self) override {
    self_.store(self);
    if (cm_) cm_->SetLocalRank(self);
  }
  Result<std::string> Listen() override;
  Status Connect(PeerId peer, const std::string& address) override;
  Result<MemoryRegion> RegisterMemory(void* addr, size_t length, MemoryKind kind) override;
  Result<std::shared_ptr<ibv_mr>> RegisterHost(void* addr, size_t length);
  Result<std::shared_ptr<ibv_mr>> RegisterCuda(void* addr, size_t length);
  Status DeregisterMemory(const MemoryRegion& region) override;
  Status PostWrite(PeerId peer, const MemoryRegion& local, uint64_t local_offset, const RemoteRegion& remote,
                   uint64_t remote_offset, uint64_t length, uint32_t imm, uint64_t context) override;
  Status PostRead(PeerId peer, const MemoryRegion& local, uint64_t local_offset, const RemoteRegion& remote,
                  uint64_t remote_offset, uint64_t length, uint64_t context) override;
  Status PostSend(PeerId peer, std::span<const uint8_t> message, uint64_t context) override;
  size_t Poll(std::span<Completion> out, std::chrono::milliseconds timeout) override;
  void Close() override;

 private:
  // No clock read: the helper thread only needs to know whether anything
  // happened since it last looked (clock reads are syscalls on some VMs).
  // A plain load and store, not a locked increment: the helper only asks
  // whether the value changed, which concurrent bumps still guarantee, and a
  // busy-polling owner calls this on every Poll.
  void Touch() { activity_.store(activity_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed); }
  // Setup.
  Result<std::unique_ptr<Conn>> NewConn(PeerId peer, std::string address, uint32_t nqps);
  Status ToRts(Conn* c, const Hello& remote);
  void FillHello(const Conn& c, Hello* h) const;
  void DestroyConn(Conn* c);
  void HandleAccept(int fd, std::string address);
  // A connection is up: open it, report it (listener side), replay its early completions.
  void OpenLocked(Conn* c, bool report);
  // rdma_cm (ZIPWIRE_IB_CM=rdmacm; verbs_cm.h does the connecting).
  Status ConnectCm(PeerId peer, const std::string& address);
  Result<verbs_cm::Hooks::Accepted> CmAccept(PeerId rank, uint32_t nqps, const std::string& address);
  void CmEstablished(Conn* c, ibv_mtu mtu);
  void CmFailed(Conn* c, const Status& st);
  // Progress (mu_ held).
  size_t ProgressLocked(bool flush_acks = false);
  void HandleWc(const ibv_wc& wc);
  void ProcessRecv(Conn* c, const uint8_t* buf, uint32_t len);
  void HandleWriteLocked(Conn* c, const Header& h, const uint8_t* payload);
  bool ApplyAck(Conn* c, uint64_t ack, bool stale_ok = false);
  // Mailbox (mu_ held).
  void OnEstablishedLocked(Conn* c);
  const uint64_t* MboxStamp(const Conn* c, uint64_t m) const;
  bool MboxReady(const Conn* c, uint64_t m) const;
  bool ProcessMboxRecord(Conn* c, const char* why);
  void OweAckLocked(Conn* c, bool counted);
  struct MboxWrite {
    const uint8_t* src;
    uint64_t length, key, offset;
    uint32_t imm;
  };
  bool PostMbox(Conn* c, const MboxWrite& w, uint64_t seq);
  bool PostMboxWrite(Conn* c, const MboxWrite& w, uint64_t context);
  // A host-to-host write of `length` bytes may go into the peer's mailbox now.
  // (The record carries 32 bits of offset: beyond 4 GiB a write goes eagerly.)
  bool MboxFits(const Conn* c, uint64_t length, uint64_t remote_offset) const {
    return length > 0 && remote_offset <= UINT32_MAX && c->peer_mbox &&
           MboxRecordBytes(length) <= std::min<size_t>(c->max_inline, kMboxSlotBytes) &&
           c->mbox_sent - c->mbox_freed < kMboxSlots;
  }
  void PumpLocked(Conn* c);
  bool PostCtrl(Conn* c, Header h);
  bool CanPostMessage(Conn* c, size_t n) const;
  bool PostMessage(Conn* c, Header h, const uint8_t* payload, size_t n);
  bool PostChain(Conn* c, Qp* q, ibv_send_wr* wrs, size_t n, Op* stripe, int32_t slot = -1);
  bool PostRecv(Conn* c, uint32_t slot);
  void CompleteOpLocked(Conn* c, const Op& op, Status st);
  // Ops are recycled, so a post allocates nothing once the pool is warm.
  std::unique_ptr<Op> NewOpLocked();
  void PopOpLocked(Conn* c);
  void FailLocked(Conn* c, const Status& st, bool emit_peer_error);
  Status PostFailedOrRefuse(Conn* c, uint8_t type, uint64_t context);
  Result<Conn*> PeerLocked(PeerId peer);
  void Push(Completion c);
  void WakePollers();
  void HelperLoop();

  BackendOptions options_;
  Capabilities caps_;
  std::atomic<PeerId> self_;
  uint32_t nqps_ = 1;
  uint64_t stripe_bytes_ = 1 << 20;
  std::chrono::microseconds spin_{50};
  std::chrono::microseconds idle_progress_{1000};
  bool mailbox_ = true;  // offer our mailboxes to peers (ZIPWIRE_IB_MAILBOX)

  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_comp_channel* channel_ = nullptr;
  ibv_cq* cq_ = nullptr;
  int cq_capacity_ = 0;
  int cq_reserved_ = 0;
  uint32_t gid_index_ = 0;
  ibv_gid gid_{};
  ibv_port_attr port_{};
  uint64_t max_msg_ = 0;
  uint32_t rd_atomic_ = 1;  // RDMA READs in flight per QP, both directions
  std::string device_name_;
  std::unique_ptr<RegistrationCache> reg_cache_;  // null: every RegisterMemory pins afresh

  std::mutex mu_;
  bool closed_ = false;
  // Poll hands these out in order; the ring allocates nothing in steady state.
  internal::CompletionRing completions_;
  std::unordered_map<uint64_t, Region> regions_;
  internal::LookupCache<std::unordered_map<uint64_t, Region>> region_cache_;  // in front of regions_
  Region* FindRegionLocked(uint64_t key) { return region_cache_.Find(regions_, key); }
  uint32_t next_serial_ = 1;
  std::vector<std::unique_ptr<Conn>> conns_;  // every connection made; freed at destruction
  std::unordered_map<PeerId, Conn*> by_peer_;
  // In front of by_peer_ for PeerLocked; forgotten wherever by_peer_ changes.
  internal::LookupCache<std::unordered_map<PeerId, Conn*>> peer_cache_;
  std::unordered_map<uint32_t, Qp*> qp_by_uid_;
  uint32_t next_qp_uid_ = 1;
  std::vector<Conn*> ack_dirty_;
  std::vector<Conn*> mbox_conns_;  // open connections whose peer may write our mailbox
  std::vector<std::unique_ptr<Op>> op_pool_;
  std::vector<ibv_sge> chain_sges_;  // scratch for WRITE chains; grows, never shrinks
  std::vector<ibv_send_wr> chain_wrs_;
  uint64_t progress_pass_ = 0;

  int listen_fd_ = -1;
  std::string listen_address_;
  int poll_wake_fd_ = -1;    // eventfd: completions pushed off the Poll path
  int helper_wake_fd_ = -1;  // eventfd: the helper's fd set changed / stop
  std::atomic<bool> stop_{false};
  std::thread helper_;
  std::atomic<uint64_t> activity_{0};        // bumped by every Poll and post
  std::atomic<int> pollers_{0};              // threads inside Poll (they make progress themselves)
  std::atomic<uint64_t> helper_fds_gen_{0};  // bumped when the helper's fd set changes
  std::mt19937 rng_{std::random_device{}()};
  std::unique_ptr<verbs_cm::Manager> cm_;  // set: QPs connect through rdma_cm, not the side channel
};

// ---------------------------------------------------------------------------
// Device and setup

Status VerbsBackend::Init(uint32_t nqps, uint64_t stripe_bytes, std::chrono::microseconds spin,
                          std::chrono::microseconds idle_progress, size_t reg_cache_entries, bool mailbox) {
  nqps_ = nqps;
  mailbox_ = mailbox;
  stripe_bytes_ = stripe_bytes;
  spin_ = spin;
  idle_progress_ = idle_progress;
  ZW_ASSIGN_OR_RETURN(std::string want, EnvString("IB_DEVICE", ""));
  ZW_ASSIGN_OR_RETURN(const verbs_cm::CmMode cm_mode, verbs_cm::CmModeFromEnv());
  // rdma_cm: the device is the one the listen address is on, unless named.
  if (cm_mode == verbs_cm::CmMode::kRdmaCm && want.empty())
    want = verbs_cm::DeviceForAddress(options_.listen_host);
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr || n == 0) {
    if (list) ibv_free_device_list(list);
    return Unavailable(
        "verbs: no RDMA device (ibv_get_device_list is empty; load a provider, e.g. "
        "`rdma link add rxe0 type rxe netdev eth0` for soft-RoCE)");
  }
  std::string seen;
  for (int i = 0; i < n && ctx_ == nullptr; ++i) {
    std::string name = ibv_get_device_name(list[i]);
    seen += (seen.empty() ? "" : ", ") + name;
    if (!want.empty() && name != want) continue;
    ibv_context* ctx = ibv_open_device(list[i]);
    if (ctx == nullptr) continue;
    ibv_port_attr pa{};
    if (ibv_query_port(ctx, kPort, &pa) != 0 || (want.empty() && pa.state != IBV_PORT_ACTIVE)) {
      ibv_close_device(ctx);
      continue;
    }
    ctx_ = ctx;
    port_ = pa;
    device_name_ = name;
  }
  ibv_free_device_list(list);
  if (ctx_ == nullptr) {
    return want.empty()
               ? Unavailable("verbs: no device with port 1 ACTIVE among: " + seen)
               : NotFound("verbs: ZIPWIRE_IB_DEVICE=" + want + " cannot be opened; devices: " + seen);
  }
  if (port_.state != IBV_PORT_ACTIVE) {
    return Unavailable("verbs: " + device_name_ + " port 1 is not ACTIVE (" +
                       ibv_port_state_str(port_.state) + ")");
  }
  max_msg_ = std::max<uint64_t>(port_.max_msg_sz, 4096);
  stripe_bytes_ = std::min(stripe_bytes_, max_msg_);

  auto env_gid = EnvUint("IB_GID_INDEX", UINT64_MAX);
  if (!env_gid.ok()) return env_gid.status();
  if (*env_gid != UINT64_MAX) {
    gid_index_ = static_cast<uint32_t>(*env_gid);
  } else if (port_.link_layer == IBV_LINK_LAYER_ETHERNET) {
    // RoCE v2 routes over UDP/IP; its IPv4-mapped GID is the one peers on an
    // IPv4 network can reach.
    int first_v2 = -1, mapped_v2 = -1;
    for (int i = 0; i < port_.gid_tbl_len && mapped_v2 < 0; ++i) {
      ibv_gid_entry e{};
      if (ibv_query_gid_ex(ctx_, kPort, static_cast<uint32_t>(i), &e, 0) != 0) continue;
      if (e.gid_type != IBV_GID_TYPE_ROCE_V2) continue;
      if (first_v2 < 0) first_v2 = i;
      static const uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
      if (std::memcmp(e.gid.raw, kMapped, 12) == 0) mapped_v2 = i;
    }
    gid_index_ = static_cast<uint32_t>(mapped_v2 >= 0 ? mapped_v2 : first_v2 >= 0 ? first_v2 : 0);
  }
  if (ibv_query_gid(ctx_, kPort, static_cast<int>(gid_index_), &gid_) != 0) {
    return InvalidArgument("verbs: " + device_name_ + " has no GID index " + std::to_string(gid_index_) +
                           " (ZIPWIRE_IB_GID_INDEX)");
  }
  pd_ = ibv_alloc_pd(ctx_);
  if (pd_ == nullptr) return IoError("verbs: ibv_alloc_pd failed: " + std::string(std::strerror(errno)));
  channel_ = ibv_create_comp_channel(ctx_);
  if (channel_ == nullptr)
    return IoError("verbs: ibv_create_comp_channel: " + std::string(std::strerror(errno)));
  fcntl(channel_->fd, F_SETFL, fcntl(channel_->fd, F_GETFL) | O_NONBLOCK);
  ibv_device_attr da{};
  if (ibv_query_device(ctx_, &da) != 0) return IoError("verbs: ibv_query_device failed");
  cq_capacity_ = std::min(da.max_cqe, 32768);
  rd_atomic_ = static_cast<uint32_t>(std::clamp(std::min(da.max_qp_rd_atom, da.max_qp_init_rd_atom), 1, 16));
  cq_ = ibv_create_cq(ctx_, cq_capacity_, nullptr, channel_, 0);
  if (cq_ == nullptr) return IoError("verbs: ibv_create_cq: " + std::string(std::strerror(errno)));
  cq_capacity_ = cq_->cqe;
  poll_wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  helper_wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (poll_wake_fd_ < 0 || helper_wake_fd_ < 0) return IoError("verbs: eventfd failed");
  // CUDA memory is offered where the driver loads (dlopen, so a machine
  // without one still runs everything else).
  if (CudaDriverAvailable().ok()) caps_.memory_kinds.push_back(MemoryKind::kCuda);
  if (reg_cache_entries > 0) {
    // The cache's staleness check reads page frame numbers; where they are
    // hidden, run without it rather than risk a stale registration.
    static const uint64_t probe = 1;
    auto frames = PageFrames(reinterpret_cast<uintptr_t>(&probe), sizeof(probe));
    if (frames.ok()) {
      reg_cache_ = std::make_unique<RegistrationCache>(reg_cache_entries);
    } else {
      ZW_LOG(kInfo, "verbs: registration cache off: " << frames.status().message());
    }
  }
  if (cm_mode == verbs_cm::CmMode::kRdmaCm) {
    verbs_cm::Hooks hooks;
    hooks.accept = [this](PeerId rank, uint32_t nqps, const std::string& address) {
      return CmAccept(rank, nqps, address);
    };
    hooks.established = [this](void* c, ibv_mtu mtu) { CmEstablished(static_cast<Conn*>(c), mtu); };
    hooks.failed = [this](void* c, const Status& st) { CmFailed(static_cast<Conn*>(c), st); };
    verbs_cm::QpTuning tuning;
    tuning.rd_atomic = static_cast<uint8_t>(rd_atomic_);
    ZW_ASSIGN_OR_RETURN(
        cm_, verbs_cm::Manager::Create(device_name_, kWireVersion, self_.load(), tuning, std::move(hooks)));
  }
  Touch();
  helper_ = std::thread([this] { HelperLoop(); });
  ZW_LOG(kDebug, "verbs: " << device_name_ << " gid[" << gid_index_ << "]=" << GidString(gid_.raw)
                           << " qps=" << nqps_ << " max_msg=" << max_msg_);
  return Status::Ok();
}

VerbsBackend::~VerbsBackend() {
  Close();
  cm_.reset();
  for (auto& c : conns_) DestroyConn(c.get());
  conns_.clear();  // releases the registrations queued operations held
  region_cache_.Forget();
  regions_.clear();
  if (reg_cache_) {
    const RegistrationCache::Stats st = reg_cache_->stats();
    ZW_LOG(kDebug, "verbs: registration cache: " << st.hits << " hits, " << st.misses << " misses, "
                                                 << st.stale << " stale, " << st.evictions << " evicted");
    reg_cache_.reset();  // deregisters what it held, before the PD goes
  }
  if (cq_) ibv_destroy_cq(cq_);
  if (channel_) ibv_destroy_comp_channel(channel_);
  if (pd_) ibv_dealloc_pd(pd_);
  if (ctx_) ibv_close_device(ctx_);
  if (poll_wake_fd_ >= 0) ::close(poll_wake_fd_);
  if (helper_wake_fd_ >= 0) ::close(helper_wake_fd_);
}

void VerbsBackend::DestroyConn(Conn* c) {
  for (auto& q : c->qps) {
    if (q->qp) ibv_destroy_qp(q->qp);
    q->qp = nullptr;
  }
  if (c->recv_mr) ibv_dereg_mr(c->recv_mr);
  if (c->send_mr) ibv_dereg_mr(c->send_mr);
  if (c->mbox_mr) ibv_dereg_mr(c->mbox_mr);
  c->recv_mr = c->send_mr = c->mbox_mr = nullptr;
  if (c->side_fd >= 0) ::close(c->side_fd);
  c->side_fd = -1;
}

Result<std::unique_ptr<Conn>> VerbsBackend::NewConn(PeerId peer, std::string address, uint32_t nqps) {
  auto c = std::make_unique<Conn>();
  c->peer = peer;
  c->address = std::move(address);
  const int need = static_cast<int>(kRecvDepth + nqps * kSendDepth);
  {
    std::lock_guard lk(mu_);
    if (cq_reserved_ + need > cq_capacity_) {
      return Status(StatusCode::kResourceExhausted,
                    "verbs: completion queue full (" + std::to_string(cq_capacity_) + " entries) for " +
                        c->Name() + "; too many peers or ZIPWIRE_IB_QPS too high");
    }
    cq_reserved_ += need;
  }
  c->recv_slab.assign(size_t{kRecvDepth} * kSlotBytes, 0);
  c->send_slab.assign(size_t{kSendSlots} * kSlotBytes, 0);
  for (uint32_t i = 0; i < kSendSlots; ++i) c->free_slots.push_back(kSendSlots - 1 - i);
  c->recv_mr = ibv_reg_mr(pd_, c->recv_slab.data(), c->recv_slab.size(), IBV_ACCESS_LOCAL_WRITE);
  c->send_mr = ibv_reg_mr(pd_, c->send_slab.data(), c->send_slab.size(), IBV_ACCESS_LOCAL_WRITE);
  c->mbox_mem.assign(kMboxSlots * kMboxSlotBytes / 8, 0);
  c->mbox_seq.assign(kMboxSlots, 0);
  c->mbox_mr = ibv_reg_mr(pd_, c->mbox_mem.data(), kMboxSlots * kMboxSlotBytes,
                          IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  auto fail = [&](const std::string& what) -> Status {
    Status st = IoError("verbs: " + what + " for " + c->Name() + ": " + std::strerror(errno));
    DestroyConn(c.get());
    std::lock_guard lk(mu_);
    cq_reserved_ -= need;
    return st;
  };
  if (!c->recv_mr || !c->send_mr || !c->mbox_mr) return fail("ibv_reg_mr of the message rings");
  for (uint32_t i = 0; i < nqps; ++i) {
    ibv_qp_init_attr ia{};
    ia.send_cq = cq_;
    ia.recv_cq = cq_;
    ia.qp_type = IBV_QPT_RC;
    ia.cap.max_send_wr = kSendDepth;
    ia.cap.max_recv_wr = i == 0 ? kRecvDepth : 1;
    ia.cap.max_send_sge = 1;
    ia.cap.max_recv_sge = 1;
    ibv_qp* qp = nullptr;
    // Ask for room to inline the 40-byte messages; take less if refused.
    for (uint32_t inl : {256u, 64u, 0u}) {
      ia.cap.max_inline_data = inl;
      qp = ibv_create_qp(pd_, &ia);
      if (qp) break;
    }
    if (!qp) return fail("ibv_create_qp");
    auto q = std::make_unique<Qp>();
    q->conn = c.get();
    q->qp = qp;
    {
      std::lock_guard lk(mu_);  // the helper thread and Connect both get here
      q->psn = rng_() & 0xffffff;
    }
    c->max_inline = ia.cap.max_inline_data;
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = kPort;
    a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
    c->qps.push_back(std::move(q));
    if (ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) != 0) {
      return fail("ibv_modify_qp(INIT)");
    }
  }
  {
    std::lock_guard lk(mu_);
    for (auto& q : c->qps) {
      q->uid = next_qp_uid_++;
      qp_by_uid_[q->uid] = q.get();
    }
    // Receives go up before the peer can send (it only learns our QPN after).
    for (uint32_t s = 0; s < kRecvDepth; ++s) {
      if (!PostRecv(c.get(), s)) {
        for (auto& q : c->qps) qp_by_uid_.erase(q->uid);
        cq_reserved_ -= need;
        Status st = IoError("verbs: ibv_post_recv for " + c->Name() + ": " + std::strerror(errno));
        DestroyConn(c.get());
        return st;
      }
    }
  }
  return c;
}

void VerbsBackend::FillHello(const Conn& c, Hello* h) const {
  h->rank = self_.load();
  h->nqps = static_cast<uint32_t>(c.qps.size());
  h->lid = port_.lid;
  h->mtu = port_.active_mtu;
  std::memcpy(h->gid, gid_.raw, 16);
  for (size_t i = 0; i < c.qps.size(); ++i) {
    h->qpn[i] = c.qps[i]->qp->qp_num;
    h->psn[i] = c.qps[i]->psn;
  }
}

Status VerbsBackend::ToRts(Conn* c, const Hello& r) {
  for (size_t i = 0; i < c->qps.size(); ++i) {
    Qp* q = c->qps[i].get();
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = static_cast<ibv_mtu>(std::min<uint32_t>(r.mtu, port_.active_mtu));
    c->mtu_bytes = 128u << a.path_mtu;  // IBV_MTU_256 = 1
    a.dest_qp_num = r.qpn[i];
    a.rq_psn = r.psn[i];
    a.max_dest_rd_atomic = static_cast<uint8_t>(rd_atomic_);
    a.min_rnr_timer = 12;  // 0.64 ms between RNR retries
    a.ah_attr.dlid = static_cast<uint16_t>(r.lid);
    a.ah_attr.port_num = kPort;
    static const uint8_t kZero[16] = {};
    if (port_.link_layer == IBV_LINK_LAYER_ETHERNET || std::memcmp(r.gid, kZero, 16) != 0) {
      a.ah_attr.is_global = 1;
      std::memcpy(a.ah_attr.grh.dgid.raw, r.gid, 16);
      a.ah_attr.grh.sgid_index = static_cast<uint8_t>(gid_index_);
      a.ah_attr.grh.hop_limit = 64;
    }
    if (ibv_modify_qp(q->qp, &a,
                      IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                          IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER) != 0) {
      return IoError("verbs: ibv_modify_qp(RTR) for " + c->Name() + " (remote gid " + GidString(r.gid) +
                     ", qpn " + std::to_string(r.qpn[i]) + "): " + std::strerror(errno));
    }
    ibv_qp_attr s{};
    s.qp_state = IBV_QPS_RTS;
    s.timeout = 14;  // 4.096 us * 2^14 = 67 ms per transport retry
    s.retry_cnt = 7;
    s.rnr_retry = 7;  // unbounded: RNR is our receive-side flow control
    s.sq_psn = q->psn;
    s.max_rd_atomic = static_cast<uint8_t>(rd_atomic_);
    if (ibv_modify_qp(q->qp, &s,
                      IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                          IBV_QP_MAX_QP_RD_ATOMIC) != 0) {
      return IoError("verbs: ibv_modify_qp(RTS) for " + c->Name() + ": " + std::strerror(errno));
    }
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Side channel

Result<std::string> VerbsBackend::Listen() {
  Touch();
  std::unique_lock lk(mu_);
  if (closed_) return Cancelled("verbs backend closed");
  if (listen_fd_ >= 0) return FailedPrecondition("verbs backend already listening on " + listen_address_);
  lk.unlock();
  if (cm_) return cm_->Listen(options_.listen_host, options_.listen_port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(options_.listen_port);
  std::string where = options_.listen_host + ":" + port;
  if (int rc = getaddrinfo(options_.listen_host.c_str(), port.c_str(), &hints, &res); rc != 0 || !res) {
    return Unavailable("cannot resolve listen host '" + options_.listen_host + "': " + gai_strerror(rc));
  }
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int one = 1;
  if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || ::bind(fd, res->ai_addr, res->ai_addrlen) != 0 || ::listen(fd, 128) != 0) {
    std::string err = std::strerror(errno);
    if (fd >= 0) ::close(fd);
    freeaddrinfo(res);
    return Unavailable("cannot listen on " + where + ": " + err);
  }
  freeaddrinfo(res);
  sockaddr_storage ss{};
  socklen_t sl = sizeof(ss);
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl);
  uint16_t bound = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                                  : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  lk.lock();
  listen_fd_ = fd;
  listen_address_ = options_.listen_host + ":" + std::to_string(bound);
  helper_fds_gen_.fetch_add(1);
  lk.unlock();
  uint64_t one64 = 1;
  [[maybe_unused]] ssize_t w = ::write(helper_wake_fd_, &one64, 8);
  return listen_address_;
}

// Runs on the helper thread for each accepted side-channel connection.
void VerbsBackend::HandleAccept(int fd, std::string address) {
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  uint8_t buf[kHelloBytes];
  Hello in;
  std::string bad = IoAll(fd, buf, kHelloBytes, false, deadline);
  if (bad.empty()) bad = DecodeHello(buf, &in);
  const PeerId self = self_.load();
  if (bad.empty() && (in.rank == kInvalidPeer || in.rank == self))
    bad = "invalid rank " + std::to_string(in.rank);
  if (!bad.empty()) {
    ZW_LOG(kWarn, "verbs: dropping side-channel connection from " << address << ": " << bad);
    ::close(fd);
    return;
  }
  auto refuse = [&](const std::string& why) {
    ZW_LOG(kWarn, "verbs: refusing rank " << in.rank << " from " << address << ": " << why);
    Hello r;
    r.status = 1;
    r.rank = self;
    r.nqps = 1;
    r.mtu = IBV_MTU_1024;
    r.reason = why;
    EncodeHello(r, buf);
    IoAll(fd, buf, kHelloBytes, true, deadline);
    ::close(fd);
  };
  std::string dup;
  {
    std::lock_guard lk(mu_);
    if (closed_) {
      ::close(fd);
      return;
    }
    auto it = by_peer_.find(in.rank);
    if (it != by_peer_.end() && it->second->open) {
      dup = "duplicate rank " + std::to_string(in.rank) + " (already connected via " + it->second->address +
            ")";
    }
  }
  if (!dup.empty()) return refuse(dup);
  auto made = NewConn(in.rank, address, in.nqps);
  if (!made.ok()) return refuse(made.status().message());
  std::unique_ptr<Conn> c = std::move(made).value();
  Status st = ToRts(c.get(), in);
  if (!st.ok()) {
    refuse(st.message());
    std::lock_guard lk(mu_);
    for (auto& q : c->qps) qp_by_uid_.erase(q->uid);
    DestroyConn(c.get());
    conns_.push_back(std::move(c));  // keep: the CQ may still name its QPs
    return;
  }
  Hello out;
  FillHello(*c, &out);
  EncodeHello(out, buf);
  uint8_t ready = 0;
  std::string err = IoAll(fd, buf, kHelloBytes, true, deadline);
  if (err.empty()) err = IoAll(fd, &ready, 1, false, deadline);
  if (err.empty() && ready != 'R') err = "bad READY byte";
  std::lock_guard lk(mu_);
  if (!err.empty() || closed_) {
    if (!err.empty())
      ZW_LOG(kWarn, "verbs: handshake with rank " << in.rank << " from " << address << ": " << err);
    ::close(fd);
    for (auto& q : c->qps) qp_by_uid_.erase(q->uid);
    DestroyConn(c.get());
    conns_.push_back(std::move(c));
    return;
  }
  auto it = by_peer_.find(in.rank);
  if (it != by_peer_.end() && it->second->open) {  // lost a race with another hello
    ::close(fd);
    FailLocked(c.get(), PeerClosed("duplicate rank"), false);
    conns_.push_back(std::move(c));
    return;
  }
  c->side_fd = fd;
  conns_.push_back(std::move(c));
  OpenLocked(conns_.back().get(), /*report=*/true);
}

void VerbsBackend::OpenLocked(Conn* c, bool report) {
  c->established = c->open = true;
  by_peer_[c->peer] = c;
  peer_cache_.Forget();
  OnEstablishedLocked(c);  // our mailbox offer is the first message on the connection
  if (report) {
    Completion up;
    up.type = CompletionType::kPeerConnected;
    up.peer = c->peer;
    Push(std::move(up));
  }
  for (const ibv_wc& wc : std::exchange(c->early, {})) HandleWc(wc);
}

Status VerbsBackend::Connect(PeerId peer, const std::string& address) {
  Touch();
  const PeerId self = self_.load();
  if (self == kInvalidPeer) return FailedPrecondition("Connect: call SetLocalRank first");
  if (peer == kInvalidPeer || peer == self)
    return InvalidArgument("Connect: invalid peer rank " + std::to_string(peer));
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("verbs backend closed");
    auto it = by_peer_.find(peer);
    if (it != by_peer_.end() && it->second->open) {
      return Status(StatusCode::kAlreadyExists,
                    "peer " + std::to_string(peer) + " is already connected (" + it->second->address + ")");
    }
  }
  if (cm_) return ConnectCm(peer, address);
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return InvalidArgument("Connect: address '" + address + "' is not host:port");
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  std::string port = address.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0 || !res) {
    return Unavailable("cannot resolve peer " + std::to_string(peer) + " address " + address + ": " +
                       gai_strerror(rc));
  }
  std::vector<uint8_t> sa(reinterpret_cast<uint8_t*>(res->ai_addr),
                          reinterpret_cast<uint8_t*>(res->ai_addr) + res->ai_addrlen);
  const int family = res->ai_family;
  freeaddrinfo(res);

  const auto deadline = Clock::now() + options_.connect_timeout;
  int fd = -1;
  std::string last_error = "timed out";
  while (true) {
    if (stop_.load()) return Cancelled("verbs backend closed");
    fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return IoError("socket: " + std::string(std::strerror(errno)));
    int rc = ::connect(fd, reinterpret_cast<sockaddr*>(sa.data()), static_cast<socklen_t>(sa.size()));
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      err = ETIMEDOUT;
      if (WaitFd(fd, POLLOUT, std::min(deadline, Clock::now() + std::chrono::milliseconds(100)))) {
        socklen_t len = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      }
    }
    if (err == 0) break;
    ::close(fd);
    fd = -1;
    last_error = std::strerror(err);
    const bool retry = err == ECONNREFUSED || err == ETIMEDOUT || err == ECONNRESET || err == EAGAIN ||
                       err == ECONNABORTED || err == EINTR;
    if (!retry || Clock::now() >= deadline) {
      return Unavailable("cannot connect to peer " + std::to_string(peer) + " at " + address + " within " +
                         std::to_string(options_.connect_timeout.count()) + " ms: " + last_error);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

  auto made = NewConn(peer, address, nqps_);
  if (!made.ok()) {
    ::close(fd);
    return made.status();
  }
  std::unique_ptr<Conn> c = std::move(made).value();
  // The handshake gets at least a second even when connecting used up the budget.
  const auto hs_deadline = std::max(deadline, Clock::now() + std::chrono::seconds(1));
  uint8_t buf[kHelloBytes];
  Hello out, in;
  FillHello(*c, &out);
  EncodeHello(out, buf);
  std::string err = IoAll(fd, buf, kHelloBytes, true, hs_deadline);
  if (err.empty()) err = IoAll(fd, buf, kHelloBytes, false, hs_deadline);
  if (err.empty()) err = DecodeHello(buf, &in);
  Status st;
  if (!err.empty()) {
    st = Unavailable("handshake with peer " + std::to_string(peer) + " at " + address + " failed: " + err);
  } else if (in.status != 0) {
    // Refused (e.g. duplicate rank): like a peer that hangs up right after
    // accepting, the refusal surfaces as kPeerClosed on what is posted to it.
    ::close(fd);
    std::lock_guard lk(mu_);
    FailLocked(c.get(), PeerClosed(c->Name() + " refused the connection: " + in.reason), true);
    by_peer_[peer] = c.get();
    peer_cache_.Forget();
    conns_.push_back(std::move(c));
    return Status::Ok();
  } else if (in.rank != peer) {
    st = InvalidArgument("peer at " + address + " is rank " + std::to_string(in.rank) + ", not " +
                         std::to_string(peer));
  } else if (in.nqps != c->qps.size()) {
    st = Internal("peer " + std::to_string(peer) + " answered with " + std::to_string(in.nqps) + " QPs");
  } else {
    st = ToRts(c.get(), in);
  }
  if (st.ok()) {
    uint8_t ready = 'R';
    err = IoAll(fd, &ready, 1, true, hs_deadline);
    if (!err.empty())
      st = Unavailable("handshake with peer " + std::to_string(peer) + " at " + address + ": " + err);
  }
  std::lock_guard lk(mu_);
  if (st.ok() && closed_) st = Cancelled("verbs backend closed");
  if (!st.ok()) {
    ::close(fd);
    for (auto& q : c->qps) qp_by_uid_.erase(q->uid);
    DestroyConn(c.get());
    conns_.push_back(std::move(c));
    return st;
  }
  c->side_fd = fd;
  conns_.push_back(std::move(c));
  OpenLocked(conns_.back().get(), /*report=*/false);
  helper_fds_gen_.fetch_add(1);
  uint64_t one64 = 1;
  [[maybe_unused]] ssize_t w = ::write(helper_wake_fd_, &one64, 8);
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// rdma_cm (verbs_cm.h): the same Conn and QPs, connected by the manager.

Status VerbsBackend::ConnectCm(PeerId peer, const std::string& address) {
  const auto deadline = Clock::now() + options_.connect_timeout;
  ZW_ASSIGN_OR_RETURN(std::unique_ptr<Conn> c, NewConn(peer, address, nqps_));
  std::vector<ibv_qp*> qps;
  for (auto& q : c->qps) qps.push_back(q->qp);
  auto made = cm_->Connect(c.get(), peer, address, qps, deadline);
  std::lock_guard lk(mu_);
  if (made.ok() && made->refused.empty() && closed_) {
    cm_->Disconnect(c.get());
    made = Cancelled("verbs backend closed");
  }
  if (!made.ok()) {
    for (auto& q : c->qps) qp_by_uid_.erase(q->uid);
    DestroyConn(c.get());
    conns_.push_back(std::move(c));  // keep: the CQ may still name its QPs
    return made.status();
  }
  if (!made->refused.empty()) {
    // As on the socket path: the refusal surfaces as kPeerClosed.
    FailLocked(c.get(), PeerClosed(c->Name() + " refused the connection: " + made->refused), true);
    by_peer_[peer] = c.get();
    peer_cache_.Forget();
    conns_.push_back(std::move(c));
    return Status::Ok();
  }
  c->mtu_bytes = 128u << made->mtu;  // IBV_MTU_256 = 1
  conns_.push_back(std::move(c));
  OpenLocked(conns_.back().get(), /*report=*/false);
  return Status::Ok();
}

// The manager's thread, for a peer's connect request: a Conn, pending
// (neither open nor established) until every QP is connected.
Result<verbs_cm::Hooks::Accepted> VerbsBackend::CmAccept(PeerId rank, uint32_t nqps,
                                                         const std::string& address) {
  if (nqps == 0 || nqps > kVerbsMaxQps) return InvalidArgument("bad QP count " + std::to_string(nqps));
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("verbs backend closed");
    auto it = by_peer_.find(rank);
    if (it != by_peer_.end() && it->second->open) {
      return Status(StatusCode::kAlreadyExists, "duplicate rank " + std::to_string(rank) +
                                                    " (already connected via " + it->second->address + ")");
    }
  }
  ZW_ASSIGN_OR_RETURN(std::unique_ptr<Conn> c, NewConn(rank, address, nqps));
  verbs_cm::Hooks::Accepted out;
  out.token = c.get();
  for (auto& q : c->qps) out.qps.push_back(q->qp);
  std::lock_guard lk(mu_);
  conns_.push_back(std::move(c));
  return out;
}

void VerbsBackend::CmEstablished(Conn* c, ibv_mtu mtu) {
  {
    std::lock_guard lk(mu_);
    auto it = by_peer_.find(c->peer);
    if (closed_ || (it != by_peer_.end() && it->second->open)) {  // closing, or lost a duplicate race
      FailLocked(c, closed_ ? Cancelled("verbs backend closed") : PeerClosed("duplicate rank"), false);
      return;
    }
    c->mtu_bytes = 128u << mtu;
    OpenLocked(c, /*report=*/true);
  }
  WakePollers();
}

// A disconnect (the peer closed or died) or a failed setup: like EOF on the
// socket path's side channel.
void VerbsBackend::CmFailed(Conn* c, const Status& st) {
  {
    std::lock_guard lk(mu_);
    if (!c->established) {  // never reported: release it quietly
      ZW_LOG(kWarn, "verbs: " << c->Name() << " " << st.message());
      for (auto& q : c->qps) qp_by_uid_.erase(q->uid);
      DestroyConn(c);
      c->established = true;
      return;
    }
    ProgressLocked();  // anything in the CQ from this peer (acks above all) counts first
    if (c->open) FailLocked(c, PeerClosed(c->Name() + " " + st.message()), true);
  }
  WakePollers();
}

// ---------------------------------------------------------------------------
// Registration

// Registrations allow remote reads too (PostRead).
constexpr int kRegAccess = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;

Result<std::shared_ptr<ibv_mr>> VerbsBackend::RegisterHost(void* addr, size_t length) {
  ibv_mr* raw = ibv_reg_mr(pd_, addr, length, kRegAccess);
  if (raw == nullptr) {
    int err = errno;
    if (err == ENOMEM || err == EAGAIN || err == EPERM) {
      rlimit rl{};
      getrlimit(RLIMIT_MEMLOCK, &rl);
      std::string lim =
          rl.rlim_cur == RLIM_INFINITY ? "unlimited" : std::to_string(rl.rlim_cur >> 10) + " KiB";
      return Status(StatusCode::kResourceExhausted,
                    "verbs: cannot register " + std::to_string(length) + " bytes (" + std::strerror(err) +
                        "): RDMA pins memory and the locked-memory limit (ulimit -l) is " + lim +
                        "; raise it with `ulimit -l unlimited` or a `* - memlock unlimited` line in "
                        "/etc/security/limits.conf (LimitMEMLOCK= for systemd services)");
    }
    return IoError("verbs: ibv_reg_mr of " + std::to_string(length) + " bytes failed: " + std::strerror(err));
  }
  return std::shared_ptr<ibv_mr>(raw, [](ibv_mr* m) { ibv_dereg_mr(m); });
}

// GPUDirect RDMA: a dma-buf from the driver first, then the device pointer
// itself (nvidia-peermem); when both fail, one status says why each did.
Result<std::shared_ptr<ibv_mr>> VerbsBackend::RegisterCuda(void* addr, size_t length) {
  if (Status st = CudaDriverAvailable(); !st.ok()) {
    return NotSupported("verbs: cannot register " + std::to_string(length) +
                        " bytes of CUDA memory: " + st.message());
  }
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  std::string dmabuf_why;
  auto dmabuf = CudaExportDmabuf(a, length);
  if (dmabuf.ok()) {
    ibv_mr* raw =
        ibv_reg_dmabuf_mr(pd_, dmabuf->offset, dmabuf->length, dmabuf->iova, dmabuf->fd, kRegAccess);
    const int err = errno;
    ::close(dmabuf->fd);  // the registration holds its own reference
    if (raw) return std::shared_ptr<ibv_mr>(raw, [](ibv_mr* m) { ibv_dereg_mr(m); });
    dmabuf_why = std::string("ibv_reg_dmabuf_mr failed: ") + std::strerror(err);
  } else {
    dmabuf_why = dmabuf.status().message();
  }
  ibv_mr* raw = ibv_reg_mr(pd_, addr, length, kRegAccess);
  if (raw) return std::shared_ptr<ibv_mr>(raw, [](ibv_mr* m) { ibv_dereg_mr(m); });
  const int err = errno;
  char where[32];
  std::snprintf(where, sizeof(where), "%#llx", static_cast<unsigned long long>(a));
  return Unavailable("verbs: cannot register " + std::to_string(length) + " bytes of CUDA memory at " +
                     where + " on " + device_name_ + ": dma-buf path: " + dmabuf_why +
                     "; peer-memory path (ibv_reg_mr on the device pointer, needs the nvidia_peermem "
                     "module): " +
                     std::strerror(err));
}

Result<MemoryRegion> VerbsBackend::RegisterMemory(void* addr, size_t length, MemoryKind kind) {
  if (kind != MemoryKind::kHost && kind != MemoryKind::kCuda) {
    return NotSupported(std::string("verbs backend: unsupported memory kind ") + MemoryKindName(kind));
  }
  if (addr == nullptr || length == 0) return InvalidArgument("RegisterMemory: null address or zero length");
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("verbs backend closed");
  }
  std::shared_ptr<ibv_mr> mr;
  if (kind == MemoryKind::kCuda) {
    ZW_ASSIGN_OR_RETURN(mr, RegisterCuda(addr, length));
  } else if (!reg_cache_) {
    ZW_ASSIGN_OR_RETURN(mr, RegisterHost(addr, length));
  } else {
    const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
    constexpr uintptr_t kPage = 4096;
    auto now = PageFrames(a, length);
    if (now.ok()) {
      // A hit only where the range still maps the very pages the cached
      // registration pinned (see registration_cache.h).
      auto hit = reg_cache_->Find(a, length, static_cast<uint32_t>(kind),
                                  [&](const RegistrationCache::Entry& e, uintptr_t x, size_t) {
                                    const size_t first = x / kPage - e.begin / kPage;
                                    return first + now->size() <= e.identity.size() &&
                                           std::equal(now->begin(), now->end(), e.identity.begin() + first);
                                  });
      if (hit) mr = std::shared_ptr<ibv_mr>(hit->handle, static_cast<ibv_mr*>(hit->handle.get()));
    }
    if (!mr) {
      ZW_ASSIGN_OR_RETURN(mr, RegisterHost(addr, length));
      auto pinned = PageFrames(a, length);  // after pinning every page is present
      if (pinned.ok() && std::find(pinned->begin(), pinned->end(), 0) == pinned->end()) {
        RegistrationCache::Entry e;
        e.begin = a;
        e.length = length;
        e.kind = static_cast<uint32_t>(kind);
        e.handle = mr;
        e.identity = std::move(*pinned);
        reg_cache_->Insert(std::move(e));
      }
    }
  }
  std::lock_guard lk(mu_);
  MemoryRegion r{addr, length, kind, (uint64_t{next_serial_++} << 32) | mr->rkey};
  regions_.emplace(r.key, Region{r, std::move(mr)});
  return r;
}

Status VerbsBackend::DeregisterMemory(const MemoryRegion& region) {
  std::shared_ptr<ibv_mr> mr;  // the last reference (if no op holds one) deregisters, outside mu_
  {
    std::lock_guard lk(mu_);
    auto it = regions_.find(region.key);
    if (it == regions_.end() || it->second.region.addr != region.addr) {
      return NotFound("DeregisterMemory: key " + std::to_string(region.key) + " is not a live registration");
    }
    mr = std::move(it->second.mr);
    region_cache_.Forget(&it->second);
    regions_.erase(it);
    // Peers drop the key from their bounds caches.
    for (auto& [peer, c] : by_peer_) {
      if (!c->open) continue;
      Header h;
      h.type = kUnreg;
      h.key = region.key;
      c->ctrl_q.push_back(h);
      PumpLocked(c);
    }
  }
  if (reg_cache_) {
    mr.reset();
    reg_cache_->Trim();  // the entry may just have become evictable
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Posting

Result<Conn*> VerbsBackend::PeerLocked(PeerId peer) {
  if (closed_) return Cancelled("verbs backend closed");
  Conn** c = peer_cache_.Find(by_peer_, peer);
  if (c == nullptr) return FailedPrecondition("peer " + std::to_string(peer) + " is not connected");
  return *c;
}

// A post to a failed connection: until the application has seen the peer's
// kPeerError it completes with the failure (as if posted just before it);
// afterwards it is refused at once.
Status VerbsBackend::PostFailedOrRefuse(Conn* c, uint8_t type, uint64_t context) {
  if (c->error_delivered) return c->failure;
  WakePollers();
  Completion done;
  done.type = type == kMeta   ? CompletionType::kWriteDone
              : type == kRead ? CompletionType::kReadDone
                              : CompletionType::kSendDone;
  done.status = c->failure;
  done.peer = c->peer;
  done.context = context;
  Push(std::move(done));
  return Status::Ok();
}

Status VerbsBackend::PostWrite(PeerId peer, const MemoryRegion& local, uint64_t local_offset,
                               const RemoteRegion& remote, uint64_t remote_offset, uint64_t length,
                               uint32_t imm, uint64_t context) {
  ZW_RETURN_IF_ERROR(internal::CheckRemoteRange("PostWrite", remote, remote_offset, length));
  ZW_RETURN_IF_ERROR(internal::CheckPostLength("PostWrite", length, kVerbsMaxWriteBytes));
  Touch();
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("verbs backend closed");
  Region* reg = FindRegionLocked(local.key);
  ZW_RETURN_IF_ERROR(internal::CheckLocalRange(
      "PostWrite", local,
      reg != nullptr && reg->region.addr == local.addr && reg->region.length == local.length, local_offset,
      length));
  ZW_ASSIGN_OR_RETURN(Conn * c, PeerLocked(peer));
  if (!c->open) return PostFailedOrRefuse(c, kMeta, context);
  const uint8_t* src = static_cast<const uint8_t*>(local.addr) + local_offset;
  if (c->data_q.empty() && c->ctrl_q.empty() && local.kind == MemoryKind::kHost &&
      MboxFits(c, length, remote_offset) && c->qps[0]->Free() >= 1) {
    // The latency path: nothing queued ahead, the key's bounds known, host
    // memory at the target: straight into the mailbox, no Op.
    RemoteInfo* info = c->last_remote;
    if (info == nullptr || c->last_remote_key != remote.key) {
      auto it = c->remote.find(remote.key);
      info = it == c->remote.end() ? nullptr : &it->second;
      if (info != nullptr) {
        c->last_remote_key = remote.key;
        c->last_remote = info;
      }
    }
    if (info != nullptr && info->state == RemoteInfo::kLive && info->host &&
        RangeInside(remote_offset, length, info->length)) {
      if (!PostMboxWrite(c, MboxWrite{src, length, remote.key, remote_offset, imm}, context)) {
        return PostFailedOrRefuse(c, kMeta, context);  // the connection failed under us
      }
      return Status::Ok();
    }
  }
  std::unique_ptr<Op> op = NewOpLocked();
  op->type = kMeta;
  op->context = context;
  op->local = src;
  op->mr = reg->mr;
  op->length = length;
  op->key = remote.key;
  op->remote_offset = remote_offset;
  op->imm = imm;
  op->local_host = local.kind == MemoryKind::kHost;
  const size_t before = completions_.size();
  c->data_q.push_back(std::move(op));
  PumpLocked(c);
  if (completions_.size() != before) WakePollers();  // a local refusal or a failure
  return Status::Ok();
}

// RDMA READ: the same checks as PostWrite (the remote key's true bounds are
// learnt by QUERY first, since a read outside them would break the
// connection); no target involvement after that, kReadDone from the read's
// own completion.
Status VerbsBackend::PostRead(PeerId peer, const MemoryRegion& local, uint64_t local_offset,
                              const RemoteRegion& remote, uint64_t remote_offset, uint64_t length,
                              uint64_t context) {
  ZW_RETURN_IF_ERROR(internal::CheckRemoteRange("PostRead", remote, remote_offset, length));
  ZW_RETURN_IF_ERROR(internal::CheckPostLength("PostRead", length, kVerbsMaxWriteBytes));
  Touch();
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("verbs backend closed");
  auto reg = regions_.find(local.key);
  ZW_RETURN_IF_ERROR(internal::CheckLocalRange("PostRead", local,
                                               reg != regions_.end() &&
                                                   reg->second.region.addr == local.addr &&
                                                   reg->second.region.length == local.length,
                                               local_offset, length));
  ZW_ASSIGN_OR_RETURN(Conn * c, PeerLocked(peer));
  if (!c->open) return PostFailedOrRefuse(c, kRead, context);
  std::unique_ptr<Op> op = NewOpLocked();
  op->type = kRead;
  op->context = context;
  op->local = static_cast<const uint8_t*>(local.addr) + local_offset;
  op->mr = reg->second.mr;
  op->length = length;
  op->key = remote.key;
  op->remote_offset = remote_offset;
  const size_t before = completions_.size();
  c->data_q.push_back(std::move(op));
  PumpLocked(c);
  if (completions_.size() != before) WakePollers();
  return Status::Ok();
}

Status VerbsBackend::PostSend(PeerId peer, std::span<const uint8_t> message, uint64_t context) {
  if (message.size() > kVerbsMaxControlBytes) {
    return InvalidArgument("PostSend of " + std::to_string(message.size()) +
                           " bytes exceeds max_control_bytes " + std::to_string(kVerbsMaxControlBytes));
  }
  Touch();
  std::lock_guard lk(mu_);
  ZW_ASSIGN_OR_RETURN(Conn * c, PeerLocked(peer));
  if (!c->open) return PostFailedOrRefuse(c, kSend, context);
  std::unique_ptr<Op> op = NewOpLocked();
  op->type = kSend;
  op->context = context;
  op->payload.assign(message.begin(), message.end());
  const size_t before = completions_.size();
  c->data_q.push_back(std::move(op));
  PumpLocked(c);
  if (completions_.size() != before) WakePollers();  // a local refusal or a failure
  return Status::Ok();
}

// Posts n chained WRs on q. Every kSignalEvery-th WR is signalled (its
// completion frees send-queue room for all before it), as are stripes and
// the WR that uses a send slot (the last one when slot >= 0).
bool VerbsBackend::PostChain(Conn* c, Qp* q, ibv_send_wr* wrs, size_t n, Op* stripe, int32_t slot) {
  for (size_t i = 0; i < n; ++i) {
    const uint64_t w = q->posted + i;
    wrs[i].wr_id = (uint64_t{q->uid} << 32) | (w & 0xffffffffu);
    wrs[i].next = i + 1 < n ? &wrs[i + 1] : nullptr;
    const int32_t s = i + 1 == n ? slot : -1;
    if (stripe != nullptr || s >= 0 || (w + 1) % kSignalEvery == 0) {
      wrs[i].send_flags |= IBV_SEND_SIGNALED;
      q->signaled.push_back(Signaled{w, stripe, s});
    }
  }
  ibv_send_wr* bad = nullptr;
  if (int rc = ibv_post_send(q->qp, wrs, &bad); rc != 0) {
    FailLocked(c, IoError(c->Name() + ": ibv_post_send failed: " + std::strerror(rc)), true);
    return false;
  }
  q->posted += n;
  return true;
}

bool VerbsBackend::CanPostMessage(Conn* c, size_t n) const {
  return c->qps[0]->Free() >= 1 && (kHeaderBytes + n <= c->max_inline || !c->free_slots.empty());
}

// A header (+ payload) as a SEND on QP 0 (check CanPostMessage first):
// inline when it fits (the provider copies it at post), else from a send
// slot that comes back with the WR's completion.
bool VerbsBackend::PostMessage(Conn* c, Header h, const uint8_t* payload, size_t n) {
  Qp* q = c->qps[0].get();
  const bool inl = kHeaderBytes + n <= c->max_inline;
  uint8_t stack[512];
  int32_t slot = -1;
  uint8_t* buf = stack;
  if (!inl || kHeaderBytes + n > sizeof(stack)) {
    slot = static_cast<int32_t>(c->free_slots.back());
    c->free_slots.pop_back();
    buf = c->send_slab.data() + size_t(slot) * kSlotBytes;
  }
  h.ack = c->rx_seq;
  c->ack_sent = c->rx_seq;
  EncodeHeader(h, buf);
  if (n) std::memcpy(buf + kHeaderBytes, payload, n);
  ibv_sge sge{reinterpret_cast<uint64_t>(buf), static_cast<uint32_t>(kHeaderBytes + n), c->send_mr->lkey};
  ibv_send_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  if (inl) wr.send_flags = IBV_SEND_INLINE;
  return PostChain(c, q, &wr, 1, nullptr, slot);
}

bool VerbsBackend::PostCtrl(Conn* c, Header h) { return PostMessage(c, h, nullptr, 0); }

// A small host-to-host write as one record in the peer's mailbox: an inline
// RDMA WRITE on QP 0, so RC orders it with the SENDs around it (check
// q0->Free() and the mailbox's room first). Where the peer sent us something
// in this or the previous progress pass it is busy-polling and finds the
// record in memory; otherwise it may be asleep on its completion channel, so
// the record goes as a WRITE WITH IMM (the immediate names the record), whose
// receive completion wakes it: a doorbell.
bool VerbsBackend::PostMbox(Conn* c, const MboxWrite& w, uint64_t seq) {
  const uint64_t m = c->mbox_sent + 1;
  const size_t bytes = MboxRecordBytes(w.length);
  const size_t padded = bytes - kMboxOverhead;
  // [payload, zero-padded to 8 | header | stamp m], written so that it ends
  // at the slot's end: the target polls one fixed word per slot. Header:
  // [0,2) sequence tag, [2] length, [3] type (kEager), [4,8) imm, [8,12) our
  // cumulative ack's low 32 bits (the target widens it against the acks it
  // has), [12,16) offset, [16,24) key. 40 bytes for an 8-byte write, where the
  // general 40-byte header and two stamps made 64: under soft-RoCE every
  // byte of an inline write costs (ib_write_lat: 8 B 12.0 us, 64 B 12.8 us).
  alignas(8) uint8_t rec[kMboxSlotBytes];
  std::memcpy(rec, w.src, w.length);
  if (padded != w.length) std::memset(rec + w.length, 0, padded - w.length);
  uint8_t* hd = rec + padded;
  Header h;
  h.type = kEager;
  h.reserved = static_cast<uint16_t>(seq);
  h.imm = w.imm;
  h.ack = c->rx_seq;
  h.key = w.key;
  h.offset = w.offset;
  h.length = w.length;
  EncodeMboxHeader(h, hd);
  PutLE<uint64_t>(hd + kMboxHeaderBytes, m);
  c->ack_sent = c->rx_seq;
  ibv_sge sge{reinterpret_cast<uint64_t>(rec), static_cast<uint32_t>(bytes), c->send_mr->lkey};
  ibv_send_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.send_flags = IBV_SEND_INLINE;
  wr.wr.rdma.remote_addr = c->peer_mbox_addr + (m % kMboxSlots + 1) * kMboxSlotBytes - bytes;
  wr.wr.rdma.rkey = c->peer_mbox_rkey;
  const bool peer_polling = c->last_rx_pass != 0 && progress_pass_ - c->last_rx_pass <= 1;
  if (peer_polling) {
    wr.opcode = IBV_WR_RDMA_WRITE;
  } else {
    wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
    wr.imm_data = htonl(static_cast<uint32_t>(m));
  }
  if (!PostChain(c, c->qps[0].get(), &wr, 1, nullptr)) return false;
  c->mbox_seq[m % kMboxSlots] = seq;
  c->mbox_sent = m;
  return true;
}

// A write as the next record in the peer's mailbox (MboxFits and QP 0 room
// checked): numbered, and kept until the peer acknowledges it.
bool VerbsBackend::PostMboxWrite(Conn* c, const MboxWrite& w, uint64_t context) {
  const uint64_t seq = c->next_seq;
  if (!PostMbox(c, w, seq)) return false;
  ++c->next_seq;
  c->last_eager_seq = seq;
  // The bytes were copied at post: the source registration is not needed.
  c->unacked.push_back(Unacked{seq, kMeta, context, w.key, w.offset, w.length, nullptr});
  return true;
}

// Once a connection is up: tell the peer where our mailbox is.
void VerbsBackend::OnEstablishedLocked(Conn* c) {
  if (!mailbox_) return;  // the peer then sends small writes as eager SENDs
  Header h;
  h.type = kMbox;
  h.key = c->mbox_mr->rkey;
  h.offset = reinterpret_cast<uint64_t>(c->mbox_mem.data());
  h.length = kMboxSlots;
  c->ctrl_q.push_back(h);
  PumpLocked(c);
  mbox_conns_.push_back(c);
}

// Record m's stamp: the last word of slot m % kMboxSlots.
const uint64_t* VerbsBackend::MboxStamp(const Conn* c, uint64_t m) const {
  return c->mbox_mem.data() + ((m % kMboxSlots + 1) * kMboxSlotBytes - 8) / 8;
}

// Record m is complete in memory: its stamp reads m (the slot's previous
// record had m - kMboxSlots). The stamp is the record's last word, placed
// last (the provider writes an inline WRITE's bytes in order, as
// ib_write_lat's polling on a buffer's last byte relies on); the acquire load
// orders the reads of the record after it.
bool VerbsBackend::MboxReady(const Conn* c, uint64_t m) const {
  return le64toh(__atomic_load_n(MboxStamp(c, m), __ATOMIC_ACQUIRE)) == m;
}

// Processes the next mailbox record if it is complete; false if it is not.
// Callers know it must be there (an earlier RC message) or saw it complete.
bool VerbsBackend::ProcessMboxRecord(Conn* c, const char* why) {
  const uint64_t m = c->mbox_next;
  if (!MboxReady(c, m)) return false;
  const uint8_t* hd = reinterpret_cast<const uint8_t*>(MboxStamp(c, m)) - kMboxHeaderBytes;
  const Header h = DecodeMboxHeader(hd, c->peer_acked);
  ++c->mbox_next;
  c->last_rx_pass = progress_pass_;
  if (h.type != kEager || h.length == 0 || h.length > kMboxMaxPayload) {
    FailLocked(c, IoError(c->Name() + " sent a malformed mailbox record"), true);
    return true;
  }
  if (h.reserved != static_cast<uint16_t>(c->rx_seq + 1)) {
    FailLocked(c,
               IoError(c->Name() + " sent a malformed message: mailbox record " + std::to_string(m) +
                       " has sequence tag " + std::to_string(h.reserved) + ", expected " +
                       std::to_string(static_cast<uint16_t>(c->rx_seq + 1)) + " (" + why + ")"),
               true);
    return true;
  }
  // A record's ack may be older than a control message's that overtook it
  // (records are processed after the CQ is drained): take the newer.
  if (!ApplyAck(c, h.ack, /*stale_ok=*/true)) return true;
  HandleWriteLocked(c, h, hd - ((h.length + 7) & ~uint64_t{7}));
  OweAckLocked(c, true);
  return true;
}

// A message from c's peer was taken in (`counted`: one that advanced
// rx_seq). Its ack rides on our next message to the peer; a bare ACK goes
// only once the application let a whole progress pass go by without sending
// one (or many wait). The pass is that of the oldest message still
// unacknowledged: when everything before this one was acknowledged since
// (our answer carried it), the clock restarts here. Keeping the older pass
// sent a bare ACK whenever the peer's next message came in the pass right
// after our answer: in a ping-pong, most of them.
void VerbsBackend::OweAckLocked(Conn* c, bool counted) {
  if (!c->ack_dirty || (counted && c->rx_seq - c->ack_sent == 1)) c->ack_arm_pass = progress_pass_;
  if (!c->ack_dirty) {
    c->ack_dirty = true;
    ack_dirty_.push_back(c);
  }
}

std::unique_ptr<Op> VerbsBackend::NewOpLocked() {
  if (op_pool_.empty()) return std::make_unique<Op>();
  std::unique_ptr<Op> op = std::move(op_pool_.back());
  op_pool_.pop_back();
  return op;
}

void VerbsBackend::PopOpLocked(Conn* c) {
  std::unique_ptr<Op> op = std::move(c->data_q.front());
  c->data_q.pop_front();
  if (op_pool_.size() >= 1024) return;                    // bounded: a burst does not pin memory forever
  std::vector<uint8_t> payload = std::move(op->payload);  // keeps its capacity
  payload.clear();
  *op = Op{};
  op->payload = std::move(payload);
  op_pool_.push_back(std::move(op));
}

void VerbsBackend::CompleteOpLocked(Conn* c, const Op& op, Status st) {
  Completion& done = completions_.Emplace();
  done.type = op.type == kMeta   ? CompletionType::kWriteDone
              : op.type == kRead ? CompletionType::kReadDone
                                 : CompletionType::kSendDone;
  if (!st.ok()) done.status = std::move(st);
  done.peer = c->peer;
  done.context = op.context;
}

// Moves queued work onto the QPs in posting order, as far as room allows.
void VerbsBackend::PumpLocked(Conn* c) {
  if (!c->open) return;
  Qp* q0 = c->qps[0].get();
  // Control messages first and never behind data: a write waiting for our
  // peer's REPLY must not hold back our REPLY to the peer's QUERY.
  while (!c->ctrl_q.empty()) {
    if (!CanPostMessage(c, 0)) return;
    if (!PostCtrl(c, c->ctrl_q.front())) return;
    c->ctrl_q.pop_front();
  }
  while (!c->data_q.empty()) {
    Op& op = *c->data_q.front();
    if (op.type == kSend) {
      if (!CanPostMessage(c, op.payload.size())) return;
      Header h;
      h.type = kSend;
      h.reserved = static_cast<uint16_t>(c->next_seq);  // the sequence tag
      h.length = op.payload.size();
      const uint64_t seq = c->next_seq;
      if (!PostMessage(c, h, op.payload.data(), op.payload.size())) return;
      ++c->next_seq;
      c->unacked.push_back(Unacked{seq, kSend, op.context, 0, 0, op.payload.size(), nullptr});
      PopOpLocked(c);
      continue;
    }
    if (!op.started) {
      auto it = c->remote.find(op.key);
      if (it == c->remote.end()) {
        // First use of this key: ask the target for its true bounds.
        c->remote.emplace(op.key, RemoteInfo{});
        Header h;
        h.type = kQuery;
        h.key = op.key;
        c->ctrl_q.push_back(h);
        if (CanPostMessage(c, 0) && PostCtrl(c, h)) c->ctrl_q.pop_back();
        return;
      }
      const RemoteInfo& ri = it->second;
      if (ri.state == RemoteInfo::kPending) return;
      if (ri.state == RemoteInfo::kDead || !RangeInside(op.remote_offset, op.length, ri.length)) {
        const bool dead = ri.state == RemoteInfo::kDead;
        CompleteOpLocked(
            c, op,
            OutOfRange(
                c->Name() + " refused the " + (op.type == kRead ? "read" : "write") + " of " +
                std::to_string(op.length) + " bytes at offset " + std::to_string(op.remote_offset) +
                " of region key " + std::to_string(op.key) + ": " +
                (dead ? "the key is not registered there"
                      : "the range is outside its registration (" + std::to_string(ri.length) + " bytes)")));
        PopOpLocked(c);
        continue;
      }
      op.started = true;
      op.remote_addr = ri.addr + op.remote_offset;
      op.rkey = static_cast<uint32_t>(op.key & 0xffffffffu);
      op.remote_host = ri.host;
    }
    if (op.type == kRead) {
      // A read must see every write posted before it. WRITE + META land by
      // the target's NIC ahead of a later READ on the same QP (RC order), but
      // an eager write's bytes are copied by the target's CPU when its Poll
      // gets to them, which a READ served by the NIC can overtake: so a read
      // waits until the target has acknowledged the eager writes before it
      // (their ack comes after the copy). ApplyAck's caller pumps again.
      if (op.issued == 0 && c->peer_acked < c->last_eager_seq) return;
      // Chunks of at most max_msg on QP 0, each signalled; once all are
      // posted the op waits in c->reads for its completions.
      while (op.issued < op.length || op.length == 0) {
        if (q0->Free() < 1) return;
        const uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(max_msg_, op.length - op.issued));
        ibv_sge sge{reinterpret_cast<uint64_t>(op.local + op.issued), len, op.mr->lkey};
        ibv_send_wr wr{};
        wr.sg_list = &sge;
        wr.num_sge = 1;
        wr.opcode = IBV_WR_RDMA_READ;
        wr.wr.rdma.remote_addr = op.remote_addr + op.issued;
        wr.wr.rdma.rkey = op.rkey;
        if (!PostChain(c, q0, &wr, 1, &op)) return;
        ++op.stripes_inflight;
        op.issued += len;
        if (op.length == 0) break;
      }
      c->reads.push_back(std::move(c->data_q.front()));
      c->data_q.pop_front();
      continue;
    }
    // A write that fits one packet with its header goes as one SEND and the
    // target copies it into place (checked against its own table first):
    // one packet instead of WRITE + META, which is what latency is made of.
    // Both ends must be host memory: the CPUs touch the bytes.
    // Smaller still, it goes into the peer's mailbox (one inline RDMA WRITE,
    // no receive at the target) while the mailbox has room.
    if (op.local_host && op.remote_host && MboxFits(c, op.length, op.remote_offset)) {
      if (q0->Free() < 1) return;
      if (!PostMboxWrite(c, MboxWrite{op.local, op.length, op.key, op.remote_offset, op.imm}, op.context)) {
        return;
      }
      PopOpLocked(c);
      continue;
    }
    const bool eager = op.local_host && op.remote_host && op.length > 0 &&
                       kHeaderBytes + op.length <= std::min<size_t>(c->mtu_bytes, kSlotBytes);
    if (eager) {
      if (!CanPostMessage(c, op.length)) return;
      Header h;
      h.type = kEager;
      h.reserved = static_cast<uint16_t>(c->next_seq);  // the sequence tag
      h.imm = op.imm;
      h.key = op.key;
      h.offset = op.remote_offset;
      h.length = op.length;
      const uint64_t seq = c->next_seq;
      if (!PostMessage(c, h, op.local, op.length)) return;
      ++c->next_seq;
      c->last_eager_seq = seq;
      // The bytes were copied at post: the source registration is not needed.
      c->unacked.push_back(Unacked{seq, kMeta, op.context, op.key, op.remote_offset, op.length, nullptr});
      PopOpLocked(c);
      continue;
    }
    const bool striped = c->qps.size() > 1 && op.length >= 2 * stripe_bytes_;
    if (!striped) {
      // WRITE chunk(s) and META in one chain on QP 0.
      const uint64_t chunk = max_msg_;
      const size_t nwrites = op.length == 0 ? 0 : static_cast<size_t>((op.length + chunk - 1) / chunk);
      const bool meta_inline = kHeaderBytes <= c->max_inline;
      if (q0->Free() < nwrites + 1 || (!meta_inline && c->free_slots.empty())) {
        if (nwrites + 1 > kSendDepth) {  // cannot happen with max_msg >= 4 MiB; keep it a value
          CompleteOpLocked(c, op, Internal("write needs more WRs than the send queue holds"));
          PopOpLocked(c);
          continue;
        }
        return;
      }
      if (chain_wrs_.size() < nwrites + 1) {
        chain_sges_.resize(nwrites + 1);
        chain_wrs_.resize(nwrites + 1);
      }
      ibv_sge* sges = chain_sges_.data();
      ibv_send_wr* wrs = chain_wrs_.data();
      std::fill_n(wrs, nwrites + 1, ibv_send_wr{});
      for (size_t i = 0; i < nwrites; ++i) {
        uint64_t off = i * chunk;
        uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(chunk, op.length - off));
        sges[i] = ibv_sge{reinterpret_cast<uint64_t>(op.local + off), len, op.mr->lkey};
        wrs[i].sg_list = &sges[i];
        wrs[i].num_sge = 1;
        wrs[i].opcode = IBV_WR_RDMA_WRITE;
        wrs[i].wr.rdma.remote_addr = op.remote_addr + off;
        wrs[i].wr.rdma.rkey = op.rkey;
        if (len <= c->max_inline) wrs[i].send_flags = IBV_SEND_INLINE;
      }
      uint8_t stack[kHeaderBytes];
      int32_t slot_index = -1;
      uint8_t* slot = stack;
      if (!meta_inline) {
        slot_index = static_cast<int32_t>(c->free_slots.back());
        c->free_slots.pop_back();
        slot = c->send_slab.data() + size_t(slot_index) * kSlotBytes;
      }
      Header h;
      h.type = kMeta;
      h.reserved = static_cast<uint16_t>(c->next_seq);  // the sequence tag
      h.imm = op.imm;
      h.key = op.key;
      h.offset = op.remote_offset;
      h.length = op.length;
      h.ack = c->rx_seq;
      c->ack_sent = c->rx_seq;
      EncodeHeader(h, slot);
      sges[nwrites] =
          ibv_sge{reinterpret_cast<uint64_t>(slot), static_cast<uint32_t>(kHeaderBytes), c->send_mr->lkey};
      wrs[nwrites].sg_list = &sges[nwrites];
      wrs[nwrites].num_sge = 1;
      wrs[nwrites].opcode = IBV_WR_SEND;
      if (meta_inline) wrs[nwrites].send_flags = IBV_SEND_INLINE;
      const uint64_t seq = c->next_seq;
      if (!PostChain(c, q0, wrs, nwrites + 1, nullptr, slot_index)) return;
      ++c->next_seq;
      c->unacked.push_back(Unacked{seq, kMeta, op.context, op.key, op.remote_offset, op.length, op.mr});
      PopOpLocked(c);
      continue;
    }
    // Striped: stripe i goes to QP i % n, each signalled; META follows once
    // every stripe's completion is in.
    while (op.issued < op.length) {
      const uint64_t idx = op.issued / stripe_bytes_;
      Qp* q = c->qps[idx % c->qps.size()].get();
      if (q->Free() < 1) break;
      uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(stripe_bytes_, op.length - op.issued));
      ibv_sge sge{reinterpret_cast<uint64_t>(op.local + op.issued), len, op.mr->lkey};
      ibv_send_wr wr{};
      wr.sg_list = &sge;
      wr.num_sge = 1;
      wr.opcode = IBV_WR_RDMA_WRITE;
      wr.wr.rdma.remote_addr = op.remote_addr + op.issued;
      wr.wr.rdma.rkey = op.rkey;
      if (!PostChain(c, q, &wr, 1, &op)) return;
      op.issued += len;
      ++op.stripes_inflight;
    }
    if (op.issued < op.length || op.stripes_inflight > 0 || !CanPostMessage(c, 0)) return;
    Header h;
    h.type = kMeta;
    h.reserved = static_cast<uint16_t>(c->next_seq);  // the sequence tag
    h.imm = op.imm;
    h.key = op.key;
    h.offset = op.remote_offset;
    h.length = op.length;
    const uint64_t seq = c->next_seq;
    if (!PostMessage(c, h, nullptr, 0)) return;
    ++c->next_seq;
    c->unacked.push_back(Unacked{seq, kMeta, op.context, op.key, op.remote_offset, op.length, op.mr});
    PopOpLocked(c);
  }
}

bool VerbsBackend::PostRecv(Conn* c, uint32_t slot) {
  ibv_sge sge{reinterpret_cast<uint64_t>(c->recv_slab.data() + size_t{slot} * kSlotBytes),
              static_cast<uint32_t>(kSlotBytes), c->recv_mr->lkey};
  ibv_recv_wr wr{};
  wr.wr_id = kRecvBit | (uint64_t{c->qps[0]->uid} << 32) | slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  return ibv_post_recv(c->qps[0]->qp, &wr, &bad) == 0;
}

// ---------------------------------------------------------------------------
// Progress (mu_ held)

size_t VerbsBackend::ProgressLocked(bool flush_acks) {
  ++progress_pass_;
  // Mailboxes: note which records are complete *before* draining the CQ.
  // Whatever RC delivered ahead of them (control messages, SENDs) then has
  // its completion in the CQ by the time it is drained, so processing those
  // records afterwards keeps the peer's posting order (acks, NACKs, data).
  std::erase_if(mbox_conns_, [](const Conn* c) { return !c->open; });
  for (Conn* c : mbox_conns_) {
    uint64_t m = c->mbox_next;
    while (m - c->mbox_next < kMboxSlots && MboxReady(c, m)) ++m;
    c->mbox_peek_end = m;
  }
  ibv_wc wc[kPollBatch];
  size_t total = 0;
  bool drained = false;
  while (total < kMaxWcPerProgress) {
    int n = ibv_poll_cq(cq_, kPollBatch, wc);
    if (n <= 0) {
      drained = n == 0;
      break;
    }
    for (int i = 0; i < n; ++i) HandleWc(wc[i]);
    total += static_cast<size_t>(n);
  }
  if (drained) {
    for (size_t i = 0; i < mbox_conns_.size(); ++i) {
      Conn* c = mbox_conns_[i];
      while (c->open && c->mbox_next < c->mbox_peek_end && ProcessMboxRecord(c, "mailbox")) ++total;
    }
  }
  // Every message carries the cumulative ack, so a bare ACK is only sent when
  // the application had a whole progress pass (one more Poll) to answer and
  // did not, when many messages wait, or when the helper thread progresses
  // for an absent owner. A ping-pong then costs one packet each way, and a
  // stream still gets at most one ACK per pass (completion moderation).
  size_t keep = 0;
  for (Conn* c : ack_dirty_) {
    if (!c->open || c->rx_seq <= c->ack_sent) {
      c->ack_dirty = false;
      continue;
    }
    if (!flush_acks && progress_pass_ == c->ack_arm_pass && c->rx_seq - c->ack_sent < kAckBatch) {
      ack_dirty_[keep++] = c;
      continue;
    }
    c->ack_dirty = false;
    Header h;
    h.type = kAck;
    if (c->ctrl_q.empty() && CanPostMessage(c, 0)) {
      PostCtrl(c, h);
    } else {
      c->ctrl_q.push_back(h);
    }
  }
  ack_dirty_.resize(keep);
  if (total > 0) {
    for (auto& [peer, c] : by_peer_) PumpLocked(c);
  }
  return total;
}

void VerbsBackend::HandleWc(const ibv_wc& wc) {
  const bool recv = (wc.wr_id & kRecvBit) != 0;
  const uint32_t uid = static_cast<uint32_t>((wc.wr_id & ~kRecvBit) >> 32);
  auto it = qp_by_uid_.find(uid);
  if (it == qp_by_uid_.end()) return;  // a QP of a connection torn down
  Qp* q = it->second;
  Conn* c = q->conn;
  if (!c->open) {
    if (!c->established) c->early.push_back(wc);  // not reported yet (rare; see Conn::early)
    return;                                       // else: flushes after a failure
  }
  if (wc.status != IBV_WC_SUCCESS) {
    const bool gone = wc.status == IBV_WC_RETRY_EXC_ERR || wc.status == IBV_WC_RNR_RETRY_EXC_ERR ||
                      wc.status == IBV_WC_WR_FLUSH_ERR;
    std::string what = c->Name() + ": " + (recv ? "receive" : "send") +
                       " failed: " + ibv_wc_status_str(wc.status) + " (vendor error " +
                       std::to_string(wc.vendor_err) + ")";
    FailLocked(c, gone ? PeerClosed(what) : IoError(what), true);
    return;
  }
  if (recv) {
    const uint32_t slot = static_cast<uint32_t>(wc.wr_id & 0xffffffffu);
    if (wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
      // A mailbox doorbell: the records up to the one it names are in memory
      // (RC placed them before this completion). Gap filling may have got
      // there first.
      const uint32_t ahead = ntohl(wc.imm_data) - static_cast<uint32_t>(c->mbox_next);
      if (ahead < 0x80000000u) {
        bool ok = ahead < kMboxSlots;
        for (uint32_t i = 0; ok && i <= ahead && c->open; ++i) ok = ProcessMboxRecord(c, "doorbell");
        if (!ok && c->open)
          FailLocked(c, IoError(c->Name() + " rang the mailbox doorbell for a record not there"), true);
      }
    } else {
      ProcessRecv(c, c->recv_slab.data() + size_t{slot} * kSlotBytes, wc.byte_len);
    }
    if (c->open && !PostRecv(c, slot)) {
      FailLocked(c, IoError(c->Name() + ": ibv_post_recv failed"), true);
    }
    return;
  }
  if (q->signaled.empty()) return;
  Signaled s = q->signaled.front();
  q->signaled.pop_front();
  q->completed = s.wr + 1;
  if (s.stripe) --s.stripe->stripes_inflight;
  // Reads complete in posting order on QP 0: the front one may be done now.
  while (!c->reads.empty() && c->reads.front()->stripes_inflight == 0) {
    CompleteOpLocked(c, *c->reads.front(), Status::Ok());
    c->reads.pop_front();
  }
  if (s.slot >= 0) c->free_slots.push_back(static_cast<uint32_t>(s.slot));
}

bool VerbsBackend::ApplyAck(Conn* c, uint64_t ack, bool stale_ok) {
  if (ack == c->peer_acked || (stale_ok && ack < c->peer_acked)) return true;
  if (ack < c->peer_acked || ack >= c->next_seq) {
    FailLocked(c,
               IoError(c->Name() + " sent a malformed message: ack " + std::to_string(ack) + " outside [" +
                       std::to_string(c->peer_acked) + ", " + std::to_string(c->next_seq - 1) + "]"),
               true);
    return false;
  }
  c->peer_acked = ack;
  // Mailbox slots whose records are acknowledged were consumed: free again.
  while (c->mbox_freed < c->mbox_sent && c->mbox_seq[(c->mbox_freed + 1) % kMboxSlots] <= ack)
    ++c->mbox_freed;
  while (!c->unacked.empty() && c->unacked.front().seq <= ack) {
    const Unacked u = c->unacked.front();
    c->unacked.pop_front();
    // Filled in place in the completion queue (no construct-and-move: one
    // per acknowledged write on the latency path).
    Completion& done = completions_.Emplace();
    done.type = u.type == kMeta ? CompletionType::kWriteDone : CompletionType::kSendDone;
    done.peer = c->peer;
    done.context = u.context;
    if (!c->peer_nacks.empty() && c->peer_nacks.front().seq == u.seq) {
      done.status = OutOfRange(
          c->Name() + " refused the write of " + std::to_string(u.length) + " bytes at offset " +
          std::to_string(u.offset) + " of region key " + std::to_string(u.key) + ": " +
          (c->peer_nacks.front().code == kNackUnknownKey ? "the key is not registered there"
                                                         : "the range is outside its registration"));
      c->peer_nacks.pop_front();
    }
  }
  return true;
}

// A write's META, eager SEND or mailbox record: checked against our own
// table (never the initiator's idea of our region), copied into place when it
// carries its bytes, then kWriteImm or a NACK.
void VerbsBackend::HandleWriteLocked(Conn* c, const Header& h, const uint8_t* payload) {
  ++c->rx_seq;
  // Never trust the initiator's idea of our region: check our table.
  const Region* reg = FindRegionLocked(h.key);
  uint8_t refuse = 0;
  if (reg == nullptr) {
    refuse = kNackUnknownKey;
  } else if (!RangeInside(h.offset, h.length, reg->region.length)) {
    refuse = kNackOutOfRange;
  } else if (h.type == kEager && reg->region.kind != MemoryKind::kHost) {
    refuse = kNackUnknownKey;  // our REPLY said device memory; a correct peer never does this
  } else if (h.type == kEager) {
    std::memcpy(static_cast<uint8_t*>(reg->region.addr) + h.offset, payload, h.length);
  }
  if (refuse) {
    ZW_LOG(kWarn, "verbs: refused WRITE from " << c->Name() << ": key " << h.key << " offset " << h.offset
                                               << " length " << h.length);
    Header n;
    n.type = kNack;
    n.code = refuse;
    n.key = c->rx_seq;
    c->ctrl_q.push_back(n);
  } else {
    Completion& got = completions_.Emplace();
    got.type = CompletionType::kWriteImm;
    got.peer = c->peer;
    got.imm = h.imm;
    got.key = h.key;
    got.offset = h.offset;
    got.length = h.length;
  }
}

void VerbsBackend::ProcessRecv(Conn* c, const uint8_t* buf, uint32_t len) {
  auto corrupt = [&](const std::string& what) {
    FailLocked(c, IoError(c->Name() + " sent a malformed message: " + what), true);
  };
  if (len < kHeaderBytes) return corrupt(std::to_string(len) + " bytes");
  Header h = DecodeHeader(buf);
  if (h.type != kSend && h.type != kEager && len != kHeaderBytes) return corrupt("trailing bytes");
  c->last_rx_pass = progress_pass_;
  if (h.type == kMeta || h.type == kEager || h.type == kSend) {
    // Mailbox records the peer posted before this message go first (RC
    // placed them before this completion).
    while (h.reserved != static_cast<uint16_t>(c->rx_seq + 1)) {
      if (!ProcessMboxRecord(c, "gap")) {
        return corrupt("sequence tag " + std::to_string(h.reserved) + ", expected " +
                       std::to_string(static_cast<uint16_t>(c->rx_seq + 1)));
      }
      if (!c->open) return;
    }
  }
  if (h.type == kNack) {
    uint64_t last = c->peer_nacks.empty() ? c->peer_acked : std::max(c->peer_acked, c->peer_nacks.back().seq);
    if (h.key <= last || h.key >= c->next_seq || h.ack < h.key)
      return corrupt("NACK for a sequence not outstanding");
    c->peer_nacks.push_back(Nack{h.key, h.code});
  }
  if (!ApplyAck(c, h.ack)) return;
  const uint64_t rx_before = c->rx_seq;
  switch (h.type) {
    case kAck:
    case kNack:
      break;
    case kMeta:
    case kEager:
      if (h.type == kEager && h.length != len - kHeaderBytes) return corrupt("eager write length mismatch");
      HandleWriteLocked(c, h, buf + kHeaderBytes);
      break;
    case kSend: {
      if (h.length != len - kHeaderBytes) return corrupt("SEND length mismatch");
      ++c->rx_seq;
      Completion got;
      got.type = CompletionType::kRecvMessage;
      got.peer = c->peer;
      got.message.assign(buf + kHeaderBytes, buf + len);
      Push(std::move(got));
      break;
    }
    case kQuery: {
      Header r;
      r.type = kReply;
      r.key = h.key;
      auto it = regions_.find(h.key);
      if (it != regions_.end()) {
        r.code = it->second.region.kind == MemoryKind::kHost ? kReplyHost : kReplyDevice;
        r.offset = reinterpret_cast<uint64_t>(it->second.region.addr);
        r.length = it->second.region.length;
      }
      c->ctrl_q.push_back(r);
      break;
    }
    case kReply: {
      auto it = c->remote.find(h.key);
      if (it == c->remote.end()) return corrupt("REPLY for a key never queried");
      if (it->second.state != RemoteInfo::kPending) break;  // an UNREG overtook it
      it->second.state = h.code != kReplyDead ? RemoteInfo::kLive : RemoteInfo::kDead;
      it->second.host = h.code == kReplyHost;
      it->second.addr = h.offset;
      it->second.length = h.length;
      break;
    }
    case kMbox:
      if (h.length != kMboxSlots) return corrupt("mailbox of " + std::to_string(h.length) + " slots");
      c->peer_mbox = true;
      c->peer_mbox_addr = h.offset;
      c->peer_mbox_rkey = static_cast<uint32_t>(h.key);
      break;
    case kUnreg:
      // Only keys this side has asked about are cached; others need no note
      // (a later QUERY finds them gone).
      if (auto it = c->remote.find(h.key); it != c->remote.end())
        it->second = RemoteInfo{RemoteInfo::kDead, 0, 0};
      break;
    default:
      return corrupt("unknown type " + std::to_string(h.type));
  }
  OweAckLocked(c, c->rx_seq != rx_before);
}

void VerbsBackend::FailLocked(Conn* c, const Status& st, bool emit_peer_error) {
  if (!c->open && c->established) return;
  const bool was_open = c->open;
  c->open = false;
  c->established = true;
  c->failure = st;
  if (was_open) ZW_LOG(kInfo, "verbs: " << st.ToString());
  for (auto& q : c->qps) {
    if (!q->qp) continue;
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_ERR;
    ibv_modify_qp(q->qp, &a, IBV_QP_STATE);  // flushes what is outstanding
  }
  if (c->side_fd >= 0) ::shutdown(c->side_fd, SHUT_RDWR);  // the peer notices at once
  if (cm_) cm_->Disconnect(c);                             // likewise (RDMA_CM_EVENT_DISCONNECTED)
  for (const Unacked& u : c->unacked) {
    Completion done;
    done.type = u.type == kMeta ? CompletionType::kWriteDone : CompletionType::kSendDone;
    done.status = st;
    done.peer = c->peer;
    done.context = u.context;
    Push(std::move(done));
  }
  c->unacked.clear();
  for (auto& op : c->reads) CompleteOpLocked(c, *op, st);
  c->reads.clear();
  for (auto& op : c->data_q) CompleteOpLocked(c, *op, st);
  while (!c->data_q.empty()) PopOpLocked(c);
  c->ctrl_q.clear();
  c->peer_nacks.clear();
  if (emit_peer_error) {
    Completion err;
    err.type = CompletionType::kPeerError;
    err.status = st;
    err.peer = c->peer;
    Push(std::move(err));
  } else {
    c->error_delivered = true;
  }
}

void VerbsBackend::Push(Completion c) { completions_.Push(std::move(c)); }

void VerbsBackend::WakePollers() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(poll_wake_fd_, &one, 8);
}

// ---------------------------------------------------------------------------
// Poll, close, helper

size_t VerbsBackend::Poll(std::span<Completion> out, std::chrono::milliseconds timeout) {
  if (out.empty()) return 0;
  Touch();
  // A zero-timeout Poll (a busy-polling caller) never sleeps, so it need not
  // tell the helper thread it is inside; Touch is enough to keep it away.
  const bool may_wait = timeout.count() > 0;
  if (may_wait) pollers_.fetch_add(1, std::memory_order_relaxed);
  struct Leave {
    std::atomic<int>& n;
    bool counted;
    ~Leave() {
      if (counted) n.fetch_sub(1, std::memory_order_relaxed);
    }
  } leave{pollers_, may_wait};
  // Clock reads only once a pass found nothing: a busy-polling caller
  // (timeout 0) never reads the clock here.
  Clock::time_point deadline{}, spin_until{};
  bool timed = false;
  auto take = [&]() -> size_t {
    size_t n = 0;
    while (n < out.size() && !completions_.empty()) {
      Completion& c = completions_.front();
      // A peer error opens a batch of its own: callers that stop at the
      // first failure still see everything the peer did before it (e.g. a
      // goodbye message followed at once by the peer's close).
      if (c.type == CompletionType::kPeerError && n > 0) break;
      if (c.type == CompletionType::kPeerError) {
        for (auto& conn : conns_) {
          if (conn->peer == c.peer && !conn->open) conn->error_delivered = true;
        }
      }
      out[n++] = std::move(c);
      completions_.pop_front();
    }
    return n;
  };
  bool armed = false;
  bool mbox_peers = false;
  // While spinning, between full passes (lock, CQ, mailboxes, clock) only the
  // next record's stamp of up to kWatch mailboxes is read: a load each, so a
  // record is seen within a few nanoseconds instead of half a pass (a pass
  // costs a microsecond or more under emulation, as on the soft-RoCE guest).
  // The addresses stay valid: connections live as long as the backend.
  constexpr size_t kWatch = 4;
  constexpr int kWatchSpins = 16;  // loads per mailbox between full passes
  const uint64_t* watch_at[kWatch];
  uint64_t watch_for[kWatch];
  size_t nwatch = 0;
  while (true) {
    {
      std::lock_guard lk(mu_);
      if (size_t n = take()) return n;
      if (closed_) return 0;
      ProgressLocked();
      if (size_t n = take()) return n;
      if (!may_wait) return 0;
      mbox_peers = !mbox_conns_.empty();
      nwatch = 0;
      for (size_t i = 0; i < mbox_conns_.size() && nwatch < kWatch; ++i) {
        const Conn* c = mbox_conns_[i];
        watch_at[nwatch] = MboxStamp(c, c->mbox_next);
        watch_for[nwatch++] = htole64(c->mbox_next);
      }
    }
    if (timeout.count() <= 0) return 0;
    if (timed && !armed) {
      for (int k = 0; k < kWatchSpins; ++k) {
        bool seen = false;
        for (size_t i = 0; i < nwatch; ++i) {
          seen |= __atomic_load_n(watch_at[i], __ATOMIC_RELAXED) == watch_for[i];
        }
        if (seen) break;
      }
    }
    const auto now = Clock::now();
    if (!timed) {
      timed = true;
      deadline = now + timeout;
      spin_until = now + spin_;
    }
    if (now >= deadline) return 0;
    if (now < spin_until) continue;
    if (!armed) {
      // Arm, then look once more: a completion that raced the arming would
      // otherwise not wake us.
      ibv_req_notify_cq(cq_, 0);
      armed = true;
      continue;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
    pollfd fds[2] = {{channel_->fd, POLLIN, 0}, {poll_wake_fd_, POLLIN, 0}};
    // A mailbox record sent without a doorbell raises no completion event
    // (PostMbox rings only where we looked idle); with mailbox peers the
    // sleep is cut to 1 ms, so such a record waits at most that long.
    ::poll(fds, 2, static_cast<int>(std::min<int64_t>(left, mbox_peers ? 1 : 100)));
    ibv_cq* ev_cq = nullptr;
    void* ev_ctx = nullptr;
    if (fds[0].revents & POLLIN) {
      while (ibv_get_cq_event(channel_, &ev_cq, &ev_ctx) == 0) ibv_ack_cq_events(ev_cq, 1);
    }
    if (fds[1].revents & POLLIN) {
      uint64_t v;
      [[maybe_unused]] ssize_t r = ::read(poll_wake_fd_, &v, 8);
    }
    armed = false;
  }
}

void VerbsBackend::Close() {
  {
    std::lock_guard lk(mu_);
    if (closed_) return;
    closed_ = true;
    // Best effort: acknowledge what already arrived, so peers' writes that
    // did land here are not reported as failed. (No CQ: Init failed, and the
    // destructor is closing a backend that never was.)
    if (cq_ != nullptr) ProgressLocked();
    for (auto& c : conns_) {
      if (c->open && c->rx_seq > c->ack_sent && CanPostMessage(c.get(), 0)) {
        Header h;
        h.type = kAck;
        PostCtrl(c.get(), h);
      }
    }
    const Status cancelled = Cancelled("verbs backend closed");
    for (auto& c : conns_) {
      if (c->open) FailLocked(c.get(), cancelled, /*emit_peer_error=*/false);
    }
  }
  stop_.store(true);
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(helper_wake_fd_, &one, 8);
  if (helper_.joinable()) helper_.join();
  if (cm_) cm_->Close();  // no hook runs after this
  std::lock_guard lk(mu_);
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  for (auto& c : conns_) {
    if (c->side_fd >= 0) ::close(c->side_fd);
    c->side_fd = -1;
  }
  WakePollers();
}

void VerbsBackend::HelperLoop() {
  const int idle_ms = static_cast<int>(std::max<int64_t>(1, idle_progress_.count() / 1000));
  std::vector<pollfd> fds;
  std::vector<Conn*> watched;
  // The fd set is rebuilt (under mu_) only when it changed: while the owner
  // is busy this thread takes no lock at all, so it never holds mu_ when the
  // scheduler parks it (on a loaded machine that stalled Poll for a tick).
  uint64_t fds_gen = ~uint64_t{0};
  bool rebuild = true;
  uint64_t seen_activity = activity_.load();
  auto last_idle_check = Clock::now();
  // While the owner keeps polling or posting, the check backs off (up to 16
  // periods): each wake-up preempts a busy-polling thread, which costs
  // latency where cores are scarce. An owner that stops is noticed within
  // 16 periods, then progressed for every period.
  auto check_every = idle_progress_;
  while (!stop_.load()) {
    if (rebuild || fds_gen != helper_fds_gen_.load()) {
      fds_gen = helper_fds_gen_.load();
      rebuild = false;
      fds.clear();
      watched.clear();
      fds.push_back({helper_wake_fd_, POLLIN, 0});
      std::lock_guard lk(mu_);
      if (listen_fd_ >= 0) fds.push_back({listen_fd_, POLLIN, 0});
      for (auto& c : conns_) {
        if (c->side_fd >= 0) {
          fds.push_back({c->side_fd, POLLIN, 0});
          watched.push_back(c.get());
        }
      }
    }
    for (auto& p : fds) p.revents = 0;
    const size_t first_conn = fds.size() - watched.size();
    const int wait_ms = static_cast<int>(
        std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::milliseconds>(check_every).count()));
    ::poll(fds.data(), fds.size(), std::min(std::max(idle_ms, wait_ms), 100));
    if (stop_.load()) break;
    if (fds[0].revents & POLLIN) {
      uint64_t v;
      [[maybe_unused]] ssize_t r = ::read(helper_wake_fd_, &v, 8);
    }
    if (first_conn == 2 && (fds[1].revents & POLLIN)) {
      sockaddr_storage ss{};
      socklen_t sl = sizeof(ss);
      int fd = ::accept4(fds[1].fd, reinterpret_cast<sockaddr*>(&ss), &sl, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd >= 0) {
        char host[NI_MAXHOST] = "?", serv[NI_MAXSERV] = "?";
        getnameinfo(reinterpret_cast<sockaddr*>(&ss), sl, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        HandleAccept(fd, std::string(host) + ":" + serv);
        rebuild = true;
        WakePollers();
      }
    }
    bool pushed = false;
    for (size_t i = 0; i < watched.size(); ++i) {
      if (!fds[first_conn + i].revents) continue;
      uint8_t junk[64];
      ssize_t r = ::recv(fds[first_conn + i].fd, junk, sizeof(junk), MSG_DONTWAIT);
      if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      std::lock_guard lk(mu_);
      Conn* c = watched[i];
      // Anything in the CQ from this peer (acks above all) counts first.
      ProgressLocked();
      if (c->open) {
        FailLocked(c,
                   PeerClosed(c->Name() + " disconnected: " +
                              (r == 0  ? std::string("connection closed")
                               : r > 0 ? std::string("unexpected bytes on the side channel")
                                       : std::string(std::strerror(errno)))),
                   true);
      }
      ::close(c->side_fd);
      c->side_fd = -1;
      rebuild = true;
      pushed = true;
    }
    // Fallback progress while the owner is away: acks and query replies keep
    // flowing, so peers' completions never wait on this process polling.
    // "Away" means no Poll or post for a whole idle_progress period.
    const auto now = Clock::now();
    if (now - last_idle_check >= check_every) {
      last_idle_check = now;
      const uint64_t activity = activity_.load(std::memory_order_relaxed);
      if (activity == seen_activity && pollers_.load(std::memory_order_relaxed) == 0) {
        check_every = idle_progress_;
        std::lock_guard lk(mu_);
        if (!closed_ && ProgressLocked(/*flush_acks=*/true) > 0) pushed = true;
        if (!completions_.empty()) pushed = true;
      } else {
        check_every = std::min(check_every * 2, idle_progress_ * 16);
      }
      seen_activity = activity;
    }
    if (pushed) WakePollers();
  }
}

}  // namespace

int VerbsDeviceCount() {
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list) ibv_free_device_list(list);
  return list ? n : 0;
}

Result<std::unique_ptr<Backend>> CreateVerbsBackend(const BackendOptions& options) {
  ZW_ASSIGN_OR_RETURN(uint64_t nqps, EnvUint("IB_QPS", 1));
  if (nqps == 0 || nqps > kVerbsMaxQps) {
    return InvalidArgument("ZIPWIRE_IB_QPS must be 1.." + std::to_string(kVerbsMaxQps));
  }
  ZW_ASSIGN_OR_RETURN(uint64_t stripe, EnvUint("IB_STRIPE_BYTES", 1 << 20));
  if (stripe < 4096 || stripe > (uint64_t{1} << 30))
    return InvalidArgument("ZIPWIRE_IB_STRIPE_BYTES out of range");
  ZW_ASSIGN_OR_RETURN(uint64_t spin_us, EnvUint("IB_SPIN_US", 50));
  ZW_ASSIGN_OR_RETURN(uint64_t idle_us, EnvUint("IB_IDLE_PROGRESS_US", 1000));
  if (idle_us == 0) return InvalidArgument("ZIPWIRE_IB_IDLE_PROGRESS_US must be positive");
  ZW_ASSIGN_OR_RETURN(uint64_t cache_entries, EnvUint("IB_REG_CACHE", 64));
  ZW_ASSIGN_OR_RETURN(uint64_t mailbox, EnvUint("IB_MAILBOX", 1));
  if (mailbox > 1) return InvalidArgument("ZIPWIRE_IB_MAILBOX must be 0 or 1");
  if (cache_entries > (uint64_t{1} << 20)) return InvalidArgument("ZIPWIRE_IB_REG_CACHE out of range");
  auto b = std::make_unique<VerbsBackend>(options);
  ZW_RETURN_IF_ERROR(b->Init(static_cast<uint32_t>(nqps), stripe, std::chrono::microseconds(spin_us),
                             std::chrono::microseconds(idle_us), static_cast<size_t>(cache_entries),
                             mailbox == 1));
  return std::unique_ptr<Backend>(std::move(b));
}

}  // namespace zipwire::transport
