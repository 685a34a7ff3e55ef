// The "fp16" codec: IEEE binary16, round to nearest even.
//
// Wire format: header (codec kFp16, param_bytes 0, param_word 0,
// payload_bytes = 2 * elements) followed by the elements as little-endian
// binary16. Finite values of magnitude >= 65520 (half of the way past the
// largest half, 65504) become +-Inf; Inf stays Inf; NaN stays a quiet NaN with
// the top 10 payload bits kept, both ways (what F16C does); float subnormals round to
// half subnormals or zero. The F16C path (when the CPU has it) and the scalar
// path produce identical bytes; tests check that.
//
// Linear in the weak sense (AccumulateEncoded sums in fp32 and re-rounds).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/codec_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ZW_HAVE_X86 1
#endif

namespace zipwire::kernels {
namespace internal {

uint16_t FloatToHalfScalar(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // Inf or NaN
    if (ax == 0x7f800000u) return sign | 0x7c00u;
    // Quiet the NaN and keep its top payload bits, as vcvtps2ph does.
    return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  }
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds past 65504
  if (ax >= 0x38800000u) {                       // a normal half (>= 2^-14)
    // Rebias the exponent (127 -> 15) and round the 13 dropped bits to
    // nearest even; a carry out of the mantissa correctly bumps the exponent.
    const uint32_t odd = (ax >> 13) & 1u;
    return static_cast<uint16_t>(sign | ((ax - (112u << 23) + 0xfffu + odd) >> 13));
  }
  // A half subnormal (unit 2^-24) or zero: value = m * 2^(e - 150).
  const uint32_t e = ax >> 23;
  const uint32_t m = e == 0 ? (ax & 0x7fffffu) : ((ax & 0x7fffffu) | 0x800000u);
  const uint32_t shift = 126u - (e == 0 ? 1u : e);  // 14..125
  if (shift >= 25) return sign;                     // below 2^-25 (m < 2^24): rounds to 0
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;  // may reach 0x400, the smallest normal
  return static_cast<uint16_t>(sign | q);
}

float HalfToFloatScalar(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in float.
    const float mag = static_cast<float>(mant) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(mag));
  }
  if (exp == 31) {
    // Inf, or a NaN made quiet with its payload kept, as vcvtph2ps does.
    const uint32_t quiet = mant != 0 ? 0x00400000u : 0u;
    return std::bit_cast<float>(sign | 0x7f800000u | quiet | (mant << 13));
  }
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

void FloatToHalfScalar(const float* in, uint8_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = FloatToHalfScalar(in[i]);
    out[2 * i] = static_cast<uint8_t>(h);
    out[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
}

void HalfToFloatScalar(const uint8_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    out[i] = HalfToFloatScalar(static_cast<uint16_t>(in[2 * i] | (in[2 * i + 1] << 8)));
  }
}

#ifdef ZW_HAVE_X86
#include <cpuid.h>
#endif

#ifdef ZW_HAVE_X86
bool HasF16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    // F16C through cpuid: clang before 16 rejects __builtin_cpu_supports("f16c").
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
    return __builtin_cpu_supports("avx2") && f16c;
  }();
  return has;
}

// The rounding mode is an immediate, so MXCSR's mode does not matter; DAZ
// (never set by zipwire) would flush float subnormal inputs to zero here.
__attribute__((target("avx2,f16c"))) void FloatToHalfF16c(const float* in, uint8_t* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), h);
  }
  if (i < n) {
    // Tail through a zero-padded block so no byte past `in`/`out` is touched.
    float tmp_in[8] = {};
    alignas(16) uint8_t tmp_out[16];
    std::memcpy(tmp_in, in + i, (n - i) * sizeof(float));
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(tmp_in), _MM_FROUND_TO_NEAREST_INT);
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp_out), h);
    std::memcpy(out + 2 * i, tmp_out, (n - i) * 2);
  }
}

