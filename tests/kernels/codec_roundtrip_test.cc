// Round trips of every built-in codec over sizes that straddle the 32-element
// word and the 8-wide vector blocks, on normal random data.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/codec.h"
#include "tests/kernels/test_util.h"

namespace zipwire::kernels {
namespace {

using testing::Encode;
using testing::MustCreate;
using testing::RandomNormal;

const size_t kSizes[] = {0, 1, 7, 31, 32, 33, 1000, 4097, size_t{1} << 20};

double L2Diff(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    s += d * d;
  }
  return std::sqrt(s);
}

// Independent reference for binary16 rounding: quantise in double, where the
// division by a power of two and nearbyint (round half to even) are exact.
float ReferenceHalf(float x) {
  if (std::isnan(x)) return x;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 65520.0) return std::copysign(INFINITY, x);
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
  const int q_exp = a < 0x1p-14 ? -24 : e - 11;
  const double k = std::nearbyint(std::ldexp(a, -q_exp));
  return static_cast<float>(std::copysign(std::ldexp(k, q_exp), static_cast<double>(x)));
}

class RoundTrip : public ::testing::TestWithParam<size_t> {};

TEST_P(RoundTrip, NoneIsExact) {
  const size_t n = GetParam();
  auto codec = MustCreate("none");
  const auto x = RandomNormal(n, 1);
  const auto buf = Encode(*codec, x);
  ASSERT_EQ(buf.size(), 32 + 4 * n);
  EXPECT_EQ(buf.size(), codec->MaxCompressedBytes(n));
  std::vector<float> d(n, -7.0f);
  ASSERT_TRUE(codec->Decompress(buf, d).ok());
  EXPECT_EQ(d, x);  // random normal data: no NaN or -0, so == is bitwise here
  EXPECT_EQ(codec->ErrorBoundL2(x), 0.0);
}

TEST_P(RoundTrip, Fp16MatchesReferenceAndBound) {
  const size_t n = GetParam();
  auto codec = MustCreate("fp16");
  const auto x = RandomNormal(n, 2, 100.0f);
  const auto buf = Encode(*codec, x);
  ASSERT_EQ(buf.size(), 32 + 2 * n);
  std::vector<float> d(n);
  ASSERT_TRUE(codec->Decompress(buf, d).ok());
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(d[i], ReferenceHalf(x[i])) << "x[" << i << "]=" << x[i];
#ifdef __FLT16_MAX__
    ASSERT_EQ(d[i], static_cast<float>(static_cast<_Float16>(x[i]))) << i;
#endif
  }
  EXPECT_LE(L2Diff(x, d), codec->ErrorBoundL2(x));
}

TEST_P(RoundTrip, OnebitIsPlusMinusScale) {
  const size_t n = GetParam();
  auto codec = MustCreate("onebit");
  const auto x = RandomNormal(n, 3);
  const auto buf = Encode(*codec, x);
  ASSERT_EQ(buf.size(), 32 + 4 + 4 * ((n + 31) / 32));
  EXPECT_EQ(buf.size(), codec->MaxCompressedBytes(n));
  std::vector<float> d(n);
  ASSERT_TRUE(codec->Decompress(buf, d).ok());

  double sum = 0;
  for (float v : x) sum += std::fabs(v);
  const float expected_scale = n == 0 ? 0.0f : static_cast<float>(sum / static_cast<double>(n));
  float scale;
  std::memcpy(&scale, buf.data() + 32, 4);
  EXPECT_NEAR(scale, expected_scale, 1e-6 * expected_scale);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(d[i], x[i] < 0 ? -scale : scale) << i;
  }
  EXPECT_LE(L2Diff(x, d), codec->ErrorBoundL2(x) * (1 + 1e-6));
  // The bound is the stated identity ||x||^2 - n*s^2 up to rounding of s.
  double norm2 = 0;
  for (float v : x) norm2 += static_cast<double>(v) * v;
  EXPECT_NEAR(codec->ErrorBoundL2(x), std::sqrt(std::max(0.0, norm2 - n * double{scale} * scale)),
              1e-3 * std::sqrt(norm2) + 1e-12);
}

