/*
 * Misuse of the C ABI: NULL arguments, unknown ids, bad enum values, busy engines, small
 * budgets, leases passed to the wrong engine. Built and run by tests/c_abi.rs.
 *
 * usage: misuse MODEL.safetensors NOT_A_MODEL_FILE
 * MODEL has one component "model" with layers "blocks.0".."blocks.N" (about 20 KiB each).
 */

#include <stdint.h>
#include <stdlib.h>

#include "common.h"

static ferry_engine_config host_config(uint64_t budget, uint64_t timeout_ms) {
  ferry_engine_config c;
  if (ferry_engine_config_default(&c) != FERRY_OK) abort();
  c.device = FERRY_DEVICE_HOST;
  c.budget_bytes = budget;
  c.host_memory_bytes = 4 << 20;
  c.staging_slots = 2;
  c.staging_slot_bytes = 8192;
  c.acquire_timeout_ms = timeout_ms;
  return c;
}

static int null_arguments(ferry_engine *e, uint64_t m, ferry_lease *lease, const char *path) {
  const ferry_status N = FERRY_ERR_NULL_ARGUMENT;
  ferry_engine_config config = host_config(1 << 20, 1000);
  uint64_t id = 0;
  size_t n = 0;
  ferry_tensor_desc d;
  ferry_engine_stats s;
  const char *paths[1] = {path};
  float strengths[1] = {1.0f};

  CHECK_FAILS(ferry_engine_config_default(NULL), N);
  CHECK_FAILS(ferry_engine_open(&config, NULL), N);
  CHECK_FAILS(ferry_connect("/nonexistent/ferryd.sock", NULL), N);
  CHECK_FAILS(ferry_view_remove(NULL, m), N);

  CHECK_FAILS(ferry_model_open(NULL, path, &id), N);
  CHECK_FAILS(ferry_model_open(e, NULL, &id), N);
  CHECK_FAILS(ferry_model_open(e, path, NULL), N);
  CHECK_FAILS(ferry_model_close(NULL, m), N);

  CHECK_FAILS(ferry_set_residency(NULL, m, NULL, FERRY_POLICY_NONE, 0, 0, 0.0), N);

  CHECK_FAILS(ferry_layer_count(NULL, m, "model", &n), N);
  CHECK_FAILS(ferry_layer_count(e, m, NULL, &n), N);
  CHECK_FAILS(ferry_layer_count(e, m, "model", NULL), N);

  CHECK_FAILS(ferry_layer_index(NULL, m, "model", "blocks.0", &n), N);
  CHECK_FAILS(ferry_layer_index(e, m, NULL, "blocks.0", &n), N);
  CHECK_FAILS(ferry_layer_index(e, m, "model", NULL, &n), N);
  CHECK_FAILS(ferry_layer_index(e, m, "model", "blocks.0", NULL), N);

  CHECK_FAILS(ferry_prefetch(NULL, m, "model", 0), N);
  CHECK_FAILS(ferry_prefetch(e, m, NULL, 0), N);

  ferry_lease *out = (ferry_lease *)0x1;
  CHECK_FAILS(ferry_acquire(NULL, m, "model", 0, NULL, &out), N);
  CHECK(out == NULL); /* *out is set to NULL on failure */
  CHECK_FAILS(ferry_acquire(e, m, NULL, 0, NULL, &out), N);
  CHECK_FAILS(ferry_acquire(e, m, "model", 0, NULL, NULL), N);

  CHECK_FAILS(ferry_lease_wait(NULL), N);
  CHECK_FAILS(ferry_lease_tensor_count(NULL, &n), N);
  CHECK_FAILS(ferry_lease_tensor_count(lease, NULL), N);
  CHECK_FAILS(ferry_lease_tensor(NULL, 0, &d), N);
  CHECK_FAILS(ferry_lease_tensor(lease, 0, NULL), N);
  CHECK_FAILS(ferry_lease_tensor_by_name(NULL, "blocks.0.weight", &d), N);
  CHECK_FAILS(ferry_lease_tensor_by_name(lease, NULL, &d), N);
  CHECK_FAILS(ferry_lease_tensor_by_name(lease, "blocks.0.weight", NULL), N);

  CHECK_FAILS(ferry_release(NULL, lease, NULL), N);
  CHECK_FAILS(ferry_release(e, NULL, NULL), N);

  CHECK_FAILS(ferry_stats(NULL, &s), N);
  CHECK_FAILS(ferry_stats(e, NULL), N);

  CHECK_FAILS(ferry_view_create(NULL, m, paths, strengths, 1, FERRY_LORA_BACKUP, &id), N);
  CHECK_FAILS(ferry_view_create(e, m, NULL, strengths, 1, FERRY_LORA_BACKUP, &id), N);
  CHECK_FAILS(ferry_view_create(e, m, paths, NULL, 1, FERRY_LORA_BACKUP, &id), N);
  CHECK_FAILS(ferry_view_create(e, m, paths, strengths, 1, FERRY_LORA_BACKUP, NULL), N);
  const char *null_path[1] = {NULL};
  CHECK_FAILS(ferry_view_create(e, m, null_path, strengths, 1, FERRY_LORA_BACKUP, &id), N);

  CHECK_FAILS(ferry_version_copy(NULL, 8, &n), N);

  /* ferry_last_error_copy(NULL, 0, &needed) reports the size and keeps the message. */
  size_t needed = 0;
  CHECK_STATUS(ferry_last_error_copy(NULL, 0, &needed), N);
  CHECK(needed == strlen(ferry_last_error()) + 1);

  ferry_engine_close(NULL);
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s MODEL NOT_A_MODEL\n", argv[0]);
    return 2;
  }
  const char *path = argv[1];

  CHECK(strcmp(ferry_status_str(FERRY_ERR_BUSY), "FERRY_ERR_BUSY") == 0);
  CHECK(strcmp(ferry_status_str(FERRY_ERR_MODEL_FAILED), "FERRY_ERR_MODEL_FAILED") == 0);
  CHECK(strcmp(ferry_status_str(FERRY_ERR_DISCONNECTED), "FERRY_ERR_DISCONNECTED") == 0);
  CHECK(strcmp(ferry_status_str(FERRY_ERR_LIMIT_EXCEEDED), "FERRY_ERR_LIMIT_EXCEEDED") == 0);
  CHECK(strcmp(ferry_status_str(FERRY_ERR_LIMIT_EXCEEDED + 1), "FERRY_ERR_UNKNOWN") == 0);
  CHECK(ferry_last_error()[0] == '\0');

  /* Bad configurations. */
  ferry_engine_config bad = host_config(1 << 20, 1000);
  bad.device = 7;
  ferry_engine *e = (ferry_engine *)0x1;
  CHECK_FAILS(ferry_engine_open(&bad, &e), FERRY_ERR_INVALID_ARGUMENT);
  CHECK(e == NULL);

  ferry_engine_config config = host_config(1 << 20, 2000);
  CHECK_OK(ferry_engine_open(&config, &e));
  uint64_t m = 0;
  CHECK_OK(ferry_model_open(e, path, &m));
  CHECK_FAILS(ferry_model_open(e, "/nonexistent/ferry/model.safetensors", &m), FERRY_ERR_IO);
  CHECK_FAILS(ferry_model_open(e, argv[2], &m), FERRY_ERR_INVALID_MODEL);
  CHECK_OK(ferry_model_open(e, path, &m)); /* the same files are the same model */
  CHECK(ferry_last_error()[0] == '\0'); /* a success clears the last error */

  ferry_lease *lease = NULL;
  CHECK_OK(ferry_acquire(e, m, "model", 0, NULL, &lease));

  if (null_arguments(e, m, lease, path) != 0) return 1;

  /* Unknown ids and names. */
  const ferry_status NF = FERRY_ERR_NOT_FOUND;
  size_t n = 0;
  ferry_lease *other = NULL;
  CHECK_FAILS(ferry_layer_count(e, 999, "model", &n), NF);
  CHECK_FAILS(ferry_acquire(e, 999, "model", 0, NULL, &other), NF);
  CHECK_FAILS(ferry_set_residency(e, 999, NULL, FERRY_POLICY_NONE, 0, 0, 0.0), NF);
  CHECK_FAILS(ferry_model_close(e, 999), NF);
  CHECK_FAILS(ferry_layer_count(e, m, "vae", &n), NF);
  CHECK_FAILS(ferry_acquire(e, m, "vae", 0, NULL, &other), NF);
  CHECK_FAILS(ferry_set_residency(e, m, "vae", FERRY_POLICY_NONE, 0, 0, 0.0), NF);
  CHECK_OK(ferry_layer_count(e, m, "model", &n));
  CHECK_FAILS(ferry_acquire(e, m, "model", n, NULL, &other), NF);
  CHECK(other == NULL);
  CHECK_FAILS(ferry_prefetch(e, m, "model", n + 100), NF);
  CHECK_FAILS(ferry_layer_index(e, m, "model", "blocks.999", &n), NF);
  ferry_tensor_desc d;
  CHECK_FAILS(ferry_lease_tensor_by_name(lease, "no.such.tensor", &d), NF);

  /* Invalid enum values and arguments. */
  const ferry_status INV = FERRY_ERR_INVALID_ARGUMENT;
  CHECK_FAILS(ferry_set_residency(e, m, NULL, 99, 0, 0, 0.0), INV);
  CHECK_FAILS(ferry_set_residency(e, m, NULL, FERRY_POLICY_BALANCED, 0, 0, 1.5), INV);
  CHECK_FAILS(ferry_set_residency(e, m, NULL, FERRY_POLICY_BALANCED, 0, 4096, 0.5), INV);
  uint64_t view = 0;
  CHECK_FAILS(ferry_view_create(e, m, NULL, NULL, 0, FERRY_LORA_BACKUP, &view), INV);
  const char *paths[1] = {"/nonexistent/ferry/lora.safetensors"};
  float strengths[1] = {1.0f};
  CHECK_FAILS(ferry_view_create(e, m, paths, strengths, 1, 9, &view), INV);
  CHECK_FAILS(ferry_view_create(e, m, paths, strengths, 1, FERRY_LORA_FUSE, &view), FERRY_ERR_IO);
  /* Only views are removed as views: a model id, or an unknown id, is refused. */
  CHECK_FAILS(ferry_view_remove(e, m), NF);
  CHECK_FAILS(ferry_view_remove(e, 4242), NF);
  /* A stream on the host backend is refused; the lease stays held. */
  int not_a_stream = 0;
  CHECK_FAILS(ferry_acquire(e, m, "model", 1, &not_a_stream, &other), INV);
  CHECK_FAILS(ferry_release(e, lease, &not_a_stream), INV);

  /* The last error: a copy into a small buffer reports the size needed. */
  CHECK_FAILS(ferry_model_close(e, 12345), NF);
  const char *msg = ferry_last_error();
  size_t len = strlen(msg);
  CHECK(len > 2);
  CHECK(strstr(msg, "12345") != NULL);
  char small[2] = {'x', 'x'};
  size_t needed = 0;
  CHECK_STATUS(ferry_last_error_copy(small, sizeof small, &needed), FERRY_ERR_BUFFER_TOO_SMALL);
  CHECK(needed == len + 1);
  CHECK(small[0] == 'x' && small[1] == 'x');
  char *copy = malloc(needed);
  CHECK(copy != NULL);
  CHECK_OK(ferry_last_error_copy(copy, needed, NULL));
  CHECK(strcmp(copy, ferry_last_error()) == 0); /* the copy does not clear the message */
  free(copy);

  /* Busy: the residency cannot change, nor the model close, while a lease is held. */
  CHECK_FAILS(ferry_set_residency(e, m, NULL, FERRY_POLICY_SEQUENTIAL, 1, 0, 0.0),
              FERRY_ERR_BUSY);
  CHECK_FAILS(ferry_model_close(e, m), FERRY_ERR_BUSY);

  /* A lease passed to another engine is refused and stays usable. */
  ferry_engine *e2 = NULL;
  CHECK_OK(ferry_engine_open(&config, &e2));
  CHECK_FAILS(ferry_release(e2, lease, NULL), NF);
  CHECK_OK(ferry_lease_wait(lease));
  CHECK_OK(ferry_lease_tensor_count(lease, &n));
  CHECK(n == 3);
  CHECK_OK(ferry_lease_tensor_by_name(lease, "blocks.0.proj", &d));
  CHECK(d.rank == 2 && d.shape[0] == 4 && d.shape[1] == 8 && d.shape[2] == 0);
  CHECK(d.dtype == FERRY_DTYPE_F16 && d.byte_len == 64);
  CHECK_OK(ferry_release(e, lease, NULL));
  lease = NULL;
  CHECK_OK(ferry_set_residency(e, m, NULL, FERRY_POLICY_SEQUENTIAL, 1, 0, 0.0));

  /* A budget too small for the policy. */
  ferry_engine_config tiny = host_config(4096, 1000);
  ferry_engine *e3 = NULL;
  CHECK_OK(ferry_engine_open(&tiny, &e3));
  uint64_t m3 = 0;
  CHECK_OK(ferry_model_open(e3, path, &m3));
  CHECK_FAILS(ferry_set_residency(e3, m3, NULL, FERRY_POLICY_SEQUENTIAL, 0, 0, 0.0),
              FERRY_ERR_BUDGET);
  ferry_engine_close(e3);

  /* Room for one layer only: a second acquire times out while the first is held. */
  ferry_engine_config one = host_config(24576, 100);
  CHECK_OK(ferry_engine_open(&one, &e3));
  CHECK_OK(ferry_model_open(e3, path, &m3));
  CHECK_OK(ferry_set_residency(e3, m3, NULL, FERRY_POLICY_SEQUENTIAL, 0, 0, 0.0));
  ferry_lease *first = NULL;
  CHECK_OK(ferry_acquire(e3, m3, "model", 0, NULL, &first));
  CHECK_FAILS(ferry_acquire(e3, m3, "model", 1, NULL, &other), FERRY_ERR_TIMEOUT);
  CHECK_OK(ferry_release(e3, first, NULL));
  CHECK_OK(ferry_acquire(e3, m3, "model", 1, NULL, &other));
  CHECK_OK(ferry_release(e3, other, NULL));
  ferry_engine_close(e3);

  ferry_engine_close(e2);
  ferry_engine_close(e);
  printf("misuse.c: passed\n");
  return 0;
}
