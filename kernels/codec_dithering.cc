// The "dithering" codec (QSGD, Alistarh et al. 2017; natural dithering,
// Horvath et al. 2019): each element becomes norm * sign(x) * level, the level
// stochastically rounded between its two neighbouring levels so that
// E[decode] = x (up to the 2^-16 resolution of the draws, below).
//
// Spec: dithering:s=S[,levels=linear|natural][,norm=l2|max][,bucket=B];
// defaults s=16, linear, l2, bucket=8192. linear: levels l/s, l = 0..s, S in
// [1, 65535]. natural: levels 0 and 2^(l-s), l = 1..s (powers of two down to
// 2^(1-s)), S in [1, 32].
//
// Buckets (QSGD's bucketing, as in the paper and its implementations): the
// chunk is cut into buckets of B consecutive elements (the last one may be
// shorter), each quantised against its own norm. B is a power of two in
// [128, 8192], or 0 for one norm over the whole chunk. Why 8192 by default:
// error feedback then needs ONE pass over memory (a bucket's x and residual,
// 64 KiB, stay in L2 between its norm and its quantisation, where one norm per
// chunk needs the whole tensor read twice), 8192 is the canonical_sum segment
// (the GPU's one-warp-per-segment reduction yields a bucket's norm directly),
// and the norms cost 4 bytes per 8192 codes (< 0.1% at s=16). Smaller buckets
// are more accurate (a bucket's norm is nearer its elements) and cost more
// norm bytes.
//
// Quantisation of element j against its bucket's norm (r = |x_j| / norm, in
// [0, 1]):
//   linear:  a = |x_j| * (s / norm) (float), l = floor(a) + (u_j < a - floor(a));
//   natural: r = |x_j| * (1 / norm); for r >= 2^(1-s), with r = (1 + f) * 2^e,
//            l = s + e + (u_j < f); below, l = (u_j < r * 2^(s-1)) (0 or 1);
// clamped to s. Level 0 always has sign 0. The draw u_j = h_j * 2^-16 where
// h_j is the 16-bit halfword j of the little-endian u32 stream (seed, tensor,
// chunk, step, kDithering) of kernels/philox.h: h_j = (U32(j / 2) >> (16 *
// (j % 2))) & 0xffff, so one Philox4x32 block serves 8 elements. The rounding
// probability is thereby resolved to 2^-16: an element rounds up with
// probability ceil(p * 2^16) / 2^16 for a fractional part p, a bias below
// 2^-16 of one level step per element (negligible against the quantisation
// noise, and it halves the generator's cost, which matches the memory traffic).
//
// Wire format: header (codec kDithering, param_bytes 0,
// param_word = s | natural << 16 | max_norm << 17 | log2(B) << 18 (0 for one
// norm per chunk; bits 23.. zero), payload_bytes = 4 * m + ceil(n * w / 8),
// m = ceil(n / B) norms (m = 1 for one norm per chunk, even when n = 0),
// w = ceil(log2(s + 1)) + 1), then
//   norms: m binary32, each finite and >= +0; norm k is of elements
//         [k*B, min(n, (k+1)*B)) (l2: (float)sqrt(sum), the sum of squares in
//         double in the canonical order of kernels/canonical_sum.h applied to
//         the bucket alone, shared with the CUDA encoder; max: max |x|);
//   codes: n codes of w bits, code = level << 1 | sign, element j at bits
//          [j*w, (j+1)*w) of the little-endian bit stream; padding bits 0.
// Decode: linear level l -> l * (norm / s) (float), natural -> norm * 2^(l-s);
// negated when the sign bit is set. Codes with level > s, or level 0 with the
// sign set, are kCorrupt, as are a bad norm, a bucket field other than 0 or
// 7..13, or any other set bit of the parameter word. Buffers of the unbucketed
// format before buckets existed are exactly the B = 0 form (they still decode);
// decoders before buckets refuse bucketed buffers (unknown parameter bits).
//
// Non-finite input (or an L2 norm beyond FLT_MAX) cannot be quantised against
// a norm: Compress fails with kInvalidArgument and ErrorBoundL2 is infinite.
// Error feedback then leaves the residual holding input + residual: buckets
// from the rejected one on get e + x; the buckets quantised before it get
// their new residual plus their decoded values back, e' + decode, which is
// y = x + e up to one float rounding.
//
// ErrorBoundL2, per bucket against its norm: each nonzero element lands on one
// of the two levels around it: linear errs by at most norm/s per nonzero
// element; natural by at most max(|x_j|, norm * 2^(1-s)) (the gap below a
// level 2^-t is 2^-(t+1) <= r); with slack for the float arithmetic. Zero
// elements decode exactly to 0.
#include <algorithm>
#include <array>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "kernels/canonical_sum.h"
#include "kernels/codec_internal.h"
#include "kernels/philox.h"
#include "kernels/simd.h"

