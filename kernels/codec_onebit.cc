// The "onebit" codec: one sign bit per element and one scale per chunk.
//
// Wire format: header (codec kOnebit, param_bytes 0, param_word 0,
// payload_bytes = 4 + 4 * ceil(elements / 32)) followed by
//   scale: little-endian binary32, the mean of |x| over the chunk (summed in
//          double, rounded once to float); finite and >= +0;
//   words: ceil(elements / 32) little-endian u32; bit j of word w is element
//          32w + j, 1 = negative. Bits past `elements` in the last word are 0.
// Decode: element = bit ? -scale : +scale.
//
// Non-finite inputs: NaN and +-Inf are left out of the mean (which divides by
// the count of finite elements) and are encoded by their sign test alone: x<0
// is negative, so -Inf -> -scale, +Inf and every NaN -> +scale. The error bound
// is infinite for such input. -0.0 is not < 0, so it decodes to +scale.
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/codec_internal.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace zipwire::kernels {
namespace {

constexpr size_t kWordBits = 32;

size_t WordsFor(size_t n) { return n / kWordBits + (n % kWordBits != 0 ? 1 : 0); }
size_t PayloadFor(size_t n) { return internal::SatAdd(4, internal::SatMul(WordsFor(n), 4)); }

struct AbsSum {
  double sum = 0.0;     // of |x| over finite x
  uint64_t finite = 0;  // count of finite x
};

// Element i of the chunk is summed into double lane i % kLanes, each lane in
// element order, and the lanes are added in a fixed order at the end: the
// compiler never has to reassociate one long sum (so the loop vectorises), and
// the SSE2 and portable paths give bit-identical scales.
constexpr size_t kLanes = 8;  // 4 SSE2 registers: few enough to stay unspilled

// |x| with non-finite values replaced by 0, and whether x was finite; done on
// the bits so it is a select, not a branch.
inline float MaskedAbs(float x, bool* finite) {
  const uint32_t b = std::bit_cast<uint32_t>(x) & 0x7fffffffu;
  *finite = (b & 0x7f800000u) != 0x7f800000u;
  return std::bit_cast<float>(*finite ? b : 0u);
}

// One pass over the input: the abs-sum for the scale and, when `words` is not
// null, the sign words (bit j of word w = (x[32w + j] < 0)), stored
// little-endian and unaligned. The partial last word is left to the caller.
AbsSum Scan(const float* x, size_t n, uint8_t* words) {
  AbsSum r;
  double acc[kLanes] = {};
  const size_t full = n / kWordBits;
#if defined(__SSE2__)
  const __m128i abs_mask = _mm_set1_epi32(0x7fffffff);
  const __m128i exp_mask = _mm_set1_epi32(0x7f800000);
  const __m128 zero = _mm_setzero_ps();
  __m128d a[4];  // lanes 2k, 2k+1 in a[k]
  for (auto& v : a) v = _mm_setzero_pd();
  uint64_t nonfinite = 0;
  for (size_t w = 0; w < full; ++w) {
    const float* p = x + w * kWordBits;
    uint32_t signs = 0;
    int nf_bits = 0;
    for (int k = 0; k < 8; ++k) {
      const __m128 v = _mm_loadu_ps(p + 4 * k);
      // Ordered compare: NaN is not < 0, so it packs as 0 (positive).
      signs |= static_cast<uint32_t>(_mm_movemask_ps(_mm_cmplt_ps(v, zero))) << (4 * k);
      const __m128i bits = _mm_and_si128(_mm_castps_si128(v), abs_mask);
      const __m128i nf = _mm_cmpeq_epi32(_mm_and_si128(bits, exp_mask), exp_mask);
      nf_bits |= _mm_movemask_ps(_mm_castsi128_ps(nf));
      const __m128 m = _mm_castsi128_ps(_mm_andnot_si128(nf, bits));
      // Elements 4k..4k+3 go to lanes (4k..4k+3) % 8.
      const int base = (2 * k) % 4;
      a[base] = _mm_add_pd(a[base], _mm_cvtps_pd(m));
      a[base + 1] = _mm_add_pd(a[base + 1], _mm_cvtps_pd(_mm_movehl_ps(m, m)));
    }
    if (nf_bits != 0) {  // rare: recount this block exactly
      for (size_t j = 0; j < kWordBits; ++j) {
        bool finite;
        MaskedAbs(p[j], &finite);
        nonfinite += finite ? 0 : 1;
      }
    }
    if (words != nullptr) std::memcpy(words + 4 * w, &signs, 4);
  }
  for (int k = 0; k < 4; ++k) {
    _mm_storel_pd(&acc[2 * k], a[k]);
    _mm_storeh_pd(&acc[2 * k + 1], a[k]);
  }
  r.finite = full * kWordBits - nonfinite;
#else
  for (size_t w = 0; w < full; ++w) {
    const float* p = x + w * kWordBits;
    uint32_t signs = 0;
    for (size_t j = 0; j < kWordBits; ++j) {
      bool finite;
      acc[j % kLanes] += static_cast<double>(MaskedAbs(p[j], &finite));
      r.finite += finite ? 1 : 0;
      signs |= static_cast<uint32_t>(p[j] < 0.0f) << j;
    }
    if (words != nullptr) std::memcpy(words + 4 * w, &signs, 4);
  }
#endif
  for (size_t i = full * kWordBits; i < n; ++i) {
    bool finite;
    acc[i % kLanes] += static_cast<double>(MaskedAbs(x[i], &finite));
    r.finite += finite ? 1 : 0;
  }
  for (double v : acc) r.sum += v;
  return r;
}

float ScaleOf(const AbsSum& s) {
  // The mean of finite floats is <= FLT_MAX, so the float is finite.
  return s.finite > 0 ? static_cast<float>(s.sum / static_cast<double>(s.finite)) : 0.0f;
}

// dst[j] = (bit j of word) ? -v : v for j < 32, written as a sign-bit XOR so
// the flip is exact and branch-free; Accumulate adds instead of storing.
template <bool kAccumulate>
inline void ExpandWord(uint32_t word, float v, float* dst) {
#if defined(__SSE2__)
  const __m128i sign = _mm_set1_epi32(static_cast<int>(0x80000000u));
  const __m128 vv = _mm_set1_ps(v);
  const __m128i bcast = _mm_set1_epi32(static_cast<int>(word));
  __m128i bit = _mm_setr_epi32(1, 2, 4, 8);
  for (int k = 0; k < 8; ++k) {
    const __m128i set = _mm_cmpeq_epi32(_mm_and_si128(bcast, bit), bit);
    const __m128 val = _mm_xor_ps(vv, _mm_castsi128_ps(_mm_and_si128(set, sign)));
    if constexpr (kAccumulate) {
      _mm_storeu_ps(dst + 4 * k, _mm_add_ps(_mm_loadu_ps(dst + 4 * k), val));
    } else {
      _mm_storeu_ps(dst + 4 * k, val);
    }
    bit = _mm_slli_epi32(bit, 4);
  }
#else
  const uint32_t vbits = std::bit_cast<uint32_t>(v);
  for (uint32_t j = 0; j < 32; ++j) {
    const float val = std::bit_cast<float>(vbits ^ (((word >> j) & 1u) << 31));
    if constexpr (kAccumulate) {
      dst[j] += val;
    } else {
      dst[j] = val;
    }
  }
#endif
}

class OnebitCodec final : public Codec {
 public:
  CodecId id() const override { return CodecId::kOnebit; }
  std::string name() const override { return "onebit"; }

  size_t MaxCompressedBytes(size_t elements) const override {
    return internal::SatAdd(WireHeader::kBytes, PayloadFor(elements));
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& /*ctx*/) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t n = input.size();
    const size_t payload = PayloadFor(n);
    internal::WriteSimpleHeader(CodecId::kOnebit, n, payload, out);
    uint8_t* p = out.data() + WireHeader::kBytes;
    // One pass writes the full sign words and sums |x|; the scale goes in front.
    const float scale = ScaleOf(Scan(input.data(), n, p + 4));
    std::memcpy(p, &scale, 4);
    const size_t full = n / kWordBits;
    if (const size_t rest = n % kWordBits; rest != 0) {
      const float* x = input.data() + full * kWordBits;
      uint32_t word = 0;
      for (size_t j = 0; j < rest; ++j) word |= static_cast<uint32_t>(x[j] < 0.0f) << j;
      std::memcpy(p + 4 + 4 * full, &word, 4);
    }
    return WireHeader::kBytes + payload;
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    return Decode<false>(in, out, 1.0f);
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    return Decode<true>(in, accum, alpha);
  }

  // For finite x decoded with the float scale s, each error is | |x_i| - s |
  // (the sign always matches), so ||x - d||^2 = sum (|x_i| - s)^2, which equals
  // ||x||^2 - n*s^2 when s is the exact mean. Summing the squares directly
  // avoids the cancellation of that difference and accounts for s being
  // rounded to float; the 1e-9 relative slack covers the double rounding.
  double ErrorBoundL2(std::span<const float> input) const override {
    const AbsSum s = Scan(input.data(), input.size(), nullptr);
    if (s.finite != input.size()) return std::numeric_limits<double>::infinity();
    const double scale = ScaleOf(s);
    double sum = 0.0;
    for (float x : input) {
      const double e = std::fabs(static_cast<double>(x)) - scale;
      sum += e * e;
    }
    return std::sqrt(sum) * (1.0 + 1e-9);
  }

 private:
  template <bool kAccumulate>
  Status Decode(std::span<const uint8_t> in, std::span<float> out, float alpha) const {
    const size_t n = out.size();
    ZW_ASSIGN_OR_RETURN(auto payload, internal::ValidateSimple(in, CodecId::kOnebit, n, PayloadFor(n)));
    const uint8_t* p = payload.data();
    float scale;
    std::memcpy(&scale, p, 4);
    p += 4;
    // Compress only writes a finite, non-negative scale (+0.0 at most).
    if (!(scale >= 0.0f && scale <= FLT_MAX) || std::signbit(scale)) {
      return Corrupt("onebit scale " + std::to_string(scale) + " is not a finite non-negative number");
    }
    const size_t full = n / kWordBits;
    const size_t rest = n % kWordBits;
    if (rest != 0) {
      const uint32_t last = internal::LoadLe32(p + 4 * full);
      if ((last >> rest) != 0)
        return Corrupt("onebit padding bits past element " + std::to_string(n) + " are set");
    }
    // alpha * (-s) == -(alpha * s) exactly, so one product serves both signs.
    const float v = kAccumulate ? alpha * scale : scale;
    float* dst = out.data();
    for (size_t w = 0; w < full; ++w) {
      uint32_t word;
      std::memcpy(&word, p + 4 * w, 4);
      ExpandWord<kAccumulate>(word, v, dst + w * kWordBits);
    }
    if (rest != 0) {
      const uint32_t word = internal::LoadLe32(p + 4 * full);
      const uint32_t vbits = std::bit_cast<uint32_t>(v);
      for (size_t j = 0; j < rest; ++j) {
        const float val = std::bit_cast<float>(vbits ^ (((word >> j) & 1u) << 31));
        if constexpr (kAccumulate) {
          dst[full * kWordBits + j] += val;
        } else {
          dst[full * kWordBits + j] = val;
        }
      }
    }
    return Status::Ok();
  }
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeOnebitCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(RejectParams(spec));
  return std::unique_ptr<Codec>(std::make_unique<OnebitCodec>());
}
}  // namespace internal
}  // namespace zipwire::kernels
