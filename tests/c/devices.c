/*
 * Naming a daemon device through the C ABI (ferry_connect_device): built and run by
 * tests/c_abi.rs against a ferryd simulating three host devices, the third of which failed to
 * open (it was configured on a NUMA node the machine lacks).
 *
 * usage: devices MODEL.safetensors LAYER_BYTES SOCKET
 *
 * MODEL has LAYERS layers, each one U8 tensor `blocks.<l>.weight` of LAYER_BYTES bytes whose
 * byte i is (i * 31 + 1 + l) mod 256. One engine per device (by index and by UUID): the model
 * opened on each gets an id naming that device (top 16 bits), and every byte read through each
 * engine's tensors is checked, so each engine maps its own device's arena. The failed device,
 * an unknown one and a malformed name each fail with their own status and a message.
 */

#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define LAYERS 6

static size_t layer_bytes;

static int check_all(ferry_engine *e, uint64_t model) {
  for (size_t l = 0; l < LAYERS; l++) {
    if (check_u8_block(e, model, l, layer_bytes, 1) != 0) return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s MODEL LAYER_BYTES SOCKET\n", argv[0]);
    return 2;
  }
  const char *model_path = argv[1];
  layer_bytes = (size_t)strtoull(argv[2], NULL, 10);
  const char *socket = argv[3];

  ferry_engine *on0 = NULL, *on1 = NULL, *bad = (ferry_engine *)(uintptr_t)1;
  CHECK_OK(ferry_connect_device(socket, "HOST-0000", &on0));
  CHECK_OK(ferry_connect_device(socket, "1", &on1));
  uint64_t m0 = 0, m1 = 0;
  CHECK_OK(ferry_model_open(on0, model_path, &m0));
  CHECK_OK(ferry_model_open(on1, model_path, &m1));
  CHECK((m0 >> 48) == 0);
  CHECK((m1 >> 48) == 1);
  CHECK(m0 != m1);
  if (check_all(on1, m1) != 0) return 1;
  if (check_all(on0, m0) != 0) return 1;
  /* A device-bound engine reports its device's counters; an unbound one the daemon's sum
   * (two devices serve, 1 MiB budget each). */
  ferry_engine_stats st;
  CHECK_OK(ferry_stats(on1, &st));
  CHECK(st.budget == (1u << 20));
  CHECK(st.bytes_streamed >= LAYERS * layer_bytes);

  CHECK_FAILS(ferry_connect_device(socket, "2", &bad), FERRY_ERR_DEVICE);
  CHECK(bad == NULL);
  CHECK(strstr(ferry_last_error(), "NUMA node 99") != NULL);
  CHECK_FAILS(ferry_connect_device(socket, "7", &bad), FERRY_ERR_NOT_FOUND);
  CHECK(strstr(ferry_last_error(), "no device 7") != NULL);
  CHECK_FAILS(ferry_connect_device(socket, "GPU 1", &bad), FERRY_ERR_INVALID_ARGUMENT);
  CHECK_FAILS(ferry_connect_device(socket, "0", NULL), FERRY_ERR_NULL_ARGUMENT);
  /* NULL: the daemon's default device, as ferry_connect. */
  ferry_engine *dflt = NULL;
  CHECK_OK(ferry_connect_device(socket, NULL, &dflt));
  uint64_t md = 0;
  CHECK_OK(ferry_model_open(dflt, model_path, &md));
  CHECK(md == m0);
  CHECK_OK(ferry_stats(dflt, &st));
  CHECK(st.budget == 2 * (1u << 20));

  CHECK_OK(ferry_model_close(dflt, md));
  CHECK_OK(ferry_model_close(on0, m0));
  CHECK_OK(ferry_model_close(on1, m1));
  ferry_engine_close(dflt);
  ferry_engine_close(on0);
  ferry_engine_close(on1);
  printf("devices.c (daemon mode): ok\n");
  return 0;
}
