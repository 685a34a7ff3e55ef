#include "ps/train/mlp.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <random>

namespace zipwire::train {
namespace {

constexpr const char* kTensorNames[Mlp::kNumTensors] = {"fc1.weight", "fc1.bias",   "fc2.weight",
                                                        "fc2.bias",   "fc3.weight", "fc3.bias"};

// Box-Muller on raw mt19937 words rather than std::normal_distribution, whose algorithm differs
// between standard libraries: workers built differently still start from the same model.
class NormalSource {
 public:
  explicit NormalSource(uint64_t seed) {
    std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
    gen_.seed(seq);
  }
  double Next() {
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
    const double u1 = (static_cast<double>(gen_()) + 0.5) / 4294967296.0;  // in (0, 1): log is finite
    const double u2 = (static_cast<double>(gen_()) + 0.5) / 4294967296.0;
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * std::numbers::pi * u2);
    have_spare_ = true;
    return r * std::cos(2.0 * std::numbers::pi * u2);
  }

 private:
  std::mt19937 gen_;
  double spare_ = 0.0;
  bool have_spare_ = false;
};

}  // namespace

Mlp::Mlp(uint64_t seed, size_t max_batch) {
  NormalSource normal(seed);
  for (size_t l = 0; l < kNumLayers; ++l) {
    const size_t in = kWidths[l], out = kWidths[l + 1];
    std::vector<float>& w = params_[2 * l];
    w.resize(in * out);
    const double stddev = std::sqrt(2.0 / static_cast<double>(in));  // He: keeps ReLU activations O(1)
    for (float& v : w) v = static_cast<float>(normal.Next() * stddev);
    params_[2 * l + 1].assign(out, 0.0f);
    grads_[2 * l].assign(in * out, 0.0f);
    grads_[2 * l + 1].assign(out, 0.0f);
  }
  EnsureCapacity(std::max<size_t>(max_batch, 1));
}

size_t Mlp::num_params() const {
  size_t n = 0;
  for (const auto& p : params_) n += p.size();
  return n;
}

const char* Mlp::tensor_name(size_t i) const { return i < kNumTensors ? kTensorNames[i] : "?"; }

void Mlp::EnsureCapacity(size_t batch) {
  if (batch <= capacity_) return;
  for (size_t l = 1; l <= kNumLayers; ++l) {
    act_[l].resize(batch * kWidths[l]);
    delta_[l].resize(batch * kWidths[l]);
  }
  capacity_ = batch;
}

void Mlp::Forward(const float* x, size_t batch) {
  const int b = static_cast<int>(batch);
  const float* in_act = x;
  for (size_t l = 0; l < kNumLayers; ++l) {
    const int in = static_cast<int>(kWidths[l]), out = static_cast<int>(kWidths[l + 1]);
    float* z = act_[l + 1].data();
    const float* bias = params_[2 * l + 1].data();
    // Seed the output with the bias so sgemm's beta=1 adds X*W on top of it.
    for (size_t r = 0; r < batch; ++r) std::copy(bias, bias + out, z + r * out);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, b, out, in, 1.0f, in_act, in,
                params_[2 * l].data(), out, 1.0f, z, out);
    if (l + 1 < kNumLayers) {
      for (size_t i = 0; i < batch * static_cast<size_t>(out); ++i) z[i] = std::max(z[i], 0.0f);
    }
    in_act = z;
  }
  // Softmax per row, shifted by the row max so exp never overflows.
  constexpr size_t k = kNumClasses;
  float* p = act_[kNumLayers].data();
  for (size_t r = 0; r < batch; ++r) {
    float* row = p + r * k;
    const float m = *std::max_element(row, row + k);
    float sum = 0.0f;
    for (size_t c = 0; c < k; ++c) {
      row[c] = std::exp(row[c] - m);
      sum += row[c];
    }
    const float inv = 1.0f / sum;
    for (size_t c = 0; c < k; ++c) row[c] *= inv;
  }
}

