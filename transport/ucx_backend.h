// The ucx backend: the backend contract on UCX's UCP layer (one ucp_context
// and one ucp_worker per backend), so that zipwire runs over whatever UCX
// picks: tcp, shared memory (posix / sysv / cma), verbs, cuda_ipc, ...
//
// Connections use UCP's client-server mode: Listen() opens a ucp_listener
// (UCX's socket connection manager) and Connect() creates an endpoint to its
// sockaddr. UCX_TLS / UCX_NET_DEVICES and every other UCX_* variable apply as
// usual (read through ucp_config_read; nothing is overridden).
//
// Data path: a PostWrite is one UCP active message carrying {imm, key,
// offset} in its header and the bytes as its payload, sent straight from the
// registered source (its ucp_mem_h). The target validates key and range
// against its own registrations *before* any byte lands, then places small
// payloads with a copy (eager) and large ones with ucp_am_recv_data_nbx
// straight into the registered target (rendezvous: UCX moves them zero-copy,
// e.g. cma / put_zcopy / RDMA), and emits kWriteImm once they are there. See
// ucx_backend.cc for why this is an active message rather than ucp_put_nbx.
//
// Tunables (environment, read at creation):
//   ZIPWIRE_UCX_SPIN_US (default 50): how long Poll busy-polls the worker
//     before it sleeps on the worker's event fd.
//   ZIPWIRE_UCX_IDLE_PROGRESS_US (default 1000): how long the backend may sit
//     without Poll / post activity before a fallback thread makes progress
//     (acks, connection requests, incoming data) on the owner's behalf.
//   ZIPWIRE_UCX_CONNECT_GRACE_MS (default 1000): how long Connect waits for
//     the listener to complete UCX's handshake before it returns anyway (the
//     passive side must make progress for that; a refused or unreachable
//     address shows up well within it).
#pragma once

#include <cstddef>
#include <memory>

#include "core/status.h"
#include "transport/backend.h"

namespace zipwire::transport {

inline constexpr size_t kUcxMaxControlBytes = size_t{64} << 10;  // 64 KiB
inline constexpr size_t kUcxMaxWriteBytes = size_t{1} << 30;     // 1 GiB per PostWrite

Result<std::unique_ptr<Backend>> CreateUcxBackend(const BackendOptions& options);

}  // namespace zipwire::transport
