// Codec-specific behaviour of bf16, topk, topk_sampled, randomk, dithering,
// terngrad and countsketch: exactness against references, unbiasedness,
// non-finite input, compressed-domain aggregation and targeted corruption.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "kernels/codec.h"
#include "kernels/codec_internal.h"
#include "tests/kernels/test_util.h"

namespace zipwire::kernels {
namespace {

using testing::Ctx;
using testing::MustCreate;
using testing::RandomNormal;

std::vector<float> Decode(const Codec& c, const std::vector<uint8_t>& buf, size_t n) {
  std::vector<float> d(n, 777.0f);
  const Status s = c.Decompress(buf, d);
  EXPECT_TRUE(s.ok()) << c.name() << ": " << s.ToString();
  return d;
}

StatusCode DecodeCode(const Codec& c, const std::vector<uint8_t>& buf, size_t n) {
  std::vector<float> d(n);
  const Status s1 = c.Decompress(buf, d);
  const Status s2 = c.DecompressAccumulate(buf, d, 1.0f);
  EXPECT_EQ(s1.code(), s2.code());
  return s1.code();
}

uint32_t Bits(float f) { return std::bit_cast<uint32_t>(f); }

// ---------------------------------------------------------------- bf16

float ReferenceBf16(float x) {
  if (std::isnan(x)) return x;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 0x1.ffp127) return std::copysign(INFINITY, x);  // half an ulp past 0x1.fep127
  int e;
  std::frexp(a, &e);
  const int q_exp = a < 0x1p-126 ? -133 : e - 8;
  const double k = std::nearbyint(std::ldexp(a, -q_exp));
  return static_cast<float>(std::copysign(std::ldexp(k, q_exp), static_cast<double>(x)));
}

TEST(Bf16, MatchesReferenceOnASweep) {
  for (uint64_t b = 0; b <= 0xffffffffull; b += 9973) {
    const float x = std::bit_cast<float>(static_cast<uint32_t>(b));
    const float got = internal::Bf16ToFloat(internal::FloatToBf16(x));
    const float want = ReferenceBf16(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(std::isnan(got));
      ASSERT_EQ(Bits(got) & 0x00400000u, 0x00400000u) << "NaN must come back quiet";
      ASSERT_EQ(Bits(got) >> 31, Bits(x) >> 31);
    } else {
      ASSERT_EQ(Bits(got), Bits(want)) << std::hexfloat << x;
    }
  }
  // Exact ties go to even.
  EXPECT_EQ(internal::FloatToBf16(std::bit_cast<float>(0x3f808000u)), 0x3f80u);
  EXPECT_EQ(internal::FloatToBf16(std::bit_cast<float>(0x3f818000u)), 0x3f82u);
  EXPECT_EQ(internal::FloatToBf16(std::bit_cast<float>(0x7f7f8000u)), 0x7f80u);  // rounds to Inf
  EXPECT_EQ(internal::FloatToBf16(-INFINITY), 0xff80u);
  EXPECT_EQ(internal::FloatToBf16(std::bit_cast<float>(0x7f800001u)), 0x7fc0u);  // sNaN -> qNaN
}

TEST(Bf16, CodecBytesAndBound) {
  auto codec = MustCreate("bf16");
  const std::vector<float> x = {1.0f, -2.5f, 3.14159f, 1e-40f, NAN, INFINITY};
  const auto buf = testing::Encode(*codec, x);
  ASSERT_EQ(buf.size(), 32u + 12);
  EXPECT_EQ(buf[32], 0x80);
  EXPECT_EQ(buf[33], 0x3f);
  const auto d = Decode(*codec, buf, x.size());
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(d[i], ReferenceBf16(x[i]));
  EXPECT_TRUE(std::isnan(d[4]));
  EXPECT_EQ(d[5], INFINITY);
  EXPECT_TRUE(std::isinf(codec->ErrorBoundL2(x)));
  EXPECT_TRUE(std::isinf(codec->ErrorBoundL2(std::vector<float>{3.4e38f})));
}

// ------------------------------------------------------- linear codecs

TEST(AccumulateEncoded, HalfPrecisionSumsInFp32AndReRounds) {
  // 2500 spans several of the helper's 1024-element blocks, with a partial last one.
  for (const size_t n : {size_t{1001}, size_t{2500}}) {
    SCOPED_TRACE(n);
    for (const char* spec : {"fp16", "bf16"}) {
      auto codec = MustCreate(spec);
      ASSERT_TRUE(codec->is_linear());
      const auto a = RandomNormal(n, 1), b = RandomNormal(n, 2);
      auto acc = testing::Encode(*codec, a);
      const auto eb = testing::Encode(*codec, b);
      const auto da = Decode(*codec, acc, n), db = Decode(*codec, eb, n);
      ASSERT_TRUE(codec->AccumulateEncoded(eb, acc).ok()) << spec;
      std::vector<float> sum(n);
      for (size_t i = 0; i < n; ++i) sum[i] = da[i] + db[i];
      EXPECT_EQ(acc, testing::Encode(*codec, sum)) << spec << ": accum must be the rounding of the fp32 sum";
      // Shape mismatch and malformed input leave the accumulator alone.
      const auto before = acc;
      EXPECT_EQ(codec->AccumulateEncoded(testing::Encode(*codec, RandomNormal(n - 1, 3)), acc).code(),
                StatusCode::kInvalidArgument);
      auto bad = eb;
      bad.pop_back();
      EXPECT_EQ(codec->AccumulateEncoded(bad, acc).code(), StatusCode::kCorrupt);
      // An accumulator of the other 16-bit codec is refused, not reinterpreted.
      auto other = testing::Encode(*MustCreate(std::string(spec) == "fp16" ? "bf16" : "fp16"), a);
      const auto other_before = other;
      EXPECT_EQ(codec->AccumulateEncoded(eb, other).code(), StatusCode::kInvalidArgument);
      EXPECT_EQ(other, other_before);
      EXPECT_EQ(acc, before);
    }
  }
}

TEST(AccumulateEncoded, NonLinearCodecsSayNotSupported) {
  for (const char* spec : {"none", "onebit", "topk:0.1", "topk_sampled:0.1", "dithering", "terngrad"}) {
    auto codec = MustCreate(spec);
    EXPECT_FALSE(codec->is_linear()) << spec;
    auto buf = testing::Encode(*codec, RandomNormal(10, 4));
    EXPECT_EQ(codec->AccumulateEncoded(buf, buf).code(), StatusCode::kNotSupported) << spec;
  }
}

// ---------------------------------------------------------------- topk

// Reference: stable sort by |x| bit pattern descending, index ascending.
std::vector<uint32_t> ReferenceTopk(const std::vector<float>& x, size_t k) {
  std::vector<uint32_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), 0u);
  std::stable_sort(idx.begin(), idx.end(), [&](uint32_t a, uint32_t b) {
    return (Bits(x[a]) & 0x7fffffffu) > (Bits(x[b]) & 0x7fffffffu);
  });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<uint32_t> Selected(const std::vector<float>& d) {
  std::vector<uint32_t> idx;
  for (size_t i = 0; i < d.size(); ++i) {
    if (Bits(d[i]) != 0) idx.push_back(static_cast<uint32_t>(i));
  }
  return idx;
}

