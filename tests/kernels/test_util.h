// Shared helpers for the kernels tests.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/codec.h"

namespace zipwire::kernels::testing {

// 1 + the index of the first of n elements whose bits differ, 0 when all
// agree: memcmp that is defined for empty (null) spans and names the element.
template <typename A, typename B>
size_t BitDiff(const A& a, const B& b, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i])) return i + 1;
  }
  return 0;
}

inline std::vector<float> RandomNormal(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

inline std::unique_ptr<Codec> MustCreate(const std::string& spec) {
  auto c = CreateCodec(spec);
  if (!c.ok()) return nullptr;
  return std::move(c).value();
}

// Encodes `x` into an exactly-sized buffer.
inline std::vector<uint8_t> Encode(const Codec& codec, const std::vector<float>& x) {
  std::vector<uint8_t> buf(codec.MaxCompressedBytes(x.size()));
  auto n = codec.Compress(x, buf, CodecContext{});
  if (!n.ok()) return {};
  buf.resize(n.value());
  return buf;
}

// One spec per codec (two for the codecs whose options change the wire
// format), with ratios large enough that k differs between nearby sizes.
// randomk with scale=1 is left out: under error feedback its residual grows
// by n/k - 1 per step (it has its own tests).
inline const std::vector<std::string>& BuiltinCodecs() {
  static const std::vector<std::string> kNames = {"none",
                                                  "fp16",
                                                  "onebit",
                                                  "bf16",
                                                  "topk:0.25",
                                                  "topk:3",
                                                  "topk_sampled:0.25",
                                                  "randomk:0.25",
                                                  "dithering:s=16",
                                                  "dithering:levels=natural,norm=max,s=4",
                                                  "dithering:bucket=0,s=16",
                                                  "dithering:bucket=128,levels=natural,s=8",
                                                  "dithering:bucket=256,norm=max,s=300",
                                                  "terngrad",
                                                  "countsketch:c=2048,k=16,r=5"};
  return kNames;
}

// Whether the payload pins down the element count, so a header claiming
// another count is detectably inconsistent. A count sketch is a valid sketch
// of a vector of any length, and a fixed-count top-k (k = 3 whatever n) a
// valid top-k of any longer vector.
inline bool PayloadPinsElementCount(const std::string& spec) {
  return spec.rfind("countsketch", 0) != 0 && spec != "topk:3";
}

inline CodecContext Ctx(uint64_t step, uint64_t seed = 1234, uint64_t tensor = 7, uint32_t chunk = 3) {
  CodecContext c;
  c.seed = seed;
  c.tensor_id = tensor;
  c.chunk_index = chunk;
  c.step = step;
  return c;
}

inline std::vector<uint8_t> Encode(const Codec& codec, const std::vector<float>& x, const CodecContext& ctx) {
  std::vector<uint8_t> buf(codec.MaxCompressedBytes(x.size()));
  auto n = codec.Compress(x, buf, ctx);
  if (!n.ok()) return {};
  buf.resize(n.value());
  return buf;
}

}  // namespace zipwire::kernels::testing
