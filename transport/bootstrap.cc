// Bootstrap rendezvous: the scheduler service and the node-side client.
//
// Wire format (all integers little-endian)
// ----------------------------------------
// Frame:   [u32 length][u8 type][payload]
//          length counts type + payload: 1 <= length <= 65536. A prefix of 0
//          or above 64 KiB closes the connection as soon as its four bytes
//          arrive (the reader never waits for an oversize claim).
// string:  [u16 n][n bytes]; addresses are at most 255 bytes of "host:port"
//          (host: [A-Za-z0-9._-]+ or "[v6]", port: decimal 1..65535).
// role:    u8, 1 = worker, 2 = server.
//
// type  name             direction        payload
// 1     REGISTER         node -> sched    role, string transport_address
//                                         [, u32 requested_role_rank]
//                                         (absent or 0xffffffff: any index)
// 2     ASSIGN           sched -> node    u32 self_rank, u32 num_workers,
//                                         u32 num_servers, u32 count,
//                                         count x {u32 rank, role,
//                                                  u32 role_rank, string address}
//                                         count == W + S; entry i has rank i;
//                                         ranks < W are workers (role_rank =
//                                         rank), the rest servers (rank - W).
// 3     BARRIER          node -> sched    u32 seq (1, 2, ...; increasing per node)
// 4     BARRIER_RELEASE  sched -> node    u32 seq
// 5     LEAVE            node -> sched    (empty)
// 6     ERROR            sched -> node    u8 status code (1..kInternal), string reason
//
// Every payload must be consumed exactly (trailing bytes are an error).
//
// Session rules (scheduler side)
// ------------------------------
// * A connection must send a valid REGISTER within 10 s of accepting, and a
//   registered node must finish any frame it has started within 10 s
//   (slowloris guard); otherwise it is dropped.
// * Invalid input (bad length, unknown or misdirected type, truncated or
//   inconsistent payload, second REGISTER, BARRIER before ASSIGN) gets an
//   ERROR frame with the reason, a ZW_LOG(kWarn) line, and a graceful close of
//   that connection only.
// * A REGISTER beyond the expected count of its role gets ERROR
//   (FAILED_PRECONDITION) and is closed; the cluster being formed is untouched.
// * A node may ask for a fixed index within its role (as BytePS's
//   DMLC_WORKER_ID): an index outside the role's count gets ERROR
//   (INVALID_ARGUMENT), one already asked for by a registered node gets ERROR
//   (ALREADY_EXISTS) naming the holder. Once the last expected node registers,
//   nodes that asked get their index; the others fill the free indices in
//   registration order. A node that goes away before that frees its slot.
// * After ASSIGN, a node that disconnects without LEAVE is dead: it is logged,
//   every node waiting in a barrier gets ERROR (PEER_CLOSED) naming it, and so
//   does every later BARRIER, so no barrier waits on a dead peer. A node that
//   LEAVEs fails barriers the same way (they cannot complete without it).
#include "transport/bootstrap.h"

#include <algorithm>
#include <array>
#include <boost/asio.hpp>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>

#include "core/log.h"
#include "transport/bootstrap_wire.h"