namespace zipwire::kernels {
namespace {

constexpr uint32_t kNaturalBit = 1u << 16;
constexpr uint32_t kMaxNormBit = 1u << 17;
constexpr uint32_t kBucketShift = 18;  // log2(B) in bits [18, 23); 0: one norm per chunk
constexpr uint32_t kMinBucketLog2 = 7;
constexpr uint32_t kMaxBucketLog2 = 13;  // 8192 = kCanonicalSegment
constexpr size_t kBlock = 1024;          // elements quantised per batch of draws
static_assert(kBlock % (size_t{1} << kMinBucketLog2) == 0 &&
              (size_t{1} << kMaxBucketLog2) == kCanonicalSegment);

struct Config {
  uint32_t s = 16;
  bool natural = false;
  bool max_norm = false;
  uint32_t bucket_log2 = kMaxBucketLog2;  // 0: one norm per chunk

  uint32_t word() const {
    return s | (natural ? kNaturalBit : 0u) | (max_norm ? kMaxNormBit : 0u) | bucket_log2 << kBucketShift;
  }
  uint32_t bits() const { return static_cast<uint32_t>(std::bit_width(s)) + 1; }  // ceil(log2(s+1)) + 1
  // Elements per bucket for a chunk of n (the whole chunk when unbucketed).
  size_t bucket(size_t n) const { return bucket_log2 == 0 ? n : size_t{1} << bucket_log2; }
  // Norms on the wire for a chunk of n.
  size_t norms(size_t n) const {
    if (bucket_log2 == 0) return 1;
    return (n >> bucket_log2) + ((n & ((size_t{1} << bucket_log2) - 1)) != 0 ? 1 : 0);
  }
};

size_t PayloadFor(size_t n, uint32_t w, size_t norms) {
  const size_t bits = internal::SatMul(n, w);
  return internal::SatAdd(internal::SatMul(4, norms), bits / 8 + (bits % 8 != 0 ? 1 : 0));
}

// The norm of a chunk from its max |x| bits or its canonical sum of squares,
// or a status for input it cannot quantise.
Result<float> NormFromMax(uint32_t max_abs_bits) {
  if (max_abs_bits >= 0x7f800000u) return InvalidArgument("dithering: input has a NaN or infinity");
  return std::bit_cast<float>(max_abs_bits);
}
Result<float> NormFromSquares(double sum) {
  if (!std::isfinite(sum)) return InvalidArgument("dithering: input has a NaN or infinity");
  const float norm = static_cast<float>(std::sqrt(sum));
  if (!(norm <= FLT_MAX)) return InvalidArgument("dithering: the L2 norm overflows float");
  return norm;
}
uint32_t MaxAbsBits(const float* x, size_t n) {
  uint32_t m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::bit_cast<uint32_t>(x[i]) & 0x7fffffffu);
  return m;
}

Result<float> NormOf(const float* x, size_t n, bool max_norm, CpuIsa isa) {
  if (max_norm) return NormFromMax(MaxAbsBits(x, n));
  return NormFromSquares(CanonicalSquareSumOf(x, n, isa));
}

// The draw of element i of a batch whose draws start at word u[0] (the batch
// starts at an even element): halfword i of the little-endian words.
inline uint32_t Draw16(const uint32_t* u, size_t i) { return (u[i >> 1] >> ((i & 1) << 4)) & 0xffffu; }
inline float Uniform16(uint32_t h) { return static_cast<float>(static_cast<int32_t>(h)) * 0x1p-16f; }

// Codes of x[0..len) into codes[], draws in the halfwords of u[] (len of them).
void Quantise(const Config& c, float norm, const float* x, const uint32_t* u, size_t len, uint32_t* codes) {
  if (norm == 0.0f) {
    std::fill(codes, codes + len, 0u);
    return;
  }
  const uint32_t s = c.s;
  if (!c.natural) {
    const float mult = static_cast<float>(s) / norm;
    for (size_t i = 0; i < len; ++i) {
      const uint32_t xb = std::bit_cast<uint32_t>(x[i]);
      const float a = std::bit_cast<float>(xb & 0x7fffffffu) * mult;
      // int32 conversions (s <= 65535) so the loop vectorises.
      const int32_t fl = static_cast<int32_t>(std::min(a, static_cast<float>(s)));
      const float p = a - static_cast<float>(fl);
      const uint32_t l = std::min(static_cast<uint32_t>(fl) + (Uniform16(Draw16(u, i)) < p ? 1u : 0u), s);
      codes[i] = l == 0 ? 0u : (l << 1 | xb >> 31);
    }
  } else {
    const float inv = 1.0f / norm;
    const float below_scale = std::ldexp(1.0f, static_cast<int>(s) - 1);
    const int32_t min_exp = 1 - static_cast<int32_t>(s);
    for (size_t i = 0; i < len; ++i) {
      const uint32_t xb = std::bit_cast<uint32_t>(x[i]);
      const float r = std::min(std::bit_cast<float>(xb & 0x7fffffffu) * inv, 1.0f);
      const uint32_t rb = std::bit_cast<uint32_t>(r);
      const int32_t e = static_cast<int32_t>(rb >> 23) - 127;
      const float f = static_cast<float>(rb & 0x7fffffu) * 0x1p-23f;
      const float uf = Uniform16(Draw16(u, i));
      uint32_t l;
      if (e >= min_exp) {
        l = static_cast<uint32_t>(static_cast<int32_t>(s) + e) + (uf < f ? 1u : 0u);
      } else {
        l = uf < r * below_scale ? 1u : 0u;
      }
      l = std::min(l, s);
      codes[i] = l == 0 ? 0u : (l << 1 | xb >> 31);
    }
  }
}

#if defined(__x86_64__)
// The tail of a stream: the 2w bytes of two 8-code groups, exactly.
__attribute__((noinline)) void StoreGroupsExact(uint8_t* out, uint64_t p0, uint64_t p1, uint32_t w) {
  std::memcpy(out, &p0, w);
  std::memcpy(out + w, &p1, w);
}

// Stores two 8-code groups (each exactly w bytes: pext results, zero above)
// at out: as whole 8-byte stores while they stay below `end` (the bytes past
// the 2w are zeros the next groups overwrite), exactly near the end.
inline void StoreGroups(uint8_t* out, uint64_t p0, uint64_t p1, uint32_t w, const uint8_t* end) {
  if (out + w + 8 <= end) {
    std::memcpy(out, &p0, 8);
    std::memcpy(out + w, &p1, 8);
  } else {
    StoreGroupsExact(out, p0, p1, w);
  }
}

// Quantise's linear branch, sixteen elements at a time with the same
// operations in the same order (std::min(a, s) is vminps(s, a): a NaN a,
// from a denormal norm, stays NaN as in the scalar code). Returns how many
// elements it did (a multiple of 16); the caller does the rest.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) size_t QuantiseLinearAvx512(
    uint32_t s, float norm, const float* x, const uint32_t* u, size_t len, uint32_t* codes) {
  const __m512 mult = _mm512_set1_ps(static_cast<float>(s) / norm);
  const __m512 s_f = _mm512_set1_ps(static_cast<float>(s));
  const __m512i s_i = _mm512_set1_epi32(static_cast<int>(s));
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512 two_m16 = _mm512_set1_ps(0x1p-16f);
  const __m512i one = _mm512_set1_epi32(1);
  size_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512i xb = _mm512_loadu_si512(x + i);
    const __m512 a = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(xb, abs_mask)), mult);
    const __m512i fl = _mm512_cvttps_epi32(_mm512_min_ps(s_f, a));
    const __m512 p = _mm512_sub_ps(a, _mm512_cvtepi32_ps(fl));
    const __m512 uf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + i / 2)))),
                                    two_m16);
    const __mmask16 up = _mm512_cmp_ps_mask(uf, p, _CMP_LT_OQ);
    const __m512i l = _mm512_min_epu32(_mm512_mask_add_epi32(fl, up, fl, one), s_i);
    const __m512i code = _mm512_or_si512(_mm512_slli_epi32(l, 1), _mm512_srli_epi32(xb, 31));
    _mm512_storeu_si512(codes + i, _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(l, l), code));
  }
  return i;
}

