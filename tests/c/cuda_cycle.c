/* The C ABI on SVFT_BACKEND_CUDA with device memory this program allocates itself through the
 * CUDA driver API (run by tests/ffi_c.rs, against the virtual GPU or a real driver).
 *
 * For each pattern x plan: a layer created from a device weight (and bias) on an odd shape,
 * coefficients and gamma set from the host, then forward, backward and merge on a stream of the
 * caller's own (a long memset, the inputs' copies into NaN-poisoned buffers and the outputs'
 * NaN poison enqueued on that stream before, read-backs after, no host synchronisation in
 * between: a missing join either way reads poison), and the same calls on SVFT_BACKEND_CPU with
 * host copies of the same data: every output must match within a relative error of 1e-4. Then a forward on
 * the legacy default stream (NULL), wrong inputs on CUDA (host pointers, a wrong length, a wrong
 * dtype: the documented statuses, with a message), and the context left as it was, with no
 * error pending.
 *
 * usage: cuda_cycle
 * stdout: "device: NAME" first, "cuda_cycle: N checks, 0 failures" last.
 * exit: 0 passed, 1 failed, 77 no CUDA device or a build without kernels (the reason on stdout). */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda.h>

#include "svft.h"
#include "check.h"

#define SKIP 77

static int checks, failures;


