// A short single-process training run on real Fashion-MNIST: the pieces work together.
#include <cblas.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <numeric>
#include <random>

#include "ps/train/idx_dataset.h"
#include "ps/train/mlp.h"
#include "ps/train/optimizer.h"

namespace zipwire::train {
namespace {

TEST(TrainingTest, FewHundredStepsBeatChanceClearly) {
  if (!std::filesystem::exists(std::string(kDefaultFashionMnistDir) + "/train-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << "Fashion-MNIST not installed at " << kDefaultFashionMnistDir
                 << "; install the Debian package dataset-fashion-mnist (scripts/install-deps.sh)";
  }
  openblas_set_num_threads(1);  // the machine is shared; one core is plenty for this size
  auto train = LoadFashionMnist(kDefaultFashionMnistDir, Split::kTrain);
  ASSERT_TRUE(train.ok()) << train.status().ToString();
  auto test = LoadFashionMnist(kDefaultFashionMnistDir, Split::kTest);
  ASSERT_TRUE(test.ok()) << test.status().ToString();

  constexpr size_t kBatch = 64;
  constexpr size_t kSteps = 300;
  Mlp mlp(1234, kBatch);
  std::vector<size_t> sizes;
  for (size_t t = 0; t < mlp.num_tensors(); ++t) sizes.push_back(mlp.param(t).size());
  Optimizer opt(OptimizerConfig::Adam(1e-3f), sizes);

  std::vector<uint32_t> order(train->count);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(1));
  std::vector<float> x(kBatch * kImagePixels);
  std::vector<uint8_t> y(kBatch);
  const auto start = std::chrono::steady_clock::now();
  for (size_t step = 0; step < kSteps; ++step) {
    for (size_t r = 0; r < kBatch; ++r) {
      const uint32_t i = order[step * kBatch + r];
      std::copy(train->image(i), train->image(i) + kImagePixels, x.data() + r * kImagePixels);
      y[r] = train->labels[i];
    }
    const float loss = mlp.ForwardBackward(x.data(), y.data(), kBatch);
    ASSERT_TRUE(std::isfinite(loss)) << "step " << step;
    for (size_t t = 0; t < mlp.num_tensors(); ++t) ASSERT_TRUE(opt.Step(t, mlp.param(t), mlp.grad(t)).ok());
  }
  const float acc = mlp.Evaluate(*test);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("300 steps x 64: test accuracy %.4f in %.2f s\n", acc, secs);
  EXPECT_GE(acc, 0.75f);
}

}  // namespace
}  // namespace zipwire::train
