// tcp backend: RDMA WRITE WITH IMM semantics over TCP (Boost.Asio).
//
// Wire format. One TCP connection per peer pair; all integers little-endian.
// Every frame starts with a fixed 40-byte header:
//
//   off size field
//     0    1 type      1 HELLO, 2 WRITE, 3 SEND, 4 ACK, 5 NACK, 6 READ,
//                      7 READ_RESP
//     1    1 code      NACK, READ_RESP: reason (1 unknown key, 2 range outside
//                      region; 0 on a READ_RESP that carries the data); else 0
//     2    2 reserved  must be 0
//     4    4 imm       WRITE: the immediate; HELLO: sender's rank; else 0
//     8    8 ack       cumulative: the sender of this frame has processed the
//                      first `ack` data frames (all but ACK/NACK) it received
//    16    8 key       WRITE, READ: target region key; NACK: sequence number of
//                      the refused WRITE; READ_RESP: sequence number of the
//                      READ it answers; HELLO: magic "ZWTCP\0v1"; else 0
//    24    8 offset    WRITE, READ: byte offset in the target region; HELLO:
//                      wire version (1); else 0
//    32    8 length    WRITE/SEND/READ_RESP: payload bytes that follow the
//                      header; READ: bytes requested (no payload); else 0
//
// The connecting side sends HELLO first (once); then both sides send WRITE /
// SEND / READ / READ_RESP (data frames, numbered 1, 2, ... implicitly by
// order) and ACK / NACK (control frames, not numbered). A WRITE or SEND
// completes at its initiator when an `ack` covering it arrives; a NACK for
// it, which always precedes that ack on the wire, turns its completion into
// kOutOfRange. A READ is answered by exactly one READ_RESP, in request order:
// the target checks key and range against its own table as for a WRITE and
// either sends the bytes straight from its registered region (gather write)
// or a refusal code with no payload; the READ completes (kReadDone) when its
// READ_RESP has landed in the initiator's registered range. Acks of READ and
// READ_RESP frames complete nothing. Anything else (unknown type, nonzero
// reserved bits, oversize lengths, acks or nacks for frames never sent, a
// READ_RESP nobody asked for) is a corrupt stream and drops the connection.
//
// Data path: a WRITE payload leaves straight from the registered source
// buffer (gather write {header, payload}), and the target reads it straight
// into the registered target region (scatter read {region, small spill}).
// Only payload bytes that arrive in the same read as their header (at most
// one read buffer) are copied out of the receive buffer. READ_RESP payloads
// take the same two paths (gather from the target's region, scatter into the
// initiator's); a region being deregistered waits until no READ_RESP that
// gathers from it is still being handed to the socket.

#include "transport/tcp_backend.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <list>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/log.h"
#include "transport/backend_util.h"

