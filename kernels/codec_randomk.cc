// The "randomk" codec: k entries at indices every worker and server derive
// from the shared context, so only the values travel.
//
// Spec: randomk:V[,scale=0|1], V a ratio in (0, 1) or an integer count >= 1
// (k as for topk: max(1, round(V * n)) or V, clamped to n). scale=1 multiplies
// the sent values by n/k (rounded to float once), which makes decode an
// unbiased estimate of x; default 0. Default V = 0.01.
//
// Index draw: k distinct indices of [0, n) by Floyd's algorithm, step i
// (i = 0 .. k-1, j = n - k + i) drawing t = floor(u_i * (j + 1) / 2^32) with
// u_i = Philox draw i of the stream (seed, tensor, chunk, step, kRandomk) and
// taking j instead when t is already chosen. Listed in ascending order. A pure
// function of (seed, tensor, chunk, step, n, k): identical on every worker,
// server and (later) GPU; a different step gives different indices.
//
// Wire format: header (codec kRandomk, param_bytes 40, param_word = k,
// payload_bytes = 4k, elements = n <= 2^32 - 1), then the parameter block
//   [0, 8)   V, binary64 (the decoder checks k == k(V, n))
//   [8, 16)  seed        [16, 24) tensor id
//   [24, 28) chunk index [28, 36) step
//   [36, 40) flags: bit 0 = values scaled by n/k; other bits zero
// (all little-endian) and the payload: k binary32 values in index order.
// The context travels in the parameter block so Decompress regenerates the
// indices without a context argument (40 bytes per chunk).
//
// Non-finite values are sent as they are; ErrorBoundL2 is then infinite.
// ErrorBoundL2 holds for every context: scale=0 drops entries, so the error is
// at most ||x||; scale=1 errs by (n/k - 1)|x_j| at kept and |x_j| at dropped
// entries, at most max(1, n/k - 1) * ||x|| (with slack for the float scaling).
//
// Linear: two buffers with identical headers and parameter blocks (same
// context, hence same indices) add by adding their k values in fp32, which
// decodes exactly to decode(a) + decode(b).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/codec_internal.h"
#include "kernels/philox.h"

namespace zipwire::kernels {
namespace {

constexpr double kDefaultRatio = 0.01;
constexpr size_t kParamBytes = 40;
constexpr uint32_t kScaledFlag = 1;
constexpr size_t kMaxElements = 0xffffffffu;

struct Params {
  double v = 0;
  CodecContext ctx;
  uint32_t flags = 0;
};

void StoreParams(const Params& p, uint8_t* out) {
  internal::StoreF64(out, p.v);
  internal::StoreLe64(out + 8, p.ctx.seed);
  internal::StoreLe64(out + 16, p.ctx.tensor_id);
  internal::StoreLe32(out + 24, p.ctx.chunk_index);
  internal::StoreLe64(out + 28, p.ctx.step);
  internal::StoreLe32(out + 36, p.flags);
}

Params LoadParams(const uint8_t* in) {
  Params p;
  p.v = internal::LoadF64(in);
  p.ctx.seed = internal::LoadLe64(in + 8);
  p.ctx.tensor_id = internal::LoadLe64(in + 16);
  p.ctx.chunk_index = internal::LoadLe32(in + 24);
  p.ctx.step = internal::LoadLe64(in + 28);
  p.flags = internal::LoadLe32(in + 36);
  return p;
}

float ScaleFactor(size_t n, size_t k) {
  return k == 0 ? 1.0f : static_cast<float>(static_cast<double>(n) / static_cast<double>(k));
}

thread_local std::vector<uint64_t> tl_bitmap;
thread_local std::vector<uint32_t> tl_indices;

// Floyd's sampling into a bitmap (membership test and ascending order for
// free); returns the k indices, ascending, in thread-local scratch.
const uint32_t* DrawIndices(const CodecContext& ctx, size_t n, size_t k) {
  uint32_t* idx = internal::Scratch(tl_indices, k);
  if (k == n) {
    for (size_t i = 0; i < n; ++i) idx[i] = static_cast<uint32_t>(i);
    return idx;
  }
  const size_t words = (n + 63) / 64;
  uint64_t* bits = internal::Scratch(tl_bitmap, words);
  std::memset(bits, 0, words * 8);
  const PhiloxStream stream(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, PhiloxPurpose::kRandomk);
  ForEachDraw(stream, 0, k, [&](uint64_t i, uint32_t u) {
    const uint64_t j = n - k + i;
    uint64_t t = (static_cast<uint64_t>(u) * (j + 1)) >> 32;
    if ((bits[t >> 6] >> (t & 63)) & 1u) t = j;
    bits[t >> 6] |= uint64_t{1} << (t & 63);
  });
  size_t m = 0;
  for (size_t w = 0; w < words; ++w) {
    for (uint64_t b = bits[w]; b != 0; b &= b - 1) {
      idx[m++] = static_cast<uint32_t>(w * 64 + static_cast<size_t>(std::countr_zero(b)));
    }
  }
  return idx;
}

struct Parsed {
  WireHeader h;
  Params p;
  const uint8_t* values;
  size_t k;
};

Result<Parsed> Parse(std::span<const uint8_t> in, size_t n) {
  ZW_ASSIGN_OR_RETURN(WireHeader h, internal::ValidateHeader(in, CodecId::kRandomk, n));
  if (h.param_bytes != kParamBytes) {
    return Corrupt("randomk: parameter block is " + std::to_string(h.param_bytes) + " bytes, expected 40");
  }
  if (n > kMaxElements) return Corrupt("randomk: more elements than u32 indices address");
  const Params p = LoadParams(internal::ParamBlock(in, h).data());
  if (!internal::IsRatioOrCount(p.v)) return Corrupt("randomk: bad ratio/count parameter");
  if ((p.flags & ~kScaledFlag) != 0) return Corrupt("randomk: unknown flag bits set");
  const size_t k = internal::KFor(p.v, n);
  if (h.param_word != k) {
    return Corrupt("randomk: header says k = " + std::to_string(h.param_word) + ", the parameters give " +
                   std::to_string(k) + " for " + std::to_string(n) + " elements");
  }
  if (h.payload_bytes != 4 * k) return Corrupt("randomk: payload is not k values");
  return Parsed{h, p, internal::PayloadOf(in, h).data(), k};
}

class RandomkCodec final : public Codec {
 public:
  RandomkCodec(double v, bool scale) : v_(v), scale_(scale) {}

