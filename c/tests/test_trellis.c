/* Standalone check of lut_trellis_gemm on every ISA this CPU runs, 1 and 2 threads:
 * the integer block sums against a bit-by-bit decode written here (the spec is
 * lutkernels/trellis.py), and y identical on every path. Random bytes are valid
 * streams: every bitstream is a trellis path. Built by c/tests/run.sh under
 * ASan/UBSan (native) and for qemu-aarch64. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lut.h"

static uint32_t rng_state = 12345;
static uint32_t rnd(void) {
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}

static int32_t value(uint32_t u) {
    uint32_t x = u * 2004492963u + 1608935200u;
    return (int32_t)((x & 255) + (x >> 8 & 255) + (x >> 16 & 255) + (x >> 24)) - 510;
}

/* Window of row i of column j, bit by bit. */
static uint32_t window(const uint8_t *streams, int32_t stride, int32_t j, int32_t i, int32_t k) {
    uint32_t u = 0;
    for (int32_t b = 0; b < k + 8; b++) {
        int32_t t = k * i + b;
        u |= (uint32_t)(streams[(size_t)j * stride + t / 8] >> (t % 8) & 1) << b;
    }
    return u;
}

static int check(int32_t M, int32_t K, int32_t k, int32_t n) {
    int32_t Mt = (M + 15) / 16, stride = 2 * k * Mt + 1, nb = K / 32, rows = Mt * 16;
    size_t nbytes = (size_t)K * stride + 16;
    uint8_t *streams = calloc(nbytes, 1);
    float *scales = calloc((size_t)rows, sizeof(float)), *x = malloc(sizeof(float) * n * K);
    float *y0 = malloc(sizeof(float) * n * M), *y = malloc(sizeof(float) * n * M);
    int32_t *acc = malloc(sizeof(int32_t) * n * rows * nb), *ref = malloc(sizeof(int32_t) * n * rows * nb);
    int8_t *q = malloc((size_t)n * K);
    for (size_t b = 0; b + 16 < nbytes; b++)
        streams[b] = (uint8_t)rnd();
    for (int32_t r = 0; r < M; r++)
        scales[r] = (float)(rnd() % 1000) * 1e-5f;
    for (int32_t i = 0; i < n * K; i++)
        x[i] = ((float)(rnd() % 20001) - 10000.0f) * 1e-3f;
    /* the activations the kernels use: int8 per block of 32, scale max|x| / 127, half to even */
    for (int32_t u = 0; u < n * nb; u++) {
        float mx = 0.0f;
        for (int32_t j = 0; j < 32; j++)
            mx = x[u * 32 + j] < 0 ? (-x[u * 32 + j] > mx ? -x[u * 32 + j] : mx) : (x[u * 32 + j] > mx ? x[u * 32 + j] : mx);
        float inv = mx > 0 ? 127.0f / mx : 0.0f;
        for (int32_t j = 0; j < 32; j++)
            q[u * 32 + j] = (int8_t)((x[u * 32 + j] * inv + 12582912.0f) - 12582912.0f);
    }
    for (int32_t t = 0; t < n; t++)
        for (int32_t i = 0; i < rows; i++)
            for (int32_t b = 0; b < nb; b++) {
                int32_t s = 0;
                for (int32_t j = 32 * b; j < 32 * b + 32; j++)
                    s += q[t * K + j] * value(window(streams, stride, j, i, k));
                ref[((size_t)t * rows + i) * nb + b] = s;
            }
    lut_trellis w = {.M = M, .K = K, .k = k, .streams = streams, .scales = scales};
    int failed = 0, first = 1;
    for (int32_t isa = 0; isa < LUT_ISA_COUNT; isa++) {
        if (!(lut_isa_supported() >> isa & 1))
            continue;
        for (int32_t threads = 1; threads <= 2; threads++) {
            if (lut_set_isa(isa) != LUT_OK || lut_set_threads(threads) != LUT_OK)
                return 1;
            int rc = lut_trellis_gemm(&w, x, n, first ? y0 : y, acc);
            int bad = rc != LUT_OK || memcmp(acc, ref, sizeof(int32_t) * n * rows * nb) != 0 ||
                      (!first && memcmp(y, y0, sizeof(float) * n * M) != 0);
            if (bad)
                printf("FAIL M=%d K=%d k=%d n=%d isa=%s threads=%d\n", M, K, k, n, lut_isa_name(isa), threads);
            failed += bad;
            first = 0;
        }
    }
    free(streams), free(scales), free(x), free(y0), free(y), free(acc), free(ref), free(q);
    return failed;
}

int main(void) {
    static const int32_t shapes[][2] = {{17, 32}, {40, 96}, {64, 256}};
    int failed = 0, cases = 0;
    for (int32_t k = 1; k <= 6; k++)
        for (int32_t s = 0; s < 3; s++)
            for (int32_t n = 1; n <= 3; n += 2, cases++)
                failed += check(shapes[s][0], shapes[s][1], k, n);
    lut_trellis bad = {.M = 16, .K = 32, .k = 7};
    float one[32] = {0}, out[16];
    failed += lut_trellis_gemm(&bad, one, 1, out, NULL) != LUT_EINVAL;
    printf("trellis: %d cases, %d failed\n", cases, failed);
    return failed != 0;
}