namespace zipwire::transport {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;

constexpr size_t kHeaderBytes = internal::kMessageHeaderBytes;
constexpr uint64_t kHelloMagic = 0x317600504354575aull;  // "ZWTCP\0v1" little-endian
constexpr uint64_t kWireVersion = 1;
constexpr size_t kRxBufferBytes = 64 << 10;
// A payload still missing at least this much is read straight into its
// destination, with only this much spill room for the frames after it.
constexpr size_t kDirectReadMin = 4 << 10;
constexpr size_t kMaxBatchFrames = 256;
constexpr size_t kPayloadLowat = 1024 << 10;
constexpr size_t kMaxIovPerCall = 64;  // asio's per-syscall buffer limit

enum FrameType : uint8_t { kHello = 1, kWrite = 2, kSend = 3, kAck = 4, kNack = 5, kRead = 6, kReadResp = 7 };
enum NackCode : uint8_t { kNackUnknownKey = 1, kNackOutOfRange = 2 };

using internal::GetLE;
using internal::PutLE;

using Header = internal::MessageHeader;
using internal::DecodeHeader;
using internal::EncodeHeader;

using internal::RangeInside;

std::string EndpointString(const tcp::endpoint& ep) {
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

// An outbound data frame (WRITE or SEND); pooled, linked intrusively so the
// hot path never allocates. Lives from post until its ack (or failure).
struct Frame {
  Frame* next = nullptr;
  uint64_t seq = 0;
  uint64_t context = 0;
  uint8_t type = 0;
  const uint8_t* payload = nullptr;
  size_t payload_len = 0;
  std::vector<uint8_t> owned;  // PostSend's copy; capacity kept across reuse
  std::array<uint8_t, kHeaderBytes> hdr{};
  // READ_RESP: the target region it gathers from (re-checked at flush), and
  // whether it holds a pin on that region while handed to the socket.
  uint64_t region_key = 0;
  bool pinned = false;
};

struct FrameList {
  Frame* head = nullptr;
  Frame* tail = nullptr;
  bool empty() const { return head == nullptr; }
  void PushBack(Frame* f) {
    f->next = nullptr;
    if (tail)
      tail->next = f;
    else
      head = f;
    tail = f;
  }
  Frame* PopFront() {
    Frame* f = head;
    if (f) {
      head = f->next;
      if (!head) tail = nullptr;
      f->next = nullptr;
    }
    return f;
  }
  void Append(FrameList& other) {
    if (other.empty()) return;
    if (tail)
      tail->next = other.head;
    else
      head = other.head;
    tail = other.tail;
    other.head = other.tail = nullptr;
  }
};

struct Nack {
  uint64_t seq;
  uint8_t code;
};

// A PostRead waiting for its READ_RESP. The local range is looked up again
// when the answer arrives, so a region deregistered meanwhile is never written.
struct PendingRead {
  uint64_t seq = 0;
  uint64_t local_key = 0;
  uint64_t local_offset = 0;
  uint64_t length = 0;
  uint64_t context = 0;
};

// FIFO that grows and never shrinks: no allocation per read in steady state.
class ReadQueue {
 public:
  bool empty() const { return count_ == 0; }
  size_t size() const { return count_; }
  PendingRead& front() { return slots_[head_]; }
  void PushBack(const PendingRead& r) {
    if (count_ == slots_.size()) {
      std::vector<PendingRead> next(std::max<size_t>(64, slots_.size() * 2));
      for (size_t i = 0; i < count_; ++i) next[i] = slots_[(head_ + i) & (slots_.size() - 1)];
      slots_.swap(next);
      head_ = 0;
    }
    slots_[(head_ + count_) & (slots_.size() - 1)] = r;
    ++count_;
  }
  void PopFront() {
    head_ = (head_ + 1) & (slots_.size() - 1);
    --count_;
  }

 private:
  std::vector<PendingRead> slots_;
  size_t head_ = 0;
  size_t count_ = 0;
};

// A local registration and the READ_RESP frames gathering from it right now.
struct RegionEntry {
  MemoryRegion region;
  uint32_t pins = 0;   // READ_RESP frames handed to the socket, not yet written
  bool dying = false;  // DeregisterMemory is waiting for pins to drop
};

using internal::CompletionRing;

struct Connection {
  Connection(tcp::socket s, PeerId p, std::string addr)
      : sock(std::move(s)), peer(p), address(std::move(addr)), rxbuf(kRxBufferBytes) {}

  tcp::socket sock;
  const PeerId peer;
  const std::string address;
  int rcvlowat = 1;  // the socket's SO_RCVLOWAT, cached (progress thread only)

  // Guarded by TcpBackend::mu_ (posting threads touch these).
  bool open = true;  // written under both locks; read under either
  Status failure;    // why it closed (kPeerClosed / kCancelled)
  FrameList queue;   // posted, not yet handed to the socket
  uint64_t next_seq = 1;
  bool flush_posted = false;
  ReadQueue reads;  // our READs waiting for their READ_RESP, in request order

  // Progress state: touched only by whoever holds TcpBackend::progress_mu_.
  bool writing = false;  // an async_write is outstanding
  FrameList inflight;    // frames of the batch being written
  FrameList unacked;     // written, waiting for the peer's ack
  uint64_t written_seq = 0;
  uint64_t peer_acked = 0;
  std::deque<Nack> peer_nacks;  // NACKs received, in sequence order
  uint64_t rx_seq = 0;          // data frames from the peer fully processed
  uint64_t ack_sent = 0;        // highest rx_seq we have told the peer about
  bool ack_dirty = false;
  std::vector<Nack> nacks_out;                               // refusals not yet sent
  std::vector<std::array<uint8_t, kHeaderBytes>> ctrl_hdrs;  // ACK/NACK headers of the batch in flight
  std::vector<asio::const_buffer> iov;

  // Receive state.
  std::vector<uint8_t> rxbuf;
  size_t rx_begin = 0;
  size_t rx_end = 0;
  bool in_payload = false;
  Header cur;
  uint8_t* dest = nullptr;  // where the payload goes; nullptr discards it
  uint64_t remaining = 0;   // payload bytes still to come
  uint8_t refuse_code = 0;  // nonzero: the WRITE is refused (payload discarded)
  Status read_status;       // READ_RESP being received: how its READ completes
  uint64_t read_context = 0;
  std::vector<uint8_t> msg;
  size_t direct_len = 0;  // bytes of the outstanding read aimed at `dest`
  size_t read_requested = 0;
  bool read_deferred = false;
};

// An accepted socket that has not yet said HELLO.
struct PendingConn {
  explicit PendingConn(tcp::socket s) : sock(std::move(s)) {}
  tcp::socket sock;
  std::string address;
  std::array<uint8_t, kHeaderBytes> hello{};
};

class TcpBackend final : public Backend {
 public:
  TcpBackend(const BackendOptions& options, std::chrono::microseconds idle_progress,
             std::chrono::microseconds spin)
      : options_(options), idle_progress_(idle_progress), spin_(spin), self_(options.self) {
    caps_.name = "tcp";
    caps_.supports_write_imm = true;
    caps_.supports_remote = true;
    caps_.zero_copy = true;
    caps_.memory_kinds = {MemoryKind::kHost};
    caps_.max_control_bytes = kTcpMaxControlBytes;
    caps_.max_write_bytes = kTcpMaxWriteBytes;
    caps_.supports_read = true;
    last_activity_ns_.store(NowNs());
    helper_ = std::thread([this] { FallbackProgressLoop(); });
  }

  ~TcpBackend() override {
    Close();
    // Sockets must go before the io_context they are registered with.
    pending_.clear();
    acceptor_.reset();
    std::lock_guard lk(mu_);
    by_peer_.clear();
    conns_.clear();
  }

  const Capabilities& capabilities() const override { return caps_; }
  void SetLocalRank(PeerId self) override { self_.store(self); }

  Result<std::string> Listen() override;
  Status Connect(PeerId peer, const std::string& address) override;
  Result<MemoryRegion> RegisterMemory(void* addr, size_t length, MemoryKind kind) override;
  Status DeregisterMemory(const MemoryRegion& region) override;
  Status PostWrite(PeerId peer, const MemoryRegion& local, uint64_t local_offset, const RemoteRegion& remote,
                   uint64_t remote_offset, uint64_t length, uint32_t imm, uint64_t context) override;
  Status PostRead(PeerId peer, const MemoryRegion& local, uint64_t local_offset, const RemoteRegion& remote,
                  uint64_t remote_offset, uint64_t length, uint64_t context) override;
  Status PostSend(PeerId peer, std::span<const uint8_t> message, uint64_t context) override;
  size_t Poll(std::span<Completion> out, std::chrono::milliseconds timeout) override;
  void Close() override;

 private:
  enum class Owner : int { kNone, kPoll, kFallback, kOther };

  static int64_t NowNs() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  }
  void Touch() { last_activity_ns_.store(NowNs(), std::memory_order_relaxed); }

  // Posting side (any thread).
  Frame* AllocFrameLocked();
  Status QueueFrameLocked(PeerId peer, Frame* f, Connection** out);
  Status CheckLocalRangeLocked(const char* op, const MemoryRegion& local, uint64_t local_offset,
                               uint64_t length);
  // Bounded wait for progress_mu_. Uses the system clock because libstdc++
  // implements steady-clock timed locks with pthread_mutex_clocklock, which
  // ThreadSanitizer (gcc 12) does not see; a jump of the wall clock merely
  // shortens or stretches a wait of a millisecond or two.
  bool TryLockProgressFor(Clock::duration d) {
    if (d <= Clock::duration::zero()) return progress_mu_.try_lock();
    return progress_mu_.try_lock_until(std::chrono::system_clock::now() + d);
  }
  bool AcquireProgressForPost();
  void ReleaseProgress();
  void Kick(Connection* c);
  void RunOnProgress(std::function<void()> fn);

  // Progress side (progress_mu_ held).
  void Flush(Connection* c);
  void OnWritten(Connection* c, const error_code& ec);
  void WriteDone(Connection* c);
  void CompleteAcked(Connection* c);
  bool ApplyAck(Connection* c, uint64_t ack);
  void StartRead(Connection* c);
  void OnRead(Connection* c, const error_code& ec, size_t n);
  bool Process(Connection* c);
  bool HandleHeader(Connection* c, const Header& h);
  bool DropCorrupt(Connection* c, const std::string& what) {
    Fail(c, "malformed frame: " + what);
    return false;
  }
  bool HandleRead(Connection* c, const Header& h);
  bool HandleReadResp(Connection* c, const Header& h);
  void UnpinLocked(Frame* f);
  void DropConnectionsGatheringFrom(uint64_t key);
  void FinishPayload(Connection* c);
  void Fail(Connection* c, const std::string& reason);
  void Shut(Connection* c, const Status& status, bool emit_peer_error);
  void FlushDeferredAcks();
  void BeforeWait();
  void StartAccept();
  void OnAccept(const error_code& ec, tcp::socket s);
  void OnHello(PendingConn* p, const error_code& ec);
  Connection* AddConnectionLocked(tcp::socket s, PeerId peer, std::string address);
  void PushCompletionLocked(Completion c);
  void FallbackProgressLoop();

  BackendOptions options_;
  std::chrono::microseconds idle_progress_;
  std::chrono::microseconds spin_;
  Capabilities caps_;
  std::atomic<PeerId> self_;

  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_{io_.get_executor()};

  // Serialises everything that touches sockets and progress state: handlers
  // run only inside Poll / the fallback thread / a direct post, under it.
  std::timed_mutex progress_mu_;
  std::atomic<Owner> owner_{Owner::kNone};

  // Guards the fields below, plus Connection's post-side fields.
  std::mutex mu_;
  std::condition_variable cq_cv_;
  int cq_waiters_ = 0;
  bool closed_ = false;
  std::atomic<bool> closed_flag_{false};
  CompletionRing completions_;
  std::unordered_map<uint64_t, RegionEntry> regions_;
  uint64_t next_key_ = 1;
  std::vector<std::unique_ptr<Connection>> conns_;  // every connection ever made (handlers hold raw pointers)
  std::unordered_map<PeerId, Connection*> by_peer_;  // the current connection per peer
  std::vector<std::unique_ptr<Frame>> frames_;       // owns every frame
  std::vector<Frame*> free_frames_;

  std::unique_ptr<tcp::acceptor> acceptor_;  // set under mu_ once, then used by progress

  // Progress-only.
  std::list<std::unique_ptr<PendingConn>> pending_;
  std::vector<Connection*> ack_dirty_;
  std::vector<Connection*> read_deferred_;
  std::mutex listen_mu_;
  std::string listen_address_;  // guarded by listen_mu_

  std::atomic<int64_t> last_activity_ns_{0};
  std::mutex helper_mu_;
  std::condition_variable helper_cv_;
  bool helper_stop_ = false;
  std::thread helper_;
};

// ---------------------------------------------------------------------------
// Registration

Result<MemoryRegion> TcpBackend::RegisterMemory(void* addr, size_t length, MemoryKind kind) {
  if (kind != MemoryKind::kHost) {
    return NotSupported(std::string("the tcp backend has no CUDA memory path (") + MemoryKindName(kind) +
                        " memory); stage through registered host memory");
  }
  if (addr == nullptr || length == 0) return InvalidArgument("RegisterMemory: null address or zero length");
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("tcp backend closed");
  MemoryRegion r{addr, length, kind, next_key_++};
  regions_.emplace(r.key, RegionEntry{r});
  return r;
}

// A READ_RESP gathering from the region may sit in an unfinished socket write
// (the peer is slow to read): the region leaves the table for new requests at
// once, but the call returns only when no such write references it any more.
// The wait makes progress itself where nobody else does; a peer that does not
// drain its socket within connect_timeout loses its connection, which ends
// every write referencing the memory.
Status TcpBackend::DeregisterMemory(const MemoryRegion& region) {
  std::unique_lock lk(mu_);
  auto it = regions_.find(region.key);
  if (it == regions_.end() || it->second.dying || it->second.region.addr != region.addr) {
    return NotFound("DeregisterMemory: key " + std::to_string(region.key) + " is not a live registration");
  }
  if (it->second.pins == 0) {
    regions_.erase(it);
    return Status::Ok();
  }
  it->second.dying = true;
  const uint64_t key = region.key;
  const auto deadline = Clock::now() + options_.connect_timeout;
  auto pins = [&] { return regions_.find(key)->second.pins; };
  bool drop_posted = false;
  while (pins() > 0) {
    lk.unlock();
    const bool late = Clock::now() >= deadline;
    if (progress_mu_.try_lock()) {
      owner_.store(Owner::kOther);
      if (late) {
        DropConnectionsGatheringFrom(key);
      } else {
        io_.poll();
      }
      ReleaseProgress();
    } else if (late && !drop_posted) {
      // A poller holds progress (perhaps asleep in the reactor): it runs this.
      drop_posted = true;
      asio::post(io_, [this, key] { DropConnectionsGatheringFrom(key); });
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    lk.lock();
  }
  regions_.erase(key);
  return Status::Ok();
}

// Progress side: fails the connections whose unfinished socket write still
// gathers from region `key` (their peers stopped reading).
void TcpBackend::DropConnectionsGatheringFrom(uint64_t key) {
  std::vector<Connection*> stuck;
  {
    std::lock_guard g(mu_);
    for (auto& c : conns_) {
      for (Frame* f = c->inflight.head; f && c->open; f = f->next) {
        if (f->pinned && f->region_key == key) {
          stuck.push_back(c.get());
          break;
        }
      }
    }
  }
  for (Connection* c : stuck) Fail(c, "it did not read a response from a region being deregistered");
}

// Progress side, mu_ held: a READ_RESP no longer references its region.
void TcpBackend::UnpinLocked(Frame* f) {
  if (!f->pinned) return;
  f->pinned = false;
  auto it = regions_.find(f->region_key);
  if (it != regions_.end() && it->second.pins > 0) --it->second.pins;
}

// ---------------------------------------------------------------------------
// Posting

Frame* TcpBackend::AllocFrameLocked() {
  if (free_frames_.empty()) {
    frames_.push_back(std::make_unique<Frame>());
    return frames_.back().get();
  }
  Frame* f = free_frames_.back();
  free_frames_.pop_back();
  f->payload = nullptr;
  f->payload_len = 0;
  f->region_key = 0;
  f->pinned = false;
  return f;
}

Status TcpBackend::CheckLocalRangeLocked(const char* op, const MemoryRegion& local, uint64_t local_offset,
                                         uint64_t length) {
  auto reg = regions_.find(local.key);
  const bool live = reg != regions_.end() && !reg->second.dying && reg->second.region.addr == local.addr &&
                    reg->second.region.length == local.length;
  ZW_RETURN_IF_ERROR(internal::CheckLocalRange(op, local, live, local_offset, length));
  return internal::CheckPostLength(op, length, kTcpMaxWriteBytes);
}

Status TcpBackend::QueueFrameLocked(PeerId peer, Frame* f, Connection** out) {
  auto it = by_peer_.find(peer);
  if (it == by_peer_.end()) {
    free_frames_.push_back(f);
    return FailedPrecondition("peer " + std::to_string(peer) + " is not connected");
  }
  Connection* c = it->second;
  if (!c->open) {
    free_frames_.push_back(f);
    return c->failure;
  }
  f->seq = c->next_seq++;
  c->queue.PushBack(f);
  *out = c;
  return Status::Ok();
}

Status TcpBackend::PostWrite(PeerId peer, const MemoryRegion& local, uint64_t local_offset,
                             const RemoteRegion& remote, uint64_t remote_offset, uint64_t length,
                             uint32_t imm, uint64_t context) {
  ZW_RETURN_IF_ERROR(internal::CheckRemoteRange("PostWrite", remote, remote_offset, length));
  Touch();
  Connection* c = nullptr;
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("tcp backend closed");
    ZW_RETURN_IF_ERROR(CheckLocalRangeLocked("PostWrite", local, local_offset, length));
    Frame* f = AllocFrameLocked();
    f->type = kWrite;
    f->context = context;
    f->payload = static_cast<const uint8_t*>(local.addr) + local_offset;
    f->payload_len = length;
    Header h;
    h.type = kWrite;
    h.imm = imm;
    h.key = remote.key;
    h.offset = remote_offset;
    h.length = length;
    EncodeHeader(h, f->hdr.data());
    ZW_RETURN_IF_ERROR(QueueFrameLocked(peer, f, &c));
  }
  Kick(c);
  return Status::Ok();
}

Status TcpBackend::PostRead(PeerId peer, const MemoryRegion& local, uint64_t local_offset,
                            const RemoteRegion& remote, uint64_t remote_offset, uint64_t length,
                            uint64_t context) {
  ZW_RETURN_IF_ERROR(internal::CheckRemoteRange("PostRead", remote, remote_offset, length));
  Touch();
  Connection* c = nullptr;
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("tcp backend closed");
    ZW_RETURN_IF_ERROR(CheckLocalRangeLocked("PostRead", local, local_offset, length));
    Frame* f = AllocFrameLocked();
    f->type = kRead;
    f->context = context;
    Header h;
    h.type = kRead;
    h.key = remote.key;
    h.offset = remote_offset;
    h.length = length;
    EncodeHeader(h, f->hdr.data());
    ZW_RETURN_IF_ERROR(QueueFrameLocked(peer, f, &c));
    c->reads.PushBack(PendingRead{f->seq, local.key, local_offset, length, context});
  }
  Kick(c);
  return Status::Ok();
}

