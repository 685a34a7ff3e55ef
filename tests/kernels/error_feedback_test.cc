// Error feedback: the residual recurrence, key separation and the
// telescoping sum (what was sent plus what is kept equals what came in).
#include "kernels/error_feedback.h"

#include <gtest/gtest.h>

#include <bit>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "tests/kernels/test_util.h"

namespace zipwire::kernels {
namespace {

using testing::BitDiff;

using testing::RandomNormal;

std::shared_ptr<const Codec> Shared(const std::string& name) { return testing::MustCreate(name); }

class ErrorFeedbackTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ErrorFeedbackTest, ResidualIsInputPlusOldResidualMinusDecoded) {
  ErrorFeedback ef(Shared(GetParam()));
  const Codec& codec = ef.codec();
  const ResidualKey a{7, 0}, b{7, 1};
  const size_t n = 1000;
  std::vector<float> expect_a(n, 0.0f), expect_b(n, 0.0f);
  std::vector<uint8_t> out(codec.MaxCompressedBytes(n));
  EXPECT_TRUE(ef.Residual(a).empty());
  for (int step = 0; step < 6; ++step) {
    for (auto [key, expect] : {std::pair{a, &expect_a}, std::pair{b, &expect_b}}) {
      const auto x = RandomNormal(n, 100 + step * 2 + key.chunk_index, 1.0f + step);
      auto written = ef.Compress(key, x, out, CodecContext{});
      ASSERT_TRUE(written.ok()) << written.status().ToString();
      std::vector<float> d(n);
      ASSERT_TRUE(codec.Decompress(std::span(out).first(*written), d).ok());
      // What the encoder saw: x + e, in float, in that order.
      std::vector<float> seen(n);
      for (size_t i = 0; i < n; ++i) seen[i] = x[i] + (*expect)[i];
      // The payload must be the codec's encoding of x + e.
      const auto direct = testing::Encode(codec, seen);
      ASSERT_EQ(direct, std::vector<uint8_t>(out.begin(), out.begin() + *written));
      for (size_t i = 0; i < n; ++i) (*expect)[i] = seen[i] - d[i];
      const auto r = ef.Residual(key);
      ASSERT_EQ(r.size(), n);
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(r[i], (*expect)[i]) << "step " << step << " i " << i;
    }
  }
  ef.Reset();
  EXPECT_TRUE(ef.Residual(a).empty());
}

// Fused codecs may keep the residual in a deferred form between steps and
// materialise it only when read: the payloads of steps that never read it, and
// the residual read at the end, must still be exactly the three-pass result
// (e += x; p = Compress(e); e += -1 * decode(p)), over several segments of
// the canonical sum, with and without non-finite inputs.
TEST_P(ErrorFeedbackTest, FusedPathEqualsThreePassesWithoutIntermediateReads) {
  const std::string spec = GetParam();
  auto codec = Shared(spec);
  ErrorFeedback ef(codec);
  for (size_t n : {size_t{0}, size_t{31}, size_t{3 * 8192 + 77}}) {
    const ResidualKey key{11, static_cast<uint32_t>(n)};
    std::vector<float> expect(n, 0.0f);
    std::vector<uint8_t> out(codec->MaxCompressedBytes(n));
    for (int step = 0; step < 5; ++step) {
      auto x = RandomNormal(n, 900 + step, 1.0f + step);
      // Step 3 carries a NaN and infinities where the codec accepts them
      // (dithering rejects non-finite input; its error path is tested below).
      if (step == 3 && n > 20 && spec.rfind("dithering", 0) != 0) {
        x[3] = std::numeric_limits<float>::quiet_NaN();
        x[7] = std::numeric_limits<float>::infinity();
        x[n - 1] = -std::numeric_limits<float>::infinity();
      }
      for (size_t i = 0; i < n; ++i) expect[i] += x[i];
      std::vector<uint8_t> direct(codec->MaxCompressedBytes(n));
      auto want = codec->Compress(expect, direct, testing::Ctx(step));
      auto written = ef.Compress(key, x, out, testing::Ctx(step));
      ASSERT_EQ(want.ok(), written.ok()) << spec << " step " << step;
      if (!want.ok()) break;
      ASSERT_EQ(std::vector<uint8_t>(out.begin(), out.begin() + static_cast<ptrdiff_t>(*written)),
                std::vector<uint8_t>(direct.begin(), direct.begin() + static_cast<ptrdiff_t>(*want)))
          << spec << " n " << n << " step " << step;
      ASSERT_TRUE(codec->DecompressAccumulate(std::span(direct).first(*want), expect, -1.0f).ok());
    }
    const auto r = ef.Residual(key);
    ASSERT_EQ(r.size(), n);
    ASSERT_EQ(0u, BitDiff(r, expect, n)) << spec << " n " << n;
  }
}

// A chunk a codec rejects (dithering: non-finite input) fails the call; the
// next call with good input still continues from a consistent residual.
TEST_P(ErrorFeedbackTest, RejectedInputThenGoodInput) {
  auto codec = Shared(GetParam());
  ErrorFeedback ef(codec);
  const size_t n = 8192 + 100;
  const ResidualKey key{12, 0};
  std::vector<uint8_t> out(codec->MaxCompressedBytes(n));
  ASSERT_TRUE(ef.Compress(key, RandomNormal(n, 1), out, testing::Ctx(0)).ok());
  auto bad = RandomNormal(n, 2);
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  (void)ef.Compress(key, bad, out, testing::Ctx(1));
  const std::vector<float> before(ef.Residual(key).begin(), ef.Residual(key).end());
  const auto x = RandomNormal(n, 3);
  auto written = ef.Compress(key, x, out, testing::Ctx(2));
  std::vector<float> seen(n);
  for (size_t i = 0; i < n; ++i) seen[i] = before[i] + x[i];
  std::vector<uint8_t> direct(codec->MaxCompressedBytes(n));
  auto want = codec->Compress(seen, direct, testing::Ctx(2));
  ASSERT_EQ(want.ok(), written.ok());
  if (!want.ok()) return;
  EXPECT_EQ(std::vector<uint8_t>(out.begin(), out.begin() + static_cast<ptrdiff_t>(*written)),
            std::vector<uint8_t>(direct.begin(), direct.begin() + static_cast<ptrdiff_t>(*want)));
}

TEST_P(ErrorFeedbackTest, SentPlusResidualEqualsInputs) {
  ErrorFeedback ef(Shared(GetParam()));
  const size_t n = 4097;
  const ResidualKey key{1, 3};
  std::vector<double> sum_in(n, 0.0), sum_sent(n, 0.0);
  std::vector<uint8_t> out(ef.codec().MaxCompressedBytes(n));
  std::vector<float> d(n);
  double scale = 0;
  for (int t = 0; t < 20; ++t) {
    const auto x = RandomNormal(n, 200 + t);
    auto written = ef.Compress(key, x, out, CodecContext{});
    ASSERT_TRUE(written.ok());
    ASSERT_TRUE(ef.codec().Decompress(std::span(out).first(*written), d).ok());
    for (size_t i = 0; i < n; ++i) {
      sum_in[i] += x[i];
      sum_sent[i] += d[i];
      scale = std::max(scale, std::fabs(sum_in[i]));
    }
  }
  const auto r = ef.Residual(key);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(sum_sent[i] + r[i], sum_in[i], 1e-4 * (1 + scale)) << i;
  }
}

