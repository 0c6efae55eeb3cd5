/*
 * Daemon mode's own failures and misuse: built and run by tests/c_abi.rs.
 *
 * usage: daemon SOCKET MODEL OUTSIDE FAKES
 *
 * SOCKET is a real ferryd (host backend) with MODEL under a model root; MODEL has one
 * component "model" with layers "blocks.0".."blocks.N". OUTSIDE is a model file outside every
 * model root. FAKES is a folder of sockets served by the test: `cuda.sock` (a daemon that
 * says its device is CUDA), `hangup.sock` (accepts, then closes), `garbage.sock` (answers
 * with bytes that are not a frame), `liar.sock` and `short-arena.sock` (host daemons that
 * misdescribe their arena: see serve_liar in tests/c_abi.rs), and a regular file
 * `not-a-socket`.
 *
 * Near the end the program prints "kill-daemon" and waits for a line on stdin: the test then
 * SIGKILLs ferryd, reaps it and answers. Every call that needs the daemon must then fail with
 * FERRY_ERR_DISCONNECTED, nothing may crash, leases held must stay readable, and closing the
 * engines must free everything (LeakSanitizer).
 */

#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define THREADS 4
#define ROUNDS 50

typedef struct worker {
  ferry_engine *engine;
  uint64_t model;
  size_t layers;
  int index;
  int failed;
} worker;

/* Acquire, read, release, ROUNDS times over the layers, on an engine other threads use too. */
static void *work(void *arg) {
  worker *w = arg;
  for (int r = 0; r < ROUNDS; r++) {
    ferry_lease *lease = NULL;
    size_t layer = (size_t)(w->index + r) % w->layers;
    ferry_tensor_desc d;
    if (ferry_acquire(w->engine, w->model, "model", layer, NULL, &lease) != FERRY_OK ||
        ferry_lease_wait(lease) != FERRY_OK || ferry_lease_tensor(lease, 0, &d) != FERRY_OK ||
        d.device_ptr == 0 || ferry_release(w->engine, lease, NULL) != FERRY_OK) {
      fprintf(stderr, "thread %d, round %d: %s\n", w->index, r, ferry_last_error());
      w->failed = 1;
      return NULL;
    }
  }
  return NULL;
}

/* THREADS threads share one daemon-mode engine (one connection): every call succeeds and the
 * daemon counts exactly their acquires. Policy "none" keeps every layer resident, so no
 * acquire waits for memory (which would hold the connection until it timed out). */
static int threads_share_an_engine(ferry_engine *e, uint64_t m, size_t layers) {
  ferry_engine_stats before, after;
  CHECK_OK(ferry_set_residency(e, m, NULL, FERRY_POLICY_NONE, 0, 0, 0.0));
  CHECK_OK(ferry_stats(e, &before));
  pthread_t threads[THREADS];
  worker workers[THREADS];
  for (int i = 0; i < THREADS; i++) {
    workers[i] = (worker){e, m, layers, i, 0};
    CHECK(pthread_create(&threads[i], NULL, work, &workers[i]) == 0);
  }
  for (int i = 0; i < THREADS; i++) CHECK(pthread_join(threads[i], NULL) == 0);
  for (int i = 0; i < THREADS; i++) CHECK(!workers[i].failed);
  CHECK_OK(ferry_stats(e, &after));
  CHECK(after.acquires - before.acquires == THREADS * ROUNDS);
  return 0;
}

