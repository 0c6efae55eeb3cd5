/*
 * FERRY_POLICY_AUTO and the SD.Next presets (LOWVRAM, MEDVRAM, MODEL), in either mode: built
 * and run by tests/c_abi.rs on the host backend.
 *
 * usage: policies MODEL.safetensors EXPECTED.bin MANIFEST.txt [SOCKET]
 *
 * MODEL has three layers (`blocks.0` .. `blocks.2`) in component "model"; EXPECTED.bin and
 * MANIFEST.txt are as for engine.c (one manifest line per tensor: layer, offset, length,
 * dtype, rank, dims, name). Every layer acquired is compared byte for byte with the file.
 *
 * In-process, the resolved policy is observed through the engine's counters:
 *   - with a budget of two layers, LOWVRAM and AUTO (sequential on this 2 MiB device) stream
 *     all three layers in turn, evicting to make room; MEDVRAM and MODEL (component) are
 *     refused with FERRY_ERR_BUDGET, since the whole component must fit;
 *   - with a 1 MiB budget, MEDVRAM and MODEL load the whole component (3 loads) on the first
 *     acquire and the next two acquires are hits; LOWVRAM does not load all three at once.
 * In daemon mode (ferryd with a 1 MiB budget) every preset and auto is accepted and streams
 * the right bytes, and the presets are resolved by ferryd to component (3 loads at once).
 * Parameters given with auto or a preset (lookahead, thresholds) are ignored, as documented.
 */

#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define MAX_TENSORS 64
#define LAYERS 3

typedef struct expected_tensor {
  size_t layer;
  uint64_t offset, len;
  char name[128];
} expected_tensor;

static expected_tensor tensors[MAX_TENSORS];
static size_t n_tensors;
static unsigned char *expected;
static size_t expected_len;

static int load(const char *bin, const char *manifest) {
  FILE *f = fopen(bin, "rb");
  CHECK(f != NULL);
  CHECK(fseek(f, 0, SEEK_END) == 0);
  long len = ftell(f);
  CHECK(len > 0);
  rewind(f);
  expected_len = (size_t)len;
  expected = malloc(expected_len);
  CHECK(expected != NULL);
  CHECK(fread(expected, 1, expected_len, f) == expected_len);
  fclose(f);

  f = fopen(manifest, "r");
  CHECK(f != NULL);
  for (;;) {
    expected_tensor t;
    memset(&t, 0, sizeof t);
    unsigned long long layer, offset, blen, dim;
    unsigned dtype, rank;
    int n = fscanf(f, "%llu %llu %llu %u %u", &layer, &offset, &blen, &dtype, &rank);
    if (n == EOF) break;
    CHECK(n == 5);
    for (unsigned d = 0; d < rank; d++) CHECK(fscanf(f, "%llu", &dim) == 1);
    CHECK(fscanf(f, "%127s", t.name) == 1);
    t.layer = (size_t)layer;
    t.offset = offset;
    t.len = blen;
    CHECK(t.layer < LAYERS);
    CHECK(t.offset + t.len <= expected_len);
    CHECK(n_tensors < MAX_TENSORS);
    tensors[n_tensors++] = t;
  }
  fclose(f);
  CHECK(n_tensors > 0);
  return 0;
}

/* Acquires layer `layer`, compares every tensor with the file, releases it. */
static int check_layer(ferry_engine *engine, uint64_t model, size_t layer) {
  ferry_lease *lease = NULL;
  CHECK_OK(ferry_acquire(engine, model, "model", layer, NULL, &lease));
  CHECK_OK(ferry_lease_wait(lease));
  for (size_t i = 0; i < n_tensors; i++) {
    const expected_tensor *t = &tensors[i];
    if (t->layer != layer) continue;
    ferry_tensor_desc d;
    CHECK_OK(ferry_lease_tensor_by_name(lease, t->name, &d));
    CHECK(d.byte_len == t->len);
    const unsigned char *bytes = (const unsigned char *)(uintptr_t)d.device_ptr;
    if (memcmp(bytes, expected + t->offset, (size_t)t->len) != 0) {
      fprintf(stderr, "layer %zu tensor %s: bytes differ\n", layer, t->name);
      return 1;
    }
  }
  CHECK_OK(ferry_release(engine, lease, NULL));
  return 0;
}

/* Sets `policy` with parameters that do not apply to it (ignored), then acquires every layer
 * in turn. `stats_before` holds the counters after set_residency, `after_first` after the
 * first acquire. */
static int stream(ferry_engine *e, uint64_t m, uint32_t policy, ferry_engine_stats *stats_before,
                  ferry_engine_stats *after_first) {
  CHECK_OK(ferry_set_residency(e, m, NULL, policy, 7, 4096, 0.5));
  CHECK_OK(ferry_stats(e, stats_before));
  for (size_t l = 0; l < LAYERS; l++) {
    if (check_layer(e, m, l) != 0) return 1;
    if (l == 0) CHECK_OK(ferry_stats(e, after_first));
  }
  return 0;
}

static ferry_engine_config config_with_budget(uint64_t budget) {
  ferry_engine_config c;
  ferry_engine_config_default(&c);
  c.device = FERRY_DEVICE_HOST;
  c.budget_bytes = budget;
  c.host_memory_bytes = 2 << 20;
  c.staging_slots = 3;
  c.staging_slot_bytes = 8192;
  c.acquire_timeout_ms = 5000;
  return c;
}

