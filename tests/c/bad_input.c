/* Calls every export of svft.h with wrong arguments and expects the documented status codes
 * (run by tests/ffi_c.rs). Also checks that each failure leaves a message, each success an
 * empty one, and that the library keeps working afterwards. Prints "checks N failures F". */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "svft.h"

static int checks, failures;

static void expect(int line, const char *call, SvftStatus got, SvftStatus want) {
    char msg[256];
    size_t len = 0;
    checks++;
    if (svft_last_error(msg, sizeof msg, &len) != SVFT_STATUS_OK) {
        failures++;
        printf("line %d: svft_last_error failed\n", line);
        return;
    }
    const char *got_name = "?", *want_name = "?";
    svft_status_name(got, &got_name);
    svft_status_name(want, &want_name);
    if (got != want) {
        failures++;
        printf("line %d: %s -> %s (%s), expected %s\n", line, call, got_name, msg, want_name);
    } else if (want != SVFT_STATUS_OK && len == 0) {
        failures++;
        printf("line %d: %s failed without a message\n", line, call);
    } else if (want == SVFT_STATUS_OK && len != 0) {
        failures++;
        printf("line %d: %s succeeded but left a message: %s\n", line, call, msg);
    } else if (want != SVFT_STATUS_OK && getenv("SVFT_VERBOSE")) {
        printf("ok %-28s %s\n", want_name, msg);
    }
}

#define EXPECT(want, call) expect(__LINE__, #call, (call), SVFT_STATUS_##want)
#define EXPECT_STATUS(status, call) expect(__LINE__, #call, (call), (status))
#define CPU SVFT_BACKEND_CPU
#define F32 SVFT_DTYPE_F32

enum { O = 6, I = 5, N = 3 };