TEST(Topk, ExactAgainstSortReferenceWithTies) {
  std::mt19937 rng(5);
  for (size_t n : {1, 2, 10, 100, 1000, 70000, 300000}) {
    for (int variant = 0; variant < 3; ++variant) {
      std::vector<float> x(n);
      for (auto& v : x) {
        // variant 0: distinct; 1: few distinct magnitudes (many ties), 2: all equal.
        const float mag = variant == 0
                              ? std::ldexp(1.0f + (rng() % 100000) / 1e5f, static_cast<int>(rng() % 20) - 10)
                          : variant == 1 ? static_cast<float>(1 + rng() % 5)
                                         : 2.0f;
        v = rng() % 2 ? mag : -mag;
      }
      for (size_t k : {size_t{1}, n / 100 + 1, n / 3 + 1, n}) {
        k = std::min(k, n);
        std::vector<uint32_t> got(k);
        internal::SelectTopk(x.data(), n, k, got.data());
        ASSERT_EQ(got, ReferenceTopk(x, k)) << "n=" << n << " k=" << k << " variant " << variant;
      }
    }
  }
}

// Bit-pattern inputs that stress the radix levels: any 32 bits (NaN, Inf and
// subnormals included, the widest key range), and keys packed into a few
// thousand ulps with many ties (the refinement levels see narrow bins). The
// selected values' bits must come back with the indices.
TEST(Topk, ExactAgainstSortReferenceOnRawBitPatterns) {
  std::mt19937 rng(11);
  for (size_t n : {100, 70000, 300000}) {
    for (int variant = 0; variant < 3; ++variant) {
      std::vector<float> x(n);
      for (auto& v : x) {
        const uint32_t bits = variant == 0   ? static_cast<uint32_t>(rng())
                              : variant == 1 ? 0x3f800000u + static_cast<uint32_t>(rng() % 5000)
                                             : 0x7f800000u + static_cast<uint32_t>(rng() % 3);  // Inf, NaNs
        v = std::bit_cast<float>(bits | (rng() % 2 ? 0x80000000u : 0u));
      }
      for (size_t k : {size_t{1}, n / 100 + 1, n / 3 + 1}) {
        std::vector<uint32_t> got(k), values(k);
        internal::SelectTopk(x.data(), n, k, got.data(), values.data());
        ASSERT_EQ(got, ReferenceTopk(x, k)) << "n=" << n << " k=" << k << " variant " << variant;
        for (size_t i = 0; i < k; ++i) ASSERT_EQ(values[i], Bits(x[got[i]])) << "n=" << n << " i=" << i;
      }
    }
  }
}

TEST(Topk, CodecSendsExactlyTopkAndBoundIsDroppedNorm) {
  auto codec = MustCreate("topk:0.01");
  const size_t n = 100000;
  auto x = RandomNormal(n, 6);
  const auto buf = testing::Encode(*codec, x);
  const auto d = Decode(*codec, buf, n);
  const auto ref = ReferenceTopk(x, 1000);
  EXPECT_EQ(Selected(d), ref);
  double dropped = 0;
  std::vector<bool> kept(n);
  for (uint32_t i : ref) kept[i] = true;
  for (size_t i = 0; i < n; ++i) {
    if (kept[i]) {
      EXPECT_EQ(d[i], x[i]);
    } else {
      dropped += static_cast<double>(x[i]) * x[i];
    }
  }
  EXPECT_NEAR(codec->ErrorBoundL2(x), std::sqrt(dropped), 1e-9 * std::sqrt(dropped));
  // Counts: "topk:5" keeps 5, clamped to n.
  auto five = MustCreate("topk:5");
  EXPECT_EQ(Selected(Decode(*five, testing::Encode(*five, x), n)).size(), 5u);
  const std::vector<float> three = {1, -2, 3};
  EXPECT_EQ(Decode(*five, testing::Encode(*five, three), 3), three);
}

