// The scalar fp16 conversion against the F16C instructions: identical bytes.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/codec_internal.h"

namespace zipwire::kernels::internal {
namespace {

// Converts `bits` (float bit patterns) both ways and compares byte for byte.
void CompareFloatToHalf(const std::vector<uint32_t>& bits) {
  std::vector<float> in(bits.size());
  std::memcpy(in.data(), bits.data(), bits.size() * 4);
  std::vector<uint8_t> scalar(2 * in.size()), hw(2 * in.size());
  FloatToHalfScalar(in.data(), scalar.data(), in.size());
  FloatToHalfF16c(in.data(), hw.data(), in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (scalar[2 * i] != hw[2 * i] || scalar[2 * i + 1] != hw[2 * i + 1]) {
      FAIL() << std::hex << "float bits 0x" << bits[i] << ": scalar 0x"
             << (scalar[2 * i + 1] << 8 | scalar[2 * i]) << " f16c 0x" << (hw[2 * i + 1] << 8 | hw[2 * i]);
    }
  }
}

TEST(Fp16Convert, ScalarMatchesF16cOnSweep) {
  if (!HasF16c()) GTEST_SKIP() << "CPU has no F16C";
  std::vector<uint32_t> bits;
  // A sweep over every exponent and sign, ...
  for (uint64_t b = 0; b <= 0xffffffffull; b += 251) bits.push_back(static_cast<uint32_t>(b));
  CompareFloatToHalf(bits);
  bits.clear();
  // ... every exact tie and its neighbours at every exponent, ...
  for (uint32_t hi = 0; hi < (1u << 19); ++hi) {
    for (uint32_t lo : {0x0fffu, 0x1000u, 0x1001u, 0x0000u, 0x1fffu}) bits.push_back(hi << 13 | lo);
  }
  CompareFloatToHalf(bits);
  bits.clear();
  // ... and dense windows around the overflow, normal/subnormal and zero edges,
  // and through NaN payloads.
  for (uint32_t centre : {0x477fe000u, 0x477ff000u, 0x38800000u, 0x38000000u, 0x33000000u, 0x33800000u,
                          0x7f800000u, 0x7fc00000u, 0x00000000u}) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      for (uint32_t d = 0; d < (1u << 16); ++d)
        bits.push_back(sign | ((centre - (1u << 15) + d) & 0x7fffffffu));
    }
  }
  CompareFloatToHalf(bits);
}

TEST(Fp16Convert, OddLengthsAndUnalignedBuffers) {
  if (!HasF16c()) GTEST_SKIP() << "CPU has no F16C";
  for (size_t n : {0, 1, 7, 8, 9, 15, 17, 100}) {
    std::vector<float> in(n);
    for (size_t i = 0; i < n; ++i) in[i] = static_cast<float>(i) * 0.37f - 11.0f;
    std::vector<uint8_t> scalar(2 * n + 1), hw(2 * n + 1, 0xcc);
    FloatToHalfScalar(in.data(), scalar.data() + 1, n);
    FloatToHalfF16c(in.data(), hw.data() + 1, n);
    EXPECT_EQ(std::vector<uint8_t>(scalar.begin() + 1, scalar.end()),
              std::vector<uint8_t>(hw.begin() + 1, hw.end()));
    EXPECT_EQ(hw[0], 0xcc);
    std::vector<float> back_scalar(n), back_hw(n);
    HalfToFloatScalar(hw.data() + 1, back_scalar.data(), n);
    HalfToFloatF16c(hw.data() + 1, back_hw.data(), n);
    EXPECT_EQ(back_scalar, back_hw);  // finite values only, so == is bitwise
  }
}

TEST(Fp16Convert, HalfToFloatExhaustive) {
  std::vector<uint8_t> all(2 * 65536);
  for (uint32_t h = 0; h < 65536; ++h) {
    all[2 * h] = static_cast<uint8_t>(h);
    all[2 * h + 1] = static_cast<uint8_t>(h >> 8);
  }
  std::vector<float> scalar(65536), hw(65536);
  HalfToFloatScalar(all.data(), scalar.data(), 65536);
  for (uint32_t h = 0; h < 65536; ++h) {
    // Every half is exact in float and converts back to itself, except that
    // a signalling NaN comes back quiet (both conversions quiet NaNs).
    const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    const bool snan = exp == 31 && mant != 0 && (mant & 0x200) == 0;
    ASSERT_EQ(FloatToHalfScalar(scalar[h]), snan ? (h | 0x200) : h) << std::hex << h;
    if (exp != 31) {
      const double mag =
          exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, static_cast<int>(exp) - 25);
      ASSERT_EQ(static_cast<double>(scalar[h]), (h & 0x8000) ? -mag : mag) << std::hex << h;
    }
  }
  if (HasF16c()) {
    HalfToFloatF16c(all.data(), hw.data(), 65536);
    EXPECT_EQ(std::memcmp(scalar.data(), hw.data(), hw.size() * 4), 0);
  }
}

TEST(Fp16Convert, KnownValues) {
  EXPECT_EQ(FloatToHalfScalar(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalfScalar(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalfScalar(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalfScalar(65519.99f), 0x7bff);
  EXPECT_EQ(FloatToHalfScalar(65520.0f), 0x7c00);
  EXPECT_EQ(FloatToHalfScalar(-1e9f), 0xfc00);
  EXPECT_EQ(FloatToHalfScalar(INFINITY), 0x7c00);
  EXPECT_EQ(FloatToHalfScalar(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalfScalar(0x1p-24f), 0x0001);
  EXPECT_EQ(FloatToHalfScalar(0x1p-25f), 0x0000);           // tie to even (0)
  EXPECT_EQ(FloatToHalfScalar(0x1.8p-24f), 0x0002);         // 1.5 ulp: tie to even (2)
  EXPECT_EQ(FloatToHalfScalar(0x1.000002p-25f), 0x0001);    // just above the tie
  EXPECT_EQ(FloatToHalfScalar(0x1p-14f), 0x0400);           // smallest normal
  EXPECT_EQ(FloatToHalfScalar(1.0f + 0x1p-11f), 0x3c00);    // tie to even
  EXPECT_EQ(FloatToHalfScalar(1.0f + 0x1.8p-10f), 0x3c02);  // tie rounds up to even
  EXPECT_EQ(FloatToHalfScalar(1e-40f), 0x0000);             // float subnormal
  EXPECT_EQ(FloatToHalfScalar(NAN) & 0x7e00, 0x7e00);
}

}  // namespace
}  // namespace zipwire::kernels::internal
