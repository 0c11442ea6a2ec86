/* Dispatcher: validates a call, builds the per-token activation tables, and
 * runs the chosen ISA's tile kernel over row tiles on the thread pool.
 * Table construction is shared C compiled once, so every ISA path sees
 * byte-identical tables and must produce identical integer sums. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <math.h>
#include <stdlib.h>
#include "lut_internal.h"

/* Each ISA's kernels: the table-lookup tile, the integer-GEMM block, and where the ISA has
 * one, the integer GEMM's int8 variant (with the CPU test it needs beyond the ISA's own). */
static const struct {
    lut_tile_fn tile;
    lut_iblock_fn iblock;
    lut_bscales_fn bscales;
    void (*itile8)(const lut_itile8 *t);
    lut_decode8_fn decode8;
    int (*has_int8)(void);
} kernels[LUT_ISA_COUNT] = {
    [LUT_ISA_SCALAR] = {lut_tile_scalar, lut_iblock_scalar, lut_bscales_scalar},
#if defined(__x86_64__) || defined(__i386__)
    [LUT_ISA_AVX2] = {lut_tile_avx2, lut_iblock_avx2, lut_bscales_avx2},
    [LUT_ISA_AVX512] = {lut_tile_avx512, lut_iblock_avx512, lut_bscales_avx512, lut_itile8_avx512, lut_decode8_avx512,
                        lut_int8_dot},
#endif
#if defined(__aarch64__)
    [LUT_ISA_NEON] = {lut_tile_neon, lut_iblock_neon, lut_bscales_scalar},
#endif
};

static const char *const isa_names[LUT_ISA_COUNT] = {"scalar", "avx2", "avx512", "neon"};

const char *lut_isa_name(int32_t isa) {
    return isa >= 0 && isa < LUT_ISA_COUNT ? isa_names[isa] : "unknown";
}

int32_t lut_isa_supported(void) {
    int32_t mask = 1 << LUT_ISA_SCALAR;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        mask |= 1 << LUT_ISA_AVX2;
    if ((mask & (1 << LUT_ISA_AVX2)) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        mask |= 1 << LUT_ISA_AVX512;
#endif
#if defined(__aarch64__)
    mask |= 1 << LUT_ISA_NEON; /* Advanced SIMD is mandatory in AArch64 */
#endif
    return mask;
}

pthread_mutex_t lut_call_mu = PTHREAD_MUTEX_INITIALIZER;
/* Atomic: read outside the call lock (trellis path choice, lut_isa from any thread). */
static _Atomic int32_t cur_isa = -1;

static int32_t best_isa(void) {
    int32_t m = lut_isa_supported();
    for (int32_t i = LUT_ISA_COUNT - 1; i > 0; i--)
        if (m & (1 << i))
            return i;
    return LUT_ISA_SCALAR;
}

int lut_set_isa(int32_t isa) {
    if (isa < 0 || isa >= LUT_ISA_COUNT || !(lut_isa_supported() & (1 << isa)))
        return LUT_EISA;
    pthread_mutex_lock(&lut_call_mu);
    cur_isa = isa;
    pthread_mutex_unlock(&lut_call_mu);
    return LUT_OK;
}

/* The first call settles the ISA: LUTENGINE_ISA if set (validated by the
 * Python layer, which reports a clear error), else the best supported. */
int32_t lut_isa(void) {
    if (atomic_load(&cur_isa) < 0) {
        const char *env = getenv("LUTENGINE_ISA");
        int32_t isa = best_isa(), unset = -1;
        if (env)
            for (int32_t i = 0; i < LUT_ISA_COUNT; i++)
                if (!strcmp(env, isa_names[i]) && (lut_isa_supported() & (1 << i)))
                    isa = i;
        /* only if still unset: a concurrent lut_set_isa wins over the default */
        atomic_compare_exchange_strong(&cur_isa, &unset, isa);
    }
    return atomic_load(&cur_isa);
}

int lut_set_threads(int32_t n) {
    pthread_mutex_lock(&lut_call_mu);
    int rc = lut_pool_resize(n);
    pthread_mutex_unlock(&lut_call_mu);
    return rc;
}

int32_t lut_threads(void) { return lut_pool_size(); }

int32_t lut_act_block(int32_t K, int32_t G) {
    if (G <= 256)
        return G;
    for (int32_t b = 256; b > 32; b /= 2)
        if (K % b == 0)
            return b;
    return 32;
}

/* ---- activation tables ---------------------------------------------------
 * Both modes first round each block of Kb activations to integers q, then
 * entry idx of a group of 4 is the exact integer sum_i (bit i of idx ? +q_i : -q_i).
 * Because the tables hold exact sums of integers, the integer GEMM (many tokens)
 * computes the same sums with dot products, and every path - one token or many,
 * whatever the chunking of a prompt - gives a token the same output bit for bit.
 * The loops are written so the compiler vectorises them without fast-math:
 * |v| by clearing the sign bit, max|v| as an integer max (non-negative floats
 * order like their bit patterns), and rounding by adding and subtracting
 * 1.5 * 2^23, which rounds half to even (as np.rint) for |v| < 2^22. */
static inline uint32_t abs_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x7fffffffu;
}

