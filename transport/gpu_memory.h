// CUDA device memory for RDMA registration, without linking the CUDA driver:
// libcuda.so.1 is opened with dlopen at run time, so a build made where CUDA
// is installed still runs on a machine with no GPU or driver (RegisterMemory
// of CUDA memory then fails with a status that says so).
//
// GPUDirect RDMA has two kernel paths, tried in this order by the verbs
// backend: a dma-buf exported by the driver (cuMemGetHandleForAddressRange
// with CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, registered with
// ibv_reg_dmabuf_mr; Linux >= 5.12, open GPU kernel modules), then
// ibv_reg_mr on the device pointer itself (needs the nvidia-peermem module).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/status.h"

namespace zipwire::transport {

// A dma-buf exporting a device range: register bytes [offset, offset +
// length) of the buffer `fd` at I/O virtual address `iova` (the device
// pointer). The caller closes fd once registered.
struct CudaDmabuf {
  int fd = -1;
  uint64_t offset = 0;
  size_t length = 0;
  uint64_t iova = 0;
};

// True when this build can drive CUDA memory at all (cuda.h was found).
bool CudaSupportBuilt();

// Loads the driver once (dlopen + cuInit). kNotSupported when the build has
// no CUDA support or the driver cannot be loaded or initialised; the message
// says "CUDA driver not found" and why.
Status CudaDriverAvailable();

// Exports [ptr, ptr + length) of device memory as a dma-buf (the range is
// widened to whole host pages, as the driver requires; offset points back at
// ptr). Statuses name the CUDA error.
Result<CudaDmabuf> CudaExportDmabuf(uintptr_t ptr, size_t length);

}  // namespace zipwire::transport
