// The sparsifying codecs "topk" (exact) and "topk_sampled" (DGC-style).
//
// Spec: topk:V and topk_sampled:V, V a ratio in (0, 1) or an integer count
// >= 1; k = max(1, round(V * n)) for a ratio, V for a count, clamped to n
// (0 for an empty chunk). Default V = 0.01 (CodecForId).
//
// Wire format (both codecs, each with its own codec id):
//   header: param_bytes 8, param_word = index coding (0 raw, 1 varint),
//           elements = n (at most 2^32 - 1: indices are u32);
//   params: V as little-endian binary64, so the decoder recomputes k for n
//           and can check the count below against it;
//   payload: u32 m, the number of entries sent;
//            the m indices, strictly increasing, each < n, either
//              raw:    m little-endian u32, or
//              varint: the first index, then each difference to the previous
//                      index (>= 1), as canonical unsigned LEB128 (at most 5
//                      bytes, no overlong encoding);
//            m little-endian binary32 values, x at those indices.
//   payload_bytes = 4 + index bytes + 4m. The encoder uses varint only when it
//   is strictly smaller than raw, so MaxCompressedBytes (raw) is reached.
// topk sends m = k. topk_sampled sends m in [lo, hi], lo = max(1, floor(0.8k)),
// hi = min(n, max(lo, ceil(1.3k))); the decoders reject any other m.
// Decode: x[i] = value at listed indices, 0 elsewhere.
//
// topk is exact: the k largest |x|, ties broken towards the lowest index, so
// the output is a pure function of x. Selection is a radix select on the bit
// patterns of |x| (4096-bin levels over the candidates' key range), never a
// sort. Big chunks first filter with a threshold taken from a deterministic
// sample (kept only when it provably leaves >= k candidates), so usually one
// pass over x is made.
//
// topk_sampled estimates the threshold from a stratified ~1% sample drawn with
// Philox (purpose kTopkSample, ctx's seed/tensor/chunk/step), keeps every
// entry with |x| >= threshold, and re-picks the threshold among the sample's
// order statistics (proportional step, bisection fallback; at most 6 tries)
// until the count lies in [lo, hi], else falls back to exact top-k. Chunks
// under 65536 elements use exact top-k directly (a 1% sample would be tiny).
//
// Non-finite input: |x| is compared as a bit pattern, so NaN ranks above +-Inf,
// which ranks above every finite value: non-finite entries are always
// selected first and are sent as they are (the decoder accepts any value
// bits). ErrorBoundL2 is infinite for such input.
//
// ErrorBoundL2: topk: the exact norm of the dropped entries, sqrt(sum x^2 over
// the unselected), in double. topk_sampled: the kept set always contains the
// exact top-lo set (it is a prefix of the same order), so the bound is the
// dropped norm of exact top-lo.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/codec_internal.h"
#include "kernels/cpu_isa.h"
#include "kernels/philox.h"
#include "kernels/simd.h"

