// Minimal assertion helpers for the C++ unit tests (no test framework: the build downloads
// nothing). A failed CHECK prints file:line, the condition and an optional message, and the
// test keeps going; main() returns lsgtest::report(), non-zero when anything failed, which is
// what ctest looks at.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace lsgtest {

inline int& failures() {
  static int count = 0;
  return count;
}

// Print at most this many failures: one broken kernel can fail millions of element checks.
constexpr int kMaxPrinted = 25;

inline bool should_print() { return failures() <= kMaxPrinted; }

inline int report(const char* name) {
  if (failures() == 0) {
    std::printf("%s: all checks passed\n", name);
    return 0;
  }
  std::printf("%s: %d check(s) FAILED\n", name, failures());
  return 1;
}

}  // namespace lsgtest

#define CHECK(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      ++lsgtest::failures();                                                              \
      if (lsgtest::should_print())                                                        \
        std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
    }                                                                                     \
  } while (0)

// CHECK_MSG(cond, printf-format, args...): the message says which case failed.
#define CHECK_MSG(cond, ...)                                                              \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      ++lsgtest::failures();                                                              \
      if (lsgtest::should_print()) {                                                      \
        std::fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);     \
        std::fprintf(stderr, __VA_ARGS__);                                                \
        std::fputc('\n', stderr);                                                         \
      }                                                                                   \
    }                                                                                     \
  } while (0)
