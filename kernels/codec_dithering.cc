// The "dithering" codec (QSGD, Alistarh et al. 2017; natural dithering,
// Horvath et al. 2019): each element becomes norm * sign(x) * level, the level
// stochastically rounded between its two neighbouring levels so that
// E[decode] = x.
//
// Spec: dithering:s=S[,levels=linear|natural][,norm=l2|max]; defaults s=16,
// linear, l2. linear: levels l/s, l = 0..s, S in [1, 65535]. natural: levels 0
// and 2^(l-s), l = 1..s (powers of two down to 2^(1-s)), S in [1, 32].
//
// Quantisation of element j (r = |x_j| / norm, in [0, 1]):
//   linear:  a = |x_j| * (s / norm) (float), l = floor(a) + (u_j < a - floor(a));
//   natural: r = |x_j| * (1 / norm); for r >= 2^(1-s), with r = (1 + f) * 2^e,
//            l = s + e + (u_j < f); below, l = (u_j < r * 2^(s-1)) (0 or 1);
// clamped to s, u_j = PhiloxUniform(draw j) of the stream (seed, tensor,
// chunk, step, kDithering). Level 0 always has sign 0.
//
// Wire format: header (codec kDithering, param_bytes 0,
// param_word = s | natural << 16 | max_norm << 17, other bits zero,
// payload_bytes = 4 + ceil(n * w / 8), w = ceil(log2(s + 1)) + 1), then
//   norm: binary32, finite, >= +0 (l2: (float)sqrt(sum), the sum of squares
//         in double in the canonical order of kernels/canonical_sum.h, shared
//         with the CUDA encoder; max: max |x|);
//   codes: n codes of w bits, code = level << 1 | sign, element j at bits
//          [j*w, (j+1)*w) of the little-endian bit stream; padding bits 0.
// Decode: linear level l -> l * (norm / s) (float), natural -> norm * 2^(l-s);
// negated when the sign bit is set. Codes with level > s, or level 0 with the
// sign set, are kCorrupt.
//
// Non-finite input (or an L2 norm beyond FLT_MAX) cannot be quantised against
// a norm: Compress fails with kInvalidArgument and ErrorBoundL2 is infinite.
//
// ErrorBoundL2: each nonzero element lands on one of the two levels around it:
// linear errs by at most norm/s per nonzero element; natural by at most
// max(|x_j|, norm * 2^(1-s)) (the gap below a level 2^-t is 2^-(t+1) <= r);
// with slack for the float arithmetic. Zero elements decode exactly to 0.
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
constexpr size_t kBlock = 1024;  // elements quantised per batch of draws

struct Config {
  uint32_t s = 16;
  bool natural = false;
  bool max_norm = false;

  uint32_t word() const { return s | (natural ? kNaturalBit : 0u) | (max_norm ? kMaxNormBit : 0u); }
  uint32_t bits() const { return static_cast<uint32_t>(std::bit_width(s)) + 1; }  // ceil(log2(s+1)) + 1
};

size_t PayloadFor(size_t n, uint32_t w) {
  const size_t bits = internal::SatMul(n, w);
  return internal::SatAdd(4, bits / 8 + (bits % 8 != 0 ? 1 : 0));
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

Result<float> NormOf(std::span<const float> x, bool max_norm) {
  if (max_norm) return NormFromMax(MaxAbsBits(x.data(), x.size()));
  return NormFromSquares(CanonicalSquareSumOf(x.data(), x.size()));
}

// Codes of x[0..len) into codes[], draws u[] (len of them).
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
      const uint32_t l = std::min(static_cast<uint32_t>(fl) + (PhiloxUniform(u[i]) < p ? 1u : 0u), s);
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
      const float uf = PhiloxUniform(u[i]);
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
  const __m512 two_m24 = _mm512_set1_ps(0x1p-24f);
  const __m512i one = _mm512_set1_epi32(1);
  size_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512i xb = _mm512_loadu_si512(x + i);
    const __m512 a = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(xb, abs_mask)), mult);
    const __m512i fl = _mm512_cvttps_epi32(_mm512_min_ps(s_f, a));
    const __m512 p = _mm512_sub_ps(a, _mm512_cvtepi32_ps(fl));
    const __m512 uf =
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_loadu_si512(u + i), 8)), two_m24);
    const __mmask16 up = _mm512_cmp_ps_mask(uf, p, _CMP_LT_OQ);
    const __m512i l = _mm512_min_epu32(_mm512_mask_add_epi32(fl, up, fl, one), s_i);
    const __m512i code = _mm512_or_si512(_mm512_slli_epi32(l, 1), _mm512_srli_epi32(xb, 31));
    _mm512_storeu_si512(codes + i, _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(l, l), code));
  }
  return i;
}