Status TcpBackend::PostSend(PeerId peer, std::span<const uint8_t> message, uint64_t context) {
  if (message.size() > kTcpMaxControlBytes) {
    return InvalidArgument("PostSend of " + std::to_string(message.size()) +
                           " bytes exceeds max_control_bytes " + std::to_string(kTcpMaxControlBytes));
  }
  Touch();
  Connection* c = nullptr;
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("tcp backend closed");
    Frame* f = AllocFrameLocked();
    f->type = kSend;
    f->context = context;
    f->owned.assign(message.begin(), message.end());
    f->payload = f->owned.data();
    f->payload_len = message.size();
    Header h;
    h.type = kSend;
    h.length = message.size();
    EncodeHeader(h, f->hdr.data());
    ZW_RETURN_IF_ERROR(QueueFrameLocked(peer, f, &c));
  }
  Kick(c);
  return Status::Ok();
}

// Takes the progress lock for work a posting thread can do itself. A thread
// blocked in Poll holds it for long, so that case is left to the poller
// (which asio::post wakes); anyone else holds it briefly and is waited for.
bool TcpBackend::AcquireProgressForPost() {
  if (progress_mu_.try_lock()) return true;
  if (owner_.load() == Owner::kPoll) return false;
  return TryLockProgressFor(std::chrono::milliseconds(2));
}