static int connect_failures(const char *fakes) {
  char path[4096];
  ferry_engine *e = (ferry_engine *)0x1;

  CHECK_FAILS(ferry_connect(NULL, NULL), FERRY_ERR_NULL_ARGUMENT);

  /* No daemon: nothing at the path, or not a socket. */
  snprintf(path, sizeof path, "%s/missing.sock", fakes);
  CHECK_FAILS(ferry_connect(path, &e), FERRY_ERR_DISCONNECTED);
  CHECK(e == NULL); /* *out is set to NULL on failure */
  CHECK(strstr(ferry_last_error(), "missing.sock") != NULL);
  snprintf(path, sizeof path, "%s/not-a-socket", fakes);
  CHECK_FAILS(ferry_connect(path, &e), FERRY_ERR_DISCONNECTED);

  /* A path too long for a Unix socket. */
  char long_path[300];
  memset(long_path, 'a', sizeof long_path - 1);
  long_path[0] = '/';
  long_path[sizeof long_path - 1] = '\0';
  CHECK_FAILS(ferry_connect(long_path, &e), FERRY_ERR_INVALID_ARGUMENT);

  /* A CUDA daemon: its device memory cannot be mapped here, so daemon mode refuses it. */
  snprintf(path, sizeof path, "%s/cuda.sock", fakes);
  CHECK_FAILS(ferry_connect(path, &e), FERRY_ERR_NOT_SHAREABLE);
  CHECK(e == NULL);
  CHECK(strstr(ferry_last_error(), "cuda") != NULL);
  CHECK(strstr(ferry_last_error(), "ferry_engine_open") != NULL);
  /* A CUDA daemon that shares its arena (a VMM descriptor): this process has no CUDA driver
   * to map it with, so daemon mode refuses it too, saying why. */
  snprintf(path, sizeof path, "%s/cuda-ipc.sock", fakes);
  CHECK_FAILS(ferry_connect(path, &e), FERRY_ERR_NOT_SHAREABLE);
  CHECK(e == NULL);
  /* Without a driver it says so; with one (a GPU box) no local GPU has the fake UUID. */
  CHECK(strstr(ferry_last_error(), "no CUDA driver") != NULL ||
        strstr(ferry_last_error(), "no visible GPU has UUID") != NULL);
  CHECK(strstr(ferry_last_error(), "GPU-00000000-0000-0000-0000-000000000000") != NULL);
  CHECK(strstr(ferry_last_error(), "ferry_engine_open") != NULL);

  /* Daemons that hang up, or do not speak the protocol. */
  snprintf(path, sizeof path, "%s/hangup.sock", fakes);
  CHECK_FAILS(ferry_connect(path, &e), FERRY_ERR_DISCONNECTED);
  snprintf(path, sizeof path, "%s/garbage.sock", fakes);
  CHECK_FAILS(ferry_connect(path, &e), FERRY_ERR_DISCONNECTED);
  CHECK(e == NULL);

  /* An arena longer than the descriptor it comes with is never mapped. */
  snprintf(path, sizeof path, "%s/short-arena.sock", fakes);
  CHECK_FAILS(ferry_connect(path, &e), FERRY_ERR_DEVICE);
  CHECK(e == NULL);

  /* Tensors outside the arena, or of an unknown dtype, are refused (and given back): no
   * address outside the mapping is ever handed out. */
  snprintf(path, sizeof path, "%s/liar.sock", fakes);
  CHECK_OK(ferry_connect(path, &e));
  uint64_t m = 0;
  CHECK_OK(ferry_model_open(e, "/liar/model.safetensors", &m));
  ferry_lease *lease = (ferry_lease *)0x1;
  CHECK_FAILS(ferry_acquire(e, m, "model", 0, NULL, &lease), FERRY_ERR_INTERNAL);
  CHECK(lease == NULL);
  CHECK(strstr(ferry_last_error(), "arena offset 4000") != NULL);
  CHECK_FAILS(ferry_acquire(e, m, "model", 1, NULL, &lease), FERRY_ERR_INTERNAL);
  CHECK(strstr(ferry_last_error(), "F99") != NULL);
  CHECK_OK(ferry_acquire(e, m, "model", 2, NULL, &lease));
  ferry_tensor_desc d;
  CHECK_OK(ferry_lease_tensor(lease, 0, &d));
  CHECK(d.byte_len == 200 && d.dtype == FERRY_DTYPE_F32 && d.rank == 1 && d.shape[0] == 50);
  const unsigned char *bytes = (const unsigned char *)(uintptr_t)d.device_ptr;
  for (size_t i = 0; i < 200; i++) CHECK(bytes[i] == 0);
  CHECK_OK(ferry_release(e, lease, NULL));
  ferry_engine_close(e);
  return 0;
}