namespace zipwire::kernels {
namespace {

constexpr double kDefaultRatio = 0.01;
constexpr size_t kParamBytes = 8;
constexpr uint32_t kRawIndices = 0;
constexpr uint32_t kVarintIndices = 1;
constexpr size_t kMaxElements = 0xffffffffu;

inline uint32_t AbsKey(float x) { return std::bit_cast<uint32_t>(x) & 0x7fffffffu; }

inline bool AllFinite(std::span<const float> x) {
  uint32_t max_key = 0;
  for (float v : x) max_key = std::max(max_key, AbsKey(v));
  return max_key < 0x7f800000u;
}

// Candidates for the exact selection: indices (ascending) and their values'
// bits (the key is bits & 0x7fffffff; keeping the sign saves the encoder a
// second, scattered read of x for the selected values).
struct Candidates {
  uint32_t* idx;
  uint32_t* bits;
  size_t size;
};

thread_local std::vector<uint32_t> tl_cand_idx, tl_cand_key, tl_sample, tl_bucket;

// The k-th largest of keys[0, size) (1 <= k <= size), with how many keys equal
// it. Radix select relative to the keys' minimum: candidates above a sampled
// threshold span a narrow range (often a couple of binades), where fixed
// digits of the raw bits would put nearly all of them in a few bins. Each
// level histograms 4096 bins over the current range and keeps only the bin
// holding the k-th key, copied out, so later levels touch a few entries.
internal::TopkThreshold KthLargestKey(const uint32_t* keys, size_t size, size_t k) {
  constexpr int kBinBits = 12;
  uint32_t hist[1u << kBinBits];
  internal::TopkThreshold t;
  while (true) {
    uint32_t lo = 0xffffffffu, hi = 0;
    for (size_t i = 0; i < size; ++i) {
      lo = std::min(lo, keys[i]);
      hi = std::max(hi, keys[i]);
    }
    const uint32_t span = hi - lo;
    const int shift = std::max(0, static_cast<int>(std::bit_width(span)) - kBinBits);
    const uint32_t top = span >> shift;
    std::memset(hist, 0, sizeof(uint32_t) * (top + 1));
    for (size_t i = 0; i < size; ++i) ++hist[(keys[i] - lo) >> shift];
    uint32_t b = top;
    while (hist[b] < k) k -= hist[b--];  // sum(hist) = size >= k, so b stays >= 0
    if (shift == 0) {
      t.key = lo + b;
      t.ties_total = hist[b];
      t.ties_taken = k;
      return t;
    }
    // Only the keys of bin b can still be the k-th; they move to scratch,
    // which keys may already point into: copy forward in place then.
    uint32_t* dst = keys == tl_bucket.data() ? tl_bucket.data() : internal::Scratch(tl_bucket, hist[b]);
    size_t m = 0;
    for (size_t i = 0; i < size; ++i) {
      const uint32_t key = keys[i];
      dst[m] = key;
      m += ((key - lo) >> shift) == b ? 1 : 0;
    }
    keys = dst;
    size = m;
  }
}

// Selects the top k (key descending, index ascending) among candidates that
// contain every entry with key >= the k-th largest key of the whole chunk.
// Writes the selected indices to out and, when values is not null, their bits.
internal::TopkThreshold SelectAmong(const Candidates& c, size_t k, uint32_t* out, uint32_t* values) {
  // The keys (sign cleared), in the bucket scratch.
  uint32_t* keys = internal::Scratch(tl_bucket, c.size);
  for (size_t i = 0; i < c.size; ++i) keys[i] = c.bits[i] & 0x7fffffffu;
  const internal::TopkThreshold t = KthLargestKey(keys, c.size, k);
  // Branch-free: most candidates are selected, but not predictably so. The
  // slot out[m] is written before knowing whether it is kept, so the loop
  // stops once k are kept (out holds exactly k).
  size_t m = 0, taken = 0;
  const size_t need = t.ties_taken;
  for (size_t i = 0; i < c.size && m < k; ++i) {
    const uint32_t key = c.bits[i] & 0x7fffffffu;
    const size_t tie = key == t.key ? 1 : 0;
    const size_t take = (key > t.key ? 1 : 0) | (tie & (taken < need ? 1 : 0));
    taken += tie & take;
    out[m] = c.idx[i];
    if (values != nullptr) values[m] = c.bits[i];
    m += take;
  }
  return t;
}

// Candidates = entries whose top 11 key bits are >= those of the k-th largest,
// found with one histogram pass and one collection pass.
Candidates HistogramCandidates(const float* x, size_t n, size_t k) {
  uint32_t hist[4][2048] = {};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++hist[0][AbsKey(x[i]) >> 20];
    ++hist[1][AbsKey(x[i + 1]) >> 20];
    ++hist[2][AbsKey(x[i + 2]) >> 20];
    ++hist[3][AbsKey(x[i + 3]) >> 20];
  }
  for (; i < n; ++i) ++hist[0][AbsKey(x[i]) >> 20];
  size_t above = 0;
  uint32_t b = 2047;
  while (true) {
    const size_t h = size_t{hist[0][b]} + hist[1][b] + hist[2][b] + hist[3][b];
    if (above + h >= k) {
      above += h;
      break;
    }
    above += h;
    --b;
  }
  Candidates c{internal::Scratch(tl_cand_idx, above), internal::Scratch(tl_cand_key, above), 0};
  const uint32_t lo = b << 20;
  for (i = 0; i < n; ++i) {
    if (AbsKey(x[i]) >= lo) {
      c.idx[c.size] = static_cast<uint32_t>(i);
      c.bits[c.size] = std::bit_cast<uint32_t>(x[i]);
      ++c.size;
    }
  }
  return c;
}

// The elements [i, n) after a vector loop (which found m candidates), one by
// one; records the count and says whether it stayed within `cap`.
inline bool FinishCandidates(const float* x, size_t i, size_t n, uint32_t threshold, size_t cap, size_t m,
                             Candidates* c) {
  for (; i < n; ++i) {
    if (AbsKey(x[i]) >= threshold) {
      c->idx[m] = static_cast<uint32_t>(i);
      c->bits[m] = std::bit_cast<uint32_t>(x[i]);
      ++m;
    }
  }
  c->size = m;
  return m <= cap;
}

// One pass collecting entries with key >= threshold, giving up (returns false)
// once more than `cap` are found. Scratch has room for cap + 32 entries, so
// the vector paths may store a whole vector past the last candidate.
bool ThresholdCandidatesScalar(const float* x, size_t n, uint32_t threshold, size_t cap, Candidates* c) {
  size_t m = 0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    // A vectorisable any() over 8 keys first: most blocks hold no candidate.
    uint32_t any = 0;
    for (size_t j = 0; j < 8; ++j) any |= AbsKey(x[i + j]) >= threshold ? 1u : 0u;
    if (any == 0) continue;
    for (size_t j = 0; j < 8; ++j) {
      if (AbsKey(x[i + j]) >= threshold) {
        c->idx[m] = static_cast<uint32_t>(i + j);
        c->bits[m] = std::bit_cast<uint32_t>(x[i + j]);
        ++m;
      }
    }
    if (m > cap) return false;
  }
  return FinishCandidates(x, i, n, threshold, cap, m, c);
}