static inline float bits_float(uint32_t u) {
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Same C, compiled twice on x86: the AVX2 clone only widens the vectors, and
 * without FMA contraction it computes the identical IEEE results. */
#ifdef TABLE_CLONES
/* defined by the build (empty for ThreadSanitizer: it cannot run ifunc resolvers before it starts) */
#define CLONES_SET_BY_BUILD
#elif (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define TABLE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TABLE_CLONES
#endif

static inline int32_t round_even(float v) { return (int32_t)((v + 12582912.0f) - 12582912.0f); }

/* Fast mode: the scale is m / LUT_FAST_SUM with m the block's largest sum of 4
 * |x|, ((|x0| + |x1|) + |x2|) + |x3| in float32, or max|x| / LUT_FAST_Q where
 * that is larger (a value holding over half of its group's sum), so |q| <= 127
 * (the int8 dot products of the integer GEMM take them) and a group's |q| sums
 * to at most LUT_FAST_SUM + 4 * 1/2 (+ < 10^-3 of float rounding) = 254. The
 * tables store halves in int8: a group's 16 entries share the parity of its
 * sum (flipping a sign changes it by 2 q_i), so an even group's halve exactly
 * and the odd groups' halve down and up by turns, which cancels in any row's
 * block sum if the block has an even number of odd groups. Where it has an
 * odd number, the value of an odd group rounded farthest from its own (at
 * most one per block, typically ~0.5 off, then ~0.5 the other way) moves to
 * its other integer neighbour (towards zero if it was exact, never past 127;
 * then a group's |q| sums to at most 254 still, being even). A row's block
 * sum is then exactly twice its sum of halves, and the scale is doubled to
 * match. That is the resolution of rounding each float sum to int8 (scale m /
 * 127), what the tables did before they were exact. Exact mode: 12-bit
 * integers, scale max|x| / LUT_EXACT_Q, the sums (|T| <= 4 * 2047 = 8188) split
 * into signed bytes T = 256*hi + lo, lo in [-128,127], hi in [-32,32]. Returns
 * the scale of the integers. */
static inline __attribute__((always_inline)) float act_ints(const float *x, int32_t Kb, int32_t exact, int32_t *q) {
    uint32_t maxbits = 0, sumbits = 0;
    for (int32_t k = 0; k < Kb; k++) {
        uint32_t u = abs_bits(x[k]);
        maxbits = u > maxbits ? u : maxbits;
    }
    if (!exact)
        for (int32_t j = 0; j < Kb / 4; j++) {
            const float *a = x + 4 * j;
            uint32_t u = abs_bits(((bits_float(abs_bits(a[0])) + bits_float(abs_bits(a[1]))) +
                                   bits_float(abs_bits(a[2]))) + bits_float(abs_bits(a[3])));
            sumbits = u > sumbits ? u : sumbits;
        }
    float maxabs = bits_float(maxbits), top = exact ? (float)LUT_EXACT_Q : (float)LUT_FAST_Q;
    float inv = maxabs > 0.0f ? top / maxabs : 0.0f, scale = maxabs / top;
    if (!exact && maxabs > 0.0f) {
        float maxsum = bits_float(sumbits), inv_sum = (float)LUT_FAST_SUM / maxsum;
        if (inv_sum <= inv) {
            inv = inv_sum;
            scale = maxsum / (float)LUT_FAST_SUM;
        }
    }
    if (exact) {
        for (int32_t k = 0; k < Kb; k++)
            q[k] = round_even(x[k] * inv);
        return scale;
    }
    float err[256];
    int32_t par[64], nodd = 0, far = -1;
    for (int32_t k = 0; k < Kb; k++) {
        float v = x[k] * inv;
        q[k] = round_even(v);
        err[k] = fabsf(v - (float)q[k]);
    }
    for (int32_t j = 0; j < Kb / 4; j++) {
        par[j] = (q[4 * j] + q[4 * j + 1] + q[4 * j + 2] + q[4 * j + 3]) & 1;
        nodd += par[j];
    }
    if (nodd & 1) {
        float worst = -1.0f;
        for (int32_t k = 0; k < Kb; k++)
            if (par[k >> 2] && err[k] > worst) {
                worst = err[k];
                far = k;
            }
        float v = x[far] * inv;
        int32_t dir = v > (float)q[far] ? 1 : v < (float)q[far] ? -1 : q[far] > 0 ? -1 : 1;
        q[far] = q[far] + dir > LUT_FAST_Q || q[far] + dir < -LUT_FAST_Q ? q[far] - dir : q[far] + dir;
    }
    return scale;
}

/* One block's tables: fast, the halves in lo (and the doubled scale returned);
 * exact, the low bytes in lo and the high bytes in hi. A group's 16 entries
 * are one vector, sum_i sign_i * q_i with the entries' signs as constant
 * vectors (|T| <= 8188 fits int16): GNU C vectors, so every target gets its own
 * SIMD (written per entry, the loop stayed scalar and the tables took a tenth
 * of a decode step). Halving and the byte split shift even numbers and
 * multiples of 256 right, which is exact (arithmetic shifts: GCC, Clang). */
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
#define SIGNS(b) {-1 + 2 * (0 >> b & 1), -1 + 2 * (1 >> b & 1), -1 + 2 * (2 >> b & 1), -1 + 2 * (3 >> b & 1), \
                  -1 + 2 * (4 >> b & 1), -1 + 2 * (5 >> b & 1), -1 + 2 * (6 >> b & 1), -1 + 2 * (7 >> b & 1), \
                  -1 + 2 * (8 >> b & 1), -1 + 2 * (9 >> b & 1), -1 + 2 * (10 >> b & 1), -1 + 2 * (11 >> b & 1), \
                  -1 + 2 * (12 >> b & 1), -1 + 2 * (13 >> b & 1), -1 + 2 * (14 >> b & 1), -1 + 2 * (15 >> b & 1)}