static ferry_engine_config host_config(void) {
  ferry_engine_config c;
  if (ferry_engine_config_default(&c) != FERRY_OK) abort();
  c.device = FERRY_DEVICE_HOST;
  c.budget_bytes = 1 << 20;
  c.host_memory_bytes = 2 << 20;
  c.staging_slots = 2;
  c.staging_slot_bytes = 8192;
  c.acquire_timeout_ms = 1000;
  return c;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s SOCKET MODEL OUTSIDE FAKES\n", argv[0]);
    return 2;
  }
  const char *socket = argv[1], *model_path = argv[2];
  if (connect_failures(argv[4]) != 0) return 1;

  ferry_engine *e = NULL, *e2 = NULL;
  CHECK_OK(ferry_connect(socket, &e));
  CHECK_OK(ferry_connect(socket, &e2));
  CHECK(e != NULL && e2 != NULL && e != e2);

  /* Paths: outside every model root, missing, not a model. */
  uint64_t m = 0, m2 = 0;
  CHECK_FAILS(ferry_model_open(e, argv[3], &m), FERRY_ERR_NOT_PERMITTED);
  CHECK_FAILS(ferry_model_open(e, "/nonexistent/ferry/model.safetensors", &m), FERRY_ERR_IO);
  CHECK_OK(ferry_model_open(e, model_path, &m));
  CHECK_OK(ferry_model_open(e2, model_path, &m2));
  CHECK(m == m2); /* one daemon, one model per set of files */

  /* Unknown ids and names, out-of-range layers. */
  const ferry_status NF = FERRY_ERR_NOT_FOUND;
  size_t n = 0;
  ferry_lease *lease = NULL, *other = NULL;
  CHECK_FAILS(ferry_layer_count(e, 999, "model", &n), NF);
  CHECK_FAILS(ferry_layer_count(e, m, "vae", &n), NF);
  CHECK_FAILS(ferry_layer_index(e, m, "model", "blocks.999", &n), NF);
  CHECK_FAILS(ferry_acquire(e, 999, "model", 0, NULL, &other), NF);
  CHECK_FAILS(ferry_acquire(e, m, "vae", 0, NULL, &other), NF);
  CHECK_OK(ferry_layer_count(e, m, "model", &n));
  CHECK(n >= 2);
  CHECK_FAILS(ferry_acquire(e, m, "model", n, NULL, &other), NF);
  CHECK_FAILS(ferry_acquire(e, m, "model", SIZE_MAX, NULL, &other), NF);
  CHECK_FAILS(ferry_prefetch(e, m, "model", SIZE_MAX), NF);
  CHECK(other == NULL);
  CHECK_FAILS(ferry_model_close(e, 999), NF);
  CHECK_FAILS(ferry_set_residency(e, m, NULL, 99, 0, 0, 0.0), FERRY_ERR_INVALID_ARGUMENT);

  CHECK_OK(ferry_set_residency(e, m, NULL, FERRY_POLICY_SEQUENTIAL, 1, 0, 0.0));
  CHECK_OK(ferry_acquire(e, m, "model", 0, NULL, &lease));

  /* A stream: daemon mode serves host-backend daemons only. */
  int not_a_stream = 0;
  CHECK_FAILS(ferry_acquire(e, m, "model", 1, &not_a_stream, &other), FERRY_ERR_INVALID_ARGUMENT);
  CHECK_FAILS(ferry_release(e, lease, &not_a_stream), FERRY_ERR_INVALID_ARGUMENT);

  /* Busy while a lease is held, as in-process. */
  CHECK_FAILS(ferry_set_residency(e, m, NULL, FERRY_POLICY_NONE, 0, 0, 0.0), FERRY_ERR_BUSY);
  CHECK_FAILS(ferry_model_close(e, m), FERRY_ERR_BUSY);

  /* A lease passed to another connection, or to an in-process engine, is refused there and
   * stays usable. */
  ferry_engine_config config = host_config();
  ferry_engine *local = NULL;
  CHECK_OK(ferry_engine_open(&config, &local));
  CHECK_FAILS(ferry_release(e2, lease, NULL), NF);
  CHECK_FAILS(ferry_release(local, lease, NULL), NF);
  uint64_t lm = 0;
  ferry_lease *local_lease = NULL;
  CHECK_OK(ferry_model_open(local, model_path, &lm));
  CHECK_OK(ferry_acquire(local, lm, "model", 0, NULL, &local_lease));
  CHECK_FAILS(ferry_release(e, local_lease, NULL), NF);
  CHECK_OK(ferry_release(local, local_lease, NULL));
  ferry_engine_close(local);

  /* Releasing twice: the second is refused, nothing else happens. */
  CHECK_OK(ferry_lease_wait(lease));
  CHECK_OK(ferry_release(e, lease, NULL));
  CHECK_FAILS(ferry_release(e, lease, NULL), NF);

  if (threads_share_an_engine(e, m, n) != 0) return 1;

  /* The daemon goes away while the engines are open and a lease is held. */
  CHECK_OK(ferry_acquire(e, m, "model", 1, NULL, &lease));
  CHECK_OK(ferry_lease_wait(lease));
  ferry_tensor_desc d;
  CHECK_OK(ferry_lease_tensor(lease, 0, &d));
  size_t keep = d.byte_len < 4096 ? (size_t)d.byte_len : 4096;
  unsigned char *before = malloc(keep);
  CHECK(before != NULL);
  memcpy(before, (const void *)(uintptr_t)d.device_ptr, keep);
  ferry_lease *second = NULL;
  CHECK_OK(ferry_acquire(e2, m2, "model", 0, NULL, &second));

  printf("kill-daemon\n");
  fflush(stdout);
  char line[64];
  CHECK(fgets(line, sizeof line, stdin) != NULL);
  CHECK(strncmp(line, "killed", 6) == 0);

  const ferry_status D = FERRY_ERR_DISCONNECTED;
  ferry_engine_stats st;
  CHECK_FAILS(ferry_stats(e, &st), D);
  CHECK(strstr(ferry_last_error(), "lost") != NULL);
  CHECK_FAILS(ferry_acquire(e, m, "model", 0, NULL, &other), D);
  CHECK(other == NULL);
  /* The lease cannot be given back, and stays held (and readable) until the engine closes. */
  CHECK_FAILS(ferry_release(e, lease, NULL), D);
  CHECK_OK(ferry_lease_wait(lease)); /* known ready: no round trip */
  CHECK_OK(ferry_lease_tensor_count(lease, &n));
  CHECK_OK(ferry_lease_tensor(lease, 0, &d));
  CHECK(memcmp((const void *)(uintptr_t)d.device_ptr, before, keep) == 0);
  /* Every call that needs the daemon reports the same loss, the cached ones too. */
  CHECK_FAILS(ferry_layer_count(e, m, "model", &n), D);
  CHECK_FAILS(ferry_layer_index(e, m, "model", "blocks.0", &n), D);
  CHECK_FAILS(ferry_model_open(e, model_path, &m), D);
  CHECK_FAILS(ferry_prefetch(e, m, "model", 0), D);
  CHECK_FAILS(ferry_set_residency(e, m, NULL, FERRY_POLICY_NONE, 0, 0, 0.0), D);
  CHECK_FAILS(ferry_view_remove(e, 12345), D);
  CHECK_FAILS(ferry_model_close(e, m), D);
  /* The other connection finds out on its next call. */
  CHECK_FAILS(ferry_release(e2, second, NULL), D);
  CHECK_FAILS(ferry_stats(e2, &st), D);
  /* And nobody answers at the socket any more. */
  ferry_engine *again = (ferry_engine *)0x1;
  CHECK_FAILS(ferry_connect(socket, &again), D);
  CHECK(again == NULL);

  ferry_engine_close(e); /* frees `lease` */
  ferry_engine_close(e2); /* frees `second` */
  free(before);
  printf("daemon.c: passed\n");
  return 0;
}
