// The boundary between the host-only API code (gpu_codec.cc, built by the C++
// compiler) and the CUDA sources: plain C++ declarations, no CUDA types.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/status.h"
#include "kernels/codec.h"
#include "kernels/cuda/gpu_codec.h"

namespace zipwire::kernels::cuda {

// A codec's parameters, parsed from its canonical spec.
struct GpuCodec::Config {
  CodecId id = CodecId::kNone;
  double v = 0.01;      // topk, topk_sampled, randomk: ratio or count
  bool scaled = false;  // randomk scale=1
  uint32_t s = 16;      // dithering
  bool natural = false;
  bool max_norm = false;
  uint32_t bucket_log2 = 13;                   // dithering: log2(bucket), 0 = one norm per chunk
  uint32_t rows = 5, cols = 1024, keep = 256;  // countsketch r, c, k
};

size_t ScratchBytesFor(const GpuCodec::Config& c, size_t n);

// residual == nullptr: plain Compress; else error feedback on residual.
// Arguments are already checked by the caller.
Status LaunchCompress(const GpuCodec::Config& c, const float* x, float* residual, size_t n, uint8_t* out,
                      size_t out_capacity, const CodecContext& ctx, GpuCodecWorkspace::Impl& ws,
                      GpuStream stream);

Status LaunchDecode(const GpuCodec::Config& c, const uint8_t* in, size_t in_bytes, float* out, size_t n,
                    bool accumulate, float alpha, GpuCodecWorkspace::Impl& ws, GpuStream stream);

}  // namespace zipwire::kernels::cuda