// Error feedback's block for linear levels in one pass over x and e: y = e + x,
// its codes as QuantiseLinearAvx512, and e = y + -(decode of the code) with
// the decode as Levels::Value. The level is carried as a float (floor by
// roundscale, +1 and the clamp to s in float, all exact on integers <= 65536)
// so the decode needs no conversion; a NaN a (denormal norm) still gives
// level s, as the integer form of Quantise does. With w <= 8 the codes go
// straight into the stream at `packed` (as PackBytesAvx512 would put them,
// at a byte boundary) instead of codes[]. Returns the elements done (a
// multiple of 16).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2"))) size_t FeedLinearAvx512(
    uint32_t s, float norm, const float* x, float* e, const uint32_t* u, size_t len, uint32_t* codes,
    uint8_t* packed, uint32_t w, const uint8_t* end) {
  const __m512 mult = _mm512_set1_ps(static_cast<float>(s) / norm);
  const __m512 step = _mm512_set1_ps(norm / static_cast<float>(s));
  const __m512 s_f = _mm512_set1_ps(static_cast<float>(s));
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512 two_m16 = _mm512_set1_ps(0x1p-16f);
  const __m512 one = _mm512_set1_ps(1.0f);
  const uint64_t pext_mask = 0x0101010101010101ull * ((uint64_t{1} << (w & 15)) - 1);
  size_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 y = _mm512_add_ps(_mm512_loadu_ps(e + i), _mm512_loadu_ps(x + i));
    const __m512i yb = _mm512_castps_si512(y);
    const __m512 a = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(yb, abs_mask)), mult);
    const __m512 fl = _mm512_roundscale_ps(_mm512_min_ps(s_f, a), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 p = _mm512_sub_ps(a, fl);
    const __m512 uf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + i / 2)))),
                                    two_m16);
    const __mmask16 up = _mm512_cmp_ps_mask(uf, p, _CMP_LT_OQ);
    const __m512 lf = _mm512_min_ps(_mm512_mask_add_ps(fl, up, fl, one), s_f);  // NaN -> s
    const __m512i l = _mm512_cvttps_epi32(lf);
    const __mmask16 nonzero = _mm512_test_epi32_mask(l, l);
    const __m512i sign = _mm512_maskz_and_epi32(nonzero, yb, sign_bit);  // level 0 has sign 0
    const __m512i code = _mm512_maskz_or_epi32(nonzero, _mm512_slli_epi32(l, 1), _mm512_srli_epi32(yb, 31));
    if (packed != nullptr) {
      const __m128i b = _mm512_cvtepi32_epi8(code);
      StoreGroups(packed, _pext_u64(static_cast<uint64_t>(_mm_cvtsi128_si64(b)), pext_mask),
                  _pext_u64(static_cast<uint64_t>(_mm_extract_epi64(b, 1)), pext_mask), w, end);
      packed += 2 * w;
    } else {
      _mm512_storeu_si512(codes + i, code);
    }
    const __m512 mag = _mm512_mul_ps(lf, step);
    // -val: the magnitude with the opposite of the code's sign bit.
    const __m512 neg_val = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
        _mm512_castps_si512(mag), sign, sign_bit, 0x56));  // (mag | sign) ^ sign_bit
    _mm512_storeu_ps(e + i, _mm512_add_ps(y, neg_val));
  }
  return i;
}
#endif

