// The AVX2 and AVX-512 paths of PhiloxStream::Fill (chosen by ActiveIsa()):
// 16 or 32 blocks per iteration, the 32x32->64 multiplies done as two
// vpmuludq (even and odd lanes). Produce exactly the bytes of the portable
// loop in philox.h (tests compare them).
#include "kernels/philox.h"

#include "kernels/cpu_isa.h"

#if defined(__x86_64__)
#include "kernels/simd.h"

namespace zipwire::kernels::internal {

namespace {
__attribute__((target("avx2"))) inline void MulHiLo(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0,2,4,6 as u64
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xaa);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xaa);
}
}  // namespace

__attribute__((target("avx2"))) size_t PhiloxFillAvx2(PhiloxKey key, std::array<uint32_t, 2> hi,
                                                      uint64_t first, size_t blocks, uint32_t* out) {
  // Two independent groups of 8 blocks per iteration: one group's 10 rounds
  // are a chain of dependent multiplies, so interleaving two hides latency.
  constexpr int kGroups = 2;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  size_t b = 0;
  for (; b + 8 * kGroups <= blocks; b += 8 * kGroups) {
    __m256i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      alignas(32) uint32_t lo32[8], hi32[8];
      for (int l = 0; l < 8; ++l) {
        const uint64_t i = first + b + 8 * g + l;
        lo32[l] = static_cast<uint32_t>(i);
        hi32[l] = static_cast<uint32_t>(i >> 32);
      }
      c0[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
      c1[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
      c2[g] = _mm256_set1_epi32(static_cast<int>(hi[0]));
      c3[g] = _mm256_set1_epi32(static_cast<int>(hi[1]));
    }
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
      const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i vk1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int g = 0; g < kGroups; ++g) {
        __m256i h0, l0, h1, l1;
        MulHiLo(c0[g], m0, &h0, &l0);
        MulHiLo(c2[g], m1, &h1, &l1);
        c0[g] = _mm256_xor_si256(_mm256_xor_si256(h1, c1[g]), vk0);
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(h0, c3[g]), vk1);
        c1[g] = l1;
        c3[g] = l0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int g = 0; g < kGroups; ++g) {
      // Transpose the four word vectors into eight interleaved blocks.
      const __m256i t0 = _mm256_unpacklo_epi32(c0[g], c1[g]), t1 = _mm256_unpackhi_epi32(c0[g], c1[g]);
      const __m256i t2 = _mm256_unpacklo_epi32(c2[g], c3[g]), t3 = _mm256_unpackhi_epi32(c2[g], c3[g]);
      const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
      const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
      __m256i* dst = reinterpret_cast<__m256i*>(out + 4 * (b + 8 * g));
      _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
      _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
      _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
      _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
    }
  }
  return b;
}

#define ZW_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Eight blocks per vector, one per 64-bit lane: each counter word lives in
// the low half of a lane (the high half is don't-care), so vpmuludq gives the
// whole 32x32->64 product in one instruction, the high word is one shift away
// and the low word is the product itself. Four independent groups per
// iteration hide the multiply latency.
ZW_AVX512 size_t PhiloxFillAvx512(PhiloxKey key, std::array<uint32_t, 2> hi, uint64_t first, size_t blocks,
                                  uint32_t* out) {
  constexpr int kGroups = 4;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i first_four = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i last_four = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  size_t b = 0;
  for (; b + 8 * kGroups <= blocks; b += 8 * kGroups) {
    __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      const __m512i i = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first + b + 8 * g)), iota);
      c0[g] = i;                         // low half: the counter's low word
      c1[g] = _mm512_srli_epi64(i, 32);  // its high word
      c2[g] = _mm512_set1_epi64(hi[0]);
      c3[g] = _mm512_set1_epi64(hi[1]);
    }
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
      const __m512i vk0 = _mm512_set1_epi64(k0);
      const __m512i vk1 = _mm512_set1_epi64(k1);
      for (int g = 0; g < kGroups; ++g) {
        const __m512i p0 = _mm512_mul_epu32(c0[g], m0);
        const __m512i p1 = _mm512_mul_epu32(c2[g], m1);
        c0[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[g], vk0, 0x96);  // three-way xor
        c2[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[g], vk1, 0x96);
        c1[g] = p1;
        c3[g] = p0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int g = 0; g < kGroups; ++g) {
      // Lane j: words 0,1 and 2,3 of block j as two u64; then blocks 2q and
      // 2q + 1 sit in 128-bit chunk q of lo and hi, put in order by the permutes.
      const __m512i w01 = _mm512_mask_blend_epi32(0xaaaa, c0[g], _mm512_slli_epi64(c1[g], 32));
      const __m512i w23 = _mm512_mask_blend_epi32(0xaaaa, c2[g], _mm512_slli_epi64(c3[g], 32));
      const __m512i lo = _mm512_unpacklo_epi64(w01, w23);
      const __m512i hi4 = _mm512_unpackhi_epi64(w01, w23);
      uint32_t* dst = out + 4 * (b + 8 * g);
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(lo, first_four, hi4));
      _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi64(lo, last_four, hi4));
    }
  }
  return b;
}

size_t PhiloxFillVector(PhiloxKey key, std::array<uint32_t, 2> hi, uint64_t first, size_t blocks,
                        uint32_t* out) {
  switch (ActiveIsa()) {
    case CpuIsa::kAvx512:
      return PhiloxFillAvx512(key, hi, first, blocks, out);
    case CpuIsa::kAvx2:
      return PhiloxFillAvx2(key, hi, first, blocks, out);
    case CpuIsa::kScalar:
      break;
  }
  return 0;
}

}  // namespace zipwire::kernels::internal
#endif
