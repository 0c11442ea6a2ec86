/* Dispatcher: validates a call, builds the per-token activation tables, and
 * runs the chosen ISA's tile kernel over row tiles on the thread pool.
 * Table construction is shared C compiled once, so every ISA path sees
 * byte-identical tables and must produce identical integer sums. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
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

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static int32_t cur_isa = -1;

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
    pthread_mutex_lock(&call_mu);
    cur_isa = isa;
    pthread_mutex_unlock(&call_mu);
    return LUT_OK;
}

/* The first call settles the ISA: LUTENGINE_ISA if set (validated by the
 * Python layer, which reports a clear error), else the best supported. */
int32_t lut_isa(void) {
    if (cur_isa < 0) {
        const char *env = getenv("LUTENGINE_ISA");
        cur_isa = best_isa();
        if (env)
            for (int32_t i = 0; i < LUT_ISA_COUNT; i++)
                if (!strcmp(env, isa_names[i]) && (lut_isa_supported() & (1 << i)))
                    cur_isa = i;
    }
    return cur_isa;
}

int lut_set_threads(int32_t n) {
    pthread_mutex_lock(&call_mu);
    int rc = lut_pool_resize(n);
    pthread_mutex_unlock(&call_mu);
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
 * entries 0..7 are their negations (idx and 15-idx have opposite signs). */
static void sums16(const float *x, float *t) {
    for (int idx = 8; idx < 16; idx++) {
        float v = x[3];
        v = (idx & 4) ? v + x[2] : v - x[2];
        v = (idx & 2) ? v + x[1] : v - x[1];
        v = (idx & 1) ? v + x[0] : v - x[0];
        t[idx] = v;
        t[15 - idx] = -v;
    }
}

/* Fast mode: one block of Kb activations -> int8 tables, scale = max|T| / 127. */
static float tables_fast(const float *x, int32_t Kb, int8_t *tab) {
    float t[LUT_TAB], maxabs = 0.0f;
    for (int32_t j = 0; j < Kb / 4; j++) {
        sums16(x + 4 * j, t);
        for (int i = 8; i < 16; i++)
            maxabs = fmaxf(maxabs, fabsf(t[i]));
    }
    float inv = maxabs > 0.0f ? 127.0f / maxabs : 0.0f;
    for (int32_t j = 0; j < Kb / 4; j++) {
        sums16(x + 4 * j, t);
        for (int i = 0; i < 16; i++) {
            float q = nearbyintf(t[i] * inv);
            tab[16 * j + i] = (int8_t)fminf(fmaxf(q, -127.0f), 127.0f);
        }
    }
    return maxabs / 127.0f;
}

/* Exact mode: activations to int8 with scale max|x| / 127; the integer sums
 * (|T| <= 508) split into signed bytes T = 256*hi + lo, lo in [-128,127]. */
static float tables_exact(const float *x, int32_t Kb, int8_t *lo, int8_t *hi) {
    float maxabs = 0.0f;
    for (int32_t k = 0; k < Kb; k++)
        maxabs = fmaxf(maxabs, fabsf(x[k]));
    float inv = maxabs > 0.0f ? 127.0f / maxabs : 0.0f;
    for (int32_t j = 0; j < Kb / 4; j++) {
        int32_t q[4];
        for (int i = 0; i < 4; i++)
            q[i] = (int32_t)fminf(fmaxf(nearbyintf(x[4 * j + i] * inv), -127.0f), 127.0f);
        for (int idx = 0; idx < 16; idx++) {
            int32_t v = 0;
            for (int i = 0; i < 4; i++)
                v += (idx >> i & 1) ? q[i] : -q[i];
            int32_t l = ((v + 128) & 255) - 128;
            lo[16 * j + idx] = (int8_t)l;
            hi[16 * j + idx] = (int8_t)((v - l) / 256);
        }
    }
    return maxabs / 127.0f;
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
    for (int64_t u = (int64_t)c->n * ng * ith / nth; u < (int64_t)c->n * ng * (ith + 1) / nth; u++) {
        const float *x = c->x + u * G; /* groups tile each token's row exactly: K = ng * G */
        float s = 0.0f;
        for (int32_t k = 0; k < G; k++)
            s += x[k];
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

int lut_gemm(const lut_layer *w, const float *x, int32_t n, float *y, int32_t exact, int32_t *acc) {
    if (!w || !x || !y || !w->planes || !w->scales || n < 1 || w->M < 1 || w->K < 32 || w->K % 32 || w->P < 1 ||
        w->P > 8 || w->G < 32 || w->K % w->G || (w->G != w->K && w->G > 256) || (exact != 0 && exact != 1))
        return LUT_EINVAL;
    int32_t K = w->K, Kb = lut_act_block(K, w->G), ntab = exact ? 2 : 1;
    size_t tab_bytes = (size_t)n * ntab * K * 4, ts_bytes = (size_t)n * (K / Kb) * sizeof(float);
    size_t xs_bytes = (size_t)n * (K / w->G) * sizeof(float);
    size_t need = tab_bytes + ts_bytes + xs_bytes + 64;
    pthread_mutex_lock(&call_mu);
    if (need > ws_size) {
        free(ws);
        ws = malloc(need);
        ws_size = ws ? need : 0;
        if (!ws) {
            pthread_mutex_unlock(&call_mu);
            return LUT_ENOMEM;
        }
    }
    call_ctx c = {
        .job = {.w = w, .Kb = Kb, .ntab = ntab, .tab = ws, .y = y, .acc = acc},
        .x = x, .n = n, .exact = exact, .isa = lut_isa(), .ntiles = (w->M + LUT_TILE - 1) / LUT_TILE,
    };
    c.job.tscale = (const float *)((char *)ws + tab_bytes);
    c.job.xsum = (const float *)((char *)ws + tab_bytes + ts_bytes);
    lut_pool_run(build_tables, &c);
    lut_pool_run(run_tiles, &c);
    pthread_mutex_unlock(&call_mu);
    return LUT_OK;
}