TEST(Topk, IndexCodingPicksTheSmaller) {
  auto codec = MustCreate("topk:4");
  // Clustered indices: varint (param_word 1); spread over 2^30: raw (0).
  std::vector<float> x(100, 0.0f);
  x[10] = x[11] = x[12] = x[13] = 1.0f;
  auto buf = testing::Encode(*codec, x);
  EXPECT_EQ(buf[24], 1);
  EXPECT_EQ(buf.size(), 32u + 8 + 4 + 4 + 16);
  EXPECT_EQ(Decode(*codec, buf, 100), x);
  // Gaps in [2^21, 2^28) take 4 varint bytes each: a tie with raw, so raw.
  std::vector<float> y((4u << 21) + 1, 0.0f);
  y[1u << 21] = y[2u << 21] = y[3u << 21] = y[4u << 21] = 1.0f;
  buf = testing::Encode(*codec, y);
  EXPECT_EQ(buf[24], 0);
  EXPECT_EQ(buf.size(), codec->MaxCompressedBytes(y.size()));
  EXPECT_EQ(Decode(*codec, buf, y.size()), y);
}

TEST(Topk, NonFiniteEntriesAreSelectedFirst) {
  for (const char* spec : {"topk:3", "topk_sampled:3"}) {
    auto codec = MustCreate(spec);
    const std::vector<float> x = {1e30f, NAN, -2.0f, -INFINITY, 5.0f, 0.0f};
    const auto d = Decode(*codec, testing::Encode(*codec, x), x.size());
    EXPECT_EQ(d[0], 1e30f);
    EXPECT_TRUE(std::isnan(d[1]));
    EXPECT_EQ(d[3], -INFINITY);
    EXPECT_EQ(d[2], 0.0f);
    EXPECT_EQ(d[4], 0.0f);
    EXPECT_TRUE(std::isinf(codec->ErrorBoundL2(x)));
  }
}

// Builds a topk buffer by hand: count m, the given raw or varint index bytes, m values.
std::vector<uint8_t> HandTopk(CodecId id, double v, size_t n, uint32_t m,
                              const std::vector<uint8_t>& index_bytes, bool varint) {
  std::vector<uint8_t> b(32 + 8 + 4 + index_bytes.size() + 4 * m, 0);
  WireHeader h;
  h.codec = id;
  h.param_bytes = 8;
  h.elements = n;
  h.payload_bytes = b.size() - 40;
  h.param_word = varint ? 1 : 0;
  EncodeHeader(h, std::span<uint8_t, 32>(b.data(), 32));
  std::memcpy(b.data() + 32, &v, 8);
  std::memcpy(b.data() + 40, &m, 4);
  std::copy(index_bytes.begin(), index_bytes.end(), b.begin() + 44);
  return b;
}

std::vector<uint8_t> Raw(std::initializer_list<uint32_t> idx) {
  std::vector<uint8_t> out;
  for (uint32_t i : idx) {
    for (int s = 0; s < 32; s += 8) out.push_back(static_cast<uint8_t>(i >> s));
  }
  return out;
}

TEST(Topk, CorruptIndicesAreRejected) {
  auto codec = MustCreate("topk:3");
  const size_t n = 50;
  // Sanity: the hand-built format decodes.
  ASSERT_EQ(DecodeCode(*codec, HandTopk(CodecId::kTopk, 3, n, 3, Raw({1, 5, 49}), false), n),
            StatusCode::kOk);
  ASSERT_EQ(DecodeCode(*codec, HandTopk(CodecId::kTopk, 3, n, 3, {1, 4, 44}, true), n), StatusCode::kOk);
  const std::vector<std::pair<std::vector<uint8_t>, const char*>> bad = {
      {HandTopk(CodecId::kTopk, 3, n, 3, Raw({1, 5, 50}), false), "raw index out of range"},
      {HandTopk(CodecId::kTopk, 3, n, 3, Raw({1, 5, 0xffffffffu}), false), "raw index huge"},
      {HandTopk(CodecId::kTopk, 3, n, 3, Raw({5, 1, 7}), false), "raw decreasing"},
      {HandTopk(CodecId::kTopk, 3, n, 3, Raw({1, 5, 5}), false), "raw duplicate"},
      {HandTopk(CodecId::kTopk, 3, n, 2, Raw({1, 5}), false), "count below k"},
      {HandTopk(CodecId::kTopk, 3, n, 4, Raw({1, 5, 6, 7}), false), "count above k"},
      {HandTopk(CodecId::kTopk, 3, n, 3, {1, 4, 45}, true), "varint out of range"},
      {HandTopk(CodecId::kTopk, 3, n, 3, {1, 0, 4}, true), "varint zero delta"},
      {HandTopk(CodecId::kTopk, 3, n, 3, {1, 4, 0x82, 0x00}, true), "overlong varint"},
      {HandTopk(CodecId::kTopk, 3, n, 3, {1, 4, 0x80}, true), "varint runs off its block"},
      {HandTopk(CodecId::kTopk, 3, n, 3, {1, 4, 5, 6}, true), "bytes after the varints"},
      {HandTopk(CodecId::kTopk, 3, n, 3, {1, 4, 0xff, 0xff, 0xff, 0xff, 0x1f}, true), "varint past u32"},
      {HandTopk(CodecId::kTopk, 0.5, n, 3, Raw({1, 5, 9}), false), "k disagrees with the ratio"},
      {HandTopk(CodecId::kTopk, -1, n, 3, Raw({1, 5, 9}), false), "negative ratio"},
      {HandTopk(CodecId::kTopk, NAN, n, 3, Raw({1, 5, 9}), false), "NaN ratio"},
      {HandTopk(CodecId::kTopk, 2.5, n, 3, Raw({1, 5, 9}), false), "fractional count"},
  };
  for (const auto& [buf, what] : bad) EXPECT_EQ(DecodeCode(*codec, buf, n), StatusCode::kCorrupt) << what;
  auto b = HandTopk(CodecId::kTopk, 3, n, 3, Raw({1, 5, 9}), false);
  b[24] = 2;  // unknown index coding
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
  // topk_sampled: counts outside [0.8k, 1.3k] of k = 10.
  auto sampled = MustCreate("topk_sampled:10");
  EXPECT_EQ(DecodeCode(*sampled,
                       HandTopk(CodecId::kTopkSampled, 10, n, 8, Raw({1, 2, 3, 4, 5, 6, 7, 8}), false), n),
            StatusCode::kOk);
  EXPECT_EQ(
      DecodeCode(*sampled, HandTopk(CodecId::kTopkSampled, 10, n, 7, Raw({1, 2, 3, 4, 5, 6, 7}), false), n),
      StatusCode::kCorrupt);
}

