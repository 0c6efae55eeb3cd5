/*
 * A stand-in for libcuda.so.1 with the CUDA 12 driver API signatures ferry.cuda binds (types
 * as cuda.h declares them), so that the ctypes binding (argument types, structs passed by
 * pointer and by value, the call order, contexts and clean-up) is tested without a GPU.
 * test_cuda.py compiles it with `cc -shared -fPIC` and loads it through $FERRY_LIBCUDA.
 *
 * Every call is appended to a text log (fake_log); a call made without the right primary
 * context current fails with CUDA_ERROR_INVALID_CONTEXT; fake_fail makes one named call fail
 * once; device memory is a host buffer holding byte (i * 7 + 3) & 0xff at offset i, so that
 * cuMemcpyDtoH can be checked. Interprocess events (cuIpcOpenEventHandle) are numbered in the
 * order they are opened: event n is the pointer EV_BASE + n * 16, logged as ev#n; waiting on,
 * synchronising or destroying one that is not open is CUDA_ERROR_INVALID_HANDLE. Not
 * thread-safe (the tests are single-threaded).
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { char reserved[64]; } CUipcMemHandle;
typedef struct { char reserved[64]; } CUipcEventHandle;
typedef struct CUevent_st *CUevent;
typedef struct CUstream_st *CUstream;
typedef struct { int type; int id; } CUmemLocation;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;

enum {
    SUCCESS = 0, INVALID_VALUE = 1, NOT_INITIALIZED = 3, NO_DEVICE = 100,
    INVALID_DEVICE = 101, INVALID_CONTEXT = 201, INVALID_HANDLE = 400, NOT_SUPPORTED = 801,
};

#define MAX_DEV 4
#define LOG_CAP (1 << 16)
#define VA_BASE 0x7f0000000000ULL
#define IPC_BASE 0x7e0000000000ULL
#define IPC_LEN (4 << 20)
#define EV_BASE 0xe0000ULL
#define MAX_EV 16

static char log_buf[LOG_CAP];
static size_t log_len;
static int initialised, init_rc, ndev = 1, posix_supported = 1, refuse_read_only;
static unsigned char uuids[MAX_DEV][16];
static int retains[MAX_DEV];
static CUcontext stack[16];
static int depth;
static char fail_name[64];
static int fail_rc;
static int imported;             /* imported handles not yet released */
static size_t reserved_size;     /* 0: nothing reserved */
static size_t mapped_size;       /* 0: nothing mapped */
static int ipc_open;
static int access_flags;
static unsigned char *mem;       /* backing of the mapping (VMM or IPC) */
static size_t mem_len;
static CUdeviceptr mem_base;
static int events_made;          /* events opened since the reset (ev#0, ev#1, ...) */
static int event_open[MAX_EV];   /* whether ev#n is open */

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(log_buf + log_len, LOG_CAP - log_len, fmt, ap);
    va_end(ap);
    if (n > 0 && log_len + (size_t)n < LOG_CAP) log_len += (size_t)n;
}

static int failing(const char *name) {
    if (fail_name[0] && strcmp(fail_name, name) == 0) {
        fail_name[0] = 0;
        logf_("  -> fails %d\n", fail_rc);
        return fail_rc;
    }
    return SUCCESS;
}

static CUcontext primary(int dev) { return (CUcontext)(uintptr_t)(0x1000 + dev); }

/* The device whose primary context is current, or -1. */
static int current_dev(void) {
    if (depth == 0) return -1;
    uintptr_t c = (uintptr_t)stack[depth - 1];
    return (c >= 0x1000 && c < 0x1000 + MAX_DEV) ? (int)(c - 0x1000) : -1;
}

static void back(size_t len, CUdeviceptr base) {
    free(mem);
    mem = malloc(len);
    mem_len = len;
    mem_base = base;
    for (size_t i = 0; i < len; i++) mem[i] = (unsigned char)((i * 7 + 3) & 0xff);
}

/* ---- test controls ---------------------------------------------------------------------- */

