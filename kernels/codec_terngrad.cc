// The "terngrad" codec (Wen et al. 2017): each element becomes
// scale * sign(x_j) * b_j with scale = max |x| and b_j ~ Bernoulli(|x_j| / scale),
// so E[decode] = x.
//
// b_j = (u_j * scale < |x_j|), u_j = PhiloxUniform(draw j) of the stream
// (seed, tensor, chunk, step, kTerngrad); x_j = 0 never fires, |x_j| = scale
// fires unless u_j * scale rounds up to scale.
//
// Wire format: header (codec kTerngrad, param_bytes 0, param_word 0,
// payload_bytes = 4 + ceil(n / 4)), then
//   scale: binary32, finite, >= +0;
//   codes: 2 bits per element, element j at bits 2*(j%4) of byte j/4:
//          00 zero, 01 +scale, 10 -scale; 11 is invalid (kCorrupt); padding
//          bits past element n are 0.
//
// Non-finite input: Compress fails with kInvalidArgument (no finite scale
// exists); ErrorBoundL2 is infinite.
// ErrorBoundL2: each element decodes to 0 or +-scale with its own sign, so it
// errs by at most max(|x_j|, scale - |x_j|).
#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/codec_internal.h"
#include "kernels/philox.h"

namespace zipwire::kernels {
namespace {

constexpr size_t kBlock = 1024;  // elements per batch of draws (a multiple of 16)

size_t PayloadFor(size_t n) { return internal::SatAdd(4, n / 4 + (n % 4 != 0 ? 1 : 0)); }

Result<float> ScaleOf(std::span<const float> x) {
  uint32_t m = 0;
  for (float v : x) m = std::max(m, std::bit_cast<uint32_t>(v) & 0x7fffffffu);
  if (m >= 0x7f800000u) return InvalidArgument("terngrad: input has a NaN or infinity");
  return std::bit_cast<float>(m);
}

// 2-bit codes of x[0..len), packed 16 to a u32 (len a multiple of 16 except at the end).
void Quantise(float scale, const float* x, const uint32_t* u, size_t len, uint32_t* words) {
  for (size_t w = 0; w * 16 < len; ++w) {
    uint32_t word = 0;
    const size_t end = std::min<size_t>(16, len - w * 16);
    for (size_t j = 0; j < end; ++j) {
      const size_t i = w * 16 + j;
      const uint32_t xb = std::bit_cast<uint32_t>(x[i]);
      const float a = std::bit_cast<float>(xb & 0x7fffffffu);
      const uint32_t fire = PhiloxUniform(u[i]) * scale < a ? 1u : 0u;
      // 01 for +, 10 for -: (1 + sign) when firing.
      word |= (fire * (1u + (xb >> 31))) << (2 * j);
    }
    words[w] = word;
  }
}

class TerngradCodec final : public Codec {
 public:
  CodecId id() const override { return CodecId::kTerngrad; }
  std::string name() const override { return "terngrad"; }

  size_t MaxCompressedBytes(size_t elements) const override {
    return internal::SatAdd(WireHeader::kBytes, PayloadFor(elements));
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& ctx) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t n = input.size();
    ZW_ASSIGN_OR_RETURN(float scale, ScaleOf(input));
    const size_t payload = PayloadFor(n);
    internal::WriteSimpleHeader(CodecId::kTerngrad, n, payload, out);
    uint8_t* p = out.data() + WireHeader::kBytes;
    internal::StoreF32(p, scale);
    p += 4;
    const PhiloxStream stream(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, PhiloxPurpose::kTerngrad);
    uint32_t u[kBlock], words[kBlock / 16];
    for (size_t base = 0; base < n; base += kBlock) {
      const size_t len = std::min(kBlock, n - base);
      stream.Fill(base / 4, (len + 3) / 4, u);
      Quantise(scale, input.data() + base, u, len, words);
      const size_t bytes = len / 4 + (len % 4 != 0 ? 1 : 0);
      for (size_t b = 0; b < bytes; ++b)
        p[base / 4 + b] = static_cast<uint8_t>(words[b / 4] >> (8 * (b % 4)));
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

  double ErrorBoundL2(std::span<const float> input) const override {
    auto scale = ScaleOf(input);
    if (!scale.ok()) return std::numeric_limits<double>::infinity();
    const double s = *scale;
    double sum = 0.0;
    for (float x : input) {
      const double a = std::fabs(static_cast<double>(x));
      const double e = std::max(a, s - a);
      sum += e * e;
    }
    return std::sqrt(sum) * (1.0 + 1e-9);
  }

 private:
  template <bool kAccumulate>
  Status Decode(std::span<const uint8_t> in, std::span<float> out, float alpha) const {
    const size_t n = out.size();
    ZW_ASSIGN_OR_RETURN(auto payload, internal::ValidateSimple(in, CodecId::kTerngrad, n, PayloadFor(n)));
    const float scale = internal::LoadF32(payload.data());
    if (!(scale >= 0.0f && scale <= FLT_MAX) || std::signbit(scale)) {
      return Corrupt("terngrad: scale is not a finite non-negative number");
    }
    const uint8_t* codes = payload.data() + 4;
    const size_t bytes = payload.size() - 4;
    uint8_t bad = 0;
    for (size_t b = 0; b < bytes; ++b) bad |= codes[b] & (codes[b] >> 1) & 0x55u;
    if (bad != 0) return Corrupt("terngrad: a code is 11");
    if (n % 4 != 0 && (codes[bytes - 1] >> (2 * (n % 4))) != 0)
      return Corrupt("terngrad: padding bits are set");
    // value = (code & 1) * s - (code >> 1) * s, computed as a select on bits.
    const float v = kAccumulate ? alpha * scale : scale;
    const uint32_t vb = std::bit_cast<uint32_t>(v);
    float* dst = out.data();
    for (size_t i = 0; i < n; ++i) {
      const uint32_t code = (codes[i / 4] >> (2 * (i % 4))) & 3u;
      const uint32_t bits = code == 0 ? 0u : (vb ^ ((code >> 1) << 31));
      if constexpr (kAccumulate) {
        dst[i] += std::bit_cast<float>(bits);
      } else {
        dst[i] = std::bit_cast<float>(bits);
      }
    }
    return Status::Ok();
  }
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeTerngradCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(RejectParams(spec));
  return std::unique_ptr<Codec>(std::make_unique<TerngradCodec>());
}
}  // namespace internal
}  // namespace zipwire::kernels