// -------------------------------------------------------- topk_sampled

TEST(TopkSampled, CountInRangeAndAThresholdSet) {
  auto codec = MustCreate("topk_sampled:0.01");
  for (size_t n : {size_t{1} << 16, size_t{1} << 20, (size_t{1} << 20) + 12345}) {
    for (uint64_t step = 0; step < 3; ++step) {
      auto x = RandomNormal(n, static_cast<uint32_t>(n + step));
      const auto buf = testing::Encode(*codec, x, Ctx(step));
      const auto d = Decode(*codec, buf, n);
      const size_t k = internal::KFor(0.01, n);
      const auto sel = Selected(d);
      EXPECT_GE(sel.size(), k * 4 / 5) << n;
      EXPECT_LE(sel.size(), (k * 13 + 9) / 10) << n;
      // Everything kept is at least as large as everything dropped.
      float min_kept = INFINITY, max_dropped = 0;
      for (size_t i = 0; i < n; ++i) {
        if (Bits(d[i]) != 0) {
          EXPECT_EQ(d[i], x[i]);
          min_kept = std::min(min_kept, std::fabs(x[i]));
        } else {
          max_dropped = std::max(max_dropped, std::fabs(x[i]));
        }
      }
      EXPECT_GE(min_kept, max_dropped);
      EXPECT_EQ(testing::Encode(*codec, x, Ctx(step)), buf);
    }
  }
}

TEST(TopkSampled, TiesFallBackToExact) {
  auto codec = MustCreate("topk_sampled:0.01");
  const size_t n = 1 << 17;
  std::vector<float> x(n, 1.0f);
  const auto d = Decode(*codec, testing::Encode(*codec, x), n);
  const auto sel = Selected(d);
  ASSERT_EQ(sel.size(), internal::KFor(0.01, n));
  for (size_t i = 0; i < sel.size(); ++i) EXPECT_EQ(sel[i], i);  // lowest indices win ties
}

// -------------------------------------------------------------- randomk

TEST(Randomk, SharedIndicesPerContextDistinctAcrossSteps) {
  auto codec = MustCreate("randomk:0.1");
  const size_t n = 5000;
  auto x = RandomNormal(n, 7);
  for (auto& v : x) v = std::fabs(v) + 1.0f;  // nonzero, so Selected() sees every kept index
  std::set<std::vector<uint32_t>> seen;
  for (uint64_t step = 0; step < 5; ++step) {
    const auto buf = testing::Encode(*codec, x, Ctx(step));
    const auto sel = Selected(Decode(*codec, buf, n));
    ASSERT_EQ(sel.size(), 500u);
    EXPECT_TRUE(seen.insert(sel).second) << "step " << step << " repeated an index set";
    // Another worker, another input, same context: same indices.
    auto y = RandomNormal(n, 8);
    for (auto& v : y) v = std::fabs(v) + 1.0f;
    EXPECT_EQ(Selected(Decode(*codec, testing::Encode(*codec, y, Ctx(step)), n)), sel);
  }
  // Different chunk or tensor: different indices.
  EXPECT_FALSE(seen.count(Selected(Decode(*codec, testing::Encode(*codec, x, Ctx(0, 1234, 7, 4)), n))));
  EXPECT_FALSE(seen.count(Selected(Decode(*codec, testing::Encode(*codec, x, Ctx(0, 1234, 8, 3)), n))));
}

TEST(Randomk, IndicesAreRoughlyUniform) {
  auto codec = MustCreate("randomk:10");
  const size_t n = 100;
  std::vector<float> x(n, 1.0f);
  std::vector<int> hits(n);
  const int steps = 4000;
  for (int s = 0; s < steps; ++s) {
    for (uint32_t i : Selected(Decode(*codec, testing::Encode(*codec, x, Ctx(s)), n))) ++hits[i];
  }
  for (int h : hits) EXPECT_NEAR(h, steps / 10, 5 * 19);  // mean 400, sd ~19
}

