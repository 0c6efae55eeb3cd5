/*
 * example: stream every layer of one component of a model through ferry, then print the
 * engine's stats. The engine is either in-process or the ferry daemon, ferryd; only the call
 * that opens it differs.
 *
 *     example MODEL [COMPONENT] [--budget BYTES] [--lora FILE STRENGTH]...
 *     example --socket PATH MODEL [COMPONENT] [--lora FILE STRENGTH]...
 *     example --daemon MODEL ...            (ferryd at its default socket)
 *
 * MODEL is a .safetensors file, a sharded checkpoint's index, or a diffusers folder;
 * COMPONENT defaults to "model" (the one component of a single-file checkpoint). With
 * --lora, the pass runs over a view of the model through those LoRA files. In daemon mode
 * (--socket, --daemon) the model and LoRA files must lie under one of ferryd's model roots,
 * and the budget is the daemon's.
 *
 * Build: cargo build --release -p ferry-ffi (from the repository root), then `make` here and
 * run build/example.
 */

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ferry.h"

#define MAX_LORAS 16

static int fail(const char *what, ferry_status status) {
  fprintf(stderr, "%s: %s: %s\n", what, ferry_status_str(status), ferry_last_error());
  return 1;
}

#define TRY(call)                                   \
  do {                                              \
    ferry_status s_ = (call);                       \
    if (s_ != FERRY_OK) return fail(#call, s_);     \
  } while (0)

static const char *dtype_name(uint32_t dtype) {
  static const char *const names[] = {
      "BOOL", "F4",  "F6_E2M3", "F6_E3M2", "U8",   "I8",   "F8_E5M2", "F8_E4M3",
      "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32",
      "U32", "F32", "C64", "F64", "I64", "U64"};
  return dtype < sizeof names / sizeof names[0] ? names[dtype] : "?";
}

int main(int argc, char **argv) {
  const char *model_path = NULL, *component = "model";
  const char *loras[MAX_LORAS];
  float strengths[MAX_LORAS];
  size_t n_loras = 0;
  uint64_t budget = 0;
  const char *socket = NULL;
  int daemon = 0;

  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc) {
      socket = argv[++i];
      daemon = 1;
    } else if (strcmp(argv[i], "--daemon") == 0) {
      daemon = 1;
    } else if (strcmp(argv[i], "--lora") == 0 && i + 2 < argc && n_loras < MAX_LORAS) {
      loras[n_loras] = argv[i + 1];
      strengths[n_loras++] = strtof(argv[i + 2], NULL);
      i += 2;
    } else if (strcmp(argv[i], "--budget") == 0 && i + 1 < argc) {
      budget = strtoull(argv[++i], NULL, 10);
    } else if (model_path == NULL) {
      model_path = argv[i];
    } else {
      component = argv[i];
    }
  }
  if (model_path == NULL) {
    fprintf(stderr,
            "usage: %s [--socket PATH | --daemon] MODEL [COMPONENT] [--budget BYTES] "
            "[--lora FILE STRENGTH]...\n",
            argv[0]);
    return 2;
  }

  /* The one difference between the modes: how the engine is opened. */
  ferry_engine *engine = NULL;
  if (daemon) {
    /* NULL: the default socket ($XDG_RUNTIME_DIR/ferry/ferryd.sock, ...). A CUDA daemon is
     * refused with FERRY_ERR_NOT_SHAREABLE: its memory cannot be mapped here yet. */
    TRY(ferry_connect(socket, &engine));
    printf("ferry %s, connected to ferryd at %s\n", ferry_version(),
           socket != NULL ? socket : "the default socket");
  } else {
    ferry_engine_config config;
    TRY(ferry_engine_config_default(&config));
    config.budget_bytes = budget; /* 0: 75% of the device's memory */
    TRY(ferry_engine_open(&config, &engine));
    printf("ferry %s, in-process engine\n", ferry_version());
  }

  uint64_t model = 0, id = 0; /* id: the model, or a view of it through the LoRA stack */
  int rc = 0;
  ferry_status s = ferry_model_open(engine, model_path, &model);
  if (s != FERRY_OK) {
    rc = fail("ferry_model_open", s);
    goto out;
  }

  id = model;
  if (n_loras > 0) {
    s = ferry_view_create(engine, model, loras, strengths, n_loras, FERRY_LORA_BACKUP, &id);
    if (s != FERRY_OK) {
      rc = fail("ferry_view_create", s);
      goto out;
    }
    printf("view %" PRIu64 " of model %" PRIu64 " through %zu LoRA(s)\n", id, model, n_loras);
  }

  size_t layers = 0;
  s = ferry_set_residency(engine, id, NULL, FERRY_POLICY_SEQUENTIAL, 1, 0, 0.0);
  if (s == FERRY_OK) s = ferry_layer_count(engine, id, component, &layers);
  if (s != FERRY_OK) {
    rc = fail("setting up the pass", s);
    goto out;
  }

  uint64_t bytes = 0, tensors = 0;
  for (size_t l = 0; l < layers; l++) {
    ferry_lease *lease = NULL;
    /* With a CUDA stream instead of NULL, the stream would wait for the copy on the device. */
    s = ferry_acquire(engine, id, component, l, NULL, &lease);
    if (s == FERRY_OK) s = ferry_lease_wait(lease);
    size_t count = 0;
    if (s == FERRY_OK) s = ferry_lease_tensor_count(lease, &count);
    for (size_t t = 0; s == FERRY_OK && t < count; t++) {
      ferry_tensor_desc d;
      s = ferry_lease_tensor(lease, t, &d);
      if (s != FERRY_OK) break;
      bytes += d.byte_len;
      tensors++;
      if (l == 0) {
        printf("  %-40s %-5s [", d.name, dtype_name(d.dtype));
        for (uint32_t k = 0; k < d.rank; k++)
          printf("%s%" PRIu64, k ? ", " : "", d.shape[k]);
        printf("] at 0x%" PRIx64 "\n", d.device_ptr);
      }
      /* ... launch work reading d.device_ptr here ... */
    }
    if (lease != NULL) {
      ferry_status r = ferry_release(engine, lease, NULL);
      if (s == FERRY_OK) s = r;
    }
    if (s != FERRY_OK) {
      rc = fail("streaming a layer", s);
      goto out;
    }
  }

  ferry_engine_stats st;
  TRY(ferry_stats(engine, &st));
  printf("%s: %zu layers, %" PRIu64 " tensors, %" PRIu64 " bytes\n", component, layers, tensors,
         bytes);
  printf("acquires %" PRIu64 " (hits %" PRIu64 ", misses %" PRIu64 "), loads %" PRIu64
         ", evictions %" PRIu64 "\n",
         st.acquires, st.hits, st.misses, st.loads, st.evictions);
  printf("streamed %" PRIu64 " bytes, stalled %.3f ms, peak %" PRIu64 " of %" PRIu64
         " budget bytes\n",
         st.bytes_streamed, (double)st.stall_ns / 1e6, st.peak_device_bytes, st.budget);

out:
  if (id != model) {
    ferry_status r = ferry_view_remove(engine, id); /* back to the base's own bytes */
    if (r != FERRY_OK && rc == 0) rc = fail("ferry_view_remove", r);
  }
  ferry_engine_close(engine); /* releases anything still held; in daemon mode, disconnects */
  return rc;
}