__attribute__((target("avx2,f16c"))) void HalfToFloatF16c(const uint8_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  if (i < n) {
    alignas(16) uint8_t tmp_in[16] = {};
    float tmp_out[8];
    std::memcpy(tmp_in, in + 2 * i, (n - i) * 2);
    _mm256_storeu_ps(tmp_out, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp_in))));
    std::memcpy(out + i, tmp_out, (n - i) * sizeof(float));
  }
}
#else
bool HasF16c() { return false; }
void FloatToHalfF16c(const float* in, uint8_t* out, size_t n) { FloatToHalfScalar(in, out, n); }
void HalfToFloatF16c(const uint8_t* in, float* out, size_t n) { HalfToFloatScalar(in, out, n); }
#endif

}  // namespace internal

namespace {

void FloatToHalf(const float* in, uint8_t* out, size_t n) {
  if (internal::HasF16c()) {
    internal::FloatToHalfF16c(in, out, n);
  } else {
    internal::FloatToHalfScalar(in, out, n);
  }
}

void HalfToFloat(const uint8_t* in, float* out, size_t n) {
  if (internal::HasF16c()) {
    internal::HalfToFloatF16c(in, out, n);
  } else {
    internal::HalfToFloatScalar(in, out, n);
  }
}

class Fp16Codec final : public Codec {
 public:
  CodecId id() const override { return CodecId::kFp16; }
  std::string name() const override { return "fp16"; }

  size_t MaxCompressedBytes(size_t elements) const override {
    return internal::SatAdd(WireHeader::kBytes, internal::SatMul(elements, 2));
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& /*ctx*/) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t payload = input.size() * 2;
    internal::WriteSimpleHeader(CodecId::kFp16, input.size(), payload, out);
    FloatToHalf(input.data(), out.data() + WireHeader::kBytes, input.size());
    return WireHeader::kBytes + payload;
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    ZW_ASSIGN_OR_RETURN(auto payload,
                        internal::ValidateSimple(in, CodecId::kFp16, out.size(), out.size() * 2));
    HalfToFloat(payload.data(), out.data(), out.size());
    return Status::Ok();
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    ZW_ASSIGN_OR_RETURN(auto payload,
                        internal::ValidateSimple(in, CodecId::kFp16, accum.size(), accum.size() * 2));
    // Decode a cache-resident block at a time, then a vectorisable axpy.
    constexpr size_t kBlock = 1024;
    float tmp[kBlock];
    for (size_t base = 0; base < accum.size(); base += kBlock) {
      const size_t len = std::min(kBlock, accum.size() - base);
      HalfToFloat(payload.data() + 2 * base, tmp, len);
      float* dst = accum.data() + base;
      for (size_t i = 0; i < len; ++i) dst[i] += alpha * tmp[i];
    }
    return Status::Ok();
  }

  // Per element, round to nearest even errs by at most half an ulp: |x|*2^-11
  // for normal halves, 2^-25 (half the subnormal step 2^-24) below 2^-14.
  // Non-finite inputs and magnitudes >= 65520 decode to Inf/NaN, so the bound
  // is infinite then.
  double ErrorBoundL2(std::span<const float> input) const override {
    double sum = 0.0;
    for (float x : input) {
      const double a = std::fabs(static_cast<double>(x));
      if (!(a < 65520.0)) return std::numeric_limits<double>::infinity();
      const double e = std::max(a * 0x1p-11, 0x1p-25);
      sum += e * e;
    }
    return std::sqrt(sum);
  }

  // accum = fp16(decode(accum) + decode(in)): one fp32 addition and one
  // rounding per element (not byte-linear; a sum of m buffers carries up to m
  // roundings). Overflow past 65504 gives +-Inf, as Compress would.
  bool is_linear() const override { return true; }

  Status AccumulateEncoded(std::span<const uint8_t> in, std::span<uint8_t> accum) const override {
    return internal::AccumulateEncoded16(CodecId::kFp16, in, accum, HalfToFloat, FloatToHalf);
  }
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeFp16Codec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(RejectParams(spec));
  return std::unique_ptr<Codec>(std::make_unique<Fp16Codec>());
}
}  // namespace internal
}  // namespace zipwire::kernels
