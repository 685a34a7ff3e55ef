// Philox4x32-10 against the Random123 known-answer vectors, and the stream
// derivation zipwire builds on it.
#include "kernels/philox.h"

#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "kernels/cpu_isa.h"

namespace zipwire::kernels {
namespace {

TEST(Philox, Random123KnownAnswers) {
  // kat_vectors from Random123 1.09 (philox4x32 10 rounds).
  EXPECT_EQ(Philox4x32_10({0, 0, 0, 0}, {0, 0}),
            (PhiloxCounter{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(Philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu}),
            (PhiloxCounter{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(Philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}),
            (PhiloxCounter{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
  // Usable at compile time (a GPU kernel or a table can be checked against it).
  static_assert(Philox4x32_10({0, 0, 0, 0}, {0, 0})[0] == 0x6627e8d5u);
}

// On every path this CPU has (ZIPWIRE_CPU_ISA's choices), across the 2^32
// block boundary where the counter's high word carries.
TEST(Philox, FillMatchesBlockAtEveryAlignment) {
  const PhiloxStream s(1, 2, 3, 4, PhiloxPurpose::kDithering);
  const CpuIsa saved = ActiveIsa();
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (isa > BestSupportedIsa()) continue;
    internal::SetActiveIsaForTesting(isa);
    for (uint64_t first : {uint64_t{0}, uint64_t{5}, (uint64_t{1} << 32) - 3, (uint64_t{1} << 32) - 20}) {
      for (size_t blocks : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{33}, size_t{100}}) {
        SCOPED_TRACE(CpuIsaName(isa));
        std::vector<uint32_t> out(4 * blocks + 1, 0xdeadbeefu);
        s.Fill(first, blocks, out.data());
        for (size_t b = 0; b < blocks; ++b) {
          const PhiloxCounter r = s.Block(first + b);
          for (int w = 0; w < 4; ++w) ASSERT_EQ(out[4 * b + w], r[w]) << first << " " << b;
        }
        EXPECT_EQ(out.back(), 0xdeadbeefu) << "wrote past the blocks asked for";
      }
    }
  }
  internal::SetActiveIsaForTesting(saved);
}

TEST(Philox, ForEachDrawVisitsPositionsInOrder) {
  const PhiloxStream s(9, 8, 7, 6, PhiloxPurpose::kRandomk);
  for (auto [begin, end] : {std::pair<uint64_t, uint64_t>{0, 0}, {0, 1}, {3, 4}, {1, 2000}, {1023, 1030}}) {
    uint64_t expect = begin;
    ForEachDraw(s, begin, end, [&](uint64_t p, uint32_t u) {
      ASSERT_EQ(p, expect);
      ASSERT_EQ(u, s.U32(p));
      ++expect;
    });
    EXPECT_EQ(expect, end);
  }
}

TEST(Philox, EveryContextFieldChangesTheStream) {
  const PhiloxStream base(1, 2, 3, 4, PhiloxPurpose::kDithering);
  std::set<uint32_t> firsts{base.U32(0)};
  for (const PhiloxStream& s : {PhiloxStream(2, 2, 3, 4, PhiloxPurpose::kDithering),
                                PhiloxStream(1, 3, 3, 4, PhiloxPurpose::kDithering),
                                PhiloxStream(1, 2, 4, 4, PhiloxPurpose::kDithering),
                                PhiloxStream(1, 2, 3, 5, PhiloxPurpose::kDithering),
                                PhiloxStream(1, 2, 3, 4, PhiloxPurpose::kTerngrad),
                                PhiloxStream(1ull << 32, 2, 3, 4, PhiloxPurpose::kDithering),
                                PhiloxStream(1, 2ull << 32, 3, 4, PhiloxPurpose::kDithering),
                                PhiloxStream(1, 2, 3, 4ull << 32, PhiloxPurpose::kDithering)}) {
    EXPECT_TRUE(firsts.insert(s.U32(0)).second);
  }
  // Deterministic: the same fields give the same draws.
  const PhiloxStream again(1, 2, 3, 4, PhiloxPurpose::kDithering);
  for (uint64_t p : {0ull, 1ull, 4ull, 1ull << 40}) EXPECT_EQ(again.U32(p), base.U32(p));
  // Position p is word p % 4 of block p / 4.
  EXPECT_EQ(base.U32(6), base.Block(1)[2]);
}

TEST(Philox, UniformIsInUnitIntervalAndRoughlyUniform) {
  EXPECT_EQ(PhiloxUniform(0), 0.0f);
  EXPECT_LT(PhiloxUniform(0xffffffffu), 1.0f);
  const PhiloxStream s(42, 0, 0, 0, PhiloxPurpose::kTerngrad);
  constexpr int kN = 1 << 16;
  int buckets[16] = {};
  double mean = 0;
  for (int i = 0; i < kN; ++i) {
    const float u = s.Uniform(i);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    mean += u;
    ++buckets[static_cast<int>(u * 16)];
  }
  EXPECT_NEAR(mean / kN, 0.5, 0.01);
  for (int b : buckets) EXPECT_NEAR(b, kN / 16, 5 * 64);  // ~5 sigma
}

}  // namespace
}  // namespace zipwire::kernels
