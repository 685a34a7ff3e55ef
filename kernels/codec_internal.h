// Helpers shared by the built-in codecs; not part of the public API.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>

#include "kernels/codec.h"

namespace zipwire::kernels::internal {

// Payloads are copied with memcpy in host order; the wire is little-endian.
static_assert(std::endian::native == std::endian::little, "zipwire codecs assume a little-endian host");

// Saturating so that MaxCompressedBytes(huge) never wraps to a small number.
inline size_t SatMul(size_t a, size_t b) {
  size_t r;
  return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}
inline size_t SatAdd(size_t a, size_t b) {
  size_t r;
  return __builtin_add_overflow(a, b, &r) ? SIZE_MAX : r;
}

inline void StoreLe32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint32_t LoadLe32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

// Checks out.size() >= MaxCompressedBytes(elements) for Compress.
Status CheckOutputSize(const Codec& codec, size_t elements, size_t out_size);

// Writes the header for a codec without parameters.
void WriteSimpleHeader(CodecId id, uint64_t elements, uint64_t payload_bytes, std::span<uint8_t> out);

// The common decode-side validation of a codec without parameters: the header
// parses, names `id`, carries no parameters, encodes exactly `out_elements`
// floats, and its payload is exactly `expected_payload` bytes (which the
// caller computes from out_elements, a real span's size, so it cannot overflow
// the way a value derived from the untrusted header could). Returns the payload.
Result<std::span<const uint8_t>> ValidateSimple(std::span<const uint8_t> in, CodecId id, size_t out_elements,
                                                size_t expected_payload);

Status RejectParams(const CodecSpec& spec);

// Whether a codec is registered under this id (lock-free; for ParseHeader).
bool IsRegisteredCodecId(uint8_t id);

// Factories of the built-ins, registered by registry.cc.
Result<std::unique_ptr<Codec>> MakeNoneCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeFp16Codec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeOnebitCodec(const CodecSpec& spec);

// fp16 conversions, exposed so tests can compare the scalar and F16C paths.
uint16_t FloatToHalfScalar(float f);
float HalfToFloatScalar(uint16_t h);
// The byte side is little-endian binary16 and may be unaligned.
void FloatToHalfScalar(const float* in, uint8_t* out, size_t n);
void HalfToFloatScalar(const uint8_t* in, float* out, size_t n);
// True when the CPU has F16C + AVX2 and the hardware path is used.
bool HasF16c();
// Hardware conversions; only call when HasF16c().
void FloatToHalfF16c(const float* in, uint8_t* out, size_t n);
void HalfToFloatF16c(const uint8_t* in, float* out, size_t n);

}  // namespace zipwire::kernels::internal