void TcpBackend::ReleaseProgress() {
  owner_.store(Owner::kNone);
  progress_mu_.unlock();
}

// Gets a freshly queued frame onto the wire: directly from this thread when
// possible, else handed to the thread driving progress.
void TcpBackend::Kick(Connection* c) {
  if (AcquireProgressForPost()) {
    owner_.store(Owner::kOther);
    Flush(c);
    ReleaseProgress();
    return;
  }
  {
    std::lock_guard lk(mu_);
    if (c->flush_posted) return;
    c->flush_posted = true;
  }
  asio::post(io_, [this, c] {
    {
      std::lock_guard lk(mu_);
      c->flush_posted = false;
    }
    Flush(c);
  });
}

void TcpBackend::RunOnProgress(std::function<void()> fn) {
  if (AcquireProgressForPost()) {
    owner_.store(Owner::kOther);
    fn();
    ReleaseProgress();
    return;
  }
  asio::post(io_, std::move(fn));
}

// ---------------------------------------------------------------------------
// Sending (progress_mu_ held)

void TcpBackend::Flush(Connection* c) {
  while (c->open && !c->writing) {
    FrameList batch;
    {
      std::lock_guard lk(mu_);
      for (size_t i = 0; i < kMaxBatchFrames && !c->queue.empty(); ++i) {
        Frame* f = c->queue.PopFront();
        if (f->type == kReadResp && f->payload_len > 0) {
          // The region may have gone since the READ was accepted: then the
          // answer becomes a refusal; else it is pinned until written.
          auto it = regions_.find(f->region_key);
          if (it == regions_.end() || it->second.dying) {
            f->hdr[1] = kNackUnknownKey;
            PutLE<uint64_t>(f->hdr.data() + 32, 0);
            f->payload = nullptr;
            f->payload_len = 0;
          } else {
            ++it->second.pins;
            f->pinned = true;
          }
        }
        batch.PushBack(f);
      }
    }
    const bool ack_due = c->rx_seq > c->ack_sent;
    if (batch.empty() && c->nacks_out.empty() && !ack_due) return;

    // NACKs go first: the acks stamped on everything after them cover the
    // refused frames, and the initiator must learn of a refusal before that.
    c->ctrl_hdrs.clear();
    c->iov.clear();
    for (const Nack& n : c->nacks_out) {
      Header h;
      h.type = kNack;
      h.code = n.code;
      h.ack = c->rx_seq;
      h.key = n.seq;
      EncodeHeader(h, c->ctrl_hdrs.emplace_back().data());
    }
    c->nacks_out.clear();
    if (batch.empty() && c->ctrl_hdrs.empty()) {
      Header h;
      h.type = kAck;
      h.ack = c->rx_seq;
      EncodeHeader(h, c->ctrl_hdrs.emplace_back().data());
    }
    for (auto& h : c->ctrl_hdrs) c->iov.emplace_back(h.data(), h.size());
    for (Frame* f = batch.head; f; f = f->next) {
      PutLE<uint64_t>(f->hdr.data() + 8, c->rx_seq);  // piggy-backed ack
      c->iov.emplace_back(f->hdr.data(), f->hdr.size());
      if (f->payload_len) c->iov.emplace_back(f->payload, f->payload_len);
      c->written_seq = f->seq;
    }
    c->ack_sent = c->rx_seq;
    c->inflight = batch;

    // Try to finish the batch right here; go async only for what the socket
    // buffer cannot take now.
    size_t i = 0;
    error_code ec;
    while (i < c->iov.size()) {
      size_t n = std::min(kMaxIovPerCall, c->iov.size() - i);
      size_t w = c->sock.write_some(std::span<const asio::const_buffer>(c->iov.data() + i, n), ec);
      if (ec) break;
      while (w > 0) {
        if (w >= c->iov[i].size()) {
          w -= c->iov[i].size();
          ++i;
        } else {
          c->iov[i] += w;
          w = 0;
        }
      }
    }
    if (ec == asio::error::would_block || ec == asio::error::try_again) {
      c->writing = true;
      asio::async_write(c->sock, std::span<const asio::const_buffer>(c->iov.data() + i, c->iov.size() - i),
                        [this, c](const error_code& e, size_t) { OnWritten(c, e); });
      return;
    }
    if (ec) {
      Fail(c, "send failed: " + ec.message());
      return;
    }
    WriteDone(c);
  }
}

void TcpBackend::OnWritten(Connection* c, const error_code& ec) {
  c->writing = false;
  if (!c->open) {
    // Already failed and reported; the frames can be reused now that the
    // socket no longer references them.
    std::lock_guard lk(mu_);
    while (Frame* f = c->inflight.PopFront()) free_frames_.push_back(f);
    return;
  }
  if (ec) {
    Fail(c, "send failed: " + ec.message());
    return;
  }
  WriteDone(c);
  Flush(c);
}

void TcpBackend::WriteDone(Connection* c) {
  for (Frame* f = c->inflight.head; f; f = f->next) {
    if (f->pinned) {
      std::lock_guard lk(mu_);
      UnpinLocked(f);
    }
  }
  c->unacked.Append(c->inflight);
  CompleteAcked(c);
}

void TcpBackend::CompleteAcked(Connection* c) {
  if (c->unacked.empty() || c->unacked.head->seq > c->peer_acked) return;
  std::lock_guard lk(mu_);
  while (!c->unacked.empty() && c->unacked.head->seq <= c->peer_acked) {
    Frame* f = c->unacked.PopFront();
    if (f->type == kRead || f->type == kReadResp) {
      // A READ completes with its READ_RESP; a READ_RESP completes nothing.
      // (A NACK naming one is a confused peer's; it must not shift the rest.)
      if (!c->peer_nacks.empty() && c->peer_nacks.front().seq == f->seq) c->peer_nacks.pop_front();
      free_frames_.push_back(f);
      continue;
    }
    Completion done;
    done.type = f->type == kWrite ? CompletionType::kWriteDone : CompletionType::kSendDone;
    done.peer = c->peer;
    done.context = f->context;
    if (!c->peer_nacks.empty() && c->peer_nacks.front().seq == f->seq) {
      Header h = DecodeHeader(f->hdr.data());
      const char* why = c->peer_nacks.front().code == kNackUnknownKey
                            ? "the key is not registered there"
                            : "the range is outside its registration";
      done.status =
          OutOfRange("peer " + std::to_string(c->peer) + " (" + c->address + ") refused the write of " +
                     std::to_string(h.length) + " bytes at offset " + std::to_string(h.offset) +
                     " of region key " + std::to_string(h.key) + ": " + why);
      c->peer_nacks.pop_front();
    }
    PushCompletionLocked(std::move(done));
    free_frames_.push_back(f);
  }
}