void fake_reset(int devices, int init_result) {
    log_len = 0;
    log_buf[0] = 0;
    ndev = devices;
    init_rc = init_result; /* for the next cuInit: a driver once initialised stays so */
    posix_supported = 1;
    refuse_read_only = 0;
    fail_name[0] = 0;
    depth = 0;
    imported = 0;
    reserved_size = mapped_size = 0;
    ipc_open = 0;
    access_flags = 0;
    memset(retains, 0, sizeof retains);
    for (int d = 0; d < MAX_DEV; d++)
        for (int i = 0; i < 16; i++) uuids[d][i] = (unsigned char)(0x10 * d + i);
    free(mem);
    mem = NULL;
    mem_len = 0;
    events_made = 0;
    memset(event_open, 0, sizeof event_open);
}
void fake_set_uuid(int dev, const unsigned char *u) { memcpy(uuids[dev], u, 16); }
void fake_fail(const char *name, int rc) {
    snprintf(fail_name, sizeof fail_name, "%s", name);
    fail_rc = rc;
}
void fake_posix_supported(int v) { posix_supported = v; }
void fake_refuse_read_only(int v) { refuse_read_only = v; }
const char *fake_log(void) { return log_buf; }
void fake_clear_log(void) {
    log_len = 0;
    log_buf[0] = 0;
}
/* What is still held: "depth retains imported reserved mapped ipc events". */
const char *fake_state(void) {
    static char out[160];
    int r = 0, ev = 0;
    for (int d = 0; d < MAX_DEV; d++) r += retains[d];
    for (int i = 0; i < MAX_EV; i++) ev += event_open[i];
    snprintf(out, sizeof out,
             "depth=%d retains=%d imported=%d reserved=%zu mapped=%zu ipc=%d events=%d", depth,
             r, imported, reserved_size, mapped_size, ipc_open, ev);
    return out;
}
int fake_access_flags(void) { return access_flags; }

/* ---- the driver API --------------------------------------------------------------------- */

CUresult cuInit(unsigned int flags) {
    logf_("cuInit(%u)\n", flags);
    if (flags != 0) return INVALID_VALUE;
    if (init_rc == SUCCESS) initialised = 1;
    return init_rc;
}

CUresult cuDriverGetVersion(int *v) { *v = 12080; return SUCCESS; }

CUresult cuGetErrorName(CUresult e, const char **s) {
    switch (e) {
    case SUCCESS: *s = "CUDA_SUCCESS"; return SUCCESS;
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; return SUCCESS;
    case NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; return SUCCESS;
    case NO_DEVICE: *s = "CUDA_ERROR_NO_DEVICE"; return SUCCESS;
    case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; return SUCCESS;
    case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; return SUCCESS;
    case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; return SUCCESS;
    case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; return SUCCESS;
    default: *s = NULL; return INVALID_VALUE;
    }
}

CUresult cuGetErrorString(CUresult e, const char **s) {
    if (e == NO_DEVICE) { *s = "no CUDA-capable device is detected"; return SUCCESS; }
    *s = NULL;
    return INVALID_VALUE;
}

CUresult cuDeviceGetCount(int *n) {
    if (!initialised) return NOT_INITIALIZED;
    *n = ndev;
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (!initialised) return NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= ndev) return INVALID_DEVICE;
    *d = ordinal;
    return SUCCESS;
}

/* cuDeviceGetUuid answers the same UUIDs (no MIG here); built with -DNO_UUID_V2 the library
 * lacks cuDeviceGetUuid_v2, as drivers before CUDA 11.4 do. */
CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) {
    if (d < 0 || d >= ndev) return INVALID_DEVICE;
    memcpy(u->bytes, uuids[d], 16);
    return SUCCESS;
}

#ifndef NO_UUID_V2
CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) { return cuDeviceGetUuid(u, d); }
#endif

CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    if (d < 0 || d >= ndev) return INVALID_DEVICE;
    if (attr != 103) return INVALID_VALUE;
    *v = posix_supported;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
    logf_("cuDevicePrimaryCtxRetain(%d)\n", d);
    if (d < 0 || d >= ndev) return INVALID_DEVICE;
    CUresult rc = failing("cuDevicePrimaryCtxRetain");
    if (rc) return rc;
    retains[d]++;
    *c = primary(d);
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    logf_("cuDevicePrimaryCtxRelease_v2(%d)\n", d);
    if (d < 0 || d >= ndev || retains[d] == 0) return INVALID_DEVICE;
    retains[d]--;
    return SUCCESS;
}

