// The tcp backend: RDMA-style WRITE WITH IMM and control messages over one
// TCP connection per peer pair, on Boost.Asio. Payloads move straight from
// the registered source buffer into the registered target buffer (gather
// write, scatter read); see tcp_backend.cc for the wire format.
//
// Progress is driven by the caller's Poll() (as UCX worker progress): it runs
// the I/O loop on the calling thread, so a ping-pong needs no thread
// hand-offs. A low-rate fallback thread makes progress (acks, accepts,
// incoming data) only while nobody has called Poll or posted for a while, so
// an initiator's completions never depend on the target polling again.
//
// Tunables (environment, read at creation):
//   ZIPWIRE_TCP_SPIN_US (default 50): how long Poll busy-polls before it
//     sleeps in the reactor; 0 sleeps at once (saves CPU, costs latency).
//   ZIPWIRE_TCP_IDLE_PROGRESS_US (default 1000): how long the backend may sit
//     without Poll/post activity before the fallback thread steps in.
#pragma once

#include <cstddef>
#include <memory>

#include "core/status.h"
#include "transport/backend.h"

namespace zipwire::transport {

inline constexpr size_t kTcpMaxControlBytes = size_t{64} << 10;  // 64 KiB
inline constexpr size_t kTcpMaxWriteBytes = size_t{1} << 30;     // 1 GiB per PostWrite

Result<std::unique_ptr<Backend>> CreateTcpBackend(const BackendOptions& options);

}  // namespace zipwire::transport
