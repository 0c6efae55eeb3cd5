/* Smoke test of the C ABI: built and run by tests/c_abi.rs against libferry.a. */

#include <stdio.h>
#include <string.h>

#include "ferry.h"

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
      return 1;                                                                 \
    }                                                                           \
  } while (0)

int main(void) {
  const char *version = ferry_version();
  CHECK(version != NULL);
  CHECK(strlen(version) > 0);
  CHECK(ferry_version() == version);

  CHECK(ferry_abi_version() == 1);

  CHECK(strcmp(ferry_status_str(FERRY_OK), "FERRY_OK") == 0);
  CHECK(strcmp(ferry_status_str(0), "FERRY_OK") == 0);
  CHECK(strcmp(ferry_status_str(FERRY_ERR_BUFFER_TOO_SMALL), "FERRY_ERR_BUFFER_TOO_SMALL") == 0);
  CHECK(strcmp(ferry_status_str(FERRY_ERR_INTERNAL), "FERRY_ERR_INTERNAL") == 0);
  CHECK(strcmp(ferry_status_str(-1), "FERRY_ERR_UNKNOWN") == 0);
  CHECK(strcmp(ferry_status_str(1000), "FERRY_ERR_UNKNOWN") == 0);

  size_t needed = strlen(version) + 1;
  size_t written = 12345;

  CHECK(ferry_version_copy(NULL, 64, &written) == FERRY_ERR_NULL_ARGUMENT);

  char small[2] = {'x', 'x'};
  CHECK(ferry_version_copy(small, sizeof small, &written) == FERRY_ERR_BUFFER_TOO_SMALL);
  CHECK(written == needed);
  CHECK(small[0] == 'x' && small[1] == 'x');

  char big[64];
  memset(big, 'x', sizeof big);
  written = 0;
  CHECK(ferry_version_copy(big, sizeof big, &written) == FERRY_OK);
  CHECK(written == needed);
  CHECK(strcmp(big, version) == 0);

  /* An exactly sized buffer works, and `written` may be NULL. */
  char exact[64];
  CHECK(needed <= sizeof exact);
  CHECK(ferry_version_copy(exact, needed, NULL) == FERRY_OK);
  CHECK(strcmp(exact, version) == 0);

  printf("ferry %s (ABI %u): C smoke test passed\n", version, (unsigned)ferry_abi_version());
  return 0;
}
