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
// Protocol (UCP AM ids; headers in host byte order: UCX itself assumes peers
// of one architecture). Every message is sent with UCP_AM_SEND_FLAG_REPLY so
// the receiver learns the endpoint it came from (never a claimed rank).
//
//   HELLO 1  client -> server, once: {u64 magic "ZWUCX\0v1", u32 version=1,
//            u32 rank}. The server refuses an invalid or duplicate rank by
//            closing the endpoint (the client's operations then fail with
//            kPeerClosed), else reports kPeerConnected(rank).
//   WRITE 2  {u64 ack, u64 key, u64 offset, u32 imm, u32 0} + payload.
//   SEND  3  {u64 ack} + payload (at most kUcxMaxControlBytes).
//   ACK   4  {u64 ack, u64 nack_seq, u32 code, u32 0}.
//
// Data messages (WRITE, SEND) are numbered 1, 2, ... per connection and
// direction in posting order; UCX delivers one endpoint's messages in order.
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
#include "transport/ucx_backend.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
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

enum AmId : unsigned { kAmHello = 1, kAmWrite = 2, kAmSend = 3, kAmAck = 4 };
enum NackCode : uint32_t { kNackUnknownKey = 1, kNackOutOfRange = 2, kNackNeedsRendezvous = 3 };

constexpr uint64_t kHelloMagic = 0x317600584355575aull;  // "ZWUCX\0v1" little-endian
constexpr uint32_t kWireVersion = 1;
// The target acks at least this often while it keeps receiving, so a sender
// with a deep queue is never starved of completions by a busy receiver.
constexpr uint64_t kAckEvery = 32;
constexpr int kMaxProgressRounds = 64;
constexpr auto kMaxSleepSlice = std::chrono::milliseconds(100);

struct HelloHdr {
  uint64_t magic;
  uint32_t version;
  uint32_t rank;
};
struct WriteHdr {
  uint64_t ack;
  uint64_t key;
  uint64_t offset;
  uint32_t imm;
  uint32_t reserved;
};
struct SendHdr {
  uint64_t ack;
};
struct AckHdr {
  uint64_t ack;
  uint64_t nack_seq;
  uint32_t code;
  uint32_t reserved;
};
constexpr size_t kMaxHdrBytes = 32;
static_assert(sizeof(WriteHdr) <= kMaxHdrBytes && sizeof(AckHdr) <= kMaxHdrBytes &&
              sizeof(HelloHdr) <= kMaxHdrBytes);

using internal::RangeInside;

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

using internal::CompletionRing;

class UcxBackend;
struct Conn;

enum class OpKind : uint8_t { kWrite, kSend, kCtrl };

// One outbound message. Pooled; lives until it is finished (its completion
// pushed, or for control messages at once) and UCX has released its request.
struct Op {
  OpKind kind = OpKind::kCtrl;
  bool hello = false;
  bool local_done = false;    // UCX no longer needs the source buffer
  bool finished = false;      // its completion went out (or it needs none)
  bool request_live = false;  // a UCX request still references this op
  Conn* conn = nullptr;
  uint64_t seq = 0;
  uint64_t context = 0;
  uint64_t key = 0;  // for refusal messages
  uint64_t offset = 0;
  uint64_t length = 0;
  Status status;               // OK, or why the target refused it
  std::vector<uint8_t> owned;  // PostSend's copy
  size_t hdr_len = 0;
  alignas(8) uint8_t hdr[kMaxHdrBytes] = {};  // UCX may read it until completion
};

// An inbound data message whose completion waits: for its rendezvous bytes,
// or behind one that does (completions go out in arrival order).
struct RxSlot {
  Conn* conn = nullptr;
  uint64_t seq = 0;
  bool ready = false;
  bool request_live = false;
  bool orphaned = false;  // its connection failed; freed by the UCX callback
  uint32_t nack = 0;
  Completion c;
};

enum class ConnState : uint8_t {
  kHandshake,   // passive side, waiting for the client's HELLO
  kConnecting,  // active side, inside Connect()
  kOpen,
  kClosed,
};

struct Conn {
  UcxBackend* backend = nullptr;
  ucp_ep_h ep = nullptr;
  PeerId peer = kInvalidPeer;
  std::string address;
  ConnState state = ConnState::kHandshake;
  Status failure;
  bool hello_done = false;
  // The application has been handed a completion carrying `failure`; from
  // then on posts fail at once. Before that, a post that races with the
  // failure is accepted and completes with it (as on tcp, where the failure
  // shows only once progress notices it).
  bool failure_reported = false;