bool TcpBackend::ApplyAck(Connection* c, uint64_t ack) {
  if (ack == c->peer_acked) return true;
  if (ack < c->peer_acked || ack > c->written_seq) {
    Fail(c, "malformed frame: ack " + std::to_string(ack) + " outside [" + std::to_string(c->peer_acked) +
                ", " + std::to_string(c->written_seq) + "]");
    return false;
  }
  c->peer_acked = ack;
  CompleteAcked(c);
  return true;
}

void TcpBackend::FlushDeferredAcks() {
  for (Connection* c : ack_dirty_) {
    c->ack_dirty = false;
    if (c->open && !c->writing && c->rx_seq > c->ack_sent) Flush(c);
  }
  ack_dirty_.clear();
}

// ---------------------------------------------------------------------------
// Receiving (progress_mu_ held)

// While a large payload streams in, wake the reader only once a good part of
// it has queued (SO_RCVLOWAT, never above what the payload still needs, so
// the wait always ends): on loopback the sender pays for every wake-up.
void SetRcvLowat(Connection* c, size_t want) {
  int lowat = static_cast<int>(std::min<size_t>(want, kPayloadLowat));
  if (lowat < 1) lowat = 1;
  if (lowat == c->rcvlowat) return;
  if (setsockopt(c->sock.native_handle(), SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof(lowat)) == 0) {
    c->rcvlowat = lowat;
  }
}

void TcpBackend::StartRead(Connection* c) {
  if (!c->open) return;
  SetRcvLowat(c, c->in_payload && c->dest != nullptr && c->remaining >= kDirectReadMin ? c->remaining : 1);
  if (c->in_payload && c->dest != nullptr && c->remaining >= kDirectReadMin) {
    // The receive buffer is empty here: the payload goes straight into its
    // destination, and whatever follows it spills into the buffer.
    c->direct_len = c->remaining;
    c->read_requested = c->remaining + kDirectReadMin;
    std::array<asio::mutable_buffer, 2> bufs{asio::buffer(c->dest, c->remaining),
                                             asio::buffer(c->rxbuf.data(), kDirectReadMin)};
    c->sock.async_read_some(bufs, [this, c](const error_code& ec, size_t n) { OnRead(c, ec, n); });
    return;
  }
  c->direct_len = 0;
  c->read_requested = c->rxbuf.size() - c->rx_end;
  c->sock.async_read_some(asio::buffer(c->rxbuf.data() + c->rx_end, c->rxbuf.size() - c->rx_end),
                          [this, c](const error_code& ec, size_t n) { OnRead(c, ec, n); });
}

void TcpBackend::OnRead(Connection* c, const error_code& ec, size_t n) {
  if (!c->open) return;
  if (ec) {
    Fail(c, ec == asio::error::eof ? std::string("connection closed by peer") : ec.message());
    return;
  }
  const bool drained = n < c->read_requested;
  if (c->direct_len > 0) {
    size_t d = std::min(n, c->direct_len);
    c->dest += d;
    c->remaining -= d;
    n -= d;
    c->direct_len = 0;
    if (c->remaining == 0) FinishPayload(c);
  }
  c->rx_end += n;
  if (!Process(c)) return;
  if (!c->nacks_out.empty()) Flush(c);  // refusals are not deferred
  // Mid-payload there is nothing for the owner to act on yet: keep reading.
  if (drained && !c->in_payload) {
    // A short read drained the socket, so the next read would most likely
    // find nothing; issue it only when the poller is about to wait, which
    // keeps that syscall out of a ping-pong's critical path.
    if (!c->read_deferred) {
      c->read_deferred = true;
      read_deferred_.push_back(c);
    }
    return;
  }
  StartRead(c);
}

void TcpBackend::BeforeWait() {
  for (Connection* c : read_deferred_) {
    c->read_deferred = false;
    StartRead(c);
  }
  read_deferred_.clear();
  FlushDeferredAcks();
}

bool TcpBackend::Process(Connection* c) {
  while (true) {
    size_t avail = c->rx_end - c->rx_begin;
    if (c->in_payload) {
      if (avail == 0) break;
      size_t k = static_cast<size_t>(std::min<uint64_t>(avail, c->remaining));
      if (c->dest) {
        std::memcpy(c->dest, c->rxbuf.data() + c->rx_begin, k);
        c->dest += k;
      }
      c->rx_begin += k;
      c->remaining -= k;
      if (c->remaining == 0) FinishPayload(c);
      continue;
    }
    if (avail < kHeaderBytes) break;
    Header h = DecodeHeader(c->rxbuf.data() + c->rx_begin);
    c->rx_begin += kHeaderBytes;
    if (!HandleHeader(c, h)) return false;
  }
  if (c->rx_begin == c->rx_end) {
    c->rx_begin = c->rx_end = 0;
  } else if (c->rx_begin > 0) {
    // A partial header: move it to the front so the next read completes it.
    std::memmove(c->rxbuf.data(), c->rxbuf.data() + c->rx_begin, c->rx_end - c->rx_begin);
    c->rx_end -= c->rx_begin;
    c->rx_begin = 0;
  }
  return true;
}

bool TcpBackend::HandleHeader(Connection* c, const Header& h) {
  auto corrupt = [&](const std::string& what) {
    Fail(c, "malformed frame: " + what);
    return false;
  };
  if (h.reserved != 0) return corrupt("reserved bits set");
  switch (h.type) {
    case kAck:
      if (h.code || h.imm || h.key || h.offset || h.length) return corrupt("ACK with nonzero fields");
      return ApplyAck(c, h.ack);
    case kNack: {
      if ((h.code != kNackUnknownKey && h.code != kNackOutOfRange) || h.imm || h.offset || h.length) {
        return corrupt("bad NACK");
      }
      uint64_t last =
          c->peer_nacks.empty() ? c->peer_acked : std::max(c->peer_acked, c->peer_nacks.back().seq);
      if (h.key <= last || h.key > c->written_seq || h.ack < h.key) {
        return corrupt("NACK for sequence " + std::to_string(h.key) + " that is not outstanding");
      }
      c->peer_nacks.push_back(Nack{h.key, h.code});
      return ApplyAck(c, h.ack);
    }
    case kWrite: {
      if (h.code) return corrupt("WRITE with nonzero code");
      if (h.length > kTcpMaxWriteBytes) return corrupt("WRITE of " + std::to_string(h.length) + " bytes");
      if (!ApplyAck(c, h.ack)) return false;
      c->cur = h;
      c->in_payload = true;
      c->remaining = h.length;
      c->dest = nullptr;
      c->refuse_code = 0;
      {
        // Never trust the initiator's idea of our region: check our table.
        std::lock_guard lk(mu_);
        auto it = regions_.find(h.key);
        if (it == regions_.end() || it->second.dying) {
          c->refuse_code = kNackUnknownKey;
        } else if (!RangeInside(h.offset, h.length, it->second.region.length)) {
          c->refuse_code = kNackOutOfRange;
        } else {
          c->dest = static_cast<uint8_t*>(it->second.region.addr) + h.offset;
        }
      }
      if (c->remaining == 0) FinishPayload(c);
      return true;
    }
    case kSend:
      if (h.code || h.imm || h.key || h.offset) return corrupt("SEND with nonzero fields");
      if (h.length > kTcpMaxControlBytes) return corrupt("SEND of " + std::to_string(h.length) + " bytes");
      if (!ApplyAck(c, h.ack)) return false;
      c->cur = h;
      c->in_payload = true;
      c->remaining = h.length;
      c->refuse_code = 0;
      c->msg.assign(h.length, 0);
      c->dest = c->msg.data();
      if (c->remaining == 0) FinishPayload(c);
      return true;
    case kRead:
      return HandleRead(c, h);
    case kReadResp:
      return HandleReadResp(c, h);
    case kHello:
      return corrupt("unexpected HELLO");
    default:
      return corrupt("unknown frame type " + std::to_string(h.type));
  }
}

