// rdma_cm connection setup for the verbs backend (ZIPWIRE_IB_CM=rdmacm), the
// alternative to its own TCP side channel, as perftest's -R is to its default.
//
// Method. The backend creates its QPs as always (ibv_create_qp on its own
// protection domain, moved to INIT, receives posted); this file connects them
// with rdma_cm instead of swapping a hello over TCP. One rdma_cm_id per QP
// (an RC connection is one QP pair, so ZIPWIRE_IB_QPS=N means N rdma_cm
// connections, all named by one random nonce so the listener groups them):
//   connector: rdma_resolve_addr -> (device check) -> rdma_resolve_route ->
//              rdma_connect(qp_num, private data) -> CONNECT_RESPONSE ->
//              RTR, RTS from rdma_init_qp_attr -> rdma_establish
//   listener:  rdma_bind_addr + rdma_listen; CONNECT_REQUEST -> (device check,
//              the backend makes the QPs on the group's first request) ->
//              RTR, RTS from rdma_init_qp_attr -> rdma_accept(qp_num); once
//              every QP of the group is accepted the peer is connected (not at
//              ESTABLISHED: the connector may post as soon as its last
//              rdma_establish returns, before that event is read here).
// Since the ids carry no QP (id->qp is null), librdmacm touches no QP: the
// transitions are ours, with the attributes rdma_cm computed (path, GID,
// PSNs, MTU) and the backend's own retry/RNR/timeout/rd_atomic choices on top.
// The GID is therefore the one rdma_cm picks for the address, not
// ZIPWIRE_IB_GID_INDEX.
//
// Private data. Connect (32 of the 56 bytes RC allows): magic, the data
// path's wire version, rank, QP count, QP index, nonce. Accept: magic,
// version, rank. Reject: magic, version, rank, and a reason (text), which the
// connector reports like the socket path reports a refused hello.
//
// Device. rdma_cm resolves an IP address to a device; the backend has opened
// one (ZIPWIRE_IB_DEVICE, or with it unset and ZIPWIRE_IB_CM=rdmacm the
// device rdma_cm binds the listen address to). The two must agree: a
// mismatch is an error naming both, on either side.
//
// Lifetime. A thread of this manager reads the rdma_cm event channel: it
// serves connect requests and turns DISCONNECTED (the peer closed or died:
// the kernel tears its connections down), DEVICE_REMOVAL and late errors into
// the `failed` hook, which the backend treats like an EOF on the socket
// path's side channel. Every wait is bounded: address and route resolution by
// the connect deadline, a request's group by 5 s, a connect's reply by the
// connect deadline.
#pragma once

#include <infiniband/verbs.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "transport/backend.h"

namespace zipwire::transport::verbs_cm {

// How the verbs backend connects its queue pairs: ZIPWIRE_IB_CM=socket (the
// default: its TCP side channel) or rdmacm. rdmacm in a build without
// librdmacm is an error that says so.
enum class CmMode { kSocket, kRdmaCm };
Result<CmMode> CmModeFromEnv();
bool RdmaCmBuilt();

// What the manager sets on top of rdma_init_qp_attr's RTR / RTS attributes.
struct QpTuning {
  uint8_t rd_atomic = 1;  // max_rd_atomic / max_dest_rd_atomic (and CM resources)
  uint8_t min_rnr_timer = 12;
  uint8_t timeout = 14;
  uint8_t retry_cnt = 7;
  uint8_t rnr_retry = 7;
};

// The backend's side. Called on the manager's thread with no manager lock
// held; a token is the backend's handle for a connection, opaque here.
struct Hooks {
  struct Accepted {
    void* token = nullptr;
    std::vector<ibv_qp*> qps;  // in INIT on port 1, receives posted
  };
  // A peer asks for a connection of `nqps` QPs: make it, or refuse (the
  // message travels back to the peer in the reject).
  std::function<Result<Accepted>(PeerId rank, uint32_t nqps, const std::string& address)> accept;
  // Every QP of the connection is up; `mtu` is the path MTU.
  std::function<void(void* token, ibv_mtu mtu)> established;
  // The connection failed or ended (still being set up, or established).
  std::function<void(void* token, const Status& why)> failed;
};

class Manager {
 public:
  // `device`: the name of the device the backend opened (QPs are on it).
  // `wire_version`: the data path's, checked in both directions.
  static Result<std::unique_ptr<Manager>> Create(std::string device, uint32_t wire_version, PeerId self,
                                                 QpTuning tuning, Hooks hooks);
  virtual ~Manager() = default;

  virtual void SetLocalRank(PeerId self) = 0;
  // rdma_bind_addr + rdma_listen; returns "host:port" (the rdma_cm port).
  virtual Result<std::string> Listen(const std::string& host, uint16_t port) = 0;

  struct Connected {
    ibv_mtu mtu = IBV_MTU_256;
    std::string refused;  // non-empty: the peer rejected us, for this reason
  };
  // Connects `qps` (INIT, receives posted) to the listener at `address`
  // (host:port), retrying while nothing listens there until `deadline`.
  // Errors: kInvalidArgument (bad address, device mismatch, wrong rank),
  // kUnavailable (not resolvable, no RDMA device for it, nobody listening,
  // timeout).
  virtual Result<Connected> Connect(void* token, PeerId peer, const std::string& address,
                                    const std::vector<ibv_qp*>& qps,
                                    std::chrono::steady_clock::time_point deadline) = 0;
  // Disconnects `token`'s ids (the peer sees DISCONNECTED at once). Never
  // calls a hook, so the backend may hold its own lock.
  virtual void Disconnect(void* token) = 0;
  // Stops the event thread (no hook runs after it returns) and disconnects
  // everything.
  virtual void Close() = 0;
};

// The RDMA device rdma_cm binds `host` to; empty for a wildcard address, one
// on no RDMA device, or a build without librdmacm.
std::string DeviceForAddress(const std::string& host);

}  // namespace zipwire::transport::verbs_cm
