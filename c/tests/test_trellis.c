/* Standalone check of lut_trellis_gemm on every ISA this CPU runs, 1 to 4 threads:
 * the integer block sums against a bit-by-bit decode written here (the spec is
 * lutkernels/trellis.py), y against the spec's float32 combination bit for bit,
 * and y identical on every path. Random bytes are valid streams: every bitstream
 * is a trellis path. Built by c/tests/run.sh under ASan/UBSan (native),
 * valgrind and for qemu-aarch64.
 *
 *     test_trellis [RANDOM [SEED]]
 *
 * runs the fixed shapes, then RANDOM seeded random ones (default 0). The last
 * line is "trellis: <cases> cases, <passed> passed, <failed> failed" over paths. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lut.h"
#define HARNESS "test_trellis"
#include "harness.h"

#define MAX_THREADS 4

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

/* One shape on every path; adds to *passed and returns the number of failed paths. */
static int check(int32_t M, int32_t K, int32_t k, int32_t n, int *passed) {
    int32_t Mt = (M + 15) / 16, stride = 2 * k * Mt + 1, nb = K / 32, rows = Mt * 16;
    size_t nbytes = (size_t)K * stride + 16, ny = (size_t)n * M, nacc = (size_t)n * rows * nb;
    uint8_t *streams = calloc(nbytes, 1);
    float *scales = calloc((size_t)rows, sizeof(float)), *x = xmalloc(sizeof(float) * n * K);
    float *yref = xmalloc(sizeof(float) * ny), *y0 = xmalloc(sizeof(float) * ny);
    float *y = xmalloc(sizeof(float) * (ny + GUARD)), *a = xmalloc(sizeof(float) * n * nb);
    int32_t *acc = xmalloc(sizeof(int32_t) * (nacc + GUARD)), *ref = xmalloc(sizeof(int32_t) * nacc);
    int32_t *v = xmalloc(sizeof(int32_t) * rows * K);
    int8_t *q = xmalloc((size_t)n * K);
    if (!streams || !scales) {
        fprintf(stderr, "test_trellis: out of memory\n");
        exit(2);
    }
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
        a[u] = mx / 127.0f;
        for (int32_t j = 0; j < 32; j++)
            q[u * 32 + j] = (int8_t)((x[u * 32 + j] * inv + 12582912.0f) - 12582912.0f);
    }
    for (int32_t i = 0; i < rows; i++)
        for (int32_t j = 0; j < K; j++)
            v[(size_t)i * K + j] = value(window(streams, stride, j, i, k));
    for (int32_t t = 0; t < n; t++)
        for (int32_t i = 0; i < rows; i++) {
            float f = 0.0f; /* the spec's combination: the product rounded, then the sum */
            for (int32_t b = 0; b < nb; b++) {
                int32_t s = 0;
                for (int32_t j = 32 * b; j < 32 * b + 32; j++)
                    s += q[t * K + j] * v[(size_t)i * K + j];
                ref[((size_t)t * rows + i) * nb + b] = s;
                f = f + a[t * nb + b] * (float)s;
            }
            if (i < M)
                yref[(size_t)t * M + i] = scales[i] * f;
        }
    lut_trellis w = {.M = M, .K = K, .k = k, .streams = streams, .scales = scales};
    int failed = 0, first = 1;
    /* threads outside ISAs, so the pool restarts once per thread count; scalar on 1 thread runs first */
    for (int32_t threads = 1; threads <= MAX_THREADS; threads++) {
        for (int32_t isa = 0; isa < LUT_ISA_COUNT; isa++) {
            if (!(lut_isa_supported() >> isa & 1))
                continue;
            if (lut_set_isa(isa) != LUT_OK || lut_set_threads(threads) != LUT_OK) {
                fprintf(stderr, "test_trellis: cannot select ISA %s or %d threads\n", lut_isa_name(isa), threads);
                exit(2);
            }
            /* filled anew each path, so a path that writes nothing cannot pass on an earlier one's output */
            memset(y, Y_FILL, sizeof(float) * (ny + GUARD));
            memset(acc, ACC_FILL, sizeof(int32_t) * (nacc + GUARD));
            int rc = lut_trellis_gemm(&w, x, n, y, acc);
            const char *why = rc != LUT_OK                                      ? "returned an error"
                              : !untouched(y + ny, GUARD * sizeof(float), Y_FILL) ||
                                        !untouched(acc + nacc, GUARD * sizeof(int32_t), ACC_FILL)
                                  ? "wrote past the end of y or acc"
                              : memcmp(acc, ref, sizeof(int32_t) * nacc) != 0    ? "block sums differ from the decode"
                              : memcmp(y, yref, sizeof(float) * ny) != 0         ? "y differs from the spec's combination"
                              : !first && memcmp(y, y0, sizeof(float) * ny) != 0 ? "y differs from the scalar path"
                                                                                 : NULL;
            if (why)
                printf("FAIL M=%d K=%d k=%d n=%d isa=%s threads=%d: %s\n", M, K, k, n, lut_isa_name(isa), threads, why);
            else
                (*passed)++;
            failed += why != NULL;
            if (first)
                memcpy(y0, y, sizeof(float) * ny);
            first = 0;
        }
    }
    free(streams), free(scales), free(x), free(yref), free(y0), free(y), free(a), free(acc), free(ref), free(v), free(q);
    return failed;
}

/* A random shape: k cycles over 1..6; M mostly 1..70 (odd, below one tile, partial tiles), one in ten
 * up to 300; K from 32 (one in six exactly 32) to 1024, one in fifty 8192 with M <= 16 and one token. */
static int check_random(int32_t i, int *passed) {
    int32_t k = 1 + i % 6, M, K, n;
    static const int32_t tokens[] = {1, 1, 1, 2, 3, 5};
    if (rnd() % 50 == 0) {
        K = 8192, M = 1 + (int32_t)(rnd() % 16), n = 1;
    } else {
        K = rnd() % 6 == 0 ? 32 : 32 * (1 + (int32_t)(rnd() % 32));
        M = rnd() % 10 == 0 ? 71 + (int32_t)(rnd() % 230) : 1 + (int32_t)(rnd() % 70);
        n = tokens[rnd() % 6];
    }
    return check(M, K, k, n, passed);
}

int main(int argc, char **argv) {
    long nrandom = argc > 1 ? strtol(argv[1], NULL, 10) : 0;
    if (argc > 3 || nrandom < 0 || nrandom > 1000000) {
        fprintf(stderr, "usage: %s [RANDOM [SEED]]\n", argv[0]);
        return 2;
    }
    static const int32_t shapes[][2] = {{17, 32}, {40, 96}, {64, 256}};
    int failed = 0, cases = 0, passed = 0;
    for (int32_t k = 1; k <= 6; k++)
        for (int32_t s = 0; s < 3; s++)
            for (int32_t n = 1; n <= 3; n += 2, cases++)
                failed += check(shapes[s][0], shapes[s][1], k, n, &passed);
    rng_state = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 1;
    for (int32_t i = 0; i < nrandom; i++, cases++)
        failed += check_random(i, &passed);
    lut_trellis bad = {.M = 16, .K = 32, .k = 7};
    float one[32] = {0}, out[16];
    failed += lut_trellis_gemm(&bad, one, 1, out, NULL) != LUT_EINVAL;
    lut_set_threads(1);
    printf("trellis: %d cases, %d passed, %d failed\n", cases, passed, failed);
    return failed || !passed;
}
