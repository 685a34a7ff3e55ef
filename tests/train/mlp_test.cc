#include "ps/train/mlp.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "ps/train/optimizer.h"

namespace zipwire::train {
namespace {

struct Batch {
  std::vector<float> x;
  std::vector<uint8_t> y;
};

Batch RandomBatch(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Batch b;
  b.x.resize(n * kImagePixels);
  for (float& v : b.x) v = normal(gen);
  for (size_t i = 0; i < n; ++i) b.y.push_back(static_cast<uint8_t>(gen() % kNumClasses));
  return b;
}

TEST(MlpTest, ShapesAndNames) {
  Mlp mlp(1);
  ASSERT_EQ(mlp.num_tensors(), 6u);
  const size_t sizes[] = {784 * 512, 512, 512 * 256, 256, 256 * 10, 10};
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(mlp.param(i).size(), sizes[i]) << i;
    EXPECT_EQ(mlp.grad(i).size(), sizes[i]) << i;
  }
  EXPECT_EQ(mlp.num_params(), std::accumulate(std::begin(sizes), std::end(sizes), size_t{0}));
  EXPECT_STREQ(mlp.tensor_name(0), "fc1.weight");
  EXPECT_STREQ(mlp.tensor_name(5), "fc3.bias");
}

TEST(MlpTest, HeInitialisation) {
  Mlp mlp(7);
  for (size_t l = 0; l < 3; ++l) {
    auto w = mlp.param(2 * l);
    double sum = 0, sq = 0;
    for (float v : w) {
      sum += v;
      sq += double{v} * v;
    }
    const double mean = sum / w.size();
    const double stddev = std::sqrt(sq / w.size() - mean * mean);
    const double expected = std::sqrt(2.0 / Mlp::kWidths[l]);
    EXPECT_NEAR(stddev, expected, 0.05 * expected) << "layer " << l;
    EXPECT_NEAR(mean, 0.0, 0.05 * expected) << "layer " << l;
    for (float b : mlp.param(2 * l + 1)) EXPECT_EQ(b, 0.0f);
  }
}

TEST(MlpTest, SameSeedGivesIdenticalParameters) {
  Mlp a(42), b(42), c(43);
  bool any_differs = false;
  for (size_t i = 0; i < a.num_tensors(); ++i) {
    auto pa = a.param(i), pb = b.param(i), pc = c.param(i);
    ASSERT_TRUE(std::equal(pa.begin(), pa.end(), pb.begin())) << a.tensor_name(i);
    any_differs |= !std::equal(pa.begin(), pa.end(), pc.begin());
  }
  EXPECT_TRUE(any_differs);
}

// Central differences on a tiny batch; checks the largest-gradient coordinates of every tensor (those
// are well above float rounding noise in the loss) plus a few random ones with non-negligible gradient.
TEST(MlpTest, GradientMatchesFiniteDifferences) {
  Mlp mlp(3, 4);
  // Non-zero biases so their gradients are exercised through a generic point, not only the init.
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(-0.1f, 0.1f);
  for (size_t l = 0; l < 3; ++l) {
    for (float& b : mlp.param(2 * l + 1)) b = u(gen);
  }
  const Batch batch = RandomBatch(4, 11);
  mlp.ForwardBackward(batch.x.data(), batch.y.data(), 4);
  std::vector<std::vector<float>> analytic;
  for (size_t t = 0; t < mlp.num_tensors(); ++t) {
    analytic.emplace_back(mlp.grad(t).begin(), mlp.grad(t).end());
  }
  const float h = 1e-3f;
  for (size_t t = 0; t < mlp.num_tensors(); ++t) {
    const std::vector<float>& g = analytic[t];
    std::vector<size_t> idx(g.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + 4, idx.end(),
                      [&](size_t a, size_t b) { return std::abs(g[a]) > std::abs(g[b]); });
    std::vector<size_t> check(idx.begin(), idx.begin() + 4);
    for (size_t tries = 0; tries < 1000 && check.size() < 8; ++tries) {
      const size_t i = gen() % g.size();
      if (std::abs(g[i]) > 2e-2f) check.push_back(i);
    }
    ASSERT_GE(check.size(), 4u);
    for (size_t i : check) {
      float& p = mlp.param(t)[i];
      const float saved = p;
      p = saved + h;
      const double up = mlp.Loss(batch.x.data(), batch.y.data(), 4);
      p = saved - h;
      const double down = mlp.Loss(batch.x.data(), batch.y.data(), 4);
      p = saved;
      const double numeric = (up - down) / (2.0 * h);
      const double rel = std::abs(numeric - g[i]) / std::max(std::abs(numeric), std::abs(double{g[i]}));
      EXPECT_LT(rel, 1e-2) << mlp.tensor_name(t) << "[" << i << "] analytic " << g[i] << " numeric "
                           << numeric;
    }
  }
}

TEST(MlpTest, LossDecreasesOnFixedBatchWithAdam) {
  Mlp mlp(9, 32);
  const Batch batch = RandomBatch(32, 13);
  std::vector<size_t> sizes;
  for (size_t t = 0; t < mlp.num_tensors(); ++t) sizes.push_back(mlp.param(t).size());
  Optimizer opt(OptimizerConfig::Adam(1e-3f), sizes);
  const float first = mlp.ForwardBackward(batch.x.data(), batch.y.data(), 32);
  EXPECT_NEAR(first, std::log(10.0f), 1.5f);  // roughly uniform predictions at init
  float last = first;
  for (int step = 0; step < 30; ++step) {
    for (size_t t = 0; t < mlp.num_tensors(); ++t) ASSERT_TRUE(opt.Step(t, mlp.param(t), mlp.grad(t)).ok());
    last = mlp.ForwardBackward(batch.x.data(), batch.y.data(), 32);
  }
  EXPECT_LT(last, 0.1f * first) << "first " << first << " last " << last;
}

TEST(MlpTest, BadLabelsAndEmptyBatch) {
  Mlp mlp(1, 2);
  Batch batch = RandomBatch(2, 1);
  batch.y[1] = 10;
  EXPECT_TRUE(std::isnan(mlp.ForwardBackward(batch.x.data(), batch.y.data(), 2)));
  for (size_t t = 0; t < mlp.num_tensors(); ++t) {
    for (float g : mlp.grad(t)) ASSERT_EQ(g, 0.0f);
  }
  EXPECT_TRUE(std::isnan(mlp.Loss(batch.x.data(), batch.y.data(), 2)));
  EXPECT_EQ(mlp.ForwardBackward(batch.x.data(), batch.y.data(), 0), 0.0f);
}

TEST(MlpTest, BatchLargerThanPreallocatedGrows) {
  Mlp small(4, 2), big(4, 16);
  const Batch batch = RandomBatch(16, 2);
  EXPECT_EQ(small.ForwardBackward(batch.x.data(), batch.y.data(), 16),
            big.ForwardBackward(batch.x.data(), batch.y.data(), 16));
}

TEST(MlpTest, EvaluateCountsArgmax) {
  Mlp mlp(5, 8);
  Dataset ds;
  const Batch batch = RandomBatch(10, 3);
  ds.count = 10;
  ds.images = batch.x;
  ds.labels = batch.y;
  const float acc = mlp.Evaluate(ds, 3);  // batch not dividing the count
  EXPECT_GE(acc, 0.0f);
  EXPECT_LE(acc, 1.0f);
  EXPECT_FLOAT_EQ(acc * 10.0f, std::round(acc * 10.0f));
  EXPECT_EQ(mlp.Evaluate(ds, 1000), acc);
}

}  // namespace
}  // namespace zipwire::train
