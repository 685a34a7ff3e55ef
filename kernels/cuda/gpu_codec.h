// CUDA implementations of the codecs in kernels/, producing the same wire
// bytes as the CPU codec for the same input and CodecContext (issue 4 item 5).
//
// Usable from plain .cc files: no CUDA header is needed, a stream is the
// opaque GpuStream (a cudaStream_t; nullptr is the legacy default stream).
//
// Every operation is stream-ordered on the caller's stream: it enqueues
// kernels and one small device-to-host copy of its result record and returns;
// it never synchronises and never allocates (all scratch lives in a
// GpuCodecWorkspace sized up front). Pointers are device pointers, 16-byte
// aligned (cudaMalloc's are).
//
// Errors come in two kinds:
//   * the returned Status: what the host can check before enqueueing (sizes,
//     alignment, capacity, workspace too small) and CUDA launch failures;
//   * the result record: what depends on device data (a NaN for terngrad, a
//     corrupt buffer for a decoder). After the caller has synchronised the
//     stream, workspace.LastStatus() turns it into a Status with the same
//     code the CPU codec returns (kInvalidArgument / kCorrupt), and
//     workspace.host_encoded_bytes() holds the encoded size (0 on error). The
//     same size is in device memory at device_encoded_bytes(), for kernels that
//     consume the buffer without a round trip.
// A decoder validates the whole buffer on the device before it writes any
// output, so corrupt input leaves the output (or accumulator) untouched, and
// it never reads outside [d_in, d_in + in_bytes).
//
// Differences from the CPU codecs, all documented limits rather than changes of
// format:
//   * sparse decoders (topk, topk_sampled, randomk, countsketch) size their
//     scratch from this codec's parameters, so a buffer whose k (randomk,
//     countsketch: k, r, c) differs from this GpuCodec's is rejected with
//     kInvalidArgument; the CPU decoders accept any parameters in the buffer;
//   * NaN payload bits of float results computed by arithmetic (decode-
//     accumulate, error-feedback residuals) may differ from the CPU's (x86
//     propagates the NaN operand, CUDA returns the canonical NaN); wire bytes
//     never depend on that (randomk's scaling emulates x86 explicitly).
// One workspace serves one stream at a time (its result record and scratch
// are reused by every call).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"
#include "kernels/codec.h"

struct CUstream_st;

namespace zipwire::kernels::cuda {

using GpuStream = CUstream_st*;

// Ok when a CUDA device is present and usable, else the reason (for skips).
Status GpuAvailable();

class GpuCodec;

class GpuCodecWorkspace {
 public:
  // Scratch for chunks of up to max_elements floats. With `codec` the scratch
  // is sized for that codec alone (onebit, fp16, bf16, terngrad and dithering
  // need almost none); without, for every codec (about 28 bytes per element).
  static Result<std::unique_ptr<GpuCodecWorkspace>> Create(size_t max_elements,
                                                           const GpuCodec* codec = nullptr);
  ~GpuCodecWorkspace();
  GpuCodecWorkspace(const GpuCodecWorkspace&) = delete;
  GpuCodecWorkspace& operator=(const GpuCodecWorkspace&) = delete;

  size_t max_elements() const;
  // Device address of the encoded byte count of the last Compress (u64).
  const uint64_t* device_encoded_bytes() const;
  // Host copies of the last operation's result record; read after syncing.
  uint64_t host_encoded_bytes() const;
  Status LastStatus() const;

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  explicit GpuCodecWorkspace(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class GpuCodec {
 public:
  // The same spec strings as CreateCodec ("onebit", "topk:0.01", ...); every
  // codec but "none" has a GPU implementation.
  static Result<std::unique_ptr<GpuCodec>> Create(const std::string& spec);
  ~GpuCodec();

  CodecId id() const;
  std::string name() const;  // the CPU codec's canonical spec
  // Identical to the CPU codec's bound.
  size_t MaxCompressedBytes(size_t elements) const;
  // Workspace scratch bytes this codec needs for chunks of `elements`.
  size_t ScratchBytes(size_t elements) const;

  // Encodes d_input[0, n) into d_out (header + params + payload).
  Status Compress(const float* d_input, size_t n, uint8_t* d_out, size_t out_capacity,
                  const CodecContext& ctx, GpuCodecWorkspace& ws, GpuStream stream) const;

  // Error feedback: y = d_input + d_residual; encode y; d_residual = y - decode.
  // Bit-identical to kernels::ErrorFeedback::Compress (including leaving
  // d_residual = y when the encode fails on the data).
  Status CompressWithFeedback(const float* d_input, float* d_residual, size_t n, uint8_t* d_out,
                              size_t out_capacity, const CodecContext& ctx, GpuCodecWorkspace& ws,
                              GpuStream stream) const;

  // d_out[0, n) = decode(d_in[0, in_bytes)).
  Status Decompress(const uint8_t* d_in, size_t in_bytes, float* d_out, size_t n, GpuCodecWorkspace& ws,
                    GpuStream stream) const;

  // d_accum[0, n) += alpha * decode(d_in[0, in_bytes)).
  Status DecompressAccumulate(const uint8_t* d_in, size_t in_bytes, float* d_accum, size_t n, float alpha,
                              GpuCodecWorkspace& ws, GpuStream stream) const;

  struct Config;
  const Config& config() const { return *config_; }

 private:
  GpuCodec(std::unique_ptr<Codec> cpu, std::unique_ptr<Config> config);
  std::unique_ptr<Codec> cpu_;
  std::unique_ptr<Config> config_;
};

}  // namespace zipwire::kernels::cuda
