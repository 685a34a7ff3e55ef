#include "transport/backend.h"

#include <algorithm>

#include "transport/tcp_backend.h"
#ifdef ZIPWIRE_HAVE_UCX
#include "transport/ucx_backend.h"
#endif
#ifdef ZIPWIRE_HAVE_VERBS
#include "transport/verbs_backend.h"
#endif

namespace zipwire::transport {

namespace {

void PutU64(uint8_t* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint64_t GetU64(const uint8_t* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(in[i]) << (8 * i);
  return v;
}

}  // namespace

const char* MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost:
      return "host";
    case MemoryKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

const char* CompletionTypeName(CompletionType type) {
  switch (type) {
    case CompletionType::kWriteDone:
      return "WRITE_DONE";
    case CompletionType::kReadDone:
      return "READ_DONE";
    case CompletionType::kSendDone:
      return "SEND_DONE";
    case CompletionType::kWriteImm:
      return "WRITE_IMM";
    case CompletionType::kRecvMessage:
      return "RECV_MESSAGE";
    case CompletionType::kPeerConnected:
      return "PEER_CONNECTED";
    case CompletionType::kPeerError:
      return "PEER_ERROR";
  }
  return "UNKNOWN";
}

bool Capabilities::SupportsMemory(MemoryKind kind) const {
  return std::find(memory_kinds.begin(), memory_kinds.end(), kind) != memory_kinds.end();
}

void EncodeRemoteRegion(const RemoteRegion& region, uint8_t out[kRemoteRegionWireBytes]) {
  PutU64(out, region.key);
  PutU64(out + 8, region.addr);
  PutU64(out + 16, region.length);
}

RemoteRegion DecodeRemoteRegion(const uint8_t in[kRemoteRegionWireBytes]) {
  return RemoteRegion{GetU64(in), GetU64(in + 8), GetU64(in + 16)};
}

Result<std::unique_ptr<Backend>> CreateBackend(const std::string& name, const BackendOptions& options) {
  // Backends compiled into this build; ucx and verbs join the list when built.
  static constexpr const char* kBuilt[] = {
      "tcp",
#ifdef ZIPWIRE_HAVE_UCX
      "ucx",
#endif
#ifdef ZIPWIRE_HAVE_VERBS
      "verbs",
#endif
  };
  if (name == "tcp") return CreateTcpBackend(options);
#ifdef ZIPWIRE_HAVE_UCX
  if (name == "ucx") return CreateUcxBackend(options);
#endif
#ifdef ZIPWIRE_HAVE_VERBS
  if (name == "verbs") return CreateVerbsBackend(options);
#endif
  std::string built;
  for (const char* b : kBuilt) built += (built.empty() ? "" : ", ") + std::string(b);
  return NotSupported("transport backend '" + name + "' is not built; available: " + built);
}

}  // namespace zipwire::transport