static const uint32_t COMPONENT_PRESETS[] = {FERRY_POLICY_MEDVRAM, FERRY_POLICY_MODEL};
static const uint32_t SEQUENTIAL_LIKE[] = {FERRY_POLICY_LOWVRAM, FERRY_POLICY_AUTO};

/* Whole components move: every layer is loaded by the first acquire, the rest are hits. */
static int check_component_moves(ferry_engine *e, uint64_t m, uint32_t policy) {
  ferry_engine_stats before, first, after;
  if (stream(e, m, policy, &before, &first) != 0) return 1;
  CHECK_OK(ferry_stats(e, &after));
  CHECK(first.loads - before.loads == LAYERS);
  CHECK(after.loads - before.loads == LAYERS);
  CHECK(after.acquires - before.acquires == LAYERS);
  CHECK(after.misses - before.misses == 1);
  CHECK(after.hits - before.hits == LAYERS - 1);
  CHECK(after.evictions == before.evictions);
  return 0;
}

static int in_process(const char *path, uint64_t layer_bytes) {
  /* Room for two layers (with alignment) but not three. */
  uint64_t small = layer_bytes * 2 + layer_bytes / 2;
  ferry_engine_config config = config_with_budget(small);
  ferry_engine *e = NULL;
  CHECK_OK(ferry_engine_open(&config, &e));
  uint64_t m = 0;
  CHECK_OK(ferry_model_open(e, path, &m));
  for (size_t i = 0; i < sizeof SEQUENTIAL_LIKE / sizeof *SEQUENTIAL_LIKE; i++) {
    ferry_engine_stats before, first, after;
    if (stream(e, m, SEQUENTIAL_LIKE[i], &before, &first) != 0) return 1;
    CHECK_OK(ferry_stats(e, &after));
    CHECK(after.acquires - before.acquires == LAYERS);
    CHECK(after.loads - before.loads >= LAYERS);
    CHECK(after.evictions > before.evictions);
    CHECK(after.peak_device_bytes <= small);
  }
  for (size_t i = 0; i < 2; i++) {
    CHECK_FAILS(ferry_set_residency(e, m, NULL, COMPONENT_PRESETS[i], 0, 0, 0.0),
                FERRY_ERR_BUDGET);
    CHECK(strstr(ferry_last_error(), "component") != NULL);
  }
  /* The same refusal as the policy the presets name. */
  CHECK_FAILS(ferry_set_residency(e, m, NULL, FERRY_POLICY_COMPONENT, 0, 0, 0.0),
              FERRY_ERR_BUDGET);
  CHECK_FAILS(ferry_set_residency(e, m, NULL, 8, 0, 0, 0.0), FERRY_ERR_INVALID_ARGUMENT);
  CHECK_OK(ferry_model_close(e, m));
  ferry_engine_close(e);

  config = config_with_budget(1 << 20);
  CHECK_OK(ferry_engine_open(&config, &e));
  CHECK_OK(ferry_model_open(e, path, &m));
  for (size_t i = 0; i < 2; i++) {
    if (check_component_moves(e, m, COMPONENT_PRESETS[i]) != 0) return 1;
  }
  /* lowvram streams: the first acquire does not bring the whole component. */
  ferry_engine_stats before, first;
  if (stream(e, m, FERRY_POLICY_LOWVRAM, &before, &first) != 0) return 1;
  CHECK(first.loads - before.loads < LAYERS);
  CHECK_OK(ferry_model_close(e, m));
  ferry_engine_close(e);
  return 0;
}

static int daemon_mode(const char *path, const char *socket) {
  ferry_engine *e = NULL;
  CHECK_OK(ferry_connect(socket, &e));
  uint64_t m = 0;
  CHECK_OK(ferry_model_open(e, path, &m));
  for (size_t i = 0; i < sizeof SEQUENTIAL_LIKE / sizeof *SEQUENTIAL_LIKE; i++) {
    ferry_engine_stats before, first;
    if (stream(e, m, SEQUENTIAL_LIKE[i], &before, &first) != 0) return 1;
  }
  for (size_t i = 0; i < 2; i++) {
    if (check_component_moves(e, m, COMPONENT_PRESETS[i]) != 0) return 1;
  }
  CHECK_FAILS(ferry_set_residency(e, m, NULL, 8, 0, 0, 0.0), FERRY_ERR_INVALID_ARGUMENT);
  CHECK_OK(ferry_model_close(e, m));
  ferry_engine_close(e);
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s MODEL EXPECTED.bin MANIFEST.txt [SOCKET]\n", argv[0]);
    return 2;
  }
  if (load(argv[2], argv[3]) != 0) return 1;
  uint64_t layer_bytes = 0;
  for (size_t i = 0; i < n_tensors; i++) {
    if (tensors[i].layer == 0) layer_bytes += tensors[i].len;
  }
  int failed = argc == 5 ? daemon_mode(argv[1], argv[4]) : in_process(argv[1], layer_bytes);
  free(expected);
  if (failed) return 1;
  printf("policies.c (%s): auto, lowvram, medvram, model: passed\n",
         argc == 5 ? "daemon mode" : "in-process");
  return 0;
}