TEST(Randomk, ScaledIsUnbiased) {
  auto codec = MustCreate("randomk:0.25,scale=1");
  const size_t n = 64;
  const auto x = RandomNormal(n, 9);
  std::vector<double> mean(n);
  const int trials = 20000;
  std::vector<float> d(n);
  for (int t = 0; t < trials; ++t) {
    ASSERT_TRUE(codec->Decompress(testing::Encode(*codec, x, Ctx(t)), d).ok());
    for (size_t i = 0; i < n; ++i) mean[i] += d[i] / trials;
  }
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(mean[i], x[i], 0.06 * (1 + std::fabs(x[i]))) << i;
  EXPECT_LE(codec->ErrorBoundL2(x),
            3.0001 * std::sqrt(std::inner_product(x.begin(), x.end(), x.begin(), 0.0)));
}

TEST(Randomk, AccumulateEncodedIsExactForSharedContext) {
  auto codec = MustCreate("randomk:0.1");
  ASSERT_TRUE(codec->is_linear());
  const size_t n = 3000;
  const auto a = RandomNormal(n, 10), b = RandomNormal(n, 11);
  auto acc = testing::Encode(*codec, a, Ctx(4));
  const auto eb = testing::Encode(*codec, b, Ctx(4));
  const auto da = Decode(*codec, acc, n), db = Decode(*codec, eb, n);
  ASSERT_TRUE(codec->AccumulateEncoded(eb, acc).ok());
  const auto sum = Decode(*codec, acc, n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(sum[i], da[i] + db[i]) << i;
  // Another step (other indices) or another codec parameter: refused, untouched.
  const auto before = acc;
  EXPECT_EQ(codec->AccumulateEncoded(testing::Encode(*codec, b, Ctx(5)), acc).code(),
            StatusCode::kInvalidArgument);
  auto scaled = MustCreate("randomk:0.1,scale=1");
  EXPECT_EQ(codec->AccumulateEncoded(testing::Encode(*scaled, b, Ctx(4)), acc).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(acc, before);
}

TEST(Randomk, CorruptParametersAreRejected) {
  auto codec = MustCreate("randomk:0.25");
  const size_t n = 40;
  const auto good = testing::Encode(*codec, RandomNormal(n, 12), Ctx(1));
  ASSERT_EQ(DecodeCode(*codec, good, n), StatusCode::kOk);
  auto b = good;
  b[32 + 36] = 2;  // unknown flag
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
  b = good;
  const double bad_v = 0.0;
  std::memcpy(b.data() + 32, &bad_v, 8);
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
  b = good;
  const double other_v = 0.5;  // k = 20 != 10 in the header
  std::memcpy(b.data() + 32, &other_v, 8);
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
}

// ---------------------------------------------------- dithering, terngrad

void ExpectUnbiased(const std::string& spec, double tol) {
  auto codec = MustCreate(spec);
  const size_t n = 257;
  auto x = RandomNormal(n, 13);
  x[3] = 0.0f;
  x[4] = 1e-6f;
  std::vector<double> mean(n);
  const int trials = 4000;
  std::vector<float> d(n);
  double scale = 0;
  for (float v : x) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  for (int t = 0; t < trials; ++t) {
    ASSERT_TRUE(codec->Decompress(testing::Encode(*codec, x, Ctx(0, t)), d).ok()) << spec;
    for (size_t i = 0; i < n; ++i) mean[i] += d[i] / trials;
  }
  double err = 0, norm = 0;
  for (size_t i = 0; i < n; ++i) {
    err += (mean[i] - x[i]) * (mean[i] - x[i]);
    norm += static_cast<double>(x[i]) * x[i];
  }
  EXPECT_EQ(mean[3], 0.0) << spec << ": zero must stay exactly zero";
  EXPECT_LT(std::sqrt(err / norm), tol) << spec;
}

TEST(Dithering, UnbiasedOverSeeds) {
  ExpectUnbiased("dithering:s=4", 0.05);
  ExpectUnbiased("dithering:s=1,norm=max", 0.1);
  ExpectUnbiased("dithering:levels=natural,s=8", 0.05);
  ExpectUnbiased("dithering:levels=natural,norm=max,s=3", 0.05);
}

TEST(Terngrad, UnbiasedOverSeeds) { ExpectUnbiased("terngrad", 0.05); }

TEST(Dithering, LevelsAndLayout) {
  auto codec = MustCreate("dithering:norm=max,s=4");  // w = 3 + 1 = 4 bits
  const std::vector<float> x = {4.0f, -2.0f, 1.0f, 0.0f, -4.0f};
  const auto buf = testing::Encode(*codec, x);
  ASSERT_EQ(buf.size(), 32u + 4 + 3);
  EXPECT_EQ(buf[24], 4);
  // Exact levels never round: codes (l << 1 | sign) = 8, 5, 2, 0, 9.
  EXPECT_EQ(buf[36], 0x58);
  EXPECT_EQ(buf[37], 0x02);
  EXPECT_EQ(buf[38], 0x09);
  EXPECT_EQ(Decode(*codec, buf, x.size()), x);
  // Natural levels are powers of two times the norm: exact for such inputs.
  auto nat = MustCreate("dithering:levels=natural,norm=max,s=4");
  const std::vector<float> y = {8.0f, -1.0f, 2.0f, 0.0f, -4.0f};
  EXPECT_EQ(Decode(*nat, testing::Encode(*nat, y), y.size()), y);
}

TEST(Dithering, CorruptCodesNormAndPadding) {
  auto codec = MustCreate("dithering:norm=max,s=4");
  const std::vector<float> x = {4.0f, -2.0f, 1.0f, 0.0f, -4.0f};
  const auto good = testing::Encode(*codec, x);
  auto b = good;
  b[36] = 0x5a;  // level 5 > s
  EXPECT_EQ(DecodeCode(*codec, b, 5), StatusCode::kCorrupt);
  b = good;
  b[37] = 0x12;  // element 3: level 0 with the sign set
  EXPECT_EQ(DecodeCode(*codec, b, 5), StatusCode::kCorrupt);
  b = good;
  b[38] = 0x19;  // padding nibble
  EXPECT_EQ(DecodeCode(*codec, b, 5), StatusCode::kCorrupt);
  for (float norm : {-1.0f, -0.0f, INFINITY, NAN}) {
    b = good;
    std::memcpy(b.data() + 32, &norm, 4);
    EXPECT_EQ(DecodeCode(*codec, b, 5), StatusCode::kCorrupt) << norm;
  }
  for (uint32_t word : {0u, 1u << 18, (1u << 16) | 33u}) {  // s = 0, unknown bit, natural s > 32
    b = good;
    for (int i = 0; i < 4; ++i) b[24 + i] = static_cast<uint8_t>(word >> (8 * i));
    EXPECT_EQ(DecodeCode(*codec, b, 5), StatusCode::kCorrupt) << word;
  }
}

// Buckets: one norm per B elements, all norms before the codes; the decoder
// checks every norm, the bucket field and the payload size it implies.
TEST(Dithering, BucketsLayoutAndCorruption) {
  auto codec = MustCreate("dithering:bucket=128,norm=max,s=4");
  EXPECT_EQ(codec->name(), "dithering:bucket=128,levels=linear,norm=max,s=4");
  const size_t n = 300;  // buckets of 128, 128, 44
  std::vector<float> x(n, 0.0f);
  for (size_t i = 0; i < n; ++i) {
    if (i % 128 == 5) x[i] = 8.0f * static_cast<float>(i / 128 + 1);
    if (i % 128 == 9) x[i] = -4.0f * static_cast<float>(i / 128 + 1);  // level 2 of 4: exact
  }
  const auto good = testing::Encode(*codec, x);
  ASSERT_EQ(good.size(), 32u + 3 * 4 + n * 4 / 8);
  const uint32_t word = 4u | 1u << 17 | 7u << 18;
  EXPECT_EQ(internal::LoadLe32(good.data() + 24), word);
  for (size_t k = 0; k < 3; ++k) EXPECT_EQ(internal::LoadF32(good.data() + 32 + 4 * k), 8.0f * (k + 1));
  EXPECT_EQ(Decode(*codec, good, n), x);
  for (size_t k = 0; k < 3; ++k) {
    for (float norm : {-1.0f, -0.0f, INFINITY, NAN}) {
      auto b = good;
      std::memcpy(b.data() + 32 + 4 * k, &norm, 4);
      EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt) << "norm " << k << " = " << norm;
    }
  }
  // Bucket fields outside {0, 7..13}, a bit above them, and fields that imply
  // another number of norms (so another payload size).
  for (uint32_t field : {1u, 6u, 14u, 31u, 8u, 0u}) {
    auto b = good;
    const uint32_t w = (word & ~(0x1fu << 18)) | field << 18;
    for (int i = 0; i < 4; ++i) b[24 + i] = static_cast<uint8_t>(w >> (8 * i));
    EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt) << field;
  }
  auto b = good;
  b[26] |= 0x80;  // bit 23
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
  // The unbucketed form has no bucket bits: the format of buffers written
  // before buckets existed.
  auto whole = MustCreate("dithering:bucket=0,norm=max,s=4");
  const auto w = testing::Encode(*whole, x);
  EXPECT_EQ(internal::LoadLe32(w.data() + 24), 4u | 1u << 17);
  ASSERT_EQ(w.size(), 32u + 4 + n * 4 / 8);
  EXPECT_EQ(internal::LoadF32(w.data() + 32), 24.0f);
  // Any decoder instance reads the parameters from the buffer.
  EXPECT_EQ(Decode(*codec, w, n), Decode(*whole, w, n));
  EXPECT_EQ(Decode(*whole, good, n), x);
}