// A peer's READ: checked against our table exactly as a WRITE would be, and
// answered in order by a READ_RESP that gathers straight from the region.
bool TcpBackend::HandleRead(Connection* c, const Header& h) {
  if (h.code || h.imm) return DropCorrupt(c, "READ with nonzero fields");
  if (h.length > kTcpMaxWriteBytes) return DropCorrupt(c, "READ of " + std::to_string(h.length) + " bytes");
  if (!ApplyAck(c, h.ack)) return false;
  ++c->rx_seq;
  {
    std::lock_guard lk(mu_);
    uint8_t refuse = 0;
    auto it = regions_.find(h.key);
    if (it == regions_.end() || it->second.dying) {
      refuse = kNackUnknownKey;
    } else if (!RangeInside(h.offset, h.length, it->second.region.length)) {
      refuse = kNackOutOfRange;
    }
    if (refuse != 0) {
      ZW_LOG(kWarn, "tcp: refused READ from peer "
                        << c->peer << " (" << c->address << "): key " << h.key << " offset " << h.offset
                        << " length " << h.length
                        << (refuse == kNackUnknownKey ? ": unknown key" : ": outside region"));
    }
    Frame* f = AllocFrameLocked();
    f->type = kReadResp;
    f->context = 0;
    if (refuse == 0) {
      f->payload = static_cast<const uint8_t*>(it->second.region.addr) + h.offset;
      f->payload_len = h.length;
      f->region_key = h.key;
    }
    Header r;
    r.type = kReadResp;
    r.code = refuse;
    r.key = c->rx_seq;  // the READ's number in the peer's sequence
    r.length = refuse == 0 ? h.length : 0;
    EncodeHeader(r, f->hdr.data());
    // The connection is open (we are reading from it), so this cannot fail.
    f->seq = c->next_seq++;
    c->queue.PushBack(f);
  }
  if (!c->ack_dirty) {
    c->ack_dirty = true;
    ack_dirty_.push_back(c);
  }
  return true;
}

// The answer to our oldest outstanding READ: lands in the local range named
// at post time, looked up again now.
bool TcpBackend::HandleReadResp(Connection* c, const Header& h) {
  if (h.imm || h.offset) return DropCorrupt(c, "READ_RESP with nonzero fields");
  if (!ApplyAck(c, h.ack)) return false;
  // The READ stays queued until its bytes have landed, so that a connection
  // failing mid-payload fails it with the rest.
  PendingRead want;
  {
    std::lock_guard lk(mu_);
    // Fail takes mu_ itself; decide under the lock, act after it.
    if (!c->reads.empty() && c->reads.front().seq == h.key) want = c->reads.front();
  }
  if (want.seq == 0)
    return DropCorrupt(c, "READ_RESP for READ " + std::to_string(h.key) + " not outstanding");
  if (h.code == 0 ? h.length != want.length
                  : (h.code != kNackUnknownKey && h.code != kNackOutOfRange) || h.length != 0) {
    return DropCorrupt(c, "READ_RESP does not match READ " + std::to_string(h.key));
  }
  c->cur = h;
  c->in_payload = true;
  c->remaining = h.length;
  c->dest = nullptr;
  c->refuse_code = 0;
  c->read_context = want.context;
  c->read_status = Status::Ok();
  if (h.code != 0) {
    c->read_status = OutOfRange("peer " + std::to_string(c->peer) + " (" + c->address +
                                ") refused the read of " + std::to_string(want.length) + " bytes: " +
                                (h.code == kNackUnknownKey ? "the key is not registered there"
                                                           : "the range is outside its registration"));
  } else {
    std::lock_guard lk(mu_);
    auto it = regions_.find(want.local_key);
    if (it == regions_.end() || it->second.dying ||
        !RangeInside(want.local_offset, want.length, it->second.region.length)) {
      c->read_status = FailedPrecondition("read of " + std::to_string(want.length) +
                                          " bytes: local region key " + std::to_string(want.local_key) +
                                          " was deregistered before the data arrived; discarded");
    } else {
      c->dest = static_cast<uint8_t*>(it->second.region.addr) + want.local_offset;
    }
  }
  if (c->remaining == 0) FinishPayload(c);
  return true;
}

void TcpBackend::FinishPayload(Connection* c) {
  c->in_payload = false;
  ++c->rx_seq;
  if (c->cur.type == kReadResp) {
    std::lock_guard lk(mu_);
    c->reads.PopFront();
    Completion done;
    done.type = CompletionType::kReadDone;
    done.status = std::move(c->read_status);
    c->read_status = Status::Ok();
    done.peer = c->peer;
    done.context = c->read_context;
    done.length = c->cur.length;
    PushCompletionLocked(std::move(done));
  } else if (c->refuse_code != 0) {
    ZW_LOG(kWarn, "tcp: refused WRITE from peer "
                      << c->peer << " (" << c->address << "): key " << c->cur.key << " offset "
                      << c->cur.offset << " length " << c->cur.length
                      << (c->refuse_code == kNackUnknownKey ? ": unknown key" : ": outside region"));
    c->nacks_out.push_back(Nack{c->rx_seq, c->refuse_code});
  } else {
    Completion got;
    got.peer = c->peer;
    if (c->cur.type == kWrite) {
      got.type = CompletionType::kWriteImm;
      got.imm = c->cur.imm;
      got.key = c->cur.key;
      got.offset = c->cur.offset;
      got.length = c->cur.length;
    } else {
      got.type = CompletionType::kRecvMessage;
      got.message = std::move(c->msg);
      c->msg = {};
    }
    std::lock_guard lk(mu_);
    PushCompletionLocked(std::move(got));
  }
  if (!c->ack_dirty) {
    c->ack_dirty = true;
    ack_dirty_.push_back(c);
  }
}

// ---------------------------------------------------------------------------
// Failure and close (progress_mu_ held)

void TcpBackend::Fail(Connection* c, const std::string& reason) {
  if (!c->open) return;
  Status st = PeerClosed("peer " + std::to_string(c->peer) + " (" + c->address + ") disconnected: " + reason);
  ZW_LOG(kInfo, "tcp: " << st.ToString());
  Shut(c, st, /*emit_peer_error=*/true);
}

void TcpBackend::Shut(Connection* c, const Status& status, bool emit_peer_error) {
  error_code ignored;
  c->sock.close(ignored);
  std::lock_guard lk(mu_);
  c->open = false;
  c->failure = status;
  auto fail_all = [&](FrameList& list, bool recycle) {
    for (Frame* f = list.head; f; f = f->next) {
      // The socket is closed: nothing gathers from a pinned region any more.
      UnpinLocked(f);
      if (f->type == kRead || f->type == kReadResp) continue;  // reads fail below
      Completion done;
      done.type = f->type == kWrite ? CompletionType::kWriteDone : CompletionType::kSendDone;
      done.status = status;
      done.peer = c->peer;
      done.context = f->context;
      PushCompletionLocked(std::move(done));
    }
    if (recycle) {
      while (Frame* f = list.PopFront()) free_frames_.push_back(f);
    }
  };
  // In posting order: written and unacked, being written, queued.
  fail_all(c->unacked, true);
  fail_all(c->inflight, !c->writing);  // an outstanding write still references these
  fail_all(c->queue, true);
  c->peer_nacks.clear();
  while (!c->reads.empty()) {
    Completion done;
    done.type = CompletionType::kReadDone;
    done.status = status;
    done.peer = c->peer;
    done.context = c->reads.front().context;
    c->reads.PopFront();
    PushCompletionLocked(std::move(done));
  }
  if (emit_peer_error) {
    Completion err;
    err.type = CompletionType::kPeerError;
    err.status = status;
    err.peer = c->peer;
    PushCompletionLocked(std::move(err));
  }
}

