// <immintrin.h> for the target("avx512...") kernels. GCC 12 reports
// -Wmaybe-uninitialized inside the AVX-512 intrinsics that start from
// _mm512_undefined_*() (a false positive, GCC bug 105593), and reports it at
// the header's own lines, so the warning is silenced for the header alone.
#pragma once

#if defined(__x86_64__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
