// The "countsketch" codec (Charikar et al. 2002; SketchedAMSGrad): r rows of c
// fp32 counters, S[row][h_row(j)] += s_row(j) * x_j. Linear: the sketch of a
// sum is the sum of the sketches, so a server adds sketches without decoding.
//
// Spec: countsketch:r=R,c=C[,k=K]; R in [1, 64] (default 5), C in [1, 2^26]
// (default 1024), K >= 1 the estimates kept on decode (default max(1, C/4):
// a count sketch of C counters estimates each coordinate to within about
// ||tail||_2 / sqrt(C), so beyond ~C/4 heavy hitters the estimates are mostly
// noise; clamped to n).
//
// Hashes: draw (j, row) = Philox position j * 4 * ceil(R/4) + row of the
// stream (seed, tensor, chunk, step 0, kCountSketch); u -> bucket
// ((u >> 1) * C) >> 31, sign = (u & 1) ? -1 : +1. The step is deliberately NOT
// part of the key: sketches of the same chunk from different workers (and
// steps) share hashes, which is what makes them summable.
//
// Wire format: header (codec kCountSketch, param_bytes 28, param_word = R,
// payload_bytes = 4 * R * C, elements = n <= 2^32 - 1), parameter block
//   [0, 8) seed, [8, 16) tensor id, [16, 20) chunk index, [20, 24) C, [24, 28) K
// (little-endian), then R * C binary32 counters, row-major; all finite.
//
// Decode: est_j = median over rows of s_row(j) * S[row][h_row(j)] (R even: the
// mean of the two middle values); the min(K, n) estimates largest in
// magnitude (exact top-k, ties to the lowest index) are output, the rest 0.
//
// AccumulateEncoded: accum counters += in counters (fp32, elementwise), for
// buffers with identical headers and parameter blocks; a sum that overflows
// float is kInvalidArgument (accum unchanged). decode(accumulated) is the
// decode of the summed sketch, which equals the sketch of a + b up to the
// order of float additions (decode itself, a median and a top-k, is not linear).
//
// Non-finite input, or counters that overflow float: Compress fails with
// kInvalidArgument; decode rejects non-finite counters as kCorrupt.
// Error feedback: with C much smaller than n the estimation noise of the kept
// coordinates is fed back into the residual and grows it step after step
// (seen with C=64, n=4097); size the sketch so that C >> K, or send exact
// values for the recovered coordinates in a second round (SketchedAMSGrad).
// ErrorBoundL2 (worst case, loose): every row estimate of x_j errs by at most
// the sum of the other |x_i|, so ||x - decode|| <= sqrt(K * ||x||_1^2 + ||x||_2^2).
#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/codec_internal.h"
#include "kernels/philox.h"

namespace zipwire::kernels {
namespace {

constexpr size_t kParamBytes = 28;
constexpr uint32_t kMaxRows = 64;
constexpr uint32_t kMaxCols = 1u << 26;
constexpr size_t kMaxElements = 0xffffffffu;
constexpr size_t kBlockElems = 256;  // elements hashed per batch of draws

struct Config {
  uint32_t r = 5;
  uint32_t c = 1024;
  uint32_t k = 256;
};

struct Hashes {
  explicit Hashes(const CodecContext& ctx)
      : stream(ctx.seed, ctx.tensor_id, ctx.chunk_index, 0, PhiloxPurpose::kCountSketch) {}
  PhiloxStream stream;
};

inline uint32_t Bucket(uint32_t u, uint32_t c) {
  return static_cast<uint32_t>((static_cast<uint64_t>(u >> 1) * c) >> 31);
}
inline float Signed(uint32_t u, float v) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(v) ^ (u << 31));
}

// Calls fn(j, row, u) for j in [0, n), row in [0, r), j-major.
template <typename Fn>
void ForEachHash(const PhiloxStream& stream, size_t n, uint32_t r, Fn&& fn) {
  const size_t blocks_per = (r + 3) / 4;
  thread_local std::vector<uint32_t> words;
  uint32_t* u = internal::Scratch(words, kBlockElems * blocks_per * 4);
  for (size_t base = 0; base < n; base += kBlockElems) {
    const size_t len = std::min(kBlockElems, n - base);
    stream.Fill(base * blocks_per, len * blocks_per, u);
    for (size_t j = 0; j < len; ++j) {
      const uint32_t* uj = u + j * blocks_per * 4;
      for (uint32_t row = 0; row < r; ++row) fn(base + j, row, uj[row]);
    }
  }
}

struct Parsed {
  Config cfg;
  CodecContext ctx;
  const uint8_t* counters;
};

