// The backend contract every transport implements (tcp now; ucx, verbs next).
//
// Modelled on NIXL's backend plugin and UCX's transport ops table: a
// capability query, required operations (register, connect, post write /
// send, poll), and optional sections only where a capability is claimed.
//
// Semantics follow RDMA RC:
//  * PostWrite copies a local registered range into a peer's registered range
//    and delivers a 32-bit immediate to the peer as a kWriteImm completion,
//    after the bytes have landed (RDMA WRITE WITH IMM). The initiator gets a
//    kWriteDone completion once the target has accepted the bytes, or an
//    error completion if the target refused them.
//  * Writes and sends to one peer complete at the target in posting order.
//  * PostSend carries a small two-sided control message (copied at post).
//  * Close() and a peer that dies fail every pending operation with a status;
//    nothing hangs.
//
// Thread safety: every method may be called from any thread. Completions are
// delivered through Poll() in the order the backend produced them.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"

namespace zipwire::transport {

enum class MemoryKind : uint8_t { kHost = 0, kCuda = 1 };
const char* MemoryKindName(MemoryKind kind);

using PeerId = uint32_t;  // the peer's rank from the bootstrap
inline constexpr PeerId kInvalidPeer = 0xffffffffu;

struct Capabilities {
  std::string name;                      // "tcp", "ucx", "verbs"
  bool supports_write_imm = false;       // PostWrite with immediate
  bool supports_remote = true;           // peers in other processes / hosts
  bool zero_copy = false;                // data moves straight from/to registered memory
  std::vector<MemoryKind> memory_kinds;  // kinds RegisterMemory accepts
  size_t max_control_bytes = 0;          // largest PostSend payload
  size_t max_write_bytes = 0;            // largest single PostWrite
  bool supports_read = false;            // optional section: PostRead (one-sided get)
  bool supports_alloc = false;           // optional section: AllocateMemory (backend-owned memory)

  bool SupportsMemory(MemoryKind kind) const;
};

// A local registration. `key` is what a peer names in a RemoteRegion; the
// backend never reuses a key for a new registration (no stale keys after
// free and reuse of the same address).
struct MemoryRegion {
  void* addr = nullptr;
  size_t length = 0;
  MemoryKind kind = MemoryKind::kHost;
  uint64_t key = 0;
};

// A peer's registration, as exchanged through control messages.
struct RemoteRegion {
  uint64_t key = 0;
  uint64_t addr = 0;
  uint64_t length = 0;
};

// 24 bytes on the wire; fixed little-endian layout for exchange.
inline constexpr size_t kRemoteRegionWireBytes = 24;
void EncodeRemoteRegion(const RemoteRegion& region, uint8_t out[kRemoteRegionWireBytes]);
RemoteRegion DecodeRemoteRegion(const uint8_t in[kRemoteRegionWireBytes]);
inline RemoteRegion ToRemote(const MemoryRegion& r) {
  return RemoteRegion{r.key, reinterpret_cast<uint64_t>(r.addr), r.length};
}

enum class CompletionType : uint8_t {
  kWriteDone,     // initiator: a PostWrite finished (status says how)
  kReadDone,      // initiator: a PostRead finished; the bytes are in the local range
  kSendDone,      // initiator: a PostSend finished
  kWriteImm,      // target: a write landed; imm, remote_key, offset, length set
  kRecvMessage,   // target: a control message arrived; message set
  kPeerConnected, // a peer connected to us (passive side) and said its rank
  kPeerError,     // a peer failed or disconnected; status names it
};
const char* CompletionTypeName(CompletionType type);

struct Completion {
  CompletionType type = CompletionType::kWriteDone;
  Status status;
  PeerId peer = kInvalidPeer;
  uint64_t context = 0;  // the caller's cookie from PostWrite / PostSend
  uint32_t imm = 0;      // kWriteImm
  uint64_t key = 0;      // kWriteImm: the target region's key
  uint64_t offset = 0;   // kWriteImm: offset in that region
  uint64_t length = 0;   // kWriteImm: bytes written
  std::vector<uint8_t> message;  // kRecvMessage
};

struct BackendOptions {
  PeerId self = kInvalidPeer;      // own rank (from the bootstrap)
  std::string listen_host = "127.0.0.1";
  uint16_t listen_port = 0;        // 0: ephemeral
  std::chrono::milliseconds connect_timeout{10000};
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const Capabilities& capabilities() const = 0;