/* Every driver call's result. */
#define CU(call)                                                                        \
    do {                                                                                \
        CUresult r_ = (call);                                                           \
        if (r_ != CUDA_SUCCESS) {                                                       \
            const char *name_ = "?";                                                    \
            cuGetErrorName(r_, &name_);                                                 \
            fprintf(stderr, "%s:%d: %s -> %s (%d)\n", __FILE__, __LINE__, #call, name_, \
                    (int)r_);                                                           \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

static void expect(bool ok, const char *what) {
    checks++;
    if (!ok) {
        failures++;
        printf("FAILED: %s\n", what);
    }
}

/* A wrong call must return `want` and leave a message. */
static void expect_status(SvftStatus got, SvftStatus want, const char *what) {
    char msg[512];
    size_t len = 0;
    svft_last_error(msg, sizeof msg, &len);
    checks++;
    if (got != want || len == 0) {
        const char *got_name = "?", *want_name = "?";
        svft_status_name(got, &got_name);
        svft_status_name(want, &want_name);
        failures++;
        printf("FAILED: %s -> %s (\"%s\"), expected %s with a message\n", what, got_name, msg, want_name);
    } else if (getenv("SVFT_VERBOSE")) {
        printf("ok %s: %s\n", what, msg);
    }
}

/* Deterministic pseudo-normal values (sum of four uniforms, centred). */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float randn(void) {
    double sum = 0.0;
    for (int k = 0; k < 4; k++) {
        rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
        sum += (double)(rng_state >> 11) / 9007199254740992.0;
    }
    return (float)((sum - 2.0) * 1.7320508);
}

static float *host_f32(size_t count, bool random) {
    float *p = malloc((count ? count : 1) * sizeof(float));
    if (!p) exit(1);
    for (size_t k = 0; k < count; k++) p[k] = random ? randn() : NAN;
    return p;
}

static CUdeviceptr dev_alloc(size_t count) {
    CUdeviceptr p = 0;
    CU(cuMemAlloc(&p, (count ? count : 1) * sizeof(float)));
    return p;
}

/* ||a - b|| / ||b||, infinite when a holds a non-finite value. */
static double rel_err(const float *a, const float *b, size_t count) {
    double num = 0.0, den = 0.0;
    for (size_t k = 0; k < count; k++) {
        if (!isfinite(a[k])) return INFINITY;
        double d = (double)a[k] - (double)b[k];
        num += d * d;
        den += (double)b[k] * (double)b[k];
    }
    return sqrt(num) / (den > 0.0 ? sqrt(den) : 1.0);
}

static void expect_close(const char *what, const char *name, const float *cuda, const float *cpu, size_t count) {
    char line[256];
    double e = rel_err(cuda, cpu, count);
    snprintf(line, sizeof line, "%s: %s relative error %g (tolerance 1e-4)", what, name, e);
    expect(e <= 1e-4, line);
    if (getenv("SVFT_VERBOSE")) printf("%s\n", line);
}

enum { D_OUT = 37, D_IN = 23, N = 9 };
static const float GAMMA = 0.3f;
#define POISON 0x7fc00000u /* a quiet NaN as f32 bits */
#define BUSY_FLOATS ((size_t)32 << 20) /* 128 MiB of memset before each step's inputs */

/* The CPU layer's step on host buffers: y, dx, dm, dgamma, w. */
static void cpu_step(SvftLayer *layer, const float *x, const float *gy, size_t nnz, float *y, float *dx, float *dm,
                     float *dg, float *w) {
    CHECK(svft_layer_forward(layer, SVFT_DTYPE_F32, x, N * D_IN, N, y, N * D_OUT, NULL));
    CHECK(svft_layer_backward(layer, SVFT_DTYPE_F32, gy, N * D_OUT, N, dx, N * D_IN, dm, nnz, dg, NULL));
    CHECK(svft_layer_merge(layer, SVFT_DTYPE_F32, w, D_OUT * D_IN, NULL));
}

int main(void) {
    bool available = false;
    char why[512] = "";
    CHECK(svft_backend_available(SVFT_BACKEND_CUDA, &available));
    if (!available) {
        svft_last_error(why, sizeof why, NULL);
        printf("skipped: no CUDA backend: %s\n", why);
        return SKIP;
    }
    CUresult init = cuInit(0);
    int count = 0;
    if (init != CUDA_SUCCESS || cuDeviceGetCount(&count) != CUDA_SUCCESS || count == 0) {
        const char *name = "?";
        cuGetErrorName(init, &name);
        printf("skipped: no CUDA device (cuInit: %s, %d devices)\n", name, count);
        return SKIP;
    }
    CUdevice dev;
    CU(cuDeviceGet(&dev, 0));
    char dev_name[256];
    CU(cuDeviceGetName(dev_name, sizeof dev_name, dev));
    printf("device: %s\n", dev_name);
    CUcontext ctx = NULL, current = NULL;
    CU(cuDevicePrimaryCtxRetain(&ctx, dev));
    CU(cuCtxSetCurrent(ctx));
    CUstream stream;
    CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING)); /* no implicit join with the NULL stream */
    void *const cs = (void *)stream;

    /* The data, host side; the weight and bias also on the device (written synchronously, as
     * svft_layer_from_weight requires). */
    float *w0 = host_f32(D_OUT * D_IN, true), *bias = host_f32(D_OUT, true);
    float *x = host_f32(N * D_IN, true), *gy = host_f32(N * D_OUT, true);
    CUdeviceptr w0_d = dev_alloc(D_OUT * D_IN), bias_d = dev_alloc(D_OUT);
    CU(cuMemcpyHtoD(w0_d, w0, D_OUT * D_IN * sizeof(float)));
    CU(cuMemcpyHtoD(bias_d, bias, D_OUT * sizeof(float)));
    CUdeviceptr x_d = dev_alloc(N * D_IN), gy_d = dev_alloc(N * D_OUT), y_d = dev_alloc(N * D_OUT);
    CUdeviceptr dx_d = dev_alloc(N * D_IN), w_d = dev_alloc(D_OUT * D_IN);
    /* x and gy staged on the device; each step copies them into x_d and gy_d on the caller's
     * stream behind a long memset of `busy`, so a layer that does not wait for the caller's
     * earlier work reads poison. */
    CUdeviceptr x_stage = dev_alloc(N * D_IN), gy_stage = dev_alloc(N * D_OUT), busy = dev_alloc(BUSY_FLOATS);
    CU(cuMemcpyHtoD(x_stage, x, N * D_IN * sizeof(float)));
    CU(cuMemcpyHtoD(gy_stage, gy, N * D_OUT * sizeof(float)));
    /* Outputs read back from the device, and the CPU's. */
    float *y = host_f32(N * D_OUT, false), *dx = host_f32(N * D_IN, false), *w = host_f32(D_OUT * D_IN, false);
    float *y_ref = host_f32(N * D_OUT, false), *dx_ref = host_f32(N * D_IN, false);
    float *w_ref = host_f32(D_OUT * D_IN, false);

    const char *patterns[] = {"banded:2", "random:3:seed=5"};
    const int32_t plans[] = {SVFT_PLAN_FACTORED, SVFT_PLAN_MERGED, SVFT_PLAN_SMALL_N};
    const char *plan_names[] = {"?", "factored", "merged", "small_n"};
    for (size_t pi = 0; pi < sizeof patterns / sizeof *patterns; pi++) {
        for (size_t qi = 0; qi < sizeof plans / sizeof *plans; qi++) {
            char what[128];
            snprintf(what, sizeof what, "%s %s %dx%d n=%d", patterns[pi], plan_names[plans[qi]], D_OUT, D_IN, N);
            SvftLayer *gpu = NULL, *cpu = NULL;
            CHECK(svft_layer_from_weight(SVFT_BACKEND_CUDA, (const void *)(uintptr_t)w0_d, SVFT_DTYPE_F32,
                                         D_OUT * D_IN, D_OUT, D_IN, 0, patterns[pi], SVFT_INIT_OFFICIAL, true, 3,
                                         (const void *)(uintptr_t)bias_d, D_OUT, &gpu));
            CHECK(svft_layer_from_weight(SVFT_BACKEND_CPU, w0, SVFT_DTYPE_F32, D_OUT * D_IN, D_OUT, D_IN, 0,
                                         patterns[pi], SVFT_INIT_OFFICIAL, true, 3, bias, D_OUT, &cpu));
            CU(cuCtxGetCurrent(&current));
            expect(current == ctx, "creation on CUDA changed the current context");
            int32_t backend = -1;
            size_t nnz = 0, nnz_cpu = 0, rank = 0;
            CHECK(svft_layer_info(gpu, &backend, NULL, NULL));
            expect(backend == SVFT_BACKEND_CUDA, "the CUDA layer reports another backend");
            CHECK(svft_layer_shape(gpu, NULL, NULL, &rank, &nnz));
            CHECK(svft_layer_shape(cpu, NULL, NULL, NULL, &nnz_cpu));
            expect(nnz == nnz_cpu && rank == D_IN, "CUDA and CPU layers differ in shape");
            /* Same coefficients and gamma on both (from the host). */
            float *m = host_f32(nnz, true);
            for (size_t k = 0; k < nnz; k++) m[k] *= 0.1f;
            for (int side = 0; side < 2; side++) {
                SvftLayer *l = side ? cpu : gpu;
                CHECK(svft_layer_set_plan(l, plans[qi]));
                CHECK(svft_layer_set_coefficients(l, m, nnz));
                CHECK(svft_layer_set_gamma(l, GAMMA));
            }
            CUdeviceptr dm_d = dev_alloc(nnz), dg_d = dev_alloc(1);
            float *dm = host_f32(nnz, false), *dm_ref = host_f32(nnz, false), dg = NAN, dg_ref = NAN;

            /* CUDA: everything enqueued on the caller's stream, one synchronisation at the end. */
            CU(cuMemsetD32Async(x_d, POISON, N * D_IN, stream));
            CU(cuMemsetD32Async(gy_d, POISON, N * D_OUT, stream));
            CU(cuStreamSynchronize(stream));
            CU(cuMemsetD32Async(busy, 0, BUSY_FLOATS, stream));
            CU(cuMemcpyDtoDAsync(x_d, x_stage, N * D_IN * sizeof(float), stream));
            CU(cuMemcpyDtoDAsync(gy_d, gy_stage, N * D_OUT * sizeof(float), stream));
            CU(cuMemsetD32Async(y_d, POISON, N * D_OUT, stream));
            CU(cuMemsetD32Async(dx_d, POISON, N * D_IN, stream));
            CU(cuMemsetD32Async(dm_d, POISON, nnz, stream));
            CU(cuMemsetD32Async(dg_d, POISON, 1, stream));
            CU(cuMemsetD32Async(w_d, POISON, D_OUT * D_IN, stream));
            CHECK(svft_layer_forward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)x_d, N * D_IN, N,
                                     (void *)(uintptr_t)y_d, N * D_OUT, cs));
            CHECK(svft_layer_backward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)gy_d, N * D_OUT, N,
                                      (void *)(uintptr_t)dx_d, N * D_IN, (float *)(uintptr_t)dm_d, nnz,
                                      (float *)(uintptr_t)dg_d, cs));
            CHECK(svft_layer_merge(gpu, SVFT_DTYPE_F32, (void *)(uintptr_t)w_d, D_OUT * D_IN, cs));
            CU(cuMemcpyDtoHAsync(y, y_d, N * D_OUT * sizeof(float), stream));
            CU(cuMemcpyDtoHAsync(dx, dx_d, N * D_IN * sizeof(float), stream));
            CU(cuMemcpyDtoHAsync(dm, dm_d, nnz * sizeof(float), stream));
            CU(cuMemcpyDtoHAsync(&dg, dg_d, sizeof(float), stream));
            CU(cuMemcpyDtoHAsync(w, w_d, D_OUT * D_IN * sizeof(float), stream));
            CU(cuStreamSynchronize(stream));
            CU(cuCtxGetCurrent(&current));
            expect(current == ctx, "a CUDA step changed the current context");

            cpu_step(cpu, x, gy, nnz, y_ref, dx_ref, dm_ref, &dg_ref, w_ref);
            expect_close(what, "Y", y, y_ref, N * D_OUT);
            expect_close(what, "dX", dx, dx_ref, N * D_IN);
            expect_close(what, "dM", dm, dm_ref, nnz);
            expect_close(what, "dgamma", &dg, &dg_ref, 1);
            expect_close(what, "W", w, w_ref, D_OUT * D_IN);

            /* Forward again on the legacy default stream (NULL), read back with a blocking copy
             * (ordered after the NULL stream's work). */
            CU(cuStreamSynchronize(stream));
            CU(cuMemsetD32(y_d, POISON, N * D_OUT));
            CHECK(svft_layer_forward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)x_d, N * D_IN, N,
                                     (void *)(uintptr_t)y_d, N * D_OUT, NULL));
            CU(cuMemcpyDtoH(y, y_d, N * D_OUT * sizeof(float)));
            expect_close(what, "Y on the NULL stream", y, y_ref, N * D_OUT);

            /* Wrong inputs on CUDA: the documented statuses, the layer unharmed. */
            if (pi == 0 && qi == 0) {
                expect_status(svft_layer_forward(gpu, SVFT_DTYPE_F32, x, N * D_IN, N, (void *)(uintptr_t)y_d,
                                                 N * D_OUT, cs),
                              SVFT_STATUS_INVALID_ARGUMENT, "forward with a host x");
                expect_status(svft_layer_forward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)x_d, N * D_IN, N,
                                                 y, N * D_OUT, cs),
                              SVFT_STATUS_INVALID_ARGUMENT, "forward with a host y");
                expect_status(svft_layer_forward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)x_d, N * D_IN - 1,
                                                 N, (void *)(uintptr_t)y_d, N * D_OUT, cs),
                              SVFT_STATUS_SHAPE, "forward with x one element short");
                expect_status(svft_layer_forward(gpu, SVFT_DTYPE_BF16, (const void *)(uintptr_t)x_d, N * D_IN,
                                                 N, (void *)(uintptr_t)y_d, N * D_OUT, cs),
                              SVFT_STATUS_UNSUPPORTED_DTYPE, "forward in bf16 on an f32 layer");
                CHECK(svft_layer_forward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)x_d, N * D_IN, N,
                                         (void *)(uintptr_t)y_d, N * D_OUT, cs));
                expect_status(svft_layer_backward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)gy_d, N * D_OUT,
                                                  N, (void *)(uintptr_t)dx_d, N * D_IN, dm, nnz, NULL, cs),
                              SVFT_STATUS_INVALID_ARGUMENT, "backward with a host grad_m");
                SvftLayer *none = (SvftLayer *)(uintptr_t)0x1230;
                expect_status(svft_layer_from_weight(SVFT_BACKEND_CUDA, w0, SVFT_DTYPE_F32, D_OUT * D_IN, D_OUT,
                                                     D_IN, 0, patterns[pi], SVFT_INIT_OFFICIAL, true, 3, NULL, 0,
                                                     &none),
                              SVFT_STATUS_INVALID_ARGUMENT, "creation from a host weight");
                expect(none == NULL, "failed creation left *out set");
                /* Still usable: the same step again matches. */
                CU(cuMemsetD32Async(dx_d, POISON, N * D_IN, stream));
                CHECK(svft_layer_forward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)x_d, N * D_IN, N,
                                         (void *)(uintptr_t)y_d, N * D_OUT, cs));
                CHECK(svft_layer_backward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)gy_d, N * D_OUT, N,
                                          (void *)(uintptr_t)dx_d, N * D_IN, (float *)(uintptr_t)dm_d, nnz, NULL,
                                          cs));
                CU(cuMemcpyDtoHAsync(dx, dx_d, N * D_IN * sizeof(float), stream));
                CU(cuStreamSynchronize(stream));
                expect_close(what, "dX after the wrong calls", dx, dx_ref, N * D_IN);
            }

            CHECK(svft_layer_destroy(gpu));
            CHECK(svft_layer_destroy(cpu));
            expect_status(svft_layer_destroy(gpu), SVFT_STATUS_INVALID_HANDLE, "double destroy");
            CU(cuMemFree(dm_d));
            CU(cuMemFree(dg_d));
            free(m), free(dm), free(dm_ref);
        }
    }

    /* A layer over saved factors (device memory) and an explicit index set with a duplicate
     * pair, against the same call on the CPU: the indices kept as given, the same Y. */
    {
        SvftLayer *cpu = NULL, *gpu = NULL;
        const size_t r = D_IN;
        CHECK(svft_layer_from_weight(SVFT_BACKEND_CPU, w0, SVFT_DTYPE_F32, D_OUT * D_IN, D_OUT, D_IN, 0, "plain",
                                     SVFT_INIT_ZERO, false, 0, NULL, 0, &cpu));
        float *u = host_f32(D_OUT * r, false), *s = host_f32(r, false), *v = host_f32(D_IN * r, false);
        CHECK(svft_layer_factors(cpu, u, D_OUT * r, s, r, v, D_IN * r));
        CHECK(svft_layer_destroy(cpu));
        CUdeviceptr u_d = dev_alloc(D_OUT * r), s_d = dev_alloc(r), v_d = dev_alloc(D_IN * r);
        CU(cuMemcpyHtoD(u_d, u, D_OUT * r * sizeof(float)));
        CU(cuMemcpyHtoD(s_d, s, r * sizeof(float)));
        CU(cuMemcpyHtoD(v_d, v, D_IN * r * sizeof(float)));
        uint32_t rows[] = {3, 0, 22, 3, 11}, cols[] = {2, 17, 22, 2, 0}, got_rows[5], got_cols[5];
#define INDEXED(backend, up, sp, vp, pat, outp)                                                                  \
    svft_layer_from_factors_indexed(backend, SVFT_DTYPE_F32, D_OUT, D_IN, r, up, D_OUT * r, sp, r, vp, D_IN * r, \
                                    pat, rows, cols, 5, SVFT_INIT_OFFICIAL, true, 9, NULL, 0, outp)
        const void *ud = (const void *)(uintptr_t)u_d, *sd = (const void *)(uintptr_t)s_d;
        const void *vd = (const void *)(uintptr_t)v_d;
        CHECK(INDEXED(SVFT_BACKEND_CUDA, ud, sd, vd, "random:1", &gpu));
        CHECK(INDEXED(SVFT_BACKEND_CPU, u, s, v, "random:1", &cpu));
        SvftLayer *none = NULL;
        expect_status(INDEXED(SVFT_BACKEND_CUDA, ud, sd, vd, "banded:1", &none), SVFT_STATUS_INVALID_ARGUMENT,
                      "an explicit set that is not the band its spec names");
        CHECK(svft_layer_indices(gpu, got_rows, got_cols, 5));
        expect(memcmp(rows, got_rows, sizeof rows) == 0 && memcmp(cols, got_cols, sizeof cols) == 0,
               "the CUDA layer's indices are not the ones given");
        CHECK(svft_layer_set_gamma(gpu, GAMMA));
        CHECK(svft_layer_set_gamma(cpu, GAMMA));
        CU(cuMemsetD32Async(y_d, POISON, N * D_OUT, stream));
        CHECK(svft_layer_forward(gpu, SVFT_DTYPE_F32, (const void *)(uintptr_t)x_d, N * D_IN, N,
                                 (void *)(uintptr_t)y_d, N * D_OUT, cs));
        CU(cuMemcpyDtoHAsync(y, y_d, N * D_OUT * sizeof(float), stream));
        CU(cuStreamSynchronize(stream));
        CHECK(svft_layer_forward(cpu, SVFT_DTYPE_F32, x, N * D_IN, N, y_ref, N * D_OUT, NULL));
        expect_close("explicit index set", "Y", y, y_ref, N * D_OUT);
        CHECK(svft_layer_destroy(gpu));
        CHECK(svft_layer_destroy(cpu));
        CU(cuMemFree(u_d));
        CU(cuMemFree(s_d));
        CU(cuMemFree(v_d));
        free(u), free(s), free(v);
    }

    /* No error pending on the context (a fault in the library's work would be sticky here). */
    CU(cuCtxSynchronize());
    CU(cuCtxGetCurrent(&current));
    expect(current == ctx, "the current context changed");
    CUdeviceptr bufs[] = {w0_d, bias_d, x_d, gy_d, y_d, dx_d, w_d, x_stage, gy_stage, busy};
    for (size_t k = 0; k < sizeof bufs / sizeof *bufs; k++) CU(cuMemFree(bufs[k]));
    CU(cuStreamDestroy(stream));
    CU(cuDevicePrimaryCtxRelease(dev));
    free(w0), free(bias), free(x), free(gy), free(y), free(dx), free(w), free(y_ref), free(dx_ref), free(w_ref);
    printf("cuda_cycle: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