Result<Parsed> Parse(std::span<const uint8_t> in, size_t n) {
  ZW_ASSIGN_OR_RETURN(WireHeader h, internal::ValidateHeader(in, CodecId::kCountSketch, n));
  if (h.param_bytes != kParamBytes) return Corrupt("countsketch: parameter block is not 28 bytes");
  if (n > kMaxElements) return Corrupt("countsketch: more elements than u32 indices address");
  const uint8_t* p = internal::ParamBlock(in, h).data();
  Parsed out;
  out.ctx.seed = internal::LoadLe64(p);
  out.ctx.tensor_id = internal::LoadLe64(p + 8);
  out.ctx.chunk_index = internal::LoadLe32(p + 16);
  out.cfg.r = h.param_word;
  out.cfg.c = internal::LoadLe32(p + 20);
  out.cfg.k = internal::LoadLe32(p + 24);
  if (out.cfg.r < 1 || out.cfg.r > kMaxRows || out.cfg.c < 1 || out.cfg.c > kMaxCols || out.cfg.k < 1) {
    return Corrupt("countsketch: bad shape r=" + std::to_string(out.cfg.r) +
                   " c=" + std::to_string(out.cfg.c) + " k=" + std::to_string(out.cfg.k));
  }
  const size_t counters = size_t{out.cfg.r} * out.cfg.c;
  if (h.payload_bytes != 4 * counters) return Corrupt("countsketch: payload is not r * c counters");
  out.counters = internal::PayloadOf(in, h).data();
  uint32_t max_key = 0;
  for (size_t i = 0; i < counters; ++i) {
    max_key = std::max(max_key, internal::LoadLe32(out.counters + 4 * i) & 0x7fffffffu);
  }
  if (max_key >= 0x7f800000u) return Corrupt("countsketch: a counter is not finite");
  return out;
}

thread_local std::vector<float> tl_sketch, tl_est;
thread_local std::vector<uint32_t> tl_idx;

// Median estimates of all n elements into est; returns the kept indices
// (ascending, thread-local) and their count.
const uint32_t* Estimate(const Parsed& p, size_t n, float* est, size_t* kept) {
  const uint32_t r = p.cfg.r, c = p.cfg.c;
  float* s = internal::Scratch(tl_sketch, size_t{r} * c);
  std::memcpy(s, p.counters, size_t{r} * c * 4);
  const Hashes hashes(p.ctx);
  float vals[kMaxRows];
  ForEachHash(hashes.stream, n, r, [&](size_t j, uint32_t row, uint32_t u) {
    vals[row] = Signed(u, s[size_t{row} * c + Bucket(u, c)]);
    if (row + 1 == r) {
      // Insertion sort: r is small.
      for (uint32_t a = 1; a < r; ++a) {
        const float v = vals[a];
        uint32_t b = a;
        for (; b > 0 && vals[b - 1] > v; --b) vals[b] = vals[b - 1];
        vals[b] = v;
      }
      est[j] = r % 2 == 1 ? vals[r / 2] : (vals[r / 2 - 1] + vals[r / 2]) * 0.5f;
    }
  });
  const size_t k = std::min<size_t>(p.cfg.k, n);
  uint32_t* idx = internal::Scratch(tl_idx, k);
  internal::SelectTopk(est, n, k, idx);
  *kept = k;
  return idx;
}

class CountSketchCodec final : public Codec {
 public:
  explicit CountSketchCodec(Config c) : c_(c) {}

  CodecId id() const override { return CodecId::kCountSketch; }
  std::string name() const override {
    return "countsketch:c=" + std::to_string(c_.c) + ",k=" + std::to_string(c_.k) +
           ",r=" + std::to_string(c_.r);
  }

