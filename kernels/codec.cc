// Codec specs and the wire header.
//
// Header layout (32 bytes, every field little-endian, packed byte by byte so
// the layout never depends on struct padding or host order):
//   [0, 4)   magic 0x3143575a ("ZWC1" read as bytes 5a 57 43 31)
//   [4]      version (1)
//   [5]      codec id (CodecId)
//   [6, 8)   param_bytes: size of the parameter block after the header
//   [8, 16)  elements: float count encoded
//   [16, 24) payload_bytes: bytes after header + parameter block
//   [24, 28) param_word: small codec parameter, 0 if unused
//   [28, 32) reserved, must be zero (so a future use is detectable)
#include "kernels/codec.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <string>

#include "kernels/codec_internal.h"

namespace zipwire::kernels {

namespace {

using internal::LoadLe64;
using internal::StoreLe64;

// Names and keys: lower-case identifiers, so specs stay unambiguous in env vars.
bool IsIdentChar(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'; }
bool IsValueChar(char c) {
  // Anything printable except the separators and spaces.
  return std::isgraph(static_cast<unsigned char>(c)) && c != ',' && c != '=' && c != ':';
}
bool AllOf(const std::string& s, bool (*pred)(char)) {
  for (char c : s) {
    if (!pred(c)) return false;
  }
  return true;
}

std::string Trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

}  // namespace

const char* CodecIdName(CodecId id) {
  switch (id) {
    case CodecId::kNone:
      return "none";
    case CodecId::kFp16:
      return "fp16";
    case CodecId::kOnebit:
      return "onebit";
    case CodecId::kBf16:
      return "bf16";
    case CodecId::kTopk:
      return "topk";
    case CodecId::kTopkSampled:
      return "topk_sampled";
    case CodecId::kRandomk:
      return "randomk";
    case CodecId::kDithering:
      return "dithering";
    case CodecId::kTerngrad:
      return "terngrad";
    case CodecId::kCountSketch:
      return "countsketch";
  }
  return "unknown";
}

Result<CodecSpec> CodecSpec::Parse(const std::string& raw) {
  const std::string text = Trim(raw);
  auto bad = [&raw](const std::string& why) {
    return InvalidArgument("codec spec '" + raw + "': " + why +
                           " (expected NAME, NAME:VALUE or NAME:key=value[,key=value])");
  };
  if (text.empty()) return bad("empty spec");
  CodecSpec spec;
  const size_t colon = text.find(':');
  spec.name = text.substr(0, colon);
  if (spec.name.empty()) return bad("empty codec name");
  if (!AllOf(spec.name, IsIdentChar)) return bad("codec name must be [a-z0-9_-]");
  if (colon == std::string::npos) return spec;

  const std::string rest = text.substr(colon + 1);
  if (rest.empty()) return bad("empty parameters after ':'");
  if (rest.find('=') == std::string::npos) {
    // A bare value: "topk:0.01".
    if (!AllOf(rest, IsValueChar)) return bad("bad character in value '" + rest + "'");
    spec.params["value"] = rest;
    return spec;
  }
  size_t pos = 0;
  while (true) {
    const size_t comma = rest.find(',', pos);
    const std::string item = rest.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    const size_t eq = item.find('=');
    if (eq == std::string::npos && pos == 0 && !item.empty()) {
      // A leading bare value with keys after it: "randomk:0.01,scale=1".
      if (!AllOf(item, IsValueChar)) return bad("bad character in value '" + item + "'");
      spec.params["value"] = item;
      pos = comma + 1;  // comma exists: rest has a '=' after this item
      continue;
    }
    if (eq == std::string::npos) return bad("parameter '" + item + "' is not key=value");
    const std::string key = item.substr(0, eq);
    const std::string value = item.substr(eq + 1);
    if (key.empty()) return bad("empty parameter name in '" + item + "'");
    if (!AllOf(key, IsIdentChar)) return bad("parameter name '" + key + "' must be [a-z0-9_-]");
    if (value.empty()) return bad("empty value for parameter '" + key + "'");
    if (!AllOf(value, IsValueChar)) return bad("bad character in value of '" + key + "'");
    if (!spec.params.emplace(key, value).second) return bad("duplicate parameter '" + key + "'");
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return spec;
}

std::string CodecSpec::ToString() const {
  if (params.empty()) return name;
  if (params.size() == 1 && params.begin()->first == "value") return name + ":" + params.begin()->second;
  std::string s = name + ":";
  bool first = true;
  for (const auto& [k, v] : params) {
    if (!first) s += ',';
    first = false;
    s += k + "=" + v;
  }
  return s;
}

void EncodeHeader(const WireHeader& header, std::span<uint8_t, WireHeader::kBytes> out) {
  uint8_t* p = out.data();
  internal::StoreLe32(p, WireHeader::kMagic);
  p[4] = header.version;
  p[5] = static_cast<uint8_t>(header.codec);
  p[6] = static_cast<uint8_t>(header.param_bytes);
  p[7] = static_cast<uint8_t>(header.param_bytes >> 8);
  StoreLe64(p + 8, header.elements);
  StoreLe64(p + 16, header.payload_bytes);
  internal::StoreLe32(p + 24, header.param_word);
  internal::StoreLe32(p + 28, 0);
}

Result<WireHeader> ParseHeader(std::span<const uint8_t> in) {
  if (in.size() < WireHeader::kBytes) {
    return Corrupt("codec buffer of " + std::to_string(in.size()) + " bytes is shorter than the " +
                   std::to_string(WireHeader::kBytes) + "-byte header");
  }
  const uint8_t* p = in.data();
  const uint32_t magic = internal::LoadLe32(p);
  if (magic != WireHeader::kMagic) {
    char buf[64];
    snprintf(buf, sizeof(buf), "bad magic 0x%08x (expected 0x%08x)", magic, WireHeader::kMagic);
    return Corrupt(buf);
  }
  WireHeader h;
  h.version = p[4];
  if (h.version != WireHeader::kVersion) {
    return Corrupt("unsupported wire version " + std::to_string(h.version) + " (expected " +
                   std::to_string(WireHeader::kVersion) + ")");
  }
  // Known = registered, so a codec added through RegisterCodec can use the header too.
  if (!internal::IsRegisteredCodecId(p[5])) return Corrupt("unknown codec id " + std::to_string(p[5]));
  h.codec = static_cast<CodecId>(p[5]);
  h.param_bytes = static_cast<uint16_t>(p[6] | (p[7] << 8));
  h.elements = LoadLe64(p + 8);
  h.payload_bytes = LoadLe64(p + 16);
  h.param_word = internal::LoadLe32(p + 24);
  if (internal::LoadLe32(p + 28) != 0) return Corrupt("reserved header bytes are not zero");

  // Subtract from the real size rather than add the untrusted fields, which
  // could wrap around (payload_bytes is a full u64).
  const uint64_t after_header = in.size() - WireHeader::kBytes;
  if (h.param_bytes > after_header || h.payload_bytes != after_header - h.param_bytes) {
    return Corrupt("header says " + std::to_string(WireHeader::kBytes) + " + " +
                   std::to_string(h.param_bytes) + " param + " + std::to_string(h.payload_bytes) +
                   " payload bytes but the buffer has " + std::to_string(in.size()) + " bytes");
  }
  return h;
}

Result<size_t> Codec::CompressWithFeedback(std::span<const float> input, std::span<float> residual,
                                           FeedbackState& state, std::span<uint8_t> out,
                                           const CodecContext& ctx) const {
  ZW_RETURN_IF_ERROR(internal::CheckOutputSize(*this, input.size(), out.size()));
  if (residual.size() != input.size()) {
    return InvalidArgument(name() + ": residual of " + std::to_string(residual.size()) + " elements for " +
                           std::to_string(input.size()) + " inputs");
  }
  if (state.deferred) FinishResidual(residual, state);
  float* r = residual.data();
  const size_t n = input.size();
  for (size_t i = 0; i < n; ++i) r[i] += input[i];  // r = x + e (addition commutes exactly)
  ZW_ASSIGN_OR_RETURN(size_t written, Compress(residual, out, ctx));
  const Status back = DecompressAccumulate(out.first(written), residual, -1.0f);
  if (!back.ok()) {
    // The codec could not decode its own output: a bug, not bad input.
    return Internal(name() + " rejected its own encoding: " + back.ToString());
  }
  return written;
}

namespace internal {

Status CheckOutputSize(const Codec& codec, size_t elements, size_t out_size) {
  const size_t need = codec.MaxCompressedBytes(elements);
  if (out_size < need) {
    return InvalidArgument(codec.name() + ": output buffer of " + std::to_string(out_size) +
                           " bytes is smaller than the " + std::to_string(need) + " bytes needed for " +
                           std::to_string(elements) + " elements");
  }
  return Status::Ok();
}

void WriteSimpleHeader(CodecId id, uint64_t elements, uint64_t payload_bytes, std::span<uint8_t> out) {
  WireHeader h;
  h.codec = id;
  h.elements = elements;
  h.payload_bytes = payload_bytes;
  EncodeHeader(h, out.first<WireHeader::kBytes>());
}

Result<std::span<const uint8_t>> ValidateSimple(std::span<const uint8_t> in, CodecId id, size_t out_elements,
                                                size_t expected_payload) {
  ZW_ASSIGN_OR_RETURN(WireHeader h, ParseHeader(in));
  const std::string who = CodecIdName(id);
  if (h.codec != id) {
    return InvalidArgument(who + " codec given a buffer encoded by " + CodecIdName(h.codec));
  }
  if (h.param_bytes != 0 || h.param_word != 0) {
    return Corrupt(who + " buffer carries parameters (" + std::to_string(h.param_bytes) + " bytes, word " +
                   std::to_string(h.param_word) + ") but the codec has none");
  }
  if (h.elements != out_elements) {
    return InvalidArgument(who + " buffer encodes " + std::to_string(h.elements) +
                           " elements but the output holds " + std::to_string(out_elements));
  }
  if (h.payload_bytes != expected_payload) {
    return Corrupt(who + " payload is " + std::to_string(h.payload_bytes) + " bytes but " +
                   std::to_string(out_elements) + " elements need " + std::to_string(expected_payload));
  }
  return in.subspan(WireHeader::kBytes);
}

Status AccumulateEncoded16(CodecId id, std::span<const uint8_t> in, std::span<uint8_t> accum,
                           Decode16Fn decode, Encode16Fn encode) {
  ZW_ASSIGN_OR_RETURN(WireHeader ha, ParseHeader(accum));
  const std::string who = CodecIdName(id);
  if (ha.codec != id) {
    return InvalidArgument(who + ": accumulator is encoded by " + CodecIdName(ha.codec) + ", not " + who);
  }
  const size_t n = ha.elements;
  // payload_bytes was checked against the real size, so n * 2 cannot wrap.
  if (ha.payload_bytes / 2 != n || ha.payload_bytes % 2 != 0) {
    return Corrupt(who + ": accumulator payload does not hold its element count");
  }
  ZW_ASSIGN_OR_RETURN(auto src, ValidateSimple(in, id, n, n * 2));
  ZW_RETURN_IF_ERROR(ValidateSimple(accum, id, n, n * 2).status());
  uint8_t* dst = accum.data() + WireHeader::kBytes;
  constexpr size_t kBlock = 1024;
  float a[kBlock], b[kBlock];
  for (size_t base = 0; base < n; base += kBlock) {
    const size_t len = std::min(kBlock, n - base);
    decode(dst + 2 * base, a, len);
    decode(src.data() + 2 * base, b, len);
    for (size_t i = 0; i < len; ++i) a[i] += b[i];
    encode(a, dst + 2 * base, len);
  }
  return Status::Ok();
}

Status RejectParams(const CodecSpec& spec) {
  if (spec.params.empty()) return Status::Ok();
  return InvalidArgument("codec '" + spec.name + "' takes no parameters, got '" + spec.ToString() + "'");
}

Result<WireHeader> ValidateHeader(std::span<const uint8_t> in, CodecId id, size_t out_elements) {
  ZW_ASSIGN_OR_RETURN(WireHeader h, ParseHeader(in));
  const std::string who = CodecIdName(id);
  if (h.codec != id) {
    return InvalidArgument(who + " codec given a buffer encoded by " + CodecIdName(h.codec));
  }
  if (h.elements != out_elements) {
    return InvalidArgument(who + " buffer encodes " + std::to_string(h.elements) +
                           " elements but the output holds " + std::to_string(out_elements));
  }
  return h;
}

Status CheckKeys(const CodecSpec& spec, std::initializer_list<const char*> allowed) {
  for (const auto& [key, value] : spec.params) {
    bool known = false;
    for (const char* a : allowed) known = known || key == a;
    if (!known) {
      std::string list;
      for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + a;
      return InvalidArgument("codec '" + spec.name + "': unknown parameter '" + key + "' (known: " + list + ")");
    }
  }
  return Status::Ok();
}

bool IsRatioOrCount(double v) {
  if (!(v > 0.0)) return false;  // also rejects NaN
  if (v < 1.0) return true;
  return v <= 4294967295.0 && v == std::floor(v);
}

Result<double> ParseRatioOrCount(const CodecSpec& spec, const std::string& key, double fallback) {
  auto it = spec.params.find(key);
  if (it == spec.params.end()) return fallback;
  const std::string& text = it->second;
  double v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || !IsRatioOrCount(v)) {
    return InvalidArgument("codec '" + spec.name + "': '" + text +
                           "' is neither a ratio in (0, 1) nor an integer count in [1, 2^32)");
  }
  return v;
}

Result<uint64_t> ParseUint(const CodecSpec& spec, const std::string& key, uint64_t fallback, uint64_t lo,
                           uint64_t hi) {
  auto it = spec.params.find(key);
  if (it == spec.params.end()) return fallback;
  const std::string& text = it->second;
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || v < lo || v > hi) {
    return InvalidArgument("codec '" + spec.name + "': " + key + "=" + text + " is not an integer in [" +
                           std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  return v;
}

std::string FormatNumber(double v) {
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

size_t KFor(double v, size_t n) {
  if (n == 0) return 0;
  double k = v < 1.0 ? std::max(1.0, std::round(v * static_cast<double>(n))) : v;
  return k >= static_cast<double>(n) ? n : static_cast<size_t>(k);
}

}  // namespace internal
}  // namespace zipwire::kernels
