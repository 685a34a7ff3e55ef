// Host entry points into the CUDA sources' __host__ __device__ code, for tests
// that need no GPU (the device runs the very same functions).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/codec.h"

namespace zipwire::kernels::cuda::testing {

// Draw `position` of the Philox stream (seed, tensor, chunk, step, purpose), as
// the kernels compute it.
uint32_t PhiloxDraw(uint64_t seed, uint64_t tensor, uint32_t chunk, uint64_t step, uint32_t purpose,
                    uint64_t position);

// randomk's k indices of [0, n), ascending, by the kernels' parallel
// resolution of Floyd's draw (FloydChoice), run on the host.
std::vector<uint32_t> RandomkIndices(uint64_t seed, uint64_t tensor, uint32_t chunk, uint64_t step, size_t n,
                                     size_t k);

// Per-element codes of dithering (level << 1 | sign) and terngrad (2 bits) as
// the encode kernels compute them, for given norms / scale (dithering: norm
// k of elements [k*B, (k+1)*B) for B = 2^bucket_log2; one norm when 0).
std::vector<uint32_t> DitheringCodes(const float* x, size_t n, uint32_t s, bool natural, const float* norms,
                                     uint32_t bucket_log2, const CodecContext& ctx);
std::vector<uint32_t> TerngradCodes(const float* x, size_t n, float scale, const CodecContext& ctx);

}  // namespace zipwire::kernels::cuda::testing
