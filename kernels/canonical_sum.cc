// Paths of the canonical sums (see canonical_sum.h): the scalar reference and
// AVX2 / AVX-512 versions that keep the 32 lanes in vector registers (8 ymm or
// 4 zmm of doubles) and so add every element into the same lane, in the same
// order, as the reference.
#include "kernels/canonical_sum.h"

#include <algorithm>
#include <bit>
#include <cstring>

#include "kernels/simd.h"

namespace zipwire::kernels {
namespace {

constexpr size_t kWord = 32;
static_assert(kCanonicalSegment % kWord == 0, "sign words never straddle a segment");

// The lane tree: lane[0] ends up the segment total.
double TreeReduce(double* lane) {
  for (size_t off = kCanonicalLanes / 2; off >= 1; off /= 2) {
    for (size_t l = 0; l < off; ++l) lane[l] = lane[l] + lane[l + off];
  }
  return lane[0];
}

inline bool IsFinite(float v) { return (std::bit_cast<uint32_t>(v) & 0x7f800000u) != 0x7f800000u; }
inline double AbsTerm(float v) {
  return IsFinite(v) ? static_cast<double>(std::bit_cast<float>(std::bit_cast<uint32_t>(v) & 0x7fffffffu))
                     : 0.0;
}

// Scalar tail of a segment from element `from` (segment-relative), after the
// vector part stored its lanes in `lane`.
void AbsTail(const float* seg, size_t from, size_t len, double* lane, uint64_t* finite) {
  for (size_t i = from; i < len; ++i) {
    lane[i % kCanonicalLanes] += AbsTerm(seg[i]);
    *finite += IsFinite(seg[i]) ? 1 : 0;
  }
}
// b, when not null, is added to seg element by element first.
void SquareTail(const float* seg, const float* b, size_t from, size_t len, double* lane) {
  for (size_t i = from; i < len; ++i) {
    const float v = b != nullptr ? seg[i] + b[i] : seg[i];
    lane[i % kCanonicalLanes] += static_cast<double>(v) * static_cast<double>(v);
  }
}

void UpdateScalar(const float* x, float* y, size_t n, float if_negative, float otherwise) {
  for (size_t i = 0; i < n; ++i) y[i] = (y[i] + (y[i] < 0.0f ? if_negative : otherwise)) + x[i];
}

void SignWords(const float* seg, size_t words, uint8_t* out) {
  for (size_t w = 0; w < words; ++w) {
    uint32_t word = 0;
    for (size_t j = 0; j < kWord; ++j) word |= static_cast<uint32_t>(seg[kWord * w + j] < 0.0f) << j;
    std::memcpy(out + 4 * w, &word, 4);
  }
}

CanonicalAbsSum AbsScalar(const float* y, size_t n, uint8_t* sign_words) {
  if (sign_words != nullptr) SignWords(y, n / kWord, sign_words);
  return internal::CanonicalAbsSumReference(y, n);
}

#if defined(__x86_64__)

template <bool kUpdate>
__attribute__((target("avx2,fma"))) CanonicalAbsSum AbsAvx2(const float* x, float* y, size_t n,
                                                            uint8_t* sign_words, float if_negative,
                                                            float otherwise) {
  CanonicalAbsSum r;
  const __m256 off_neg = _mm256_set1_ps(if_negative);
  const __m256 off_pos = _mm256_set1_ps(otherwise);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
  const __m256 zero = _mm256_setzero_ps();
  for (size_t base = 0; base < n; base += kCanonicalSegment) {
    const size_t len = std::min(kCanonicalSegment, n - base);
    float* seg = y + base;
    const size_t groups = len / kWord;
    __m256d acc[8];  // acc[k] holds lanes 4k .. 4k+3
    for (auto& a : acc) a = _mm256_setzero_pd();
    uint64_t nonfinite = 0;
    for (size_t g = 0; g < groups; ++g) {
      float* p = seg + kWord * g;
      uint32_t signs = 0;
      for (int q = 0; q < 4; ++q) {
        __m256 v = _mm256_loadu_ps(p + 8 * q);
        if constexpr (kUpdate) {
          const __m256 neg = _mm256_cmp_ps(v, zero, _CMP_LT_OQ);
          v = _mm256_add_ps(_mm256_add_ps(v, _mm256_blendv_ps(off_pos, off_neg, neg)),
                            _mm256_loadu_ps(x + base + kWord * g + 8 * q));
          _mm256_storeu_ps(p + 8 * q, v);
        }
        signs |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ))) << (8 * q);
        const __m256i bits = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
        const __m256i nf = _mm256_cmpeq_epi32(_mm256_and_si256(bits, exp_mask), exp_mask);
        nonfinite += static_cast<uint64_t>(
            std::popcount(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(nf)))));
        const __m256 m = _mm256_castsi256_ps(_mm256_andnot_si256(nf, bits));
        acc[2 * q] = _mm256_add_pd(acc[2 * q], _mm256_cvtps_pd(_mm256_castps256_ps128(m)));
        acc[2 * q + 1] = _mm256_add_pd(acc[2 * q + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(m, 1)));
      }
      if (sign_words != nullptr) std::memcpy(sign_words + 4 * (base / kWord + g), &signs, 4);
    }
    double lane[kCanonicalLanes];
    for (int k = 0; k < 8; ++k) _mm256_storeu_pd(lane + 4 * k, acc[k]);
    r.finite += kWord * groups - nonfinite;
    if constexpr (kUpdate) {
      UpdateScalar(x + base + kWord * groups, seg + kWord * groups, len - kWord * groups, if_negative,
                   otherwise);
    }
    AbsTail(seg, kWord * groups, len, lane, &r.finite);
    r.sum += TreeReduce(lane);
  }
  return r;
}

