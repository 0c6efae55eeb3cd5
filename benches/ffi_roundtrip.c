/*
 * The C side of benches/ffi_roundtrip.rs: ferry_acquire + ferry_release of one resident layer
 * through the C ABI, on an in-process engine and on an engine connected to ferryd, timed in
 * the same run, with the ratio.
 *
 * usage: ffi_roundtrip MODEL SOCKET ITERATIONS
 *
 * Both engines are on the host backend with a 64 MiB budget and policy "none" (every layer
 * resident), so an acquire never waits for a copy: what is measured is the call itself, and
 * in daemon mode the socket round trips (one for the acquire, one for the release).
 */

#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ferry.h"

#define LAYER 3

static int fail(const char *what, ferry_status s) {
  fprintf(stderr, "ffi_roundtrip: %s: %s: %s\n", what, ferry_status_str(s), ferry_last_error());
  return 1;
}

#define TRY(call)                               \
  do {                                          \
    ferry_status s_ = (call);                   \
    if (s_ != FERRY_OK) return fail(#call, s_); \
  } while (0)

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

typedef struct result {
  double per_second;
  uint64_t p50_ns, p99_ns;
} result;

/* One acquire + release of the layer; checks the layer really is resident. */
static int round_trip(ferry_engine *e, uint64_t model) {
  ferry_lease *lease = NULL;
  TRY(ferry_acquire(e, model, "model", LAYER, NULL, &lease));
  TRY(ferry_release(e, lease, NULL));
  return 0;
}

/* Opens MODEL on `e` with policy none, waits until the layer is loaded, then times `n` round
 * trips (after n / 10 untimed ones). */
static int measure(ferry_engine *e, const char *model_path, size_t n, uint64_t *lat,
                   result *out) {
  uint64_t model = 0;
  TRY(ferry_model_open(e, model_path, &model));
  TRY(ferry_set_residency(e, model, NULL, FERRY_POLICY_NONE, 0, 0, 0.0));
  ferry_lease *lease = NULL;
  TRY(ferry_acquire(e, model, "model", LAYER, NULL, &lease));
  TRY(ferry_lease_wait(lease));
  TRY(ferry_release(e, lease, NULL));
  for (size_t i = 0; i < n / 10; i++)
    if (round_trip(e, model) != 0) return 1;
  uint64_t start = now_ns();
  for (size_t i = 0; i < n; i++) {
    uint64_t t = now_ns();
    if (round_trip(e, model) != 0) return 1;
    lat[i] = now_ns() - t;
  }
  uint64_t total = now_ns() - start;
  qsort(lat, n, sizeof lat[0], cmp_u64);
  out->per_second = (double)n / ((double)total / 1e9);
  out->p50_ns = lat[n / 2];
  out->p99_ns = lat[(size_t)((double)n * 0.99) < n ? (size_t)((double)n * 0.99) : n - 1];
  TRY(ferry_model_close(e, model));
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s MODEL SOCKET ITERATIONS\n", argv[0]);
    return 2;
  }
  size_t n = (size_t)strtoull(argv[3], NULL, 10);
  if (n == 0) return 2;
  uint64_t *lat = malloc(n * sizeof *lat);
  if (lat == NULL) return 1;

  ferry_engine_config config;
  TRY(ferry_engine_config_default(&config));
  config.device = FERRY_DEVICE_HOST;
  config.budget_bytes = 64u << 20;
  config.host_memory_bytes = 128u << 20;
  config.staging_slots = 3;
  config.staging_slot_bytes = 1u << 20;
  config.acquire_timeout_ms = 10000;
  ferry_engine *local = NULL;
  TRY(ferry_engine_open(&config, &local));
  result in_process;
  int rc = measure(local, argv[1], n, lat, &in_process);
  ferry_engine_close(local);
  if (rc != 0) return rc;

  ferry_engine *remote = NULL;
  TRY(ferry_connect(argv[2], &remote));
  result daemon;
  rc = measure(remote, argv[1], n, lat, &daemon);
  ferry_engine_close(remote);
  if (rc != 0) return rc;
  free(lat);

  printf("ffi_roundtrip: ferry_acquire + ferry_release of one resident layer through the C "
         "ABI, %zu iterations each\n",
         n);
  printf("  in-process (ferry_engine_open): %10.0f round trips/s   p50 %8.2f us   p99 %8.2f us\n",
         in_process.per_second, (double)in_process.p50_ns / 1e3,
         (double)in_process.p99_ns / 1e3);
  printf("  daemon mode (ferry_connect):    %10.0f round trips/s   p50 %8.2f us   p99 %8.2f us\n",
         daemon.per_second, (double)daemon.p50_ns / 1e3, (double)daemon.p99_ns / 1e3);
  printf("  daemon / in-process:            %.3fx throughput, p50 %.1fx, p99 %.1fx latency\n",
         daemon.per_second / in_process.per_second,
         (double)daemon.p50_ns / (double)in_process.p50_ns,
         (double)daemon.p99_ns / (double)in_process.p99_ns);
  return 0;
}