// The encoders write whole 8-byte words while packing; none may land past
// the encoded size (the caller's buffer may end there).
TEST(Dithering, EncodersWriteNothingPastTheEncodedSize) {
  for (const char* spec : {"dithering:s=1", "dithering:s=4", "dithering:s=16", "dithering:s=127,bucket=128",
                           "dithering:s=16,bucket=0", "dithering:s=300", "dithering:levels=natural,s=8"}) {
    auto codec = MustCreate(spec);
    for (size_t n : {size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{33}, size_t{1000}, size_t{1024},
                     size_t{8192 + 24}, size_t{3 * 8192}}) {
      const auto x = RandomNormal(n, static_cast<uint32_t>(n));
      const size_t size = codec->MaxCompressedBytes(n);
      std::vector<uint8_t> out(size + 16, 0xab);
      auto written = codec->Compress(x, std::span(out).first(size), Ctx(1));
      ASSERT_TRUE(written.ok()) << spec;
      EXPECT_EQ(*written, size) << spec << " n=" << n;
      for (size_t i = size; i < out.size(); ++i) ASSERT_EQ(out[i], 0xab) << spec << " n=" << n;
      std::vector<float> e(n, 0.25f);
      FeedbackState state;
      std::fill(out.begin(), out.end(), 0xab);
      written = codec->CompressWithFeedback(x, e, state, std::span(out).first(size), Ctx(2));
      ASSERT_TRUE(written.ok()) << spec;
      for (size_t i = size; i < out.size(); ++i) ASSERT_EQ(out[i], 0xab) << spec << " n=" << n << " (ef)";
    }
  }
}