TABLE_CLONES static float tables(const float *x, int32_t Kb, int32_t exact, int8_t *lo, int8_t *hi) {
    static const i16x16 s0 = SIGNS(0), s1 = SIGNS(1), s2 = SIGNS(2), s3 = SIGNS(3);
    int32_t q[256], nodd = 0;
    float scale = act_ints(x, Kb, exact, q);
    for (int32_t j = 0; j < Kb / 4; j++) {
        const int32_t *a = q + 4 * j;
        i16x16 t = s0 * (int16_t)a[0] + s1 * (int16_t)a[1] + s2 * (int16_t)a[2] + s3 * (int16_t)a[3];
        i8x16 l;
        if (exact) {
            i16x16 low = ((t + 128) & 255) - 128;
            i8x16 h = __builtin_convertvector((t - low) >> 8, i8x16);
            memcpy(hi + 16 * j, &h, sizeof h);
            l = __builtin_convertvector(low, i8x16);
        } else { /* an odd group's entries are odd: the block's odd groups halve them down and up by turns */
            int16_t d = (a[0] + a[1] + a[2] + a[3]) & 1 ? (int16_t)(nodd++ & 1 ? 1 : -1) : 0;
            l = __builtin_convertvector((t + d) >> 1, i8x16);
        }
        memcpy(lo + 16 * j, &l, sizeof l);
    }
    return exact ? scale : 2.0f * scale;
}

/* The integer GEMM's activations: the tables' integers, as int16, or (int8 variant, fast
 * mode: |q| <= 127) as int8 with half their sum. Both return the integers' scale. */
TABLE_CLONES static float ints16(const float *x, int32_t Kb, int32_t exact, int16_t *out) {
    int32_t q[256];
    float scale = act_ints(x, Kb, exact, q);
    for (int32_t k = 0; k < Kb; k++)
        out[k] = (int16_t)q[k];
    return scale;
}

TABLE_CLONES static float ints8(const float *x, int32_t Kb, int8_t *out, int32_t *half_sum) {
    int32_t q[256], s = 0;
    float scale = act_ints(x, Kb, 0, q);
    for (int32_t k = 0; k < Kb; k++) {
        out[k] = (int8_t)q[k];
        s += q[k];
    }
    *half_sum = s / 2; /* even: every group's sum is */
    return scale;
}

/* Sums of the ngroups groups of G activations in x, this thread's share. */
static void group_sums(const float *x, int64_t ngroups, int32_t G, float *out, int32_t ith, int32_t nth) {
    for (int64_t u = ngroups * ith / nth; u < ngroups * (ith + 1) / nth; u++) {
        const float *xg = x + u * G; /* groups tile each token's row exactly: K = ng * G */
        float part[8] = {0}, s = 0.0f; /* 8 partial sums: a vector add chain, not a scalar one */
        for (int32_t k = 0; k < G; k += 8)
            for (int i = 0; i < 8; i++)
                part[i] += xg[k + i];
        for (int i = 0; i < 8; i++)
            s += part[i];
        out[u] = s;
    }
}

