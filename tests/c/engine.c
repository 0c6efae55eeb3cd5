/*
 * The engine end to end, in either mode: built and run by tests/c_abi.rs on the host backend.
 *
 * usage: engine MODEL.safetensors EXPECTED.bin MANIFEST.txt [SOCKET]
 *
 * Without SOCKET the engine is in-process (ferry_engine_open); with it, the engine is a
 * connection to the ferryd listening there (ferry_connect), which must have been started with
 * a 1 MiB budget and MODEL under a model root. Everything after opening the engine is the same
 * code for both modes.
 *
 * EXPECTED.bin holds every tensor's bytes; MANIFEST.txt has one line per tensor:
 *     <layer> <offset in EXPECTED.bin> <byte length> <dtype> <rank> <dim>... <name>
 * The program runs two sequential passes over the layers of component "model" and compares
 * every byte it reads through device_ptr (a plain pointer on the host backend; in daemon
 * mode a pointer into the daemon's arena mapped here) with the file.
 */

#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define MAX_TENSORS 256

typedef struct expected_tensor {
  size_t layer;
  uint64_t offset, len;
  uint32_t dtype, rank;
  uint64_t shape[FERRY_MAX_RANK];
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
    unsigned long long layer, offset, blen;
    unsigned dtype, rank;
    int n = fscanf(f, "%llu %llu %llu %u %u", &layer, &offset, &blen, &dtype, &rank);
    if (n == EOF) break;
    CHECK(n == 5);
    CHECK(rank <= FERRY_MAX_RANK);
    for (unsigned d = 0; d < rank; d++) {
      unsigned long long dim;
      CHECK(fscanf(f, "%llu", &dim) == 1);
      t.shape[d] = dim;
    }
    CHECK(fscanf(f, "%127s", t.name) == 1);
    t.layer = (size_t)layer;
    t.offset = offset;
    t.len = blen;
    t.dtype = dtype;
    t.rank = rank;
    CHECK(t.offset + t.len <= expected_len);
    CHECK(n_tensors < MAX_TENSORS);
    tensors[n_tensors++] = t;
  }
  fclose(f);
  CHECK(n_tensors > 0);
  return 0;
}

static int same_desc(const ferry_tensor_desc *a, const ferry_tensor_desc *b) {
  return a->name == b->name && a->device_ptr == b->device_ptr && a->byte_len == b->byte_len &&
         a->dtype == b->dtype && a->rank == b->rank &&
         memcmp(a->shape, b->shape, sizeof a->shape) == 0;
}

/* Acquires layer `layer`, checks every tensor against the expected bytes, releases it. */
static int check_layer(ferry_engine *engine, uint64_t model, size_t layer) {
  ferry_lease *lease = NULL;
  CHECK_OK(ferry_acquire(engine, model, "model", layer, NULL, &lease));
  CHECK(lease != NULL);
  CHECK_OK(ferry_lease_wait(lease));

  size_t count = 0, want = 0;
  CHECK_OK(ferry_lease_tensor_count(lease, &count));
  for (size_t i = 0; i < n_tensors; i++) want += tensors[i].layer == layer;
  CHECK(count == want);

  for (size_t i = 0; i < n_tensors; i++) {
    const expected_tensor *t = &tensors[i];
    if (t->layer != layer) continue;
    ferry_tensor_desc d;
    CHECK_OK(ferry_lease_tensor_by_name(lease, t->name, &d));
    CHECK(strcmp(d.name, t->name) == 0);
    CHECK(d.byte_len == t->len);
    CHECK(d.dtype == t->dtype);
    CHECK(d.rank == t->rank);
    for (unsigned k = 0; k < FERRY_MAX_RANK; k++) CHECK(d.shape[k] == t->shape[k]);
    CHECK(d.device_ptr != 0);
    const unsigned char *bytes = (const unsigned char *)(uintptr_t)d.device_ptr;
    if (memcmp(bytes, expected + t->offset, (size_t)t->len) != 0) {
      fprintf(stderr, "layer %zu tensor %s: bytes differ\n", layer, t->name);
      return 1;
    }
  }

  /* By index: every tensor is one of the expected ones, described as by name. */
  for (size_t i = 0; i < count; i++) {
    ferry_tensor_desc by_index, by_name;
    CHECK_OK(ferry_lease_tensor(lease, i, &by_index));
    CHECK_OK(ferry_lease_tensor_by_name(lease, by_index.name, &by_name));
    CHECK(same_desc(&by_index, &by_name));
  }
  ferry_tensor_desc d;
  CHECK_FAILS(ferry_lease_tensor(lease, count, &d), FERRY_ERR_NOT_FOUND);

  CHECK_OK(ferry_release(engine, lease, NULL));
  return 0;
}

