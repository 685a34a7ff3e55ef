// The "bf16" codec: bfloat16 (the top half of a binary32), round to nearest even.
//
// Wire format: header (codec kBf16, param_bytes 0, param_word 0,
// payload_bytes = 2 * elements) followed by the elements as little-endian
// bfloat16. Rounding: to nearest, ties to even, on the 16 dropped bits; finite
// values of magnitude >= 0x7f7f8000 (half an ulp past the largest bf16)
// become +-Inf; Inf stays Inf; NaN stays NaN, made quiet (bit 6 of the bf16,
// the float's bit 22, set) with its top 6 payload bits and sign kept; float
// subnormals keep bf16's (same exponent range) subnormals or round to +-0.
// Decode is exact: the bf16 bits become the float's top half.
//
// Linear (AccumulateEncoded): accum = bf16(decode(accum) + decode(in)), one
// float addition and one rounding per element, so a sum of m buffers carries
// up to m roundings (the server-side sum is an fp32 sum re-rounded each time).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/codec_internal.h"
#include "kernels/cpu_isa.h"
#include "kernels/simd.h"

namespace zipwire::kernels {
namespace {

// Loops over plain integer arithmetic, so they vectorise (the NaN test is a
// select); the byte side is little-endian and may be unaligned.
void ToBf16Scalar(const float* in, uint8_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = internal::FloatToBf16(in[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

#if defined(__x86_64__)
// FloatToBf16 on sixteen floats at a time (vpmovdw packs them); returns the
// elements done, a multiple of 16.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) size_t ToBf16Avx512(const float* in,
                                                                                  uint8_t* out, size_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i inf = _mm512_set1_epi32(0x7f800000);
  const __m512i bias = _mm512_set1_epi32(0x7fff);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i quiet = _mm512_set1_epi32(0x0040);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i x = _mm512_loadu_si512(in + i);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs_mask), inf);
    const __m512i top = _mm512_srli_epi32(x, 16);
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, bias), _mm512_and_si512(top, one)), 16);
    const __m512i h = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(top, quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * i), _mm512_cvtepi32_epi16(h));
  }
  return i;
}
#endif

void ToBf16(const float* in, uint8_t* out, size_t n) {
  size_t done = 0;
#if defined(__x86_64__)
  if (ActiveIsa() == CpuIsa::kAvx512) done = ToBf16Avx512(in, out, n);
#endif
  ToBf16Scalar(in + done, out + 2 * done, n - done);
}

template <bool kAccumulate>
void FromBf16(const uint8_t* in, float* out, size_t n, float alpha) {
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    const float v = internal::Bf16ToFloat(h);
    if constexpr (kAccumulate) {
      out[i] += alpha * v;
    } else {
      out[i] = v;
    }
  }
}

void DecodeBf16(const uint8_t* in, float* out, size_t n) { FromBf16<false>(in, out, n, 1.0f); }

class Bf16Codec final : public Codec {
 public:
  CodecId id() const override { return CodecId::kBf16; }
  std::string name() const override { return "bf16"; }

  size_t MaxCompressedBytes(size_t elements) const override {
    return internal::SatAdd(WireHeader::kBytes, internal::SatMul(elements, 2));
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& /*ctx*/) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t payload = input.size() * 2;
    internal::WriteSimpleHeader(CodecId::kBf16, input.size(), payload, out);
    ToBf16(input.data(), out.data() + WireHeader::kBytes, input.size());
    return WireHeader::kBytes + payload;
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    ZW_ASSIGN_OR_RETURN(auto payload,
                        internal::ValidateSimple(in, CodecId::kBf16, out.size(), out.size() * 2));
    FromBf16<false>(payload.data(), out.data(), out.size(), 1.0f);
    return Status::Ok();
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    ZW_ASSIGN_OR_RETURN(auto payload,
                        internal::ValidateSimple(in, CodecId::kBf16, accum.size(), accum.size() * 2));
    FromBf16<true>(payload.data(), accum.data(), accum.size(), alpha);
    return Status::Ok();
  }

  // Round to nearest errs by at most half a bf16 ulp: |x| * 2^-8 for normal
  // values, 2^-134 (half the subnormal step 2^-133) below 2^-126. Inputs that
  // round to Inf, and non-finite inputs, make the bound infinite.
  double ErrorBoundL2(std::span<const float> input) const override {
    double sum = 0.0;
    for (float x : input) {
      if ((std::bit_cast<uint32_t>(x) & 0x7fffffffu) >= 0x7f7f8000u) {
        return std::numeric_limits<double>::infinity();
      }
      const double e = std::max(std::fabs(static_cast<double>(x)) * 0x1p-8, 0x1p-134);
      sum += e * e;
    }
    return std::sqrt(sum);
  }

  bool is_linear() const override { return true; }

  Status AccumulateEncoded(std::span<const uint8_t> in, std::span<uint8_t> accum) const override {
    return internal::AccumulateEncoded16(CodecId::kBf16, in, accum, DecodeBf16, ToBf16);
  }
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeBf16Codec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(RejectParams(spec));
  return std::unique_ptr<Codec>(std::make_unique<Bf16Codec>());
}
}  // namespace internal
}  // namespace zipwire::kernels