// Buckets make the norm local: a bucket of small values next to one of large
// values keeps its own resolution (here the small bucket decodes with 1/16 of
// the error it gets against one norm for the chunk).
TEST(Dithering, BucketNormsAreLocal) {
  std::vector<float> x = RandomNormal(256, 21, 1e-3f);
  for (size_t i = 128; i < 256; ++i) x[i] *= 1000.0f;
  double err_bucketed = 0, err_whole = 0;
  for (int t = 0; t < 20; ++t) {
    const auto a = Decode(*MustCreate("dithering:bucket=128,s=4"),
                          testing::Encode(*MustCreate("dithering:bucket=128,s=4"), x, Ctx(0, t)), 256);
    const auto b = Decode(*MustCreate("dithering:bucket=0,s=4"),
                          testing::Encode(*MustCreate("dithering:bucket=0,s=4"), x, Ctx(0, t)), 256);
    for (size_t i = 0; i < 128; ++i) {
      err_bucketed += (a[i] - x[i]) * (a[i] - x[i]);
      err_whole += (b[i] - x[i]) * (b[i] - x[i]);
    }
  }
  EXPECT_LT(err_bucketed * 16, err_whole);
}

// Error feedback rejecting a later bucket leaves the residual holding
// input + residual: exactly for the rejected bucket and after it, up to one
// rounding (e' + decode) for the buckets already quantised.
TEST(Dithering, RejectedBucketLeavesInputPlusResidual) {
  auto codec = MustCreate("dithering:bucket=128,s=8");
  const size_t n = 4 * 128 + 7;
  const auto x0 = RandomNormal(n, 31);
  auto x = RandomNormal(n, 32);
  x[2 * 128 + 3] = NAN;
  std::vector<float> e = x0;
  std::vector<uint8_t> out(codec->MaxCompressedBytes(n));
  FeedbackState state;
  EXPECT_EQ(codec->CompressWithFeedback(x, e, state, out, Ctx(0)).status().code(),
            StatusCode::kInvalidArgument);
  for (size_t i = 0; i < n; ++i) {
    const float y = x0[i] + x[i];
    if (i >= 2 * 128) {
      EXPECT_EQ(std::bit_cast<uint32_t>(e[i]), std::bit_cast<uint32_t>(y)) << i;
    } else {
      EXPECT_NEAR(e[i], y, 1e-6 * (1.0 + std::fabs(y))) << i;
    }
  }
}

TEST(Terngrad, LayoutAndCorruption) {
  auto codec = MustCreate("terngrad");
  const std::vector<float> x = {3.0f, -3.0f, 0.0f, 3.0f, -3.0f};
  const auto buf = testing::Encode(*codec, x);
  ASSERT_EQ(buf.size(), 32u + 4 + 2);
  EXPECT_EQ(buf[36], 0x49);  // codes 01 10 00 01 from bit 0 up: 0b01'00'10'01
  EXPECT_EQ(buf[37], 0x02);
  EXPECT_EQ(Decode(*codec, buf, 5), x);
  auto b = buf;
  b[36] |= 0x30;  // element 2 becomes 11
  EXPECT_EQ(DecodeCode(*codec, b, 5), StatusCode::kCorrupt);
  b = buf;
  b[37] |= 0x04;  // padding
  EXPECT_EQ(DecodeCode(*codec, b, 5), StatusCode::kCorrupt);
  for (float scale : {-1.0f, -0.0f, INFINITY, NAN}) {
    b = buf;
    std::memcpy(b.data() + 32, &scale, 4);
    EXPECT_EQ(DecodeCode(*codec, b, 5), StatusCode::kCorrupt) << scale;
  }
}

