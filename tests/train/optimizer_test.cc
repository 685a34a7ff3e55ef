#include "ps/train/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace zipwire::train {
namespace {

TEST(OptimizerTest, AdamMatchesHandComputation) {
  Optimizer opt(OptimizerConfig::Adam(0.01f), {3});
  std::vector<float> x = {1.0f, -2.0f, 0.5f};
  const std::vector<std::vector<float>> grads = {{0.5f, -1.0f, 0.0f}, {-0.25f, 2.0f, 1e-3f}};
  std::vector<double> ex = {1.0, -2.0, 0.5}, m(3, 0.0), v(3, 0.0);
  for (size_t t = 1; t <= grads.size(); ++t) {
    ASSERT_TRUE(opt.Step(0, x, grads[t - 1]).ok());
    for (size_t i = 0; i < 3; ++i) {
      const double g = grads[t - 1][i];
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.999 * v[i] + 0.001 * g * g;
      const double mhat = m[i] / (1 - std::pow(0.9, t));
      const double vhat = v[i] / (1 - std::pow(0.999, t));
      ex[i] -= 0.01 * mhat / (std::sqrt(vhat) + 1e-8);
      EXPECT_NEAR(x[i], ex[i], 1e-6) << "step " << t << " element " << i;
    }
  }
  EXPECT_EQ(opt.steps(0), 2u);
}

TEST(OptimizerTest, AmsGradMatchesReferenceFormula) {
  // algorithms.md: m = b1 m + (1-b1) u; v = b2 v + (1-b2) u^2; vhat = max(vhat, v);
  // x -= lr * m / (sqrt(vhat) + eps).
  Optimizer opt(OptimizerConfig::AmsGrad(0.1f), {2});
  std::vector<float> x = {0.0f, 0.0f};
  const std::vector<std::vector<float>> grads = {{1.0f, -3.0f}, {0.1f, 0.2f}, {-0.5f, 0.0f}};
  std::vector<double> ex(2, 0.0), m(2, 0.0), v(2, 0.0), vh(2, 0.0);
  for (const auto& g : grads) {
    ASSERT_TRUE(opt.Step(0, x, g).ok());
    for (size_t i = 0; i < 2; ++i) {
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
      vh[i] = std::max(vh[i], v[i]);
      ex[i] -= 0.1 * m[i] / (std::sqrt(vh[i]) + 1e-8);
      EXPECT_NEAR(x[i], ex[i], 1e-4 * std::max(1.0, std::abs(ex[i])));
      // 1 - 0.999f is only float-accurate (about 1e-5 relative).
      EXPECT_NEAR(opt.vhat(0)[i], vh[i], 1e-4 * vh[i]);
    }
  }
}

TEST(OptimizerTest, AmsGradVhatIsMonotone) {
  Optimizer opt(OptimizerConfig::AmsGrad(1e-3f), {64});
  std::vector<float> x(64, 0.0f), g(64);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  std::vector<float> prev(64, 0.0f);
  for (int step = 0; step < 200; ++step) {
    // Large gradients first, then small ones: v decays, vhat must not.
    const float scale = step < 20 ? 10.0f : 0.01f;
    for (float& e : g) e = scale * normal(gen);
    ASSERT_TRUE(opt.Step(0, x, g).ok());
    for (size_t i = 0; i < 64; ++i) {
      ASSERT_GE(opt.vhat(0)[i], prev[i]) << "step " << step;
      ASSERT_GE(opt.vhat(0)[i], opt.v(0)[i]);
      prev[i] = opt.vhat(0)[i];
    }
  }
  // v itself did decay, so the max is doing something.
  EXPECT_LT(opt.v(0)[0], opt.vhat(0)[0]);
}

TEST(OptimizerTest, TensorsHaveIndependentState) {
  Optimizer opt(OptimizerConfig::Adam(0.1f), {1, 1});
  std::vector<float> a = {0.0f}, b = {0.0f};
  const std::vector<float> g = {1.0f};
  ASSERT_TRUE(opt.Step(0, a, g).ok());
  ASSERT_TRUE(opt.Step(0, a, g).ok());
  ASSERT_TRUE(opt.Step(1, b, g).ok());
  EXPECT_EQ(opt.steps(0), 2u);
  EXPECT_EQ(opt.steps(1), 1u);
  EXPECT_NEAR(b[0], -0.1f, 1e-6);  // first bias-corrected step is exactly lr
}

TEST(OptimizerTest, DeterministicAcrossInstances) {
  for (auto config : {OptimizerConfig::Adam(1e-3f), OptimizerConfig::AmsGrad(1e-3f)}) {
    Optimizer a(config, {1000}), b(config, {1000});
    std::vector<float> xa(1000, 0.5f), xb(1000, 0.5f), g(1000);
    std::mt19937 gen(3);
    std::normal_distribution<float> normal;
    for (int step = 0; step < 20; ++step) {
      for (float& e : g) e = normal(gen);
      ASSERT_TRUE(a.Step(0, xa, g).ok());
      ASSERT_TRUE(b.Step(0, xb, g).ok());
    }
    EXPECT_EQ(xa, xb);
  }
}

TEST(OptimizerTest, InvalidArgumentsAreErrors) {
  Optimizer opt(OptimizerConfig::Adam(1e-3f), {4});
  std::vector<float> x(4, 1.0f), g(4, 1.0f), short_g(3, 1.0f);
  EXPECT_EQ(opt.Step(1, x, g).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(opt.Step(0, x, short_g).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(opt.steps(0), 0u);
  EXPECT_EQ(x, std::vector<float>(4, 1.0f));
  opt.set_lr(-1e-3f);
  EXPECT_EQ(opt.Step(0, x, g).code(), StatusCode::kInvalidArgument);
  opt.set_lr(std::nanf(""));
  EXPECT_EQ(opt.Step(0, x, g).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(opt.steps(0), 0u);
  EXPECT_EQ(x, std::vector<float>(4, 1.0f));
}

TEST(LrScheduleTest, ConstantAndCosine) {
  LrSchedule constant{LrSchedule::Kind::kConstant, 1e-3f, 100};
  EXPECT_EQ(constant.At(0), 1e-3f);
  EXPECT_EQ(constant.At(1000), 1e-3f);
  LrSchedule cosine{LrSchedule::Kind::kCosine, 1e-3f, 100};
  EXPECT_FLOAT_EQ(cosine.At(0), 1e-3f);
  EXPECT_NEAR(cosine.At(50), 5e-4f, 1e-9);
  EXPECT_GT(cosine.At(99), 0.0f);
  EXPECT_EQ(cosine.At(100), 0.0f);
  EXPECT_EQ(cosine.At(1000), 0.0f);  // clamped past the end, never negative
  for (uint64_t s = 1; s <= 100; ++s) EXPECT_LE(cosine.At(s), cosine.At(s - 1));
}

}  // namespace
}  // namespace zipwire::train
