#include "ps/train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

namespace zipwire::train {

float LrSchedule::At(uint64_t step) const {
  if (kind == Kind::kConstant || total_steps == 0) return base_lr;
  const double f = std::min(1.0, static_cast<double>(step) / static_cast<double>(total_steps));
  return static_cast<float>(0.5 * base_lr * (1.0 + std::cos(std::numbers::pi * f)));
}

Optimizer::Optimizer(const OptimizerConfig& config, std::vector<size_t> tensor_sizes) : config_(config) {
  state_.resize(tensor_sizes.size());
  for (size_t i = 0; i < tensor_sizes.size(); ++i) {
    state_[i].m.assign(tensor_sizes[i], 0.0f);
    state_[i].v.assign(tensor_sizes[i], 0.0f);
    if (config_.kind == OptimizerKind::kAmsGrad) state_[i].vhat.assign(tensor_sizes[i], 0.0f);
  }
}

Status Optimizer::Step(size_t tensor, std::span<float> params, std::span<const float> grad) {
  if (tensor >= state_.size()) {
    return InvalidArgument("optimizer: tensor " + std::to_string(tensor) + " out of " +
                           std::to_string(state_.size()));
  }
  TensorState& s = state_[tensor];
  if (params.size() != s.m.size() || grad.size() != s.m.size()) {
    return InvalidArgument("optimizer: tensor " + std::to_string(tensor) + " has " +
                           std::to_string(s.m.size()) + " elements, got params " +
                           std::to_string(params.size()) + " and grad " + std::to_string(grad.size()));
  }
  // Zero is allowed: a decayed schedule may end there.
  if (!(config_.lr >= 0.0f) || !std::isfinite(config_.lr)) {
    return InvalidArgument("optimizer: learning rate " + std::to_string(config_.lr) +
                           " is not finite and >= 0");
  }
  ++s.t;
  const float b1 = config_.beta1, b2 = config_.beta2, eps = config_.eps;
  // Bias corrections folded into the scalars (computed in double, once per step).
  float step_size = config_.lr;
  float v_scale = 1.0f;  // multiplies sqrt(v) so that it reads sqrt(v / (1 - b2^t))
  if (config_.bias_correction) {
    const double t = static_cast<double>(s.t);
    const double bc1 = 1.0 - std::pow(static_cast<double>(b1), t);
    const double bc2 = 1.0 - std::pow(static_cast<double>(b2), t);
    step_size = static_cast<float>(config_.lr / bc1);
    v_scale = static_cast<float>(1.0 / std::sqrt(bc2));
  }
  const size_t n = params.size();
  float* m = s.m.data();
  float* v = s.v.data();
  float* x = params.data();
  const float* g = grad.data();
  if (config_.kind == OptimizerKind::kAdam) {
    for (size_t i = 0; i < n; ++i) {
      m[i] = b1 * m[i] + (1.0f - b1) * g[i];
      v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
      x[i] -= step_size * m[i] / (std::sqrt(v[i]) * v_scale + eps);
    }
  } else {
    float* vh = s.vhat.data();
    for (size_t i = 0; i < n; ++i) {
      m[i] = b1 * m[i] + (1.0f - b1) * g[i];
      v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
      vh[i] = std::max(vh[i], v[i]);
      x[i] -= step_size * m[i] / (std::sqrt(vh[i]) * v_scale + eps);
    }
  }
  return Status::Ok();
}

}  // namespace zipwire::train
