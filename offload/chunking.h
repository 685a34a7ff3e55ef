// Cutting a tensor into chunks: the unit that is compressed, sent,
// aggregated and returned, and the unit error-feedback residuals belong to.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/status.h"

namespace zipwire::offload {

inline constexpr uint64_t kDefaultPartitionBytes = 4ull << 20;

struct Chunk {
  uint32_t index = 0;
  size_t offset = 0;  // first element
  size_t count = 0;   // elements
};

// Chunks of at most partition_bytes / sizeof(float) elements. A tensor of
// zero elements has one empty chunk so that it still takes part in a round.
Result<std::vector<Chunk>> PlanChunks(size_t elements, uint64_t partition_bytes);

// ZIPWIRE_PARTITION_BYTES (default 4 MiB), validated.
Result<uint64_t> PartitionBytesFromEnv();

// Which of num_servers owns (tensor, chunk): a stable hash, the same on
// every node.
uint32_t ServerForChunk(uint64_t tensor_id, uint32_t chunk_index, uint32_t num_servers);

}  // namespace zipwire::offload