namespace zipwire::transport {

const char* RoleName(Role role) {
  switch (role) {
    case Role::kWorker:
      return "worker";
    case Role::kServer:
      return "server";
  }
  return "unknown";
}

std::vector<NodeInfo> ClusterView::WithRole(Role role) const {
  std::vector<NodeInfo> out;
  for (const NodeInfo& node : nodes) {
    if (node.role == role) out.push_back(node);
  }
  return out;
}

namespace bootstrap_wire {
namespace {

// Untrusted bytes end up in log lines and error messages; keep them printable
// and short so a hostile peer cannot inject terminal escapes or megabytes.
std::string Printable(std::string_view s, size_t max_shown = 64) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_shown; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      static const char* kHex = "0123456789abcdef";
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  if (s.size() > max_shown) out += "...";
  return out;
}

uint32_t LoadU32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
}

class Writer {
 public:
  explicit Writer(uint8_t type) {
    buf_.resize(kLengthBytes);
    buf_.push_back(type);
  }
  void U8(uint8_t v) { buf_.push_back(v); }
  void U16(uint16_t v) {
    buf_.push_back(static_cast<uint8_t>(v));
    buf_.push_back(static_cast<uint8_t>(v >> 8));
  }
  void U32(uint32_t v) {
    for (int i = 0; i < 4; ++i) buf_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  // Strings longer than a u16 can carry are cut; only error reasons can be
  // that long, and they are informational.
  void Str(std::string_view s) {
    size_t n = std::min<size_t>(s.size(), 0xffff);
    U16(static_cast<uint16_t>(n));
    buf_.insert(buf_.end(), s.begin(), s.begin() + n);
  }
  void Bytes(std::span<const uint8_t> b) { buf_.insert(buf_.end(), b.begin(), b.end()); }
  std::vector<uint8_t> Finish() && {
    uint32_t len = static_cast<uint32_t>(buf_.size() - kLengthBytes);
    for (int i = 0; i < 4; ++i) buf_[i] = static_cast<uint8_t>(len >> (8 * i));
    return std::move(buf_);
  }

 private:
  std::vector<uint8_t> buf_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  bool U8(uint8_t* v) {
    if (remaining() < 1) return false;
    *v = in_[pos_++];
    return true;
  }
  bool U32(uint32_t* v) {
    if (remaining() < 4) return false;
    *v = LoadU32(in_.data() + pos_);
    pos_ += 4;
    return true;
  }
  bool Str(std::string* s) {
    if (remaining() < 2) return false;
    size_t n = static_cast<size_t>(in_[pos_]) | static_cast<size_t>(in_[pos_ + 1]) << 8;
    if (remaining() - 2 < n) return false;
    s->assign(reinterpret_cast<const char*>(in_.data() + pos_ + 2), n);
    pos_ += 2 + n;
    return true;
  }
  size_t remaining() const { return in_.size() - pos_; }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

Status Truncated(const char* what) { return Corrupt(std::string(what) + ": truncated payload"); }

Status CheckDone(const char* what, const Reader& r) {
  if (r.remaining() != 0) {
    return Corrupt(std::string(what) + ": " + std::to_string(r.remaining()) + " trailing bytes");
  }
  return Status::Ok();
}

Status CheckRole(const char* what, uint8_t raw, Role* role) {
  if (raw != static_cast<uint8_t>(Role::kWorker) && raw != static_cast<uint8_t>(Role::kServer)) {
    return Corrupt(std::string(what) + ": bad role " + std::to_string(raw));
  }
  *role = static_cast<Role>(raw);
  return Status::Ok();
}

Status CheckWireAddress(const char* what, const std::string& address) {
  Status st = ValidateAddress(address);
  if (!st.ok()) return Corrupt(std::string(what) + ": " + st.message());
  return Status::Ok();
}

bool IsHostChar(char c, bool bracketed) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  if (c == '.' || c == '-' || c == '_') return true;
  return bracketed && (c == ':' || c == '%');
}

}  // namespace

const char* MsgTypeName(uint8_t type) {
  switch (static_cast<MsgType>(type)) {
    case MsgType::kRegister:
      return "REGISTER";
    case MsgType::kAssign:
      return "ASSIGN";
    case MsgType::kBarrier:
      return "BARRIER";
    case MsgType::kBarrierRelease:
      return "BARRIER_RELEASE";
    case MsgType::kLeave:
      return "LEAVE";
    case MsgType::kError:
      return "ERROR";
  }
  return "UNKNOWN";
}

Status SplitAddress(std::string_view address, std::string* host, uint16_t* port) {
  auto bad = [&](const std::string& why) {
    return InvalidArgument("bad address \"" + Printable(address) + "\" (want host:port): " + why);
  };
  if (address.empty()) return bad("empty");
  if (address.size() > kMaxAddressBytes) return bad("longer than 255 bytes");
  size_t colon = address.rfind(':');
  if (colon == std::string_view::npos) return bad("no ':port'");
  std::string_view h = address.substr(0, colon);
  std::string_view p = address.substr(colon + 1);
  bool bracketed = false;
  if (!h.empty() && h.front() == '[') {
    if (h.size() < 3 || h.back() != ']') return bad("unterminated '['");
    h = h.substr(1, h.size() - 2);
    bracketed = true;
  }
  if (h.empty()) return bad("empty host");
  for (char c : h) {
    if (!IsHostChar(c, bracketed)) return bad("invalid character in host");
  }
  if (p.empty() || p.size() > 5) return bad("port is not 1..65535");
  uint32_t value = 0;
  for (char c : p) {
    if (c < '0' || c > '9') return bad("port is not a number");
    value = value * 10 + static_cast<uint32_t>(c - '0');
  }
  if (value == 0 || value > 65535) return bad("port is not 1..65535");
  if (host != nullptr) host->assign(h);
  if (port != nullptr) *port = static_cast<uint16_t>(value);
  return Status::Ok();
}

Status ValidateAddress(std::string_view address) { return SplitAddress(address, nullptr, nullptr); }

std::vector<uint8_t> EncodeFrame(uint8_t type, std::span<const uint8_t> payload) {
  Writer w(type);
  w.Bytes(payload);
  return std::move(w).Finish();
}

std::vector<uint8_t> EncodeRegister(const RegisterMsg& msg) {
  Writer w(static_cast<uint8_t>(MsgType::kRegister));
  w.U8(static_cast<uint8_t>(msg.role));
  w.Str(msg.address);
  if (msg.requested_role_rank != kAnyRoleRank) w.U32(msg.requested_role_rank);
  return std::move(w).Finish();
}

std::vector<uint8_t> EncodeAssign(const ClusterView& view) {
  Writer w(static_cast<uint8_t>(MsgType::kAssign));
  w.U32(view.self_rank);
  w.U32(view.num_workers);
  w.U32(view.num_servers);
  w.U32(static_cast<uint32_t>(view.nodes.size()));
  for (const NodeInfo& node : view.nodes) {
    w.U32(node.rank);
    w.U8(static_cast<uint8_t>(node.role));
    w.U32(node.role_rank);
    w.Str(node.address);
  }
  return std::move(w).Finish();
}

std::vector<uint8_t> EncodeBarrier(MsgType type, uint32_t seq) {
  Writer w(static_cast<uint8_t>(type));
  w.U32(seq);
  return std::move(w).Finish();
}

std::vector<uint8_t> EncodeLeave() { return Writer(static_cast<uint8_t>(MsgType::kLeave)).Finish(); }

std::vector<uint8_t> EncodeError(const ErrorMsg& msg) {
  Writer w(static_cast<uint8_t>(MsgType::kError));
  w.U8(static_cast<uint8_t>(msg.code));
  // Keep the frame well under the limit whatever the reason says.
  w.Str(std::string_view(msg.reason).substr(0, 4096));
  return std::move(w).Finish();
}

Result<RegisterMsg> DecodeRegister(std::span<const uint8_t> payload) {
  Reader r(payload);
  uint8_t role = 0;
  RegisterMsg msg;
  if (!r.U8(&role) || !r.Str(&msg.address)) return Truncated("REGISTER");
  ZW_RETURN_IF_ERROR(CheckRole("REGISTER", role, &msg.role));
  ZW_RETURN_IF_ERROR(CheckWireAddress("REGISTER", msg.address));
  if (r.remaining() > 0) {
    if (!r.U32(&msg.requested_role_rank)) return Truncated("REGISTER");
    // "Any index" is said by leaving the field out; an explicit 0xffffffff
    // would be a second spelling of it (one message, one encoding).
    if (msg.requested_role_rank == kAnyRoleRank) {
      return Corrupt("REGISTER: requested index 0xffffffff is reserved (leave the field out for any index)");
    }
  }
  ZW_RETURN_IF_ERROR(CheckDone("REGISTER", r));
  return msg;
}

Result<ClusterView> DecodeAssign(std::span<const uint8_t> payload) {
  constexpr size_t kMinEntryBytes = 4 + 1 + 4 + 2;
  Reader r(payload);
  ClusterView view;
  uint32_t count = 0;
  if (!r.U32(&view.self_rank) || !r.U32(&view.num_workers) || !r.U32(&view.num_servers) || !r.U32(&count)) {
    return Truncated("ASSIGN");
  }
  uint64_t total = uint64_t{view.num_workers} + view.num_servers;
  if (total != count || count == 0 || count > kMaxNodes) {
    return Corrupt("ASSIGN: counts inconsistent (" + std::to_string(view.num_workers) + " workers + " +
                   std::to_string(view.num_servers) + " servers, " + std::to_string(count) + " entries)");
  }
  if (view.self_rank >= count) {
    return Corrupt("ASSIGN: self rank " + std::to_string(view.self_rank) + " outside " +
                   std::to_string(count) + " nodes");
  }
  // Checked before reserving so a forged count cannot make us allocate.
  if (r.remaining() < count * kMinEntryBytes) return Truncated("ASSIGN");
  view.nodes.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    NodeInfo node;
    uint8_t role = 0;
    if (!r.U32(&node.rank) || !r.U8(&role) || !r.U32(&node.role_rank) || !r.Str(&node.address)) {
      return Truncated("ASSIGN");
    }
    ZW_RETURN_IF_ERROR(CheckRole("ASSIGN", role, &node.role));
    bool is_worker = i < view.num_workers;
    Role want_role = is_worker ? Role::kWorker : Role::kServer;
    uint32_t want_role_rank = is_worker ? i : i - view.num_workers;
    if (node.rank != i || node.role != want_role || node.role_rank != want_role_rank) {
      return Corrupt("ASSIGN: entry " + std::to_string(i) + " says rank " + std::to_string(node.rank) + ", " +
                     RoleName(node.role) + " " + std::to_string(node.role_rank) + "; want " +
                     RoleName(want_role) + " " + std::to_string(want_role_rank));
    }
    ZW_RETURN_IF_ERROR(CheckWireAddress("ASSIGN", node.address));
    view.nodes.push_back(std::move(node));
  }
  ZW_RETURN_IF_ERROR(CheckDone("ASSIGN", r));
  return view;
}