  // Outbound.
  uint64_t next_seq = 1;
  uint64_t peer_acked = 0;
  std::deque<Op*> unacked;  // posting order

  // Inbound.
  uint64_t rx_seq = 0;   // data messages seen
  uint64_t rx_done = 0;  // data messages completed (in order)
  uint64_t ack_sent = 0;
  bool ack_queued = false;
  std::deque<RxSlot*> rx_pending;

  std::string Name() const { return "peer " + std::to_string(peer) + " (" + address + ")"; }
};

class UcxBackend final : public Backend {
 public:
  UcxBackend(const BackendOptions& options, std::chrono::microseconds spin,
             std::chrono::microseconds idle_progress, std::chrono::milliseconds connect_grace)
      : options_(options),
        spin_(spin),
        idle_progress_(idle_progress),
        connect_grace_(connect_grace),
        self_(options.self) {
    caps_.name = "ucx";
    caps_.supports_write_imm = true;
    caps_.supports_remote = true;
    caps_.zero_copy = true;
    caps_.memory_kinds = {MemoryKind::kHost};
    caps_.max_control_bytes = kUcxMaxControlBytes;
    caps_.max_write_bytes = kUcxMaxWriteBytes;
  }

  ~UcxBackend() override {
    Close();
    if (wake_fd_ >= 0) ::close(wake_fd_);
    for (RxSlot* s : orphans_) delete s;
  }

  Status Init();

  const Capabilities& capabilities() const override { return caps_; }
  void SetLocalRank(PeerId self) override { self_.store(self); }
  Result<std::string> Listen() override;
  Status Connect(PeerId peer, const std::string& address) override;
  Result<MemoryRegion> RegisterMemory(void* addr, size_t length, MemoryKind kind) override;
  Status DeregisterMemory(const MemoryRegion& region) override;
  Status PostWrite(PeerId peer, const MemoryRegion& local, uint64_t local_offset, const RemoteRegion& remote,
                   uint64_t remote_offset, uint64_t length, uint32_t imm, uint64_t context) override;
  Status PostSend(PeerId peer, std::span<const uint8_t> message, uint64_t context) override;
  size_t Poll(std::span<Completion> out, std::chrono::milliseconds timeout) override;
  void Close() override;

 private:
  struct Region {
    void* addr = nullptr;
    size_t length = 0;
    MemoryKind kind = MemoryKind::kHost;
    ucp_mem_h memh = nullptr;
  };

  // UCX callbacks (run inside ucp_worker_progress, so with mu_ held).
  static void SendCb(void* request, ucs_status_t status, void* user_data);
  static void RecvCb(void* request, ucs_status_t status, size_t length, void* user_data);
  static void CloseCb(void* request, ucs_status_t status, void* user_data);
  static void ErrCb(void* arg, ucp_ep_h ep, ucs_status_t status);
  static void ConnCb(ucp_conn_request_h request, void* arg);
  static ucs_status_t HelloCb(void* arg, const void* header, size_t header_length, void* data, size_t length,
                              const ucp_am_recv_param_t* param);
  static ucs_status_t WriteCb(void* arg, const void* header, size_t header_length, void* data, size_t length,
                              const ucp_am_recv_param_t* param);
  static ucs_status_t SendMsgCb(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t AckCb(void* arg, const void* header, size_t header_length, void* data, size_t length,
                            const ucp_am_recv_param_t* param);

  static int64_t NowNs() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  }
  void Touch() { last_activity_ns_.store(NowNs(), std::memory_order_relaxed); }
  void Wake();

  // Everything below runs with mu_ held.
  Conn* NewConnLocked(PeerId peer, std::string address, ConnState state);
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
  void CompleteFrontLocked(Conn* c);
  bool ApplyAckLocked(Conn* c, uint64_t ack);
  void DrainRxLocked(Conn* c);
  void RxDoneLocked(Conn* c, uint64_t seq, uint32_t nack, Completion* completion);
  void FailConnLocked(Conn* c, const Status& status, bool emit_peer_error);
  void ProtocolErrorLocked(Conn* c, const std::string& what);
  void CloseEpLocked(Conn* c, bool force = true);
  bool ProgressLocked();
  ucs_status_t OnHello(Conn* c, const void* header, size_t header_length);
  ucs_status_t OnData(Conn* c, bool is_write, const void* header, size_t header_length, void* data,
                      size_t length, const ucp_am_recv_param_t* param);
  void OnAck(Conn* c, const void* header, size_t header_length);