#if defined(__x86_64__)
// Keys and thresholds are at most 0x7fffffff, so signed compares order them.
__attribute__((target("avx2,bmi2"))) bool ThresholdCandidatesAvx2(const float* x, size_t n,
                                                                  uint32_t threshold, size_t cap,
                                                                  Candidates* c) {
  // pack[mask] = the positions of mask's set bits, first, as 8 packed nibbles.
  static const auto kPack = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t mask = 0; mask < 256; ++mask) {
      uint32_t v = 0, k = 0;
      for (uint32_t b = 0; b < 8; ++b) {
        if (mask & (1u << b)) v |= b << (4 * k++);
      }
      t[mask] = v;
    }
    return t;
  }();
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i below = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
  const __m256i nibble_shift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  size_t m = 0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    const __m256i keys = _mm256_and_si256(raw, abs_mask);
    // threshold >= 1 here (0 takes every entry and never reaches a filter).
    const uint32_t mask =
        static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(keys, below))));
    // Branch-free, as in the AVX-512 filter: blocks holding a candidate come at random.
    const __m256i perm = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kPack[mask])), nibble_shift);
    const __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(i)), iota);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c->idx + m), _mm256_permutevar8x32_epi32(ids, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c->bits + m), _mm256_permutevar8x32_epi32(raw, perm));
    m += static_cast<size_t>(std::popcount(mask));
    if (m > cap) return false;
  }
  return FinishCandidates(x, i, n, threshold, cap, m, c);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) bool ThresholdCandidatesAvx512(
    const float* x, size_t n, uint32_t threshold, size_t cap, Candidates* c) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  uint32_t* const idx = c->idx;
  uint32_t* const bits = c->bits;
  size_t m = 0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i r0 = _mm512_loadu_si512(x + i);
    const __m512i r1 = _mm512_loadu_si512(x + i + 16);
    const __mmask16 m0 = _mm512_cmpge_epu32_mask(_mm512_and_si512(r0, abs_mask), thr);
    const __mmask16 m1 = _mm512_cmpge_epu32_mask(_mm512_and_si512(r1, abs_mask), thr);
    const __m512i ids1 = _mm512_add_epi32(ids, sixteen);
    // Branch-free: about a third of the 32-blocks hold a candidate, at
    // random, so a test-and-skip mispredicts more than the stores cost.
    // Compressing in registers and storing whole vectors is faster than the
    // memory form of compress-store on most cores.
    _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(m0, ids));
    _mm512_storeu_si512(bits + m, _mm512_maskz_compress_epi32(m0, r0));
    m += static_cast<size_t>(std::popcount(static_cast<uint32_t>(m0)));
    _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(m1, ids1));
    _mm512_storeu_si512(bits + m, _mm512_maskz_compress_epi32(m1, r1));
    m += static_cast<size_t>(std::popcount(static_cast<uint32_t>(m1)));
    if (m > cap) return false;
    ids = _mm512_add_epi32(ids1, sixteen);
  }
  return FinishCandidates(x, i, n, threshold, cap, m, c);
}
#endif