TEST_P(RoundTrip, DecompressAccumulateAddsAlphaTimesDecode) {
  const size_t n = GetParam();
  for (const auto& name : testing::BuiltinCodecs()) {
    auto codec = MustCreate(name);
    const auto x = RandomNormal(n, 4);
    const auto buf = Encode(*codec, x);
    std::vector<float> d(n);
    ASSERT_TRUE(codec->Decompress(buf, d).ok());
    const auto base = RandomNormal(n, 5);
    for (float alpha : {1.0f, -1.0f, 0.25f, -3.5f}) {
      std::vector<float> acc = base;
      ASSERT_TRUE(codec->DecompressAccumulate(buf, acc, alpha).ok()) << name;
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(acc[i], base[i] + alpha * d[i]) << name << " " << i;
    }
  }
}

TEST_P(RoundTrip, CompressRejectsShortOutput) {
  const size_t n = GetParam();
  for (const auto& name : testing::BuiltinCodecs()) {
    auto codec = MustCreate(name);
    const auto x = RandomNormal(n, 6);
    std::vector<uint8_t> out(codec->MaxCompressedBytes(n) - 1);
    auto r = codec->Compress(x, out, CodecContext{});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, RoundTrip, ::testing::ValuesIn(kSizes));

TEST(Onebit, SpecialValues) {
  auto codec = MustCreate("onebit");
  const float inf = INFINITY, nan = NAN;
  const std::vector<float> x = {1.0f, -3.0f, -0.0f, 0.0f, inf, -inf, nan, -nan, 2.0f};
  const auto buf = Encode(*codec, x);
  std::vector<float> d(x.size());
  ASSERT_TRUE(codec->Decompress(buf, d).ok());
  // Finite |x|: 1, 3, 0, 0, 2 -> mean 1.2.
  const float s = static_cast<float>(6.0 / 5.0);
  const std::vector<float> expected = {s, -s, s, s, s, -s, s, s, s};
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(std::bit_cast<uint32_t>(d[i]), std::bit_cast<uint32_t>(expected[i])) << i;
  }
  EXPECT_TRUE(std::isinf(codec->ErrorBoundL2(x)));
  // All non-finite: scale 0.
  const std::vector<float> y = {nan, inf};
  std::vector<float> dy(2);
  ASSERT_TRUE(codec->Decompress(Encode(*codec, y), dy).ok());
  EXPECT_EQ(dy[0], 0.0f);
  EXPECT_EQ(dy[1], 0.0f);
}

TEST(Onebit, BitLayout) {
  auto codec = MustCreate("onebit");
  std::vector<float> x(40, 1.0f);
  x[0] = x[5] = x[31] = x[32] = x[39] = -1.0f;
  const auto buf = Encode(*codec, x);
  ASSERT_EQ(buf.size(), 32u + 4 + 8);
  float scale;
  std::memcpy(&scale, buf.data() + 32, 4);
  EXPECT_EQ(scale, 1.0f);
  const uint8_t* w = buf.data() + 36;
  const uint32_t w0 = w[0] | w[1] << 8 | w[2] << 16 | static_cast<uint32_t>(w[3]) << 24;
  const uint32_t w1 = w[4] | w[5] << 8 | w[6] << 16 | static_cast<uint32_t>(w[7]) << 24;
  EXPECT_EQ(w0, (1u << 0) | (1u << 5) | (1u << 31));
  EXPECT_EQ(w1, (1u << 0) | (1u << 7));
}

TEST(Fp16, BoundCoversTinyAndHugeValues) {
  auto codec = MustCreate("fp16");
  const std::vector<float> tiny = {1e-8f, -3e-8f, 6e-8f, 1e-5f, 0.0f};
  const auto buf = Encode(*codec, tiny);
  std::vector<float> d(tiny.size());
  ASSERT_TRUE(codec->Decompress(buf, d).ok());
  EXPECT_LE(L2Diff(tiny, d), codec->ErrorBoundL2(tiny));
  EXPECT_TRUE(std::isinf(codec->ErrorBoundL2(std::vector<float>{1.0f, 70000.0f})));
  EXPECT_TRUE(std::isinf(codec->ErrorBoundL2(std::vector<float>{NAN})));
  EXPECT_FALSE(std::isinf(codec->ErrorBoundL2(std::vector<float>{65504.0f, 65519.0f})));
}

}  // namespace
}  // namespace zipwire::kernels