typedef struct {
    lut_job job[LUT_FUSE_MAX]; /* one per layer; all share the tables */
    int32_t first[LUT_FUSE_MAX + 1]; /* layer l holds tiles first[l] .. first[l+1]-1 of the call */
    int32_t count;
    const float *x;
    int32_t n, exact, isa;
} call_ctx;

static void build_tables(void *arg, int32_t ith, int32_t nth) {
    call_ctx *c = arg;
    const lut_job *j = &c->job[0];
    int32_t K = j->w->K, G = j->w->G, nb = K / j->Kb, ng = K / G;
    int64_t units = (int64_t)c->n * nb, lo = units * ith / nth, hi = units * (ith + 1) / nth;
    for (int64_t u = lo; u < hi; u++) {
        int32_t tok = (int32_t)(u / nb), b = (int32_t)(u % nb);
        const float *x = c->x + (int64_t)tok * K + (int64_t)b * j->Kb;
        int8_t *tab = (int8_t *)j->tab + tok * lut_tab_stride(j) + (int64_t)b * j->Kb * 4;
        float *ts = (float *)j->tscale + (int64_t)tok * nb + b;
        *ts = tables(x, j->Kb, c->exact, tab, c->exact ? tab + (int64_t)K * 4 : NULL);
    }
    if (lut_has_offsets(j->w))
        group_sums(c->x, (int64_t)c->n * ng, G, (float *)j->xsum, ith, nth);
}

static void run_tiles(void *arg, int32_t ith, int32_t nth) {
    call_ctx *c = arg;
    lut_tile_fn fn = kernels[c->isa].tile;
    int32_t ntiles = c->first[c->count], l = 0;
    int32_t lo = (int32_t)((int64_t)ntiles * ith / nth), hi = (int32_t)((int64_t)ntiles * (ith + 1) / nth);
    for (int32_t t = lo; t < hi; t++) {
        while (t >= c->first[l + 1])
            l++;
        for (int32_t tok = 0; tok < c->n; tok++)
            fn(&c->job[l], t - c->first[l], tok);
    }
}

/* ---- integer GEMM (exact mode, many tokens; lut_iblock in lut_internal.h) ----
 * A chunk of a tile decodes to int16 [16 pairs][16 rows][2]: column k = 4g + i
 * of the chunk is bit i of group g's nibble, the low nibbles of bytes
 * 16(g & 3) .. +15 for g < 4, the high ones for g >= 4 (layout.py), so pair kp
 * holds bits 2(kp & 1) and 2(kp & 1) + 1 of nibble g = kp / 2. A component is
 * planes [p0, p1): sum_p 2^(p-p0) (2 b_p - 1) = 2 v - (2^(p1-p0) - 1) with v
 * their bits as a number; a uniform layer's planes make one component, a
 * per-plane layer's (or acc's) one each. v is built as 32-bit words, one per
 * row and pair, 16 bits per column (v <= 255: no carry between them), from 16
 * contiguous bytes per step, so the loops vectorise over the rows. */
#ifdef CLONES_SET_BY_BUILD
#define DECODE_CLONES TABLE_CLONES
#elif (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define DECODE_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define DECODE_CLONES
#endif

/* GNU C vectors: written as loops over rows, the 16-row steps were left scalar
 * by the vectoriser (GCC 12), and the decode took as long as the dot products at
 * 128 tokens; the bytes are widened first in a plain loop, which it turns into
 * vpmovzx (converting a byte vector instead went through general registers). */
typedef uint32_t u32x16 __attribute__((vector_size(64)));

DECODE_CLONES static void decode_comp(const uint8_t *wc, int32_t p0, int32_t p1, int16_t *wd) {
    u32x16 v[LUT_CHUNK / 2] = {0};
    for (int32_t p = p0; p < p1; p++) {
        const uint8_t *src = wc + (int64_t)p * 64;
        uint32_t b[64];
        for (int32_t i = 0; i < 64; i++)
            b[i] = src[i];
#pragma GCC unroll 16 /* constant shifts, v in registers */
        for (int32_t kp = 0; kp < LUT_CHUNK / 2; kp++) {
            u32x16 t;
            memcpy(&t, b + ((kp >> 1) & 3) * LUT_TILE, sizeof t);
            int32_t shift = (kp >> 3) * 4 + (kp & 1) * 2;
            v[kp] += ((t >> shift & 1u) | (t >> (shift + 1) & 1u) << 16) << (p - p0);
        }
    }
    uint16_t h[LUT_IG_WORDS];
    memcpy(h, v, sizeof h); /* little-endian words: column 2kp in the low half (x86, AArch64) */
    int32_t top = (1 << (p1 - p0)) - 1;
    for (int32_t i = 0; i < LUT_IG_WORDS; i++)
        wd[i] = (int16_t)(2 * h[i] - top);
}

