// Decoders treat their input as untrusted network bytes: every malformed
// buffer must give an error status, never a crash or an out-of-bounds access
// (run under -fsanitize=address,undefined to check the latter).
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/codec.h"
#include "tests/kernels/test_util.h"

namespace zipwire::kernels {
namespace {

using testing::Encode;
using testing::MustCreate;
using testing::RandomNormal;

// Both decode entry points must reject `buf` for an output of `n` floats.
void ExpectRejected(const Codec& codec, const std::vector<uint8_t>& buf, size_t n, const char* what) {
  std::vector<float> out(n, 1.0f);
  const Status s1 = codec.Decompress(buf, out);
  EXPECT_FALSE(s1.ok()) << codec.name() << ": " << what << " (" << buf.size() << " bytes, n=" << n << ")";
  const Status s2 = codec.DecompressAccumulate(buf, out, 2.0f);
  EXPECT_FALSE(s2.ok()) << codec.name() << ": " << what << " accumulate";
  EXPECT_EQ(s1.code(), s2.code());
}

void Put64(std::vector<uint8_t>& buf, size_t at, uint64_t v) {
  for (int i = 0; i < 8; ++i) buf[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

class BadInput : public ::testing::TestWithParam<std::string> {};

TEST_P(BadInput, EveryTruncationAndTrailingByte) {
  auto codec = MustCreate(GetParam());
  for (size_t n : {0, 1, 33, 100}) {
    const auto buf = Encode(*codec, RandomNormal(n, 10));
    for (size_t len = 0; len < buf.size(); ++len) {
      std::vector<uint8_t> prefix(buf.begin(), buf.begin() + len);
      ExpectRejected(*codec, prefix, n, "truncated");
    }
    auto longer = buf;
    longer.push_back(0);
    ExpectRejected(*codec, longer, n, "trailing byte");
  }
}

TEST_P(BadInput, CorruptHeaderFields) {
  auto codec = MustCreate(GetParam());
  const size_t n = 40;
  const auto good = Encode(*codec, RandomNormal(n, 11));
  std::vector<float> out(n);
  ASSERT_TRUE(codec->Decompress(good, out).ok());
  for (size_t i = 0; i < 4; ++i) {
    auto b = good;
    b[i] ^= 0x40;
    ExpectRejected(*codec, b, n, "magic");
    EXPECT_EQ(codec->Decompress(b, out).code(), StatusCode::kCorrupt);
  }
  for (uint8_t v : {0, 2, 255}) {
    auto b = good;
    b[4] = v;
    ExpectRejected(*codec, b, n, "version");
  }
  for (uint8_t id : {99, 17, 255}) {  // unregistered ids
    auto b = good;
    b[5] = id;
    ExpectRejected(*codec, b, n, "codec id");
    EXPECT_EQ(codec->Decompress(b, out).code(), StatusCode::kCorrupt);
  }
  for (size_t at : {6, 7, 24, 27, 28, 31}) {  // param_bytes, param_word, reserved
    auto b = good;
    b[at] = b[at] == 1 ? 2 : 1;  // always a change (topk's param_word may be 1)
    ExpectRejected(*codec, b, n, "params/reserved");
  }
  for (uint64_t huge : {std::numeric_limits<uint64_t>::max(), std::numeric_limits<uint64_t>::max() - 31,
                        uint64_t{1} << 63, uint64_t{1} << 62, good.size() - 32 + 1, good.size() - 32 - 1}) {
    auto b = good;
    Put64(b, 16, huge);
    ExpectRejected(*codec, b, n, "payload_bytes");
  }
  // Element counts that disagree with the output span or with the payload;
  // values whose byte size wraps around u64 included.
  // (n - 1 would still need onebit's two words, so it only mismatches the span.)
  {
    auto b = good;
    Put64(b, 8, n - 1);
    ExpectRejected(*codec, b, n, "elements in header");
  }
  for (uint64_t elements :
       {uint64_t{0}, uint64_t{n - 32}, uint64_t{n + 100}, std::numeric_limits<uint64_t>::max(),
        uint64_t{1} << 62, (uint64_t{1} << 63) + n, (uint64_t{1} << 62) + n}) {
    auto b = good;
    Put64(b, 8, elements);
    ExpectRejected(*codec, b, n, "elements in header");
    if (elements < 1000 && testing::PayloadPinsElementCount(GetParam())) {
      ExpectRejected(*codec, b, elements, "elements vs payload");
    }
  }
}

TEST_P(BadInput, OutputSpanMismatch) {
  auto codec = MustCreate(GetParam());
  const auto buf = Encode(*codec, RandomNormal(64, 12));
  for (size_t n : {0, 1, 63, 65, 128}) {
    ExpectRejected(*codec, buf, n, "span size");
    std::vector<float> out(n);
    EXPECT_EQ(codec->Decompress(buf, out).code(), StatusCode::kInvalidArgument);
  }
}

TEST_P(BadInput, OtherCodecsBuffers) {
  auto codec = MustCreate(GetParam());
  for (const auto& other_name : testing::BuiltinCodecs()) {
    auto other = MustCreate(other_name);
    if (other->id() == codec->id()) continue;  // the same codec: self-describing, decodes
    for (size_t n : {0, 5, 64}) {
      const auto buf = Encode(*other, RandomNormal(n, 13));
      ExpectRejected(*codec, buf, n, "other codec");
      std::vector<float> out(n);
      EXPECT_EQ(codec->Decompress(buf, out).code(), StatusCode::kInvalidArgument);
    }
  }
}

TEST_P(BadInput, RandomGarbage) {
  auto codec = MustCreate(GetParam());
  std::mt19937 rng(14);
  auto random_buf = [&rng](size_t len) {
    std::vector<uint8_t> b(len);
    for (auto& c : b) c = static_cast<uint8_t>(rng());
    return b;
  };
  for (size_t len = 0; len <= 300; ++len) {
    const auto b = random_buf(len);
    for (size_t n : {size_t{0}, size_t{1}, len / 2, len / 4}) ExpectRejected(*codec, b, n, "garbage");
  }
  for (int i = 0; i < 2000; ++i) {
    const auto b = random_buf(rng() % 5000);
    ExpectRejected(*codec, b, rng() % 2000, "garbage");
  }
}

// Random mutations of valid encodings get past the magic check and into the
// decoders; the outcome may legitimately be OK (fp16 accepts any bits), but
// must never touch memory out of bounds.
TEST_P(BadInput, MutatedEncodingsStayInBounds) {
  auto codec = MustCreate(GetParam());
  std::mt19937 rng(15);
  for (int i = 0; i < 2000; ++i) {
    const size_t n = rng() % 200;
    auto b = Encode(*codec, RandomNormal(n, 16 + i));
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips && !b.empty(); ++f)
      b[rng() % b.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
    if (rng() % 4 == 0) b.resize(rng() % (b.size() + 8));
    std::vector<float> out(n);
    (void)codec->Decompress(b, out);
    (void)codec->DecompressAccumulate(b, out, 0.5f);
  }
}

INSTANTIATE_TEST_SUITE_P(Codecs, BadInput, ::testing::ValuesIn(testing::BuiltinCodecs()));

TEST(OnebitBadInput, ScaleAndPadding) {
  auto codec = MustCreate("onebit");
  const size_t n = 40;
  const auto good = Encode(*codec, RandomNormal(n, 17));
  for (float scale :
       {-1.0f, -0.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    auto b = good;
    std::memcpy(b.data() + 32, &scale, 4);
    ExpectRejected(*codec, b, n, "scale");
    std::vector<float> out(n);
    EXPECT_EQ(codec->Decompress(b, out).code(), StatusCode::kCorrupt);
  }
  auto b = good;
  b.back() |= 0x80;  // bit 31 of the last word: element 63 of 40
  ExpectRejected(*codec, b, n, "padding bits");
}

}  // namespace
}  // namespace zipwire::kernels
