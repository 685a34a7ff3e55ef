// Which vector instruction set the CPU kernels use, chosen once at run time:
// the best the CPU supports (AVX-512 F/BW/VL/DQ, else AVX2 + FMA + BMI2, else
// scalar), or the one named by ZIPWIRE_CPU_ISA=scalar|avx2|avx512 (lowered to
// what the CPU supports, so a test can force every path and compare them).
// Every path produces the same bytes; only the speed differs.
#pragma once

#include <cstdint>

namespace zipwire::kernels {

enum class CpuIsa : uint8_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* CpuIsaName(CpuIsa isa);

// The most capable ISA this CPU supports.
CpuIsa BestSupportedIsa();
// The ISA the kernels use now: ZIPWIRE_CPU_ISA (default: BestSupportedIsa()),
// never above BestSupportedIsa(). A malformed value is reported once on stderr
// and ignored (the kernels cannot return a Status for a process setting).
CpuIsa ActiveIsa();

namespace internal {
// For tests: makes ActiveIsa() return min(isa, BestSupportedIsa()); returns
// the previous setting. Not for concurrent use with running kernels.
CpuIsa SetActiveIsaForTesting(CpuIsa isa);
}  // namespace internal

}  // namespace zipwire::kernels