  // Sets our own rank (from the bootstrap); call before Connect.
  virtual void SetLocalRank(PeerId self) = 0;

  // Starts listening; returns the address peers pass to Connect ("host:port").
  virtual Result<std::string> Listen() = 0;
  // Opens a connection to the peer at `address` and tells it our rank.
  // Retries until connect_timeout, then fails with kUnavailable.
  virtual Status Connect(PeerId peer, const std::string& address) = 0;

  // Registered memory must stay valid until DeregisterMemory returns, even
  // after the operations this side posted have completed: a peer's reads of
  // it may be served at any time, by the backend's own threads too (ucx's
  // socket thread progresses UCX when a peer goes). DeregisterMemory waits
  // for (or cuts off) the responses in flight; nothing reads the memory once
  // it returns.
  virtual Result<MemoryRegion> RegisterMemory(void* addr, size_t length, MemoryKind kind) = 0;
  virtual Status DeregisterMemory(const MemoryRegion& region) = 0;

  // Optional (capabilities().supports_alloc): allocates `length` bytes of
  // registered memory that the backend owns (NIXL / UCX style, as
  // ucp_mem_map(UCP_MEM_MAP_ALLOCATE) gives ucx_perftest its buffers). ucx:
  // shared memory, which a peer on the same host writes with a plain copy
  // instead of through UCX's data path. The region behaves like one from
  // RegisterMemory in every call; its contents start unspecified;
  // DeregisterMemory frees it and its key is never reused. Backends without
  // the capability return kNotSupported.
  virtual Result<MemoryRegion> AllocateMemory(size_t length, MemoryKind kind) {
    (void)length, (void)kind;
    return NotSupported(capabilities().name + ": AllocateMemory is not offered by this backend");
  }

  // One-sided write of [local.addr + local_offset, +length) into the peer's
  // region at remote_offset; the peer gets `imm`. `context` comes back in the
  // kWriteDone completion. Refused with kOutOfRange if either range falls
  // outside its registration.
  virtual Status PostWrite(PeerId peer, const MemoryRegion& local, uint64_t local_offset,
                           const RemoteRegion& remote, uint64_t remote_offset, uint64_t length,
                           uint32_t imm, uint64_t context) = 0;

  // Optional (capabilities().supports_read): one-sided read of the peer's
  // [remote.addr + remote_offset, +length) into the local registered range
  // (RDMA READ). No completion at the target. `context` comes back in the
  // kReadDone completion. Refused with kOutOfRange as PostWrite; backends
  // without the capability return kNotSupported.
  virtual Status PostRead(PeerId peer, const MemoryRegion& local, uint64_t local_offset,
                          const RemoteRegion& remote, uint64_t remote_offset, uint64_t length,
                          uint64_t context) {
    (void)peer, (void)local, (void)local_offset, (void)remote, (void)remote_offset, (void)length,
        (void)context;
    return NotSupported(capabilities().name + ": PostRead is not offered by this backend");
  }

  virtual Status PostSend(PeerId peer, std::span<const uint8_t> message, uint64_t context) = 0;

  // Drains up to out.size() completions, waiting up to `timeout` for the
  // first. Returns how many were written.
  virtual size_t Poll(std::span<Completion> out, std::chrono::milliseconds timeout) = 0;

  // Closes every connection, failing pending operations with kCancelled.
  virtual void Close() = 0;
};

// Creates a backend by name ("tcp"). kNotSupported names the backends built.
Result<std::unique_ptr<Backend>> CreateBackend(const std::string& name, const BackendOptions& options);

}  // namespace zipwire::transport