Result<BarrierMsg> DecodeBarrier(std::span<const uint8_t> payload) {
  Reader r(payload);
  BarrierMsg msg;
  if (!r.U32(&msg.seq)) return Truncated("BARRIER");
  ZW_RETURN_IF_ERROR(CheckDone("BARRIER", r));
  if (msg.seq == 0) return Corrupt("BARRIER: seq 0");
  return msg;
}

Status DecodeLeave(std::span<const uint8_t> payload) {
  Reader r(payload);
  return CheckDone("LEAVE", r);
}

Result<ErrorMsg> DecodeError(std::span<const uint8_t> payload) {
  Reader r(payload);
  uint8_t code = 0;
  ErrorMsg msg;
  if (!r.U8(&code) || !r.Str(&msg.reason)) return Truncated("ERROR");
  ZW_RETURN_IF_ERROR(CheckDone("ERROR", r));
  if (code == 0 || code > static_cast<uint8_t>(StatusCode::kInternal)) {
    return Corrupt("ERROR: bad status code " + std::to_string(code));
  }
  msg.code = static_cast<StatusCode>(code);
  msg.reason = Printable(msg.reason, 4096);
  return msg;
}

FrameSplitter::State FrameSplitter::Next(uint8_t* type, std::span<const uint8_t>* payload,
                                         std::string* error) {
  if (pos_ > 0) {
    buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(pos_));
    pos_ = 0;
  }
  if (buf_.size() < kLengthBytes) return State::kNeedMore;
  uint32_t len = LoadU32(buf_.data());
  if (len == 0) {
    *error = "zero frame length";
    return State::kError;
  }
  if (len > kMaxFrameBytes) {
    *error = "frame length " + std::to_string(len) + " exceeds " + std::to_string(kMaxFrameBytes);
    return State::kError;
  }
  if (buf_.size() - kLengthBytes < len) return State::kNeedMore;
  *type = buf_[kLengthBytes];
  *payload = std::span<const uint8_t>(buf_.data() + kLengthBytes + 1, len - 1);
  pos_ = kLengthBytes + len;
  return State::kFrame;
}

}  // namespace bootstrap_wire

namespace {

namespace asio = boost::asio;
namespace wire = bootstrap_wire;
using asio::ip::tcp;
using Clock = std::chrono::steady_clock;

constexpr auto kHandshakeTimeout = std::chrono::seconds(10);
// How long a closing connection may take to flush its last frame and see the
// peer's FIN before it is cut.
constexpr auto kLingerTimeout = std::chrono::seconds(2);
// A node that stops reading must not make the scheduler buffer without bound.
constexpr size_t kMaxQueuedBytes = 4u << 20;
// Connections that have not registered yet; beyond this new ones are refused
// so a connection flood cannot exhaust descriptors or memory.
constexpr size_t kMaxUnregistered = 256;

std::string Describe(const NodeInfo& node) {
  return std::string(RoleName(node.role)) + " " + std::to_string(node.role_rank) + " (rank " +
         std::to_string(node.rank) + ", " + node.address + ")";
}

std::string EndpointString(const tcp::socket& socket) {
  boost::system::error_code ec;
  tcp::endpoint ep = socket.remote_endpoint(ec);
  if (ec) return "?";
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

Result<std::vector<tcp::endpoint>> ResolveEndpoints(const std::string& host, uint16_t port) {
  boost::system::error_code ec;
  asio::ip::address addr = asio::ip::make_address(host, ec);
  if (!ec) return std::vector<tcp::endpoint>{tcp::endpoint(addr, port)};
  // Host names resolve synchronously: addresses are numeric in practice, and
  // getaddrinfo has its own bounded timeouts.
  asio::io_context ioc;
  tcp::resolver resolver(ioc);
  auto results = resolver.resolve(host, std::to_string(port), ec);
  if (ec) return Unavailable("cannot resolve " + host + ": " + ec.message());
  std::vector<tcp::endpoint> out;
  for (const auto& entry : results) out.push_back(entry.endpoint());
  if (out.empty()) return Unavailable("cannot resolve " + host + ": no addresses");
  return out;
}

// ---------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------

class SchedulerImpl;

// One accepted connection. Lives on the scheduler's io thread only.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(SchedulerImpl* owner, tcp::socket socket)
      : owner_(owner), socket_(std::move(socket)), timer_(socket_.get_executor()) {
    peer_ = EndpointString(socket_);
  }

  void Start() {
    ArmDeadline(kHandshakeTimeout);
    DoRead();
  }

  void Send(std::vector<uint8_t> frame);
  // Logs `reason`, tells the owner the node is gone, sends ERROR and closes.
  void Reject(StatusCode code, const std::string& reason);
  // Flushes queued frames, sends FIN and waits (bounded) for the peer's FIN.
  void CloseGracefully();
  // Immediate close with no callbacks (scheduler shutdown).
  void Abort() {
    phase_ = Phase::kClosed;
    boost::system::error_code ignored;
    timer_.cancel();
    socket_.close(ignored);
  }

  const std::string& peer() const { return peer_; }
  std::string Label() const;

  // Node state, owned by the scheduler.
  bool registered = false;
  bool left = false;
  bool gone = false;  // the scheduler has been told this node went away
  Role role = Role::kWorker;
  std::string address;
  uint32_t requested_role_rank = wire::kAnyRoleRank;
  int64_t rank = -1;  // assigned rank, -1 before ASSIGN
  uint32_t last_barrier_seq = 0;

 private:
  enum class Phase { kOpen, kDraining, kLinger, kClosed };

  void DoRead();
  void OnRead(const boost::system::error_code& ec, size_t n);
  void DoWrite();
  void OnWrite(const boost::system::error_code& ec);
  void ArmDeadline(std::chrono::steady_clock::duration d);
  void CancelDeadline();
  void UpdateDeadline();
  void OnDeadline();
  void StartLinger();
  void FinishClose();
  void LostPeer(const std::string& reason);

  SchedulerImpl* owner_;
  tcp::socket socket_;
  asio::steady_timer timer_;
  std::string peer_;
  Phase phase_ = Phase::kOpen;
  wire::FrameSplitter splitter_;
  std::array<uint8_t, 4096> rbuf_{};
  std::deque<std::vector<uint8_t>> wqueue_;
  size_t queued_bytes_ = 0;
  bool writing_ = false;
  bool timer_armed_ = false;
  uint64_t timer_gen_ = 0;
};

class SchedulerImpl final : public Scheduler {
 public:
  SchedulerImpl(uint32_t num_workers, uint32_t num_servers)
      : num_workers_(num_workers), num_servers_(num_servers), acceptor_(ioc_), accept_timer_(ioc_) {}
  ~SchedulerImpl() override { Stop(); }

