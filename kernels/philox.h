// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11; the Random123 reference), a counter-based generator: a block of four
// u32 is a pure function of a 128-bit counter and a 64-bit key, so any
// element's draw can be computed directly from its position, in any order, on
// the CPU or a GPU, with identical results.
//
// zipwire derives every random draw of a codec from (seed, tensor, chunk,
// step, purpose, position):
//   b1  = Philox({tensor lo, tensor hi, chunk, purpose}, {seed lo, seed hi})
//   b2  = Philox({step lo, step hi, b1[2], b1[3]}, {b1[0], b1[1]})
//   key = {b2[0], b2[1]}, and block i = Philox({i lo, i hi, b2[2], b2[3]}, key)
//   draw p = word (p % 4) of block (p / 4)
// The two derivation blocks are computed once per stream; a draw then costs a
// quarter of a block. (dithering uses 16-bit draws: halfword j of this u32
// stream, eight per block; see kernels/codec_dithering.cc.) `purpose` separates the streams of different
// codecs (and of different uses within a codec) sharing one context.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>

namespace zipwire::kernels {

using PhiloxCounter = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

inline constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
inline constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

// Ten rounds, the key bumped between rounds, exactly as Random123's philox4x32.
constexpr PhiloxCounter Philox4x32_10(PhiloxCounter ctr, PhiloxKey key) {
  for (int round = 0; round < 10; ++round) {
    if (round != 0) {
      key[0] += kPhiloxW0;
      key[1] += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * ctr[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * ctr[2];
    ctr = {static_cast<uint32_t>(p1 >> 32) ^ ctr[1] ^ key[0], static_cast<uint32_t>(p1),
           static_cast<uint32_t>(p0 >> 32) ^ ctr[3] ^ key[1], static_cast<uint32_t>(p0)};
  }
  return ctr;
}

// Uniform float in [0, 1) from the top 24 bits: exact, never 1.
// (Converted through int32, which SSE2/AVX2 convert natively; u >> 8 fits.)
constexpr float PhiloxUniform(uint32_t u) {
  return static_cast<float>(static_cast<int32_t>(u >> 8)) * 0x1p-24f;
}

// Stream separation tags; values are part of the wire contract (a GPU kernel
// must use the same ones), never renumber.
enum class PhiloxPurpose : uint32_t {
  kDithering = 1,
  kTerngrad = 2,
  kRandomk = 3,
  kTopkSample = 4,
  kCountSketch = 5,
};

#if defined(__x86_64__)
namespace internal {
// Fill whole groups of 16 (AVX2) or 32 (AVX-512) blocks; return how many
// blocks they wrote. Only call a path the CPU supports.
size_t PhiloxFillAvx2(PhiloxKey key, std::array<uint32_t, 2> hi, uint64_t first, size_t blocks,
                      uint32_t* out);
size_t PhiloxFillAvx512(PhiloxKey key, std::array<uint32_t, 2> hi, uint64_t first, size_t blocks,
                        uint32_t* out);
// The path of ActiveIsa() (cpu_isa.h); 0 blocks on scalar.
size_t PhiloxFillVector(PhiloxKey key, std::array<uint32_t, 2> hi, uint64_t first, size_t blocks,
                        uint32_t* out);
}  // namespace internal
#endif

class PhiloxStream {
 public:
  constexpr PhiloxStream(uint64_t seed, uint64_t tensor, uint32_t chunk, uint64_t step,
                         PhiloxPurpose purpose) {
    const PhiloxCounter b1 =
        Philox4x32_10({Lo(tensor), Hi(tensor), chunk, static_cast<uint32_t>(purpose)}, {Lo(seed), Hi(seed)});
    const PhiloxCounter b2 = Philox4x32_10({Lo(step), Hi(step), b1[2], b1[3]}, {b1[0], b1[1]});
    key_ = {b2[0], b2[1]};
    hi_ = {b2[2], b2[3]};
  }

  constexpr PhiloxCounter Block(uint64_t block) const {
    return Philox4x32_10({Lo(block), Hi(block), hi_[0], hi_[1]}, key_);
  }
  constexpr uint32_t U32(uint64_t position) const { return Block(position >> 2)[position & 3]; }
  constexpr float Uniform(uint64_t position) const { return PhiloxUniform(U32(position)); }

  // out[0 .. 4*blocks) = the draws of positions 4*first .. 4*(first+blocks).
  // Written as independent lanes so the compiler vectorises the rounds.
  void Fill(uint64_t first, size_t blocks, uint32_t* out) const {
    constexpr size_t kLanes = 8;
    size_t b = 0;
#if defined(__x86_64__)
    b = internal::PhiloxFillVector(key_, hi_, first, blocks, out);
#endif
    for (; b + kLanes <= blocks; b += kLanes) {
      uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
      for (size_t l = 0; l < kLanes; ++l) {
        const uint64_t i = first + b + l;
        c0[l] = Lo(i);
        c1[l] = Hi(i);
        c2[l] = hi_[0];
        c3[l] = hi_[1];
      }
      uint32_t k0 = key_[0], k1 = key_[1];
      for (int round = 0; round < 10; ++round) {
        for (size_t l = 0; l < kLanes; ++l) {
          const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[l];
          const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[l];
          const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
          const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
          c1[l] = static_cast<uint32_t>(p1);
          c3[l] = static_cast<uint32_t>(p0);
          c0[l] = n0;
          c2[l] = n2;
        }
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      for (size_t l = 0; l < kLanes; ++l) {
        out[4 * (b + l) + 0] = c0[l];
        out[4 * (b + l) + 1] = c1[l];
        out[4 * (b + l) + 2] = c2[l];
        out[4 * (b + l) + 3] = c3[l];
      }
    }
    for (; b < blocks; ++b) {
      const PhiloxCounter r = Block(first + b);
      for (int w = 0; w < 4; ++w) out[4 * b + w] = r[w];
    }
  }

  // The derived key words, for tests and for handing to a GPU kernel.
  constexpr PhiloxKey key() const { return key_; }
  constexpr std::array<uint32_t, 2> counter_high() const { return hi_; }

 private:
  static constexpr uint32_t Lo(uint64_t v) { return static_cast<uint32_t>(v); }
  static constexpr uint32_t Hi(uint64_t v) { return static_cast<uint32_t>(v >> 32); }

  PhiloxKey key_{};
  std::array<uint32_t, 2> hi_{};
};

// Draws for positions [begin, end) of `stream`, produced a cache-sized batch at
// a time: fn(position, u32) in increasing position order.
template <typename Fn>
inline void ForEachDraw(const PhiloxStream& stream, uint64_t begin, uint64_t end, Fn&& fn) {
  constexpr size_t kBatchBlocks = 256;
  uint32_t buf[4 * kBatchBlocks];
  uint64_t p = begin;
  while (p < end) {
    const uint64_t block = p >> 2;
    const uint64_t last_block = (end - 1) >> 2;
    const size_t blocks = static_cast<size_t>(std::min<uint64_t>(kBatchBlocks, last_block - block + 1));
    stream.Fill(block, blocks, buf);
    const uint64_t stop = std::min<uint64_t>(end, (block + blocks) << 2);
    for (; p < stop; ++p) fn(p, buf[p - (block << 2)]);
  }
}

}  // namespace zipwire::kernels
