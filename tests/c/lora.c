/*
 * LoRA views through the C ABI, in either mode: built and run by tests/c_abi.rs.
 *
 * usage: lora BASE.safetensors LORA.safetensors MERGED.bin ORIGINAL.bin [SOCKET]
 *
 * BASE has layers "blocks.0".."blocks.2" of component "model", one tensor each
 * ("blocks.N.proj.weight"); LORA adapts blocks.1 only. MERGED.bin holds blocks.1's weight
 * merged with LORA at strength 0.8 (computed by the test with ferry's merge), ORIGINAL.bin its
 * bytes in the file. Without SOCKET the engine is in-process; with it, a connection to the
 * ferryd there (BASE and LORA under one of its model roots). For each mode (backup, fuse): a
 * view serves the merged bytes for blocks.1 and the base's own copy of the other layers, the
 * base is unchanged meanwhile, and removing the view leaves the file's bytes exactly.
 */

#include <stdint.h>
#include <stdlib.h>

#include "common.h"

static unsigned char *read_all(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return NULL;
  unsigned char *buf = NULL;
  long n = -1;
  if (fseek(f, 0, SEEK_END) == 0) n = ftell(f);
  if (n > 0 && fseek(f, 0, SEEK_SET) == 0) {
    buf = malloc((size_t)n);
    if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
      free(buf);
      buf = NULL;
    }
  }
  fclose(f);
  *len = n > 0 ? (size_t)n : 0;
  return buf;
}

/* Acquires `layer` of `model` (a model or a view), waits for it, checks its one tensor holds
 * exactly `want`, and releases it. */
static int check_layer(ferry_engine *e, uint64_t model, size_t layer, const unsigned char *want,
                       size_t want_len) {
  ferry_lease *lease = NULL;
  CHECK_OK(ferry_acquire(e, model, "model", layer, NULL, &lease));
  CHECK_OK(ferry_lease_wait(lease));
  size_t count = 0;
  CHECK_OK(ferry_lease_tensor_count(lease, &count));
  CHECK(count == 1);
  ferry_tensor_desc d;
  CHECK_OK(ferry_lease_tensor_by_name(lease, "blocks.1.proj.weight", &d));
  CHECK(d.dtype == FERRY_DTYPE_BF16 && d.rank == 2 && d.shape[0] == 32 && d.shape[1] == 16);
  CHECK(d.byte_len == want_len);
  CHECK(memcmp((const void *)(uintptr_t)d.device_ptr, want, want_len) == 0);
  CHECK_OK(ferry_release(e, lease, NULL));
  return 0;
}

/* Layer `layer` (one the stack does not touch) reads the same through the view as through the
 * base: the view shares the base's copy. */
