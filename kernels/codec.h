// The codec contract: codecs registered by name (as BytePS's compressor
// registry), a self-describing wire format, and decoders that treat their
// input as untrusted network bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>

#include "core/status.h"

namespace zipwire::kernels {

enum class CodecId : uint8_t {
  kNone = 0,
  kFp16 = 1,
  kOnebit = 2,
  kBf16 = 3,
  kTopk = 4,
  kTopkSampled = 5,
  kRandomk = 6,
  kDithering = 7,
  kTerngrad = 8,
  kCountSketch = 9,
};
const char* CodecIdName(CodecId id);

// "onebit", "fp16", "none", "topk:0.01", "randomk:0.01,scale=1" or
// "dithering:s=16,norm=l2". Parameters are NAME:VALUE, NAME:key=value[,key=value]
// or NAME:VALUE,key=value[,key=value] (a bare value only in first place).
struct CodecSpec {
  std::string name;
  std::map<std::string, std::string> params;  // a bare value is stored under "value"

  static Result<CodecSpec> Parse(const std::string& text);
  std::string ToString() const;
};

// Per-call context: seeds the counter-based randomness of the codecs that
// use it (stochastic rounding, shared index draws) so runs are reproducible
// and every worker and server derives the same draw for (tensor, chunk, step).
struct CodecContext {
  uint64_t seed = 0;
  uint64_t tensor_id = 0;
  uint32_t chunk_index = 0;
  uint64_t step = 0;
};

// What error feedback keeps of one residual besides its floats. A codec's
// CompressWithFeedback may leave the residual in a deferred form that only it
// reads (onebit keeps y = x + e and the chunk scale, and applies
// e = y - decode when the residual is next read), saving a pass over memory.
struct FeedbackState {
  bool deferred = false;  // the floats are the codec's deferred form
  float scale = 0.0f;     // codec-defined, meaningful only when deferred
};

// Codecs are stateless and const: one instance is shared by all threads.
class Codec {
 public:
  virtual ~Codec() = default;

  virtual CodecId id() const = 0;
  virtual std::string name() const = 0;  // the spec that builds it again

  // Upper bound on Compress output for `elements` floats, header included.
  virtual size_t MaxCompressedBytes(size_t elements) const = 0;

  // Encodes `input` into `out` (header + payload); returns bytes written.
  // kInvalidArgument if out is smaller than MaxCompressedBytes(input.size()).
  virtual Result<size_t> Compress(std::span<const float> input, std::span<uint8_t> out,
                                  const CodecContext& ctx) const = 0;

  // Decodes `in` (validated: header, codec id, sizes) into `out`, whose size
  // must equal the encoded element count. Never reads or writes out of bounds.
  virtual Status Decompress(std::span<const uint8_t> in, std::span<float> out) const = 0;

  // accum += alpha * decode(in), with the same validation.
  virtual Status DecompressAccumulate(std::span<const uint8_t> in, std::span<float> accum,
                                      float alpha = 1.0f) const = 0;

  // Error feedback in one call: y = input + e (e = the residual, materialised
  // with FinishResidual first when state.deferred), writes Compress(y) to out
  // and leaves e' = y - decode(out) (as DecompressAccumulate(out, e, -1) would
  // compute it, bit for bit) in residual, possibly deferred. residual.size()
  // must equal input.size(). The default makes the three passes (e += input,
  // Compress, DecompressAccumulate with -1); codecs override it with fused
  // passes. On an output-size error nothing changes; on any other codec error
  // the residual may hold input + e (dithering: up to one rounding in the
  // buckets it quantised before the one it rejected; see codec_dithering.cc).
  virtual Result<size_t> CompressWithFeedback(std::span<const float> input, std::span<float> residual,
                                              FeedbackState& state, std::span<uint8_t> out,
                                              const CodecContext& ctx) const;

  // Turns a deferred residual into plain floats (state.deferred = false); a
  // no-op when it is not deferred.
  virtual void FinishResidual(std::span<float> /*residual*/, FeedbackState& state) const {
    state.deferred = false;
  }

  // Upper bound on ||x - decode(encode(x))||_2 for this input (the codec's
  // stated error bound), used by tests and by callers that check a result.
  // For the randomised codecs it holds for every CodecContext.
  virtual double ErrorBoundL2(std::span<const float> input) const = 0;

  // Compressed-domain aggregation. A codec is linear when a server can add
  // encoded chunks without decoding them to full size first (countsketch,
  // randomk with one shared context) or with a cheap elementwise
  // decode-add-re-encode of the same size (fp16/bf16, summed in fp32).
  virtual bool is_linear() const { return false; }

  // accum (an encoded buffer of this codec, same element count and
  // parameters, the sum so far) += in, in place; accum keeps its size. Each
  // codec documents what "+=" means exactly. kNotSupported if !is_linear();
  // kInvalidArgument if the two buffers' shapes or parameters differ; kCorrupt
  // if either is malformed. On error accum is left unchanged.
  virtual Status AccumulateEncoded(std::span<const uint8_t> /*in*/, std::span<uint8_t> /*accum*/) const {
    return Status(StatusCode::kNotSupported, name() + " cannot aggregate encoded buffers");
  }
};

// Fixed 32-byte little-endian header in front of every encoded chunk.
struct WireHeader {
  static constexpr uint32_t kMagic = 0x3143575a;  // "ZWC1"
  static constexpr uint8_t kVersion = 1;
  static constexpr size_t kBytes = 32;

  uint8_t version = kVersion;
  CodecId codec = CodecId::kNone;
  uint16_t param_bytes = 0;    // codec parameter block right after the header
  uint64_t elements = 0;       // float count encoded
  uint64_t payload_bytes = 0;  // bytes after header + params
  uint32_t param_word = 0;     // small codec parameter (e.g. bits per value), 0 if unused
};

void EncodeHeader(const WireHeader& header, std::span<uint8_t, WireHeader::kBytes> out);
// Validates magic, version, codec id and that header + params + payload fit
// exactly inside `in` (no trailing garbage, no overrun).
Result<WireHeader> ParseHeader(std::span<const uint8_t> in);

// Registry by name. Built-ins (none, fp16, onebit, bf16, topk, topk_sampled,
// randomk, dithering, terngrad, countsketch) are registered at start-up.
using CodecFactory = Result<std::unique_ptr<Codec>> (*)(const CodecSpec& spec);
Status RegisterCodec(const std::string& name, CodecId id, CodecFactory factory);
Result<std::unique_ptr<Codec>> CreateCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> CreateCodec(const std::string& spec_text);
// The codec that decodes a buffer whose header names `id` (default params).
Result<const Codec*> CodecForId(CodecId id);

}  // namespace zipwire::kernels
