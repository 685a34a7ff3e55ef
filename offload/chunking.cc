#include "offload/chunking.h"

#include <string>

#include "core/config.h"

namespace zipwire::offload {

Result<std::vector<Chunk>> PlanChunks(size_t elements, uint64_t partition_bytes) {
  if (partition_bytes < sizeof(float)) {
    return InvalidArgument("partition size " + std::to_string(partition_bytes) +
                           " bytes is smaller than one float");
  }
  const size_t per_chunk = static_cast<size_t>(partition_bytes / sizeof(float));
  std::vector<Chunk> chunks;
  if (elements == 0) {
    chunks.push_back(Chunk{0, 0, 0});
    return chunks;
  }
  const size_t n = (elements + per_chunk - 1) / per_chunk;
  if (n > (1u << 20)) {
    return InvalidArgument("tensor of " + std::to_string(elements) + " elements makes " + std::to_string(n) +
                           " chunks; raise ZIPWIRE_PARTITION_BYTES");
  }
  chunks.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    size_t offset = i * per_chunk;
    size_t count = elements - offset < per_chunk ? elements - offset : per_chunk;
    chunks.push_back(Chunk{static_cast<uint32_t>(i), offset, count});
  }
  return chunks;
}

Result<uint64_t> PartitionBytesFromEnv() {
  ZW_ASSIGN_OR_RETURN(uint64_t bytes, EnvUint("PARTITION_BYTES", kDefaultPartitionBytes));
  if (bytes < 1024) {
    return InvalidArgument("ZIPWIRE_PARTITION_BYTES=" + std::to_string(bytes) + " is below 1 KiB");
  }
  return bytes;
}

uint32_t ServerForChunk(uint64_t tensor_id, uint32_t chunk_index, uint32_t num_servers) {
  if (num_servers <= 1) return 0;
  // splitmix64 finaliser: spreads consecutive ids and chunks evenly.
  uint64_t z = tensor_id * 0x9e3779b97f4a7c15ull + chunk_index + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z % num_servers);
}

}  // namespace zipwire::offload
