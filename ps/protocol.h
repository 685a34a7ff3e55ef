// Control-plane messages between workers and servers, carried by the
// transport's two-sided PostSend. Every decode validates lengths and fields:
// these bytes come from the network.
//
// Layout (little-endian): u8 type, then the fields below in order; strings
// are u16 length + bytes; RemoteRegion is 24 bytes (transport wire form).
//   DECLARE     u64 tensor, u64 elements, u64 partition_bytes, str codec,
//               u8 flags, region worker_recv, u32 n, n x {u32 chunk,
//               u32 worker_handle, u64 recv_offset, u64 slot_bytes}
//   DECLARE_ACK u64 tensor, u8 status_code, str message, region server_slots,
//               u32 n, n x {u32 chunk, u32 server_handle, u64 slot_offset,
//               u64 slot_bytes}
//   BYE         (no fields): the worker is done
//   BYE_ACK     (no fields)
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "transport/backend.h"

namespace zipwire::ps {

enum class MessageType : uint8_t { kDeclare = 1, kDeclareAck = 2, kBye = 3, kByeAck = 4 };

inline constexpr uint8_t kFlagServerErrorFeedback = 1;

struct DeclareChunk {
  uint32_t chunk_index = 0;
  uint32_t worker_handle = 0;
  uint64_t recv_offset = 0;
  uint64_t slot_bytes = 0;
};

struct DeclareMessage {
  uint64_t tensor_id = 0;
  uint64_t elements = 0;
  uint64_t partition_bytes = 0;
  std::string codec;
  uint8_t flags = 0;
  transport::RemoteRegion worker_recv;
  std::vector<DeclareChunk> chunks;
};

struct AckChunk {
  uint32_t chunk_index = 0;
  uint32_t server_handle = 0;
  uint64_t slot_offset = 0;
  uint64_t slot_bytes = 0;
};

struct DeclareAckMessage {
  uint64_t tensor_id = 0;
  StatusCode code = StatusCode::kOk;
  std::string message;
  transport::RemoteRegion server_slots;
  std::vector<AckChunk> chunks;
};

std::vector<uint8_t> Encode(const DeclareMessage& m);
std::vector<uint8_t> Encode(const DeclareAckMessage& m);
std::vector<uint8_t> EncodeBye(MessageType type);  // kBye or kByeAck

Result<MessageType> PeekType(std::span<const uint8_t> bytes);
Result<DeclareMessage> DecodeDeclare(std::span<const uint8_t> bytes);
Result<DeclareAckMessage> DecodeDeclareAck(std::span<const uint8_t> bytes);

}  // namespace zipwire::ps
