// A zeroed, 64-byte aligned heap buffer for registered slots: aligned so the
// codecs' vector loads and the NIC's DMA engines see whole cache lines.
#pragma once

#include <cstdlib>
#include <cstring>
#include <memory>

namespace zipwire::offload {

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes) : size_(bytes) {
    size_t rounded = (bytes + 63) / 64 * 64;
    if (rounded == 0) rounded = 64;
    data_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
    if (data_) std::memset(data_.get(), 0, rounded);
  }
  uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
};

inline constexpr uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace zipwire::offload
