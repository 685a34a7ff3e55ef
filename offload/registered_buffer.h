#pragma once
// Registered memory that peers write into (a server's slots, a worker's
// receive buffers): allocated by the backend where it offers that
// (capabilities().supports_alloc; ucx: shared memory that a peer on the same
// host writes with a plain copy instead of going through UCX's data path),
// else a 64-byte aligned allocation of ours registered with the backend.
// Either way the bytes start zeroed and stay valid for the backend's life:
// like the regions the PS registered before, it is never deregistered while
// the backend may still serve a peer (Close ends that).
#include <cstddef>
#include <cstdint>

#include "core/status.h"
#include "offload/aligned_buffer.h"
#include "transport/backend.h"

namespace zipwire::offload {

class RegisteredBuffer {
 public:
  RegisteredBuffer() = default;

  // kResourceExhausted when neither allocation works; the backend's error
  // when registration fails.
  static Result<RegisteredBuffer> Create(transport::Backend* backend, size_t bytes);

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const transport::MemoryRegion& region() const { return region_; }
  // True when the backend owns the bytes (AllocateMemory).
  bool backend_allocated() const { return !own_; }

 private:
  AlignedBuffer own_;  // empty when the backend allocated the bytes
  transport::MemoryRegion region_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace zipwire::offload
