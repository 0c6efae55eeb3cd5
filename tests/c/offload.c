/*
 * Manual offload through the C ABI (ferry_offload / ferry_onload), in either mode: built and
 * run by tests/c_abi.rs on the host backend.
 *
 * usage: offload BASE.safetensors REFINER.safetensors LAYER_BYTES [SOCKET]
 *
 * BASE has BASE_LAYERS layers and REFINER REFINER_LAYERS, each layer one U8 tensor
 * `blocks.<l>.weight` of LAYER_BYTES bytes whose byte i is (i * 31 + seed + l) mod 256 (seed 1
 * for the base, 7 for the refiner). The budget (1 MiB, in-process or ferryd's) holds either
 * model's reservation, not both. The two take turns: the base is offloaded whole (its bytes
 * freed exactly), the refiner reserved and read, the refiner offloaded, the base onloaded and
 * read; every byte is checked and the peak device bytes never pass the budget. Offloading while
 * a lease is held fails with FERRY_ERR_BUSY and changes nothing.
 */

#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define BASE_LAYERS 6
#define REFINER_LAYERS 5
#define BUDGET (1u << 20)

static size_t layer_bytes;

/* Acquires every layer of `model` and compares its bytes with the formula. */
static int check_all(ferry_engine *e, uint64_t model, size_t layers, unsigned seed) {
  for (size_t l = 0; l < layers; l++) {
    if (check_u8_block(e, model, l, layer_bytes, seed) != 0) return 1;
  }
  return 0;
}

static int take_turns(ferry_engine *e, const char *base_path, const char *refiner_path) {
  uint64_t base = 0, refiner = 0, bytes = 0;
  CHECK_OK(ferry_model_open(e, base_path, &base));
  CHECK_OK(ferry_model_open(e, refiner_path, &refiner));
  CHECK_OK(ferry_set_residency(e, base, NULL, FERRY_POLICY_NONE, 0, 0, 0.0));
  if (check_all(e, base, BASE_LAYERS, 1) != 0) return 1;
  /* Both cannot be reserved at once. */
  CHECK_FAILS(ferry_set_residency(e, refiner, NULL, FERRY_POLICY_NONE, 0, 0, 0.0),
              FERRY_ERR_BUDGET);

  /* A held lease blocks an offload, whole or by component; nothing changes. */
  ferry_lease *held = NULL;
  CHECK_OK(ferry_acquire(e, base, "model", 2, NULL, &held));
  bytes = 12345;
  CHECK_FAILS(ferry_offload(e, base, NULL, &bytes), FERRY_ERR_BUSY);
  CHECK(bytes == 12345);
  CHECK_FAILS(ferry_offload(e, base, "model", &bytes), FERRY_ERR_BUSY);
  CHECK_OK(ferry_release(e, held, NULL));
  ferry_engine_stats st;
  CHECK_OK(ferry_stats(e, &st));
  CHECK(st.device_bytes >= (uint64_t)BASE_LAYERS * layer_bytes);

  for (int round = 0; round < 3; round++) {
    CHECK_OK(ferry_offload(e, base, NULL, &bytes));
    CHECK(bytes == (uint64_t)BASE_LAYERS * layer_bytes);
    /* Already off: nothing more to free; the output pointer may be NULL. */
    CHECK_OK(ferry_offload(e, base, NULL, &bytes));
    CHECK(bytes == 0);
    CHECK_OK(ferry_offload(e, base, NULL, NULL));
    CHECK_OK(ferry_set_residency(e, refiner, NULL, FERRY_POLICY_NONE, 0, 0, 0.0));
    if (check_all(e, refiner, REFINER_LAYERS, 7) != 0) return 1;
    CHECK_OK(ferry_offload(e, refiner, NULL, &bytes));
    CHECK(bytes == (uint64_t)REFINER_LAYERS * layer_bytes);
    CHECK_OK(ferry_onload(e, base, NULL));
    if (check_all(e, base, BASE_LAYERS, 1) != 0) return 1;
    CHECK_OK(ferry_stats(e, &st));
    CHECK(st.peak_device_bytes <= st.budget);
    CHECK(st.budget == BUDGET);
  }

  /* One component: its layers leave and come back; the reservation stays. */
  CHECK_OK(ferry_offload(e, base, "model", &bytes));
  CHECK(bytes == (uint64_t)BASE_LAYERS * layer_bytes);
  CHECK_OK(ferry_onload(e, base, "model"));
  if (check_all(e, base, BASE_LAYERS, 1) != 0) return 1;

  CHECK_FAILS(ferry_offload(e, base, "nope", &bytes), FERRY_ERR_NOT_FOUND);
  CHECK_FAILS(ferry_onload(e, base, "nope"), FERRY_ERR_NOT_FOUND);
  CHECK_FAILS(ferry_offload(e, 9999, NULL, &bytes), FERRY_ERR_NOT_FOUND);
  CHECK_FAILS(ferry_onload(e, 9999, NULL), FERRY_ERR_NOT_FOUND);
  CHECK_FAILS(ferry_offload(NULL, base, NULL, &bytes), FERRY_ERR_NULL_ARGUMENT);
  CHECK_FAILS(ferry_onload(NULL, base, NULL), FERRY_ERR_NULL_ARGUMENT);

  CHECK_OK(ferry_stats(e, &st));
  CHECK(st.peak_device_bytes <= st.budget);
  CHECK_OK(ferry_model_close(e, refiner));
  CHECK_OK(ferry_model_close(e, base));
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s BASE REFINER LAYER_BYTES [SOCKET]\n", argv[0]);
    return 2;
  }
  layer_bytes = (size_t)strtoull(argv[3], NULL, 10);
  if (layer_bytes == 0) return 2;
  ferry_engine *e = NULL;
  if (argc == 5) {
    CHECK_OK(ferry_connect(argv[4], &e));
  } else {
    ferry_engine_config c;
    ferry_engine_config_default(&c);
    c.device = FERRY_DEVICE_HOST;
    c.budget_bytes = BUDGET;
    c.host_memory_bytes = 2 << 20;
    c.staging_slots = 3;
    c.staging_slot_bytes = 65536;
    c.acquire_timeout_ms = 5000;
    CHECK_OK(ferry_engine_open(&c, &e));
  }
  int failed = take_turns(e, argv[1], argv[2]);
  ferry_engine_close(e);
  if (failed) return 1;
  printf("offload.c (%s): base and refiner took turns: passed\n",
         argc == 5 ? "daemon mode" : "in-process");
  return 0;
}
