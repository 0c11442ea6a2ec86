/* Dispatcher: validates a call, builds the per-token activation tables, and
 * runs the chosen ISA's tile kernel over row tiles on the thread pool.
 * Table construction is shared C compiled once, so every ISA path sees
 * byte-identical tables and must produce identical integer sums. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "lut_internal.h"

static const lut_tile_fn tile_fns[LUT_ISA_COUNT] = {
    [LUT_ISA_SCALAR] = lut_tile_scalar,
#if defined(__x86_64__) || defined(__i386__)
    [LUT_ISA_AVX2] = lut_tile_avx2,
    [LUT_ISA_AVX512] = lut_tile_avx512,
#endif
#if defined(__aarch64__)
    [LUT_ISA_NEON] = lut_tile_neon,
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
 * For 4 activations x0..x3, entry idx holds sum_i (bit i of idx ? +x_i : -x_i).
 * Entries 8..15 are computed as ((x3 +- x2) +- x1) +- x0 in float32 and
 * entries 0..7 are their negations (idx and 15-idx have opposite signs).
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
#elif (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define TABLE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TABLE_CLONES
#endif

static inline int32_t round_even(float v) { return (int32_t)((v + 12582912.0f) - 12582912.0f); }

/* Fast mode: one block of Kb <= 256 activations -> int8 tables, scale = max|T| / 127.
 * |T * 127/max|T|| <= 127 up to one rounding, so entries fit int8 without a clamp. */
TABLE_CLONES static float tables_fast(const float *x, int32_t Kb, int8_t *tab) {
    float t[256 / 4 * 16];
    uint32_t maxbits = 0;
    for (int32_t j = 0; j < Kb / 4; j++) {
        const float *a = x + 4 * j;
        float *o = t + 16 * j;
        float m2 = a[3] - a[2], p2 = a[3] + a[2];
        float m2m1 = m2 - a[1], m2p1 = m2 + a[1], p2m1 = p2 - a[1], p2p1 = p2 + a[1];
        o[8] = m2m1 - a[0], o[9] = m2m1 + a[0], o[10] = m2p1 - a[0], o[11] = m2p1 + a[0];
        o[12] = p2m1 - a[0], o[13] = p2m1 + a[0], o[14] = p2p1 - a[0], o[15] = p2p1 + a[0];
        for (int i = 0; i < 8; i++)
            o[i] = -o[15 - i];
    }
    for (int32_t i = 0; i < 4 * Kb; i++) {
        uint32_t u = abs_bits(t[i]);
        maxbits = u > maxbits ? u : maxbits;
    }
    float maxabs = bits_float(maxbits), inv = maxabs > 0.0f ? 127.0f / maxabs : 0.0f;
    for (int32_t i = 0; i < 4 * Kb; i++)
        tab[i] = (int8_t)round_even(t[i] * inv);
    return maxabs / 127.0f;
}

/* Exact mode: activations to 12-bit integers with scale max|x| / LUT_EXACT_Q; the
 * integer sums (|T| <= 4 * 2047 = 8188) split into signed bytes T = 256*hi + lo,
 * lo in [-128,127], hi in [-32,32]. */
TABLE_CLONES static float tables_exact(const float *x, int32_t Kb, int8_t *lo, int8_t *hi) {
    uint32_t maxbits = 0;
    for (int32_t k = 0; k < Kb; k++) {
        uint32_t u = abs_bits(x[k]);
        maxbits = u > maxbits ? u : maxbits;
    }
    float maxabs = bits_float(maxbits), inv = maxabs > 0.0f ? (float)LUT_EXACT_Q / maxabs : 0.0f;
    int32_t q[256];
    for (int32_t k = 0; k < Kb; k++)
        q[k] = round_even(x[k] * inv);
    for (int32_t j = 0; j < Kb / 4; j++)
        for (int idx = 0; idx < 16; idx++) {
            int32_t v = 0;
            for (int i = 0; i < 4; i++)
                v += (idx >> i & 1) ? q[4 * j + i] : -q[4 * j + i];
            int32_t l = ((v + 128) & 255) - 128;
            lo[16 * j + idx] = (int8_t)l;
            hi[16 * j + idx] = (int8_t)((v - l) / 256);
        }
    return maxabs / (float)LUT_EXACT_Q;
}