// kSum: the terms are of y[i] + b[i] (rounded to float), computed on the fly.
template <bool kSum>
__attribute__((target("avx2,fma"))) double SquareAvx2(const float* y, const float* b, size_t n) {
  double total = 0.0;
  for (size_t base = 0; base < n; base += kCanonicalSegment) {
    const size_t len = std::min(kCanonicalSegment, n - base);
    const float* seg = y + base;
    const size_t groups = len / kWord;
    __m256d acc[8];
    for (auto& a : acc) a = _mm256_setzero_pd();
    for (size_t g = 0; g < groups; ++g) {
      const float* p = seg + kWord * g;
      for (int q = 0; q < 4; ++q) {
        __m256 v = _mm256_loadu_ps(p + 8 * q);
        if constexpr (kSum) v = _mm256_add_ps(v, _mm256_loadu_ps(b + base + kWord * g + 8 * q));
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        // The product of two floats is exact in double, so the FMA rounds
        // only the sum, exactly as the reference's multiply-then-add.
        acc[2 * q] = _mm256_fmadd_pd(lo, lo, acc[2 * q]);
        acc[2 * q + 1] = _mm256_fmadd_pd(hi, hi, acc[2 * q + 1]);
      }
    }
    double lane[kCanonicalLanes];
    for (int k = 0; k < 8; ++k) _mm256_storeu_pd(lane + 4 * k, acc[k]);
    SquareTail(seg, kSum ? b + base : nullptr, kWord * groups, len, lane);
    total += TreeReduce(lane);
  }
  return total;
}

// Floats 0..7 / 8..15 of v widened to double. The zero-masked forms, because
// GCC 12 warns that the unmasked ones read an uninitialised register.
#define ZW_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
ZW_AVX512 inline __m512d Lo8(__m512 v) {
  return _mm512_maskz_cvtps_pd(0xff, _mm512_maskz_extractf32x8_ps(0xff, v, 0));
}
ZW_AVX512 inline __m512d Hi8(__m512 v) {
  return _mm512_maskz_cvtps_pd(0xff, _mm512_maskz_extractf32x8_ps(0xff, v, 1));
}