static void decode_chunk(const uint8_t *wc, int32_t P, int32_t ncomp, int16_t *wd) {
    if (ncomp == 1)
        decode_comp(wc, 0, P, wd);
    else
        for (int32_t p = 0; p < P; p++)
            decode_comp(wc, p, p + 1, wd + p * LUT_IG_WORDS);
}

/* Below this many tokens the tables are faster. AVX-512, 1 thread, igemm / tables (python -m
 * bench.gemm_pp, bench/RESULTS.md "Prompts on the integer GEMM"). The int8 variant at 2, 4, 8
 * tokens: 576x576 0.75, 1.28, 2.13; 1536x576 0.71, 1.32, 2.35; 4864x896 0.66, 1.33, 2.33. The
 * int16 one, fast mode at 8, 12, 16 tokens: 576x576 1.11, 1.31, 1.72; 1536x576 0.95, 1.11,
 * 1.46; 4864x896 0.89, 1.04, 1.37; exact mode (its tables cost twice the lookups) at 4, 6, 8
 * tokens: 576x576 1.04, 1.30, 1.86; 1536x576 0.85, 1.09, 1.60. LUTENGINE_IGEMM_ROWS (read at
 * the first call) or lut_set_igemm_rows overrides both: benchmarks compare the paths at one
 * size, tests run every case on both. */
#define LUT_IGEMM_ROWS8 4
#define LUT_IGEMM_ROWS16 10
static int32_t igemm_rows = -1; /* -1: the environment not read yet; 0: the defaults */

/* Hold lut_call_mu. */
static int32_t igemm_override(void) {
    if (igemm_rows < 0) {
        const char *env = getenv("LUTENGINE_IGEMM_ROWS");
        char *end = NULL;
        long v = env ? strtol(env, &end, 10) : -1;
        igemm_rows = env && *env && !*end && v >= 1 && v <= INT32_MAX ? (int32_t)v : 0;
    }
    return igemm_rows;
}

static int32_t int8_allowed = 1;

int lut_set_int8(int32_t on) {
    if (on != 0 && on != 1)
        return LUT_EINVAL;
    pthread_mutex_lock(&lut_call_mu);
    int8_allowed = on;
    pthread_mutex_unlock(&lut_call_mu);
    return LUT_OK;
}

/* Whether this ISA runs fast-mode calls on the int8 variant (hold lut_call_mu). */
static int uses_int8(int32_t isa, int32_t exact) {
    return int8_allowed && !exact && kernels[isa].has_int8 && kernels[isa].has_int8();
}

/* Hold lut_call_mu. */
static int32_t igemm_min_rows(int32_t isa, int32_t exact) {
    int32_t n = igemm_override();
    return n ? n : uses_int8(isa, exact) ? LUT_IGEMM_ROWS8 : LUT_IGEMM_ROWS16;
}

int lut_set_igemm_rows(int32_t n) {
    if (n < 0)
        return LUT_EINVAL;
    pthread_mutex_lock(&lut_call_mu);
    igemm_rows = n;
    pthread_mutex_unlock(&lut_call_mu);
    return LUT_OK;
}

int32_t lut_igemm_rows(void) {
    pthread_mutex_lock(&lut_call_mu);
    int32_t n = igemm_override();
    pthread_mutex_unlock(&lut_call_mu);
    return n;
}

/* Workspace layout, 64-byte aligned parts. */
static size_t align64(size_t v) { return (v + 63) & ~(size_t)63; }

typedef struct {
    const lut_layer *const *w; /* count <= LUT_FUSE_MAX layers sharing K and G (so the activations) */
    float *const *y;
    int32_t first[LUT_FUSE_MAX + 1]; /* layer l holds tiles first[l] .. first[l+1]-1 of the call */
    int32_t count;
    const float *x;
    int32_t *acc; /* one layer only */
    int32_t n, Kb, isa, exact, int8, offsets; /* offsets: some layer adds them (group sums needed) */
    int16_t *q;  /* [K/Kb][n][Kb]: a block's tokens contiguous, read once per tile */
    int8_t *q8;  /* int8 variant: [K/Kb][n][Kb] instead, and */
    int32_t *qs; /* [K/Kb][n] half their sums */
    float *ts;   /* [n][K/Kb] */
    float *xs;   /* [n][K/G] */
    char *scratch;
    size_t per_chunk; /* scratch of one pool chunk: yacc [n][16] floats, then a block's decoded chunks;
                       * int8 variant: the tile's decoded chunks, then its scales and offsets */
} igemm_ctx;

