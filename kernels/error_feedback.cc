// Error feedback over any codec: p = C(x + e); e = x + e - decode(p).
//
// The residual is updated in place: r += x, encode r, then r += -1 * decode(p)
// through the codec's own DecompressAccumulate, so r ends up exactly
// (x + e) - decode(p) as float arithmetic in that order, with no scratch copy.
#include "kernels/error_feedback.h"

#include <string>

namespace zipwire::kernels {

ErrorFeedback::ErrorFeedback(std::shared_ptr<const Codec> codec) : codec_(std::move(codec)) {}

std::vector<float>* ErrorFeedback::Lookup(ResidualKey key, size_t elements, Status* status) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = residuals_.find(key);
  if (it == residuals_.end()) {
    // unordered_map nodes never move, so the pointer stays valid after the
    // lock is released, until Reset().
    it = residuals_.emplace(key, std::vector<float>(elements, 0.0f)).first;
  } else if (it->second.size() != elements) {
    *status = InvalidArgument("residual of tensor " + std::to_string(key.tensor_id) + " chunk " +
                              std::to_string(key.chunk_index) + " has " + std::to_string(it->second.size()) +
                              " elements, input has " + std::to_string(elements));
    return nullptr;
  }
  *status = Status::Ok();
  return &it->second;
}

Status ErrorFeedback::Reserve(ResidualKey key, size_t elements) {
  Status status;
  Lookup(key, elements, &status);
  return status;
}

Result<size_t> ErrorFeedback::Compress(ResidualKey key, std::span<const float> input, std::span<uint8_t> out,
                                       const CodecContext& ctx) {
  // Check the output first: a failed Compress must leave the residual as it was.
  const size_t need = codec_->MaxCompressedBytes(input.size());
  if (out.size() < need) {
    return InvalidArgument("error feedback: output buffer of " + std::to_string(out.size()) +
                           " bytes is smaller than the " + std::to_string(need) + " bytes " + codec_->name() +
                           " needs for " + std::to_string(input.size()) + " elements");
  }
  Status status;
  std::vector<float>* residual = Lookup(key, input.size(), &status);
  if (residual == nullptr) return status;

  float* r = residual->data();
  const size_t n = input.size();
  for (size_t i = 0; i < n; ++i) r[i] += input[i];  // r = x + e (addition commutes exactly)

  const std::span<float> rs(r, n);
  auto written = codec_->Compress(rs, out, ctx);
  if (!written.ok()) return written.status().WithContext("error feedback");
  const Status back = codec_->DecompressAccumulate(out.first(written.value()), rs, -1.0f);
  if (!back.ok()) {
    // The codec could not decode its own output: a bug, not bad input.
    return Internal("error feedback: " + codec_->name() + " rejected its own encoding: " + back.ToString());
  }
  return written;
}

std::span<const float> ErrorFeedback::Residual(ResidualKey key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = residuals_.find(key);
  if (it == residuals_.end()) return {};
  return std::span<const float>(it->second);
}

void ErrorFeedback::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  residuals_.clear();
}

}  // namespace zipwire::kernels
