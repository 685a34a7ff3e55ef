// rdma_cm connection setup for the verbs backend; see verbs_cm.h.
#include "transport/verbs_cm.h"

#include "core/config.h"

#ifdef ZIPWIRE_HAVE_RDMACM

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <rdma/rdma_cma.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

#include "core/log.h"
#include "transport/backend_util.h"

namespace zipwire::transport::verbs_cm {
namespace {

using Clock = std::chrono::steady_clock;
using internal::GetLE;
using internal::PutLE;

constexpr uint64_t kCmMagic = 0x31004d4342495a57ull;  // "WZIBCM\0\1"
constexpr size_t kConnectBytes = 32;                  // of the 56 an RC connect request carries
constexpr size_t kAcceptBytes = 20;                   // magic, version, rank, status (0)
constexpr size_t kRejectBytes = 144;                  // of the 148 a reject carries
constexpr size_t kReasonOffset = 20;
constexpr auto kGroupTimeout = std::chrono::seconds(5);  // a listener's bound on a half-made group
constexpr uint8_t kPort = 1;                             // the backend's QPs are on port 1
// IB CM reject reason "invalid service ID": nothing listens on that port.
constexpr int kRejectNoListener = 8;

struct ConnectData {
  uint32_t version = 0, rank = 0, nqps = 0, index = 0;
  uint64_t nonce = 0;
};

void EncodeConnect(const ConnectData& d, uint8_t out[kConnectBytes]) {
  std::memset(out, 0, kConnectBytes);
  PutLE<uint64_t>(out, kCmMagic);
  PutLE<uint32_t>(out + 8, d.version);
  PutLE<uint32_t>(out + 12, d.rank);
  PutLE<uint32_t>(out + 16, d.nqps);
  PutLE<uint32_t>(out + 20, d.index);
  PutLE<uint64_t>(out + 24, d.nonce);
}

bool DecodeConnect(const std::vector<uint8_t>& in, ConnectData* d) {
  if (in.size() < kConnectBytes || GetLE<uint64_t>(in.data()) != kCmMagic) return false;
  d->version = GetLE<uint32_t>(in.data() + 8);
  d->rank = GetLE<uint32_t>(in.data() + 12);
  d->nqps = GetLE<uint32_t>(in.data() + 16);
  d->index = GetLE<uint32_t>(in.data() + 20);
  d->nonce = GetLE<uint64_t>(in.data() + 24);
  return true;
}

// Accept and reject share a layout: magic, version, rank, status, reason.
std::vector<uint8_t> EncodeReply(uint32_t version, PeerId rank, const std::string& reason, size_t bytes) {
  std::vector<uint8_t> out(bytes, 0);
  PutLE<uint64_t>(out.data(), kCmMagic);
  PutLE<uint32_t>(out.data() + 8, version);
  PutLE<uint32_t>(out.data() + 12, rank);
  PutLE<uint32_t>(out.data() + 16, reason.empty() ? 0 : 1);
  if (bytes > kReasonOffset) {
    std::memcpy(out.data() + kReasonOffset, reason.data(),
                std::min(reason.size(), bytes - kReasonOffset - 1));
  }
  return out;
}

struct Reply {
  uint32_t version = 0, rank = 0, status = 0;
  std::string reason;
};

bool DecodeReply(const std::vector<uint8_t>& in, Reply* r) {
  if (in.size() < kAcceptBytes || GetLE<uint64_t>(in.data()) != kCmMagic) return false;
  r->version = GetLE<uint32_t>(in.data() + 8);
  r->rank = GetLE<uint32_t>(in.data() + 12);
  r->status = GetLE<uint32_t>(in.data() + 16);
  if (in.size() > kReasonOffset) {
    const char* p = reinterpret_cast<const char*>(in.data() + kReasonOffset);
    r->reason.assign(p, strnlen(p, in.size() - kReasonOffset));
  }
  return true;
}

// One event, copied out so it can be acknowledged at once (rdma_destroy_id
// waits for every event of its id to be acknowledged).
struct Event {
  rdma_cm_event_type type = RDMA_CM_EVENT_ADDR_ERROR;
  int status = 0;
  rdma_cm_id* id = nullptr;
  rdma_cm_id* listen_id = nullptr;
  std::vector<uint8_t> data;  // connection private data
};

Event Copy(rdma_cm_event* e) {
  Event ev;
  ev.type = e->event;
  ev.status = e->status;
  ev.id = e->id;
  ev.listen_id = e->listen_id;
  const bool conn = ev.type == RDMA_CM_EVENT_CONNECT_REQUEST || ev.type == RDMA_CM_EVENT_CONNECT_RESPONSE ||
                    ev.type == RDMA_CM_EVENT_REJECTED || ev.type == RDMA_CM_EVENT_ESTABLISHED;
  if (conn && e->param.conn.private_data != nullptr && e->param.conn.private_data_len > 0) {
    const auto* p = static_cast<const uint8_t*>(e->param.conn.private_data);
    ev.data.assign(p, p + e->param.conn.private_data_len);
  }
  rdma_ack_cm_event(e);
  return ev;
}

std::string ErrnoText(int err) { return std::strerror(err < 0 ? -err : err); }

std::string DeviceOf(const rdma_cm_id* id) {
  return id != nullptr && id->verbs != nullptr ? ibv_get_device_name(id->verbs->device) : "";
}

std::string AddrString(const sockaddr* sa) {
  if (sa == nullptr) return "?";
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (sa->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  if (sa->sa_family == AF_INET6) {
    const auto* in = reinterpret_cast<const sockaddr_in6*>(sa);
    inet_ntop(AF_INET6, &in->sin6_addr, host, sizeof(host));
    port = ntohs(in->sin6_port);
    return "[" + std::string(host) + "]:" + std::to_string(port);
  }
  return "?";
}

struct ChannelDeleter {
  void operator()(rdma_event_channel* ch) const { rdma_destroy_event_channel(ch); }
};
using Channel = std::unique_ptr<rdma_event_channel, ChannelDeleter>;

Result<Channel> NewChannel() {
  rdma_event_channel* ch = rdma_create_event_channel();
  if (ch == nullptr) {
    return Unavailable("verbs: rdma_cm unavailable: rdma_create_event_channel: " + ErrnoText(errno) +
                       " (is the rdma_ucm kernel module loaded? /dev/infiniband/rdma_cm must exist)");
  }
  fcntl(ch->fd, F_SETFL, fcntl(ch->fd, F_GETFL) | O_NONBLOCK);
  return Channel(ch);
}

// The next event on `ch`, waiting until `deadline`; kDeadlineExceeded-like
// kUnavailable "timed out" past it.
Result<Event> WaitEvent(rdma_event_channel* ch, Clock::time_point deadline) {
  while (true) {
    rdma_cm_event* e = nullptr;
    if (rdma_get_cm_event(ch, &e) == 0) return Copy(e);
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return IoError("verbs: rdma_get_cm_event: " + ErrnoText(errno));
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return Unavailable("timed out");
    pollfd p{ch->fd, POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 100)));
  }
}

// Splits "host:port" / "[v6]:port" and resolves it (numeric port).
Result<std::vector<uint8_t>> ResolveSockaddr(const std::string& host, const std::string& port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0 || res == nullptr) {
    return Unavailable("cannot resolve host '" + host + "': " + gai_strerror(rc));
  }
  std::vector<uint8_t> sa(reinterpret_cast<uint8_t*>(res->ai_addr),
                          reinterpret_cast<uint8_t*>(res->ai_addr) + res->ai_addrlen);
  freeaddrinfo(res);
  return sa;
}

