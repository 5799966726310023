/* A full create-forward-backward-merge cycle through the C ABI (run by tests/ffi_c.rs).
 *
 * usage: cycle IN OUT
 * IN (written by the Rust test, little-endian): u64 d_out, d_in, n, rank, init, gate, seed, plan,
 *   has_bias, pattern_len; the pattern spec bytes; f32 weight[d_out*d_in], bias[d_out] (when
 *   has_bias), x[n*d_in], gy[n*d_out], then m2[nnz] and gamma2 (the second step's parameters).
 * OUT: records (u64 count, f32 data[count]) in this order:
 *   step 1 (initial parameters): y, dx, dm, dgamma, w, m, gamma
 *   step 2 (after set_coefficients(m2), set_gamma(gamma2)): y, dx, dm, dgamma, w
 *   a layer rebuilt from the first layer's factors with m2/gamma2: y
 *   the factors u, s, v and the index set rows, cols (u32 data in the same record format)
 * stdout: "shape d_out d_in rank nnz trainable workspace saved persistent". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svft.h"
#include "check.h"


static FILE *in_file;

static void read_exact(void *dst, size_t bytes) {
    if (fread(dst, 1, bytes, in_file) != bytes) {
        fprintf(stderr, "short input file\n");
        exit(1);
    }
}

static uint64_t read_u64(void) {
    uint64_t v;
    read_exact(&v, sizeof v);
    return v;
}

static float *read_f32(size_t count) {
    float *p = malloc((count ? count : 1) * sizeof(float));
    if (!p) exit(1);
    read_exact(p, count * sizeof(float));
    return p;
}

static float *alloc_f32(size_t count) {
    float *p = calloc(count ? count : 1, sizeof(float));
    if (!p) exit(1);
    return p;
}

static void put(FILE *out, const float *data, size_t count) {
    uint64_t c = count;
    fwrite(&c, sizeof c, 1, out);
    fwrite(data, sizeof(float), count, out);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: cycle IN OUT\n");
        return 2;
    }
    in_file = fopen(argv[1], "rb");
    FILE *out = fopen(argv[2], "wb");
    if (!in_file || !out) {
        perror("open");
        return 1;
    }
    size_t d_out = read_u64(), d_in = read_u64(), n = read_u64(), rank = read_u64();
    int32_t init = (int32_t)read_u64();
    bool gate = read_u64() != 0;
    uint64_t seed = read_u64();
    int32_t plan = (int32_t)read_u64();
    bool has_bias = read_u64() != 0;
    size_t pattern_len = read_u64();
    char *pattern = calloc(pattern_len + 1, 1);
    read_exact(pattern, pattern_len);
    float *w0 = read_f32(d_out * d_in);
    float *bias = has_bias ? read_f32(d_out) : NULL;
    float *x = read_f32(n * d_in), *gy = read_f32(n * d_out);

    const char *version;
    uint32_t abi;
    CHECK(svft_version(&version));
    CHECK(svft_abi_version(&abi));
    if (abi != SVFT_ABI_VERSION) {
        fprintf(stderr, "ABI %u, header %u\n", abi, (unsigned)SVFT_ABI_VERSION);
        return 1;
    }
    fprintf(stderr, "svft %s, ABI %u\n", version, abi);

    SvftLayer *layer = NULL;
    CHECK(svft_layer_from_weight(SVFT_BACKEND_CPU, w0, SVFT_DTYPE_F32, d_out * d_in, d_out, d_in, rank,
                                 pattern, init, gate, seed, bias, has_bias ? d_out : 0, &layer));
    CHECK(svft_layer_set_plan(layer, plan));
    size_t o, i, r, nnz, trainable, ws, saved, persistent;
    int32_t backend;
    bool gate_on;
    CHECK(svft_layer_shape(layer, &o, &i, &r, &nnz));
    CHECK(svft_layer_info(layer, &backend, &gate_on, &trainable));
    CHECK(svft_layer_memory(layer, n, &ws, &saved, &persistent));
    if (backend != SVFT_BACKEND_CPU || gate_on != gate) return 1;
    printf("shape %zu %zu %zu %zu %zu %zu %zu %zu\n", o, i, r, nnz, trainable, ws, saved, persistent);
    float *m2 = read_f32(nnz);
    float gamma2;
    read_exact(&gamma2, sizeof gamma2);

    float *y = alloc_f32(n * o), *dx = alloc_f32(n * i), *dm = alloc_f32(nnz), *w = alloc_f32(o * i);
    float *m = alloc_f32(nnz), dgamma = -1.0f, gamma = -1.0f;
    for (int step = 1; step <= 2; step++) {
        if (step == 2) {
            CHECK(svft_layer_set_coefficients(layer, m2, nnz));
            CHECK(svft_layer_set_gamma(layer, gamma2));
        }
        CHECK(svft_layer_forward(layer, SVFT_DTYPE_F32, x, n * i, n, y, n * o, NULL));
        CHECK(svft_layer_backward(layer, SVFT_DTYPE_F32, gy, n * o, n, dx, n * i, dm, nnz, &dgamma, NULL));
        CHECK(svft_layer_merge(layer, SVFT_DTYPE_F32, w, o * i, NULL));
        put(out, y, n * o);
        put(out, dx, n * i);
        put(out, dm, nnz);
        put(out, &dgamma, 1);
        put(out, w, o * i);
        if (step == 1) {
            CHECK(svft_layer_get_coefficients(layer, m, nnz));
            CHECK(svft_layer_get_gamma(layer, &gamma));
            put(out, m, nnz);
            put(out, &gamma, 1);
        }
    }

    /* Save the factors, rebuild from them, restore the parameters: same outputs. */
    float *u = alloc_f32(o * r), *s = alloc_f32(r), *v = alloc_f32(i * r);
    uint32_t *rows = malloc(nnz * sizeof *rows), *cols = malloc(nnz * sizeof *cols);
    CHECK(svft_layer_factors(layer, u, o * r, s, r, v, i * r));
    CHECK(svft_layer_indices(layer, rows, cols, nnz));
    SvftLayer *copy = NULL;
    CHECK(svft_layer_from_factors(SVFT_BACKEND_CPU, SVFT_DTYPE_F32, o, i, r, u, o * r, s, r, v, i * r, pattern,
                                  SVFT_INIT_ZERO, gate, 0, bias, has_bias ? o : 0, &copy));
    uint32_t *rows2 = malloc(nnz * sizeof *rows2), *cols2 = malloc(nnz * sizeof *cols2);
    CHECK(svft_layer_indices(copy, rows2, cols2, nnz));
    if (memcmp(rows, rows2, nnz * sizeof *rows) || memcmp(cols, cols2, nnz * sizeof *cols)) {
        fprintf(stderr, "pattern rebuilt from factors differs\n");
        return 1;
    }
    CHECK(svft_layer_set_plan(copy, plan));
    CHECK(svft_layer_load_parameters(copy, m2, nnz, &gamma2, NULL)); /* both at once */
    CHECK(svft_layer_forward(copy, SVFT_DTYPE_F32, x, n * i, n, y, n * o, NULL));
    put(out, y, n * o);

    put(out, u, o * r);
    put(out, s, r);
    put(out, v, i * r);
    put(out, (const float *)rows, nnz);
    put(out, (const float *)cols, nnz);

    CHECK(svft_layer_destroy(copy));
    CHECK(svft_layer_destroy(layer));
    if (svft_layer_destroy(layer) != SVFT_STATUS_INVALID_HANDLE) {
        fprintf(stderr, "double destroy not detected\n");
        return 1;
    }
    fclose(out);
    fclose(in_file);
    free(pattern), free(w0), free(bias), free(x), free(gy), free(m2), free(y), free(dx), free(dm), free(w);
    free(m), free(u), free(s), free(v), free(rows), free(cols), free(rows2), free(cols2);
    return 0;
}
