// Per-chunk, per-stage timings of the pipeline. Each finished chunk adds one
// record to a fixed-size ring (no growth on the hot path); Report() prints
// medians and tails per stage.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace zipwire::offload {

enum class Stage : uint8_t {
  kWindowWait = 0,  // submitted → admitted into the in-flight window
  kCompress,        // worker-side encode (with error feedback)
  kSend,            // write posted → target acknowledged
  kRemote,          // acknowledged → aggregate landed back (server work + return)
  kDecompress,      // decode of the aggregate into the output tensor
  kTotal,           // submitted → decoded
  kCount
};
const char* StageName(Stage stage);

using Clock = std::chrono::steady_clock;

struct ChunkTiming {
  uint64_t tensor_id = 0;
  uint32_t chunk_index = 0;
  uint32_t wire_bytes = 0;  // bytes sent for this chunk
  std::array<double, static_cast<size_t>(Stage::kCount)> us{};
};

class TimingLog {
 public:
  explicit TimingLog(size_t capacity = 8192);

  void Add(const ChunkTiming& timing);
  size_t recorded() const;
  std::vector<ChunkTiming> Snapshot() const;
  // A table: stage, count, median, p90, p99, max (microseconds).
  std::string Report() const;

 private:
  mutable std::mutex mu_;  // one lock per chunk record, not per element
  std::vector<ChunkTiming> ring_;
  size_t next_ = 0;
  size_t total_ = 0;
};

inline double MicrosBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

}  // namespace zipwire::offload