TEST_P(ErrorFeedbackTest, SizeMismatchAndShortOutput) {
  ErrorFeedback ef(Shared(GetParam()));
  const ResidualKey key{2, 0};
  std::vector<uint8_t> out(ef.codec().MaxCompressedBytes(100));
  ASSERT_TRUE(ef.Reserve(key, 64).ok());
  EXPECT_EQ(ef.Residual(key).size(), 64u);
  for (float v : ef.Residual(key)) EXPECT_EQ(v, 0.0f);
  const auto x = RandomNormal(100, 300);
  auto r = ef.Compress(key, x, out, CodecContext{});
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ef.Reserve(key, 65).code(), StatusCode::kInvalidArgument);
  // A short output buffer fails before the residual changes.
  const ResidualKey other{2, 1};
  const auto y = RandomNormal(64, 301);
  ASSERT_TRUE(ef.Compress(other, y, out, CodecContext{}).ok());
  const std::vector<float> before(ef.Residual(other).begin(), ef.Residual(other).end());
  std::vector<uint8_t> small(ef.codec().MaxCompressedBytes(64) - 1);
  EXPECT_EQ(ef.Compress(other, y, small, CodecContext{}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(std::vector<float>(ef.Residual(other).begin(), ef.Residual(other).end()), before);
}

TEST_P(ErrorFeedbackTest, EmptyChunk) {
  ErrorFeedback ef(Shared(GetParam()));
  std::vector<uint8_t> out(ef.codec().MaxCompressedBytes(0));
  auto r = ef.Compress({9, 9}, std::span<const float>(), out, CodecContext{});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, out.size());
}

TEST_P(ErrorFeedbackTest, KeysFromManyThreads) {
  ErrorFeedback ef(Shared(GetParam()));
  const size_t n = 512;
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([&ef, t] {
      std::vector<uint8_t> out(ef.codec().MaxCompressedBytes(n));
      for (int step = 0; step < 50; ++step) {
        const auto x = RandomNormal(n, 400 + t);
        EXPECT_TRUE(ef.Compress({t, static_cast<uint32_t>(step % 3)}, x, out, CodecContext{}).ok());
      }
    });
  }
  for (auto& th : threads) th.join();
  for (uint32_t t = 0; t < 4; ++t) EXPECT_EQ(ef.Residual({t, 2}).size(), n);
}

INSTANTIATE_TEST_SUITE_P(Codecs, ErrorFeedbackTest, ::testing::ValuesIn(testing::BuiltinCodecs()));

}  // namespace
}  // namespace zipwire::kernels
