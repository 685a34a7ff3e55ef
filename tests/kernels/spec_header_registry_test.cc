// CodecSpec parsing, the wire header and the registry.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kernels/codec.h"

namespace zipwire::kernels {
namespace {

TEST(CodecSpec, ParsesBareNames) {
  for (const char* name : {"onebit", "fp16", "none"}) {
    auto spec = CodecSpec::Parse(name);
    ASSERT_TRUE(spec.ok()) << spec.status().ToString();
    EXPECT_EQ(spec->name, name);
    EXPECT_TRUE(spec->params.empty());
  }
}

TEST(CodecSpec, ParsesBareValue) {
  auto spec = CodecSpec::Parse("topk:0.01");
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  EXPECT_EQ(spec->name, "topk");
  EXPECT_EQ(spec->params, (std::map<std::string, std::string>{{"value", "0.01"}}));
}

TEST(CodecSpec, ParsesKeyValues) {
  auto spec = CodecSpec::Parse("dithering:s=16,norm=l2");
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  EXPECT_EQ(spec->name, "dithering");
  EXPECT_EQ(spec->params, (std::map<std::string, std::string>{{"s", "16"}, {"norm", "l2"}}));
}

TEST(CodecSpec, TrimsSurroundingSpace) {
  auto spec = CodecSpec::Parse("  onebit \n");
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  EXPECT_EQ(spec->name, "onebit");
}

TEST(CodecSpec, RejectsBadSyntax) {
  for (const char* text : {"", "   ", ":", ":0.1", "onebit:", "topk:a=", "topk:=1", "topk:a=1,",
                           "topk:a=1,,b=2", "topk:a=1,b", "topk:a=1,a=2", "One bit", "Onebit", "top k:1",
                           "topk:0.1,0.2", "topk:a=1=2", "topk:a:b", "topk:a b"}) {
    auto spec = CodecSpec::Parse(text);
    EXPECT_FALSE(spec.ok()) << "'" << text << "' parsed as " << spec->ToString();
    if (!spec.ok()) {
      EXPECT_EQ(spec.status().code(), StatusCode::kInvalidArgument) << text;
      EXPECT_NE(spec.status().message().find("codec spec"), std::string::npos) << spec.status().message();
    }
  }
  EXPECT_NE(CodecSpec::Parse("").status().message().find("empty"), std::string::npos);
  EXPECT_NE(CodecSpec::Parse(":x").status().message().find("empty codec name"), std::string::npos);
}

TEST(CodecSpec, ParsesLeadingBareValueWithKeys) {
  auto spec = CodecSpec::Parse("randomk:0.01,scale=1");
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  EXPECT_EQ(spec->params, (std::map<std::string, std::string>{{"value", "0.01"}, {"scale", "1"}}));
  auto again = CodecSpec::Parse(spec->ToString());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->params, spec->params);
  for (const char* text :
       {"randomk:0.01,0.02,a=1", "randomk:a=1,0.01", "randomk:0.01,value=2", "randomk:0.01,"}) {
    EXPECT_FALSE(CodecSpec::Parse(text).ok()) << text;
  }
}

TEST(CodecSpec, RoundTrips) {
  for (const char* text :
       {"onebit", "fp16", "none", "topk:0.01", "dithering:norm=l2,s=16", "x:a=1,value=2"}) {
    auto spec = CodecSpec::Parse(text);
    ASSERT_TRUE(spec.ok()) << text << ": " << spec.status().ToString();
    EXPECT_EQ(spec->ToString(), text);
    auto again = CodecSpec::Parse(spec->ToString());
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->name, spec->name);
    EXPECT_EQ(again->params, spec->params);
  }
  // Keys come out sorted, so the text is canonical.
  EXPECT_EQ(CodecSpec::Parse("dithering:s=16,norm=l2")->ToString(), "dithering:norm=l2,s=16");
}