/* Components of a layer's integer GEMM: a uniform layer's planes in one, unless each plane's
 * sums are asked for. */
static int32_t igemm_comps(const lut_layer *w, const int32_t *acc) { return w->uniform && !acc ? 1 : w->P; }

static void igemm_quant(void *arg, int32_t ith, int32_t nth) {
    igemm_ctx *c = arg;
    int32_t K = c->w[0]->K, Kb = c->Kb, nb = K / Kb, ng = K / c->w[0]->G;
    int64_t units = (int64_t)c->n * nb;
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        int32_t tok = (int32_t)(u / nb), b = (int32_t)(u % nb);
        const float *xb = c->x + (int64_t)tok * K + (int64_t)b * Kb;
        int64_t at = (int64_t)b * c->n + tok;
        float scale = c->int8 ? ints8(xb, Kb, c->q8 + at * Kb, c->qs + at) : ints16(xb, Kb, c->exact, c->q + at * Kb);
        c->ts[u] = c->exact ? scale : 2.0f * scale; /* fast mode: halved sums, as the tables' */
    }
    if (c->offsets)
        group_sums(c->x, (int64_t)c->n * ng, c->w[0]->G, c->xs, ith, nth);
}

/* The int8 variant, a tile at a time: every block's chunks decoded and scales read, then
 * every token over the whole tile (lut_itile8). */
static void igemm_tile8(const igemm_ctx *c, const lut_layer *w, float *y, int32_t tile, char *scratch) {
    int32_t K = w->K, P = w->P, n = c->n, Kb = c->Kb, nb = K / Kb, ng = K / w->G, bpg = w->G / Kb;
    int32_t cpb = Kb / LUT_CHUNK, nchunk = K / LUT_CHUNK, nsc = w->uniform ? 1 : P, ncomp = igemm_comps(w, c->acc);
    uint8_t *wd8 = (uint8_t *)scratch;
    float *sc = (float *)(scratch + align64((size_t)nchunk * ncomp * LUT_IG_BYTES)), *z = sc + (size_t)nb * nsc * LUT_TILE;
    const uint8_t *wt = w->planes + (int64_t)tile * nchunk * P * 64;
    for (int32_t ch = 0; ch < nchunk; ch++)
        kernels[c->isa].decode8(wt + (int64_t)ch * P * 64, P, ncomp, wd8 + (int64_t)ch * ncomp * LUT_IG_BYTES);
    for (int32_t b = 0, g = 0; b < nb; b++) {
        int last = b % bpg == bpg - 1;
        kernels[c->isa].bscales(w, (int64_t)tile * ng + g, nsc, last && lut_has_offsets(w),
                                sc + (int64_t)b * nsc * LUT_TILE, z + (int64_t)g * LUT_TILE);
        g += last;
    }
    int32_t rows = (w->M + LUT_TILE - 1) / LUT_TILE * LUT_TILE;
    lut_itile8 k = {
        .n = n, .nb = nb, .cpb = cpb, .ncomp = ncomp, .uniform = w->uniform, .P = P, .Kb = Kb, .ng = ng,
        .bpg = bpg, .nr = w->M - tile * LUT_TILE < LUT_TILE ? w->M - tile * LUT_TILE : LUT_TILE, .wd8 = wd8,
        .q8 = c->q8, .qs = c->qs, .ts = c->ts, .sc = sc, .z = lut_has_offsets(w) ? z : NULL, .xs = c->xs,
        .y = y + (int64_t)tile * LUT_TILE, .ystride = w->M,
        .acc = c->acc ? c->acc + (int64_t)tile * LUT_TILE * P * nb : NULL, .acc_tok = (int64_t)rows * P * nb,
        .acc_row = P * nb,
    };
    kernels[c->isa].itile8(&k);
}