  CodecId id() const override { return CodecId::kRandomk; }
  std::string name() const override {
    return "randomk:" + internal::FormatNumber(v_) + (scale_ ? ",scale=1" : "");
  }

  size_t MaxCompressedBytes(size_t elements) const override {
    return internal::SatAdd(WireHeader::kBytes + kParamBytes,
                            internal::SatMul(internal::KFor(v_, elements), 4));
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& ctx) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t n = input.size();
    if (n > kMaxElements) return InvalidArgument(name() + ": chunks are limited to 2^32 - 1 elements");
    const size_t k = internal::KFor(v_, n);
    WireHeader h;
    h.codec = CodecId::kRandomk;
    h.param_bytes = kParamBytes;
    h.elements = n;
    h.payload_bytes = 4 * k;
    h.param_word = static_cast<uint32_t>(k);
    EncodeHeader(h, out.first<WireHeader::kBytes>());
    StoreParams({v_, ctx, scale_ ? kScaledFlag : 0u}, out.data() + WireHeader::kBytes);
    uint8_t* values = out.data() + WireHeader::kBytes + kParamBytes;
    const uint32_t* idx = DrawIndices(ctx, n, k);
    const float f = scale_ ? ScaleFactor(n, k) : 1.0f;
    for (size_t i = 0; i < k; ++i) internal::StoreF32(values + 4 * i, input[idx[i]] * f);
    return WireHeader::kBytes + kParamBytes + 4 * k;
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    ZW_ASSIGN_OR_RETURN(Parsed p, Parse(in, out.size()));
    const uint32_t* idx = DrawIndices(p.p.ctx, out.size(), p.k);
    std::fill(out.begin(), out.end(), 0.0f);
    for (size_t i = 0; i < p.k; ++i) out[idx[i]] = internal::LoadF32(p.values + 4 * i);
    return Status::Ok();
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    ZW_ASSIGN_OR_RETURN(Parsed p, Parse(in, accum.size()));
    const uint32_t* idx = DrawIndices(p.p.ctx, accum.size(), p.k);
    for (size_t i = 0; i < p.k; ++i) accum[idx[i]] += alpha * internal::LoadF32(p.values + 4 * i);
    return Status::Ok();
  }

  double ErrorBoundL2(std::span<const float> input) const override {
    double sum = 0.0;
    for (float x : input) sum += static_cast<double>(x) * x;
    if (!std::isfinite(sum)) return std::numeric_limits<double>::infinity();
    const size_t n = input.size();
    const size_t k = internal::KFor(v_, n);
    double factor = 1.0;
    if (scale_ && k > 0) factor = std::max(1.0, static_cast<double>(ScaleFactor(n, k)) * (1 + 0x1p-23) - 1.0);
    return factor * std::sqrt(sum) * (1.0 + 1e-9);
  }

  bool is_linear() const override { return true; }

  Status AccumulateEncoded(std::span<const uint8_t> in, std::span<uint8_t> accum) const override {
    ZW_ASSIGN_OR_RETURN(WireHeader ha, ParseHeader(accum));
    if (ha.codec != CodecId::kRandomk) return InvalidArgument("randomk: accumulator is not a randomk buffer");
    if (ha.elements > kMaxElements) return Corrupt("randomk: more elements than u32 indices address");
    const size_t n = ha.elements;
    ZW_ASSIGN_OR_RETURN(Parsed a, Parse(accum, n));
    auto b = Parse(in, n);
    if (!b.ok()) return b.status().WithContext("randomk: accumulating");
    if (std::memcmp(accum.data() + WireHeader::kBytes, in.data() + WireHeader::kBytes, kParamBytes) != 0) {
      return InvalidArgument("randomk: buffers were encoded with different parameters or contexts");
    }
    uint8_t* dst = accum.data() + WireHeader::kBytes + kParamBytes;
    for (size_t i = 0; i < a.k; ++i) {
      internal::StoreF32(dst + 4 * i, internal::LoadF32(dst + 4 * i) + internal::LoadF32(b->values + 4 * i));
    }
    return Status::Ok();
  }

 private:
  double v_;
  bool scale_;
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeRandomkCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(CheckKeys(spec, {"value", "scale"}));
  ZW_ASSIGN_OR_RETURN(double v, ParseRatioOrCount(spec, "value", kDefaultRatio));
  ZW_ASSIGN_OR_RETURN(uint64_t scale, ParseUint(spec, "scale", 0, 0, 1));
  return std::unique_ptr<Codec>(std::make_unique<RandomkCodec>(v, scale != 0));
}
}  // namespace internal
}  // namespace zipwire::kernels
