#include "kernels/cpu_isa.h"

#include <atomic>
#include <cstdio>
#include <string>

#include "core/config.h"

namespace zipwire::kernels {
namespace {

CpuIsa Detect() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
    return CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kScalar;
}

CpuIsa Lower(CpuIsa a, CpuIsa b) { return static_cast<uint8_t>(a) < static_cast<uint8_t>(b) ? a : b; }

CpuIsa FromEnvironment() {
  const CpuIsa best = BestSupportedIsa();
  auto text = EnvString("CPU_ISA", "");
  if (!text.ok() || text->empty()) return best;
  if (*text == "scalar") return CpuIsa::kScalar;
  if (*text == "avx2") return Lower(CpuIsa::kAvx2, best);
  if (*text == "avx512") return Lower(CpuIsa::kAvx512, best);
  std::fprintf(stderr, "zipwire: ignoring ZIPWIRE_CPU_ISA=%s (want scalar, avx2 or avx512)\n", text->c_str());
  return best;
}

std::atomic<int> g_active{-1};

}  // namespace

const char* CpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar:
      return "scalar";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
  }
  return "?";
}

CpuIsa BestSupportedIsa() {
  static const CpuIsa best = Detect();
  return best;
}

CpuIsa ActiveIsa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    static const CpuIsa from_env = FromEnvironment();
    int expected = -1;
    g_active.compare_exchange_strong(expected, static_cast<int>(from_env), std::memory_order_relaxed);
    v = g_active.load(std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(v);
}

namespace internal {
CpuIsa SetActiveIsaForTesting(CpuIsa isa) {
  const CpuIsa previous = ActiveIsa();
  g_active.store(static_cast<int>(Lower(isa, BestSupportedIsa())), std::memory_order_relaxed);
  return previous;
}
}  // namespace internal

}  // namespace zipwire::kernels