  size_t MaxCompressedBytes(size_t /*elements*/) const override {
    return WireHeader::kBytes + kParamBytes + 4 * size_t{c_.r} * c_.c;
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& ctx) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t n = input.size();
    if (n > kMaxElements) return InvalidArgument(name() + ": chunks are limited to 2^32 - 1 elements");
    const size_t counters = size_t{c_.r} * c_.c;
    float* s = internal::Scratch(tl_sketch, counters);
    std::fill(s, s + counters, 0.0f);
    const Hashes hashes(ctx);
    const uint32_t c = c_.c;
    ForEachHash(hashes.stream, n, c_.r, [&](size_t j, uint32_t row, uint32_t u) {
      s[size_t{row} * c + Bucket(u, c)] += Signed(u, input[j]);
    });
    uint32_t max_key = 0;
    for (size_t i = 0; i < counters; ++i)
      max_key = std::max(max_key, std::bit_cast<uint32_t>(s[i]) & 0x7fffffffu);
    if (max_key >= 0x7f800000u) {
      return InvalidArgument("countsketch: input has a NaN or infinity, or a counter overflows float");
    }
    WireHeader h;
    h.codec = CodecId::kCountSketch;
    h.param_bytes = kParamBytes;
    h.elements = n;
    h.payload_bytes = 4 * counters;
    h.param_word = c_.r;
    EncodeHeader(h, out.first<WireHeader::kBytes>());
    uint8_t* p = out.data() + WireHeader::kBytes;
    internal::StoreLe64(p, ctx.seed);
    internal::StoreLe64(p + 8, ctx.tensor_id);
    internal::StoreLe32(p + 16, ctx.chunk_index);
    internal::StoreLe32(p + 20, c_.c);
    internal::StoreLe32(p + 24, c_.k);
    std::memcpy(p + kParamBytes, s, 4 * counters);
    return WireHeader::kBytes + kParamBytes + 4 * counters;
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    ZW_ASSIGN_OR_RETURN(Parsed p, Parse(in, out.size()));
    const size_t n = out.size();
    float* est = internal::Scratch(tl_est, n);
    size_t k = 0;
    const uint32_t* idx = Estimate(p, n, est, &k);
    std::fill(out.begin(), out.end(), 0.0f);
    for (size_t i = 0; i < k; ++i) out[idx[i]] = est[idx[i]];
    return Status::Ok();
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    ZW_ASSIGN_OR_RETURN(Parsed p, Parse(in, accum.size()));
    const size_t n = accum.size();
    float* est = internal::Scratch(tl_est, n);
    size_t k = 0;
    const uint32_t* idx = Estimate(p, n, est, &k);
    for (size_t i = 0; i < k; ++i) accum[idx[i]] += alpha * est[idx[i]];
    return Status::Ok();
  }

  double ErrorBoundL2(std::span<const float> input) const override {
    double l1 = 0.0, l2 = 0.0;
    for (float x : input) {
      const double a = std::fabs(static_cast<double>(x));
      l1 += a;
      l2 += a * a;
    }
    if (!std::isfinite(l2)) return std::numeric_limits<double>::infinity();
    const double k = static_cast<double>(std::min<size_t>(c_.k, input.size()));
    const double e = l1 * (1.0 + 1e-3);  // covers the float rounding of the counters
    return std::sqrt(k * e * e + l2) * (1.0 + 1e-9);
  }

  bool is_linear() const override { return true; }

  Status AccumulateEncoded(std::span<const uint8_t> in, std::span<uint8_t> accum) const override {
    ZW_ASSIGN_OR_RETURN(WireHeader ha, ParseHeader(accum));
    if (ha.codec != CodecId::kCountSketch) {
      return InvalidArgument("countsketch: accumulator is not a countsketch buffer");
    }
    if (ha.elements > kMaxElements) return Corrupt("countsketch: more elements than u32 indices address");
    ZW_ASSIGN_OR_RETURN(Parsed a, Parse(accum, ha.elements));
    auto b = Parse(in, ha.elements);
    if (!b.ok()) return b.status().WithContext("countsketch: accumulating");
    if (a.cfg.r != b->cfg.r ||
        std::memcmp(accum.data() + WireHeader::kBytes, in.data() + WireHeader::kBytes, kParamBytes) != 0) {
      return InvalidArgument("countsketch: sketches differ in shape, seed, tensor or chunk");
    }
    const size_t counters = size_t{a.cfg.r} * a.cfg.c;
    uint8_t* dst = accum.data() + WireHeader::kBytes + kParamBytes;
    uint32_t max_key = 0;
    for (size_t i = 0; i < counters; ++i) {
      const float sum = internal::LoadF32(dst + 4 * i) + internal::LoadF32(b->counters + 4 * i);
      max_key = std::max(max_key, std::bit_cast<uint32_t>(sum) & 0x7fffffffu);
    }
    if (max_key >= 0x7f800000u) return InvalidArgument("countsketch: the summed counters overflow float");
    for (size_t i = 0; i < counters; ++i) {
      internal::StoreF32(dst + 4 * i,
                         internal::LoadF32(dst + 4 * i) + internal::LoadF32(b->counters + 4 * i));
    }
    return Status::Ok();
  }

 private:
  Config c_;
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeCountSketchCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(CheckKeys(spec, {"r", "c", "k"}));
  Config cfg;
  ZW_ASSIGN_OR_RETURN(uint64_t r, ParseUint(spec, "r", 5, 1, kMaxRows));
  ZW_ASSIGN_OR_RETURN(uint64_t c, ParseUint(spec, "c", 1024, 1, kMaxCols));
  ZW_ASSIGN_OR_RETURN(uint64_t k, ParseUint(spec, "k", std::max<uint64_t>(1, c / 4), 1, 0xffffffffu));
  cfg.r = static_cast<uint32_t>(r);
  cfg.c = static_cast<uint32_t>(c);
  cfg.k = static_cast<uint32_t>(k);
  return std::unique_ptr<Codec>(std::make_unique<CountSketchCodec>(cfg));
}
}  // namespace internal
}  // namespace zipwire::kernels
