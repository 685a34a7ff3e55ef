// The canonical reduction order (kernels/canonical_sum.h) against a plain
// statement of the spec written here, on every CPU path this machine has; and
// every codec's bytes and error-feedback residuals identical on every path.
#include "kernels/canonical_sum.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/codec_internal.h"
#include "kernels/error_feedback.h"
#include "tests/kernels/test_util.h"

namespace zipwire::kernels {
namespace {

using testing::BitDiff;

// The spec, literally: segments of 8192, element i into lane i % 32 from
// +0.0, the shuffle-down tree, segment totals in order from +0.0.
double PlainSum(const std::vector<float>& y, bool squares, uint64_t* finite) {
  double total = 0.0;
  *finite = 0;
  for (size_t s = 0; s < y.size(); s += 8192) {
    double lane[32];
    for (double& l : lane) l = 0.0;
    for (size_t i = 0; i < 8192 && s + i < y.size(); ++i) {
      const float v = y[s + i];
      double t;
      if (squares) {
        t = static_cast<double>(v) * static_cast<double>(v);
      } else {
        t = std::isfinite(v) ? std::fabs(static_cast<double>(v)) : 0.0;
        *finite += std::isfinite(v) ? 1 : 0;
      }
      lane[i % 32] = lane[i % 32] + t;
    }
    for (int off = 16; off >= 1; off /= 2) {
      for (int l = 0; l < off; ++l) lane[l] = lane[l] + lane[l + off];
    }
    total = total + lane[0];
  }
  return total;
}

std::vector<CpuIsa> AvailableIsas() {
  std::vector<CpuIsa> isas = {CpuIsa::kScalar};
  if (BestSupportedIsa() >= CpuIsa::kAvx2) isas.push_back(CpuIsa::kAvx2);
  if (BestSupportedIsa() >= CpuIsa::kAvx512) isas.push_back(CpuIsa::kAvx512);
  return isas;
}

// Magnitudes spread over many binades, so that the order of the additions
// changes the rounded sum (a test of the order, not just of the value).
std::vector<float> SpreadInput(size_t n, uint32_t seed, bool non_finite) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exp(-30, 30);
  std::uniform_int_distribution<int> pick(0, 40);
  std::vector<float> y(n);
  for (auto& v : y) {
    v = std::ldexp(normal(rng), exp(rng));
    if (non_finite) {
      const int p = pick(rng);
      if (p == 0) v = std::numeric_limits<float>::quiet_NaN();
      if (p == 1) v = std::numeric_limits<float>::infinity();
      if (p == 2) v = -std::numeric_limits<float>::infinity();
      if (p == 3) v = -0.0f;
    }
  }
  return y;
}

bool SameDouble(double a, double b) {
  return (std::isnan(a) && std::isnan(b)) || std::bit_cast<uint64_t>(a) == std::bit_cast<uint64_t>(b);
}

const size_t kSizes[] = {0, 1, 5, 31, 32, 33, 100, 8191, 8192, 8193, 2 * 8192 + 31, 5 * 8192 + 1000, 100003};

TEST(CanonicalSumTest, EveryPathMatchesThePlainSpec) {
  for (CpuIsa isa : AvailableIsas()) {
    for (size_t n : kSizes) {
      for (bool non_finite : {false, true}) {
        SCOPED_TRACE(std::string(CpuIsaName(isa)) + " n=" + std::to_string(n) +
                     (non_finite ? " with NaN/Inf" : ""));
        const auto y = SpreadInput(n, static_cast<uint32_t>(n * 3 + non_finite), non_finite);
        uint64_t finite = 0;
        const double abs_sum = PlainSum(y, false, &finite);
        std::vector<uint8_t> words(4 * (n / 32) + 4, 0xee);
        const CanonicalAbsSum got = CanonicalAbsSumOf(y.data(), n, words.data(), isa);
        EXPECT_TRUE(SameDouble(got.sum, abs_sum)) << got.sum << " vs " << abs_sum;
        EXPECT_EQ(got.finite, finite);
        for (size_t w = 0; w < n / 32; ++w) {
          uint32_t expect = 0;
          for (size_t j = 0; j < 32; ++j) expect |= static_cast<uint32_t>(y[32 * w + j] < 0.0f) << j;
          ASSERT_EQ(internal::LoadLe32(words.data() + 4 * w), expect) << "word " << w;
        }
        EXPECT_EQ(words[4 * (n / 32)], 0xee) << "wrote past the full words";
        uint64_t unused;
        const double sq = PlainSum(y, true, &unused);
        EXPECT_TRUE(SameDouble(CanonicalSquareSumOf(y.data(), n, isa), sq));
        const auto ref = internal::CanonicalAbsSumReference(y.data(), n);
        EXPECT_TRUE(SameDouble(ref.sum, abs_sum));
        EXPECT_TRUE(SameDouble(internal::CanonicalSquareSumReference(y.data(), n), sq));
      }
    }
  }
}

TEST(CanonicalSumTest, FusedUpdateMatchesUpdateThenSum) {
  const float s = 0.8125f;
  const float offsets[][2] = {{-0.0f, -0.0f}, {s, -s}, {0.0f, -0.0f}};
  for (CpuIsa isa : AvailableIsas()) {
    for (size_t n : kSizes) {
      for (const auto& off : offsets) {
        SCOPED_TRACE(std::string(CpuIsaName(isa)) + " n=" + std::to_string(n) + " offset " +
                     std::to_string(off[0]));
        const auto x = SpreadInput(n, static_cast<uint32_t>(n + 1), true);
        auto y = SpreadInput(n, static_cast<uint32_t>(n + 2), true);
        std::vector<float> expect_y(n);
        for (size_t i = 0; i < n; ++i) expect_y[i] = (y[i] + (y[i] < 0.0f ? off[0] : off[1])) + x[i];
        uint64_t finite = 0;
        const double expect = PlainSum(expect_y, false, &finite);
        std::vector<uint8_t> words(4 * (n / 32) + 4);
        const CanonicalAbsSum got =
            CanonicalAbsSumOfUpdate(x.data(), y.data(), n, off[0], off[1], words.data(), isa);
        ASSERT_EQ(0u, BitDiff(y, expect_y, n));
        EXPECT_TRUE(SameDouble(got.sum, expect));
        EXPECT_EQ(got.finite, finite);
        for (size_t w = 0; w < n / 32; ++w) {
          uint32_t word = 0;
          for (size_t j = 0; j < 32; ++j) word |= static_cast<uint32_t>(expect_y[32 * w + j] < 0.0f) << j;
          ASSERT_EQ(internal::LoadLe32(words.data() + 4 * w), word) << "word " << w;
        }
      }
    }
  }
}

TEST(CanonicalSumTest, SquareSumOfSumMatchesSumThenSquares) {
  for (CpuIsa isa : AvailableIsas()) {
    for (size_t n : kSizes) {
      SCOPED_TRACE(std::string(CpuIsaName(isa)) + " n=" + std::to_string(n));
      const auto a = SpreadInput(n, static_cast<uint32_t>(n + 5), false);
      const auto b = SpreadInput(n, static_cast<uint32_t>(n + 6), n % 2 == 1);
      std::vector<float> y(n);
      for (size_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
      uint64_t unused;
      EXPECT_TRUE(
          SameDouble(CanonicalSquareSumOfSum(a.data(), b.data(), n, isa), PlainSum(y, true, &unused)));
    }
  }
}

TEST(CanonicalSumTest, OrderIsObservable) {
  // The test data must tell the canonical order from a sequential sum, or the
  // comparison above could not catch a path that sums in another order.
  const auto y = SpreadInput(5 * 8192 + 1000, 11, false);
  double sequential = 0.0;
  for (float v : y) sequential += std::fabs(static_cast<double>(v));
  uint64_t finite;
  EXPECT_NE(sequential, PlainSum(y, false, &finite));
}

TEST(CanonicalSumTest, CodecsUseTheCanonicalSums) {
  const auto y = SpreadInput(3 * 8192 + 77, 5, false);
  uint64_t finite = 0;
  const double abs_sum = PlainSum(y, false, &finite);
  const auto onebit = testing::Encode(*testing::MustCreate("onebit"), y);
  ASSERT_FALSE(onebit.empty());
  EXPECT_EQ(internal::LoadF32(onebit.data() + WireHeader::kBytes),
            static_cast<float>(abs_sum / static_cast<double>(finite)));
  const double sq = PlainSum(y, true, &finite);
  const auto dith = testing::Encode(*testing::MustCreate("dithering:s=16,bucket=0"), y);
  ASSERT_FALSE(dith.empty());
  EXPECT_EQ(internal::LoadF32(dith.data() + WireHeader::kBytes), static_cast<float>(std::sqrt(sq)));
  // Bucketed, each bucket's norm is the canonical sum of that bucket alone
  // (for B = 8192, segment k's total).
  for (size_t bucket : {size_t{8192}, size_t{128}, size_t{1024}}) {
    const auto b =
        testing::Encode(*testing::MustCreate("dithering:s=16,bucket=" + std::to_string(bucket)), y);
    ASSERT_FALSE(b.empty());
    const size_t m = (y.size() + bucket - 1) / bucket;
    for (size_t k = 0; k < m; ++k) {
      const std::vector<float> part(y.begin() + static_cast<ptrdiff_t>(k * bucket),
                                    y.begin() + static_cast<ptrdiff_t>(std::min(y.size(), (k + 1) * bucket)));
      EXPECT_EQ(internal::LoadF32(b.data() + WireHeader::kBytes + 4 * k),
                static_cast<float>(std::sqrt(PlainSum(part, true, &finite))))
          << "bucket " << bucket << " k " << k;
    }
  }
}

// Restores the active ISA when a test ends.
class IsaGuard {
 public:
  explicit IsaGuard(CpuIsa isa) : previous_(internal::SetActiveIsaForTesting(isa)) {}
  ~IsaGuard() { internal::SetActiveIsaForTesting(previous_); }

 private:
  CpuIsa previous_;
};

TEST(CpuIsaPathsTest, EveryCodecGivesTheSameBytesOnEveryPath) {
  const size_t sizes[] = {1, 33, 1000, 8192 + 5, 70001};
  for (const std::string& spec : testing::BuiltinCodecs()) {
    auto codec = testing::MustCreate(spec);
    ASSERT_NE(codec, nullptr) << spec;
    for (size_t n : sizes) {
      const auto x = testing::RandomNormal(n, static_cast<uint32_t>(n));
      std::vector<uint8_t> reference;
      std::vector<float> ref_decoded;
      for (CpuIsa isa : AvailableIsas()) {
        SCOPED_TRACE(spec + " n=" + std::to_string(n) + " " + CpuIsaName(isa));
        IsaGuard guard(isa);
        const auto bytes = testing::Encode(*codec, x, testing::Ctx(3));
        ASSERT_FALSE(bytes.empty());
        std::vector<float> decoded(n, 0.5f);
        ASSERT_TRUE(codec->DecompressAccumulate(bytes, decoded, 0.75f).ok());
        if (reference.empty()) {
          reference = bytes;
          ref_decoded = decoded;
        } else {
          EXPECT_EQ(bytes, reference);
          EXPECT_EQ(0u, BitDiff(decoded, ref_decoded, n));
        }
      }
    }
  }
}

// Special values (NaNs with payloads, signalling NaNs, infinities, -0,
// subnormals, rounding ties, the largest floats) through the codecs that
// accept them: the same bytes on every path.
TEST(CpuIsaPathsTest, SpecialValuesGiveTheSameBytesOnEveryPath) {
  const uint32_t specials[] = {0x7fc00000u, 0xffc00001u, 0x7f800001u, 0xff812345u, 0x7f800000u, 0xff800000u,
                               0x80000000u, 0x00000000u, 0x00000001u, 0x807fffffu, 0x3f808000u, 0x3f818000u,
                               0x7f7fffffu, 0xff7f8000u, 0x7f7f7fffu, 0x00008000u, 0x3f800001u, 0xbf7fffffu};
  std::vector<float> x(1000);
  std::mt19937 rng(3);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = std::bit_cast<float>(i % 3 == 0 ? specials[rng() % std::size(specials)]
                                           : static_cast<uint32_t>(rng()));
  }
  for (const char* spec : {"bf16", "fp16", "onebit", "topk:0.25", "none"}) {
    auto codec = testing::MustCreate(spec);
    std::vector<uint8_t> reference;
    for (CpuIsa isa : AvailableIsas()) {
      SCOPED_TRACE(std::string(spec) + " " + CpuIsaName(isa));
      IsaGuard guard(isa);
      const auto bytes = testing::Encode(*codec, x, testing::Ctx(1));
      ASSERT_FALSE(bytes.empty());
      if (reference.empty()) {
        reference = bytes;
      } else {
        EXPECT_EQ(bytes, reference);
      }
    }
  }
}

TEST(CpuIsaPathsTest, ErrorFeedbackIsTheSameOnEveryPath) {
  const size_t n = 2 * 8192 + 45;
  for (const std::string& spec : testing::BuiltinCodecs()) {
    std::vector<std::vector<uint8_t>> ref_payloads;
    std::vector<float> ref_residual;
    for (CpuIsa isa : AvailableIsas()) {
      SCOPED_TRACE(spec + " " + CpuIsaName(isa));
      IsaGuard guard(isa);
      ErrorFeedback ef(std::shared_ptr<const Codec>(testing::MustCreate(spec)));
      std::vector<uint8_t> out(ef.codec().MaxCompressedBytes(n));
      std::vector<std::vector<uint8_t>> payloads;
      for (int step = 0; step < 4; ++step) {
        const auto x = testing::RandomNormal(n, 40 + step);
        auto written = ef.Compress({1, 2}, x, out, testing::Ctx(step));
        ASSERT_TRUE(written.ok()) << written.status().ToString();
        payloads.emplace_back(out.begin(), out.begin() + static_cast<ptrdiff_t>(*written));
      }
      const auto r = ef.Residual({1, 2});
      std::vector<float> residual(r.begin(), r.end());
      if (ref_payloads.empty()) {
        ref_payloads = payloads;
        ref_residual = residual;
      } else {
        EXPECT_EQ(payloads, ref_payloads);
        EXPECT_EQ(0u, BitDiff(residual, ref_residual, n));
      }
    }
  }
}

}  // namespace
}  // namespace zipwire::kernels
