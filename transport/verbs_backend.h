// The verbs backend: the backend contract over libibverbs RC queue pairs
// (InfiniBand, RoCE, soft-RoCE). See verbs_backend.cc for the protocol.
//
// Tunables (environment, read at creation):
//   ZIPWIRE_IB_DEVICE     device name (default: the first with port 1 ACTIVE)
//   ZIPWIRE_IB_GID_INDEX  GID index (default: the first RoCE v2 GID holding an
//                         IPv4-mapped address, else the first RoCE v2, else 0;
//                         1 on rxe)
//   ZIPWIRE_IB_QPS        RC QPs per peer (default 1, at most 16); writes of at
//                         least two stripes are striped across them
//   ZIPWIRE_IB_STRIPE_BYTES  stripe size when ZIPWIRE_IB_QPS > 1 (default 1 MiB)
//   ZIPWIRE_IB_CM         socket (default): QPs connect over the backend's TCP
//                         side channel; rdmacm: through rdma_cm (verbs_cm.h),
//                         Listen/Connect addresses then being rdma_cm's, on
//                         RDMA devices' netdevs
//   ZIPWIRE_IB_SPIN_US    how long Poll busy-polls before it arms the completion
//                         channel and sleeps (default 50)
//   ZIPWIRE_IB_IDLE_PROGRESS_US  how long the backend may sit without Poll or
//                         post activity before its helper thread makes
//                         progress (acks, query replies) on its behalf (1000);
//                         after a long busy stretch the helper looks less
//                         often, so an owner that stops is noticed within 16x this
//   ZIPWIRE_IB_MAILBOX    1 (default): offer each peer a mailbox, so its small
//                         host-to-host writes (up to 200 B) arrive as one inline
//                         RDMA WRITE each; 0: they come as eager SENDs
//   ZIPWIRE_IB_REG_CACHE  registrations kept after DeregisterMemory for reuse by
//                         a later RegisterMemory of the same pages (default 64;
//                         0: off). Needs CAP_SYS_ADMIN for its staleness check
//                         (page frame numbers), else it stays off; see
//                         registration_cache.h for the method and its limits.
//
// CUDA memory (MemoryKind::kCuda) is accepted where libcuda.so.1 loads at run
// time: dma-buf registration first, nvidia-peermem second (gpu_memory.h).
#pragma once

#include <cstddef>
#include <memory>

#include "core/status.h"
#include "transport/backend.h"

namespace zipwire::transport {

inline constexpr size_t kVerbsMaxControlBytes = 16384;          // largest PostSend
inline constexpr size_t kVerbsMaxWriteBytes = size_t{1} << 30;  // 1 GiB per PostWrite
inline constexpr size_t kVerbsMaxQps = 16;

Result<std::unique_ptr<Backend>> CreateVerbsBackend(const BackendOptions& options);

// How many RDMA devices libibverbs lists (0 on a host without an RDMA stack).
int VerbsDeviceCount();

}  // namespace zipwire::transport