// kUpdate: y is first replaced by Feedback's update (canonical_sum.h) of x
// and y, in the same pass.
template <bool kUpdate>
ZW_AVX512 CanonicalAbsSum AbsAvx512(const float* x, float* y, size_t n, uint8_t* sign_words,
                                    float if_negative, float otherwise) {
  CanonicalAbsSum r;
  const __m512 off_neg = _mm512_set1_ps(if_negative);
  const __m512 off_pos = _mm512_set1_ps(otherwise);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i exp_mask = _mm512_set1_epi32(0x7f800000);
  const __m512 zero = _mm512_setzero_ps();
  for (size_t base = 0; base < n; base += kCanonicalSegment) {
    const size_t len = std::min(kCanonicalSegment, n - base);
    float* seg = y + base;
    const size_t groups = len / kWord;
    __m512d acc[4];  // acc[k] holds lanes 8k .. 8k+7
    for (auto& a : acc) a = _mm512_setzero_pd();
    uint64_t nonfinite = 0;
    for (size_t g = 0; g < groups; ++g) {
      float* p = seg + kWord * g;
      uint32_t signs = 0;
      for (int h = 0; h < 2; ++h) {
        __m512 v = _mm512_loadu_ps(p + 16 * h);
        if constexpr (kUpdate) {
          const __mmask16 neg = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
          v = _mm512_add_ps(_mm512_add_ps(v, _mm512_mask_blend_ps(neg, off_pos, off_neg)),
                            _mm512_loadu_ps(x + base + kWord * g + 16 * h));
          _mm512_storeu_ps(p + 16 * h, v);
        }
        signs |= static_cast<uint32_t>(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ)) << (16 * h);
        const __m512i bits = _mm512_and_si512(_mm512_castps_si512(v), abs_mask);
        const __mmask16 nf = _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exp_mask), exp_mask);
        nonfinite += static_cast<uint64_t>(std::popcount(static_cast<uint32_t>(nf)));
        const __m512 m = _mm512_castsi512_ps(_mm512_maskz_mov_epi32(static_cast<__mmask16>(~nf), bits));
        acc[2 * h] = _mm512_add_pd(acc[2 * h], Lo8(m));
        acc[2 * h + 1] = _mm512_add_pd(acc[2 * h + 1], Hi8(m));
      }
      if (sign_words != nullptr) std::memcpy(sign_words + 4 * (base / kWord + g), &signs, 4);
    }
    double lane[kCanonicalLanes];
    for (int k = 0; k < 4; ++k) _mm512_storeu_pd(lane + 8 * k, acc[k]);
    r.finite += kWord * groups - nonfinite;
    if constexpr (kUpdate) {
      UpdateScalar(x + base + kWord * groups, seg + kWord * groups, len - kWord * groups, if_negative,
                   otherwise);
    }
    AbsTail(seg, kWord * groups, len, lane, &r.finite);
    r.sum += TreeReduce(lane);
  }
  return r;
}

template <bool kSum>
ZW_AVX512 double SquareAvx512(const float* y, const float* b, size_t n) {
  double total = 0.0;
  for (size_t base = 0; base < n; base += kCanonicalSegment) {
    const size_t len = std::min(kCanonicalSegment, n - base);
    const float* seg = y + base;
    const size_t groups = len / kWord;
    __m512d acc[4];
    for (auto& a : acc) a = _mm512_setzero_pd();
    for (size_t g = 0; g < groups; ++g) {
      const float* p = seg + kWord * g;
      for (int h = 0; h < 2; ++h) {
        __m512 v = _mm512_loadu_ps(p + 16 * h);
        if constexpr (kSum) v = _mm512_add_ps(v, _mm512_loadu_ps(b + base + kWord * g + 16 * h));
        const __m512d lo = Lo8(v);
        const __m512d hi = Hi8(v);
        acc[2 * h] = _mm512_fmadd_pd(lo, lo, acc[2 * h]);
        acc[2 * h + 1] = _mm512_fmadd_pd(hi, hi, acc[2 * h + 1]);
      }
    }
    double lane[kCanonicalLanes];
    for (int k = 0; k < 4; ++k) _mm512_storeu_pd(lane + 8 * k, acc[k]);
    SquareTail(seg, kSum ? b + base : nullptr, kWord * groups, len, lane);
    total += TreeReduce(lane);
  }
  return total;
}

