// Error feedback as a decorator over any codec (BytePS style):
//   p = C(x + e);  e = x + e - decode(p)
// done by the codec's CompressWithFeedback (fused passes where it has them;
// the residual is bit-identical to the three-pass computation either way)
// with the residual e kept per stable (tensor id, chunk index), never per a
// bucket position that could change between steps.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_map>
#include <vector>

#include "kernels/codec.h"

namespace zipwire::kernels {

struct ResidualKey {
  uint64_t tensor_id = 0;
  uint32_t chunk_index = 0;
  bool operator==(const ResidualKey&) const = default;
};

class ErrorFeedback {
 public:
  explicit ErrorFeedback(std::shared_ptr<const Codec> codec);

  const Codec& codec() const { return *codec_; }

  // Allocates the residual for `key` (zeroed) ahead of the hot path; optional,
  // Compress allocates on first use otherwise.
  Status Reserve(ResidualKey key, size_t elements);

  // Encodes input + residual[key] into out and updates residual[key].
  // Different keys may be used from different threads concurrently; one key
  // must not be used by two threads at once.
  Result<size_t> Compress(ResidualKey key, std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& ctx);

  // The current residual (empty span if none yet); for tests and GraVAC.
  // Materialises a codec's deferred form first (see FeedbackState), so it
  // must not race with Compress on the same key.
  std::span<const float> Residual(ResidualKey key) const;

  void Reset();

 private:
  struct KeyHash {
    size_t operator()(const ResidualKey& k) const {
      return std::hash<uint64_t>()(k.tensor_id * 1000003u ^ k.chunk_index);
    }
  };
  struct Entry {
    std::vector<float> residual;
    FeedbackState state;
  };
  Entry* Lookup(ResidualKey key, size_t elements, Status* status);

  std::shared_ptr<const Codec> codec_;
  mutable std::mutex mu_;  // guards the map's structure only, never elements
  // mutable: Residual() materialises a deferred residual in place.
  mutable std::unordered_map<ResidualKey, Entry, KeyHash> residuals_;
};

}  // namespace zipwire::kernels