/* The int16 variant, a block at a time (lut_iblock). */
static void igemm_tile16(const igemm_ctx *c, const lut_layer *w, float *y, int32_t tile, char *scratch) {
    int32_t K = w->K, P = w->P, n = c->n, Kb = c->Kb, nb = K / Kb, ng = K / w->G, bpg = w->G / Kb;
    int32_t cpb = Kb / LUT_CHUNK, nchunk = K / LUT_CHUNK, nsc = w->uniform ? 1 : P, ncomp = igemm_comps(w, c->acc);
    int32_t rows = (w->M + LUT_TILE - 1) / LUT_TILE * LUT_TILE;
    float *yacc = (float *)scratch;
    int16_t *wd = (int16_t *)(scratch + align64((size_t)n * LUT_TILE * sizeof(float)));
    const uint8_t *wt = w->planes + (int64_t)tile * nchunk * P * 64;
    memset(yacc, 0, (size_t)n * LUT_TILE * sizeof *yacc);
    int32_t g = 0, bg = 0;
    for (int32_t b = 0; b < nb; b++) {
        int64_t grp = (int64_t)tile * ng + g;
        float sc[8 * LUT_TILE], z[LUT_TILE];
        int last = ++bg == bpg;
        kernels[c->isa].bscales(w, grp, nsc, last && lut_has_offsets(w), sc, z);
        for (int32_t ch = 0; ch < cpb; ch++)
            decode_chunk(wt + ((int64_t)b * cpb + ch) * P * 64, P, ncomp, wd + (int64_t)ch * ncomp * LUT_IG_WORDS);
        lut_iblock bk = {
            .n = n, .nchunk = cpb, .ncomp = ncomp, .uniform = w->uniform, .P = P, .wd = wd,
            .q = c->q + (int64_t)b * n * Kb, .halve = !c->exact, .qstride = Kb, .nb = nb, .ng = ng, .ts = c->ts + b,
            .sc = sc, .z = last && lut_has_offsets(w) ? z : NULL, .xs = c->xs + g, .yacc = yacc,
            .acc = c->acc ? c->acc + (int64_t)tile * LUT_TILE * P * nb + b : NULL,
            .acc_tok = (int64_t)rows * P * nb, .acc_row = P * nb,
        };
        kernels[c->isa].iblock(&bk);
        if (last) {
            bg = 0;
            g++;
        }
    }
    int32_t nr = w->M - tile * LUT_TILE < LUT_TILE ? w->M - tile * LUT_TILE : LUT_TILE;
    for (int32_t t = 0; t < n; t++)
        memcpy(y + (int64_t)t * w->M + tile * LUT_TILE, yacc + (int64_t)t * LUT_TILE, (size_t)nr * sizeof *yacc);
}

static void igemm_tiles(void *arg, int32_t ith, int32_t nth) {
    igemm_ctx *c = arg;
    int32_t ntiles = c->first[c->count], l = 0;
    char *scratch = c->scratch + (size_t)ith * c->per_chunk;
    for (int32_t t = (int32_t)((int64_t)ntiles * ith / nth); t < (int64_t)ntiles * (ith + 1) / nth; t++) {
        while (t >= c->first[l + 1])
            l++;
        (c->int8 ? igemm_tile8 : igemm_tile16)(c, c->w[l], c->y[l], t - c->first[l], scratch);
    }
}

/* The layers' integer GEMM: their activations quantized once, one pool run over all their
 * tiles (acc: one layer only). */
static int igemm(const lut_layer *const *layers, int32_t count, const float *x, int32_t n, float *const *y,
                 int32_t exact, int32_t *acc) {
    const lut_layer *w = layers[0];
    int32_t K = w->K, Kb = lut_act_block(K, w->G), nb = K / Kb, ng = K / w->G, nth = lut_pool_chunks();
    int32_t isa = lut_isa(), int8 = uses_int8(isa, exact);
    size_t q_bytes = align64((size_t)n * K * sizeof(int16_t)), ts_bytes = align64((size_t)n * nb * sizeof(float));
    size_t xs_bytes = align64((size_t)n * ng * sizeof(float)), per = 0;
    igemm_ctx c = {.w = layers, .y = y, .count = count, .x = x, .acc = acc, .n = n, .Kb = Kb, .isa = isa,
                   .exact = exact, .int8 = int8};
    for (int32_t l = 0; l < count; l++) {
        const lut_layer *wl = layers[l];
        size_t ncomp = (size_t)igemm_comps(wl, acc), nsc = wl->uniform ? 1 : (size_t)wl->P;
        size_t need = int8 ? align64((size_t)(K / LUT_CHUNK) * ncomp * LUT_IG_BYTES) +
                                 align64(((size_t)nb * nsc + (size_t)ng) * LUT_TILE * sizeof(float))
                           : align64((size_t)n * LUT_TILE * sizeof(float)) +
                                 align64((size_t)(Kb / LUT_CHUNK) * ncomp * LUT_IG_WORDS * sizeof(int16_t));
        per = need > per ? need : per;
        c.first[l + 1] = c.first[l] + (wl->M + LUT_TILE - 1) / LUT_TILE;
        c.offsets |= lut_has_offsets(wl);
    }
    char *base = lut_workspace(q_bytes + ts_bytes + xs_bytes + (size_t)nth * per + 64);
    if (!base)
        return LUT_ENOMEM;
    base = (char *)align64((uintptr_t)base); /* malloc gives 16-byte alignment; the + 64 above pays for this */
    c.q = (int16_t *)base;
    /* the int8 variant's activations (n K bytes) and sums (n K / Kb words) fit where the int16 ones go */
    c.q8 = (int8_t *)base;
    c.qs = (int32_t *)(base + (size_t)n * K);
    c.ts = (float *)(base + q_bytes);
    c.xs = (float *)(base + q_bytes + ts_bytes);
    c.scratch = base + q_bytes + ts_bytes + xs_bytes;
    c.per_chunk = per;
    lut_pool_run(igemm_quant, &c);
    lut_pool_run(igemm_tiles, &c);
    return LUT_OK;
}

