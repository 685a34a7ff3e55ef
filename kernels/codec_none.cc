// The "none" codec: the floats as they are.
//
// Wire format: header (codec kNone, param_bytes 0, param_word 0,
// payload_bytes = 4 * elements) followed by the elements as little-endian
// IEEE binary32. Lossless, so ErrorBoundL2 is 0.
#include <cstring>

#include "kernels/codec_internal.h"

namespace zipwire::kernels {
namespace {

class NoneCodec final : public Codec {
 public:
  CodecId id() const override { return CodecId::kNone; }
  std::string name() const override { return "none"; }

  size_t MaxCompressedBytes(size_t elements) const override {
    return internal::SatAdd(WireHeader::kBytes, internal::SatMul(elements, sizeof(float)));
  }

  Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                          const CodecContext& /*ctx*/) const override {
    ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
    const size_t payload = input.size() * sizeof(float);
    internal::WriteSimpleHeader(CodecId::kNone, input.size(), payload, out);
    if (payload != 0) std::memcpy(out.data() + WireHeader::kBytes, input.data(), payload);
    return WireHeader::kBytes + payload;
  }

  Status Decompress(std::span<const uint8_t> in, std::span<float> out) const override {
    ZW_ASSIGN_OR_RETURN(auto payload,
                        internal::ValidateSimple(in, CodecId::kNone, out.size(), out.size() * sizeof(float)));
    if (!payload.empty()) std::memcpy(out.data(), payload.data(), payload.size());
    return Status::Ok();
  }

  Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                              float alpha) const override {
    ZW_ASSIGN_OR_RETURN(auto payload, internal::ValidateSimple(in, CodecId::kNone, accum.size(),
                                                               accum.size() * sizeof(float)));
    const uint8_t* src = payload.data();
    float* dst = accum.data();
    const size_t n = accum.size();
    // memcpy per element: the payload need not be float-aligned; compiles to
    // unaligned vector loads.
    for (size_t i = 0; i < n; ++i) {
      float v;
      std::memcpy(&v, src + i * sizeof(float), sizeof(float));
      dst[i] += alpha * v;
    }
    return Status::Ok();
  }

  double ErrorBoundL2(std::span<const float> /*input*/) const override { return 0.0; }
};

}  // namespace

namespace internal {
Result<std::unique_ptr<Codec>> MakeNoneCodec(const CodecSpec& spec) {
  ZW_RETURN_IF_ERROR(RejectParams(spec));
  return std::unique_ptr<Codec>(std::make_unique<NoneCodec>());
}
}  // namespace internal
}  // namespace zipwire::kernels