#endif  // __x86_64__

}  // namespace

CanonicalAbsSum CanonicalAbsSumOf(const float* y, size_t n, uint8_t* sign_words, CpuIsa isa) {
  float* const unchanged = const_cast<float*>(y);  // kUpdate = false never writes
#if defined(__x86_64__)
  if (isa == CpuIsa::kAvx512 && BestSupportedIsa() == CpuIsa::kAvx512) {
    return AbsAvx512<false>(nullptr, unchanged, n, sign_words, 0.0f, 0.0f);
  }
  if (isa != CpuIsa::kScalar && BestSupportedIsa() != CpuIsa::kScalar) {
    return AbsAvx2<false>(nullptr, unchanged, n, sign_words, 0.0f, 0.0f);
  }
#endif
  (void)isa;
  return AbsScalar(y, n, sign_words);
}

CanonicalAbsSum CanonicalAbsSumOfUpdate(const float* x, float* y, size_t n, float if_negative,
                                        float otherwise, uint8_t* sign_words, CpuIsa isa) {
#if defined(__x86_64__)
  if (isa == CpuIsa::kAvx512 && BestSupportedIsa() == CpuIsa::kAvx512) {
    return AbsAvx512<true>(x, y, n, sign_words, if_negative, otherwise);
  }
  if (isa != CpuIsa::kScalar && BestSupportedIsa() != CpuIsa::kScalar) {
    return AbsAvx2<true>(x, y, n, sign_words, if_negative, otherwise);
  }
#endif
  (void)isa;
  UpdateScalar(x, y, n, if_negative, otherwise);
  return AbsScalar(y, n, sign_words);
}

double CanonicalSquareSumOf(const float* y, size_t n, CpuIsa isa) {
#if defined(__x86_64__)
  if (isa == CpuIsa::kAvx512 && BestSupportedIsa() == CpuIsa::kAvx512)
    return SquareAvx512<false>(y, nullptr, n);
  if (isa != CpuIsa::kScalar && BestSupportedIsa() != CpuIsa::kScalar)
    return SquareAvx2<false>(y, nullptr, n);
#endif
  (void)isa;
  return internal::CanonicalSquareSumReference(y, n);
}

double CanonicalSquareSumOfSum(const float* a, const float* b, size_t n, CpuIsa isa) {
#if defined(__x86_64__)
  if (isa == CpuIsa::kAvx512 && BestSupportedIsa() == CpuIsa::kAvx512) return SquareAvx512<true>(a, b, n);
  if (isa != CpuIsa::kScalar && BestSupportedIsa() != CpuIsa::kScalar) return SquareAvx2<true>(a, b, n);
#endif
  (void)isa;
  double total = 0.0;
  for (size_t base = 0; base < n; base += kCanonicalSegment) {
    const size_t len = std::min(kCanonicalSegment, n - base);
    double lane[kCanonicalLanes] = {};
    SquareTail(a + base, b + base, 0, len, lane);
    total += TreeReduce(lane);
  }
  return total;
}

namespace internal {

CanonicalAbsSum CanonicalAbsSumReference(const float* y, size_t n) {
  CanonicalAbsSum r;
  for (size_t base = 0; base < n; base += kCanonicalSegment) {
    const size_t len = std::min(kCanonicalSegment, n - base);
    double lane[kCanonicalLanes] = {};
    AbsTail(y + base, 0, len, lane, &r.finite);
    r.sum += TreeReduce(lane);
  }
  return r;
}

double CanonicalSquareSumReference(const float* y, size_t n) {
  double total = 0.0;
  for (size_t base = 0; base < n; base += kCanonicalSegment) {
    const size_t len = std::min(kCanonicalSegment, n - base);
    double lane[kCanonicalLanes] = {};
    SquareTail(y + base, nullptr, 0, len, lane);
    total += TreeReduce(lane);
  }
  return total;
}

}  // namespace internal
}  // namespace zipwire::kernels
