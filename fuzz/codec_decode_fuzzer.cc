// Fuzzes one codec's decoders; built once per codec with ZW_FUZZ_CODEC_ID set
// to its CodecId (see fuzz/CMakeLists.txt), so each decoder gets the whole
// time budget of its own target instead of sharing one.
//
// The bytes go to Decompress and DecompressAccumulate of the default decoder
// for the id (CodecForId, which is what a receiver uses: the wire format is
// self-describing), into an output sized from the parsed header's element
// count (up to 2^20 elements, so a forged count cannot make the harness itself
// allocate gigabytes; a larger count gets a small span, which the decoder must
// reject just the same) and into an output of a wrong size. Linear codecs also get
// AccumulateEncoded(in, copy of in).
//
// Contract checks beyond memory safety (codec.h): a decode into a span whose
// size differs from the encoded element count must fail; a failed
// AccumulateEncoded must leave accum unchanged.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <vector>

#include "fuzz/fuzz_check.h"
#include "kernels/codec.h"

#ifndef ZW_FUZZ_CODEC_ID
#error "build with -DZW_FUZZ_CODEC_ID=<CodecId value>"
#endif

namespace zk = zipwire::kernels;

namespace {

constexpr auto kId = static_cast<zk::CodecId>(ZW_FUZZ_CODEC_ID);
constexpr size_t kMaxElements = size_t{1} << 20;
constexpr size_t kCodecIdByte = 5;  // offset of the codec id in the wire header

const zk::Codec* Decoder() {
  static const zk::Codec* codec = [] {
    auto c = zk::CodecForId(kId);
    if (!c.ok()) {
      // A codec that this build does not register: nothing to fuzz.
      std::fprintf(stderr, "note: codec id %d not registered (%s); target is a no-op\n",
                   static_cast<int>(kId), c.status().ToString().c_str());
      return static_cast<const zk::Codec*>(nullptr);
    }
    return c.value();
  }();
  return codec;
}

void DecodeInto(const zk::Codec& codec, std::span<const uint8_t> in, size_t n, bool size_is_right) {
  std::vector<float> out(n, -7.0f);
  const zipwire::Status d = codec.Decompress(in, out);
  if (!size_is_right) ZW_FUZZ_CHECK(!d.ok(), "Decompress accepted a wrong output size");
  std::vector<float> accum(n, 1.0f);
  const zipwire::Status a = codec.DecompressAccumulate(in, accum, 0.5f);
  if (!size_is_right) ZW_FUZZ_CHECK(!a.ok(), "DecompressAccumulate accepted a wrong output size");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const zk::Codec* codec = Decoder();
  if (codec == nullptr) return 0;
  // An exact-size heap copy, so an overread by one byte trips ASan; the codec
  // id byte is forced to this target's codec so that mutations are not
  // wasted on buffers the decoder rejects at its first check (the header
  // fuzzer covers the id itself).
  std::vector<uint8_t> buf(data, data + size);
  if (buf.size() > kCodecIdByte) buf[kCodecIdByte] = static_cast<uint8_t>(kId);
  const std::span<const uint8_t> in(buf);

  auto h = zk::ParseHeader(in);
  // A count over the cap cannot be decoded into the capped span anyway, so a
  // small span stands in for it: the decoder must reject both the same way,
  // and the run stays fast (megabyte spans per input cost ~100x the execs).
  const bool fits = h.ok() && h->elements <= kMaxElements;
  const size_t n = fits ? static_cast<size_t>(h->elements) : size % 67;
  const bool right = fits;
  DecodeInto(*codec, in, n, right);
  // The wrong size: one off either way (off-by-one checks) or, from the last
  // byte, something unrelated.
  const uint8_t pick = size > 0 ? data[size - 1] : 0;
  const size_t wrong = pick % 3 == 0 ? n + 1 : pick % 3 == 1 ? (n > 0 ? n - 1 : 1) : (n + pick) % 4099;
  if (!h.ok() || wrong != h->elements) DecodeInto(*codec, in, wrong, false);

  if (codec->is_linear()) {
    std::vector<uint8_t> accum(buf);
    const std::vector<uint8_t> before(accum);
    const zipwire::Status s = codec->AccumulateEncoded(in, accum);
    if (!s.ok()) ZW_FUZZ_CHECK(accum == before, "failed AccumulateEncoded modified accum");
    // A mutated accumulator against a valid-looking input.
    if (accum.size() > zk::WireHeader::kBytes) {
      accum[accum.size() - 1] ^= 0x5a;
      const std::vector<uint8_t> before2(accum);
      const zipwire::Status s2 = codec->AccumulateEncoded(in, accum);
      if (!s2.ok()) ZW_FUZZ_CHECK(accum == before2, "failed AccumulateEncoded modified accum");
    }
  }
  return 0;
}