class ManagerImpl final : public Manager {
 public:
  ManagerImpl(std::string device, uint32_t wire_version, PeerId self, QpTuning tuning, Hooks hooks,
              Channel channel)
      : device_(std::move(device)),
        version_(wire_version),
        self_(self),
        tuning_(tuning),
        hooks_(std::move(hooks)),
        channel_(std::move(channel)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~ManagerImpl() override {
    Close();
    std::lock_guard lk(mu_);
    for (auto& [token, conn] : conns_) {
      for (rdma_cm_id* id : conn.ids) {
        if (id) rdma_destroy_id(id);
      }
    }
    conns_.clear();
    for (rdma_cm_id* id : orphans_) rdma_destroy_id(id);
    if (listen_id_) rdma_destroy_id(listen_id_);
  }

  void SetLocalRank(PeerId self) override { self_.store(self); }
  Result<std::string> Listen(const std::string& host, uint16_t port) override;
  Result<Connected> Connect(void* token, PeerId peer, const std::string& address,
                            const std::vector<ibv_qp*>& qps, Clock::time_point deadline) override;
  void Disconnect(void* token) override;
  void Close() override;

 private:
  // A connection: one id per QP. Listener side: filled as requests arrive.
  struct Conn {
    PeerId rank = kInvalidPeer;
    uint64_t nonce = 0;
    std::vector<rdma_cm_id*> ids;
    std::vector<ibv_qp*> qps;
    uint32_t accepted = 0;  // listener: QPs accepted so far
    ibv_mtu mtu = IBV_MTU_4096;
    bool up = false;      // every QP connected (reported through the established hook)
    bool failed = false;  // reported through the failed hook (at most once)
    Clock::time_point started;
  };

  Status ToRts(rdma_cm_id* id, ibv_qp* qp, ibv_mtu* mtu) const;
  rdma_conn_param Param(ibv_qp* qp, const void* data, size_t len) const;
  void Loop();
  void OnRequest(const Event& ev);
  void Reject(rdma_cm_id* id, const std::string& why);
  void FailToken(void* token, const Status& why);

  const std::string device_;
  const uint32_t version_;
  std::atomic<PeerId> self_;
  const QpTuning tuning_;
  const Hooks hooks_;
  Channel channel_;  // the listener's and every established connection's events
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::mt19937_64 rng_{std::random_device{}()};

  std::mutex mu_;  // below; never held while a hook runs
  bool closed_ = false;
  rdma_cm_id* listen_id_ = nullptr;
  std::unordered_map<void*, Conn> conns_;
  std::unordered_map<rdma_cm_id*, void*> token_of_;
  std::map<std::pair<PeerId, uint64_t>, void*> groups_;  // listener: (rank, nonce) -> token
  std::vector<rdma_cm_id*> orphans_;                     // ids of refused requests
};

rdma_conn_param ManagerImpl::Param(ibv_qp* qp, const void* data, size_t len) const {
  rdma_conn_param p{};
  p.private_data = data;
  p.private_data_len = static_cast<uint8_t>(len);
  p.responder_resources = tuning_.rd_atomic;
  p.initiator_depth = tuning_.rd_atomic;
  p.retry_count = tuning_.retry_cnt;
  p.rnr_retry_count = tuning_.rnr_retry;
  p.qp_num = qp->qp_num;  // the id has no QP of its own: rdma_cm announces this one
  return p;
}

// RTR and RTS with what rdma_cm resolved (address vector, GID, PSNs, path
// MTU, remote QPN), the backend's tuning on top. The QP is in INIT on port 1.
Status ManagerImpl::ToRts(rdma_cm_id* id, ibv_qp* qp, ibv_mtu* mtu) const {
  ibv_qp_attr a{};
  int mask = 0;
  a.qp_state = IBV_QPS_RTR;
  if (rdma_init_qp_attr(id, &a, &mask) != 0) return IoError("rdma_init_qp_attr(RTR): " + ErrnoText(errno));
  a.max_dest_rd_atomic = tuning_.rd_atomic;
  a.min_rnr_timer = tuning_.min_rnr_timer;
  mask |= IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
  if (ibv_modify_qp(qp, &a, mask) != 0) return IoError("ibv_modify_qp(RTR): " + ErrnoText(errno));
  *mtu = a.path_mtu;
  ibv_qp_attr s{};
  mask = 0;
  s.qp_state = IBV_QPS_RTS;
  if (rdma_init_qp_attr(id, &s, &mask) != 0) return IoError("rdma_init_qp_attr(RTS): " + ErrnoText(errno));
  s.timeout = tuning_.timeout;
  s.retry_cnt = tuning_.retry_cnt;
  s.rnr_retry = tuning_.rnr_retry;
  s.max_rd_atomic = tuning_.rd_atomic;
  mask |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
  if (ibv_modify_qp(qp, &s, mask) != 0) return IoError("ibv_modify_qp(RTS): " + ErrnoText(errno));
  return Status::Ok();
}

Result<std::string> ManagerImpl::Listen(const std::string& host, uint16_t port) {
  {
    std::lock_guard lk(mu_);
    if (closed_) return Cancelled("verbs backend closed");
    if (listen_id_) return FailedPrecondition("verbs backend already listening (rdma_cm)");
  }
  const std::string where = host + ":" + std::to_string(port);
  auto sa = ResolveSockaddr(host, std::to_string(port), /*passive=*/true);
  if (!sa.ok()) return Unavailable("verbs: rdma_cm listen on " + where + ": " + sa.status().message());
  rdma_cm_id* id = nullptr;
  if (rdma_create_id(channel_.get(), &id, nullptr, RDMA_PS_TCP) != 0) {
    return IoError("verbs: rdma_create_id: " + ErrnoText(errno));
  }
  auto fail = [&](Status st) {
    rdma_destroy_id(id);
    return st;
  };
  if (rdma_bind_addr(id, reinterpret_cast<sockaddr*>(sa->data())) != 0) {
    const int err = errno;
    return fail(Unavailable("verbs: rdma_cm cannot bind " + where + ": " + ErrnoText(err) +
                            (err == ENODEV || err == EADDRNOTAVAIL
                                 ? " (no RDMA device has that address; use an address of an RDMA device's "
                                   "netdev, or 0.0.0.0)"
                                 : "")));
  }
  // A specific address is on one device: it has to be the backend's.
  if (const std::string dev = DeviceOf(id); !dev.empty() && dev != device_) {
    return fail(InvalidArgument("verbs: rdma_cm binds listen address " + host + " to device " + dev +
                                ", but this backend uses " + device_ +
                                " (ZIPWIRE_IB_DEVICE / zipwire_perf -d); set ZIPWIRE_IB_DEVICE=" + dev +
                                " or listen on an address of " + device_));
  }
  if (rdma_listen(id, 128) != 0)
    return fail(Unavailable("verbs: rdma_listen on " + where + ": " + ErrnoText(errno)));
  const uint16_t bound = ntohs(rdma_get_src_port(id));
  std::lock_guard lk(mu_);
  if (closed_) return fail(Cancelled("verbs backend closed"));
  listen_id_ = id;
  return host + ":" + std::to_string(bound);
}

Result<Manager::Connected> ManagerImpl::Connect(void* token, PeerId peer, const std::string& address,
                                                const std::vector<ibv_qp*>& qps, Clock::time_point deadline) {
  const std::string who = "peer " + std::to_string(peer) + " at " + address;
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return InvalidArgument("Connect: address '" + address + "' is not host:port");
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  auto sa = ResolveSockaddr(host, address.substr(colon + 1), /*passive=*/false);
  if (!sa.ok()) return Unavailable("cannot resolve " + who + ": " + sa.status().message());
  ZW_ASSIGN_OR_RETURN(Channel ch, NewChannel());
  const uint32_t n = static_cast<uint32_t>(qps.size());
  std::vector<rdma_cm_id*> ids(n, nullptr);
  auto destroy = [&] {
    for (auto*& id : ids) {
      if (id) rdma_destroy_id(id);
      id = nullptr;
    }
  };
  auto ms_left = [&] {
    return static_cast<int>(std::clamp<int64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count(), 1, 60000));
  };
  uint64_t nonce;
  {
    std::lock_guard lk(mu_);
    nonce = rng_();
  }
  std::string last = "timed out";
  Connected out;
  out.mtu = IBV_MTU_4096;
  while (true) {
    if (stop_.load()) {
      destroy();
      return Cancelled("verbs backend closed");
    }
    bool retry = false;
    Status st;
    for (uint32_t i = 0; i < n && st.ok() && !retry; ++i) {
      if (rdma_create_id(ch.get(), &ids[i], token, RDMA_PS_TCP) != 0) {
        st = IoError("verbs: rdma_create_id: " + ErrnoText(errno));
        break;
      }
      rdma_cm_id* id = ids[i];
      // Address: which device and port reach the peer. The kernel looks at a
      // neighbour entry still being resolved (ARP) again only when its
      // timeout expires, so a short timeout, retried, beats one long one: a
      // cold neighbour otherwise costs the whole connect timeout.
      if (rdma_resolve_addr(id, nullptr, reinterpret_cast<sockaddr*>(sa->data()), std::min(ms_left(), 500)) !=
          0) {
        st = Unavailable("rdma_cm cannot resolve " + who + ": " + ErrnoText(errno));
        break;
      }
      auto ev = WaitEvent(ch.get(), deadline);
      if (!ev.ok()) {
        st = Unavailable("rdma_cm address resolution for " + who + ": " + ev.status().message());
        break;
      }
      if (ev->type == RDMA_CM_EVENT_ADDR_ERROR && (ev->status == -ETIMEDOUT || ev->status == -ENODATA)) {
        last = "address resolution timed out (no neighbour answer for " + host + ")";
        retry = i == 0;  // later QPs' ids follow QP 0's, already connected: no way back
        if (!retry) st = Unavailable("rdma_cm connect to " + who + " QP " + std::to_string(i) + ": " + last);
        break;
      }
      if (ev->type != RDMA_CM_EVENT_ADDR_RESOLVED) {
        st = Unavailable("rdma_cm cannot resolve " + who + " to an RDMA device: " + rdma_event_str(ev->type) +
                         " (" + ErrnoText(ev->status) +
                         "; is the address on a netdev with an RDMA device, "
                         "e.g. rxe over it?)");
        break;
      }
      if (const std::string dev = DeviceOf(id); dev != device_) {
        st = InvalidArgument("verbs: rdma_cm reaches " + who + " through device " +
                             (dev.empty() ? "?" : dev) + ", but this backend uses " + device_ +
                             " (ZIPWIRE_IB_DEVICE / zipwire_perf -d); set ZIPWIRE_IB_DEVICE=" + dev +
                             " or connect to an address routed through " + device_);
        break;
      }
      if (id->port_num != kPort) {
        st = InvalidArgument("verbs: rdma_cm reaches " + who + " through " + device_ + " port " +
                             std::to_string(id->port_num) + "; the verbs backend uses port 1");
        break;
      }
      // Route: path record (IB) or GID / next hop (RoCE).
      if (rdma_resolve_route(id, ms_left()) != 0) {
        st = Unavailable("rdma_cm cannot find a route to " + who + ": " + ErrnoText(errno));
        break;
      }
      ev = WaitEvent(ch.get(), deadline);
      if (!ev.ok() || ev->type != RDMA_CM_EVENT_ROUTE_RESOLVED) {
        st = Unavailable("rdma_cm cannot find a route to " + who + ": " +
                         (ev.ok() ? std::string(rdma_event_str(ev->type)) + " (" + ErrnoText(ev->status) + ")"
                                  : ev.status().message()));
        break;
      }
      uint8_t data[kConnectBytes];
      EncodeConnect({version_, self_.load(), n, i, nonce}, data);
      rdma_conn_param p = Param(qps[i], data, sizeof(data));
      if (rdma_connect(id, &p) != 0) {
        st = Unavailable("rdma_connect to " + who + ": " + ErrnoText(errno));
        break;
      }
      ev = WaitEvent(ch.get(), deadline);
      if (!ev.ok()) {
        st = Unavailable("no answer from " + who + " (rdma_cm): " + ev.status().message());
        break;
      }
      Reply r;
      const bool ours = DecodeReply(ev->data, &r);
      if (ev->type == RDMA_CM_EVENT_REJECTED && ours && r.status != 0) {
        destroy();
        out.refused = r.reason.empty() ? std::string("no reason given") : r.reason;
        return out;
      }
      if (ev->type == RDMA_CM_EVENT_REJECTED || ev->type == RDMA_CM_EVENT_UNREACHABLE ||
          ev->type == RDMA_CM_EVENT_CONNECT_ERROR) {
        // Nobody listens there (yet): like ECONNREFUSED, retried until the deadline.
        last = std::string(rdma_event_str(ev->type)) +
               (ev->type == RDMA_CM_EVENT_REJECTED && ev->status == kRejectNoListener
                    ? " (nothing listens on that rdma_cm port)"
                    : " (status " + std::to_string(ev->status) + ")");
        retry = i == 0;
        if (!retry) st = Unavailable("rdma_cm connect to " + who + " QP " + std::to_string(i) + ": " + last);
        break;
      }
      if (ev->type != RDMA_CM_EVENT_CONNECT_RESPONSE) {
        st = Unavailable("rdma_cm connect to " + who + ": unexpected " + rdma_event_str(ev->type));
        break;
      }
      if (!ours || r.version != version_) {
        st = Unavailable(
            "rdma_cm connect to " + who + ": " +
            (ours ? "wire version " + std::to_string(r.version) + ", expected " + std::to_string(version_)
                  : std::string("the listener is not a zipwire verbs backend")));
        rdma_reject(id, nullptr, 0);
        break;
      }
      if (r.rank != peer) {
        st = InvalidArgument("peer at " + address + " is rank " + std::to_string(r.rank) + ", not " +
                             std::to_string(peer));
        rdma_reject(id, nullptr, 0);
        break;
      }
      ibv_mtu mtu = IBV_MTU_4096;
      if (Status t = ToRts(id, qps[i], &mtu); !t.ok()) {
        st = IoError("verbs: " + who + " QP " + std::to_string(i) + ": " + t.message());
        rdma_reject(id, nullptr, 0);
        break;
      }
      out.mtu = std::min(out.mtu, mtu);
      if (rdma_establish(id) != 0) {
        st = IoError("verbs: rdma_establish with " + who + ": " + ErrnoText(errno));
        break;
      }
    }
    if (st.ok() && !retry) break;
    destroy();
    if (!st.ok()) return st;
    if (Clock::now() + std::chrono::milliseconds(50) >= deadline) {
      return Unavailable("cannot connect to " + who + " (rdma_cm) before the connect timeout: " + last);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // Established: its events (DISCONNECTED above all) go to the manager's thread.
  std::lock_guard lk(mu_);
  for (rdma_cm_id* id : ids) {
    if (closed_ || rdma_migrate_id(id, channel_.get()) != 0) {
      const std::string why = closed_ ? "verbs backend closed" : "rdma_migrate_id: " + ErrnoText(errno);
      for (auto*& i : ids) {
        rdma_disconnect(i);
        rdma_destroy_id(i);
        i = nullptr;
      }
      return closed_ ? Cancelled(why) : IoError("verbs: " + why);
    }
  }
  Conn& c = conns_[token];
  c.rank = peer;
  c.ids = ids;
  c.qps = qps;
  c.accepted = n;
  c.up = true;
  c.mtu = out.mtu;
  for (rdma_cm_id* id : ids) token_of_[id] = token;
  return out;
}

void ManagerImpl::Disconnect(void* token) {
  std::lock_guard lk(mu_);
  auto it = conns_.find(token);
  if (it == conns_.end()) return;
  for (rdma_cm_id* id : it->second.ids) {
    if (id) rdma_disconnect(id);  // EINVAL where not connected: nothing to do
  }
}

void ManagerImpl::Close() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  std::lock_guard lk(mu_);
  if (closed_) return;
  closed_ = true;
  for (auto& [token, c] : conns_) {
    for (rdma_cm_id* id : c.ids) {
      if (id) rdma_disconnect(id);
    }
  }
}

void ManagerImpl::Reject(rdma_cm_id* id, const std::string& why) {
  std::vector<uint8_t> data = EncodeReply(version_, self_.load(), why, kRejectBytes);
  rdma_reject(id, data.data(), static_cast<uint8_t>(data.size()));
  std::lock_guard lk(mu_);
  orphans_.push_back(id);  // destroyed with the manager (destroying now could drop the reject)
}

void ManagerImpl::FailToken(void* token, const Status& why) {
  {
    std::lock_guard lk(mu_);
    auto it = conns_.find(token);
    if (it == conns_.end() || it->second.failed) return;
    it->second.failed = true;
    for (rdma_cm_id* id : it->second.ids) {
      if (id) rdma_disconnect(id);
    }
    if (!it->second.up) groups_.erase({it->second.rank, it->second.nonce});
  }
  hooks_.failed(token, why);
}

void ManagerImpl::OnRequest(const Event& ev) {
  rdma_cm_id* id = ev.id;
  const std::string from = AddrString(rdma_get_peer_addr(id));
  ConnectData d;
  if (!DecodeConnect(ev.data, &d)) {
    ZW_LOG(kWarn, "verbs: rdma_cm: refusing a connect request from " << from << ": not a zipwire verbs peer");
    return Reject(id, "not a zipwire verbs connect request");
  }
  std::string bad;
  const PeerId self = self_.load();
  if (d.version != version_) {
    bad = "wire version " + std::to_string(d.version) + ", expected " + std::to_string(version_);
  } else if (d.rank == kInvalidPeer || d.rank == self) {
    bad = "invalid rank " + std::to_string(d.rank);
  } else if (d.nqps == 0 || d.nqps > 1024 || d.index >= d.nqps) {
    bad = "bad QP " + std::to_string(d.index) + " of " + std::to_string(d.nqps);
  } else if (const std::string dev = DeviceOf(id); dev != device_) {
    bad = "rdma_cm brought the request in on device " + dev + " but the listener's verbs backend uses " +
          device_ + " (its ZIPWIRE_IB_DEVICE)";
  }
  if (!bad.empty()) {
    ZW_LOG(kWarn, "verbs: rdma_cm: refusing rank " << d.rank << " from " << from << ": " << bad);
    return Reject(id, bad);
  }
  void* token = nullptr;
  {
    std::lock_guard lk(mu_);
    auto g = groups_.find({d.rank, d.nonce});
    if (g != groups_.end()) token = g->second;
  }
  if (token == nullptr) {
    auto made = hooks_.accept(d.rank, d.nqps, from);
    if (!made.ok()) {
      ZW_LOG(kWarn, "verbs: rdma_cm: refusing rank " << d.rank << " from " << from << ": "
                                                     << made.status().message());
      return Reject(id, made.status().message());
    }
    token = made->token;
    std::lock_guard lk(mu_);
    Conn& c = conns_[token];
    c.rank = d.rank;
    c.nonce = d.nonce;
    c.ids.assign(d.nqps, nullptr);
    c.qps = made->qps;
    c.started = Clock::now();
    groups_[{d.rank, d.nonce}] = token;
  }
  ibv_qp* qp = nullptr;
  {
    std::lock_guard lk(mu_);
    Conn& c = conns_[token];
    if (c.failed || c.qps.size() != d.nqps || c.ids[d.index] != nullptr) {
      bad = "inconsistent QP " + std::to_string(d.index) + " of " + std::to_string(d.nqps);
    } else {
      c.ids[d.index] = id;
      token_of_[id] = token;
      qp = c.qps[d.index];
    }
  }
  if (!bad.empty()) return Reject(id, bad);
  ibv_mtu mtu = IBV_MTU_4096;
  Status st = ToRts(id, qp, &mtu);
  if (st.ok()) {
    std::vector<uint8_t> data = EncodeReply(version_, self, "", kAcceptBytes);
    rdma_conn_param p = Param(qp, data.data(), data.size());
    if (rdma_accept(id, &p) != 0) st = IoError("rdma_accept: " + ErrnoText(errno));
  }
  if (!st.ok()) {
    std::vector<uint8_t> data = EncodeReply(version_, self, st.message(), kRejectBytes);
    rdma_reject(id, data.data(), static_cast<uint8_t>(data.size()));
    return FailToken(token, IoError("accept failed (rdma_cm): " + st.message()));
  }
  // Up once every QP is accepted (RTS here), not at ESTABLISHED: the
  // connector may post as soon as its last rdma_establish returns, before
  // our ESTABLISHED event is read, and the backend holds back what arrives
  // before it reports the peer. Were we to post first instead, a packet
  // reaching the connector's QP before its RTR is only retransmitted (RC).
  bool now_up = false;
  {
    std::lock_guard lk(mu_);
    Conn& c = conns_[token];
    c.mtu = std::min(c.mtu, mtu);
    if (!c.failed && ++c.accepted == c.ids.size()) {
      now_up = c.up = true;
      groups_.erase({c.rank, c.nonce});
      mtu = c.mtu;
    }
  }
  if (now_up) hooks_.established(token, mtu);
}

void ManagerImpl::Loop() {
  while (!stop_.load()) {
    pollfd p{channel_->fd, POLLIN, 0};
    ::poll(&p, 1, 50);
    rdma_cm_event* e = nullptr;
    while (!stop_.load() && rdma_get_cm_event(channel_.get(), &e) == 0) {
      const Event ev = Copy(e);
      if (ev.type == RDMA_CM_EVENT_CONNECT_REQUEST) {
        OnRequest(ev);
        continue;
      }
      void* token = nullptr;
      {
        std::lock_guard lk(mu_);
        auto t = token_of_.find(ev.id);
        if (t == token_of_.end()) continue;  // a refused request's id, or the listener's
        token = t->second;
      }
      switch (ev.type) {
        case RDMA_CM_EVENT_DISCONNECTED:
          FailToken(token, PeerClosed("disconnected (rdma_cm: the peer closed, or its process ended)"));
          break;
        case RDMA_CM_EVENT_DEVICE_REMOVAL:
          FailToken(token, IoError("lost: device " + device_ + " was removed (rdma_cm)"));
          break;
        case RDMA_CM_EVENT_REJECTED:
        case RDMA_CM_EVENT_UNREACHABLE:
        case RDMA_CM_EVENT_CONNECT_ERROR:
          FailToken(token,
                    PeerClosed("connection setup failed (rdma_cm: " + std::string(rdma_event_str(ev.type)) +
                               ", status " + std::to_string(ev.status) + ")"));
          break;
        default:
          break;  // ESTABLISHED (up already), TIMEWAIT_EXIT, ADDR_CHANGE: nothing to do
      }
    }
    // A listener's half-made group (a connector that died between QPs) is bounded.
    std::vector<void*> stale;
    {
      std::lock_guard lk(mu_);
      const auto now = Clock::now();
      for (auto& [key, token] : groups_) {
        if (now - conns_[token].started > kGroupTimeout) stale.push_back(token);
      }
    }
    for (void* token : stale) {
      FailToken(token, Unavailable("connection setup did not complete within 5 s (rdma_cm)"));
    }
  }
}

}  // namespace

