// The ucx backend: the backend contract on UCX's UCP layer (one ucp_context
// and one ucp_worker per backend), so that zipwire runs over whatever UCX
// picks: tcp, shared memory (posix / sysv / cma), verbs, cuda_ipc, ...
//
// Connections: Listen() opens a small TCP socket of the backend's own (not a
// ucp_listener: UCX 1.13's client-server path only ever picks tcp lanes);
// Connect() sends our rank and ucp worker address over it and gets the
// peer's, and both create endpoints to the other's worker address. So
// UCX_TLS / UCX_NET_DEVICES and every other UCX_* variable apply as usual
// (read through ucp_config_read; nothing is overridden), shared memory
// included. The socket stays open as the connection's liveness signal: UCX's
// shared-memory transports have no peer-failure handling, and a peer whose
// socket closes is failed like one UCX reports.
//
// Data path: a PostWrite is one UCP active message carrying {imm, key,
// offset} in its header and the bytes as its payload, sent straight from the
// registered source (its ucp_mem_h). The target validates key and range
// against its own registrations *before* any byte lands, then places small
// payloads with a copy (eager) and large ones with ucp_am_recv_data_nbx
// straight into the registered target (rendezvous: UCX moves them zero-copy,
// e.g. cma / put_zcopy / RDMA), and emits kWriteImm once they are there. See
// ucx_backend.cc for why this is an active message rather than ucp_put_nbx.
// PostRead (supports_read) is a request message the target validates the
// same way and answers with the bytes from its registered region.
//
// AllocateMemory (supports_alloc) gives registered shared memory (a sealed
// memfd). A write into such memory of a peer on the same host (where
// UCX_TLS lets UCX use shared memory) goes direct: the initiator copies the
// bytes into its own mapping of the target's memory and the immediate
// travels through a mailbox (a ring of one-cache-line slots in the target's
// shared memory, polled by its progress), writes of at most 8 bytes inside
// the slot itself; no UCX data path, as ucx_perftest's put into memory from
// ucp_mem_map(UCP_MEM_MAP_ALLOCATE). Ordering, acks, refusals and peer
// failure are as for the other writes; see ucx_backend.cc.
//
// CUDA memory (MemoryKind::kCuda) is offered only where ucp_context_query
// reports UCS_MEMORY_TYPE_CUDA support, i.e. a UCX built with its cuda
// module (Debian's is not); RegisterMemory refuses it elsewhere.
//
// Tunables (environment, read at creation):
//   ZIPWIRE_UCX_SPIN_US (default 50): how long Poll busy-polls the worker
//     before it sleeps on the worker's event fd.
//   ZIPWIRE_UCX_IDLE_PROGRESS_US (default 1000): how long the backend may sit
//     without Poll / post activity before a fallback thread makes progress
//     (acks, incoming data) on the owner's behalf.
//   ZIPWIRE_UCX_DIRECT (default 1): 0 turns direct writes and mailboxes off
//     (everything through UCX active messages).
//   ZIPWIRE_UCX_PEER_ERRORS (default 1): 1 gives endpoints UCX's peer-failure
//     handling where the transports allow it, which keeps lanes without it
//     (posix / sysv / cma) out of use; 0 creates them without, so that with
//     the default UCX_TLS UCX may put same-host peers on shared memory. Lost
//     peers show through the liveness socket either way. A server's setting
//     decides for the connections it accepts.
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
