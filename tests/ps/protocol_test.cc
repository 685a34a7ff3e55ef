#include "ps/protocol.h"

#include <gtest/gtest.h>

#include <random>

namespace zipwire::ps {
namespace {

DeclareMessage SampleDeclare() {
  DeclareMessage m;
  m.tensor_id = 42;
  m.elements = 1000000;
  m.partition_bytes = 4 << 20;
  m.codec = "onebit";
  m.flags = kFlagServerErrorFeedback;
  m.worker_recv = transport::RemoteRegion{7, 0x1000, 4096};
  m.chunks = {{0, 11, 0, 2048}, {1, 12, 2048, 2048}};
  return m;
}

TEST(Protocol, DeclareRoundTrips) {
  auto bytes = Encode(SampleDeclare());
  ASSERT_EQ(*PeekType(bytes), MessageType::kDeclare);
  auto m = DecodeDeclare(bytes);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->tensor_id, 42u);
  EXPECT_EQ(m->codec, "onebit");
  EXPECT_EQ(m->worker_recv.key, 7u);
  ASSERT_EQ(m->chunks.size(), 2u);
  EXPECT_EQ(m->chunks[1].worker_handle, 12u);
  EXPECT_EQ(m->chunks[1].recv_offset, 2048u);
}

TEST(Protocol, DeclareAckRoundTrips) {
  DeclareAckMessage a;
  a.tensor_id = 3;
  a.code = StatusCode::kInvalidArgument;
  a.message = "mismatch";
  a.server_slots = transport::RemoteRegion{9, 0x2000, 8192};
  a.chunks = {{0, 5, 0, 4096}};
  auto m = DecodeDeclareAck(Encode(a));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->code, StatusCode::kInvalidArgument);
  EXPECT_EQ(m->message, "mismatch");
  EXPECT_EQ(m->chunks[0].server_handle, 5u);
}

TEST(Protocol, EveryTruncationAndTrailingByteIsRejected) {
  auto bytes = Encode(SampleDeclare());
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto m = DecodeDeclare(std::span<const uint8_t>(bytes.data(), n));
    EXPECT_FALSE(m.ok()) << "prefix of " << n << " bytes";
  }
  bytes.push_back(0);
  EXPECT_EQ(DecodeDeclare(bytes).status().code(), StatusCode::kCorrupt);
}

TEST(Protocol, HugeChunkCountIsRejectedBeforeAllocating) {
  auto bytes = Encode(SampleDeclare());
  // The count sits right before the two 24-byte chunk records.
  size_t count_at = bytes.size() - 2 * 24 - 4;
  bytes[count_at] = 0xff;
  bytes[count_at + 1] = 0xff;
  bytes[count_at + 2] = 0xff;
  bytes[count_at + 3] = 0x7f;
  EXPECT_EQ(DecodeDeclare(bytes).status().code(), StatusCode::kCorrupt);
}

TEST(Protocol, GarbageNeverCrashes) {
  std::mt19937 rng(5);
  for (int i = 0; i < 3000; ++i) {
    std::vector<uint8_t> buf(rng() % 200);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    if (!buf.empty() && i % 2) buf[0] = static_cast<uint8_t>(1 + i % 2);
    (void)PeekType(buf);
    (void)DecodeDeclare(buf);
    (void)DecodeDeclareAck(buf);
  }
  EXPECT_FALSE(PeekType({}).ok());
}

}  // namespace
}  // namespace zipwire::ps