TEST(CodecIdName, NamesEveryId) {
  EXPECT_STREQ(CodecIdName(CodecId::kNone), "none");
  EXPECT_STREQ(CodecIdName(CodecId::kFp16), "fp16");
  EXPECT_STREQ(CodecIdName(CodecId::kOnebit), "onebit");
  EXPECT_STREQ(CodecIdName(CodecId::kBf16), "bf16");
  EXPECT_STREQ(CodecIdName(CodecId::kTopk), "topk");
  EXPECT_STREQ(CodecIdName(CodecId::kTopkSampled), "topk_sampled");
  EXPECT_STREQ(CodecIdName(CodecId::kRandomk), "randomk");
  EXPECT_STREQ(CodecIdName(CodecId::kDithering), "dithering");
  EXPECT_STREQ(CodecIdName(CodecId::kTerngrad), "terngrad");
  EXPECT_STREQ(CodecIdName(CodecId::kCountSketch), "countsketch");
  EXPECT_STREQ(CodecIdName(static_cast<CodecId>(77)), "unknown");
}

WireHeader SampleHeader() {
  WireHeader h;
  h.codec = CodecId::kOnebit;
  h.param_bytes = 0x0102;
  h.elements = 0x1122334455667788ull;
  h.payload_bytes = 5;
  h.param_word = 0xa1b2c3d4u;
  return h;
}

TEST(WireHeader, EncodesLittleEndianLayout) {
  std::array<uint8_t, 32> b{};
  EncodeHeader(SampleHeader(), b);
  const std::array<uint8_t, 32> expected = {0x5a, 0x57, 0x43, 0x31,                          // magic "ZWC1"
                                            0x01, 0x02,                                      // version, codec
                                            0x02, 0x01,                                      // param_bytes
                                            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,  // elements
                                            0x05, 0,    0,    0,    0,    0,    0,    0,     // payload_bytes
                                            0xd4, 0xc3, 0xb2, 0xa1,                          // param_word
                                            0,    0,    0,    0};                            // reserved
  EXPECT_EQ(b, expected);
}

TEST(WireHeader, ParsesWhatItEncodes) {
  const WireHeader h = SampleHeader();
  std::vector<uint8_t> buf(32 + h.param_bytes + h.payload_bytes, 0xee);
  EncodeHeader(h, std::span<uint8_t, 32>(buf.data(), 32));
  auto parsed = ParseHeader(buf);
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->version, WireHeader::kVersion);
  EXPECT_EQ(parsed->codec, h.codec);
  EXPECT_EQ(parsed->param_bytes, h.param_bytes);
  EXPECT_EQ(parsed->elements, h.elements);
  EXPECT_EQ(parsed->payload_bytes, h.payload_bytes);
  EXPECT_EQ(parsed->param_word, h.param_word);
}

std::vector<uint8_t> HeaderOnly(uint64_t payload) {
  WireHeader h;
  h.codec = CodecId::kFp16;
  h.payload_bytes = payload;
  std::vector<uint8_t> buf(32);
  EncodeHeader(h, std::span<uint8_t, 32>(buf.data(), 32));
  return buf;
}

void ExpectCorrupt(const std::vector<uint8_t>& buf, const std::string& needle) {
  auto parsed = ParseHeader(buf);
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(parsed.status().message().find(needle), std::string::npos) << parsed.status().message();
}