int main(void) {
    /* Buffers with room for deliberately misaligned views. */
    static float w[O * I + 1], bias[O], x[N * I + 1], y[N * O + 1], gy[N * O], dx[N * I], dm[64 + 1];
    static float m[64], big[64 * 64], u[O * I + 1], s[I + 1], v[I * I + 1];
    static uint32_t rows[64], cols[64];
    for (int k = 0; k < O * I; k++) w[k] = (float)sin(0.37 * k + 0.1);
    for (int k = 0; k < N * I; k++) x[k] = (float)cos(0.21 * k);
    for (int k = 0; k < N * O; k++) gy[k] = (float)sin(0.13 * k + 1.0);
    float *w_mis = (float *)((char *)w + 1), *y_mis = (float *)((char *)y + 2);
    const char *str = NULL;
    uint32_t abi = 0;
    bool flag = false;
    size_t sz = 0;
    double res = 0;
    float gamma = 0;
    SvftLayer *out = NULL;

    /* Library-wide calls. */
    EXPECT(NULL_POINTER, svft_version(NULL));
    EXPECT(OK, svft_version(&str));
    EXPECT(NULL_POINTER, svft_abi_version(NULL));
    EXPECT(MISALIGNED, svft_abi_version((uint32_t *)((char *)&rows[0] + 1)));
    EXPECT(OK, svft_abi_version(&abi));
    EXPECT(INVALID_ARGUMENT, svft_backend_available(99, &flag));
    EXPECT(INVALID_ARGUMENT, svft_backend_available(-1, &flag));
    EXPECT(NULL_POINTER, svft_backend_available(CPU, NULL));
    /* CUDA's availability is the device probe; when it is false the (successful) call leaves
     * the reason as the last error. Either way the statuses below do not depend on it, except
     * a host pointer given to the CUDA backend: INVALID_ARGUMENT with a device, else
     * CUDA_UNAVAILABLE. */
    bool cuda = false;
    char why[256];
    size_t why_len = 0;
    checks++;
    if (svft_backend_available(SVFT_BACKEND_CUDA, &cuda) != SVFT_STATUS_OK ||
        svft_last_error(why, sizeof why, &why_len) != SVFT_STATUS_OK || (cuda ? why_len != 0 : why_len == 0)) {
        failures++;
        printf("svft_backend_available(CUDA): available %d with message \"%s\"\n", (int)cuda, why);
    } else if (getenv("SVFT_VERBOSE")) {
        printf("CUDA available: %d %s\n", (int)cuda, why);
    }
    const SvftStatus cuda_host_ptr = cuda ? SVFT_STATUS_INVALID_ARGUMENT : SVFT_STATUS_CUDA_UNAVAILABLE;
    EXPECT(INVALID_ARGUMENT, svft_status_name(999, &str));
    EXPECT(INVALID_ARGUMENT, svft_status_name(-1, &str));
    EXPECT(NULL_POINTER, svft_status_name(0, NULL));
    /* svft_last_error reports its own bad input but keeps the previous message. */
    svft_status_name(999, &str);
    size_t len = 0, len2 = 0;
    char small[8];
    checks++;
    if (svft_last_error(NULL, 10, NULL) != SVFT_STATUS_NULL_POINTER || svft_last_error(NULL, 0, &len) != 0 ||
        len == 0 || svft_last_error(small, sizeof small, &len2) != 0 || len2 != len || small[7] != 0 ||
        strlen(small) != 7) {
        failures++;
        printf("svft_last_error: NULL buffer, length query or truncation wrong\n");
    }
    EXPECT(PANIC, svft_selftest_panic());

    /* Creation from a weight. */
#define FROM_WEIGHT(backend, wp, dtype, wlen, o, i, rank, pat, init, bp, blen, outp) \
    svft_layer_from_weight(backend, wp, dtype, wlen, o, i, rank, pat, init, true, 1, bp, blen, outp)
    EXPECT(NULL_POINTER, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:1", 1, bias, O, NULL));
    out = (SvftLayer *)(uintptr_t)0x1230;
    EXPECT(NULL_POINTER, FROM_WEIGHT(CPU, NULL, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    checks++;
    if (out != NULL) {
        failures++;
        printf("*out not cleared on failure\n");
    }
    EXPECT_STATUS(cuda_host_ptr, FROM_WEIGHT(SVFT_BACKEND_CUDA, w, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    /* On CUDA, every check that needs no device comes first (same status on every machine). */
    EXPECT(UNSUPPORTED_DTYPE, FROM_WEIGHT(SVFT_BACKEND_CUDA, w, 9, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(NULL_POINTER, FROM_WEIGHT(SVFT_BACKEND_CUDA, NULL, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(MISALIGNED, FROM_WEIGHT(SVFT_BACKEND_CUDA, w_mis, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(MISALIGNED,
           FROM_WEIGHT(SVFT_BACKEND_CUDA, w_mis, SVFT_DTYPE_BF16, O * I, O, I, 0, "banded:1", 1, NULL, 0, &out));
    EXPECT(SHAPE, FROM_WEIGHT(SVFT_BACKEND_CUDA, w, F32, O * I - 1, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(SHAPE, FROM_WEIGHT(SVFT_BACKEND_CUDA, w, F32, O * I, O, I, 0, "banded:1", 1, bias, O - 1, &out));
    EXPECT(PATTERN, FROM_WEIGHT(SVFT_BACKEND_CUDA, w, F32, O * I, O, I, 0, "bogus", 1, bias, O, &out));
    EXPECT(INVALID_ARGUMENT, FROM_WEIGHT(SVFT_BACKEND_CUDA, w, F32, O * I, O, I, 9, "banded:1", 1, bias, O, &out));
    EXPECT(INVALID_ARGUMENT, FROM_WEIGHT(SVFT_BACKEND_CUDA, w, F32, O * I, O, I, 0, "banded:1", 7, bias, O, &out));
    EXPECT(INVALID_ARGUMENT, FROM_WEIGHT(7, w, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(UNSUPPORTED_DTYPE, FROM_WEIGHT(CPU, w, 9, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(UNSUPPORTED_DTYPE, FROM_WEIGHT(CPU, w, -1, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(NULL_POINTER, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, NULL, 1, bias, O, &out));
    EXPECT(PATTERN, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "bogus", 1, bias, O, &out));
    EXPECT(PATTERN, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:x", 1, bias, O, &out));
    EXPECT(PATTERN, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:9", 1, bias, O, &out));
    EXPECT(PATTERN, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "topk:1", 1, bias, O, &out)); /* non-square */
    EXPECT(INVALID_ARGUMENT, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "\xff\xfe", 1, bias, O, &out));
    EXPECT(INVALID_ARGUMENT, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:1", 5, bias, O, &out));
    EXPECT(SHAPE, FROM_WEIGHT(CPU, w, F32, O * I - 1, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(SHAPE, FROM_WEIGHT(CPU, w, F32, 0, 0, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(SHAPE, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:1", 1, bias, O - 1, &out));
    EXPECT(SHAPE, FROM_WEIGHT(CPU, w, F32, 0, SIZE_MAX / 2, 3, 0, "banded:1", 1, NULL, 0, &out));
    EXPECT(INVALID_ARGUMENT, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 9, "banded:1", 1, bias, O, &out));
    EXPECT(MISALIGNED, FROM_WEIGHT(CPU, w_mis, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    EXPECT(MISALIGNED, FROM_WEIGHT(CPU, w_mis, SVFT_DTYPE_F64, 15, 3, 5, 0, "banded:1", 1, NULL, 0, &out));
    EXPECT(NULL_POINTER, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:1", 1, NULL, O, &out));
    /* 2^21 x 2^21 floats (16 TiB): refused before the buffer is read. */
    EXPECT(OUT_OF_MEMORY,
           FROM_WEIGHT(CPU, w, F32, (size_t)1 << 42, (size_t)1 << 21, (size_t)1 << 21, 0, "plain", 0, NULL, 0, &out));
    w[7] = NAN;
    EXPECT(NON_FINITE, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    w[7] = 0.5f;
    bias[2] = INFINITY;
    EXPECT(NON_FINITE, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &out));
    bias[2] = 0.25f;

    /* A good layer for the rest (6 x 5, rank 5, banded:1: nnz = 13). */
    SvftLayer *layer = NULL;
    EXPECT(OK, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 0, "banded:1", 1, bias, O, &layer));
    size_t nnz = 0;
    EXPECT(OK, svft_layer_shape(layer, NULL, NULL, NULL, &nnz));
    checks++;
    if (nnz != 13) {
        failures++;
        printf("nnz %zu, expected 13\n", nnz);
    }
    const size_t R = 5;

    /* Creation from factors. */
    EXPECT(OK, svft_layer_factors(layer, u, O * R, s, R, v, I * R));
#define FROM_FACTORS(backend, dtype, o, i, r, up, ul, sp, sl, vp, vl, pat) \
    svft_layer_from_factors(backend, dtype, o, i, r, up, ul, sp, sl, vp, vl, pat, 0, false, 0, NULL, 0, &out)
    EXPECT_STATUS(cuda_host_ptr, FROM_FACTORS(SVFT_BACKEND_CUDA, F32, O, I, R, u, O * R, s, R, v, I * R, "plain"));
    EXPECT(SHAPE, FROM_FACTORS(SVFT_BACKEND_CUDA, F32, O, I, R, u, O * R, s, R - 1, v, I * R, "plain"));
    EXPECT(MISALIGNED,
           FROM_FACTORS(SVFT_BACKEND_CUDA, F32, O, I, R, u, O * R, (float *)((char *)s + 1), R, v, I * R, "plain"));
    EXPECT(UNSUPPORTED_DTYPE, FROM_FACTORS(SVFT_BACKEND_CUDA, 4, O, I, R, u, O * R, s, R, v, I * R, "plain"));
    EXPECT(NULL_POINTER, FROM_FACTORS(CPU, F32, O, I, R, NULL, O * R, s, R, v, I * R, "plain"));
    EXPECT(SHAPE, FROM_FACTORS(CPU, F32, O, I, R, u, O * R, s, R - 1, v, I * R, "plain"));
    EXPECT(SHAPE, FROM_FACTORS(CPU, F32, O, I, 0, u, 0, s, 0, v, 0, "plain"));
    EXPECT(INVALID_ARGUMENT, FROM_FACTORS(CPU, F32, O, I, O, u, O * O, s, O, v, I * O, "plain"));
    EXPECT(UNSUPPORTED_DTYPE, FROM_FACTORS(CPU, 4, O, I, R, u, O * R, s, R, v, I * R, "plain"));
    EXPECT(MISALIGNED, FROM_FACTORS(CPU, F32, O, I, R, u, O * R, (float *)((char *)s + 1), R, v, I * R, "plain"));
    EXPECT(PATTERN, FROM_FACTORS(CPU, F32, O, I, R, u, O * R, s, R, v, I * R, "random:1:seed=x"));

    /* Creation from factors with an explicit index set. */
#define FROM_INDEXED(pat, rp, cp, k)                                                                               \
    svft_layer_from_factors_indexed(CPU, F32, O, I, R, u, O * R, s, R, v, I * R, pat, rp, cp, k, 0, false, 0, NULL, \
                                    0, &out)
    uint32_t ix_rows[4] = {4, 0, 2, 4}, ix_cols[4] = {1, 3, 2, 1}, got_rows[4], got_cols[4];
    uint32_t diag[5] = {0, 1, 2, 3, 4}, swapped[5] = {1, 0, 2, 3, 4};
    EXPECT(SHAPE, FROM_INDEXED("random:1", ix_rows, ix_cols, 0));
    EXPECT(NULL_POINTER, FROM_INDEXED("random:1", NULL, ix_cols, 4));
    EXPECT(MISALIGNED, FROM_INDEXED("random:1", (uint32_t *)((char *)ix_rows + 1), ix_cols, 4));
    EXPECT(PATTERN, FROM_INDEXED("random:1:seed=x", ix_rows, ix_cols, 4));
    ix_rows[0] = R;
    EXPECT(INVALID_ARGUMENT, FROM_INDEXED("random:1", ix_rows, ix_cols, 4)); /* row out of range */
    ix_rows[0] = 4;
    EXPECT(INVALID_ARGUMENT, FROM_INDEXED("plain", ix_rows, ix_cols, 4));    /* not the plain band */
    EXPECT(INVALID_ARGUMENT, FROM_INDEXED("plain", swapped, diag, 5)); /* the band, wrong order */
    EXPECT(OK, FROM_INDEXED("plain", diag, diag, 5));
    EXPECT(OK, svft_layer_destroy(out));
    EXPECT(OK, FROM_INDEXED("random:1", ix_rows, ix_cols, 4)); /* duplicates allowed: (4, 1) twice */
    EXPECT(OK, svft_layer_indices(out, got_rows, got_cols, 4));
    checks++;
    if (memcmp(ix_rows, got_rows, sizeof ix_rows) != 0 || memcmp(ix_cols, got_cols, sizeof ix_cols) != 0) {
        failures++;
        printf("FAIL line %d: the layer's indices are not the ones given\n", __LINE__);
    }
    EXPECT(OK, svft_layer_destroy(out));

    s[1] = NAN;
    EXPECT(NON_FINITE, FROM_FACTORS(CPU, F32, O, I, R, u, O * R, s, R, v, I * R, "plain"));

    /* Queries. */
    SvftLayer *forged = (SvftLayer *)(uintptr_t)0x7ffff0, *odd = (SvftLayer *)(uintptr_t)0x13;
    EXPECT(NULL_POINTER, svft_layer_shape(NULL, &sz, &sz, &sz, &sz));
    EXPECT(INVALID_HANDLE, svft_layer_shape(forged, &sz, &sz, &sz, &sz));
    EXPECT(INVALID_HANDLE, svft_layer_shape(odd, &sz, &sz, &sz, &sz));
    EXPECT(MISALIGNED, svft_layer_shape(layer, (size_t *)((char *)big + 1), NULL, NULL, NULL));
    EXPECT(NULL_POINTER, svft_layer_info(NULL, NULL, &flag, &sz));
    EXPECT(INVALID_HANDLE, svft_layer_info(forged, NULL, &flag, &sz));
    EXPECT(MISALIGNED, svft_layer_info(layer, (int32_t *)((char *)big + 1), NULL, NULL));
    EXPECT(SHAPE, svft_layer_memory(layer, 0, &sz, &sz, &sz));
    EXPECT(INVALID_HANDLE, svft_layer_memory(forged, 3, &sz, &sz, &sz));
    EXPECT(NULL_POINTER, svft_layer_svd_residual(layer, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_svd_residual(forged, &res));
    EXPECT(OK, svft_layer_svd_residual(layer, &res));
    EXPECT(INVALID_ARGUMENT, svft_layer_set_plan(layer, 4));
    EXPECT(INVALID_ARGUMENT, svft_layer_set_plan(layer, -1));
    EXPECT(INVALID_HANDLE, svft_layer_set_plan(forged, 0));

    /* Measured plan choice. */
    size_t toks[3] = {1, 9, 0};
    int32_t chosen = -1;
    EXPECT(NULL_POINTER, svft_layer_calibrate(layer, NULL, 2, 0.0, 0));
    EXPECT(MISALIGNED, svft_layer_calibrate(layer, (const size_t *)((char *)toks + 1), 2, 0.0, 0));
    EXPECT(INVALID_ARGUMENT, svft_layer_calibrate(layer, toks, 0, 0.0, 0));
    EXPECT(SHAPE, svft_layer_calibrate(layer, toks, 3, 0.0, 0));
    EXPECT(INVALID_ARGUMENT, svft_layer_calibrate(layer, toks, 2, -1.0, 0));
    EXPECT(INVALID_ARGUMENT, svft_layer_calibrate(layer, toks, 2, 0.0 / 0.0, 0));
    EXPECT(INVALID_HANDLE, svft_layer_calibrate(forged, toks, 2, 0.0, 0));
    EXPECT(OK, svft_layer_calibrate(layer, toks, 2, 0.0, 0));
    EXPECT(NULL_POINTER, svft_layer_plan_for(layer, 9, NULL));
    EXPECT(MISALIGNED, svft_layer_plan_for(layer, 9, (int32_t *)((char *)big + 1)));
    EXPECT(SHAPE, svft_layer_plan_for(layer, 0, &chosen));
    EXPECT(INVALID_HANDLE, svft_layer_plan_for(forged, 9, &chosen));
    EXPECT(OK, svft_layer_plan_for(layer, 9, &chosen));
    if (chosen != SVFT_PLAN_FACTORED && chosen != SVFT_PLAN_MERGED) {
        printf("FAIL line %d: plan_for gave %d after calibration\n", __LINE__, chosen);
        failures++;
    }
    EXPECT(OK, svft_layer_set_plan(layer, SVFT_PLAN_MERGED));
    EXPECT(OK, svft_layer_plan_for(layer, 9, &chosen));
    if (chosen != SVFT_PLAN_MERGED) {
        printf("FAIL line %d: a fixed plan must override the calibration, got %d\n", __LINE__, chosen);
        failures++;
    }
    EXPECT(OK, svft_layer_set_plan(layer, SVFT_PLAN_AUTO));

    /* Forward. */
    void *stream = (void *)(uintptr_t)0x1000;
    EXPECT(NULL_POINTER, svft_layer_forward(NULL, F32, x, N * I, N, y, N * O, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_forward(forged, F32, x, N * I, N, y, N * O, NULL));
    EXPECT(UNSUPPORTED_DTYPE, svft_layer_forward(layer, SVFT_DTYPE_BF16, x, N * I, N, y, N * O, NULL));
    EXPECT(UNSUPPORTED_DTYPE, svft_layer_forward(layer, 42, x, N * I, N, y, N * O, NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_forward(layer, F32, x, N * I, N, y, N * O, stream));
    EXPECT(NULL_POINTER, svft_layer_forward(layer, F32, NULL, N * I, N, y, N * O, NULL));
    EXPECT(NULL_POINTER, svft_layer_forward(layer, F32, x, N * I, N, NULL, N * O, NULL));
    EXPECT(SHAPE, svft_layer_forward(layer, F32, x, N * I - 1, N, y, N * O, NULL));
    EXPECT(SHAPE, svft_layer_forward(layer, F32, x, N * I, N, y, N * O + 1, NULL));
    EXPECT(SHAPE, svft_layer_forward(layer, F32, x, 0, 0, y, 0, NULL));
    EXPECT(SHAPE, svft_layer_forward(layer, F32, x, 0, SIZE_MAX / 2, y, 0, NULL));
    EXPECT(MISALIGNED, svft_layer_forward(layer, F32, x, N * I, N, y_mis, N * O, NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_forward(layer, F32, big, N * I, N, big + 4, N * O, NULL));
    /* 2^40 tokens: the workspace alone is many TiB; refused before touching the buffers. */
    size_t huge = (size_t)1 << 40;
    EXPECT(OUT_OF_MEMORY, svft_layer_forward(layer, F32, big, huge * I, huge, (void *)((uintptr_t)big + ((uintptr_t)1 << 46)),
                                             huge * O, NULL));

    /* Backward. */
    EXPECT(NO_FORWARD, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz, &gamma, NULL));
    EXPECT(OK, svft_layer_forward(layer, F32, x, N * I, N, y, N * O, NULL));
    EXPECT(NULL_POINTER, svft_layer_backward(NULL, F32, gy, N * O, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_backward(forged, F32, gy, N * O, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(UNSUPPORTED_DTYPE, svft_layer_backward(layer, SVFT_DTYPE_F16, gy, N * O, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz, NULL, stream));
    EXPECT(NULL_POINTER, svft_layer_backward(layer, F32, NULL, N * O, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(NULL_POINTER, svft_layer_backward(layer, F32, gy, N * O, N, NULL, N * I, dm, nnz, NULL, NULL));
    EXPECT(NULL_POINTER, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, NULL, nnz, NULL, NULL));
    EXPECT(SHAPE, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz + 1, NULL, NULL));
    EXPECT(SHAPE, svft_layer_backward(layer, F32, gy, N * O - 1, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(SHAPE, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I + 1, dm, nnz, NULL, NULL));
    EXPECT(MISALIGNED,
           svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz, (float *)((char *)&gamma + 1), NULL));
    EXPECT(MISALIGNED, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, (float *)((char *)dm + 3), nnz,
                                           NULL, NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_backward(layer, F32, big, N * O, N, big + N * O, N * I, big + 1, nnz, NULL,
                                                 NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz, dm + 2, NULL));
    EXPECT(NO_FORWARD, svft_layer_backward(layer, F32, gy, (N - 1) * O, N - 1, dx, (N - 1) * I, dm, nnz, NULL, NULL));
    EXPECT(OK, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz, &gamma, NULL));

    /* The stateless pair: T (N x R) in the caller's buffer, checked like every other buffer. */
    static float t[N * 5]; /* N x R, R = 5 */
    EXPECT(NULL_POINTER, svft_layer_forward_saving(layer, F32, x, N * I, N, y, N * O, NULL, N * R, NULL));
    EXPECT(SHAPE, svft_layer_forward_saving(layer, F32, x, N * I, N, y, N * O, t, N * R - 1, NULL));
    EXPECT(MISALIGNED, svft_layer_forward_saving(layer, F32, x, N * I, N, y, N * O, (float *)((char *)t + 2), N * R,
                                                 NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_forward_saving(layer, F32, x, N * I, N, big, N * O, big + 1, N * R, NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_forward_saving(layer, F32, x, N * I, N, y, N * O, t, N * R, stream));
    EXPECT(OK, svft_layer_forward_saving(layer, F32, x, N * I, N, y, N * O, t, N * R, NULL));
    EXPECT(NO_FORWARD, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(NULL_POINTER, svft_layer_backward_saved(layer, F32, NULL, N * R, gy, N * O, N, dx, N * I, dm, nnz, NULL,
                                                   NULL));
    EXPECT(SHAPE, svft_layer_backward_saved(layer, F32, t, N * R + 1, gy, N * O, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(SHAPE, svft_layer_backward_saved(layer, F32, t, N * R, gy, N * O, N, dx, N * I, dm, nnz - 1, NULL, NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_backward_saved(layer, F32, t, N * R, gy, N * O, N, t, N * I, dm, nnz, NULL,
                                                       NULL));
    EXPECT(INVALID_HANDLE, svft_layer_backward_saved(forged, F32, t, N * R, gy, N * O, N, dx, N * I, dm, nnz, NULL,
                                                     NULL));
    EXPECT(OK, svft_layer_backward_saved(layer, F32, t, N * R, gy, N * O, N, dx, N * I, dm, nnz, &gamma, NULL));

    /* Coefficients and gate. */
    EXPECT(NULL_POINTER, svft_layer_get_coefficients(layer, NULL, nnz));
    EXPECT(SHAPE, svft_layer_get_coefficients(layer, m, nnz - 1));
    EXPECT(MISALIGNED, svft_layer_get_coefficients(layer, (float *)((char *)m + 2), nnz));
    EXPECT(INVALID_HANDLE, svft_layer_get_coefficients(forged, m, nnz));
    EXPECT(OK, svft_layer_get_coefficients(layer, m, nnz));
    EXPECT(NULL_POINTER, svft_layer_set_coefficients(layer, NULL, nnz));
    EXPECT(SHAPE, svft_layer_set_coefficients(layer, m, 64));
    EXPECT(INVALID_HANDLE, svft_layer_set_coefficients(forged, m, nnz));
    float keep = m[3];
    m[3] = NAN;
    EXPECT(NON_FINITE, svft_layer_set_coefficients(layer, m, nnz));
    m[3] = keep;
    EXPECT(OK, svft_layer_set_coefficients(layer, m, nnz));
    /* New coefficients forget the saved forward pass. */
    EXPECT(NO_FORWARD, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(NULL_POINTER, svft_layer_get_gamma(layer, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_get_gamma(forged, &gamma));
    EXPECT(NON_FINITE, svft_layer_set_gamma(layer, NAN));
    EXPECT(NON_FINITE, svft_layer_set_gamma(layer, -INFINITY));
    EXPECT(INVALID_HANDLE, svft_layer_set_gamma(forged, 0.0f));
    EXPECT(OK, svft_layer_set_gamma(layer, 0.5f));
    /* Both parameters in one call (host memory on the CPU backend): checked before either is
       written, so a bad gamma keeps the old M and gamma. */
    float bad_gamma = NAN, new_gamma = 0.25f, seen_gamma = 0.0f;
    int stream_token = 0;
    EXPECT(NULL_POINTER, svft_layer_load_parameters(layer, NULL, nnz, &new_gamma, NULL));
    EXPECT(SHAPE, svft_layer_load_parameters(layer, m, nnz - 1, &new_gamma, NULL));
    EXPECT(MISALIGNED, svft_layer_load_parameters(layer, m, nnz, (float *)((char *)&new_gamma + 1), NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_load_parameters(layer, m, nnz, &new_gamma, &stream_token));
    EXPECT(INVALID_HANDLE, svft_layer_load_parameters(forged, m, nnz, &new_gamma, NULL));
    const float m0 = m[0];
    m[0] = m0 + 1.0f;
    EXPECT(NON_FINITE, svft_layer_load_parameters(layer, m, nnz, &bad_gamma, NULL));
    EXPECT(OK, svft_layer_get_gamma(layer, &seen_gamma));
    float *m_seen = malloc(nnz * sizeof *m_seen);
    EXPECT(OK, svft_layer_get_coefficients(layer, m_seen, nnz));
    if (seen_gamma != 0.5f || m_seen[0] != m0) {
        fprintf(stderr, "line %d: a rejected load_parameters changed the layer\n", __LINE__);
        failures++;
    }
    EXPECT(OK, svft_layer_load_parameters(layer, m, nnz, &new_gamma, NULL));
    EXPECT(OK, svft_layer_get_gamma(layer, &seen_gamma));
    EXPECT(OK, svft_layer_get_coefficients(layer, m_seen, nnz));
    if (seen_gamma != 0.25f || m_seen[0] != m[0]) {
        fprintf(stderr, "line %d: load_parameters did not take\n", __LINE__);
        failures++;
    }
    EXPECT(OK, svft_layer_load_parameters(layer, m, nnz, NULL, NULL)); /* gamma kept */
    EXPECT(OK, svft_layer_get_gamma(layer, &seen_gamma));
    if (seen_gamma != 0.25f) {
        fprintf(stderr, "line %d: load_parameters without gamma changed gamma\n", __LINE__);
        failures++;
    }
    free(m_seen);

    /* Merge, factors, indices. */
    EXPECT(NULL_POINTER, svft_layer_merge(layer, F32, NULL, O * I, NULL));
    EXPECT(SHAPE, svft_layer_merge(layer, F32, big, O * I + 1, NULL));
    EXPECT(UNSUPPORTED_DTYPE, svft_layer_merge(layer, SVFT_DTYPE_F64, big, O * I, NULL));
    EXPECT(INVALID_ARGUMENT, svft_layer_merge(layer, F32, big, O * I, stream));
    EXPECT(MISALIGNED, svft_layer_merge(layer, F32, w_mis, O * I, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_merge(forged, F32, big, O * I, NULL));
    EXPECT(SHAPE, svft_layer_factors(layer, u, O * R - 1, NULL, 0, NULL, 0));
    EXPECT(MISALIGNED, svft_layer_factors(layer, NULL, 0, (float *)((char *)s + 1), R, NULL, 0));
    EXPECT(INVALID_HANDLE, svft_layer_factors(forged, u, O * R, s, R, v, I * R));
    EXPECT(SHAPE, svft_layer_indices(layer, rows, cols, nnz + 1));
    EXPECT(MISALIGNED, svft_layer_indices(layer, rows, (uint32_t *)((char *)cols + 2), nnz));
    EXPECT(INVALID_HANDLE, svft_layer_indices(forged, rows, cols, nnz));

    /* Destroy, then every call on the dead handle. */
    EXPECT(NULL_POINTER, svft_layer_destroy(NULL));
    EXPECT(INVALID_HANDLE, svft_layer_destroy(forged));
    EXPECT(INVALID_HANDLE, svft_layer_destroy(odd));
    EXPECT(OK, svft_layer_destroy(layer));
    EXPECT(INVALID_HANDLE, svft_layer_destroy(layer));
    EXPECT(INVALID_HANDLE, svft_layer_shape(layer, &sz, NULL, NULL, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_info(layer, NULL, &flag, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_memory(layer, N, &sz, NULL, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_svd_residual(layer, &res));
    EXPECT(INVALID_HANDLE, svft_layer_set_plan(layer, 0));
    EXPECT(INVALID_HANDLE, svft_layer_forward(layer, F32, x, N * I, N, y, N * O, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_backward(layer, F32, gy, N * O, N, dx, N * I, dm, nnz, NULL, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_get_coefficients(layer, m, nnz));
    EXPECT(INVALID_HANDLE, svft_layer_set_coefficients(layer, m, nnz));
    EXPECT(INVALID_HANDLE, svft_layer_get_gamma(layer, &gamma));
    EXPECT(INVALID_HANDLE, svft_layer_set_gamma(layer, 0.0f));
    EXPECT(INVALID_HANDLE, svft_layer_merge(layer, F32, big, O * I, NULL));
    EXPECT(INVALID_HANDLE, svft_layer_factors(layer, u, O * R, NULL, 0, NULL, 0));
    EXPECT(INVALID_HANDLE, svft_layer_indices(layer, rows, cols, nnz));

    /* Still healthy after all that (and after the caught panic). */
    SvftLayer *again = NULL;
    EXPECT(OK, FROM_WEIGHT(CPU, w, F32, O * I, O, I, 2, "plain", 0, NULL, 0, &again));
    EXPECT(OK, svft_layer_forward(again, F32, x, N * I, N, y, N * O, NULL));
    EXPECT(OK, svft_layer_destroy(again));

    printf("checks %d failures %d\n", checks, failures);
    return failures != 0;
}
