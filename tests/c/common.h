/* Helpers shared by the C tests of tests/c_abi.rs. */
#ifndef FERRY_TEST_COMMON_H
#define FERRY_TEST_COMMON_H

#include <stdio.h>
#include <string.h>

#include "ferry.h"

/* Fails the test (returns 1 from the enclosing function) when `cond` is false. */
#define CHECK(cond)                                                                          \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__, __LINE__,      \
              #cond, ferry_last_error());                                                    \
      return 1;                                                                              \
    }                                                                                        \
  } while (0)

/* Checks that a ferry call returns `want`. */
#define CHECK_STATUS(call, want)                                                             \
  do {                                                                                       \
    ferry_status got_ = (call);                                                              \
    if (got_ != (want)) {                                                                    \
      fprintf(stderr, "%s:%d: %s returned %s, expected %s (last error: %s)\n", __FILE__,     \
              __LINE__, #call, ferry_status_str(got_), ferry_status_str(want),               \
              ferry_last_error());                                                           \
      return 1;                                                                              \
    }                                                                                        \
  } while (0)

#define CHECK_OK(call) CHECK_STATUS(call, FERRY_OK)

/* Checks that a ferry call fails with `want` and leaves a non-empty last error. */
#define CHECK_FAILS(call, want)                                                              \
  do {                                                                                       \
    CHECK_STATUS(call, want);                                                                \
    CHECK(ferry_last_error()[0] != '\0');                                                    \
  } while (0)

#endif