// Error feedback's block for linear levels in one pass over x and e: y = e + x,
// its codes as QuantiseLinearAvx512, and e = y + -(decode of the code) with
// the decode as Levels::Value. Returns the elements done (a multiple of 16).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) size_t FeedLinearAvx512(
    uint32_t s, float norm, const float* x, float* e, const uint32_t* u, size_t len, uint32_t* codes) {
  const __m512 mult = _mm512_set1_ps(static_cast<float>(s) / norm);
  const __m512 step = _mm512_set1_ps(norm / static_cast<float>(s));
  const __m512 s_f = _mm512_set1_ps(static_cast<float>(s));
  const __m512i s_i = _mm512_set1_epi32(static_cast<int>(s));
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512 two_m24 = _mm512_set1_ps(0x1p-24f);
  const __m512i one = _mm512_set1_epi32(1);
  size_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 y = _mm512_add_ps(_mm512_loadu_ps(e + i), _mm512_loadu_ps(x + i));
    const __m512i yb = _mm512_castps_si512(y);
    const __m512 a = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(yb, abs_mask)), mult);
    const __m512i fl = _mm512_cvttps_epi32(_mm512_min_ps(s_f, a));
    const __m512 p = _mm512_sub_ps(a, _mm512_cvtepi32_ps(fl));
    const __m512 uf =
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_loadu_si512(u + i), 8)), two_m24);
    const __mmask16 up = _mm512_cmp_ps_mask(uf, p, _CMP_LT_OQ);
    const __m512i l = _mm512_min_epu32(_mm512_mask_add_epi32(fl, up, fl, one), s_i);
    const __mmask16 nonzero = _mm512_test_epi32_mask(l, l);
    const __m512i sign = _mm512_maskz_and_epi32(nonzero, yb, sign_bit);  // level 0 has sign 0
    _mm512_storeu_si512(codes + i,
                        _mm512_maskz_mov_epi32(
                            nonzero, _mm512_or_si512(_mm512_slli_epi32(l, 1), _mm512_srli_epi32(sign, 31))));
    const __m512 mag = _mm512_mul_ps(_mm512_cvtepi32_ps(l), step);
    // -val: the magnitude with the opposite of the code's sign bit.
    const __m512 neg_val =
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_or_si512(_mm512_castps_si512(mag), sign), sign_bit));
    _mm512_storeu_ps(e + i, _mm512_add_ps(y, neg_val));
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

// Little-endian bit stream of w-bit codes.
class BitWriter {
 public:
  BitWriter(uint8_t* out, uint32_t w) : p_(out), w_(w) {}
  // Put, faster when the stream is word-aligned: whole groups of 32 codes
  // are exactly w words.
  void PutBlock(const uint32_t* codes, size_t len) {
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
  void Finish() {
    for (uint32_t b = 0; b < bits_; b += 8) *p_++ = static_cast<uint8_t>(acc_ >> b);
  }

 private:
  uint8_t* p_;
  uint32_t w_;
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
    return "dithering:levels=" + std::string(c_.natural ? "natural" : "linear") +
           ",norm=" + (c_.max_norm ? "max" : "l2") + ",s=" + std::to_string(c_.s);
  }