  Status Listen(const std::string& host, uint16_t port);
  void Run() {
    DoAccept();
    thread_ = std::thread([this] {
      try {
        ioc_.run();
      } catch (const std::exception& e) {
        ZW_LOG(kError, "bootstrap scheduler: io thread died: " << e.what());
      }
    });
  }

  uint16_t port() const override { return port_; }
  Status WaitForShutdown(std::chrono::milliseconds timeout) override;
  void Stop() override;

  // Called by sessions on the io thread.
  void OnFrame(Session& s, uint8_t type, std::span<const uint8_t> payload);
  void OnGone(Session& s, const std::string& reason);
  void OnClosed(Session& s) { sessions_.erase(&s); }
  uint32_t num_nodes() const { return num_workers_ + num_servers_; }

 private:
  enum class SlotState { kAlive, kLeft, kDead };
  struct Slot {
    NodeInfo info;
    std::shared_ptr<Session> session;
    SlotState state = SlotState::kAlive;
    uint32_t waiting_seq = 0;  // barrier this node waits in, 0 if none
  };

  void DoAccept();
  void HandleRegister(Session& s, std::span<const uint8_t> payload);
  void HandleBarrier(Session& s, std::span<const uint8_t> payload);
  void HandleLeave(Session& s, std::span<const uint8_t> payload);
  void Assign();
  void NodeGone(uint32_t rank, SlotState state, const std::string& what);
  void RemovePending(Session& s);
  std::string BarrierFailure(uint32_t seq) const;
  void UpdateShutdown();

  const uint32_t num_workers_;
  const uint32_t num_servers_;
  uint16_t port_ = 0;

  // Declared first so that it is destroyed last: sockets and timers below
  // must go before their io_context.
  asio::io_context ioc_;
  tcp::acceptor acceptor_;
  asio::steady_timer accept_timer_;
  std::thread thread_;

  // io-thread state.
  bool stopping_ = false;
  std::unordered_map<Session*, std::shared_ptr<Session>> sessions_;
  size_t unregistered_ = 0;
  std::vector<std::shared_ptr<Session>> pending_[2];  // [0] workers, [1] servers
  bool assigned_ = false;
  std::vector<Slot> slots_;
  std::unordered_map<uint32_t, uint32_t> arrivals_;  // barrier seq -> nodes in it
  std::vector<std::string> gone_;                    // why barriers cannot complete