#if defined(__x86_64__)
// Sixteen codes of w <= 8 bits from the byte-aligned group at g (2w bytes:
// two 8-code groups of w bytes, read as 8-byte loads, so g + w + 8 must not
// pass the stream's end), spread to one byte each by pdep, widened to u32.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2"))) inline __m512i Unpack16(const uint8_t* g,
                                                                                           uint32_t w,
                                                                                           uint64_t mask) {
  uint64_t a, b;
  std::memcpy(&a, g, 8);
  std::memcpy(&b, g + w, 8);
  return _mm512_cvtepu8_epi32(
      _mm_set_epi64x(static_cast<long long>(_pdep_u64(b, mask)), static_cast<long long>(_pdep_u64(a, mask))));
}

// Decode's validation of codes [0, n) of the stream [stream, end), sixteen at
// a time while the loads stay inside; returns the codes checked (a multiple
// of 16) and sets *bad when one has a level above s or is a signed zero.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2"))) size_t ValidateCodesAvx512(
    const uint8_t* stream, const uint8_t* end, size_t n, uint32_t w, uint32_t max_code, bool* bad) {
  const uint64_t mask = 0x0101010101010101ull * ((uint64_t{1} << w) - 1);
  const __m512i max_v = _mm512_set1_epi32(static_cast<int>(max_code));
  const __m512i one = _mm512_set1_epi32(1);
  __mmask16 acc = 0;
  size_t i = 0;
  for (const uint8_t* g = stream; i + 16 <= n && g + w + 8 <= end; i += 16, g += 2 * w) {
    const __m512i c = Unpack16(g, w, mask);
    acc |= _mm512_cmpgt_epu32_mask(c, max_v) | _mm512_cmpeq_epi32_mask(c, one);
  }
  *bad = acc != 0;
  return i;
}

// Decode of linear codes [b0, b0 + len) (b0 a multiple of 8) against `step`
// = norm / s, as Levels::Value and Decode's loop compute it (alpha * val
// rounded, then added). Returns the elements done (a multiple of 16).
template <bool kAccumulate>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2"))) size_t DecodeLinearAvx512(
    const uint8_t* stream, const uint8_t* end, size_t b0, size_t len, uint32_t w, float step, float alpha,
    float* dst) {
  const uint64_t mask = 0x0101010101010101ull * ((uint64_t{1} << w) - 1);
  const __m512 step_v = _mm512_set1_ps(step);
  const __m512 alpha_v = _mm512_set1_ps(alpha);
  const __m512i one = _mm512_set1_epi32(1);
  size_t i = 0;
  for (const uint8_t* g = stream + b0 / 8 * w; i + 16 <= len && g + w + 8 <= end; i += 16, g += 2 * w) {
    const __m512i c = Unpack16(g, w, mask);
    const __m512 mag = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c, 1)), step_v);
    const __m512 val = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_castps_si512(mag), _mm512_slli_epi32(_mm512_and_si512(c, one), 31)));
    if constexpr (kAccumulate) {
      __m512 scaled = _mm512_mul_ps(alpha_v, val);
      asm("" : "+v"(scaled));  // rounded product, as the scalar loop: GCC would contract mul + add to an FMA
      _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i), scaled));
    } else {
      _mm512_storeu_ps(dst + i, val);
    }
  }
  return i;
}
#endif

// The decoded value of a (valid) code, computed exactly as Decode does:
// linear level l -> (float)l * (norm / s), natural -> table[l] = norm * 2^(l-s),
// the sign bit OR-ed in.
class Levels {
 public:
  Levels(const Config& c, float norm) : natural_(c.natural), step_(norm / static_cast<float>(c.s)) {
    if (natural_) {
      for (uint32_t l = 1; l <= c.s; ++l)
        table_[l] = std::ldexp(norm, static_cast<int>(l) - static_cast<int>(c.s));
    }
  }
  float step() const { return step_; }
  float Value(uint32_t code) const {
    const uint32_t l = code >> 1;
    const float mag = natural_ ? table_[l] : static_cast<float>(l) * step_;
    return std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | (code & 1u) << 31);
  }

 private:
  bool natural_;
  float step_;
  float table_[33] = {};
};