Result<CmMode> CmModeFromEnv() {
  ZW_ASSIGN_OR_RETURN(std::string mode, EnvString("IB_CM", "socket"));
  if (mode == "socket") return CmMode::kSocket;
  if (mode == "rdmacm") return CmMode::kRdmaCm;
  return InvalidArgument("ZIPWIRE_IB_CM must be socket or rdmacm, not '" + mode + "'");
}

bool RdmaCmBuilt() { return true; }

Result<std::unique_ptr<Manager>> Manager::Create(std::string device, uint32_t wire_version, PeerId self,
                                                 QpTuning tuning, Hooks hooks) {
  ZW_ASSIGN_OR_RETURN(Channel ch, NewChannel());
  return std::unique_ptr<Manager>(
      new ManagerImpl(std::move(device), wire_version, self, tuning, std::move(hooks), std::move(ch)));
}

std::string DeviceForAddress(const std::string& host) {
  auto ch = NewChannel();
  if (!ch.ok()) return "";
  auto sa = ResolveSockaddr(host, "0", /*passive=*/true);
  if (!sa.ok()) return "";
  rdma_cm_id* id = nullptr;
  if (rdma_create_id(ch->get(), &id, nullptr, RDMA_PS_TCP) != 0) return "";
  std::string dev;
  if (rdma_bind_addr(id, reinterpret_cast<sockaddr*>(sa->data())) == 0) dev = DeviceOf(id);
  rdma_destroy_id(id);
  return dev;
}

}  // namespace zipwire::transport::verbs_cm

#else  // !ZIPWIRE_HAVE_RDMACM

namespace zipwire::transport::verbs_cm {

Result<CmMode> CmModeFromEnv() {
  ZW_ASSIGN_OR_RETURN(std::string mode, EnvString("IB_CM", "socket"));
  if (mode == "socket") return CmMode::kSocket;
  if (mode == "rdmacm") {
    return NotSupported(
        "ZIPWIRE_IB_CM=rdmacm: zipwire was built without librdmacm (install librdmacm-dev "
        "and rebuild)");
  }
  return InvalidArgument("ZIPWIRE_IB_CM must be socket or rdmacm, not '" + mode + "'");
}

bool RdmaCmBuilt() { return false; }

Result<std::unique_ptr<Manager>> Manager::Create(std::string, uint32_t, PeerId, QpTuning, Hooks) {
  return NotSupported("verbs: built without librdmacm");
}

std::string DeviceForAddress(const std::string&) { return ""; }

}  // namespace zipwire::transport::verbs_cm

#endif  // ZIPWIRE_HAVE_RDMACM
