/* A CUDA driver-API call from inside a job container, for the GPU check: initialise CUDA through the injected
 * libcuda, list the devices the container can see (with their UUIDs), and round-trip a buffer through device
 * memory. Prints one JSON line; exit 0 only when all of it worked. Build: cc -O2 -o cuda_probe cuda_probe.c -ldl */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*fn_init)(unsigned);
typedef int (*fn_count)(int *);
typedef int (*fn_get)(int *, int);
typedef int (*fn_name)(char *, int, int);
typedef int (*fn_uuid)(unsigned char *, int);
typedef int (*fn_ctx)(void **, unsigned, int);
typedef int (*fn_alloc)(unsigned long long *, size_t);
typedef int (*fn_memset)(unsigned long long, unsigned char, size_t);
typedef int (*fn_dtoh)(void *, unsigned long long, size_t);
typedef int (*fn_free)(unsigned long long);

#define LOAD(T, var, sym) T var = (T)dlsym(lib, sym); if (!var) { printf("{\"error\": \"no symbol %s\"}\n", sym); return 2; }
#define CHECK(call, what) do { int rc_ = (call); if (rc_) { printf("{\"error\": \"%s failed: %d\"}\n", what, rc_); return 3; } } while (0)

int main(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("{\"error\": \"dlopen libcuda.so.1: %s\"}\n", dlerror()); return 1; }
    LOAD(fn_init, cuInit, "cuInit") LOAD(fn_count, cuDeviceGetCount, "cuDeviceGetCount")
    LOAD(fn_get, cuDeviceGet, "cuDeviceGet") LOAD(fn_name, cuDeviceGetName, "cuDeviceGetName")
    LOAD(fn_uuid, cuDeviceGetUuid, "cuDeviceGetUuid_v2") LOAD(fn_ctx, cuCtxCreate, "cuCtxCreate_v2")
    LOAD(fn_alloc, cuMemAlloc, "cuMemAlloc_v2") LOAD(fn_memset, cuMemsetD8, "cuMemsetD8_v2")
    LOAD(fn_dtoh, cuMemcpyDtoH, "cuMemcpyDtoH_v2") LOAD(fn_free, cuMemFree, "cuMemFree_v2")
    int count = 0, dev = 0;
    char name[128] = {0};
    unsigned char u[16];
    CHECK(cuInit(0), "cuInit");
    CHECK(cuDeviceGetCount(&count), "cuDeviceGetCount");
    printf("{\"cuda_device_count\": %d, \"devices\": [", count);
    for (int i = 0; i < count; i++) {
        CHECK(cuDeviceGet(&dev, i), "cuDeviceGet");
        CHECK(cuDeviceGetName(name, sizeof name, dev), "cuDeviceGetName");
        CHECK(cuDeviceGetUuid(u, dev), "cuDeviceGetUuid");
        printf("%s{\"name\": \"%s\", \"uuid\": \"GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x\"}",
               i ? ", " : "", name, u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
    }
    void *ctx;
    unsigned long long buf;
    unsigned char host[4096];
    CHECK(cuDeviceGet(&dev, 0), "cuDeviceGet");
    CHECK(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate");
    CHECK(cuMemAlloc(&buf, sizeof host), "cuMemAlloc");
    CHECK(cuMemsetD8(buf, 0x5a, sizeof host), "cuMemsetD8");
    CHECK(cuMemcpyDtoH(host, buf, sizeof host), "cuMemcpyDtoH");
    CHECK(cuMemFree(buf), "cuMemFree");
    int ok = 1;
    for (size_t i = 0; i < sizeof host; i++) ok &= host[i] == 0x5a;
    printf("], \"device_memory_roundtrip\": \"%s\"}\n", ok ? "ok" : "MISMATCH");
    fflush(stdout);
    /* CUDA_PROBE_HOLD_SECONDS: keep the context (a compute process NVML lists) that long, for the drain check. */
    const char *hold = getenv("CUDA_PROBE_HOLD_SECONDS");
    if (hold) sleep((unsigned) atoi(hold));
    return ok ? 0 : 4;
}
