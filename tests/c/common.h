/* Helpers shared by the C tests of tests/c_abi.rs. */
#ifndef FERRY_TEST_COMMON_H
#define FERRY_TEST_COMMON_H

#include <stdint.h>
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

/* Acquires layer `l` of component "model" of `model`, waits for it, compares its tensor
 * `blocks.<l>.weight` (`layer_bytes` U8 bytes, read through its address: host memory) with
 * byte i = (i * 31 + seed + l) mod 256, and releases it. */
static inline int check_u8_block(ferry_engine *e, uint64_t model, size_t l, size_t layer_bytes,
                                 unsigned seed) {
  ferry_lease *lease = NULL;
  CHECK_OK(ferry_acquire(e, model, "model", l, NULL, &lease));
  CHECK_OK(ferry_lease_wait(lease));
  char name[64];
  snprintf(name, sizeof name, "blocks.%zu.weight", l);
  ferry_tensor_desc d;
  CHECK_OK(ferry_lease_tensor_by_name(lease, name, &d));
  CHECK(d.byte_len == layer_bytes);
  const unsigned char *bytes = (const unsigned char *)(uintptr_t)d.device_ptr;
  for (size_t i = 0; i < layer_bytes; i++) {
    unsigned char want = (unsigned char)((i * 31 + seed + l) & 0xff);
    if (bytes[i] != want) {
      fprintf(stderr, "model %llu layer %zu byte %zu: %u, expected %u\n",
              (unsigned long long)model, l, i, bytes[i], want);
      return 1;
    }
  }
  CHECK_OK(ferry_release(e, lease, NULL));
  return 0;
}

#endif