CUresult cuCtxPushCurrent_v2(CUcontext c) {
    logf_("cuCtxPushCurrent_v2(%#lx)\n", (unsigned long)(uintptr_t)c);
    if (depth == 16 || c == NULL) return INVALID_VALUE;
    stack[depth++] = c;
    return SUCCESS;
}

CUresult cuCtxPopCurrent_v2(CUcontext *c) {
    logf_("cuCtxPopCurrent_v2\n");
    if (depth == 0) return INVALID_CONTEXT;
    CUcontext top = stack[--depth];
    if (c) *c = top;
    return SUCCESS;
}

CUresult cuCtxSynchronize(void) {
    logf_("cuCtxSynchronize(dev=%d)\n", current_dev());
    if (current_dev() < 0) return INVALID_CONTEXT;
    return failing("cuCtxSynchronize");
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    logf_("cuMemcpyDtoH_v2(%#llx, %zu)\n", src, n);
    if (current_dev() < 0) return INVALID_CONTEXT;
    if (!mem || src < mem_base || src - mem_base + n > mem_len) return INVALID_VALUE;
    memcpy(dst, mem + (src - mem_base), n);
    return SUCCESS;
}

CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *h, void *os_handle,
                                        int type) {
    int fd = (int)(intptr_t)os_handle;
    struct stat st;
    unsigned long long ino = fstat(fd, &st) == 0 ? (unsigned long long)st.st_ino : 0;
    logf_("cuMemImportFromShareableHandle(ino=%llu, type=%d, dev=%d)\n", ino, type,
          current_dev());
    if (current_dev() < 0) return INVALID_CONTEXT;
    if (type != 1 || ino == 0) return INVALID_VALUE;
    CUresult rc = failing("cuMemImportFromShareableHandle");
    if (rc) return rc;
    imported++;
    *h = 0xab00;
    return SUCCESS;
}

CUresult cuMemAddressReserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr,
                             unsigned long long flags) {
    logf_("cuMemAddressReserve(%zu, %zu, %#llx, %llu)\n", size, align, addr, flags);
    if (current_dev() < 0) return INVALID_CONTEXT;
    if (size == 0 || size % (2 << 20) || align || addr || flags || reserved_size)
        return INVALID_VALUE;
    CUresult rc = failing("cuMemAddressReserve");
    if (rc) return rc;
    reserved_size = size;
    *p = VA_BASE;
    return SUCCESS;
}

CUresult cuMemMap(CUdeviceptr p, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                  unsigned long long flags) {
    logf_("cuMemMap(%#llx, %zu, %zu, %#llx, %llu)\n", p, size, offset, h, flags);
    if (current_dev() < 0) return INVALID_CONTEXT;
    if (p != VA_BASE || size != reserved_size || offset || flags || mapped_size)
        return INVALID_VALUE;
    if (h != 0xab00 || imported == 0) return INVALID_HANDLE;
    CUresult rc = failing("cuMemMap");
    if (rc) return rc;
    mapped_size = size;
    back(size, p);
    return SUCCESS;
}

CUresult cuMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc *desc, size_t count) {
    logf_("cuMemSetAccess(%#llx, %zu, {type=%d, id=%d, flags=%d}, %zu)\n", p, size,
          desc->location.type, desc->location.id, desc->flags, count);
    if (current_dev() < 0) return INVALID_CONTEXT;
    if (p != VA_BASE || size != mapped_size || count != 1 || desc->location.type != 1 ||
        desc->location.id != current_dev() || (desc->flags != 1 && desc->flags != 3))
        return INVALID_VALUE;
    if (desc->flags == 1 && refuse_read_only) return INVALID_VALUE;
    CUresult rc = failing("cuMemSetAccess");
    if (rc) return rc;
    access_flags = desc->flags;
    return SUCCESS;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
    logf_("cuMemRelease(%#llx)\n", h);
    if (h != 0xab00 || imported == 0) return INVALID_HANDLE;
    imported--;
    return SUCCESS;
}