  // Shared with WaitForShutdown / Stop callers.
  std::mutex mu_;
  std::condition_variable cv_;
  bool shutdown_done_ = false;
  bool stopped_ = false;
  uint32_t active_nodes_ = 0;
};

std::string Session::Label() const {
  if (rank >= 0) {
    return std::string(RoleName(role)) + " rank " + std::to_string(rank) + " (" + address + ", from " +
           peer_ + ")";
  }
  if (registered) return std::string(RoleName(role)) + " " + address + " (from " + peer_ + ")";
  return "connection from " + peer_;
}

void Session::Send(std::vector<uint8_t> frame) {
  if (phase_ == Phase::kClosed || phase_ == Phase::kLinger) return;
  if (queued_bytes_ + frame.size() > kMaxQueuedBytes) {
    // The owner may drop its last references to us below.
    auto keep_alive = shared_from_this();
    ZW_LOG(kWarn,
           "bootstrap: dropping " << Label() << ": it does not read (" << queued_bytes_ << " bytes queued)");
    LostPeer("stopped reading");
    FinishClose();
    return;
  }
  queued_bytes_ += frame.size();
  wqueue_.push_back(std::move(frame));
  if (!writing_) DoWrite();
}

void Session::DoWrite() {
  writing_ = true;
  asio::async_write(
      socket_, asio::buffer(wqueue_.front()),
      [self = shared_from_this()](const boost::system::error_code& ec, size_t) { self->OnWrite(ec); });
}

void Session::OnWrite(const boost::system::error_code& ec) {
  writing_ = false;
  if (phase_ == Phase::kClosed) return;
  if (ec) {
    if (phase_ == Phase::kOpen) LostPeer("write failed: " + ec.message());
    FinishClose();
    return;
  }
  queued_bytes_ -= wqueue_.front().size();
  wqueue_.pop_front();
  if (!wqueue_.empty()) {
    DoWrite();
  } else if (phase_ == Phase::kDraining) {
    StartLinger();
  }
}

void Session::DoRead() {
  socket_.async_read_some(
      asio::buffer(rbuf_),
      [self = shared_from_this()](const boost::system::error_code& ec, size_t n) { self->OnRead(ec, n); });
}

void Session::OnRead(const boost::system::error_code& ec, size_t n) {
  if (phase_ == Phase::kClosed) return;
  if (ec) {
    if (phase_ == Phase::kOpen) {
      std::string why = ec == asio::error::eof ? "closed the connection" : ec.message();
      if (splitter_.pending() > 0) {
        why += " in the middle of a frame (" + std::to_string(splitter_.pending()) + " bytes)";
        ZW_LOG(kWarn, "bootstrap: " << Label() << " sent a truncated frame and " << why);
      }
      LostPeer(why);
    }
    FinishClose();
    return;
  }
  if (phase_ != Phase::kOpen) {  // closing: discard input until the peer's FIN
    DoRead();
    return;
  }
  splitter_.Append(rbuf_.data(), n);
  while (phase_ == Phase::kOpen) {
    uint8_t type = 0;
    std::span<const uint8_t> payload;
    std::string error;
    auto state = splitter_.Next(&type, &payload, &error);
    if (state == wire::FrameSplitter::State::kNeedMore) break;
    if (state == wire::FrameSplitter::State::kError) {
      Reject(StatusCode::kCorrupt, error);
      break;
    }
    owner_->OnFrame(*this, type, payload);
  }
  if (phase_ == Phase::kOpen) UpdateDeadline();
  if (phase_ != Phase::kClosed) DoRead();
}

void Session::ArmDeadline(std::chrono::steady_clock::duration d) {
  uint64_t gen = ++timer_gen_;
  timer_armed_ = true;
  timer_.expires_after(d);
  timer_.async_wait([self = shared_from_this(), gen](const boost::system::error_code& ec) {
    if (ec || gen != self->timer_gen_ || self->phase_ == Phase::kClosed) return;
    self->timer_armed_ = false;
    self->OnDeadline();
  });
}

void Session::CancelDeadline() {
  ++timer_gen_;
  timer_armed_ = false;
  timer_.cancel();
}

// The deadline runs while the connection has not registered (handshake) and
// while a registered node has a frame half sent; it is not pushed back by
// further bytes, so trickling a frame does not keep a connection alive.
void Session::UpdateDeadline() {
  bool need = !registered || splitter_.pending() > 0;
  if (need && !timer_armed_) ArmDeadline(kHandshakeTimeout);
  if (!need && timer_armed_) CancelDeadline();
}

void Session::OnDeadline() {
  if (phase_ == Phase::kOpen) {
    Reject(StatusCode::kTimeout,
           registered ? "a frame was not completed within 10 s" : "no valid REGISTER within 10 s");
  } else {
    FinishClose();
  }
}

void Session::Reject(StatusCode code, const std::string& reason) {
  if (phase_ != Phase::kOpen) return;
  ZW_LOG(kWarn, "bootstrap: dropping " << Label() << ": " << reason);
  LostPeer(reason);
  Send(wire::EncodeError({code, reason}));
  CloseGracefully();
}

void Session::CloseGracefully() {
  if (phase_ != Phase::kOpen) return;
  phase_ = Phase::kDraining;
  ArmDeadline(kLingerTimeout);
  if (!writing_) StartLinger();
}

void Session::StartLinger() {
  phase_ = Phase::kLinger;
  boost::system::error_code ignored;
  socket_.shutdown(tcp::socket::shutdown_send, ignored);
}

void Session::LostPeer(const std::string& reason) {
  if (!gone) owner_->OnGone(*this, reason);
}

void Session::FinishClose() {
  if (phase_ == Phase::kClosed) return;
  phase_ = Phase::kClosed;
  CancelDeadline();
  boost::system::error_code ignored;
  socket_.close(ignored);
  owner_->OnClosed(*this);  // may drop the last owning reference but `self` in the handler keeps us
}

Status SchedulerImpl::Listen(const std::string& host, uint16_t port) {
  std::string where = host + ":" + std::to_string(port);
  ZW_ASSIGN_OR_RETURN(auto endpoints, ResolveEndpoints(host, port));
  boost::system::error_code ec;
  const tcp::endpoint& ep = endpoints.front();
  acceptor_.open(ep.protocol(), ec);
  if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor_.bind(ep, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return IoError("bootstrap scheduler cannot listen on " + where + ": " + ec.message());
  port_ = acceptor_.local_endpoint(ec).port();
  if (ec) return IoError("bootstrap scheduler: local_endpoint: " + ec.message());
  ZW_LOG(kInfo, "bootstrap scheduler listening on " << host << ":" << port_ << " for " << num_workers_
                                                    << " workers and " << num_servers_ << " servers");
  return Status::Ok();
}

void SchedulerImpl::DoAccept() {
  acceptor_.async_accept([this](const boost::system::error_code& ec, tcp::socket socket) {
    if (stopping_) return;
    if (ec) {
      if (ec == asio::error::operation_aborted) return;
      // EMFILE and friends: back off instead of spinning on the error.
      ZW_LOG(kWarn, "bootstrap scheduler: accept failed: " << ec.message());
      accept_timer_.expires_after(std::chrono::milliseconds(100));
      accept_timer_.async_wait([this](const boost::system::error_code& tec) {
        if (!tec && !stopping_) DoAccept();
      });
      return;
    }
    if (unregistered_ >= kMaxUnregistered) {
      ZW_LOG(kWarn, "bootstrap scheduler: refusing connection from " << EndpointString(socket) << ": "
                                                                     << unregistered_
                                                                     << " connections have not registered");
      boost::system::error_code ignored;
      socket.close(ignored);
    } else {
      boost::system::error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);
      auto session = std::make_shared<Session>(this, std::move(socket));
      sessions_.emplace(session.get(), session);
      ++unregistered_;
      session->Start();
    }
    DoAccept();
  });
}

void SchedulerImpl::OnFrame(Session& s, uint8_t type, std::span<const uint8_t> payload) {
  if (s.left) {
    s.Reject(StatusCode::kCorrupt, std::string(wire::MsgTypeName(type)) + " after LEAVE");
    return;
  }
  switch (static_cast<wire::MsgType>(type)) {
    case wire::MsgType::kRegister:
      return HandleRegister(s, payload);
    case wire::MsgType::kBarrier:
      return HandleBarrier(s, payload);
    case wire::MsgType::kLeave:
      return HandleLeave(s, payload);
    case wire::MsgType::kAssign:
    case wire::MsgType::kBarrierRelease:
    case wire::MsgType::kError:
      s.Reject(StatusCode::kCorrupt, std::string("unexpected ") + wire::MsgTypeName(type) + " from a node");
      return;
  }
  s.Reject(StatusCode::kCorrupt, "unknown message type " + std::to_string(type));
}

void SchedulerImpl::HandleRegister(Session& s, std::span<const uint8_t> payload) {
  if (s.registered) {
    s.Reject(StatusCode::kCorrupt, "second REGISTER");
    return;
  }
  auto msg = wire::DecodeRegister(payload);
  if (!msg.ok()) {
    s.Reject(StatusCode::kCorrupt, msg.status().message());
    return;
  }
  // Two nodes claiming one transport address is a misconfiguration that
  // would only surface later as a confusing connect failure. Checked before
  // capacity so the answer does not depend on who registered first.
  std::string holder;
  for (const auto& list : pending_) {
    for (const auto& other : list) {
      if (other->address == msg->address) holder = other->Label();
    }
  }
  for (const Slot& slot : slots_) {
    if (slot.state == SlotState::kAlive && slot.info.address == msg->address) holder = Describe(slot.info);
  }
  if (!holder.empty()) {
    s.Reject(StatusCode::kAlreadyExists,
             "transport address " + msg->address + " is already registered by " + holder);
    return;
  }
  int idx = msg->role == Role::kWorker ? 0 : 1;
  uint32_t expected = idx == 0 ? num_workers_ : num_servers_;
  if (assigned_ || pending_[idx].size() >= expected) {
    s.Reject(StatusCode::kFailedPrecondition,
             std::string("too many ") + RoleName(msg->role) + "s: the cluster expects " +
                 std::to_string(expected) +
                 (assigned_ ? " and has already formed" : " and all have registered") + "; refusing " +
                 msg->address);
    return;
  }
  if (msg->requested_role_rank != wire::kAnyRoleRank) {
    if (msg->requested_role_rank >= expected) {
      s.Reject(StatusCode::kInvalidArgument, std::string(RoleName(msg->role)) + " index " +
                                                 std::to_string(msg->requested_role_rank) + " asked for by " +
                                                 msg->address + " is outside the cluster's " +
                                                 std::to_string(expected) + " " + RoleName(msg->role) + "s");
      return;
    }
    for (const auto& other : pending_[idx]) {
      if (other->requested_role_rank == msg->requested_role_rank) {
        s.Reject(StatusCode::kAlreadyExists, std::string(RoleName(msg->role)) + " index " +
                                                 std::to_string(msg->requested_role_rank) + " asked for by " +
                                                 msg->address + " is already held by " + other->Label());
        return;
      }
    }
  }
  s.registered = true;
  s.role = msg->role;
  s.address = std::move(msg->address);
  s.requested_role_rank = msg->requested_role_rank;
  --unregistered_;
  pending_[idx].push_back(sessions_.at(&s));
  ZW_LOG(kInfo, "bootstrap: registered " << RoleName(s.role) << " " << s.address << " ("
                                         << pending_[idx].size() << "/" << expected << ")");
  if (pending_[0].size() == num_workers_ && pending_[1].size() == num_servers_) Assign();
}

void SchedulerImpl::Assign() {
  ClusterView view;
  view.num_workers = num_workers_;
  view.num_servers = num_servers_;
  // Nodes that asked for an index get it; the rest fill the free indices in
  // registration order (requests are unique and in range: checked at REGISTER).
  std::vector<std::shared_ptr<Session>> order;
  for (auto& list : pending_) {
    std::vector<std::shared_ptr<Session>> placed(list.size());
    for (auto& node : list) {
      if (node->requested_role_rank != wire::kAnyRoleRank) placed[node->requested_role_rank] = node;
    }
    size_t next = 0;
    for (auto& node : list) {
      if (node->requested_role_rank != wire::kAnyRoleRank) continue;
      while (placed[next]) ++next;
      placed[next] = node;
    }
    order.insert(order.end(), placed.begin(), placed.end());
    list.clear();
  }
  for (uint32_t r = 0; r < order.size(); ++r) {
    NodeInfo node;
    node.rank = r;
    node.role = order[r]->role;
    node.role_rank = r < num_workers_ ? r : r - num_workers_;
    node.address = order[r]->address;
    view.nodes.push_back(node);
  }
  if (wire::EncodeAssign(view).size() > wire::kLengthBytes + wire::kMaxFrameBytes) {
    // Only reachable with thousands of nodes with long addresses.
    for (auto& s : order) s->Reject(StatusCode::kResourceExhausted, "the peer table does not fit in 64 KiB");
    return;
  }
  assigned_ = true;
  slots_.resize(order.size());
  for (uint32_t r = 0; r < order.size(); ++r) {
    order[r]->rank = r;
    slots_[r].info = view.nodes[r];
    slots_[r].session = order[r];
    view.self_rank = r;
    order[r]->Send(wire::EncodeAssign(view));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    active_nodes_ = num_nodes();
  }
  ZW_LOG(kInfo,
         "bootstrap: cluster formed with " << num_workers_ << " workers and " << num_servers_ << " servers");
}

void SchedulerImpl::HandleBarrier(Session& s, std::span<const uint8_t> payload) {
  if (s.rank < 0) {
    s.Reject(StatusCode::kCorrupt, "BARRIER before the peer table was assigned");
    return;
  }
  auto msg = wire::DecodeBarrier(payload);
  if (!msg.ok()) {
    s.Reject(StatusCode::kCorrupt, msg.status().message());
    return;
  }
  if (msg->seq <= s.last_barrier_seq) {
    s.Reject(StatusCode::kCorrupt, "BARRIER seq " + std::to_string(msg->seq) + " does not follow " +
                                       std::to_string(s.last_barrier_seq));
    return;
  }
  s.last_barrier_seq = msg->seq;
  if (!gone_.empty()) {
    s.Send(wire::EncodeError({StatusCode::kPeerClosed, BarrierFailure(msg->seq)}));
    return;
  }
  Slot& slot = slots_[static_cast<size_t>(s.rank)];
  // A node that timed out of an earlier barrier has abandoned it.
  if (slot.waiting_seq != 0 && --arrivals_[slot.waiting_seq] == 0) arrivals_.erase(slot.waiting_seq);
  slot.waiting_seq = msg->seq;
  if (++arrivals_[msg->seq] < num_nodes()) return;
  arrivals_.erase(msg->seq);
  auto release = wire::EncodeBarrier(wire::MsgType::kBarrierRelease, msg->seq);
  for (Slot& other : slots_) {
    if (other.waiting_seq != msg->seq) continue;
    other.waiting_seq = 0;
    other.session->Send(release);
  }
}

void SchedulerImpl::HandleLeave(Session& s, std::span<const uint8_t> payload) {
  Status st = wire::DecodeLeave(payload);
  if (!st.ok()) {
    s.Reject(StatusCode::kCorrupt, st.message());
    return;
  }
  if (!s.registered) {
    s.Reject(StatusCode::kCorrupt, "LEAVE before REGISTER");
    return;
  }
  s.left = true;
  if (s.rank < 0) {
    ZW_LOG(kInfo, "bootstrap: " << s.Label() << " left before the cluster formed");
    RemovePending(s);
  } else {
    NodeGone(static_cast<uint32_t>(s.rank), SlotState::kLeft, "left");
  }
  s.CloseGracefully();
}

void SchedulerImpl::OnGone(Session& s, const std::string& reason) {
  if (s.gone) return;
  s.gone = true;
  if (!s.registered) {
    --unregistered_;
    return;
  }
  if (s.left) return;
  if (s.rank < 0) {
    ZW_LOG(kWarn, "bootstrap: " << s.Label() << " went away before the cluster formed (" << reason
                                << "); its slot is free again");
    RemovePending(s);
    return;
  }
  NodeGone(static_cast<uint32_t>(s.rank), SlotState::kDead, "disconnected without LEAVE (" + reason + ")");
}

void SchedulerImpl::RemovePending(Session& s) {
  auto& list = pending_[s.role == Role::kWorker ? 0 : 1];
  for (auto it = list.begin(); it != list.end(); ++it) {
    if (it->get() == &s) {
      list.erase(it);
      return;
    }
  }
}

void SchedulerImpl::NodeGone(uint32_t rank, SlotState state, const std::string& what) {
  Slot& slot = slots_[rank];
  if (slot.state != SlotState::kAlive) return;
  slot.state = state;
  slot.waiting_seq = 0;
  slot.session.reset();
  std::string line = Describe(slot.info) + " " + what;
  gone_.push_back(line);
  if (state == SlotState::kDead) {
    ZW_LOG(kWarn, "bootstrap: " << line);
  } else {
    ZW_LOG(kInfo, "bootstrap: " << line);
  }
  // No barrier can complete any more: fail everyone who waits in one.
  arrivals_.clear();
  for (Slot& other : slots_) {
    if (other.state != SlotState::kAlive || other.waiting_seq == 0) continue;
    other.session->Send(wire::EncodeError({StatusCode::kPeerClosed, BarrierFailure(other.waiting_seq)}));
    other.waiting_seq = 0;
  }
  UpdateShutdown();
}

std::string SchedulerImpl::BarrierFailure(uint32_t seq) const {
  std::string out = "barrier " + std::to_string(seq) + " cannot complete: ";
  for (size_t i = 0; i < gone_.size(); ++i) {
    if (i > 0) out += "; ";
    out += gone_[i];
  }
  return out;
}

void SchedulerImpl::UpdateShutdown() {
  uint32_t alive = 0;
  for (const Slot& slot : slots_) alive += slot.state == SlotState::kAlive ? 1 : 0;
  std::lock_guard<std::mutex> lock(mu_);
  active_nodes_ = alive;
  if (alive == 0) {
    shutdown_done_ = true;
    cv_.notify_all();
  }
}

Status SchedulerImpl::WaitForShutdown(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [this] { return shutdown_done_ || stopped_; });
  if (shutdown_done_) return Status::Ok();
  if (stopped_) return Cancelled("bootstrap scheduler stopped");
  if (active_nodes_ == 0) {
    return Timeout("bootstrap: the cluster has not formed after " + std::to_string(timeout.count()) + " ms");
  }
  return Timeout("bootstrap: " + std::to_string(active_nodes_) + " of " + std::to_string(num_nodes()) +
                 " nodes still connected after " + std::to_string(timeout.count()) + " ms");
}