void TcpBackend::Close() {
  {
    std::lock_guard lk(mu_);
    if (closed_) return;
    closed_ = true;
    closed_flag_.store(true);
  }
  {
    std::lock_guard lk(helper_mu_);
    helper_stop_ = true;
  }
  helper_cv_.notify_all();
  if (helper_.joinable()) helper_.join();
  io_.stop();  // gets a Poll blocked in the reactor out promptly
  std::lock_guard pl(progress_mu_);
  error_code ignored;
  tcp::acceptor* acceptor = nullptr;
  {
    std::lock_guard lk(mu_);
    acceptor = acceptor_.get();
  }
  if (acceptor) acceptor->close(ignored);
  for (auto& p : pending_) p->sock.close(ignored);
  std::vector<Connection*> open;
  {
    std::lock_guard lk(mu_);
    for (auto& c : conns_) {
      if (c->open) open.push_back(c.get());
    }
  }
  const Status cancelled = Cancelled("tcp backend closed");
  for (Connection* c : open) {
    // Best effort: acknowledge what already landed so the peer's writes that
    // did complete here are not reported as failed.
    if (!c->writing && c->rx_seq > c->ack_sent) {
      std::array<uint8_t, kHeaderBytes> ack{};
      Header h;
      h.type = kAck;
      h.ack = c->rx_seq;
      EncodeHeader(h, ack.data());
      c->sock.write_some(asio::buffer(ack), ignored);
    }
    Shut(c, cancelled, /*emit_peer_error=*/false);
  }
  std::lock_guard lk(mu_);
  cq_cv_.notify_all();
}

// ---------------------------------------------------------------------------
// Connection setup

Result<std::string> TcpBackend::Listen() {
  Touch();
  std::lock_guard listen_lock(listen_mu_);
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("tcp backend closed");
  }
  if (!listen_address_.empty())
    return FailedPrecondition("tcp backend already listening on " + listen_address_);
  error_code ec;
  auto address = asio::ip::make_address(options_.listen_host, ec);
  if (ec) {
    tcp::resolver resolver(io_);
    auto results = resolver.resolve(options_.listen_host, std::to_string(options_.listen_port), ec);
    if (ec || results.empty()) {
      return Unavailable("cannot resolve listen host '" + options_.listen_host + "': " + ec.message());
    }
    address = results.begin()->endpoint().address();
  }
  tcp::endpoint ep(address, options_.listen_port);
  auto acc = std::make_unique<tcp::acceptor>(io_);
  std::string where = options_.listen_host + ":" + std::to_string(options_.listen_port);
  if (acc->open(ep.protocol(), ec) || acc->set_option(asio::socket_base::reuse_address(true), ec) ||
      acc->bind(ep, ec) || acc->listen(asio::socket_base::max_listen_connections, ec)) {
    return Unavailable("cannot listen on " + where + ": " + ec.message());
  }
  uint16_t port = acc->local_endpoint(ec).port();
  listen_address_ = options_.listen_host + ":" + std::to_string(port);
  {
    std::lock_guard lk(mu_);
    acceptor_ = std::move(acc);
  }
  RunOnProgress([this] {
    if (!closed_flag_.load()) StartAccept();
  });
  return listen_address_;
}

void TcpBackend::StartAccept() {
  acceptor_->async_accept([this](const error_code& ec, tcp::socket s) { OnAccept(ec, std::move(s)); });
}

void TcpBackend::OnAccept(const error_code& ec, tcp::socket s) {
  if (closed_flag_.load() || ec == asio::error::operation_aborted) return;
  if (ec) {
    // E.g. out of descriptors: keep serving, but do not spin on the error.
    ZW_LOG(kWarn, "tcp: accept failed: " << ec.message());
    auto timer = std::make_shared<asio::steady_timer>(io_, std::chrono::milliseconds(10));
    timer->async_wait([this, timer](const error_code& e) {
      if (!e && !closed_flag_.load()) StartAccept();
    });
    return;
  }
  error_code ignored;
  s.set_option(tcp::no_delay(true), ignored);
  auto p = std::make_unique<PendingConn>(std::move(s));
  auto remote = p->sock.remote_endpoint(ignored);
  p->address = ignored ? std::string("?") : EndpointString(remote);
  PendingConn* raw = p.get();
  pending_.push_back(std::move(p));
  asio::async_read(raw->sock, asio::buffer(raw->hello),
                   [this, raw](const error_code& e, size_t) { OnHello(raw, e); });
  StartAccept();
}

void TcpBackend::OnHello(PendingConn* raw, const error_code& ec) {
  if (closed_flag_.load()) return;
  auto it = std::find_if(pending_.begin(), pending_.end(), [raw](const auto& p) { return p.get() == raw; });
  if (it == pending_.end()) return;
  std::unique_ptr<PendingConn> p = std::move(*it);
  pending_.erase(it);
  if (ec) {
    ZW_LOG(kWarn, "tcp: dropping connection from " << p->address << " before its hello: " << ec.message());
    return;
  }
  Header h = DecodeHeader(p->hello.data());
  std::string bad;
  if (h.type != kHello || h.key != kHelloMagic) {
    bad = "not a zipwire tcp hello";
  } else if (h.offset != kWireVersion) {
    bad = "wire version " + std::to_string(h.offset) + ", expected " + std::to_string(kWireVersion);
  } else if (h.code || h.reserved || h.ack || h.length) {
    bad = "malformed hello";
  } else if (h.imm == kInvalidPeer || h.imm == self_.load()) {
    bad = "invalid rank " + std::to_string(h.imm);
  }
  Connection* c = nullptr;
  if (bad.empty()) {
    std::lock_guard lk(mu_);
    auto existing = by_peer_.find(h.imm);
    if (existing != by_peer_.end() && existing->second->open) {
      bad = "duplicate rank " + std::to_string(h.imm) + " (already connected via " +
            existing->second->address + ")";
    } else {
      c = AddConnectionLocked(std::move(p->sock), h.imm, p->address);
      Completion up;
      up.type = CompletionType::kPeerConnected;
      up.peer = h.imm;
      PushCompletionLocked(std::move(up));
    }
  }
  if (!bad.empty()) {
    ZW_LOG(kWarn, "tcp: dropping connection from " << p->address << ": " << bad);
    return;  // p's socket closes here
  }
  StartRead(c);
}

Connection* TcpBackend::AddConnectionLocked(tcp::socket s, PeerId peer, std::string address) {
  error_code ignored;
  s.non_blocking(true, ignored);  // direct writes must never block the caller
  conns_.push_back(std::make_unique<Connection>(std::move(s), peer, std::move(address)));
  Connection* c = conns_.back().get();
  by_peer_[peer] = c;
  return c;
}

