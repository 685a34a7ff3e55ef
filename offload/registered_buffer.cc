#include "offload/registered_buffer.h"

#include <cstring>
#include <string>
#include <utility>

namespace zipwire::offload {

Result<RegisteredBuffer> RegisteredBuffer::Create(transport::Backend* backend, size_t bytes) {
  RegisteredBuffer out;
  out.size_ = bytes;
  // A zero-length region is still a region (a tensor with no chunk here);
  // backends refuse empty allocations, so those take our own 64 bytes.
  if (backend->capabilities().supports_alloc && bytes > 0) {
    Result<transport::MemoryRegion> r = backend->AllocateMemory(bytes, transport::MemoryKind::kHost);
    if (r.ok()) {
      out.region_ = *r;
      out.data_ = static_cast<uint8_t*>(r->addr);
      std::memset(out.data_, 0, bytes);  // the backend leaves contents unspecified
      return out;
    }
    // Out of shared memory (e.g. a small /dev/shm) is not fatal: our own
    // memory registered with the backend works everywhere, only slower.
    if (r.status().code() != StatusCode::kResourceExhausted && r.status().code() != StatusCode::kIoError) {
      return r.status().WithContext("allocating " + std::to_string(bytes) + " bytes of registered memory");
    }
  }
  out.own_ = AlignedBuffer(bytes);
  if (!out.own_) return Status(StatusCode::kResourceExhausted, "out of memory for slots");
  out.data_ = out.own_.data();
  ZW_ASSIGN_OR_RETURN(out.region_, backend->RegisterMemory(out.data_, bytes, transport::MemoryKind::kHost));
  return out;
}

}  // namespace zipwire::offload