CUresult cuMemUnmap(CUdeviceptr p, size_t size) {
    logf_("cuMemUnmap(%#llx, %zu)\n", p, size);
    if (current_dev() < 0) return INVALID_CONTEXT;
    if (p != VA_BASE || size != mapped_size || mapped_size == 0) return INVALID_VALUE;
    mapped_size = 0;
    return SUCCESS;
}

CUresult cuMemAddressFree(CUdeviceptr p, size_t size) {
    logf_("cuMemAddressFree(%#llx, %zu)\n", p, size);
    if (current_dev() < 0) return INVALID_CONTEXT;
    if (p != VA_BASE || size != reserved_size || mapped_size) return INVALID_VALUE;
    reserved_size = 0;
    return SUCCESS;
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, CUipcMemHandle h, unsigned int flags) {
    logf_("cuIpcOpenMemHandle_v2(");
    for (int i = 0; i < 64; i++) logf_("%02x", (unsigned char)h.reserved[i]);
    logf_(", %u, dev=%d)\n", flags, current_dev());
    if (current_dev() < 0) return INVALID_CONTEXT;
    CUresult rc = failing("cuIpcOpenMemHandle_v2");
    if (rc) return rc;
    ipc_open++;
    *p = IPC_BASE;
    back(IPC_LEN, IPC_BASE);
    return SUCCESS;
}

CUresult cuIpcCloseMemHandle(CUdeviceptr p) {
    logf_("cuIpcCloseMemHandle(%#llx)\n", p);
    if (current_dev() < 0) return INVALID_CONTEXT;
    if (p != IPC_BASE || ipc_open == 0) return INVALID_VALUE;
    ipc_open--;
    return SUCCESS;
}

/* Any stream value is accepted (torch's streams are not the stand-in's to know). */
CUresult cuStreamSynchronize(CUstream s) {
    logf_("cuStreamSynchronize(%#lx, dev=%d)\n", (unsigned long)(uintptr_t)s, current_dev());
    if (current_dev() < 0) return INVALID_CONTEXT;
    return failing("cuStreamSynchronize");
}

/* ---- interprocess events (built with -DNO_EVENTS the library lacks them) ---------------- */

#ifndef NO_EVENTS

/* The number of an open event, or -1. */
static int event_index(CUevent e) {
    uintptr_t v = (uintptr_t)e;
    if (v < EV_BASE || (v - EV_BASE) % 16) return -1;
    uintptr_t n = (v - EV_BASE) / 16;
    return n < (uintptr_t)events_made && event_open[n] ? (int)n : -1;
}

CUresult cuIpcOpenEventHandle(CUevent *e, CUipcEventHandle h) {
    logf_("cuIpcOpenEventHandle(");
    for (int i = 0; i < 64; i++) logf_("%02x", (unsigned char)h.reserved[i]);
    logf_(", dev=%d)\n", current_dev());
    if (current_dev() < 0) return INVALID_CONTEXT;
    CUresult rc = failing("cuIpcOpenEventHandle");
    if (rc) return rc;
    if (events_made == MAX_EV) return INVALID_VALUE;
    event_open[events_made] = 1;
    *e = (CUevent)(uintptr_t)(EV_BASE + 16 * (unsigned long long)events_made);
    events_made++;
    return SUCCESS;
}

CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned int flags) {
    logf_("cuStreamWaitEvent(%#lx, ev#%d, %u, dev=%d)\n", (unsigned long)(uintptr_t)s,
          event_index(e), flags, current_dev());
    if (event_index(e) < 0) return INVALID_HANDLE;
    if (flags != 0) return INVALID_VALUE;
    return failing("cuStreamWaitEvent");
}

CUresult cuEventSynchronize(CUevent e) {
    logf_("cuEventSynchronize(ev#%d, dev=%d)\n", event_index(e), current_dev());
    if (event_index(e) < 0) return INVALID_HANDLE;
    return failing("cuEventSynchronize");
}

CUresult cuEventDestroy_v2(CUevent e) {
    int n = event_index(e);
    logf_("cuEventDestroy_v2(ev#%d, dev=%d)\n", n, current_dev());
    if (n < 0) return INVALID_HANDLE;
    CUresult rc = failing("cuEventDestroy_v2");
    if (rc) return rc;
    event_open[n] = 0;
    return SUCCESS;
}
#endif
