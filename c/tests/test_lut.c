/* Standalone check of the C core on vectors written by tests/gen_vectors.py.
 *
 *     test_lut VECTORS [CASES]
 *
 * runs every case of VECTORS, or only its first CASES.
 * Every case runs on every ISA that lut_isa_supported() reports, on 1 to 4
 * threads. Each (case, ISA, threads) path must reproduce the reference integer
 * block sums exactly, stay within REL_TOL of the float64 reference output, and
 * give floats bitwise equal to the scalar kernel's on 1 thread. Needing no
 * Python, it runs under sanitizers natively and cross-compiled under qemu.
 * The last line is "<passed> passed, <failed> failed" over paths; the exit
 * status is 0 only when nothing failed and something passed. */
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lut.h"
#define HARNESS "test_lut"
#include "harness.h"

/* float32 accumulation error is measured against the sum of |terms| of an
 * output (written by the generator), since cancellation can make |y| tiny. */
#define REL_TOL 1e-5

typedef struct {
    int32_t M, K, P, G, Kb, has_off, N, exact, uniform, scale8, int_grid;
    size_t nplanes, nscales, noffsets, nx, nsums, ny;
    uint8_t *planes;
    void *scales, *offsets; /* fp16 bits, or uint8 / int8 when scale8 */
    float *x;
    int32_t *sums;
    double *y, *mag;
} vcase;

_Noreturn static void fatal(const char *path, const char *msg) {
    fprintf(stderr, "test_lut: %s: %s\n", path, msg);
    exit(2);
}

static void *read_array(FILE *f, const char *path, size_t n, size_t size) {
    void *p = xmalloc(n * size);
    if (fread(p, size, n, f) != n)
        fatal(path, "truncated");
    return p;
}

/* Bounds keep a corrupt file from asking for absurd allocations. */
static int plausible(const int32_t *h) {
    int32_t M = h[0], K = h[1], P = h[2], G = h[3], Kb = h[4];
    return M >= 1 && M <= 65536 && K >= 32 && K <= 65536 && K % 32 == 0 && P >= 1 && P <= 8 && G >= 32 &&
           K % G == 0 && Kb >= 32 && Kb <= 256 && G % Kb == 0 && (h[5] == 0 || h[5] == 1) && h[6] >= 1 &&
           h[6] <= 64 && (h[7] == 0 || h[7] == 1) && (h[8] == 0 || h[8] == 1) && (h[9] == 0 || h[9] == 1) &&
           (h[10] == 0 || (h[10] == 1 && h[8] == 1 && h[5] == 0));
}

static void read_case(FILE *f, const char *path, vcase *c) {
    int32_t h[11];
    if (fread(h, sizeof h[0], 11, f) != 11)
        fatal(path, "truncated");
    if (!plausible(h))
        fatal(path, "implausible case header");
    c->M = h[0], c->K = h[1], c->P = h[2], c->G = h[3], c->Kb = h[4], c->has_off = h[5], c->N = h[6], c->exact = h[7];
    c->uniform = h[8], c->scale8 = h[9], c->int_grid = h[10];
    size_t Mt = (size_t)(c->M + 15) / 16, ng = (size_t)(c->K / c->G);
    c->nplanes = Mt * (size_t)(c->K / 32) * (size_t)c->P * 64;
    c->nscales = Mt * ng * (size_t)(c->uniform ? 1 : c->P) * 16; /* uniform: plane 0's scale only */
    c->noffsets = c->has_off ? Mt * ng * 16 : 0;
    c->nx = (size_t)c->N * (size_t)c->K;
    c->nsums = (size_t)c->N * Mt * 16 * (size_t)c->P * (size_t)(c->K / c->Kb);
    c->ny = (size_t)c->N * (size_t)c->M;
    c->planes = read_array(f, path, c->nplanes, 1);
    c->scales = read_array(f, path, c->nscales, c->scale8 ? 1 : 2);
    c->offsets = c->has_off ? read_array(f, path, c->noffsets, c->scale8 ? 1 : 2) : NULL;
    c->x = read_array(f, path, c->nx, sizeof(float));
    c->sums = read_array(f, path, c->nsums, sizeof(int32_t));
    c->y = read_array(f, path, c->ny, sizeof(double));
    c->mag = read_array(f, path, c->ny, sizeof(double));
}

static void free_case(vcase *c) {
    free(c->planes);
    free(c->scales);
    free(c->offsets);
    free(c->x);
    free(c->sums);
    free(c->y);
    free(c->mag);
}