float Mlp::MeanLoss(const uint8_t* y, size_t batch) const {
  const float* p = act_[kNumLayers].data();
  double total = 0.0;
  for (size_t r = 0; r < batch; ++r) {
    // Floor the probability: an extremely confident wrong answer gives a large loss, not inf.
    total -= std::log(std::max(static_cast<double>(p[r * kNumClasses + y[r]]), 1e-30));
  }
  return static_cast<float>(total / static_cast<double>(batch));
}

bool Mlp::LabelsValid(const uint8_t* y, size_t batch) {
  return std::all_of(y, y + batch, [](uint8_t v) { return v < kNumClasses; });
}

float Mlp::Loss(const float* x, const uint8_t* y, size_t batch) {
  if (batch == 0) return 0.0f;
  if (!LabelsValid(y, batch)) return std::numeric_limits<float>::quiet_NaN();
  EnsureCapacity(batch);
  Forward(x, batch);
  return MeanLoss(y, batch);
}

float Mlp::ForwardBackward(const float* x, const uint8_t* y, size_t batch) {
  if (batch == 0 || !LabelsValid(y, batch)) {
    for (auto& g : grads_) std::fill(g.begin(), g.end(), 0.0f);
    return batch == 0 ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  EnsureCapacity(batch);
  Forward(x, batch);
  const float loss = MeanLoss(y, batch);

  const int b = static_cast<int>(batch);
  const float inv_b = 1.0f / static_cast<float>(batch);
  // d(mean CE)/d(logits) = (softmax - onehot) / batch.
  {
    constexpr size_t k = kNumClasses;
    const float* p = act_[kNumLayers].data();
    float* d = delta_[kNumLayers].data();
    for (size_t r = 0; r < batch; ++r) {
      for (size_t c = 0; c < k; ++c) d[r * k + c] = p[r * k + c] * inv_b;
      d[r * k + y[r]] -= inv_b;
    }
  }
  for (size_t l = kNumLayers; l-- > 0;) {
    const int in = static_cast<int>(kWidths[l]), out = static_cast<int>(kWidths[l + 1]);
    const float* d = delta_[l + 1].data();
    const float* in_act = l == 0 ? x : act_[l].data();
    // dW = in_act^T * delta.
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, in, out, b, 1.0f, in_act, in, d, out, 0.0f,
                grads_[2 * l].data(), out);
    float* db = grads_[2 * l + 1].data();
    std::fill(db, db + out, 0.0f);
    for (size_t r = 0; r < batch; ++r) {
      const float* row = d + r * out;
      for (int c = 0; c < out; ++c) db[c] += row[c];
    }
    if (l == 0) break;  // nobody needs the gradient w.r.t. the input
    // delta_prev = (delta * W^T) masked by the ReLU that produced in_act.
    float* dprev = delta_[l].data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b, in, out, 1.0f, d, out, params_[2 * l].data(), out,
                0.0f, dprev, in);
    const float* a = act_[l].data();
    for (size_t i = 0; i < batch * static_cast<size_t>(in); ++i) {
      if (a[i] <= 0.0f) dprev[i] = 0.0f;
    }
  }
  return loss;
}

float Mlp::Evaluate(const Dataset& ds, size_t batch) {
  if (ds.count == 0) return 0.0f;
  batch = std::clamp<size_t>(batch, 1, ds.count);
  EnsureCapacity(batch);
  size_t correct = 0;
  for (size_t start = 0; start < ds.count; start += batch) {
    const size_t n = std::min(batch, ds.count - start);
    Forward(ds.image(start), n);
    const float* p = act_[kNumLayers].data();
    for (size_t r = 0; r < n; ++r) {
      const float* row = p + r * kNumClasses;
      const size_t pred = static_cast<size_t>(std::max_element(row, row + kNumClasses) - row);
      if (pred == ds.labels[start + r]) ++correct;
    }
  }
  return static_cast<float>(correct) / static_cast<float>(ds.count);
}

}  // namespace zipwire::train
