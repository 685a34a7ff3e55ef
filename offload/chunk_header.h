// The 16-byte header in front of every chunk written into a peer's slot,
// ahead of the codec's own self-describing header. It lets the receiver
// check that the bytes in its slot are the chunk and step it expects, and not
// a stale or misrouted write.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "core/status.h"

namespace zipwire::offload {

struct ChunkHeader {
  static constexpr uint32_t kMagic = 0x4b43575a;  // "ZWCK"
  static constexpr size_t kBytes = 16;
  uint32_t step = 0;  // low 32 bits of the round number
  uint32_t tensor_id = 0;
  uint32_t chunk_index = 0;
};

inline void WriteChunkHeader(const ChunkHeader& h, uint8_t* out) {
  uint32_t words[4] = {ChunkHeader::kMagic, h.step, h.tensor_id, h.chunk_index};
  std::memcpy(out, words, sizeof(words));  // little-endian hosts only (x86-64, aarch64)
}

// Parses and checks the header against what the receiver expects.
inline Status CheckChunkHeader(std::span<const uint8_t> bytes, const ChunkHeader& expected) {
  if (bytes.size() < ChunkHeader::kBytes) {
    return Corrupt("chunk of " + std::to_string(bytes.size()) + " bytes is shorter than its header");
  }
  uint32_t words[4];
  std::memcpy(words, bytes.data(), sizeof(words));
  if (words[0] != ChunkHeader::kMagic) return Corrupt("chunk header has a bad magic number");
  if (words[2] != expected.tensor_id || words[3] != expected.chunk_index) {
    return Corrupt("chunk header names tensor " + std::to_string(words[2]) + " chunk " +
                   std::to_string(words[3]) + ", expected tensor " + std::to_string(expected.tensor_id) +
                   " chunk " + std::to_string(expected.chunk_index));
  }
  if (words[1] != expected.step) {
    return Corrupt("chunk header is for step " + std::to_string(words[1]) + ", expected step " +
                   std::to_string(expected.step));
  }
  return Status::Ok();
}

}  // namespace zipwire::offload