TEST(WireHeader, RejectsMalformed) {
  ASSERT_TRUE(ParseHeader(HeaderOnly(0)).ok());
  ExpectCorrupt({}, "shorter than");
  ExpectCorrupt(std::vector<uint8_t>(31), "31 bytes");
  auto b = HeaderOnly(0);
  b[0] ^= 1;
  ExpectCorrupt(b, "magic");
  b = HeaderOnly(0);
  b[4] = 2;
  ExpectCorrupt(b, "version 2");
  b = HeaderOnly(0);
  b[5] = 99;
  ExpectCorrupt(b, "codec id 99");
  b = HeaderOnly(0);
  b[31] = 1;
  ExpectCorrupt(b, "reserved");
  // Sizes: trailing byte, missing payload, and payload_bytes values that wrap.
  b = HeaderOnly(0);
  b.push_back(0);
  ExpectCorrupt(b, "33 bytes");
  ExpectCorrupt(HeaderOnly(1), "1 payload");
  for (uint64_t huge : {std::numeric_limits<uint64_t>::max(), std::numeric_limits<uint64_t>::max() - 31,
                        std::numeric_limits<uint64_t>::max() - 30, uint64_t{1} << 63}) {
    b = HeaderOnly(huge);
    b.resize(40);
    ExpectCorrupt(b, "40 bytes");
  }
  // param_bytes larger than what follows the header.
  WireHeader h;
  h.param_bytes = 0xffff;
  b.assign(32 + 10, 0);
  EncodeHeader(h, std::span<uint8_t, 32>(b.data(), 32));
  ExpectCorrupt(b, "65535 param");
}

TEST(Registry, CreatesBuiltins) {
  for (auto [name, id] : {std::pair{"none", CodecId::kNone}, std::pair{"fp16", CodecId::kFp16},
                          std::pair{"onebit", CodecId::kOnebit}}) {
    auto codec = CreateCodec(name);
    ASSERT_TRUE(codec.ok()) << codec.status().ToString();
    EXPECT_EQ((*codec)->id(), id);
    EXPECT_EQ((*codec)->name(), name);
    auto by_id = CodecForId(id);
    ASSERT_TRUE(by_id.ok()) << by_id.status().ToString();
    EXPECT_EQ((*by_id)->id(), id);
    EXPECT_EQ(CodecForId(id).value(), by_id.value()) << "CodecForId must hand out one shared instance";
  }
}

TEST(Registry, CreatesEveryCodecAndItsNameRebuildsIt) {
  for (const char* text : {"bf16",
                           "topk",
                           "topk:0.05",
                           "topk:100",
                           "topk_sampled",
                           "topk_sampled:0.001",
                           "randomk",
                           "randomk:0.1",
                           "randomk:0.1,scale=1",
                           "randomk:7,scale=0",
                           "dithering",
                           "dithering:s=3",
                           "dithering:levels=natural,s=8",
                           "dithering:norm=max,s=255",
                           "dithering:bucket=0",
                           "dithering:bucket=128,s=5",
                           "terngrad",
                           "countsketch",
                           "countsketch:r=7,c=100",
                           "countsketch:k=3,r=1,c=8"}) {
    auto codec = CreateCodec(text);
    ASSERT_TRUE(codec.ok()) << text << ": " << codec.status().ToString();
    auto again = CreateCodec((*codec)->name());
    ASSERT_TRUE(again.ok()) << (*codec)->name() << ": " << again.status().ToString();
    EXPECT_EQ((*again)->name(), (*codec)->name());
    EXPECT_EQ((*again)->id(), (*codec)->id());
    EXPECT_TRUE(CodecForId((*codec)->id()).ok()) << text;
  }
}

TEST(Registry, RejectsBadCodecParameters) {
  for (const char* text : {"bf16:1",
                           "terngrad:x=1",
                           "topk:0",
                           "topk:-0.5",
                           "topk:1.5",
                           "topk:abc",
                           "topk:nan",
                           "topk:inf",
                           "topk:1e10",
                           "topk:k=5",
                           "topk_sampled:0",
                           "randomk:0",
                           "randomk:0.1,scale=2",
                           "randomk:0.1,foo=1",
                           "dithering:s=0",
                           "dithering:s=65536",
                           "dithering:levels=natural,s=33",
                           "dithering:levels=log",
                           "dithering:norm=l1",
                           "dithering:s=x",
                           "dithering:bucket=64",
                           "dithering:bucket=100",
                           "dithering:bucket=16384",
                           "dithering:bucket=-1",
                           "countsketch:r=0",
                           "countsketch:r=65",
                           "countsketch:c=0",
                           "countsketch:k=0",
                           "countsketch:d=3"}) {
    auto codec = CreateCodec(text);
    ASSERT_FALSE(codec.ok()) << text;
    EXPECT_EQ(codec.status().code(), StatusCode::kInvalidArgument) << text;
  }
}