// 32 codes of W bits into W little-endian u32 words; unrolled so every shift
// and store position is a constant.
template <uint32_t W>
void Pack32(const uint32_t* codes, uint8_t* out) {
  uint64_t acc = 0;
  uint32_t bits = 0;
#pragma GCC unroll 32
  for (uint32_t j = 0; j < 32; ++j) {
    acc |= static_cast<uint64_t>(codes[j]) << bits;
    bits += W;
    if (bits >= 32) {
      internal::StoreLe32(out, static_cast<uint32_t>(acc));
      out += 4;
      acc >>= 32;
      bits -= 32;
    }
  }
}
using Pack32Fn = void (*)(const uint32_t*, uint8_t*);
template <uint32_t... W>
constexpr std::array<Pack32Fn, sizeof...(W)> Pack32Table(std::integer_sequence<uint32_t, W...>) {
  return {&Pack32<W>...};
}
// kPack32[w] for w in [0, 18); bits() is 2 .. 17.
constexpr auto kPack32 = Pack32Table(std::make_integer_sequence<uint32_t, 18>());

#if defined(__x86_64__)
// Codes of w <= 8 bits, sixteen at a time: narrowed to bytes, and each 8 of
// them gathered by one pext into exactly w bytes of the stream (so a group
// starting at a byte boundary ends on one). Returns the codes done (a
// multiple of 16). Writes nothing at or past `end` (the end of the stream).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2"))) size_t PackBytesAvx512(
    const uint32_t* codes, size_t len, uint32_t w, uint8_t* out, const uint8_t* end) {
  const uint64_t mask = 0x0101010101010101ull * ((uint64_t{1} << w) - 1);
  size_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m128i b = _mm512_cvtepi32_epi8(_mm512_loadu_si512(codes + i));
    StoreGroups(out, _pext_u64(static_cast<uint64_t>(_mm_cvtsi128_si64(b)), mask),
                _pext_u64(static_cast<uint64_t>(_mm_extract_epi64(b, 1)), mask), w, end);
    out += 2 * w;
  }
  return i;
}
#endif

// Little-endian bit stream of w-bit codes.
class BitWriter {
 public:
  // The stream is [out, end).
  BitWriter(uint8_t* out, uint8_t* end, uint32_t w, CpuIsa isa)
      : p_(out), end_(end), w_(w), bytes_(isa == CpuIsa::kAvx512 && w <= 8) {}
  const uint8_t* end() const { return end_; }
  // Put, faster when the stream is word-aligned: whole groups of 32 codes
  // are exactly w words (and groups of 8 exactly w bytes).
  void PutBlock(const uint32_t* codes, size_t len) {
#if defined(__x86_64__)
    if (bits_ == 0 && bytes_) {
      const size_t i = PackBytesAvx512(codes, len, w_, p_, end_);
      p_ += i / 8 * w_;
      codes += i;
      len -= i;
    }
#endif
    if (bits_ == 0) {
      const Pack32Fn pack = kPack32[w_];
      size_t i = 0;
      for (; i + 32 <= len; i += 32) {
        pack(codes + i, p_);
        p_ += 4 * w_;
      }
      codes += i;
      len -= i;
    }
    Put(codes, len);
  }
  void Put(const uint32_t* codes, size_t len) {
    uint64_t acc = acc_;
    uint32_t bits = bits_;
    for (size_t i = 0; i < len; ++i) {
      acc |= static_cast<uint64_t>(codes[i]) << bits;
      bits += w_;
      if (bits >= 32) {
        internal::StoreLe32(p_, static_cast<uint32_t>(acc));
        p_ += 4;
        acc >>= 32;
        bits -= 32;
      }
    }
    acc_ = acc;
    bits_ = bits;
  }
  // Where the next code goes when the stream is at a byte boundary and the
  // caller may write codes of w <= 8 bits as PackBytesAvx512 does; else null.
  uint8_t* BytePosition() const { return bits_ == 0 && bytes_ ? p_ : nullptr; }
  // After such a caller wrote `bytes` bytes (a whole number of 8-code groups).
  void SkipBytes(size_t bytes) { p_ += bytes; }
  void Finish() {
    for (uint32_t b = 0; b < bits_; b += 8) *p_++ = static_cast<uint8_t>(acc_ >> b);
  }

 private:
  uint8_t* p_;
  uint8_t* end_;
  uint32_t w_;
  bool bytes_;  // PackBytesAvx512 applies
  uint64_t acc_ = 0;
  uint32_t bits_ = 0;
};

// Random access to the w-bit codes: code j is read with one unaligned 64-bit
// load at byte j*w/8 (w <= 17, so it spans at most 3 bytes past the shift);
// the last codes, whose load would pass the end, read from a zero-padded copy.
class CodeReader {
 public:
  CodeReader(const uint8_t* in, size_t bytes, uint32_t w) : in_(in), w_(w), mask_((uint64_t{1} << w) - 1) {
    fast_ = bytes >= 8 ? ((bytes - 8) * 8) / w : 0;  // (j*w)/8 + 8 <= bytes for j < fast_
    tail_at_ = fast_ * w / 8;
    std::memcpy(tail_, in + tail_at_, bytes - tail_at_);  // < 8 + 3 bytes
  }
  uint32_t operator()(size_t j) const {
    const size_t bit = j * w_;
    uint64_t v;
    if (j < fast_) {
      std::memcpy(&v, in_ + bit / 8, 8);
    } else {
      std::memcpy(&v, tail_ + (bit / 8 - tail_at_), 8);
    }
    return static_cast<uint32_t>((v >> (bit % 8)) & mask_);
  }
  size_t fast() const { return fast_; }

 private:
  const uint8_t* in_;
  uint32_t w_;
  uint64_t mask_;
  size_t fast_;
  size_t tail_at_;
  uint8_t tail_[32] = {};
};