bool ThresholdCandidates(const float* x, size_t n, uint32_t threshold, size_t cap, Candidates* c) {
  c->idx = internal::Scratch(tl_cand_idx, cap + 64);
  c->bits = internal::Scratch(tl_cand_key, cap + 64);
#if defined(__x86_64__)
  if (threshold > 0) {
    const CpuIsa isa = ActiveIsa();
    if (isa == CpuIsa::kAvx512) return ThresholdCandidatesAvx512(x, n, threshold, cap, c);
    if (isa == CpuIsa::kAvx2) return ThresholdCandidatesAvx2(x, n, threshold, cap, c);
  }
#endif
  return ThresholdCandidatesScalar(x, n, threshold, cap, c);
}

}  // namespace

namespace internal {

TopkThreshold SelectTopk(const float* x, size_t n, size_t k, uint32_t* idx, uint32_t* values) {
  TopkThreshold t;
  if (k == 0) return t;
  if (k >= n) {
    for (size_t i = 0; i < n; ++i) idx[i] = static_cast<uint32_t>(i);
    if (values != nullptr) std::memcpy(values, x, 4 * n);
    return t;
  }
  Candidates c{};
  bool have = false;
  if (n >= (size_t{1} << 16) && k <= n / 16) {
    // A deterministic strided sample (fixed positions, no context) suggests a
    // threshold with about 1.2k entries above it (plus 4 sigma of sampling noise); any threshold leaving >= k
    // candidates is safe, since then every top-k entry and every tie of the
    // k-th key is above it. Too few or too many: the histogram path.
    const size_t m = std::max<size_t>(4096, n >> 10);
    const size_t stride = n / m;
    uint32_t* s = Scratch(tl_sample, m);
    for (size_t i = 0; i < m; ++i) {
      const size_t jitter = static_cast<size_t>((static_cast<uint64_t>(i) * 2654435761u) % stride);
      s[i] = AbsKey(x[i * stride + jitter]);
    }
    const double expect = 1.2 * static_cast<double>(k) * static_cast<double>(m) / static_cast<double>(n);
    const size_t rank = std::min(m - 1, static_cast<size_t>(expect + 4.0 * std::sqrt(expect) + 8.0));
    std::nth_element(s, s + rank, s + m, std::greater<uint32_t>());
    have = ThresholdCandidates(x, n, s[rank], 8 * k + 4096, &c) && c.size >= k;
  }
  if (!have) c = HistogramCandidates(x, n, k);
  return SelectAmong(c, k, idx, values);
}

double TopkDroppedNorm(const float* x, size_t n, size_t k) {
  if (k >= n) return 0.0;
  thread_local std::vector<uint32_t> idx;
  const TopkThreshold t = SelectTopk(x, n, k, Scratch(idx, k));
  double sum = 0.0;
  if (k == 0) {
    for (size_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
    return std::sqrt(sum);
  }
  for (size_t i = 0; i < n; ++i) {
    const double v = x[i];
    sum += AbsKey(x[i]) < t.key ? v * v : 0.0;
  }
  const double tv = std::bit_cast<float>(t.key);
  sum += static_cast<double>(t.ties_total - t.ties_taken) * tv * tv;
  return std::sqrt(sum);
}

}  // namespace internal

namespace {

inline size_t VarintLen(uint32_t v) {
  return 1 + (v >= (1u << 7)) + (v >= (1u << 14)) + (v >= (1u << 21)) + (v >= (1u << 28));
}

struct CountRange {
  size_t lo, hi;
};
CountRange SampledRange(size_t k, size_t n) {
  if (k == 0) return {0, 0};
  const size_t lo = std::max<size_t>(1, k * 4 / 5);
  const size_t hi = std::min(n, std::max(lo, (k * 13 + 9) / 10));
  return {lo, hi};
}

// Canonical LEB128 of d as the low VarintLen(d) bytes of the result, in
// little-endian order: the 7-bit groups spread apart, continuation bits on
// every byte but the last.
inline uint64_t VarintWord(uint32_t d, size_t len) {
  const uint64_t v = uint64_t{d & 0x7fu} | (uint64_t{d & 0x3f80u} << 1) | (uint64_t{d & 0x1fc000u} << 2) |
                     (uint64_t{d & 0xfe00000u} << 3) | (uint64_t{d >> 28} << 32);
  return v | (0x8080808080ull & ((uint64_t{1} << (8 * (len - 1))) - 1));
}

// Writes idx's varint coding at p if it is strictly shorter than raw (4m
// bytes), returning its length, else returns 0 (p's bytes then are garbage).
// p has room for 8m bytes (the values follow the index block), so whole
// 8-byte words may be stored while at least 8 bytes of that room remain.
size_t TryVarintIndices(const uint32_t* idx, size_t m, uint8_t* p) {
  const size_t raw = 4 * m;
  size_t bytes = 0;
  uint32_t prev = 0;
  size_t i = 0;
  for (; i < m && bytes + 8 <= 2 * raw; ++i) {
    const uint32_t d = idx[i] - prev;
    prev = idx[i];
    const size_t len = VarintLen(d);
    const uint64_t word = VarintWord(d, len);
    std::memcpy(p + bytes, &word, 8);
    bytes += len;
    if (bytes >= raw) return 0;
  }
  for (; i < m; ++i) {
    const uint32_t d = idx[i] - prev;
    prev = idx[i];
    const size_t len = VarintLen(d);
    const uint64_t word = VarintWord(d, len);
    if (bytes + len >= raw) return 0;
    for (size_t b = 0; b < len; ++b) p[bytes + b] = static_cast<uint8_t>(word >> (8 * b));
    bytes += len;
  }
  return bytes;
}

// Writes the header, params and payload for the m ascending indices idx and
// the bits of their values.
size_t WriteSparse(CodecId id, double v, size_t n, const uint32_t* idx, const uint32_t* values, size_t m,
                   uint8_t* out) {
  uint8_t* const index_block = out + WireHeader::kBytes + kParamBytes + 4;
  const size_t varint_bytes = TryVarintIndices(idx, m, index_block);
  const bool varint = varint_bytes > 0;
  const size_t index_bytes = varint ? varint_bytes : 4 * m;
  if (!varint) std::memcpy(index_block, idx, 4 * m);
  const size_t payload = 4 + index_bytes + 4 * m;
  WireHeader h;
  h.codec = id;
  h.param_bytes = kParamBytes;
  h.elements = n;
  h.payload_bytes = payload;
  h.param_word = varint ? kVarintIndices : kRawIndices;
  EncodeHeader(h, std::span<uint8_t, WireHeader::kBytes>(out, WireHeader::kBytes));
  uint8_t* p = out + WireHeader::kBytes;
  internal::StoreF64(p, v);
  p += kParamBytes;
  internal::StoreLe32(p, static_cast<uint32_t>(m));
  std::memcpy(index_block + index_bytes, values, 4 * m);
  return WireHeader::kBytes + kParamBytes + payload;
}

thread_local std::vector<uint32_t> tl_indices;

struct Sparse {
  const uint32_t* idx;    // validated: strictly increasing, < n
  const uint8_t* values;  // m little-endian binary32
  size_t m;
};

// Full validation of a topk / topk_sampled buffer for an output of n floats.
Result<Sparse> ParseSparse(std::span<const uint8_t> in, CodecId id, size_t n) {
  ZW_ASSIGN_OR_RETURN(WireHeader h, internal::ValidateHeader(in, id, n));
  const char* who = CodecIdName(id);
  if (h.param_bytes != kParamBytes) {
    return Corrupt(std::string(who) + ": parameter block is " + std::to_string(h.param_bytes) +
                   " bytes, expected 8");
  }
  if (h.param_word != kRawIndices && h.param_word != kVarintIndices) {
    return Corrupt(std::string(who) + ": unknown index coding " + std::to_string(h.param_word));
  }
  if (n > kMaxElements) return Corrupt(std::string(who) + ": more elements than u32 indices address");
  const double v = internal::LoadF64(internal::ParamBlock(in, h).data());
  if (!internal::IsRatioOrCount(v)) return Corrupt(std::string(who) + ": bad ratio/count parameter");
  const auto payload = internal::PayloadOf(in, h);
  if (payload.size() < 4) return Corrupt(std::string(who) + ": payload shorter than its count");
  const size_t m = internal::LoadLe32(payload.data());
  const size_t k = internal::KFor(v, n);
  if (id == CodecId::kTopk) {
    if (m != k) {
      return Corrupt(std::string(who) + ": " + std::to_string(m) + " entries sent, k is " +
                     std::to_string(k));
    }
  } else {
    const CountRange r = SampledRange(k, n);
    if (m < r.lo || m > r.hi) {
      return Corrupt(std::string(who) + ": " + std::to_string(m) + " entries sent, outside [" +
                     std::to_string(r.lo) + ", " + std::to_string(r.hi) + "]");
    }
  }
  // m <= n < 2^32, so 4 * m cannot wrap.
  if (payload.size() - 4 < 4 * m) return Corrupt(std::string(who) + ": payload shorter than its values");
  const size_t index_bytes = payload.size() - 4 - 4 * m;
  const uint8_t* p = payload.data() + 4;
  uint32_t* idx = internal::Scratch(tl_indices, m);
  if (h.param_word == kRawIndices) {
    if (index_bytes != 4 * m) return Corrupt(std::string(who) + ": raw index block has the wrong size");
    std::memcpy(idx, p, 4 * m);
    uint64_t prev_plus_one = 0;  // the smallest allowed next index
    bool ok = true;
    for (size_t i = 0; i < m; ++i) {
      ok &= idx[i] >= prev_plus_one;
      prev_plus_one = uint64_t{idx[i]} + 1;
    }
    if (!ok) return Corrupt(std::string(who) + ": indices are not strictly increasing");
    if (m > 0 && idx[m - 1] >= n) return Corrupt(std::string(who) + ": index out of range");
  } else {
    const uint8_t* end = p + index_bytes;
    uint64_t prev = 0;
    for (size_t i = 0; i < m; ++i) {
      uint32_t d = 0;
      for (int shift = 0;; shift += 7) {
        if (p == end) return Corrupt(std::string(who) + ": varint indices run past their block");
        const uint8_t b = *p++;
        if (shift == 28 && b > 0x0f) return Corrupt(std::string(who) + ": varint index overflows u32");
        d |= static_cast<uint32_t>(b & 0x7fu) << shift;
        if ((b & 0x80u) == 0) {
          if (b == 0 && shift != 0) return Corrupt(std::string(who) + ": overlong varint index");
          break;
        }
      }
      if (i > 0 && d == 0) return Corrupt(std::string(who) + ": indices are not strictly increasing");
      const uint64_t cur = prev + d;
      if (cur >= n) return Corrupt(std::string(who) + ": index out of range");
      idx[i] = static_cast<uint32_t>(cur);
      prev = cur;
    }
    if (p != end) return Corrupt(std::string(who) + ": bytes left over after the varint indices");
  }
  return Sparse{idx, payload.data() + 4 + index_bytes, m};
}

class TopkCodec final : public Codec {
 public:
  TopkCodec(CodecId id, double v) : id_(id), v_(v) {}