void SchedulerImpl::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    cv_.notify_all();
  }
  // Closing everything leaves the io_context without work, so run() returns
  // once the aborted handlers have drained.
  asio::post(ioc_, [this] {
    stopping_ = true;
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    accept_timer_.cancel();
    for (auto& [ptr, session] : sessions_) session->Abort();
    sessions_.clear();
    pending_[0].clear();
    pending_[1].clear();
    for (Slot& slot : slots_) slot.session.reset();
  });
  if (thread_.joinable()) thread_.join();
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

// Blocking API over async Asio ops run on a private io_context with a
// deadline: every wait is bounded, and a timed-out op is cancelled and
// drained before returning so no handler outlives its stack frame.
class ClientImpl final : public BootstrapClient {
 public:
  explicit ClientImpl(std::string scheduler) : scheduler_(std::move(scheduler)) {}
  ~ClientImpl() override {
    Leave();
    boost::system::error_code ignored;
    socket_.close(ignored);
  }

  Status Connect(Clock::time_point deadline, std::chrono::milliseconds timeout);
  Status RegisterAndWait(Role role, const std::string& address, uint32_t requested_role_rank,
                         Clock::time_point deadline, std::chrono::milliseconds timeout);

  const ClusterView& view() const override { return view_; }
  Status Barrier(std::chrono::milliseconds timeout) override;
  void Leave() override;