TEST(Registry, UnknownNameListsKnownCodecs) {
  auto codec = CreateCodec("nosuchcodec");
  ASSERT_FALSE(codec.ok());
  EXPECT_EQ(codec.status().code(), StatusCode::kNotFound);
  const std::string& msg = codec.status().message();
  EXPECT_NE(msg.find("nosuchcodec"), std::string::npos) << msg;
  for (const char* known : {"none", "fp16", "onebit"}) EXPECT_NE(msg.find(known), std::string::npos) << msg;
  EXPECT_EQ(CodecForId(static_cast<CodecId>(250)).status().code(), StatusCode::kNotFound);
}

TEST(Registry, RejectsParamsForParameterlessCodecs) {
  for (const char* text : {"onebit:x=1", "fp16:0.5", "none:a=b,c=d"}) {
    auto codec = CreateCodec(text);
    ASSERT_FALSE(codec.ok()) << text;
    EXPECT_EQ(codec.status().code(), StatusCode::kInvalidArgument) << text;
  }
  EXPECT_EQ(CreateCodec("onebit:").status().code(), StatusCode::kInvalidArgument);
}

class DummyCodec : public Codec {
 public:
  CodecId id() const override { return static_cast<CodecId>(200); }
  std::string name() const override { return "test-dummy"; }
  size_t MaxCompressedBytes(size_t) const override { return 32; }
  Result<size_t> Compress(std::span<const float>, std::span<uint8_t>, const CodecContext&) const override {
    return NotSupported("dummy");
  }
  Status Decompress(std::span<const uint8_t>, std::span<float>) const override {
    return NotSupported("dummy");
  }
  Status DecompressAccumulate(std::span<const uint8_t>, std::span<float>, float) const override {
    return NotSupported("dummy");
  }
  double ErrorBoundL2(std::span<const float>) const override { return 0; }
};

Result<std::unique_ptr<Codec>> MakeDummy(const CodecSpec&) { return std::unique_ptr<Codec>(new DummyCodec); }

TEST(Registry, RegistersAndRejectsDuplicates) {
  const auto id = static_cast<CodecId>(200);
  ASSERT_TRUE(RegisterCodec("test-dummy", id, MakeDummy).ok());
  auto codec = CreateCodec("test-dummy");
  ASSERT_TRUE(codec.ok()) << codec.status().ToString();
  EXPECT_EQ((*codec)->name(), "test-dummy");
  EXPECT_EQ(CodecForId(id).value()->name(), "test-dummy");
  // A registered id is a known id to the wire header.
  WireHeader h;
  h.codec = id;
  std::vector<uint8_t> buf(32);
  EncodeHeader(h, std::span<uint8_t, 32>(buf.data(), 32));
  auto parsed = ParseHeader(buf);
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->codec, id);
  buf[5] = 201;
  EXPECT_EQ(ParseHeader(buf).status().code(), StatusCode::kCorrupt);
  EXPECT_EQ(RegisterCodec("test-dummy", static_cast<CodecId>(201), MakeDummy).code(),
            StatusCode::kAlreadyExists);
  EXPECT_EQ(RegisterCodec("onebit", static_cast<CodecId>(202), MakeDummy).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(RegisterCodec("other", CodecId::kFp16, MakeDummy).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(RegisterCodec("", static_cast<CodecId>(203), MakeDummy).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RegisterCodec("bad name", static_cast<CodecId>(203), MakeDummy).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(RegisterCodec("x:1", static_cast<CodecId>(203), MakeDummy).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RegisterCodec("nullfactory", static_cast<CodecId>(203), nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace zipwire::kernels