  void FallbackProgressLoop();

  BackendOptions options_;
  std::chrono::microseconds spin_;
  std::chrono::microseconds idle_progress_;
  std::chrono::milliseconds connect_grace_;
  Capabilities caps_;
  std::atomic<PeerId> self_;
  bool cuda_ = false;  // this UCX build handles CUDA memory

  // Guards all UCX calls and all state below: UCX runs in serialized mode and
  // its callbacks fire inside ucp_worker_progress, i.e. with mu_ held.
  std::mutex mu_;
  std::condition_variable pollers_cv_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_listener_h listener_ = nullptr;
  std::string listen_address_;
  int efd_ = -1;
  int wake_fd_ = -1;
  bool closed_ = false;
  int pollers_ = 0;                    // threads inside Poll
  int sleepers_ = 0;                   // of which asleep on the event fd
  std::unordered_set<void*> closing_;  // endpoint close requests in flight
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

  std::atomic<int64_t> last_activity_ns_{0};
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

  struct Handler {
    unsigned id;
    ucp_am_recv_callback_t cb;
  };
  for (const Handler& h : {Handler{kAmHello, &HelloCb}, Handler{kAmWrite, &WriteCb},
                           Handler{kAmSend, &SendMsgCb}, Handler{kAmAck, &AckCb}}) {
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
  Touch();
  helper_ = std::thread([this] { FallbackProgressLoop(); });
  return Status::Ok();
}

Result<std::string> UcxBackend::Listen() {
  Touch();
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("ucx backend closed");
  if (listener_) return FailedPrecondition("ucx backend already listening on " + listen_address_);
  sockaddr_storage ss{};
  socklen_t len = 0;
  const std::string where = options_.listen_host + ":" + std::to_string(options_.listen_port);
  Status rs = Resolve(options_.listen_host, std::to_string(options_.listen_port), true, &ss, &len);
  if (!rs.ok()) return rs.WithContext("cannot listen on " + where);
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
  lp.sockaddr.addrlen = len;
  lp.conn_handler.cb = &ConnCb;
  lp.conn_handler.arg = this;
  ucs_status_t st = ucp_listener_create(worker_, &lp, &listener_);
  if (st != UCS_OK) {
    listener_ = nullptr;
    return Unavailable("cannot listen on " + where + ": " + ucs_status_string(st));
  }
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  st = ucp_listener_query(listener_, &la);
  if (st != UCS_OK) return Internal(std::string("ucp_listener_query: ") + ucs_status_string(st));
  uint16_t port = 0;
  if (la.sockaddr.ss_family == AF_INET) {
    port = ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
  } else if (la.sockaddr.ss_family == AF_INET6) {
    port = ntohs(reinterpret_cast<const sockaddr_in6*>(&la.sockaddr)->sin6_port);
  }
  listen_address_ = options_.listen_host + ":" + std::to_string(port);
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

void UcxBackend::ConnCb(ucp_conn_request_h request, void* arg) {
  auto* self = static_cast<UcxBackend*>(arg);
  if (self->closed_) {
    ucp_listener_reject(self->listener_, request);
    return;
  }
  ucp_conn_request_attr_t attr{};
  attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  std::string address = "?";
  if (ucp_conn_request_query(request, &attr) == UCS_OK) {
    address = SockaddrString(reinterpret_cast<const sockaddr*>(&attr.client_address));
  }
  Conn* c = self->NewConnLocked(kInvalidPeer, address, ConnState::kHandshake);
  ucp_ep_params_t ep{};
  ep.field_mask =
      UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.conn_request = request;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &ErrCb;
  ep.err_handler.arg = c;
  ucs_status_t st = ucp_ep_create(self->worker_, &ep, &c->ep);
  if (st != UCS_OK) {
    ZW_LOG(kWarn, "ucx: cannot accept connection from " << address << ": " << ucs_status_string(st));
    c->ep = nullptr;
    c->state = ConnState::kClosed;
    return;
  }
  self->by_ep_[c->ep] = c;
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

  const auto deadline = Clock::now() + options_.connect_timeout;
  std::string last_error = "timed out";
  while (true) {
    Conn* c = nullptr;
    {
      std::lock_guard lk(mu_);
      if (closed_) return Cancelled("ucx backend closed");
      auto it = by_peer_.find(peer);
      if (it != by_peer_.end() && it->second->state != ConnState::kClosed) {
        return Status(StatusCode::kAlreadyExists,
                      "peer " + std::to_string(peer) + " is already connected (" + it->second->address + ")");
      }
      c = NewConnLocked(peer, address, ConnState::kConnecting);
      ucp_ep_params_t ep{};
      ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
      ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
      ep.sockaddr.addrlen = len;
      ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      ep.err_handler.cb = &ErrCb;
      ep.err_handler.arg = c;
      ucs_status_t st = ucp_ep_create(worker_, &ep, &c->ep);
      if (st != UCS_OK) {
        c->ep = nullptr;
        c->state = ConnState::kClosed;
        return Unavailable("cannot connect to peer " + std::to_string(peer) + " at " + address + ": " +
                           ucs_status_string(st));
      }
      by_ep_[c->ep] = c;
      Op* hello = AllocOpLocked(OpKind::kCtrl, c);
      hello->hello = true;
      HelloHdr h{kHelloMagic, kWireVersion, self};
      std::memcpy(hello->hdr, &h, sizeof(h));
      hello->hdr_len = sizeof(h);
      IssueLocked(hello, kAmHello, nullptr, 0, nullptr, MemoryKind::kHost, 0);
    }
    // The handshake needs the listener's progress. A refused or unreachable
    // address fails fast; a listener that has not made progress within the
    // grace period is assumed alive (a later failure fails the operations).
    // Each attempt gets at least 50 ms to show a refusal.
    const auto start = Clock::now();
    const auto attempt_end =
        std::max(std::min(deadline, start + connect_grace_), start + std::chrono::milliseconds(50));
    bool connected = false;
    while (true) {
      {
        std::lock_guard lk(mu_);
        if (closed_) return Cancelled("ucx backend closed");
        ProgressLocked();
        if (c->state == ConnState::kClosed && !c->hello_done) {
          last_error = c->failure.message();
          break;
        }
        const auto now = Clock::now();
        if (c->hello_done || now >= start + connect_grace_) {
          // Connected. If the listener already dropped us (e.g. a duplicate
          // rank), the operations posted next report it.
          if (c->state != ConnState::kClosed) {
            if (CurrentLogLevel() >= LogLevel::kDebug) ucp_ep_print_info(c->ep, stderr);  // lanes chosen
            c->state = ConnState::kOpen;
          }
          by_peer_[peer] = c;
          connected = true;
        } else if (now >= attempt_end) {
          FailConnLocked(c, Unavailable("no answer from the listener"), false);
          last_error = "no answer from the listener";
          break;
        }
      }
      if (connected) return Status::Ok();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    if (Clock::now() >= deadline) {
      return Unavailable("cannot connect to peer " + std::to_string(peer) + " at " + address + " within " +
                         std::to_string(options_.connect_timeout.count()) + " ms: " + last_error);
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    std::this_thread::sleep_for(std::min<std::chrono::milliseconds>(left, std::chrono::milliseconds(20)));
  }
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
  regions_.emplace(r.key, Region{addr, length, kind, memh});
  return r;
}

Status UcxBackend::DeregisterMemory(const MemoryRegion& region) {
  std::lock_guard lk(mu_);
  auto it = regions_.find(region.key);
  if (it == regions_.end() || it->second.addr != region.addr) {
    return NotFound("DeregisterMemory: key " + std::to_string(region.key) + " is not a live registration");
  }
  if (it->second.memh && context_) ucp_mem_unmap(context_, it->second.memh);
  regions_.erase(it);
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
  op->hello = false;
  op->local_done = false;
  op->finished = kind == OpKind::kCtrl;
  op->request_live = false;
  op->conn = c;
  op->seq = 0;
  op->status = Status::Ok();
  return op;
}

void UcxBackend::MaybeFreeOpLocked(Op* op) {
  if (op->finished && !op->request_live) free_ops_.push_back(op);
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
    if (op->hello) c->hello_done = true;
    MaybeFreeOpLocked(op);
    return;
  }
  if (UCS_PTR_IS_ERR(r)) {
    op->local_done = true;
    ucs_status_t st = UCS_PTR_STATUS(r);
    if (op->kind == OpKind::kCtrl) MaybeFreeOpLocked(op);
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
  if (!RangeInside(remote_offset, length, remote.length)) {
    return OutOfRange("PostWrite: remote range " + RangeString(remote_offset, length) +
                      " is outside remote region key " + std::to_string(remote.key) + " of " +
                      std::to_string(remote.length) + " bytes");
  }
  if (length > kUcxMaxWriteBytes) {
    return InvalidArgument("PostWrite of " + std::to_string(length) + " bytes exceeds max_write_bytes " +
                           std::to_string(kUcxMaxWriteBytes));
  }
  Touch();
  std::lock_guard lk(mu_);
  if (closed_) return Cancelled("ucx backend closed");
  auto reg = regions_.find(local.key);
  if (reg == regions_.end() || reg->second.addr != local.addr || reg->second.length != local.length) {
    return InvalidArgument("PostWrite: local region key " + std::to_string(local.key) +
                           " is not a live registration of this backend");
  }
  if (!RangeInside(local_offset, length, reg->second.length)) {
    return OutOfRange("PostWrite: local range " + RangeString(local_offset, length) +
                      " is outside local region key " + std::to_string(local.key) + " of " +
                      std::to_string(reg->second.length) + " bytes");
  }
  auto it = by_peer_.find(peer);
  if (it == by_peer_.end()) return FailedPrecondition("peer " + std::to_string(peer) + " is not connected");
  Conn* c = it->second;
  if (c->state == ConnState::kClosed) return FailedPostLocked(c, CompletionType::kWriteDone, context);
  Op* op = AllocOpLocked(OpKind::kWrite, c);
  op->seq = c->next_seq++;
  op->context = context;
  op->key = remote.key;
  op->offset = remote_offset;
  op->length = length;
  WriteHdr h{c->rx_done, remote.key, remote_offset, imm, 0};
  c->ack_sent = c->rx_done;  // piggy-backed
  std::memcpy(op->hdr, &h, sizeof(h));
  op->hdr_len = sizeof(h);
  c->unacked.push_back(op);
  // CUDA-capable builds send every write by rendezvous: the target then
  // places even small payloads with UCX's memory-type-aware copies.
  IssueLocked(op, kAmWrite, static_cast<const uint8_t*>(local.addr) + local_offset, length, reg->second.memh,
              reg->second.kind, cuda_ ? UCP_AM_SEND_FLAG_RNDV : 0);
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
  SendHdr h{c->rx_done};
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
  Completion done;
  done.type = op->kind == OpKind::kWrite ? CompletionType::kWriteDone : CompletionType::kSendDone;
  done.status = status;
  done.peer = op->conn->peer;
  done.context = op->context;
  PushCompletionLocked(std::move(done));
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
  if (op->kind == OpKind::kCtrl) {
    if (op->hello && status == UCS_OK) c->hello_done = true;
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
  self->CompleteFrontLocked(c);
}

// ---------------------------------------------------------------------------
// Receiving

Conn* UcxBackend::ConnOf(const ucp_am_recv_param_t* param) {
  if (closed_ || !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) return nullptr;
  auto it = by_ep_.find(param->reply_ep);
  return it == by_ep_.end() ? nullptr : it->second;
}

ucs_status_t UcxBackend::HelloCb(void* arg, const void* header, size_t header_length, void*, size_t,
                                 const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxBackend*>(arg);
  Conn* c = self->ConnOf(param);
  if (c == nullptr) return UCS_OK;
  return self->OnHello(c, header, header_length);
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

ucs_status_t UcxBackend::OnHello(Conn* c, const void* header, size_t header_length) {
  if (c->state != ConnState::kHandshake) {
    ProtocolErrorLocked(c, "unexpected hello");
    return UCS_OK;
  }
  HelloHdr h{};
  std::string bad;
  if (header_length != sizeof(h)) {
    bad = "malformed hello";
  } else {
    std::memcpy(&h, header, sizeof(h));
    if (h.magic != kHelloMagic) {
      bad = "not a zipwire ucx hello";
    } else if (h.version != kWireVersion) {
      bad = "wire version " + std::to_string(h.version) + ", expected " + std::to_string(kWireVersion);
    } else if (h.rank == kInvalidPeer || h.rank == self_.load()) {
      bad = "invalid rank " + std::to_string(h.rank);
    } else {
      auto it = by_peer_.find(h.rank);
      if (it != by_peer_.end() && it->second->state != ConnState::kClosed) {
        bad = "duplicate rank " + std::to_string(h.rank) + " (already connected via " + it->second->address +
              ")";
      }
    }
  }
  if (!bad.empty()) {
    ZW_LOG(kWarn, "ucx: dropping connection from " << c->address << ": " << bad);
    c->state = ConnState::kClosed;
    c->failure = PeerClosed("refused: " + bad);
    by_ep_.erase(c->ep);
    CloseEpLocked(c);
    return UCS_OK;
  }
  c->peer = h.rank;
  c->state = ConnState::kOpen;
  by_peer_[h.rank] = c;
  Completion up;
  up.type = CompletionType::kPeerConnected;
  up.peer = h.rank;
  PushCompletionLocked(std::move(up));
  return UCS_OK;
}

ucs_status_t UcxBackend::OnData(Conn* c, bool is_write, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
  if (c->state == ConnState::kHandshake) {
    ProtocolErrorLocked(c, "data before hello");
    return UCS_OK;
  }
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
    if (!ApplyAckLocked(c, h.ack)) return UCS_OK;
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
    if (!ApplyAckLocked(c, h.ack)) return UCS_OK;
    comp.type = CompletionType::kRecvMessage;
    comp.message.resize(length);
    dest = comp.message.data();
  }
  comp.peer = c->peer;
  slot.conn = c;
  slot.seq = ++c->rx_seq;
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
    RxDoneLocked(c, s->seq, s->nack, &s->c);
    delete s;
  }
}

void UcxBackend::RxDoneLocked(Conn* c, uint64_t seq, uint32_t nack, Completion* completion) {
  c->rx_done = seq;
  if (nack != 0) {
    // The refusal goes out now, ahead of any ack covering it; it acks
    // nothing new itself (earlier completions may not be handed out yet).
    SendAckLocked(c, c->ack_sent, seq, nack);
  } else {
    PushCompletionLocked(std::move(*completion));
  }
  if (!c->ack_queued) {
    c->ack_queued = true;
    ack_dirty_.push_back(c);
  }
}

void UcxBackend::OnAck(Conn* c, const void* header, size_t header_length) {
  if (c->state == ConnState::kHandshake) {
    ProtocolErrorLocked(c, "ack before hello");
    return;
  }
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
  }
  ApplyAckLocked(c, h.ack);
}

// ---------------------------------------------------------------------------
// Failure and shutdown

void UcxBackend::ErrCb(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* c = static_cast<Conn*>(arg);
  UcxBackend* self = c->backend;
  if (c->state == ConnState::kClosed) return;
  if (c->state == ConnState::kConnecting) {
    // Before the hello went through: a failed attempt (Connect retries).
    // After: the listener took the connection and then dropped it.
    self->FailConnLocked(c,
                         c->hello_done ? PeerClosed(c->Name() + " failed: " + ucs_status_string(status))
                                       : Unavailable(ucs_status_string(status)),
                         false);
    return;
  }
  if (c->state == ConnState::kHandshake) {
    c->state = ConnState::kClosed;
    self->by_ep_.erase(c->ep);
    self->CloseEpLocked(c);
    return;
  }
  self->FailConnLocked(c, PeerClosed(c->Name() + " failed: " + ucs_status_string(status)), true);
}

void UcxBackend::ProtocolErrorLocked(Conn* c, const std::string& what) {
  ZW_LOG(kWarn, "ucx: dropping connection " << c->Name() << ": " << what);
  if (c->state == ConnState::kHandshake) {
    c->state = ConnState::kClosed;
    by_ep_.erase(c->ep);
    CloseEpLocked(c);
    return;
  }
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
  for (RxSlot* s : c->rx_pending) {
    if (s->request_live) {
      s->orphaned = true;
      orphans_.insert(s);
    } else {
      delete s;
    }
  }
  c->rx_pending.clear();
  if (emit_peer_error && was_open) {
    Completion err;
    err.type = CompletionType::kPeerError;
    err.status = status;
    err.peer = c->peer;
    PushCompletionLocked(std::move(err));
  }
  CloseEpLocked(c);
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
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  if (force) {
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
  }
  prm.cb.send = &CloseCb;
  prm.user_data = this;
  ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &prm);
  if (r != nullptr && !UCS_PTR_IS_ERR(r)) closing_.insert(r);
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
    if ((c->state == ConnState::kOpen || c->state == ConnState::kConnecting) && c->rx_done > c->ack_sent) {
      SendAckLocked(c, c->rx_done);
    }
  }
  for (Conn* c : live) {
    if (c->state == ConnState::kHandshake) {
      c->state = ConnState::kClosed;
      by_ep_.erase(c->ep);
      CloseEpLocked(c);
      continue;
    }
    // With nothing of ours in flight, a flushing close gets those acks (and
    // e.g. a goodbye's ack) out before the disconnect reaches the peer;
    // otherwise the pending operations are cancelled and dropped.
    const bool idle = c->unacked.empty();
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
    if (ucp_worker_progress(worker_) == 0) {
      lk.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      lk.lock();
    }
  }
  for (void* r : closing_) ucp_request_free(r);  // UCX finishes them without us
  closing_.clear();
  if (listener_) {
    ucp_listener_destroy(listener_);
    listener_ = nullptr;
  }
  for (auto& [key, r] : regions_) {
    if (r.memh) ucp_mem_unmap(context_, r.memh);
    r.memh = nullptr;
  }
  ucp_worker_destroy(worker_);
  worker_ = nullptr;
  ucp_cleanup(context_);
  context_ = nullptr;
  efd_ = -1;
}

// ---------------------------------------------------------------------------
// Progress

bool UcxBackend::ProgressLocked() {
  bool any = false;
  for (int i = 0; i < kMaxProgressRounds && ucp_worker_progress(worker_) != 0; ++i) any = true;
  return any;
}

void UcxBackend::Wake() {
  uint64_t one = 1;
  ssize_t rc = ::write(wake_fd_, &one, sizeof(one));
  static_cast<void>(rc);  // EAGAIN: already signalled
}

size_t UcxBackend::Poll(std::span<Completion> out, std::chrono::milliseconds timeout) {
  if (out.empty()) return 0;
  const auto deadline = Clock::now() + timeout;
  Touch();
  std::unique_lock lk(mu_);
  if (size_t n = PopLocked(out)) return n;
  if (closed_) return 0;
  ++pollers_;
  const auto spin_until = std::min(deadline, Clock::now() + spin_);
  size_t n = 0;
  bool ran = false;
  while (!closed_) {
    ProgressLocked();
    if ((n = PopLocked(out)) > 0) break;
    // Nothing to hand back: acks held for piggy-backing go out now.
    FlushAcksLocked();
    const auto now = Clock::now();
    if (now >= deadline && ran) break;
    ran = true;
    if (now < spin_until || now >= deadline) {
      // Busy-poll briefly: a sleep / wake-up costs more than a ping-pong's
      // whole software path. Let posting threads in between rounds.
      lk.unlock();
      lk.lock();
      continue;
    }
    ucs_status_t st = ucp_worker_arm(worker_);
    if (st == UCS_ERR_BUSY) continue;  // events arrived meanwhile
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
    --sleepers_;
  }
  if (n == 0) n = PopLocked(out);
  if (--pollers_ == 0 && closed_) {
    pollers_cv_.notify_all();
    Wake();  // another poller may still be asleep
  }
  Touch();
  return n;
}

// Makes progress only while the owner is away (no Poll or post for
// idle_progress_): keeps acks flowing and connection requests served so a
// peer's completions never wait on this process calling Poll again.
void UcxBackend::FallbackProgressLoop() {
  const auto period = std::max<std::chrono::microseconds>(idle_progress_, std::chrono::microseconds(100));
  const int64_t idle_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(idle_progress_).count();
  std::unique_lock hl(helper_mu_);
  while (!helper_stop_) {
    helper_cv_.wait_for(hl, period);
    if (helper_stop_) break;
    if (NowNs() - last_activity_ns_.load(std::memory_order_relaxed) < idle_ns) continue;
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
  ZW_ASSIGN_OR_RETURN(uint64_t grace_ms, EnvUint("UCX_CONNECT_GRACE_MS", 1000));
  auto backend =
      std::make_unique<UcxBackend>(options, std::chrono::microseconds(spin_us),
                                   std::chrono::microseconds(idle_us), std::chrono::milliseconds(grace_ms));
  ZW_RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace zipwire::transport