/* Workspace grows to the largest call seen and is reused: no allocation per token. */
static void *ws;
static size_t ws_size;

void *lut_workspace(size_t need) {
    if (need > ws_size) {
        free(ws);
        ws = malloc(need);
        ws_size = ws ? need : 0;
    }
    return ws;
}

/* Layers checked, sharing K and G (so Kb and the group sums): their tables are built once. */
static int gemm_layers(const lut_layer *const *layers, int32_t count, const float *x, int32_t n, float *const *y,
                       int32_t exact, int32_t *acc) {
    const lut_layer *w = layers[0];
    pthread_mutex_lock(&lut_call_mu);
    if (n >= igemm_min_rows(lut_isa(), exact)) {
        int rc = igemm(layers, count, x, n, y, exact, acc);
        pthread_mutex_unlock(&lut_call_mu);
        return rc;
    }
    int32_t K = w->K, Kb = lut_act_block(K, w->G), ntab = exact ? 2 : 1;
    size_t tab_bytes = (size_t)n * ntab * K * 4, ts_bytes = (size_t)n * (K / Kb) * sizeof(float);
    size_t xs_bytes = (size_t)n * (K / w->G) * sizeof(float);
    size_t need = tab_bytes + ts_bytes + xs_bytes + 64;
    if (!lut_workspace(need)) {
        pthread_mutex_unlock(&lut_call_mu);
        return LUT_ENOMEM;
    }
    call_ctx c = {.count = count, .x = x, .n = n, .exact = exact, .isa = lut_isa()};
    for (int32_t l = 0; l < count; l++) {
        c.job[l] = (lut_job){.w = layers[l], .Kb = Kb, .ntab = ntab, .tab = ws, .y = y[l], .acc = acc,
                             .tscale = (const float *)((char *)ws + tab_bytes),
                             .xsum = (const float *)((char *)ws + tab_bytes + ts_bytes)};
        c.first[l + 1] = c.first[l] + (layers[l]->M + LUT_TILE - 1) / LUT_TILE;
    }
    lut_pool_run(build_tables, &c);
    lut_pool_run(run_tiles, &c);
    pthread_mutex_unlock(&lut_call_mu);
    return LUT_OK;
}

static int bad_layer(const lut_layer *w) {
    return !w || !w->planes || !w->scales || w->M < 1 || w->K < 32 || w->K % 32 || w->P < 1 || w->P > 8 ||
           w->G < 32 || w->K % w->G || (w->G != w->K && w->G > 256) || (w->uniform != 0 && w->uniform != 1) ||
           (w->scale8 != 0 && w->scale8 != 1) ||
           (w->int_grid != 0 && (w->int_grid != 1 || !w->uniform || w->offsets));
}

int lut_gemm(const lut_layer *w, const float *x, int32_t n, float *y, int32_t exact, int32_t *acc) {
    if (bad_layer(w) || !x || !y || n < 1 || (exact != 0 && exact != 1))
        return LUT_EINVAL;
    return gemm_layers(&w, 1, x, n, &y, exact, acc);
}

int lut_gemm_multi(const lut_layer *const *w, int32_t count, const float *x, int32_t n, float *const *y,
                   int32_t exact) {
    if (!w || !y || !x || count < 1 || count > LUT_FUSE_MAX || n < 1 || (exact != 0 && exact != 1))
        return LUT_EINVAL;
    for (int32_t l = 0; l < count; l++)
        if (bad_layer(w[l]) || !y[l] || w[l]->K != w[0]->K || w[l]->G != w[0]->G)
            return LUT_EINVAL;
    return gemm_layers(w, count, x, n, y, exact, NULL);
}
