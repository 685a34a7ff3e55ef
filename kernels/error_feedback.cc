// Error feedback over any codec: p = C(x + e); e = x + e - decode(p).
//
// The residual is updated in place by Codec::CompressWithFeedback: by default
// r += x, encode r, then r += -1 * decode(p) through the codec's own
// DecompressAccumulate, so r ends up exactly (x + e) - decode(p) as float
// arithmetic in that order, with no scratch copy; codecs with fused passes
// produce the same floats (possibly in a deferred form, see FeedbackState).
#include "kernels/error_feedback.h"

#include <string>

namespace zipwire::kernels {

ErrorFeedback::ErrorFeedback(std::shared_ptr<const Codec> codec) : codec_(std::move(codec)) {}

ErrorFeedback::Entry* ErrorFeedback::Lookup(ResidualKey key, size_t elements, Status* status) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = residuals_.find(key);
  if (it == residuals_.end()) {
    // unordered_map nodes never move, so the pointer stays valid after the
    // lock is released, until Reset().
    it = residuals_.emplace(key, Entry{std::vector<float>(elements, 0.0f), FeedbackState{}}).first;
  } else if (it->second.residual.size() != elements) {
    *status = InvalidArgument("residual of tensor " + std::to_string(key.tensor_id) + " chunk " +
                              std::to_string(key.chunk_index) + " has " +
                              std::to_string(it->second.residual.size()) + " elements, input has " +
                              std::to_string(elements));
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
  Entry* entry = Lookup(key, input.size(), &status);
  if (entry == nullptr) return status;
  auto written =
      codec_->CompressWithFeedback(input, std::span<float>(entry->residual), entry->state, out, ctx);
  if (!written.ok()) return written.status().WithContext("error feedback");
  return written;
}

std::span<const float> ErrorFeedback::Residual(ResidualKey key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = residuals_.find(key);
  if (it == residuals_.end()) return {};
  Entry& entry = it->second;
  if (entry.state.deferred) codec_->FinishResidual(std::span<float>(entry.residual), entry.state);
  return std::span<const float>(entry.residual);
}

void ErrorFeedback::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  residuals_.clear();
}

}  // namespace zipwire::kernels