typedef struct {
    lut_job job;
    const float *x;
    int32_t n, exact, isa;
    int32_t ntiles;
} call_ctx;

static void build_tables(void *arg, int32_t ith, int32_t nth) {
    call_ctx *c = arg;
    const lut_job *j = &c->job;
    int32_t K = j->w->K, G = j->w->G, nb = K / j->Kb, ng = K / G;
    int64_t units = (int64_t)c->n * nb, lo = units * ith / nth, hi = units * (ith + 1) / nth;
    for (int64_t u = lo; u < hi; u++) {
        int32_t tok = (int32_t)(u / nb), b = (int32_t)(u % nb);
        const float *x = c->x + (int64_t)tok * K + (int64_t)b * j->Kb;
        int8_t *tab = (int8_t *)j->tab + tok * lut_tab_stride(j) + (int64_t)b * j->Kb * 4;
        float *ts = (float *)j->tscale + (int64_t)tok * nb + b;
        *ts = c->exact ? tables_exact(x, j->Kb, tab, tab + (int64_t)K * 4) : tables_fast(x, j->Kb, tab);
    }
    if (!lut_has_offsets(j->w))
        return;
    for (int64_t u = (int64_t)c->n * ng * ith / nth; u < (int64_t)c->n * ng * (ith + 1) / nth; u++) {
        const float *x = c->x + u * G; /* groups tile each token's row exactly: K = ng * G */
        float part[8] = {0}, s = 0.0f; /* 8 partial sums: a vector add chain, not a scalar one */
        for (int32_t k = 0; k < G; k += 8)
            for (int i = 0; i < 8; i++)
                part[i] += x[k + i];
        for (int i = 0; i < 8; i++)
            s += part[i];
        ((float *)j->xsum)[u] = s;
    }
}

static void run_tiles(void *arg, int32_t ith, int32_t nth) {
    call_ctx *c = arg;
    lut_tile_fn fn = tile_fns[c->isa];
    int32_t lo = (int32_t)((int64_t)c->ntiles * ith / nth), hi = (int32_t)((int64_t)c->ntiles * (ith + 1) / nth);
    for (int32_t t = lo; t < hi; t++)
        for (int32_t tok = 0; tok < c->n; tok++)
            fn(&c->job, t, tok);
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

int lut_gemm(const lut_layer *w, const float *x, int32_t n, float *y, int32_t exact, int32_t *acc) {
    if (!w || !x || !y || !w->planes || !w->scales || n < 1 || w->M < 1 || w->K < 32 || w->K % 32 || w->P < 1 ||
        w->P > 8 || w->G < 32 || w->K % w->G || (w->G != w->K && w->G > 256) ||
        (w->uniform != 0 && w->uniform != 1) || (w->scale8 != 0 && w->scale8 != 1) || (exact != 0 && exact != 1) ||
        (w->int_grid != 0 && (w->int_grid != 1 || !w->uniform || w->offsets)))
        return LUT_EINVAL;
    int32_t K = w->K, Kb = lut_act_block(K, w->G), ntab = exact ? 2 : 1;
    size_t tab_bytes = (size_t)n * ntab * K * 4, ts_bytes = (size_t)n * (K / Kb) * sizeof(float);
    size_t xs_bytes = (size_t)n * (K / w->G) * sizeof(float);
    size_t need = tab_bytes + ts_bytes + xs_bytes + 64;
    pthread_mutex_lock(&lut_call_mu);
    if (!lut_workspace(need)) {
        pthread_mutex_unlock(&lut_call_mu);
        return LUT_ENOMEM;
    }
    call_ctx c = {
        .job = {.w = w, .Kb = Kb, .ntab = ntab, .tab = ws, .y = y, .acc = acc},
        .x = x, .n = n, .exact = exact, .isa = lut_isa(), .ntiles = (w->M + LUT_TILE - 1) / LUT_TILE,
    };
    c.job.tscale = (const float *)((char *)ws + tab_bytes);
    c.job.xsum = (const float *)((char *)ws + tab_bytes + ts_bytes);
    lut_pool_run(build_tables, &c);
    lut_pool_run(run_tiles, &c);
    pthread_mutex_unlock(&lut_call_mu);
    return LUT_OK;
}