  size_t MaxCompressedBytes(size_t elements) const override {
    return internal::SatAdd(WireHeader::kBytes, PayloadFor(elements, c_.bits()));
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& ctx) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t n = input.size();
    ZW_ASSIGN_OR_RETURN(float norm, NormOf(input, c_.max_norm));
    const size_t payload = WriteHead(n, norm, out);
    uint8_t* p = out.data() + WireHeader::kBytes;
    const PhiloxStream stream(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, PhiloxPurpose::kDithering);
    BitWriter writer(p + 4, c_.bits());
    const CpuIsa isa = ActiveIsa();
    uint32_t u[kBlock], codes[kBlock];
    for (size_t base = 0; base < n; base += kBlock) {
      const size_t len = std::min(kBlock, n - base);
      stream.Fill(base / 4, (len + 3) / 4, u);  // base is a multiple of 4
      QuantiseBlock(norm, input.data() + base, u, len, codes, isa);
      writer.PutBlock(codes, len);
    }
    writer.Finish();
    return WireHeader::kBytes + payload;
  }

  // Two passes instead of three: the norm of y = x + e (y is not stored, so
  // rejected input leaves the residual as it was), then, a block at a time in
  // cache, y again, its codes, and e' = y + -(decode of the code), exactly as
  // DecompressAccumulate(-1) would compute it.
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
    float y[kBlock];
    float norm;
    const CpuIsa isa = ActiveIsa();
    {
      uint32_t max_bits = 0;
      double sum = 0.0;
      if (c_.max_norm) {
        for (size_t i = 0; i < n; ++i)
          max_bits = std::max(max_bits, std::bit_cast<uint32_t>(e[i] + x[i]) & 0x7fffffffu);
      } else {
        sum = CanonicalSquareSumOfSum(e, x, n, isa);
      }
      ZW_ASSIGN_OR_RETURN(norm, c_.max_norm ? NormFromMax(max_bits) : NormFromSquares(sum));
    }
    const size_t payload = WriteHead(n, norm, out);
    uint8_t* p = out.data() + WireHeader::kBytes;
    const PhiloxStream stream(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, PhiloxPurpose::kDithering);
    BitWriter writer(p + 4, c_.bits());
    const Levels levels(c_, norm);
    uint32_t u[kBlock], codes[kBlock];
    for (size_t base = 0; base < n; base += kBlock) {
      const size_t len = std::min(kBlock, n - base);
      // The block's draws are compute-bound and its loads memory-bound: ask
      // for the next block's input and residual now, so they arrive meanwhile.
      for (size_t i = base + kBlock; i < std::min(n, base + 2 * kBlock); i += 16) {
        __builtin_prefetch(x + i);
        __builtin_prefetch(e + i, 1);
      }
      stream.Fill(base / 4, (len + 3) / 4, u);
      size_t done = 0;
#if defined(__x86_64__)
      if (isa == CpuIsa::kAvx512 && !c_.natural && norm != 0.0f) {
        done = FeedLinearAvx512(c_.s, norm, x + base, e + base, u, len, codes);
      }
#endif
      // The rest (all of it off the AVX-512 linear path): y, codes, then e.
      for (size_t i = done; i < len; ++i) y[i] = e[base + i] + x[base + i];
      QuantiseBlock(norm, y + done, u + done, len - done, codes + done, isa);
      writer.PutBlock(codes, len);
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
    auto norm = NormOf(input, c_.max_norm);
    if (!norm.ok()) return std::numeric_limits<double>::infinity();
    const double nd = *norm;
    double sum = 0.0;
    if (!c_.natural) {
      size_t nonzero = 0;
      for (float x : input) nonzero += x != 0.0f ? 1 : 0;
      const double step = nd / c_.s * (1.0 + c_.s * 0x1p-21 + 1e-6);
      sum = static_cast<double>(nonzero) * step * step;
    } else {
      const double floor_gap = std::ldexp(nd, 1 - static_cast<int>(c_.s));
      for (float x : input) {
        if (x == 0.0f) continue;
        const double e = std::max(std::fabs(static_cast<double>(x)), floor_gap) * (1.0 + 1e-6);
        sum += e * e;
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
    Quantise(c_, norm, x + done, u + done, len - done, codes + done);
  }

  // Header and norm; returns the payload size.
  size_t WriteHead(size_t n, float norm, std::span<uint8_t> out) const {
    const size_t payload = PayloadFor(n, c_.bits());
    WireHeader h;
    h.codec = CodecId::kDithering;
    h.elements = n;
    h.payload_bytes = payload;
    h.param_word = c_.word();
    EncodeHeader(h, out.first<WireHeader::kBytes>());
    internal::StoreF32(out.data() + WireHeader::kBytes, norm);
    return payload;
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
    if ((h.param_word >> 18) != 0 || c.s == 0 || (c.natural && c.s > 32)) {
      return Corrupt("dithering: bad parameter word " + std::to_string(h.param_word));
    }
    const uint32_t w = c.bits();
    if (h.payload_bytes != PayloadFor(n, w)) {
      return Corrupt("dithering: payload is " + std::to_string(h.payload_bytes) + " bytes, " +
                     std::to_string(n) + " codes of " + std::to_string(w) + " bits need " +
                     std::to_string(PayloadFor(n, w)));
    }
    const uint8_t* p = in.data() + WireHeader::kBytes;
    const float norm = internal::LoadF32(p);
    if (!(norm >= 0.0f && norm <= FLT_MAX) || std::signbit(norm)) {
      return Corrupt("dithering: norm is not a finite non-negative number");
    }
    const size_t stream_bytes = h.payload_bytes - 4;
    const CodeReader code(p + 4, stream_bytes, w);
    {
      // Validate every code (and the padding) before touching the output.
      uint32_t bad = 0;
      const uint32_t max_code = c.s << 1 | 1u;
      for (size_t j = 0; j < n; ++j) {
        const uint32_t v = code(j);
        bad |= (v > max_code) | (v == 1u);
      }
      if (bad != 0) return Corrupt("dithering: a code has a level above s or a signed zero");
      const size_t used = internal::SatMul(n, w);
      if (used % 8 != 0 && (p[4 + stream_bytes - 1] >> (used % 8)) != 0) {
        return Corrupt("dithering: padding bits are set");
      }
    }
    const Levels levels(c, norm);
    float* dst = out.data();
    for (size_t j = 0; j < n; ++j) {
      const float val = levels.Value(code(j));
      if constexpr (kAccumulate) {
        dst[j] += alpha * val;
      } else {
        dst[j] = val;
      }
    }
    return Status::Ok();
  }

  Config c_;
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeDitheringCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(CheckKeys(spec, {"s", "levels", "norm"}));
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
  return std::unique_ptr<Codec>(std::make_unique<DitheringCodec>(c));
}
}  // namespace internal
}  // namespace zipwire::kernels
