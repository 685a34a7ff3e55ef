// Helpers shared by the built-in codecs; not part of the public API.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

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
inline void StoreLe64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint64_t LoadLe64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}
inline void StoreF32(uint8_t* p, float v) { std::memcpy(p, &v, 4); }
inline float LoadF32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void StoreF64(uint8_t* p, double v) { std::memcpy(p, &v, 8); }
inline double LoadF64(const uint8_t* p) {
  double v;
  std::memcpy(&v, p, 8);
  return v;
}

// A per-thread scratch buffer of at least n elements, grown and never shrunk,
// so the hot paths allocate only when a chunk is larger than any before on
// this thread. Contents are unspecified.
// Never null (at least one element), so memcpy of zero bytes stays defined.
template <typename T>
T* Scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n || v.empty()) v.resize(n == 0 ? 1 : n);
  return v.data();
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

// AccumulateEncoded of the 16-bit float codecs (bf16, fp16: 2 payload bytes
// per element, no parameters): accum = encode(decode(accum) + decode(in)),
// one fp32 addition and one rounding per element, a cache-resident block at a
// time. Both buffers are validated as `id` buffers of accum's element count.
using Decode16Fn = void (*)(const uint8_t* in, float* out, size_t n);
using Encode16Fn = void (*)(const float* in, uint8_t* out, size_t n);
Status AccumulateEncoded16(CodecId id, std::span<const uint8_t> in, std::span<uint8_t> accum,
                           Decode16Fn decode, Encode16Fn encode);

// Decode-side header checks shared by the codecs with parameters: parses,
// names `id` (else kInvalidArgument), encodes exactly `out_elements`
// (else kInvalidArgument). Params and payload are the caller's to check.
Result<WireHeader> ValidateHeader(std::span<const uint8_t> in, CodecId id, size_t out_elements);

// Spec helpers. Fails with kInvalidArgument naming any key not in `allowed`.
Status CheckKeys(const CodecSpec& spec, std::initializer_list<const char*> allowed);
// A ratio (0 < v < 1) or an element count (an integer v >= 1, at most 2^32-1).
Result<double> ParseRatioOrCount(const CodecSpec& spec, const std::string& key, double fallback);
Result<uint64_t> ParseUint(const CodecSpec& spec, const std::string& key, uint64_t fallback, uint64_t lo,
                           uint64_t hi);
// Shortest text that parses back to the same double.
std::string FormatNumber(double v);
// Whether v is a valid ParseRatioOrCount result (for values read off the wire).
bool IsRatioOrCount(double v);
// k for a ratio or count over n elements: a ratio gives max(1, round(v*n)),
// a count gives v; both clamped to n (and 0 when n is 0).
size_t KFor(double ratio_or_count, size_t n);

// The bytes of a WireHeader's parameter block (after the 32 header bytes).
inline std::span<const uint8_t> ParamBlock(std::span<const uint8_t> in, const WireHeader& h) {
  return in.subspan(WireHeader::kBytes, h.param_bytes);
}
inline std::span<const uint8_t> PayloadOf(std::span<const uint8_t> in, const WireHeader& h) {
  return in.subspan(WireHeader::kBytes + h.param_bytes);
}

// Exact top-k by |x| (ties to the lowest index): writes the k selected
// indices, ascending, to idx[0..k). A radix select on the bit patterns of |x|
// (NaN above +Inf above every finite value), never a sort.
struct TopkThreshold {
  uint32_t key = 0;       // |x| bit pattern of the smallest selected entry
  size_t ties_taken = 0;  // selected entries whose key equals `key`
  size_t ties_total = 0;  // entries (of all n) whose key equals `key`
};
// When values is not null it receives the selected entries' bits, in the same
// order (saving the caller a scattered read of x).
TopkThreshold SelectTopk(const float* x, size_t n, size_t k, uint32_t* idx, uint32_t* values = nullptr);
// sqrt(sum of x^2 over the entries SelectTopk(x, n, k) drops), in double.
double TopkDroppedNorm(const float* x, size_t n, size_t k);

// Whether a codec is registered under this id (lock-free; for ParseHeader).
bool IsRegisteredCodecId(uint8_t id);

// Factories of the built-ins, registered by registry.cc.
Result<std::unique_ptr<Codec>> MakeNoneCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeFp16Codec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeOnebitCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeBf16Codec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeTopkCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeTopkSampledCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeRandomkCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeDitheringCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeTerngradCodec(const CodecSpec& spec);
Result<std::unique_ptr<Codec>> MakeCountSketchCodec(const CodecSpec& spec);

// bf16 conversions (round to nearest even; NaN stays a quiet NaN).
inline uint16_t FloatToBf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float Bf16ToFloat(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

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
