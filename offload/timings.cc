#include "offload/timings.h"

#include <algorithm>
#include <cstdio>

namespace zipwire::offload {

const char* StageName(Stage stage) {
  switch (stage) {
    case Stage::kWindowWait:
      return "window_wait";
    case Stage::kCompress:
      return "compress";
    case Stage::kSend:
      return "send";
    case Stage::kRemote:
      return "remote";
    case Stage::kDecompress:
      return "decompress";
    case Stage::kTotal:
      return "total";
    case Stage::kCount:
      break;
  }
  return "?";
}

TimingLog::TimingLog(size_t capacity) : ring_(capacity == 0 ? 1 : capacity) {}

void TimingLog::Add(const ChunkTiming& timing) {
  std::lock_guard<std::mutex> lock(mu_);
  ring_[next_] = timing;
  next_ = (next_ + 1) % ring_.size();
  ++total_;
}

size_t TimingLog::recorded() const {
  std::lock_guard<std::mutex> lock(mu_);
  return total_;
}

std::vector<ChunkTiming> TimingLog::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = std::min(total_, ring_.size());
  std::vector<ChunkTiming> out;
  out.reserve(n);
  size_t start = total_ > ring_.size() ? next_ : 0;
  for (size_t i = 0; i < n; ++i) out.push_back(ring_[(start + i) % ring_.size()]);
  return out;
}

std::string TimingLog::Report() const {
  std::vector<ChunkTiming> records = Snapshot();
  std::string out;
  char line[160];
  std::snprintf(line, sizeof(line), "%-12s %8s %12s %12s %12s %12s\n", "#stage", "chunks", "median[us]",
                "p90[us]", "p99[us]", "max[us]");
  out += line;
  if (records.empty()) return out;
  std::vector<double> values(records.size());
  for (size_t s = 0; s < static_cast<size_t>(Stage::kCount); ++s) {
    for (size_t i = 0; i < records.size(); ++i) values[i] = records[i].us[s];
    std::sort(values.begin(), values.end());
    auto pct = [&](double p) {
      return values[static_cast<size_t>(p * static_cast<double>(values.size() - 1))];
    };
    std::snprintf(line, sizeof(line), "%-12s %8zu %12.1f %12.1f %12.1f %12.1f\n",
                  StageName(static_cast<Stage>(s)), values.size(), pct(0.5), pct(0.9), pct(0.99),
                  values.back());
    out += line;
  }
  return out;
}

}  // namespace zipwire::offload
