// A contract check for fuzz targets: a violated invariant is a finding, so it
// must crash (libFuzzer saves the input) rather than be returned as a Status.
#pragma once

#include <cstdio>
#include <cstdlib>

#define ZW_FUZZ_CHECK(cond, what)                                                                          \
  do {                                                                                                     \
    if (!(cond)) {                                                                                         \
      std::fprintf(stderr, "fuzz contract violated at %s:%d: %s (%s)\n", __FILE__, __LINE__, what, #cond); \
      std::abort();                                                                                        \
    }                                                                                                      \
  } while (0)