Status TcpBackend::Connect(PeerId peer, const std::string& address) {
  Touch();
  const PeerId self = self_.load();
  if (self == kInvalidPeer) return FailedPrecondition("Connect: call SetLocalRank first");
  if (peer == kInvalidPeer || peer == self) {
    return InvalidArgument("Connect: invalid peer rank " + std::to_string(peer));
  }
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("tcp backend closed");
    auto it = by_peer_.find(peer);
    if (it != by_peer_.end() && it->second->open) {
      return Status(StatusCode::kAlreadyExists,
                    "peer " + std::to_string(peer) + " is already connected (" + it->second->address + ")");
    }
  }
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return InvalidArgument("Connect: address '" + address + "' is not host:port");
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  std::string port = address.substr(colon + 1);

  error_code ec;
  tcp::resolver resolver(io_);
  auto endpoints = resolver.resolve(host, port, asio::ip::resolver_base::numeric_service, ec);
  if (ec || endpoints.empty()) {
    return Unavailable("cannot resolve peer " + std::to_string(peer) + " address " + address + ": " +
                       ec.message());
  }
  const tcp::endpoint ep = endpoints.begin()->endpoint();
  const auto deadline = Clock::now() + options_.connect_timeout;
  auto ms_left = [&] {
    return std::max<int64_t>(
        0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
  };

  tcp::socket s(io_);
  std::string last_error = "timed out";
  while (true) {
    if (closed_flag_.load()) return Cancelled("tcp backend closed");
    error_code ignored;
    s.close(ignored);
    s.open(ep.protocol(), ec);
    if (ec) return IoError("socket: " + ec.message());
    s.non_blocking(true, ignored);
    // Non-blocking connect + poll so connect_timeout bounds even a
    // blackholed address.
    int rc = ::connect(s.native_handle(), ep.data(), static_cast<socklen_t>(ep.size()));
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      pollfd pfd{s.native_handle(), POLLOUT, 0};
      int pr = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(ms_left(), 100)));
      if (pr == 0) {
        err = ETIMEDOUT;
      } else {
        socklen_t len = sizeof(err);
        if (::getsockopt(s.native_handle(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      }
    }
    if (err == 0) break;
    last_error = std::strerror(err);
    const bool retry = err == ECONNREFUSED || err == ETIMEDOUT || err == ECONNRESET || err == EAGAIN ||
                       err == ECONNABORTED || err == EINTR;
    if (!retry || ms_left() == 0) {
      return Unavailable("cannot connect to peer " + std::to_string(peer) + " at " + address + " within " +
                         std::to_string(options_.connect_timeout.count()) + " ms: " + last_error);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min<int64_t>(ms_left(), 20)));
  }
  s.set_option(tcp::no_delay(true), ec);

  // HELLO goes out synchronously; a fresh socket's buffer always takes it.
  std::array<uint8_t, kHeaderBytes> hello{};
  Header h;
  h.type = kHello;
  h.imm = self;
  h.key = kHelloMagic;
  h.offset = kWireVersion;
  EncodeHeader(h, hello.data());
  size_t sent = 0;
  while (sent < hello.size()) {
    sent += s.write_some(asio::buffer(hello.data() + sent, hello.size() - sent), ec);
    if (ec == asio::error::would_block) {
      pollfd pfd{s.native_handle(), POLLOUT, 0};
      ::poll(&pfd, 1, static_cast<int>(std::max<int64_t>(ms_left(), 10)));
      ec.clear();
      if (ms_left() == 0) ec = asio::error::timed_out;
    }
    if (ec)
      return Unavailable("cannot send hello to peer " + std::to_string(peer) + " at " + address + ": " +
                         ec.message());
  }

  Connection* c = nullptr;
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("tcp backend closed");
    auto it = by_peer_.find(peer);
    if (it != by_peer_.end() && it->second->open) {
      return Status(StatusCode::kAlreadyExists,
                    "peer " + std::to_string(peer) + " connected meanwhile (" + it->second->address + ")");
    }
    c = AddConnectionLocked(std::move(s), peer, address);
  }
  RunOnProgress([this, c] { StartRead(c); });
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Completions and progress

void TcpBackend::PushCompletionLocked(Completion c) {
  completions_.Push(std::move(c));
  if (cq_waiters_ > 0) cq_cv_.notify_all();
}

size_t TcpBackend::Poll(std::span<Completion> out, std::chrono::milliseconds timeout) {
  if (out.empty()) return 0;
  const auto deadline = Clock::now() + timeout;
  Touch();
  {
    std::lock_guard lk(mu_);
    if (size_t n = completions_.PopInto(out)) return n;
    if (closed_) return 0;
  }
  std::unique_lock pl(progress_mu_, std::defer_lock);
  if (!pl.try_lock()) {
    // Someone else drives progress. Another poller may hold the lock for
    // long: take the completions it produces meanwhile. Anyone else (a post,
    // the fallback) holds it briefly: wait for the lock itself.
    while (true) {
      bool got = false;
      if (owner_.load() == Owner::kPoll) {
        {
          std::unique_lock lk(mu_);
          ++cq_waiters_;
          cq_cv_.wait_until(lk, std::min(deadline, Clock::now() + std::chrono::milliseconds(1)),
                            [&] { return !completions_.empty() || closed_; });
          --cq_waiters_;
          if (size_t n = completions_.PopInto(out)) return n;
          if (closed_) return 0;
        }
        got = progress_mu_.try_lock();
      } else {
        got = TryLockProgressFor(
            std::min<Clock::duration>(std::chrono::milliseconds(1), deadline - Clock::now()));
        if (!got) {
          std::lock_guard lk(mu_);
          if (size_t n = completions_.PopInto(out)) return n;
          if (closed_) return 0;
        }
      }
      if (got) {
        pl = std::unique_lock(progress_mu_, std::adopt_lock);
        break;
      }
      if (Clock::now() >= deadline) return 0;
    }
  }
  owner_.store(Owner::kPoll);
  size_t n = 0;
  bool ran = false;
  auto spin_until = Clock::time_point::min();
  while (true) {
    {
      std::lock_guard lk(mu_);
      n = completions_.PopInto(out);
      if (n > 0 || closed_) break;
    }
    // Nothing to hand back: acks held for piggy-backing go out, and reads
    // held back after draining a socket are issued.
    BeforeWait();
    const auto now = Clock::now();
    if (now >= deadline) {
      if (ran) break;
      io_.poll();
      ran = true;
      continue;
    }
    if (spin_until == Clock::time_point::min()) spin_until = std::min(deadline, now + spin_);
    if (now < spin_until) {
      // Busy-poll briefly before sleeping in the reactor: a sleep/wake-up
      // cycle costs more than a ping-pong's whole software path, and under
      // streaming load data is usually there within microseconds.
      io_.poll();
    } else {
      io_.run_one_until(deadline);
    }
    ran = true;
  }
  owner_.store(Owner::kNone);
  Touch();
  return n;
}

// Makes progress only while the owner is away (no Poll or post for
// idle_progress_): keeps acks flowing and connections served so a peer's
// completions never wait on this process calling Poll again.
void TcpBackend::FallbackProgressLoop() {
  const auto period = std::max<std::chrono::microseconds>(idle_progress_, std::chrono::microseconds(100));
  std::unique_lock lk(helper_mu_);
  while (!helper_stop_) {
    helper_cv_.wait_for(lk, period);
    if (helper_stop_) break;
    if (NowNs() - last_activity_ns_.load(std::memory_order_relaxed) <
        std::chrono::duration_cast<std::chrono::nanoseconds>(idle_progress_).count()) {
      continue;
    }
    if (!progress_mu_.try_lock()) continue;
    owner_.store(Owner::kFallback);
    if (!closed_flag_.load()) {
      BeforeWait();
      io_.poll();
      BeforeWait();
    }
    owner_.store(Owner::kNone);
    progress_mu_.unlock();
  }
}

}  // namespace

Result<std::unique_ptr<Backend>> CreateTcpBackend(const BackendOptions& options) {
  ZW_ASSIGN_OR_RETURN(uint64_t idle_us, EnvUint("TCP_IDLE_PROGRESS_US", 1000));
  if (idle_us == 0) return InvalidArgument("ZIPWIRE_TCP_IDLE_PROGRESS_US must be positive");
  ZW_ASSIGN_OR_RETURN(uint64_t spin_us, EnvUint("TCP_SPIN_US", 50));
  return std::unique_ptr<Backend>(
      new TcpBackend(options, std::chrono::microseconds(idle_us), std::chrono::microseconds(spin_us)));
}

}  // namespace zipwire::transport
