#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <set>
#include <vector>

#include "offload/aligned_buffer.h"
#include "offload/chunk_header.h"
#include "offload/chunking.h"
#include "offload/thread_pool.h"
#include "offload/timings.h"

namespace zipwire::offload {
namespace {

TEST(Chunking, CoversTensorExactlyOnce) {
  for (size_t elements : {1ul, 7ul, 1024ul, 1025ul, 3000001ul}) {
    auto chunks = PlanChunks(elements, 4096);
    ASSERT_TRUE(chunks.ok()) << chunks.status().ToString();
    size_t next = 0;
    for (size_t i = 0; i < chunks->size(); ++i) {
      const Chunk& c = (*chunks)[i];
      EXPECT_EQ(c.index, i);
      EXPECT_EQ(c.offset, next);
      EXPECT_GT(c.count, 0u);
      EXPECT_LE(c.count, 1024u);
      next += c.count;
    }
    EXPECT_EQ(next, elements);
  }
}

TEST(Chunking, EmptyTensorHasOneEmptyChunk) {
  auto chunks = PlanChunks(0, 4096);
  ASSERT_TRUE(chunks.ok());
  ASSERT_EQ(chunks->size(), 1u);
  EXPECT_EQ((*chunks)[0].count, 0u);
}

TEST(Chunking, RejectsBadPartitions) {
  EXPECT_EQ(PlanChunks(10, 2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanChunks(size_t{1} << 40, 4).status().code(), StatusCode::kInvalidArgument);
}

TEST(Chunking, PartitionFromEnvironment) {
  setenv("ZIPWIRE_PARTITION_BYTES", "64k", 1);
  auto v = PartitionBytesFromEnv();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 65536u);
  setenv("ZIPWIRE_PARTITION_BYTES", "12x", 1);
  auto bad = PartitionBytesFromEnv();
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("ZIPWIRE_PARTITION_BYTES"), std::string::npos);
  setenv("ZIPWIRE_PARTITION_BYTES", "100", 1);
  EXPECT_FALSE(PartitionBytesFromEnv().ok());
  unsetenv("ZIPWIRE_PARTITION_BYTES");
  EXPECT_EQ(*PartitionBytesFromEnv(), kDefaultPartitionBytes);
}

TEST(Chunking, ServerPlacementIsStableAndSpread) {
  std::vector<int> per_server(4, 0);
  for (uint64_t t = 0; t < 50; ++t) {
    for (uint32_t c = 0; c < 20; ++c) {
      uint32_t s = ServerForChunk(t, c, 4);
      ASSERT_LT(s, 4u);
      EXPECT_EQ(s, ServerForChunk(t, c, 4));
      ++per_server[s];
    }
  }
  for (int n : per_server) EXPECT_GT(n, 150);  // 1000 chunks over 4 servers
  EXPECT_EQ(ServerForChunk(3, 9, 1), 0u);
}

TEST(ChunkHeader, AcceptsOnlyTheExpectedChunkAndStep) {
  uint8_t buf[ChunkHeader::kBytes + 4] = {};
  WriteChunkHeader(ChunkHeader{7, 3, 2}, buf);
  EXPECT_TRUE(CheckChunkHeader(buf, ChunkHeader{7, 3, 2}).ok());
  EXPECT_EQ(CheckChunkHeader(buf, ChunkHeader{8, 3, 2}).code(), StatusCode::kCorrupt);
  EXPECT_EQ(CheckChunkHeader(buf, ChunkHeader{7, 4, 2}).code(), StatusCode::kCorrupt);
  EXPECT_EQ(CheckChunkHeader(std::span<const uint8_t>(buf, 15), ChunkHeader{7, 3, 2}).code(),
            StatusCode::kCorrupt);
  buf[0] ^= 1;
  EXPECT_EQ(CheckChunkHeader(buf, ChunkHeader{7, 3, 2}).code(), StatusCode::kCorrupt);
}

TEST(ThreadPool, RunsEveryTaskBeforeShutdownReturns) {
  std::atomic<int> sum{0};
  {
    ThreadPool pool(3);
    for (int i = 1; i <= 1000; ++i) pool.Submit([&sum, i] { sum += i; });
    pool.Shutdown();
  }
  EXPECT_EQ(sum.load(), 500500);
}

TEST(TimingLog, KeepsTheNewestRecordsAndReportsMedians) {
  TimingLog log(4);
  for (int i = 0; i < 10; ++i) {
    ChunkTiming t;
    t.chunk_index = static_cast<uint32_t>(i);
    t.us[static_cast<size_t>(Stage::kCompress)] = i;
    log.Add(t);
  }
  EXPECT_EQ(log.recorded(), 10u);
  auto snap = log.Snapshot();
  ASSERT_EQ(snap.size(), 4u);
  EXPECT_EQ(snap.front().chunk_index, 6u);
  EXPECT_EQ(snap.back().chunk_index, 9u);
  std::string report = log.Report();
  EXPECT_NE(report.find("compress"), std::string::npos);
  EXPECT_NE(report.find("median"), std::string::npos);
}

TEST(AlignedBuffer, IsAlignedAndZeroed) {
  AlignedBuffer b(1000);
  ASSERT_TRUE(b);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % 64, 0u);
  for (size_t i = 0; i < b.size(); ++i) ASSERT_EQ(b.data()[i], 0);
  EXPECT_EQ(AlignUp(65, 64), 128u);
}

}  // namespace
}  // namespace zipwire::offload
