/* The adapter bank through the C ABI (run by tests/ffi_bank.rs): one weight decomposed into a
 * layer, three more adapters over the same factors (other patterns, coefficients and gates),
 * a bank serving all of them, and a mixed batch whose every segment must equal that
 * segment through its own layer (or, for SVFT_BANK_BASE, a zero-coefficient plain layer: the
 * base weight). Then bad tables and ids must give their status codes. Prints "bank ok". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svft.h"
#include "check.h"

#define D_OUT 12
#define D_IN 9
#define N 23
#define LAYERS 4

static float frand(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static void expect(SvftStatus got, SvftStatus want, const char *what) {
    if (got != want) {
        char msg[512];
        svft_last_error(msg, sizeof msg, NULL);
        fprintf(stderr, "%s: got status %d, want %d: %s\n", what, (int)got, (int)want, msg);
        exit(1);
    }
}

int main(void) {
    unsigned st = 7;
    float w[D_OUT * D_IN], bias[D_OUT], x[N * D_IN], y[N * D_OUT], ys[N * D_OUT];
    for (size_t i = 0; i < D_OUT * D_IN; i++) w[i] = frand(&st);
    for (size_t i = 0; i < D_OUT; i++) bias[i] = frand(&st);
    for (size_t i = 0; i < N * D_IN; i++) x[i] = frand(&st);

    /* The first layer from the weight; the others from its factors (the same base). */
    SvftLayer *layers[LAYERS + 1];
    CHECK(svft_layer_from_weight(SVFT_BACKEND_CPU, w, SVFT_DTYPE_F32, D_OUT * D_IN, D_OUT, D_IN, 0, "banded:1",
                                 SVFT_INIT_OFFICIAL, true, 1, bias, D_OUT, &layers[0]));
    size_t r;
    CHECK(svft_layer_shape(layers[0], NULL, NULL, &r, NULL));
    float *u = malloc(D_OUT * r * sizeof(float)), *s = malloc(r * sizeof(float)), *v = malloc(D_IN * r * sizeof(float));
    CHECK(svft_layer_factors(layers[0], u, D_OUT * r, s, r, v, D_IN * r));
    const char *specs[LAYERS + 1] = {"banded:1", "plain", "random:2:seed=3", "random:1:seed=8", "plain"};
    for (int k = 1; k <= LAYERS; k++) {
        CHECK(svft_layer_from_factors(SVFT_BACKEND_CPU, SVFT_DTYPE_F32, D_OUT, D_IN, r, u, D_OUT * r, s, r, v,
                                      D_IN * r, specs[k], k == LAYERS ? SVFT_INIT_ZERO : SVFT_INIT_OFFICIAL,
                                      k % 2 == 0, (uint64_t)k, bias, D_OUT, &layers[k]));
        if (k < LAYERS) CHECK(svft_layer_set_gamma(layers[k], 0.3f * (float)k));
    }

    SvftBank *bank;
    CHECK(svft_bank_from_layer(layers[0], &bank));
    uint32_t ids[LAYERS] = {100, 7, 42, 3};
    for (int k = 0; k < LAYERS - 1; k++) CHECK(svft_bank_add_layer(bank, ids[k], layers[k]));
    /* The fourth from its raw parts. */
    size_t nnz;
    CHECK(svft_layer_shape(layers[3], NULL, NULL, NULL, &nnz));
    uint32_t *rows = malloc(nnz * sizeof(uint32_t)), *cols = malloc(nnz * sizeof(uint32_t));
    float *m = malloc(nnz * sizeof(float)), gamma;
    CHECK(svft_layer_indices(layers[3], rows, cols, nnz));
    CHECK(svft_layer_get_coefficients(layers[3], m, nnz));
    CHECK(svft_layer_get_gamma(layers[3], &gamma));
    bool gate;
    CHECK(svft_layer_info(layers[3], NULL, &gate, NULL));
    CHECK(svft_bank_add(bank, ids[3], specs[3], rows, cols, nnz, m, gamma, gate));
    size_t count;
    CHECK(svft_bank_info(bank, NULL, NULL, NULL, &count));
    if (count != LAYERS) {
        fprintf(stderr, "%zu adapters resident, want %d\n", count, LAYERS);
        return 1;
    }

    /* A mixed table: odd lengths, an empty segment, the base weight, an adapter twice. */
    SvftSegment table[] = {
        {0, 3, 42}, {3, 4, SVFT_BANK_BASE}, {4, 4, 7}, {4, 9, 100}, {9, 10, 3}, {10, 17, 7}, {17, 20, SVFT_BANK_BASE},
        {20, 23, 42},
    };
    size_t segs = sizeof table / sizeof table[0];
    CHECK(svft_bank_forward(bank, SVFT_DTYPE_F32, x, N * D_IN, N, table, segs, y, N * D_OUT, NULL));
    double worst = 0;
    for (size_t k = 0; k < segs; k++) {
        size_t a = table[k].start, b = table[k].end;
        if (a == b) continue;
        SvftLayer *l = layers[LAYERS]; /* the base weight: plain, M = 0 */
        for (int j = 0; j < LAYERS; j++)
            if (table[k].adapter == (int64_t)ids[j]) l = layers[j];
        CHECK(svft_layer_forward(l, SVFT_DTYPE_F32, x + a * D_IN, (b - a) * D_IN, b - a, ys, (b - a) * D_OUT, NULL));
        for (size_t i = 0; i < (b - a) * D_OUT; i++) {
            double e = fabs((double)ys[i] - (double)y[a * D_OUT + i]) / (1.0 + fabs((double)ys[i]));
            if (!(e <= worst)) worst = e;
        }
    }
    if (!(worst < 1e-5)) {
        fprintf(stderr, "mixed batch differs from the single layers: %g\n", worst);
        return 1;
    }

    /* Bad tables and ids. */
    SvftSegment gap[] = {{0, 10, 7}, {11, 23, 7}};
    expect(svft_bank_forward(bank, SVFT_DTYPE_F32, x, N * D_IN, N, gap, 2, y, N * D_OUT, NULL),
           SVFT_STATUS_INVALID_ARGUMENT, "gap");
    SvftSegment unknown[] = {{0, 23, 8}};
    expect(svft_bank_forward(bank, SVFT_DTYPE_F32, x, N * D_IN, N, unknown, 1, y, N * D_OUT, NULL),
           SVFT_STATUS_INVALID_ARGUMENT, "unknown id");
    expect(svft_bank_forward(bank, SVFT_DTYPE_F32, x, N * D_IN, N, NULL, 1, y, N * D_OUT, NULL),
           SVFT_STATUS_NULL_POINTER, "NULL table");
    expect(svft_bank_forward(bank, SVFT_DTYPE_F32, x, N * D_IN - 1, N, table, segs, y, N * D_OUT, NULL),
           SVFT_STATUS_SHAPE, "short x");
    expect(svft_bank_add_layer(bank, 7, layers[1]), SVFT_STATUS_INVALID_ARGUMENT, "duplicate id");
    expect(svft_bank_remove(bank, 8), SVFT_STATUS_INVALID_ARGUMENT, "remove missing");
    CHECK(svft_bank_remove(bank, 7));
    expect(svft_bank_forward(bank, SVFT_DTYPE_F32, x, N * D_IN, N, table, segs, y, N * D_OUT, NULL),
           SVFT_STATUS_INVALID_ARGUMENT, "removed id");
    CHECK(svft_bank_replace_layer(bank, 42, layers[1]));

    CHECK(svft_bank_destroy(bank));
    expect(svft_bank_destroy(bank), SVFT_STATUS_INVALID_HANDLE, "destroy twice");
    for (int k = 0; k <= LAYERS; k++) CHECK(svft_layer_destroy(layers[k]));
    free(u);
    free(s);
    free(v);
    free(rows);
    free(cols);
    free(m);
    printf("bank ok (worst %g)\n", worst);
    return 0;
}