class DitheringCodec final : public Codec {
 public:
  explicit DitheringCodec(Config c) : c_(c) {}

  CodecId id() const override { return CodecId::kDithering; }
  std::string name() const override {
    const size_t b = c_.bucket_log2 == 0 ? 0 : size_t{1} << c_.bucket_log2;
    return "dithering:bucket=" + std::to_string(b) + ",levels=" + (c_.natural ? "natural" : "linear") +
           ",norm=" + (c_.max_norm ? "max" : "l2") + ",s=" + std::to_string(c_.s);
  }

  size_t MaxCompressedBytes(size_t elements) const override {
    return internal::SatAdd(WireHeader::kBytes, PayloadFor(elements, c_.bits(), c_.norms(elements)));
  }

  // One pass: a bucket at a time, its norm (reading x from memory), then its
  // codes from x again, now in cache.
  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& ctx) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t n = input.size();
    const float* x = input.data();
    const size_t payload = WriteHeader(n, out);
    uint8_t* norms = out.data() + WireHeader::kBytes;
    const size_t m = c_.norms(n), bucket = c_.bucket(n);
    const PhiloxStream stream(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, PhiloxPurpose::kDithering);
    const CpuIsa isa = ActiveIsa();
    BitWriter writer(norms + 4 * m, norms + payload, c_.bits(), isa);
    uint32_t u[kBlock / 2], codes[kBlock];
    for (size_t k = 0; k < m; ++k) {
      const size_t b0 = k * bucket, end = std::min(n, b0 + bucket);
      ZW_ASSIGN_OR_RETURN(const float norm, NormOf(x + b0, end - b0, c_.max_norm, isa));
      internal::StoreF32(norms + 4 * k, norm);
      for (size_t base = b0; base < end; base += kBlock) {
        const size_t len = std::min(kBlock, end - base);
        stream.Fill(base / 8, (len + 7) / 8, u);  // base is a multiple of 128
        QuantiseBlock(norm, x + base, u, len, codes, isa);
        writer.PutBlock(codes, len);
      }
    }
    writer.Finish();
    return WireHeader::kBytes + payload;
  }

  // One pass over memory (bucketed): per bucket, the norm of y = x + e (y is
  // not stored), then, a block at a time with x and e still in L2, y again,
  // its codes, and e' = y + -(decode of the code), exactly as
  // DecompressAccumulate(-1) would compute it. Unbucketed (B = 0) the same
  // code reads the whole chunk twice.
  Result<size_t> CompressWithFeedback(std::span<const float> input, std::span<float> residual,
                                      FeedbackState& state, std::span<uint8_t> out,
                                      const CodecContext& ctx) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    if (residual.size() != input.size()) {
      return InvalidArgument("dithering: residual of " + std::to_string(residual.size()) + " elements for " +
                             std::to_string(input.size()) + " inputs");
    }
    state.deferred = false;  // never deferred
    const size_t n = input.size();
    const float* x = input.data();
    float* e = residual.data();
    const CpuIsa isa = ActiveIsa();
    const size_t payload = WriteHeader(n, out);
    uint8_t* norms = out.data() + WireHeader::kBytes;
    const size_t m = c_.norms(n), bucket = c_.bucket(n);
    const PhiloxStream stream(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, PhiloxPurpose::kDithering);
    BitWriter writer(norms + 4 * m, norms + payload, c_.bits(), isa);
    float y[kBlock];
    uint32_t u[kBlock / 2], codes[kBlock];
    for (size_t k = 0; k < m; ++k) {
      const size_t b0 = k * bucket, end = std::min(n, b0 + bucket);
      float norm;
      {
        Result<float> r = 0.0f;
        if (c_.max_norm) {
          uint32_t max_bits = 0;
          for (size_t i = b0; i < end; ++i)
            max_bits = std::max(max_bits, std::bit_cast<uint32_t>(e[i] + x[i]) & 0x7fffffffu);
          r = NormFromMax(max_bits);
        } else {
          r = NormFromSquares(CanonicalSquareSumOfSum(e + b0, x + b0, end - b0, isa));
        }
        if (!r.ok()) {
          RestoreAfterReject(x, e, n, k, norms);
          return r.status();
        }
        norm = *r;
      }
      internal::StoreF32(norms + 4 * k, norm);
      const Levels levels(c_, norm);
      for (size_t base = b0; base < end; base += kBlock) {
        const size_t len = std::min(kBlock, end - base);
        // The draws are compute-bound and the loads memory-bound: ask now for
        // what is read next from memory, so it arrives meanwhile. Bucketed,
        // that is this block's counterpart in the next bucket (whose norm is
        // summed next); unbucketed, the next block (read again from memory).
        {
          const size_t ahead = bucket <= kCanonicalSegment ? bucket : kBlock;
          for (size_t i = base + ahead; i < std::min(n, base + ahead + len); i += 16) {
            __builtin_prefetch(x + i);
            __builtin_prefetch(e + i, 1);
          }
        }
        stream.Fill(base / 8, (len + 7) / 8, u);
        size_t done = 0, packed_done = 0;
#if defined(__x86_64__)
        if (isa == CpuIsa::kAvx512 && !c_.natural && norm != 0.0f) {
          uint8_t* packed = writer.BytePosition();
          done = FeedLinearAvx512(c_.s, norm, x + base, e + base, u, len, codes, packed, c_.bits(),
                                  writer.end());
          if (packed != nullptr) {
            writer.SkipBytes(done / 8 * c_.bits());
            packed_done = done;
          }
        }
#endif
        // The rest (all of it off the AVX-512 linear path): y, codes, then e.
        for (size_t i = done; i < len; ++i) y[i] = e[base + i] + x[base + i];
        QuantiseBlock(norm, y + done, u + done / 2, len - done, codes + done, isa);
        writer.PutBlock(codes + packed_done, len - packed_done);
        if (c_.natural) {
          for (size_t i = done; i < len; ++i) e[base + i] = y[i] + -levels.Value(codes[i]);
        } else {
          // Levels::Value's linear branch, written out so that it vectorises.
          const float step = levels.step();
          for (size_t i = done; i < len; ++i) {
            const float mag = static_cast<float>(static_cast<int32_t>(codes[i] >> 1)) * step;
            const float val = std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | (codes[i] & 1u) << 31);
            e[base + i] = y[i] + -val;
          }
        }
      }
    }
    writer.Finish();
    return WireHeader::kBytes + payload;
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    return Decode<false>(in, out, 1.0f);
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    return Decode<true>(in, accum, alpha);
  }

  double ErrorBoundL2(std::span<const float> input) const override {
    const size_t n = input.size(), m = c_.norms(n), bucket = c_.bucket(n);
    double sum = 0.0;
    for (size_t k = 0; k < m; ++k) {
      const size_t b0 = k * bucket, end = std::min(n, b0 + bucket);
      auto norm = NormOf(input.data() + b0, end - b0, c_.max_norm, ActiveIsa());
      if (!norm.ok()) return std::numeric_limits<double>::infinity();
      const double nd = *norm;
      if (!c_.natural) {
        size_t nonzero = 0;
        for (size_t i = b0; i < end; ++i) nonzero += input[i] != 0.0f ? 1 : 0;
        const double step = nd / c_.s * (1.0 + c_.s * 0x1p-21 + 1e-6);
        sum += static_cast<double>(nonzero) * step * step;
      } else {
        const double floor_gap = std::ldexp(nd, 1 - static_cast<int>(c_.s));
        for (size_t i = b0; i < end; ++i) {
          if (input[i] == 0.0f) continue;
          const double err = std::max(std::fabs(static_cast<double>(input[i])), floor_gap) * (1.0 + 1e-6);
          sum += err * err;
        }
      }
    }
    return std::sqrt(sum) * (1.0 + 1e-9) + 1e-30;
  }

 private:
  // Quantise, with the AVX-512 path for linear levels where the CPU has it.
  void QuantiseBlock(float norm, const float* x, const uint32_t* u, size_t len, uint32_t* codes,
                     CpuIsa isa) const {
    size_t done = 0;
#if defined(__x86_64__)
    if (isa == CpuIsa::kAvx512 && !c_.natural && norm != 0.0f)
      done = QuantiseLinearAvx512(c_.s, norm, x, u, len, codes);
#endif
    (void)isa;
    Quantise(c_, norm, x + done, u + done / 2, len - done, codes + done);
  }

  // The header; returns the payload size.
  size_t WriteHeader(size_t n, std::span<uint8_t> out) const {
    const size_t payload = PayloadFor(n, c_.bits(), c_.norms(n));
    WireHeader h;
    h.codec = CodecId::kDithering;
    h.elements = n;
    h.payload_bytes = payload;
    h.param_word = c_.word();
    EncodeHeader(h, out.first<WireHeader::kBytes>());
    return payload;
  }

  // Error feedback rejected bucket `bad` (non-finite y): leave the residual
  // holding y = x + e everywhere, as the other codecs do on error. Buckets
  // before it already hold e' = y - decode, whose codes are in the payload:
  // they get decode added back (y up to one rounding); the rest get x added.
  void RestoreAfterReject(const float* x, float* e, size_t n, size_t bad, const uint8_t* norms) const {
    const size_t bucket = c_.bucket(n), m = c_.norms(n);
    const size_t done = bad * bucket;  // bucket * w bits is whole words: the writer flushed them
    const uint32_t w = c_.bits();
    const uint8_t* codes = norms + 4 * m;
    for (size_t k = 0; k < bad; ++k) {
      const Levels levels(c_, internal::LoadF32(norms + 4 * k));
      for (size_t j = k * bucket; j < (k + 1) * bucket; ++j) {
        uint64_t v = 0;
        const size_t bit = j * w;
        for (size_t b = 0; b < 4 && bit / 8 + b < (done * w + 7) / 8; ++b) {
          v |= static_cast<uint64_t>(codes[bit / 8 + b]) << (8 * b);
        }
        e[j] = e[j] + levels.Value(static_cast<uint32_t>((v >> (bit % 8)) & ((uint64_t{1} << w) - 1)));
      }
    }
    for (size_t i = done; i < n; ++i) e[i] = e[i] + x[i];
  }

  template <bool kAccumulate>
  Status Decode(std::span<const uint8_t> in, std::span<float> out, float alpha) const {
    const size_t n = out.size();
    ZW_ASSIGN_OR_RETURN(WireHeader h, internal::ValidateHeader(in, CodecId::kDithering, n));
    if (h.param_bytes != 0) return Corrupt("dithering: unexpected parameter block");
    Config c;
    c.s = h.param_word & 0xffffu;
    c.natural = (h.param_word & kNaturalBit) != 0;
    c.max_norm = (h.param_word & kMaxNormBit) != 0;
    c.bucket_log2 = (h.param_word >> kBucketShift) & 0x1fu;
    if ((h.param_word >> (kBucketShift + 5)) != 0 || c.s == 0 || (c.natural && c.s > 32) ||
        (c.bucket_log2 != 0 && (c.bucket_log2 < kMinBucketLog2 || c.bucket_log2 > kMaxBucketLog2))) {
      return Corrupt("dithering: bad parameter word " + std::to_string(h.param_word));
    }
    const uint32_t w = c.bits();
    const size_t m = c.norms(n), bucket = c.bucket(n);
    if (h.payload_bytes != PayloadFor(n, w, m)) {
      return Corrupt("dithering: payload is " + std::to_string(h.payload_bytes) + " bytes, " +
                     std::to_string(m) + " norms and " + std::to_string(n) + " codes of " +
                     std::to_string(w) + " bits need " + std::to_string(PayloadFor(n, w, m)));
    }
    const uint8_t* p = in.data() + WireHeader::kBytes;
    {
      bool bad = false;
      for (size_t k = 0; k < m; ++k) {
        const uint32_t bits = internal::LoadLe32(p + 4 * k);
        bad |= bits >= 0x7f800000u;  // negative (sign set, -0 included), infinite or NaN
      }
      if (bad) return Corrupt("dithering: a norm is not a finite non-negative number");
    }
    const size_t stream_bytes = h.payload_bytes - 4 * m;
    const uint8_t* stream = p + 4 * m;
    const CodeReader code(stream, stream_bytes, w);
    // AVX-512 unpacking for codes of at most 8 bits (s <= 127).
    const bool vector = ActiveIsa() == CpuIsa::kAvx512 && w <= 8;
    {
      // Validate every code (and the padding) before touching the output.
      uint32_t bad = 0;
      const uint32_t max_code = c.s << 1 | 1u;
      size_t j = 0;
#if defined(__x86_64__)
      if (vector) {
        bool vector_bad = false;
        j = ValidateCodesAvx512(stream, stream + stream_bytes, n, w, max_code, &vector_bad);
        bad = vector_bad ? 1u : 0u;
      }
#endif
      for (; j < n; ++j) {
        const uint32_t v = code(j);
        bad |= (v > max_code) | (v == 1u);
      }
      if (bad != 0) return Corrupt("dithering: a code has a level above s or a signed zero");
      const size_t used = internal::SatMul(n, w);
      if (used % 8 != 0 && (stream[stream_bytes - 1] >> (used % 8)) != 0) {
        return Corrupt("dithering: padding bits are set");
      }
    }
    float* dst = out.data();
    for (size_t k = 0; k < m; ++k) {
      const size_t b0 = k * bucket, end = std::min(n, b0 + bucket);
      const Levels levels(c, internal::LoadF32(p + 4 * k));
      size_t j = b0;
#if defined(__x86_64__)
      if (vector && !c.natural) {
        j += DecodeLinearAvx512<kAccumulate>(stream, stream + stream_bytes, b0, end - b0, w, levels.step(),
                                             alpha, dst + b0);
      }
#endif
      for (; j < end; ++j) {
        const float val = levels.Value(code(j));
        if constexpr (kAccumulate) {
          dst[j] += alpha * val;
        } else {
          dst[j] = val;
        }
      }
    }
    return Status::Ok();
  }

  Config c_;
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeDitheringCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(CheckKeys(spec, {"s", "levels", "norm", "bucket"}));
  Config c;
  if (auto it = spec.params.find("levels"); it != spec.params.end()) {
    if (it->second != "linear" && it->second != "natural") {
      return InvalidArgument("dithering: levels must be linear or natural, got '" + it->second + "'");
    }
    c.natural = it->second == "natural";
  }
  if (auto it = spec.params.find("norm"); it != spec.params.end()) {
    if (it->second != "l2" && it->second != "max") {
      return InvalidArgument("dithering: norm must be l2 or max, got '" + it->second + "'");
    }
    c.max_norm = it->second == "max";
  }
  ZW_ASSIGN_OR_RETURN(uint64_t s, ParseUint(spec, "s", 16, 1, c.natural ? 32 : 65535));
  c.s = static_cast<uint32_t>(s);
  ZW_ASSIGN_OR_RETURN(uint64_t bucket, ParseUint(spec, "bucket", kCanonicalSegment, 0, kCanonicalSegment));
  if (bucket != 0 && (!std::has_single_bit(bucket) || bucket < (uint64_t{1} << kMinBucketLog2))) {
    return InvalidArgument(
        "dithering: bucket must be 0 (one norm per chunk) or a power of two in [128, 8192], got " +
        std::to_string(bucket));
  }
  c.bucket_log2 = bucket == 0 ? 0 : static_cast<uint32_t>(std::countr_zero(bucket));
  return std::unique_ptr<Codec>(std::make_unique<DitheringCodec>(c));
}
}  // namespace internal
}  // namespace zipwire::kernels