/* Opens the engine: in-process with `config`, or connected to the daemon at `socket`. */
static ferry_status open_engine(const char *socket, const ferry_engine_config *config,
                                ferry_engine **out) {
  return socket != NULL ? ferry_connect(socket, out) : ferry_engine_open(config, out);
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s MODEL EXPECTED.bin MANIFEST.txt [SOCKET]\n", argv[0]);
    return 2;
  }
  const char *socket = argc == 5 ? argv[4] : NULL;
  if (load(argv[2], argv[3]) != 0) return 1;

  size_t layers = 0;
  uint64_t total = 0;
  for (size_t i = 0; i < n_tensors; i++) {
    if (tensors[i].layer + 1 > layers) layers = tensors[i].layer + 1;
    total += tensors[i].len;
  }

  ferry_engine_config config;
  CHECK_OK(ferry_engine_config_default(&config));
  CHECK(config.device == FERRY_DEVICE_AUTO);
  CHECK(config.staging_slots > 0 && config.acquire_timeout_ms > 0);
  config.device = FERRY_DEVICE_HOST;
  config.budget_bytes = 1 << 20;
  config.host_memory_bytes = 2 << 20;
  config.staging_slots = 3;
  config.staging_slot_bytes = 8192;
  config.acquire_timeout_ms = 5000;

  ferry_engine *engine = NULL;
  CHECK_OK(open_engine(socket, &config, &engine));
  CHECK(engine != NULL);
  CHECK(ferry_last_error()[0] == '\0');

  uint64_t model = 0;
  CHECK_OK(ferry_model_open(engine, argv[1], &model));
  size_t count = 0;
  CHECK_OK(ferry_layer_count(engine, model, "model", &count));
  CHECK(count == layers);
  for (size_t l = 0; l < layers; l++) {
    char name[64];
    snprintf(name, sizeof name, "blocks.%zu", l);
    size_t index = SIZE_MAX;
    CHECK_OK(ferry_layer_index(engine, model, "model", name, &index));
    CHECK(index == l);
  }

  CHECK_OK(ferry_set_residency(engine, model, NULL, FERRY_POLICY_SEQUENTIAL, 1, 0, 0.0));

  const int passes = 2;
  for (int pass = 0; pass < passes; pass++) {
    for (size_t l = 0; l < layers; l++) {
      if (l + 1 < layers) CHECK_OK(ferry_prefetch(engine, model, "model", l + 1));
      if (check_layer(engine, model, l) != 0) return 1;
    }
  }

  ferry_engine_stats stats;
  CHECK_OK(ferry_stats(engine, &stats));
  CHECK(stats.acquires == (uint64_t)passes * layers);
  CHECK(stats.hits + stats.misses == stats.acquires);
  CHECK(stats.loads >= layers);
  CHECK(stats.bytes_streamed >= (uint64_t)passes * total);
  CHECK(stats.budget == config.budget_bytes);
  CHECK(stats.peak_device_bytes > 0 && stats.peak_device_bytes <= stats.budget);
  CHECK(stats.lora_cache_bytes == 0);

  /* A component policy on the single component, then a lease left held: closing the engine
   * releases and frees it (LeakSanitizer checks nothing is left). */
  CHECK_OK(ferry_set_residency(engine, model, "model", FERRY_POLICY_BALANCED, 0, 0, 0.5));
  ferry_lease *held = NULL;
  CHECK_OK(ferry_acquire(engine, model, "model", 0, NULL, &held));
  CHECK_FAILS(ferry_model_close(engine, model), FERRY_ERR_BUSY);
  ferry_engine_close(engine);

  /* A second engine: open, close a model cleanly, close. */
  CHECK_OK(open_engine(socket, &config, &engine));
  CHECK_OK(ferry_model_open(engine, argv[1], &model));
  CHECK_OK(ferry_model_close(engine, model));
  CHECK_FAILS(ferry_model_close(engine, model), FERRY_ERR_NOT_FOUND);
  ferry_engine_close(engine);

  free(expected);
  printf("engine.c (%s): %zu layers x %d passes, %llu bytes streamed, peak %llu of %llu: passed\n",
         socket != NULL ? "daemon mode" : "in-process", layers, passes, (unsigned long long)stats.bytes_streamed,
         (unsigned long long)stats.peak_device_bytes, (unsigned long long)stats.budget);
  return 0;
}
