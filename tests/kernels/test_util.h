// Shared helpers for the kernels tests.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/codec.h"

namespace zipwire::kernels::testing {

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

inline const std::vector<std::string>& BuiltinCodecs() {
  static const std::vector<std::string> kNames = {"none", "fp16", "onebit"};
  return kNames;
}

}  // namespace zipwire::kernels::testing
