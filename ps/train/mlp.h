// The demo model: a 784-512-256-10 ReLU MLP with softmax cross-entropy, dense layers on cblas_sgemm.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "ps/train/idx_dataset.h"

namespace zipwire::train {

class Mlp {
 public:
  static constexpr size_t kNumLayers = 3;
  static constexpr size_t kNumTensors = 2 * kNumLayers;  // W1, b1, W2, b2, W3, b3
  static constexpr std::array<size_t, kNumLayers + 1> kWidths = {kImagePixels, 512, 256, kNumClasses};

  // He-normal weights and zero biases from std::mt19937 seeded with `seed`: the same seed gives a
  // bit-identical model on every worker. Activations are preallocated for `max_batch` rows; a larger
  // batch grows them once.
  explicit Mlp(uint64_t seed, size_t max_batch = 1000);

  size_t num_tensors() const { return kNumTensors; }
  size_t num_params() const;
  // Tensor 2l is the weight of layer l, stored [in, out] row-major; tensor 2l+1 is its bias [out].
  std::span<float> param(size_t i) { return params_.at(i); }
  std::span<const float> param(size_t i) const { return params_.at(i); }
  std::span<float> grad(size_t i) { return grads_.at(i); }
  std::span<const float> grad(size_t i) const { return grads_.at(i); }
  const char* tensor_name(size_t i) const;

  // x: batch * 784 floats, y: batch labels (< 10). Returns the mean loss and overwrites every grad(i)
  // with the gradient of that mean loss. A label >= 10 gives NaN and zero gradients (no out-of-bounds
  // write); an empty batch gives 0 and zero gradients.
  float ForwardBackward(const float* x, const uint8_t* y, size_t batch);
  // Mean loss only; gradients untouched.
  float Loss(const float* x, const uint8_t* y, size_t batch);
  // Fraction of `ds` classified correctly, evaluated `batch` rows at a time.
  float Evaluate(const Dataset& ds, size_t batch = 1000);

 private:
  void EnsureCapacity(size_t batch);
  // Fills act_[1..3] (post-ReLU hidden layers, then softmax probabilities) for `batch` rows of x.
  void Forward(const float* x, size_t batch);
  static bool LabelsValid(const uint8_t* y, size_t batch);
  // Mean cross-entropy of the probabilities in act_[3].
  float MeanLoss(const uint8_t* y, size_t batch) const;

  std::array<std::vector<float>, kNumTensors> params_;
  std::array<std::vector<float>, kNumTensors> grads_;
  size_t capacity_ = 0;
  // act_[l] for l = 1..3 is the output of layer l; act_[0] is unused (the input is the caller's).
  std::array<std::vector<float>, kNumLayers + 1> act_;
  // delta_[l]: gradient of the loss w.r.t. layer l's pre-activation output.
  std::array<std::vector<float>, kNumLayers + 1> delta_;
};

}  // namespace zipwire::train