/* One path of one case; returns 1 if it passed, else prints its first failure. */
static int run_path(const vcase *c, int32_t ci, int32_t isa, int32_t threads, float *y, float *y_fused, int32_t *acc,
                    const float *y_scalar) {
    char where[224];
    snprintf(where, sizeof where,
             "case %d (M=%d K=%d P=%d G=%d offsets=%d N=%d exact=%d uniform=%d scale8=%d int_grid=%d) %s threads=%d",
             ci, c->M, c->K, c->P, c->G, c->has_off, c->N, c->exact, c->uniform, c->scale8, c->int_grid,
             lut_isa_name(isa), threads);
    if (lut_act_block(c->K, c->G) != c->Kb) {
        printf("FAIL %s: lut_act_block %d, reference %d\n", where, lut_act_block(c->K, c->G), c->Kb);
        return 0;
    }
    if (lut_set_isa(isa) != LUT_OK || lut_set_threads(threads) != LUT_OK) {
        printf("FAIL %s: cannot select ISA or threads\n", where);
        return 0;
    }
    lut_layer w = {.M = c->M, .K = c->K, .P = c->P, .G = c->G, .uniform = c->uniform, .scale8 = c->scale8,
                   .int_grid = c->int_grid, .planes = c->planes,
                   .scales = c->scales, .offsets = c->offsets};
    memset(y, Y_FILL, (c->ny + GUARD) * sizeof *y);
    memset(acc, ACC_FILL, (c->nsums + GUARD) * sizeof *acc);
    int rc = lut_gemm(&w, c->x, c->N, y, c->exact, acc);
    if (rc != LUT_OK) {
        printf("FAIL %s: lut_gemm returned %d\n", where, rc);
        return 0;
    }
    if (!untouched(y + c->ny, GUARD * sizeof *y, Y_FILL) || !untouched(acc + c->nsums, GUARD * sizeof *acc, ACC_FILL)) {
        printf("FAIL %s: wrote past the end of y or acc\n", where);
        return 0;
    }
    int32_t rows = (c->M + 15) / 16 * 16, nb = c->K / c->Kb;
    for (size_t i = 0; i < c->nsums; i++)
        if (acc[i] != c->sums[i]) {
            size_t b = i % (size_t)nb, p = i / (size_t)nb % (size_t)c->P, r = i / ((size_t)nb * (size_t)c->P);
            printf("FAIL %s: sum [token %zu][row %zu][plane %zu][block %zu] = %d, reference %d\n", where,
                   r / (size_t)rows, r % (size_t)rows, p, b, acc[i], c->sums[i]);
            return 0;
        }
    for (size_t i = 0; i < c->ny; i++)
        if (!(fabs((double)y[i] - c->y[i]) <= REL_TOL * c->mag[i])) {
            printf("FAIL %s: y[%zu][%zu] = %.9g, reference %.17g (sum of |terms| %.6g)\n", where, i / (size_t)c->M,
                   i % (size_t)c->M, (double)y[i], c->y[i], c->mag[i]);
            return 0;
        }
    /* Without acc a uniform layer's planes are summed in runs (lut_plane_run): the same integers, so
     * the same floats. */
    memset(y_fused, Y_FILL, c->ny * sizeof *y_fused);
    if (lut_gemm(&w, c->x, c->N, y_fused, c->exact, NULL) != LUT_OK || memcmp(y, y_fused, c->ny * sizeof *y) != 0) {
        printf("FAIL %s: output without acc differs from the output with acc\n", where);
        return 0;
    }
    /* Every case on both paths whatever its token count: the integer GEMM must give the sums
     * and, with and without acc, the floats of the tables. */
    {
        int32_t rows = lut_igemm_rows();
        float *y_lut = y_fused + c->ny, *y_ig = y_fused + 2 * c->ny; /* the caller's second and third thirds */
        memset(y_lut, Y_FILL, 2 * c->ny * sizeof *y_lut);
        memset(acc, ACC_FILL, (c->nsums + GUARD) * sizeof *acc);
        int same = lut_set_igemm_rows(INT32_MAX) == LUT_OK && lut_gemm(&w, c->x, c->N, y_lut, c->exact, NULL) == LUT_OK &&
                   lut_set_igemm_rows(1) == LUT_OK && lut_gemm(&w, c->x, c->N, y_ig, c->exact, acc) == LUT_OK &&
                   memcmp(acc, c->sums, c->nsums * sizeof *acc) == 0 &&
                   untouched(acc + c->nsums, GUARD * sizeof *acc, ACC_FILL) &&
                   memcmp(y_lut, y_ig, c->ny * sizeof *y_ig) == 0;
        memset(y_ig, Y_FILL, c->ny * sizeof *y_ig);
        same = same && lut_gemm(&w, c->x, c->N, y_ig, c->exact, NULL) == LUT_OK && memcmp(y_lut, y_ig, c->ny * sizeof *y_ig) == 0;
        lut_set_igemm_rows(rows);
        if (!same) {
            printf("FAIL %s: the integer GEMM's sums or output differ from the tables'\n", where);
            return 0;
        }
    }
    if (y_scalar && memcmp(y, y_scalar, c->ny * sizeof *y) != 0) {
        for (size_t i = 0; i < c->ny; i++)
            if (memcmp(y + i, y_scalar + i, sizeof *y) != 0) {
                printf("FAIL %s: y[%zu][%zu] = %a, scalar kernel %a (not bitwise equal)\n", where, i / (size_t)c->M,
                       i % (size_t)c->M, (double)y[i], (double)y_scalar[i]);
                break;
            }
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    char *end = NULL;
    long limit = argc == 3 ? strtol(argv[2], &end, 10) : -1;
    if (argc < 2 || argc > 3 || (end && (*end || limit < 1))) {
        fprintf(stderr, "usage: %s VECTORS [CASES] (from tests/gen_vectors.py)\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    FILE *f = fopen(path, "rb");
    if (!f)
        fatal(path, "cannot open");
    char magic[8];
    uint32_t order, ncases;
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "LUTVEC4", 8) != 0)
        fatal(path, "not a LUTVEC4 vectors file (remake it with tests/gen_vectors.py)");
    if (fread(&order, 4, 1, f) != 1 || fread(&ncases, 4, 1, f) != 1)
        fatal(path, "truncated");
    /* arrays are read in host order: the little-endian file's byte-order word rejects other hosts */
    if (order != 0x01020304u)
        fatal(path, "byte order differs from this host's");
    uint32_t nrun = limit > 0 && (unsigned long)limit < ncases ? (uint32_t)limit : ncases;

    static const int32_t thread_counts[] = {1, 2, 3, 4};
    int32_t supported = lut_isa_supported();
    printf("test_lut: %" PRIu32 " cases of %" PRIu32 ", ISAs:", nrun, ncases);
    for (int32_t isa = 0; isa < LUT_ISA_COUNT; isa++)
        if (supported >> isa & 1)
            printf(" %s", lut_isa_name(isa));
    printf(", threads 1 to 4\n");

    int passed = 0, failed = 0;
    for (uint32_t ci = 0; ci < nrun; ci++) {
        vcase c;
        read_case(f, path, &c);
        float *y = xmalloc((c.ny + GUARD) * sizeof *y), *y_scalar = xmalloc(c.ny * sizeof *y_scalar);
        float *y_fused = xmalloc(3 * c.ny * sizeof *y_fused); /* and the two paths' outputs */
        int32_t *acc = xmalloc((c.nsums + GUARD) * sizeof *acc);
        /* LUT_ISA_SCALAR is 0, so the scalar 1-thread path runs first and sets the baseline. Threads
         * outside ISAs: the pool restarts once per thread count, not once per path (slow under qemu). */
        for (size_t t = 0; t < sizeof thread_counts / sizeof thread_counts[0]; t++) {
            for (int32_t isa = 0; isa < LUT_ISA_COUNT; isa++) {
                if (!(supported >> isa & 1))
                    continue;
                int baseline = isa == LUT_ISA_SCALAR && t == 0;
                int ok = run_path(&c, (int32_t)ci, isa, thread_counts[t], y, y_fused, acc, baseline ? NULL : y_scalar);
                if (baseline)
                    memcpy(y_scalar, y, c.ny * sizeof *y);
                passed += ok;
                failed += !ok;
            }
        }
        free(y);
        free(y_scalar);
        free(y_fused);
        free(acc);
        free_case(&c);
    }
    if (nrun == ncases && fgetc(f) != EOF) {
        printf("FAIL %s: data after the last case\n", path);
        failed++;
    }
    fclose(f);
    lut_set_threads(1);
    printf("%d passed, %d failed\n", passed, failed);
    return failed || !passed;
}