 private:
  void RunUntil(const bool& done, Clock::time_point deadline);
  Status WriteFrame(const std::vector<uint8_t>& frame, Clock::time_point deadline);
  // kTimeout leaves the connection usable (partial input stays buffered).
  Status ReadFrame(Clock::time_point deadline, uint8_t* type, std::vector<uint8_t>* payload);
  Status Broken(Status st) {
    broken_ = st;
    boost::system::error_code ignored;
    socket_.close(ignored);
    return st;
  }

  const std::string scheduler_;
  std::mutex mu_;
  asio::io_context ioc_;
  tcp::socket socket_{ioc_};
  wire::FrameSplitter splitter_;
  std::array<uint8_t, 4096> rbuf_{};
  ClusterView view_;
  uint32_t barrier_seq_ = 0;
  Status broken_;
  bool joined_ = false;
  bool left_ = false;
};

void ClientImpl::RunUntil(const bool& done, Clock::time_point deadline) {
  ioc_.restart();
  while (!done) {
    auto now = Clock::now();
    if (now >= deadline) break;
    ioc_.run_one_for(deadline - now);
  }
  if (done) return;
  boost::system::error_code ignored;
  socket_.cancel(ignored);
  ioc_.restart();
  while (!done) ioc_.run_one();  // the cancelled handler completes promptly
}

