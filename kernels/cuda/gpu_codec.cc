// GpuCodec: spec parsing (through the CPU registry, so both sides accept the
// same specs) and the host-side argument checks in front of the launches.
#include "kernels/cuda/gpu_codec.h"

#include <bit>
#include <cstdint>
#include <string>

#include "kernels/codec_internal.h"
#include "kernels/cuda/gpu_launch.h"

namespace zipwire::kernels::cuda {

GpuCodec::GpuCodec(std::unique_ptr<Codec> cpu, std::unique_ptr<Config> config)
    : cpu_(std::move(cpu)), config_(std::move(config)) {}
GpuCodec::~GpuCodec() = default;

Result<std::unique_ptr<GpuCodec>> GpuCodec::Create(const std::string& spec_text) {
  ZW_ASSIGN_OR_RETURN(std::unique_ptr<Codec> cpu, CreateCodec(spec_text));
  // The canonical name spells every parameter, defaults included.
  ZW_ASSIGN_OR_RETURN(CodecSpec spec, CodecSpec::Parse(cpu->name()));
  auto c = std::make_unique<Config>();
  c->id = cpu->id();
  switch (c->id) {
    case CodecId::kFp16:
    case CodecId::kBf16:
    case CodecId::kOnebit:
    case CodecId::kTerngrad:
      break;
    case CodecId::kTopk:
    case CodecId::kTopkSampled: {
      ZW_ASSIGN_OR_RETURN(c->v, internal::ParseRatioOrCount(spec, "value", 0.01));
      break;
    }
    case CodecId::kRandomk: {
      ZW_ASSIGN_OR_RETURN(c->v, internal::ParseRatioOrCount(spec, "value", 0.01));
      ZW_ASSIGN_OR_RETURN(uint64_t scale, internal::ParseUint(spec, "scale", 0, 0, 1));
      c->scaled = scale != 0;
      break;
    }
    case CodecId::kDithering: {
      ZW_ASSIGN_OR_RETURN(uint64_t s, internal::ParseUint(spec, "s", 16, 1, 65535));
      c->s = static_cast<uint32_t>(s);
      c->natural = spec.params["levels"] == "natural";
      c->max_norm = spec.params["norm"] == "max";
      // The CPU codec above has validated it: 0 or a power of two in [128, 8192].
      ZW_ASSIGN_OR_RETURN(uint64_t bucket, internal::ParseUint(spec, "bucket", 8192, 0, 8192));
      c->bucket_log2 = bucket == 0 ? 0 : static_cast<uint32_t>(std::countr_zero(bucket));
      break;
    }
    case CodecId::kCountSketch: {
      ZW_ASSIGN_OR_RETURN(uint64_t r, internal::ParseUint(spec, "r", 5, 1, 64));
      ZW_ASSIGN_OR_RETURN(uint64_t cols, internal::ParseUint(spec, "c", 1024, 1, uint64_t{1} << 26));
      ZW_ASSIGN_OR_RETURN(uint64_t k, internal::ParseUint(spec, "k", 256, 1, 0xffffffffu));
      c->rows = static_cast<uint32_t>(r);
      c->cols = static_cast<uint32_t>(cols);
      c->keep = static_cast<uint32_t>(k);
      break;
    }
    default:
      return NotSupported("codec '" + cpu->name() + "' has no GPU implementation");
  }
  return std::unique_ptr<GpuCodec>(new GpuCodec(std::move(cpu), std::move(c)));
}

CodecId GpuCodec::id() const { return cpu_->id(); }
std::string GpuCodec::name() const { return cpu_->name(); }
size_t GpuCodec::MaxCompressedBytes(size_t elements) const { return cpu_->MaxCompressedBytes(elements); }
size_t GpuCodec::ScratchBytes(size_t elements) const { return ScratchBytesFor(*config_, elements); }

namespace {

bool Aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

Status CheckCommon(const GpuCodec& codec, size_t n, GpuCodecWorkspace& ws, const char* op) {
  if (n > ws.max_elements()) {
    return InvalidArgument(codec.name() + " " + op + ": " + std::to_string(n) +
                           " elements exceed the workspace's " + std::to_string(ws.max_elements()));
  }
  if (n > 0xffffffffu) return InvalidArgument(codec.name() + ": chunks are limited to 2^32 - 1 elements");
  return Status::Ok();
}

Status CheckEncodeArgs(const GpuCodec& codec, const float* x, size_t n, const uint8_t* out, size_t capacity,
                       GpuCodecWorkspace& ws) {
  ZW_RETURN_IF_ERROR(CheckCommon(codec, n, ws, "compress"));
  const size_t need = codec.MaxCompressedBytes(n);
  if (capacity < need) {
    return InvalidArgument(codec.name() + ": output buffer of " + std::to_string(capacity) +
                           " bytes is smaller than the " + std::to_string(need) + " bytes needed for " +
                           std::to_string(n) + " elements");
  }
  if ((n > 0 && x == nullptr) || out == nullptr)
    return InvalidArgument(codec.name() + ": null device pointer");
  if (!Aligned(x) || !Aligned(out))
    return InvalidArgument(codec.name() + ": device pointers must be 16-byte aligned");
  return Status::Ok();
}

}  // namespace

Status GpuCodec::Compress(const float* d_input, size_t n, uint8_t* d_out, size_t out_capacity,
                          const CodecContext& ctx, GpuCodecWorkspace& ws, GpuStream stream) const {
  ZW_RETURN_IF_ERROR(CheckEncodeArgs(*this, d_input, n, d_out, out_capacity, ws));
  return LaunchCompress(*config_, d_input, nullptr, n, d_out, out_capacity, ctx, ws.impl(), stream);
}

Status GpuCodec::CompressWithFeedback(const float* d_input, float* d_residual, size_t n, uint8_t* d_out,
                                      size_t out_capacity, const CodecContext& ctx, GpuCodecWorkspace& ws,
                                      GpuStream stream) const {
  ZW_RETURN_IF_ERROR(CheckEncodeArgs(*this, d_input, n, d_out, out_capacity, ws));
  if ((n > 0 && d_residual == nullptr) || !Aligned(d_residual)) {
    return InvalidArgument(name() + ": the residual must be a 16-byte aligned device pointer");
  }
  return LaunchCompress(*config_, d_input, d_residual, n, d_out, out_capacity, ctx, ws.impl(), stream);
}

Status GpuCodec::Decompress(const uint8_t* d_in, size_t in_bytes, float* d_out, size_t n,
                            GpuCodecWorkspace& ws, GpuStream stream) const {
  ZW_RETURN_IF_ERROR(CheckCommon(*this, n, ws, "decompress"));
  if ((in_bytes > 0 && d_in == nullptr) || (n > 0 && d_out == nullptr) || !Aligned(d_in) || !Aligned(d_out)) {
    return InvalidArgument(name() + ": device pointers must be non-null and 16-byte aligned");
  }
  return LaunchDecode(*config_, d_in, in_bytes, d_out, n, false, 1.0f, ws.impl(), stream);
}

Status GpuCodec::DecompressAccumulate(const uint8_t* d_in, size_t in_bytes, float* d_accum, size_t n,
                                      float alpha, GpuCodecWorkspace& ws, GpuStream stream) const {
  ZW_RETURN_IF_ERROR(CheckCommon(*this, n, ws, "decompress"));
  if ((in_bytes > 0 && d_in == nullptr) || (n > 0 && d_accum == nullptr) || !Aligned(d_in) ||
      !Aligned(d_accum)) {
    return InvalidArgument(name() + ": device pointers must be non-null and 16-byte aligned");
  }
  return LaunchDecode(*config_, d_in, in_bytes, d_accum, n, true, alpha, ws.impl(), stream);
}

}  // namespace zipwire::kernels::cuda
