// The canonical reduction order of the floating-point sums that wire bytes
// depend on (onebit's mean |x|, dithering's L2 norm), shared with the CUDA
// kernels so a CPU and a GPU encode of the same input give identical bytes:
//
//   * terms t_i in binary64, exact: |y_i| for finite y_i (non-finite -> +0 and
//     not counted as finite), or (double)y_i * (double)y_i;
//   * segments of kCanonicalSegment elements (the last one may be partial);
//   * inside a segment, element i (segment-relative) is added into double
//     lane i % 32, each lane summing its elements in increasing i from +0.0;
//   * the 32 lanes are combined by the tree
//       for off in 16, 8, 4, 2, 1: for l in [0, off): lane[l] += lane[l + off]
//     (a warp's __shfl_down_sync reduction); the segment total is lane[0];
//   * segment totals are added in increasing segment order into one double
//     starting at +0.0.
// Every term is >= +0 (or NaN/Inf for squares of non-finite input), so adding
// a +0.0 for a missing element never changes a lane: the vector paths may pad.
// The scalar and vector paths give bit-identical results (tests compare them).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cpu_isa.h"

namespace zipwire::kernels {

inline constexpr size_t kCanonicalSegment = 8192;
inline constexpr size_t kCanonicalLanes = 32;

struct CanonicalAbsSum {
  double sum = 0.0;     // of |y| over finite y, in the canonical order
  uint64_t finite = 0;  // count of finite y
};

// Sum of |y_i| over finite y[0..n) and their count. When sign_words is not
// null it also receives, for every full group of 32 elements w < n / 32, the
// little-endian u32 whose bit j is (y[32w + j] < 0) (NaN -> 0), at
// sign_words + 4w (unaligned); the partial last word is the caller's.
CanonicalAbsSum CanonicalAbsSumOf(const float* y, size_t n, uint8_t* sign_words, CpuIsa isa);
inline CanonicalAbsSum CanonicalAbsSumOf(const float* y, size_t n, uint8_t* sign_words = nullptr) {
  return CanonicalAbsSumOf(y, n, sign_words, ActiveIsa());
}

// The same sum, fused with an update of y made in the same pass (error
// feedback's y = e + x, where onebit's residual e is y of the last step plus
// a sign-dependent offset; canonical_sum.h has no opinion on what it means):
//   y[i] = (y[i] + (y[i] < 0 ? if_negative : otherwise)) + x[i]   for i < n,
// then returns CanonicalAbsSumOf(y, n, sign_words, isa) of the updated y.
// With both offsets -0.0f the update is exactly y[i] + x[i].
CanonicalAbsSum CanonicalAbsSumOfUpdate(const float* x, float* y, size_t n, float if_negative,
                                        float otherwise, uint8_t* sign_words, CpuIsa isa);

// Sum of (double)y_i * (double)y_i over y[0..n) (NaN or Inf when y has one).
double CanonicalSquareSumOf(const float* y, size_t n, CpuIsa isa);
inline double CanonicalSquareSumOf(const float* y, size_t n) {
  return CanonicalSquareSumOf(y, n, ActiveIsa());
}

// A caller producing a chunk one segment at a time may call these on each
// whole segment and add the results in segment order from +0.0: a single
// segment's result is its total (+0.0 + total == total), so that equals one
// call over the whole chunk. dithering's buckets (B <= 8192 elements) apply
// the order to each bucket alone: one call per bucket, lanes relative to the
// bucket's first element (for B = 8192, exactly segment k's total).

// CanonicalSquareSumOf of y[i] = a[i] + b[i] (rounded to float) without
// storing y: error feedback's norm of input + residual.
double CanonicalSquareSumOfSum(const float* a, const float* b, size_t n, CpuIsa isa);

namespace internal {
// The plain scalar statement of the order above, element by element; the
// reference the vector paths are tested against.
CanonicalAbsSum CanonicalAbsSumReference(const float* y, size_t n);
double CanonicalSquareSumReference(const float* y, size_t n);
}  // namespace internal

}  // namespace zipwire::kernels