static int same_as_base(ferry_engine *e, uint64_t view, uint64_t base, size_t layer) {
  ferry_lease *a = NULL, *b = NULL;
  CHECK_OK(ferry_acquire(e, view, "model", layer, NULL, &a));
  CHECK_OK(ferry_acquire(e, base, "model", layer, NULL, &b));
  CHECK_OK(ferry_lease_wait(a));
  CHECK_OK(ferry_lease_wait(b));
  ferry_tensor_desc da, db;
  CHECK_OK(ferry_lease_tensor(a, 0, &da));
  CHECK_OK(ferry_lease_tensor(b, 0, &db));
  CHECK(strcmp(da.name, db.name) == 0 && da.byte_len == db.byte_len);
  CHECK(da.device_ptr == db.device_ptr);
  CHECK_OK(ferry_release(e, a, NULL));
  CHECK_OK(ferry_release(e, b, NULL));
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 5 && argc != 6) {
    fprintf(stderr, "usage: %s BASE LORA MERGED.bin ORIGINAL.bin [SOCKET]\n", argv[0]);
    return 2;
  }
  const char *socket = argc == 6 ? argv[5] : NULL;
  size_t merged_len = 0, original_len = 0;
  unsigned char *merged = read_all(argv[3], &merged_len);
  unsigned char *original = read_all(argv[4], &original_len);
  CHECK(merged != NULL && original != NULL && merged_len == original_len);
  CHECK(memcmp(merged, original, merged_len) != 0);

  ferry_engine *e = NULL;
  if (socket != NULL) {
    CHECK_OK(ferry_connect(socket, &e));
  } else {
    ferry_engine_config config;
    CHECK_OK(ferry_engine_config_default(&config));
    config.device = FERRY_DEVICE_HOST;
    config.budget_bytes = 1 << 20;
    config.host_memory_bytes = 2 << 20;
    config.staging_slots = 2;
    config.staging_slot_bytes = 8192;
    CHECK_OK(ferry_engine_open(&config, &e));
  }

  uint64_t base = 0;
  CHECK_OK(ferry_model_open(e, argv[1], &base));
  CHECK_OK(ferry_set_residency(e, base, NULL, FERRY_POLICY_NONE, 0, 0, 0.0));
  size_t l0 = 0, l1 = 0;
  CHECK_OK(ferry_layer_index(e, base, "model", "blocks.0", &l0));
  CHECK_OK(ferry_layer_index(e, base, "model", "blocks.1", &l1));
  if (check_layer(e, base, l1, original, original_len) != 0) return 1;

  const char *paths[1] = {argv[2]};
  const float strengths[1] = {0.8f};
  const uint32_t modes[2] = {FERRY_LORA_BACKUP, FERRY_LORA_FUSE};
  for (int i = 0; i < 2; i++) {
    uint64_t view = 0;
    CHECK_OK(ferry_view_create(e, base, paths, strengths, 1, modes[i], &view));
    CHECK(view != base);
    size_t n = 0;
    CHECK_OK(ferry_layer_count(e, view, "model", &n));
    CHECK(n == 3);

    if (check_layer(e, view, l1, merged, merged_len) != 0) return 1;
    if (same_as_base(e, view, base, l0) != 0) return 1;
    /* The base is not changed by its view. */
    if (check_layer(e, base, l1, original, original_len) != 0) return 1;
    if (modes[i] == FERRY_LORA_FUSE) {
      ferry_engine_stats st;
      CHECK_OK(ferry_stats(e, &st));
      CHECK(st.lora_cache_bytes >= merged_len);
    }

    /* Neither the base (its view is open) nor the view (a layer is leased through it) can go. */
    CHECK_FAILS(ferry_model_close(e, base), FERRY_ERR_BUSY);
    ferry_lease *held = NULL;
    CHECK_OK(ferry_acquire(e, view, "model", l1, NULL, &held));
    CHECK_FAILS(ferry_view_remove(e, view), FERRY_ERR_BUSY);
    CHECK_OK(ferry_release(e, held, NULL));

    CHECK_OK(ferry_view_remove(e, view));
    CHECK_FAILS(ferry_view_remove(e, view), FERRY_ERR_NOT_FOUND);
    CHECK_FAILS(ferry_acquire(e, view, "model", l1, NULL, &held), FERRY_ERR_NOT_FOUND);
    CHECK(held == NULL);
    /* The file's bytes, exactly. */
    if (check_layer(e, base, l1, original, original_len) != 0) return 1;
  }

  /* A model is not a view; a LoRA that does not exist is an I/O error. */
  CHECK_FAILS(ferry_view_remove(e, base), FERRY_ERR_NOT_FOUND);
  uint64_t view = 0;
  const char *missing[1] = {"/nonexistent/ferry/lora.safetensors"};
  CHECK_FAILS(ferry_view_create(e, base, missing, strengths, 1, FERRY_LORA_BACKUP, &view),
              FERRY_ERR_IO);

  CHECK_OK(ferry_model_close(e, base));
  ferry_engine_close(e);
  free(merged);
  free(original);
  printf("lora.c (%s): backup and fuse views, removal restores the file: passed\n",
         socket != NULL ? "daemon mode" : "in-process");
  return 0;
}
