// Properties every codec must have, on random inputs of awkward sizes: the
// error stays within ErrorBoundL2, output fits MaxCompressedBytes, encoding is
// a pure function of (input, context), name() rebuilds the codec, and the
// randomised codecs actually depend on the step.
#include <gtest/gtest.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/codec.h"
#include "tests/kernels/test_util.h"

namespace zipwire::kernels {
namespace {

using testing::Ctx;
using testing::MustCreate;
using testing::RandomNormal;

const size_t kSizes[] = {0, 1, 7, 33, 1000, 4097, size_t{1} << 20};

double L2Diff(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    s += d * d;
  }
  return std::sqrt(s);
}

bool IsRandomised(const std::string& spec) {
  for (const char* p : {"randomk", "dithering", "terngrad", "topk_sampled"}) {
    if (spec.rfind(p, 0) == 0) return true;
  }
  return false;
}

class Property : public ::testing::TestWithParam<std::tuple<std::string, size_t>> {};

TEST_P(Property, WithinBoundDeterministicAndRebuildable) {
  const auto& [spec, n] = GetParam();
  auto codec = MustCreate(spec);
  ASSERT_NE(codec, nullptr) << spec;
  // Heavier tails than a normal for the sparsifiers to find.
  auto x = RandomNormal(n, static_cast<uint32_t>(n) + 1);
  for (size_t i = 0; i < n; i += 97) x[i] *= 30.0f;

  const auto buf = testing::Encode(*codec, x, Ctx(5));
  ASSERT_FALSE(buf.empty()) << spec;
  EXPECT_LE(buf.size(), codec->MaxCompressedBytes(n));
  std::vector<float> d(n, 123.0f);
  ASSERT_TRUE(codec->Decompress(buf, d).ok()) << spec;
  const double bound = codec->ErrorBoundL2(x);
  EXPECT_LE(L2Diff(x, d), bound) << spec << " n=" << n;
  if (spec == "none") {
    EXPECT_EQ(bound, 0.0);
  }

  // Same context: identical bytes, also from a codec rebuilt from name().
  EXPECT_EQ(testing::Encode(*codec, x, Ctx(5)), buf);
  auto rebuilt = MustCreate(codec->name());
  ASSERT_NE(rebuilt, nullptr) << codec->name();
  EXPECT_EQ(testing::Encode(*rebuilt, x, Ctx(5)), buf) << codec->name();
  // The shared default decoder for the id decodes it too (self-describing).
  auto by_id = CodecForId(codec->id());
  ASSERT_TRUE(by_id.ok());
  std::vector<float> d2(n);
  ASSERT_TRUE((*by_id)->Decompress(buf, d2).ok()) << spec;
  if (n > 0) {
    EXPECT_EQ(0, std::memcmp(d.data(), d2.data(), n * sizeof(float)));
  }

  // The randomised codecs draw differently at another step.
  if (IsRandomised(spec) && n >= 1000 && spec.rfind("topk_sampled", 0) != 0) {
    EXPECT_NE(testing::Encode(*codec, x, Ctx(6)), buf) << spec;
  }
}

std::string Name(const ::testing::TestParamInfo<Property::ParamType>& info) {
  std::string s = std::get<0>(info.param) + "_" + std::to_string(std::get<1>(info.param));
  for (char& c : s) {
    if (!isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return s;
}

INSTANTIATE_TEST_SUITE_P(Codecs, Property,
                         ::testing::Combine(::testing::ValuesIn(testing::BuiltinCodecs()),
                                            ::testing::ValuesIn(kSizes)),
                         Name);

// One 64 MiB chunk (16M floats) through the two codecs the acceptance numbers
// are about; a few seconds in an optimised build.
TEST(PropertyLarge, SixtyFourMebibytes) {
  const size_t n = size_t{16} << 20;
  auto x = RandomNormal(n, 99);
  for (const char* spec : {"topk:0.01", "dithering:s=16"}) {
    auto codec = MustCreate(spec);
    const auto t0 = std::chrono::steady_clock::now();
    const auto buf = testing::Encode(*codec, x, Ctx(1));
    const auto t1 = std::chrono::steady_clock::now();
    ASSERT_FALSE(buf.empty());
    std::vector<float> d(n);
    ASSERT_TRUE(codec->Decompress(buf, d).ok());
    EXPECT_LE(L2Diff(x, d), codec->ErrorBoundL2(x)) << spec;
    std::printf("  %s: 64 MiB encoded to %zu bytes in %.1f ms\n", spec, buf.size(),
                std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
}

}  // namespace
}  // namespace zipwire::kernels