  CodecId id() const override { return id_; }
  std::string name() const override {
    return std::string(CodecIdName(id_)) + ":" + internal::FormatNumber(v_);
  }

  size_t MaxCompressedBytes(size_t elements) const override {
    const size_t k = internal::KFor(v_, elements);
    const size_t m = id_ == CodecId::kTopk ? k : SampledRange(k, elements).hi;
    return internal::SatAdd(WireHeader::kBytes + kParamBytes + 4, internal::SatMul(m, 8));
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& ctx) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t n = input.size();
    if (n > kMaxElements) return InvalidArgument(name() + ": chunks are limited to 2^32 - 1 elements");
    const size_t k = internal::KFor(v_, n);
    thread_local std::vector<uint32_t> idx_buf, value_buf;
    size_t m = k;
    const uint32_t* idx = nullptr;
    const uint32_t* values = nullptr;
    if (id_ == CodecId::kTopkSampled && n >= kMinSampled) {
      idx = SampledSelect(input.data(), n, k, ctx, &m, &values);
    }
    if (idx == nullptr) {
      uint32_t* dst = internal::Scratch(idx_buf, k);
      uint32_t* vals = internal::Scratch(value_buf, k);
      internal::SelectTopk(input.data(), n, k, dst, vals);
      idx = dst;
      values = vals;
      m = k;
    }
    return WriteSparse(id_, v_, n, idx, values, m, out.data());
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    ZW_ASSIGN_OR_RETURN(Sparse s, ParseSparse(in, id_, out.size()));
    std::fill(out.begin(), out.end(), 0.0f);
    for (size_t i = 0; i < s.m; ++i) std::memcpy(&out[s.idx[i]], s.values + 4 * i, 4);
    return Status::Ok();
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    ZW_ASSIGN_OR_RETURN(Sparse s, ParseSparse(in, id_, accum.size()));
    for (size_t i = 0; i < s.m; ++i) accum[s.idx[i]] += alpha * internal::LoadF32(s.values + 4 * i);
    return Status::Ok();
  }

