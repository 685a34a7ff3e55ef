#include "transport/gpu_memory.h"

#include <dlfcn.h>
#include <unistd.h>

#include <mutex>

#ifdef ZIPWIRE_HAVE_CUDA_DRIVER_API
#include <cuda.h>
#endif

namespace zipwire::transport {

#ifdef ZIPWIRE_HAVE_CUDA_DRIVER_API
namespace {

struct Driver {
  Status status;
  CUresult (*init)(unsigned int) = nullptr;
  CUresult (*get_error_string)(CUresult, const char**) = nullptr;
  CUresult (*get_handle)(void*, CUdeviceptr, size_t, CUmemRangeHandleType, unsigned long long) = nullptr;
};

const Driver& LoadDriver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* err = dlerror();
      d.status = NotSupported(std::string("CUDA driver not found (dlopen libcuda.so.1: ") +
                              (err ? err : "unknown error") +
                              "); CUDA memory needs the NVIDIA driver on this machine");
      return;
    }
    d.init = reinterpret_cast<decltype(d.init)>(dlsym(lib, "cuInit"));
    d.get_error_string = reinterpret_cast<decltype(d.get_error_string)>(dlsym(lib, "cuGetErrorString"));
    d.get_handle = reinterpret_cast<decltype(d.get_handle)>(dlsym(lib, "cuMemGetHandleForAddressRange"));
    if (d.init == nullptr || d.get_error_string == nullptr) {
      d.status = NotSupported("CUDA driver not found: libcuda.so.1 lacks cuInit/cuGetErrorString");
      return;
    }
    if (CUresult r = d.init(0); r != CUDA_SUCCESS) {
      const char* what = nullptr;
      d.get_error_string(r, &what);
      d.status = NotSupported("CUDA driver not usable: cuInit failed: " + std::string(what ? what : "?") +
                              " (error " + std::to_string(static_cast<int>(r)) + ")");
    }
  });
  return d;
}

}  // namespace

bool CudaSupportBuilt() { return true; }

Status CudaDriverAvailable() { return LoadDriver().status; }

Result<CudaDmabuf> CudaExportDmabuf(uintptr_t ptr, size_t length) {
  const Driver& d = LoadDriver();
  ZW_RETURN_IF_ERROR(d.status);
  if (d.get_handle == nullptr) {
    return NotSupported("this CUDA driver has no cuMemGetHandleForAddressRange (dma-buf needs CUDA 11.7+)");
  }
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = ptr & ~(page - 1);
  const uintptr_t end = (ptr + length + page - 1) & ~(page - 1);
  int fd = -1;
  CUresult r = d.get_handle(&fd, static_cast<CUdeviceptr>(begin), end - begin,
                            CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
  if (r != CUDA_SUCCESS) {
    const char* what = nullptr;
    d.get_error_string(r, &what);
    return Unavailable("cuMemGetHandleForAddressRange(DMA_BUF_FD) failed: " + std::string(what ? what : "?") +
                       " (error " + std::to_string(static_cast<int>(r)) +
                       "; needs the open GPU kernel modules and Linux >= 5.12)");
  }
  return CudaDmabuf{fd, ptr - begin, length, ptr};
}

#else  // no cuda.h at build time

bool CudaSupportBuilt() { return false; }

Status CudaDriverAvailable() {
  return NotSupported(
      "CUDA driver not found: this build has no CUDA support (cuda.h was not found at configure time)");
}

Result<CudaDmabuf> CudaExportDmabuf(uintptr_t, size_t) { return CudaDriverAvailable(); }

#endif

}  // namespace zipwire::transport