TEST(StochasticCodecs, NonFiniteInputIsInvalidArgument) {
  for (const char* spec : {"dithering", "dithering:norm=max", "terngrad", "countsketch:c=16,r=3"}) {
    auto codec = MustCreate(spec);
    for (float bad : {NAN, INFINITY, -INFINITY}) {
      std::vector<float> x = RandomNormal(20, 14);
      x[7] = bad;
      std::vector<uint8_t> out(codec->MaxCompressedBytes(x.size()));
      EXPECT_EQ(codec->Compress(x, out, Ctx(0)).status().code(), StatusCode::kInvalidArgument) << spec;
      EXPECT_TRUE(std::isinf(codec->ErrorBoundL2(x))) << spec;
    }
  }
  // An L2 norm beyond FLT_MAX cannot be sent as float.
  auto codec = MustCreate("dithering");
  std::vector<float> big(4, 3e38f);
  std::vector<uint8_t> out(codec->MaxCompressedBytes(4));
  EXPECT_EQ(codec->Compress(big, out, Ctx(0)).status().code(), StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------- countsketch

std::vector<float> Counters(const std::vector<uint8_t>& buf) {
  std::vector<float> c((buf.size() - 60) / 4);
  std::memcpy(c.data(), buf.data() + 60, c.size() * 4);
  return c;
}

TEST(CountSketch, RecoversHeavyHitters) {
  // 10 heavy hitters in 2048 buckets: another element shares a bucket with
  // one in 3 of 5 rows (and so gets a heavy median) with odds ~1e-6.
  auto codec = MustCreate("countsketch:c=2048,k=10,r=5");
  const size_t n = 20000;
  auto x = RandomNormal(n, 15, 0.001f);
  std::vector<uint32_t> heavy;
  for (int i = 0; i < 10; ++i) {
    heavy.push_back(static_cast<uint32_t>(i * 1999 + 7));
    x[heavy.back()] = (i % 2 ? -1.0f : 1.0f) * (10.0f + i);
  }
  const auto d = Decode(*codec, testing::Encode(*codec, x, Ctx(1)), n);
  EXPECT_EQ(Selected(d), heavy);
  for (uint32_t i : heavy) EXPECT_NEAR(d[i], x[i], 0.05);
  EXPECT_LE(std::sqrt(std::inner_product(x.begin(), x.end(), d.begin(), 0.0, std::plus<>(),
                                         [](float a, float b) { return (a - b) * (a - b); })),
            codec->ErrorBoundL2(x));
}

TEST(CountSketch, SketchesAddAcrossWorkersAndSteps) {
  auto codec = MustCreate("countsketch:c=128,k=32,r=3");
  ASSERT_TRUE(codec->is_linear());
  const size_t n = 5000;
  const auto a = RandomNormal(n, 16), b = RandomNormal(n, 17);
  std::vector<float> ab(n);
  for (size_t i = 0; i < n; ++i) ab[i] = a[i] + b[i];
  // Different steps: the step is not part of the hash key.
  auto acc = testing::Encode(*codec, a, Ctx(1));
  const auto eb = testing::Encode(*codec, b, Ctx(2));
  ASSERT_TRUE(codec->AccumulateEncoded(eb, acc).ok());
  const auto direct = testing::Encode(*codec, ab, Ctx(3));
  ASSERT_EQ(acc.size(), direct.size());
  EXPECT_EQ(0, std::memcmp(acc.data(), direct.data(), 60)) << "header and parameters";
  const auto sa = Counters(testing::Encode(*codec, a, Ctx(1))), sb = Counters(eb), sab = Counters(acc),
             sd = Counters(direct);
  for (size_t i = 0; i < sab.size(); ++i) {
    ASSERT_EQ(sab[i], sa[i] + sb[i]) << "counters add exactly as fp32";
    ASSERT_NEAR(sab[i], sd[i], 1e-3) << "sketch of the sum, up to addition order";
  }
  // With one row and every estimate kept, decode is linear too.
  auto lin = MustCreate("countsketch:c=64,k=5000,r=1");
  auto lacc = testing::Encode(*lin, a, Ctx(0));
  ASSERT_TRUE(lin->AccumulateEncoded(testing::Encode(*lin, b, Ctx(0)), lacc).ok());
  const auto da = Decode(*lin, testing::Encode(*lin, a, Ctx(0)), n),
             db = Decode(*lin, testing::Encode(*lin, b, Ctx(0)), n);
  const auto dsum = Decode(*lin, lacc, n);
  for (size_t i = 0; i < n; ++i) ASSERT_NEAR(dsum[i], da[i] + db[i], 1e-3) << i;
  // Another chunk (other hashes) or another shape: refused, accumulator untouched.
  const auto before = acc;
  EXPECT_EQ(codec->AccumulateEncoded(testing::Encode(*codec, b, Ctx(1, 1234, 7, 9)), acc).code(),
            StatusCode::kInvalidArgument);
  auto other = MustCreate("countsketch:c=128,k=32,r=4");
  EXPECT_EQ(codec->AccumulateEncoded(testing::Encode(*other, b, Ctx(1)), acc).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(acc, before);
  // Overflowing sums are refused.
  std::vector<float> huge(n, 0.0f);
  huge[0] = 3e38f;
  auto h1 = testing::Encode(*codec, huge, Ctx(0));
  EXPECT_EQ(codec->AccumulateEncoded(h1, h1).code(), StatusCode::kInvalidArgument);
}

TEST(CountSketch, CorruptShapeAndCounters) {
  auto codec = MustCreate("countsketch:c=8,k=2,r=2");
  const size_t n = 30;
  const auto good = testing::Encode(*codec, RandomNormal(n, 18), Ctx(0));
  ASSERT_EQ(good.size(), 32u + 28 + 64);
  auto b = good;
  const float inf = INFINITY;
  std::memcpy(b.data() + 60 + 12, &inf, 4);
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
  b = good;
  b[32 + 24] = 0;  // k = 0
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
  b = good;
  b[32 + 20] = 4;  // c = 4: payload no longer r * c
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
  b = good;
  b[24] = 4;  // r = 4
  EXPECT_EQ(DecodeCode(*codec, b, n), StatusCode::kCorrupt);
}

}  // namespace
}  // namespace zipwire::kernels