  double ErrorBoundL2(std::span<const float> input) const override {
    if (!AllFinite(input)) return std::numeric_limits<double>::infinity();
    const size_t n = input.size();
    const size_t k = internal::KFor(v_, n);
    const size_t kept = id_ == CodecId::kTopk || n < kMinSampled ? k : SampledRange(k, n).lo;
    return internal::TopkDroppedNorm(input.data(), n, kept);
  }

 private:
  static constexpr size_t kMinSampled = size_t{1} << 16;

  // DGC threshold estimation; returns the selected indices (ascending, in
  // scratch) with their count and values' bits, or nullptr to fall back to
  // exact top-k.
  const uint32_t* SampledSelect(const float* x, size_t n, size_t k, const CodecContext& ctx, size_t* m_out,
                                const uint32_t** values) const {
    const CountRange range = SampledRange(k, n);
    const size_t m = std::max<size_t>(1024, n / 100);
    const size_t stride = n / m;  // >= 1 since n >= 65536 > m... or m == 1024 <= n
    const PhiloxStream stream(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, PhiloxPurpose::kTopkSample);
    uint32_t* s = internal::Scratch(tl_sample, m);
    // Stratified: sample i lies in [i * stride, (i + 1) * stride).
    ForEachDraw(stream, 0, m, [&](uint64_t i, uint32_t u) {
      const size_t pos = i * stride + static_cast<size_t>((static_cast<uint64_t>(u) * stride) >> 32);
      s[i] = AbsKey(x[pos]);
    });
    // Ranks are descending: rank r's key has about (r + 1) * n / m entries at or above it.
    const double per_sample = static_cast<double>(n) / static_cast<double>(m);
    auto rank_for = [&](double count) {
      const double r = count / per_sample - 1.0;
      return static_cast<int64_t>(std::clamp(std::round(r), 0.0, static_cast<double>(m - 1)));
    };
    int64_t r = rank_for(static_cast<double>(k));
    int64_t too_few = -1;                        // largest rank known to give < lo
    int64_t too_many = static_cast<int64_t>(m);  // smallest rank known to give > hi
    Candidates c{};
    for (int attempt = 0; attempt < 6; ++attempt) {
      std::nth_element(s, s + r, s + m, std::greater<uint32_t>());
      if (ThresholdCandidates(x, n, s[r], range.hi, &c)) {
        if (c.size >= range.lo) {
          *m_out = c.size;
          *values = c.bits;
          return c.idx;
        }
        too_few = std::max(too_few, r);
        // Proportional step from the observed count, kept inside the bracket.
        int64_t next = rank_for(static_cast<double>(k) * (static_cast<double>(r) + 1.0) * per_sample /
                                std::max<double>(1.0, static_cast<double>(c.size)));
        if (next <= too_few || next >= too_many) next = too_few + (too_many - too_few) / 2;
        r = next;
      } else {
        too_many = std::min(too_many, r);
        r = too_few + (too_many - too_few) / 2;
      }
      if (r <= too_few || r >= too_many) break;
    }
    return nullptr;
  }

  CodecId id_;
  double v_;
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeTopkCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(CheckKeys(spec, {"value"}));
  ZW_ASSIGN_OR_RETURN(double v, ParseRatioOrCount(spec, "value", kDefaultRatio));
  return std::unique_ptr<Codec>(std::make_unique<TopkCodec>(CodecId::kTopk, v));
}
Result<std::unique_ptr<Codec>> MakeTopkSampledCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(CheckKeys(spec, {"value"}));
  ZW_ASSIGN_OR_RETURN(double v, ParseRatioOrCount(spec, "value", kDefaultRatio));
  return std::unique_ptr<Codec>(std::make_unique<TopkCodec>(CodecId::kTopkSampled, v));
}
}  // namespace internal
}  // namespace zipwire::kernels
