// The "onebit" codec: one sign bit per element and one scale per chunk.
//
// Wire format: header (codec kOnebit, param_bytes 0, param_word 0,
// payload_bytes = 4 + 4 * ceil(elements / 32)) followed by
//   scale: little-endian binary32, the mean of |x| over the finite x of the
//          chunk: (float)(sum / count) computed in double, the sum of |x| in
//          the canonical order of kernels/canonical_sum.h (which the CUDA
//          encoder shares); finite and >= +0;
//   words: ceil(elements / 32) little-endian u32; bit j of word w is element
//          32w + j, 1 = negative. Bits past `elements` in the last word are 0.
// Decode: element = bit ? -scale : +scale.
//
// Non-finite inputs: NaN and +-Inf are left out of the mean (which divides by
// the count of finite elements) and are encoded by their sign test alone: x<0
// is negative, so -Inf -> -scale, +Inf and every NaN -> +scale. The error bound
// is infinite for such input. -0.0 is not < 0, so it decodes to +scale.
#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/canonical_sum.h"
#include "kernels/codec_internal.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace zipwire::kernels {
namespace {

constexpr size_t kWordBits = 32;

size_t WordsFor(size_t n) { return n / kWordBits + (n % kWordBits != 0 ? 1 : 0); }
size_t PayloadFor(size_t n) { return internal::SatAdd(4, internal::SatMul(WordsFor(n), 4)); }

// The residual e in its deferred form is the previous step's y and scale s:
// e = y + -1 * decode(y), which DecompressAccumulate(-1) computes as
// y + ((-1 * s) with the sign bit flipped when y < 0). These are the two
// offsets, as CanonicalAbsSumOfUpdate takes them; -0.0 for a plain residual
// (y + -0.0 == y for every y).
struct Offsets {
  float if_negative, otherwise;
};
Offsets OffsetsOf(const FeedbackState& state) {
  if (!state.deferred) return {-0.0f, -0.0f};
  const float neg = -1.0f * state.scale;
  return {std::bit_cast<float>(std::bit_cast<uint32_t>(neg) ^ 0x80000000u), neg};
}

float ScaleOf(const CanonicalAbsSum& s) {
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
    const float scale = ScaleOf(CanonicalAbsSumOf(input.data(), n, p + 4));
    Finish(input.data(), n, scale, p);
    return WireHeader::kBytes + payload;
  }

  // One pass over input and residual: y = x + e is written over the residual,
  // summed and sign-packed as it goes. The residual is left deferred (y and
  // the scale): the subtraction of the decode happens when the next step (or
  // FinishResidual) reads it.
  Result<size_t> CompressWithFeedback(std::span<const float> input, std::span<float> residual,
                                      FeedbackState& state, std::span<uint8_t> out,
                                      const CodecContext& /*ctx*/) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    if (residual.size() != input.size()) {
      return InvalidArgument("onebit: residual of " + std::to_string(residual.size()) + " elements for " +
                             std::to_string(input.size()) + " inputs");
    }
    const size_t n = input.size();
    const size_t payload = PayloadFor(n);
    internal::WriteSimpleHeader(CodecId::kOnebit, n, payload, out);
    uint8_t* p = out.data() + WireHeader::kBytes;
    // y = e + x over the residual and the canonical sum of |y|, one pass.
    const Offsets off = OffsetsOf(state);
    float* y = residual.data();
    const CanonicalAbsSum total =
        CanonicalAbsSumOfUpdate(input.data(), y, n, off.if_negative, off.otherwise, p + 4, ActiveIsa());
    const float scale = ScaleOf(total);
    Finish(y, n, scale, p);
    state.deferred = true;
    state.scale = scale;
    return WireHeader::kBytes + payload;
  }

  void FinishResidual(std::span<float> residual, FeedbackState& state) const override {
    if (state.deferred) {
      const Offsets off = OffsetsOf(state);
      for (float& r : residual) r = r + (r < 0.0f ? off.if_negative : off.otherwise);
    }
    state.deferred = false;
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    return Decode<false>(in, out, 1.0f);
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    return Decode<true>(in, accum, alpha);
  }

  // Writes the scale and the partial last sign word of y[0..n).
  static void Finish(const float* y, size_t n, float scale, uint8_t* p) {
    std::memcpy(p, &scale, 4);
    const size_t full = n / kWordBits;
    if (const size_t rest = n % kWordBits; rest != 0) {
      const float* x = y + full * kWordBits;
      uint32_t word = 0;
      for (size_t j = 0; j < rest; ++j) word |= static_cast<uint32_t>(x[j] < 0.0f) << j;
      std::memcpy(p + 4 + 4 * full, &word, 4);
    }
  }

  // For finite x decoded with the float scale s, each error is | |x_i| - s |
  // (the sign always matches), so ||x - d||^2 = sum (|x_i| - s)^2, which equals
  // ||x||^2 - n*s^2 when s is the exact mean. Summing the squares directly
  // avoids the cancellation of that difference and accounts for s being
  // rounded to float; the 1e-9 relative slack covers the double rounding.
  double ErrorBoundL2(std::span<const float> input) const override {
    const CanonicalAbsSum s = CanonicalAbsSumOf(input.data(), input.size());
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