Status ClientImpl::Connect(Clock::time_point deadline, std::chrono::milliseconds timeout) {
  std::string host;
  uint16_t port = 0;
  ZW_RETURN_IF_ERROR(wire::SplitAddress(scheduler_, &host, &port).WithContext("scheduler address"));
  std::string last_error;
  auto endpoints = ResolveEndpoints(host, port);
  while (true) {
    if (endpoints.ok()) {
      for (const tcp::endpoint& ep : *endpoints) {
        boost::system::error_code ignored, ec;
        socket_.close(ignored);
        bool done = false;
        socket_.async_connect(ep, [&](const boost::system::error_code& e) {
          ec = e;
          done = true;
        });
        RunUntil(done, deadline);
        if (!ec) {
          socket_.set_option(tcp::no_delay(true), ignored);
          return Status::Ok();
        }
        last_error = ec == asio::error::operation_aborted ? "connect timed out" : ec.message();
      }
    } else {
      last_error = endpoints.status().message();
    }
    // The scheduler may simply not be up yet: retry until the deadline.
    auto now = Clock::now();
    if (now + std::chrono::milliseconds(50) >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (!endpoints.ok()) endpoints = ResolveEndpoints(host, port);
  }
  boost::system::error_code ignored;
  socket_.close(ignored);
  return Unavailable("cannot reach the bootstrap scheduler at " + scheduler_ + " within " +
                     std::to_string(timeout.count()) + " ms: " + last_error);
}

Status ClientImpl::WriteFrame(const std::vector<uint8_t>& frame, Clock::time_point deadline) {
  boost::system::error_code ec;
  bool done = false;
  asio::async_write(socket_, asio::buffer(frame), [&](const boost::system::error_code& e, size_t) {
    ec = e;
    done = true;
  });
  RunUntil(done, deadline);
  if (!ec) return Status::Ok();
  // A partly written frame leaves the stream unusable either way.
  if (ec == asio::error::operation_aborted) {
    return Broken(Timeout("writing to the bootstrap scheduler at " + scheduler_ + " timed out"));
  }
  return Broken(Unavailable("lost the bootstrap scheduler at " + scheduler_ + ": " + ec.message()));
}

Status ClientImpl::ReadFrame(Clock::time_point deadline, uint8_t* type, std::vector<uint8_t>* payload) {
  while (true) {
    std::span<const uint8_t> view;
    std::string error;
    auto state = splitter_.Next(type, &view, &error);
    if (state == wire::FrameSplitter::State::kFrame) {
      payload->assign(view.begin(), view.end());
      return Status::Ok();
    }
    if (state == wire::FrameSplitter::State::kError) {
      return Broken(Corrupt("bootstrap scheduler at " + scheduler_ + " sent a bad frame: " + error));
    }
    boost::system::error_code ec;
    size_t n = 0;
    bool done = false;
    socket_.async_read_some(asio::buffer(rbuf_), [&](const boost::system::error_code& e, size_t got) {
      ec = e;
      n = got;
      done = true;
    });
    RunUntil(done, deadline);
    if (ec == asio::error::operation_aborted) return Timeout("timed out");
    if (ec) {
      return Broken(Unavailable("the bootstrap scheduler at " + scheduler_ + " went away (" +
                                (ec == asio::error::eof ? std::string("connection closed") : ec.message()) +
                                ")"));
    }
    splitter_.Append(rbuf_.data(), n);
  }
}

Status ClientImpl::RegisterAndWait(Role role, const std::string& address, uint32_t requested_role_rank,
                                   Clock::time_point deadline, std::chrono::milliseconds timeout) {
  ZW_RETURN_IF_ERROR(WriteFrame(wire::EncodeRegister({role, address, requested_role_rank}), deadline));
  std::string me = std::string(RoleName(role)) + " " + address;
  while (true) {
    uint8_t type = 0;
    std::vector<uint8_t> payload;
    Status st = ReadFrame(deadline, &type, &payload);
    if (st.code() == StatusCode::kTimeout) {
      return Timeout("no peer table from the bootstrap scheduler at " + scheduler_ + " within " +
                     std::to_string(timeout.count()) + " ms (registered as " + me +
                     "; have all nodes been started?)");
    }
    ZW_RETURN_IF_ERROR(st);
    if (type == static_cast<uint8_t>(wire::MsgType::kError)) {
      auto err = wire::DecodeError(payload);
      if (!err.ok()) return Broken(err.status().WithContext("scheduler " + scheduler_));
      return Broken(
          Status(err->code, "bootstrap scheduler at " + scheduler_ + " refused " + me + ": " + err->reason));
    }
    if (type != static_cast<uint8_t>(wire::MsgType::kAssign)) {
      return Broken(Corrupt("bootstrap scheduler at " + scheduler_ + " sent " + wire::MsgTypeName(type) +
                            " before the peer table"));
    }
    auto view = wire::DecodeAssign(payload);
    if (!view.ok()) return Broken(view.status().WithContext("scheduler " + scheduler_));
    const NodeInfo& self = view->self();
    if (self.role != role || self.address != address) {
      return Broken(Corrupt("bootstrap scheduler at " + scheduler_ + " assigned rank " +
                            std::to_string(self.rank) + " as " + RoleName(self.role) + " " + self.address +
                            " to " + me));
    }
    view_ = std::move(view).value();
    joined_ = true;
    return Status::Ok();
  }
}

Status ClientImpl::Barrier(std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(mu_);
  if (left_) return FailedPrecondition("Barrier after Leave");
  if (!broken_.ok()) return broken_;
  auto deadline = Clock::now() + timeout;
  uint32_t seq = ++barrier_seq_;
  ZW_RETURN_IF_ERROR(WriteFrame(wire::EncodeBarrier(wire::MsgType::kBarrier, seq), deadline));
  while (true) {
    uint8_t type = 0;
    std::vector<uint8_t> payload;
    Status st = ReadFrame(deadline, &type, &payload);
    if (st.code() == StatusCode::kTimeout) {
      return Timeout("barrier " + std::to_string(seq) + " (rank " + std::to_string(view_.self_rank) +
                     ") not released within " + std::to_string(timeout.count()) + " ms");
    }
    ZW_RETURN_IF_ERROR(st);
    if (type == static_cast<uint8_t>(wire::MsgType::kBarrierRelease)) {
      auto msg = wire::DecodeBarrier(payload);
      if (!msg.ok()) return Broken(msg.status().WithContext("scheduler " + scheduler_));
      if (msg->seq == seq) return Status::Ok();
      if (msg->seq < seq) continue;  // release of a barrier we timed out of
      return Broken(Corrupt("bootstrap scheduler released barrier " + std::to_string(msg->seq) +
                            " while rank waits in " + std::to_string(seq)));
    }
    if (type == static_cast<uint8_t>(wire::MsgType::kError)) {
      auto err = wire::DecodeError(payload);
      if (!err.ok()) return Broken(err.status().WithContext("scheduler " + scheduler_));
      return Status(err->code, err->reason);
    }
    return Broken(
        Corrupt("bootstrap scheduler at " + scheduler_ + " sent unexpected " + wire::MsgTypeName(type)));
  }
}

void ClientImpl::Leave() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!joined_ || left_) return;
  left_ = true;
  if (!broken_.ok()) return;
  // Say goodbye, then wait (briefly) for the scheduler's FIN so that neither
  // side resets the connection with unread bytes in flight.
  auto deadline = Clock::now() + std::chrono::seconds(1);
  if (WriteFrame(wire::EncodeLeave(), deadline).ok()) {
    boost::system::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_send, ignored);
    while (true) {
      uint8_t type = 0;
      std::vector<uint8_t> payload;
      if (!ReadFrame(deadline, &type, &payload).ok()) break;
    }
  }
  static_cast<void>(Broken(FailedPrecondition("left the cluster")));
}

}  // namespace

Result<std::unique_ptr<Scheduler>> Scheduler::Start(const std::string& host, uint16_t port,
                                                    uint32_t num_workers, uint32_t num_servers) {
  uint64_t total = uint64_t{num_workers} + num_servers;
  if (total == 0 || total > wire::kMaxNodes) {
    return InvalidArgument("bootstrap scheduler: cluster size " + std::to_string(total) + " is not 1.." +
                           std::to_string(wire::kMaxNodes));
  }
  auto impl = std::make_unique<SchedulerImpl>(num_workers, num_servers);
  ZW_RETURN_IF_ERROR(impl->Listen(host, port));
  impl->Run();
  return std::unique_ptr<Scheduler>(std::move(impl));
}

Result<std::unique_ptr<BootstrapClient>> BootstrapClient::Join(const std::string& scheduler_address,
                                                               Role role,
                                                               const std::string& transport_address,
                                                               std::chrono::milliseconds timeout,
                                                               std::optional<uint32_t> role_rank) {
  if (role != Role::kWorker && role != Role::kServer) return InvalidArgument("bootstrap Join: bad role");
  if (role_rank && *role_rank == wire::kAnyRoleRank) {
    return InvalidArgument("bootstrap Join: role index " + std::to_string(*role_rank) + " is reserved");
  }
  ZW_RETURN_IF_ERROR(
      wire::ValidateAddress(transport_address).WithContext("bootstrap Join: transport address"));
  ZW_RETURN_IF_ERROR(
      wire::ValidateAddress(scheduler_address).WithContext("bootstrap Join: scheduler address"));
  auto deadline = Clock::now() + timeout;
  auto client = std::make_unique<ClientImpl>(scheduler_address);
  ZW_RETURN_IF_ERROR(client->Connect(deadline, timeout));
  ZW_RETURN_IF_ERROR(client->RegisterAndWait(role, transport_address, role_rank.value_or(wire::kAnyRoleRank),
                                             deadline, timeout));
  return std::unique_ptr<BootstrapClient>(std::move(client));
}

}  // namespace zipwire::transport
