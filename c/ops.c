/* The non-matmul work of one decode step (one token): RMSNorm with the
 * residual add, RoPE + KV-cache write + attention, SiLU gating (and gemma3's GELU
 * gating and RMSNorm of each q and k head). In numpy these
 * are dozens of small calls per layer, which cost more than the layer's
 * matmuls; here they are three calls per layer (four in a model whose MLP
 * output is rotated: lut_rotate_rows).
 *
 * Plain C (GNU vector types for the dot products), written so the compiler
 * vectorises it without fast-math: dot products keep 8 partial sums in one
 * vector, attention walks 4 cache rows at a time (independent add chains
 * instead of one latency-bound chain; a float16 or int8 cache converts those 4
 * rows to floats once for all the query heads of their kv head), and exp is a
 * branch-free polynomial instead of a libm call. An AVX2 clone only widens the vectors (no FMA
 * contraction: -ffp-contract=off), so both clones give the same floats. */
#include <math.h>
#include <string.h>
#include "lut_internal.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define OPS_X86 1
#define OPS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OPS_CLONES
#endif
/* Helpers are inlined so that each clone compiles them for its own target. */
#define INLINE static inline __attribute__((always_inline))

#define LANES 8
#define ROWS LUT_ATTN_ROWS

typedef float v8f __attribute__((vector_size(LANES * sizeof(float))));

/* Vectors pass by pointer: by value they would change the ABI between the clones (-Wpsabi). */
INLINE void load8(v8f *v, const float *p) { memcpy(v, p, sizeof *v); }

/* The tail's sum, then the 8 lanes as a tree: short add chains, one order everywhere. */
INLINE float lanes_sum(const v8f *a, float tail) {
    const v8f x = *a;
    return tail + (((x[0] + x[4]) + (x[2] + x[6])) + ((x[1] + x[5]) + (x[3] + x[7])));
}

INLINE float dot(const float *a, const float *b, int32_t n) {
    v8f acc = {0}, va, vb;
    float tail = 0.0f;
    int32_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        load8(&va, a + i);
        load8(&vb, b + i);
        acc += va * vb;
    }
    for (; i < n; i++)
        tail += a[i] * b[i];
    return lanes_sum(&acc, tail);
}

/* s[r] = dot(q, k + r*stride, n) for ROWS rows, each summed in dot's order. */
INLINE void dot_rows(const float *q, const float *k, int64_t stride, int32_t n, float *s) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, qv, k0, k1, k2, k3;
    int32_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        load8(&qv, q + i);
        load8(&k0, k + i);
        load8(&k1, k + stride + i);
        load8(&k2, k + 2 * stride + i);
        load8(&k3, k + 3 * stride + i);
        a0 += qv * k0;
        a1 += qv * k1;
        a2 += qv * k2;
        a3 += qv * k3;
    }
    float t[ROWS] = {0};
    for (; i < n; i++)
        for (int r = 0; r < ROWS; r++)
            t[r] += q[i] * k[r * stride + i];
    s[0] = lanes_sum(&a0, t[0]);
    s[1] = lanes_sum(&a1, t[1]);
    s[2] = lanes_sum(&a2, t[2]);
    s[3] = lanes_sum(&a3, t[3]);
}

/* exp(x) to about 2 ulp (Cephes expf polynomial, Cody-Waite reduction).
 * |x| is clamped to 87 so 2^n stays a normal float: exp(-87) ~ 1.6e-38 stands
 * in for 0, which no softmax or sigmoid here can tell apart. The clamp works
 * on the bits: a float compare-and-select would not vectorise without
 * -fno-trapping-math. NaN passes through. */
INLINE float exp_poly(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t a = u & 0x7fffffffu, lim = 0x42ae0000u; /* 87.0f */
    u = (u & 0x80000000u) | (a < lim || a > 0x7f800000u ? a : lim);
    memcpy(&x, &u, sizeof x);
    float t = x * 1.44269504088896341f + 12582912.0f; /* round(x / ln2) in the low mantissa bits */
    float n = t - 12582912.0f;
    float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* n in [-126, 126] after the clamp */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

OPS_CLONES void lut_add_rmsnorm(float *x, const float *delta, const float *w, int32_t n, float eps, float *y) {
    if (delta)
        for (int32_t i = 0; i < n; i++)
            x[i] += delta[i];
    float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int32_t i = 0; i < n; i++)
        y[i] = w[i] * (x[i] * r);
}

/* HF rotate-half: the two halves of each head are the real and imaginary parts. */
INLINE void rope(float *x, int32_t heads, int32_t d, const float *cos, const float *sin) {
    int32_t h2 = d / 2;
    for (int32_t h = 0; h < heads; h++) {
        float *a = x + (int64_t)h * d, *b = a + h2;
        for (int32_t i = 0; i < h2; i++) {
            float x1 = a[i], x2 = b[i];
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

INLINE void add_bias(float *x, const float *bias, int32_t n) {
    if (bias)
        for (int32_t i = 0; i < n; i++)
            x[i] += bias[i];
}

/* exp(s - max) in place; returns the sum, so the caller scales the output once instead of T scores. */
INLINE float softmax_unnormalised(float *s, int32_t T) {
    float m = s[0], sum = 0.0f;
    for (int32_t t = 1; t < T; t++)
        m = s[t] > m ? s[t] : m;
    for (int32_t t = 0; t < T; t++)
        s[t] = exp_poly(s[t] - m);
    for (int32_t t = 0; t < T; t++)
        sum += s[t];
    return sum;
}

/* Half-precision bits to float, exactly and without subnormal arithmetic (slow on
 * x86): the 15 magnitude bits shifted into a float's place and rebiased; infinities
 * and NaNs take the top exponent (a NaN comes out quiet, as from F16C's vcvtph2ps),
 * subnormal halves get an implicit one that is then subtracted (an exact difference). */
INLINE float half_to_float(uint16_t h) {
    const uint32_t mag = (uint32_t)(h & 0x7fffu) << 13, exp = mag & 0x0f800000u;
    uint32_t u = mag + (112u << 23), sub = u + (1u << 23), two_m14 = 113u << 23;
    float f, fs, m14;
    memcpy(&fs, &sub, sizeof fs);
    memcpy(&m14, &two_m14, sizeof m14);
    fs -= m14;
    memcpy(&sub, &fs, sizeof sub);
    /* masks rather than ?: which GCC leaves as branches here, and branches do not vectorise */
    const uint32_t special = 0u - (uint32_t)(exp == 0x0f800000u), subnormal = 0u - (uint32_t)(exp == 0);
    const uint32_t nan = special & (0u - (uint32_t)((mag & 0x007fe000u) != 0));
    u += (112u << 23) & special;
    u |= 0x00400000u & nan;
    u = (u & ~subnormal) | (sub & subnormal);
    u |= (uint32_t)(h & 0x8000u) << 16;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Float to half bits, rounded to nearest even as numpy's astype(float16) does,
 * so the prompt path (numpy) and this one store the same cache. Normal halves
 * round on the bits (the carry may ripple into the exponent, up to infinity);
 * subnormal ones by a float add that leaves the value in the low mantissa bits;
 * NaN stays a quiet NaN. */
INLINE uint16_t float_to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu, h;
    if (a > 0x7f800000u) {
        h = 0x7e00u;
    } else if (a >= 0x477ff000u) { /* 65520 and above round to infinity */
        h = 0x7c00u;
    } else if (a >= 0x38800000u) { /* 2^-14, the smallest normal half */
        h = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    } else {
        float x, half = 0.5f;
        memcpy(&x, &a, sizeof x);
        x += half; /* 0.5 + |f|: one ulp of 0.5 is 2^-24, the half subnormal step */
        memcpy(&h, &x, sizeof h);
        h -= 0x3f000000u;
    }
    return (uint16_t)(sign | h);
}

/* n halves to floats. Under the x86 ISAs of the kernels (lut_isa; lut.c's AVX2 requires
 * F16C) 8 at a time in hardware: an attention step over 1025 positions of SmolLM2's shape
 * takes 102 us so instead of 133 us (float32: 80 us). Both are exact and quiet NaNs alike,
 * so they give the same floats; lut_set_isa(scalar) runs the portable one. */
#ifdef OPS_X86
__attribute__((target("avx,f16c"))) static void halves_f16c(float *o, const uint16_t *h, int32_t n) {
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(h + i))));
    for (; i < n; i++)
        o[i] = half_to_float(h[i]);
}
#endif

INLINE int use_f16c(void) {
#ifdef OPS_X86
    const int32_t isa = lut_isa();
    return isa == LUT_ISA_AVX2 || isa == LUT_ISA_AVX512;
#else
    return 0;
#endif
}

INLINE void halves(float *o, const uint16_t *h, int32_t n, int f16c) {
#ifdef OPS_X86
    if (f16c) {
        halves_f16c(o, h, n);
        return;
    }
#endif
    (void)f16c;
    for (int32_t i = 0; i < n; i++)
        o[i] = half_to_float(h[i]);
}

/* Round to nearest even for |x| < 2^22 (the quantised values are within 127). */
INLINE float round_even(float x) {
    const float big = 12582912.0f; /* 1.5 * 2^23 */
    return (x + big) - big;
}

/* The cache row of one position: kv_heads heads of d values, stored in the cache's type.
 * q8: symmetric int8 per (position, kv head) with a float32 scale, max|x| / 127. */
INLINE void store_row(int32_t type, void *cache, float *scale, int64_t pos, const float *x, int32_t kv_heads,
                      int32_t d) {
    const int64_t kv = (int64_t)kv_heads * d;
    if (type == LUT_KV_F32) {
        memcpy((float *)cache + pos * kv, x, (size_t)kv * sizeof(float));
    } else if (type == LUT_KV_F16) {
        uint16_t *row = (uint16_t *)cache + pos * kv;
        for (int64_t i = 0; i < kv; i++)
            row[i] = float_to_half(x[i]);
    } else {
        int8_t *row = (int8_t *)cache + pos * kv;
        for (int32_t g = 0; g < kv_heads; g++) {
            const float *xg = x + (int64_t)g * d;
            float m = 0.0f;
            for (int32_t i = 0; i < d; i++)
                m = fabsf(xg[i]) > m ? fabsf(xg[i]) : m;
            const float s = m / 127.0f;
            scale[pos * kv_heads + g] = s;
            for (int32_t i = 0; i < d; i++) {
                /* NaN fails both compares and becomes -127: never an out-of-range conversion */
                float r = s > 0.0f ? round_even(xg[i] / s) : 0.0f;
                r = r >= -127.0f ? r : -127.0f;
                r = r <= 127.0f ? r : 127.0f;
                row[(int64_t)g * d + i] = (int8_t)r;
            }
        }
    }
}

/* n (<= ROWS) rows t0.. of kv head g as floats: for float32 the cache itself (stride kv),
 * for the other types converted into buf (stride d). Returns the first row; *stride is set. */
INLINE const float *load_rows(int32_t type, const void *cache, const float *scale, int64_t t0, int32_t n,
                              int32_t g, int32_t kv_heads, int32_t d, int f16c, float *buf, int64_t *stride) {
    const int64_t kv = (int64_t)kv_heads * d, first = t0 * kv + (int64_t)g * d;
    if (type == LUT_KV_F32) {
        *stride = kv;
        return (const float *)cache + first;
    }
    *stride = d;
    for (int32_t r = 0; r < n; r++) {
        float *o = buf + (int64_t)r * d;
        if (type == LUT_KV_F16) {
            halves(o, (const uint16_t *)cache + first + r * kv, d, f16c);
        } else {
            const int8_t *c = (const int8_t *)cache + first + r * kv;
            const float s = scale[(t0 + r) * kv_heads + g];
            for (int32_t i = 0; i < d; i++)
                o[i] = (float)c[i] * s;
        }
    }
    return buf;
}

/* The query heads h0 .. h0+rep-1 (q at q + h0 * d) against n <= ROWS key rows from kr
 * (row stride `stride`): their scores go to s + h * n_keys (s at the rows' first key). */
INLINE void score_rows(const float *q, int32_t rep, int32_t d, const float *kr, int64_t stride, int32_t n,
                       float *s, int32_t n_keys) {
    for (int32_t h = 0; h < rep; h++) {
        const float *qh = q + (int64_t)h * d;
        float *sh = s + (int64_t)h * n_keys;
        if (n == ROWS)
            dot_rows(qh, kr, stride, d, sh);
        else
            for (int32_t r = 0; r < n; r++)
                sh[r] = dot(qh, kr + r * stride, d);
    }
}

/* Scale the rep heads' n_keys scores, exp them; inv[h] = 1 / their sum, out zeroed. */
INLINE void softmax_heads(float *s, int32_t rep, int32_t n_keys, float scale, float *inv, float *out, int32_t d) {
    for (int32_t h = 0; h < rep; h++) {
        float *sh = s + (int64_t)h * n_keys;
        for (int32_t t = 0; t < n_keys; t++)
            sh[t] *= scale;
        inv[h] = 1.0f / softmax_unnormalised(sh, n_keys);
        memset(out + (int64_t)h * d, 0, (size_t)d * sizeof(float));
    }
}

/* out (rep heads of d) += their weights s (as score_rows lays them out) times n <= ROWS value rows. */
INLINE void weigh_rows(const float *s, int32_t rep, int32_t n_keys, const float *vr, int64_t stride, int32_t n,
                       int32_t d, float *out) {
    for (int32_t h = 0; h < rep; h++) {
        const float *sh = s + (int64_t)h * n_keys;
        float *o = out + (int64_t)h * d;
        if (n == ROWS) {
            const float *v0 = vr, *v1 = v0 + stride, *v2 = v1 + stride, *v3 = v2 + stride;
            for (int32_t i = 0; i < d; i++)
                o[i] += ((sh[0] * v0[i] + sh[1] * v1[i]) + sh[2] * v2[i]) + sh[3] * v3[i];
        } else {
            for (int32_t r = 0; r < n; r++)
                for (int32_t i = 0; i < d; i++)
                    o[i] += sh[r] * vr[r * stride + i];
        }
    }
}

INLINE void scale_heads(float *out, int32_t rep, int32_t d, const float *inv) {
    for (int32_t h = 0; h < rep; h++)
        for (int32_t i = 0; i < d; i++)
            out[(int64_t)h * d + i] *= inv[h];
}

/* Keys t0..T-1 of the query at position T-1: the last `window` positions, or all (window 0). */
INLINE int32_t first_key(int32_t T, int32_t window) { return window > 0 && T > window ? T - window : 0; }

/* Per kv head, each block of ROWS cache rows is converted once and serves all the
 * query heads of its group; every (head, position) is summed in the same order
 * whatever the type, so float32 gives the floats it gave before the types. */
OPS_CLONES void lut_attention_step(float *q, float *k, float *v, const float *q_bias, const float *k_bias,
                                   const float *v_bias, const float *cos, const float *sin, int32_t kv_type,
                                   void *k_cache, void *v_cache, float *k_scale, float *v_scale, int32_t pos,
                                   int32_t heads, int32_t kv_heads, int32_t d, float query_scale, int32_t window,
                                   float *scores, float *work, float *out) {
    const int32_t T = pos + 1, t0 = first_key(T, window), n_keys = T - t0; /* scores of head h at h*n_keys */
    int32_t kv = kv_heads * d, rep = heads / kv_heads;
    const float *c = cos + (int64_t)pos * (d / 2), *sn = sin + (int64_t)pos * (d / 2);
    add_bias(q, q_bias, heads * d);
    add_bias(k, k_bias, kv);
    add_bias(v, v_bias, kv);
    rope(q, heads, d, c, sn);
    rope(k, kv_heads, d, c, sn);
    store_row(kv_type, k_cache, k_scale, pos, k, kv_heads, d);
    store_row(kv_type, v_cache, v_scale, pos, v, kv_heads, d);
    const float scale = 1.0f / sqrtf(query_scale);
    float *rows = work, *inv = work + (int64_t)ROWS * d;
    const int f16c = kv_type == LUT_KV_F16 && use_f16c();
    int64_t stride;
    for (int32_t g = 0; g < kv_heads; g++) {
        const int32_t h0 = g * rep;
        float *sg = scores + (int64_t)h0 * n_keys, *og = out + (int64_t)h0 * d;
        for (int32_t t = t0; t < T; t += ROWS) {
            const int32_t n = T - t < ROWS ? T - t : ROWS;
            const float *kr = load_rows(kv_type, k_cache, k_scale, t, n, g, kv_heads, d, f16c, rows, &stride);
            score_rows(q + (int64_t)h0 * d, rep, d, kr, stride, n, sg + (t - t0), n_keys);
        }
        softmax_heads(sg, rep, n_keys, scale, inv, og, d);
        for (int32_t t = t0; t < T; t += ROWS) {
            const int32_t n = T - t < ROWS ? T - t : ROWS;
            const float *vr = load_rows(kv_type, v_cache, v_scale, t, n, g, kv_heads, d, f16c, rows, &stride);
            weigh_rows(sg + (t - t0), rep, n_keys, vr, stride, n, d, og);
        }
        scale_heads(og, rep, d, inv);
    }
}

/* A prompt's attention: for each query, the decode step's sums in its order (score_rows,
 * softmax_heads, weigh_rows over the same blocks of ROWS keys from its first key), so a
 * token gets the same output bit for bit whether it came in a prompt or alone. Work
 * units are (query, kv head); the pool's chunk c takes queries c, c + nchunks, ..., so
 * the longer, later rows of a causal prompt spread over every chunk. */
/* Floats of one chunk's scratch: scores of rep heads over at most `positions` keys, and rep inverses. */
static int64_t chunk_scratch(int32_t positions, int32_t heads, int32_t kv_heads) {
    return (int64_t)(heads / kv_heads) * ((int64_t)positions + 1);
}

typedef struct {
    const float *q, *k, *v;
    float *out, *scratch;
    int32_t pos, n, heads, kv_heads, d, window;
    float scale;
} prompt_attn;

OPS_CLONES static void prompt_chunk(void *arg, int32_t chunk, int32_t nchunks) {
    const prompt_attn *a = arg;
    const int32_t rep = a->heads / a->kv_heads, d = a->d;
    const int64_t kv = (int64_t)a->kv_heads * d, hd = (int64_t)a->heads * d;
    float *s = a->scratch + (int64_t)chunk * chunk_scratch(a->pos + a->n, a->heads, a->kv_heads);
    float *inv = s + (int64_t)rep * (a->pos + a->n);
    for (int32_t i = chunk; i < a->n; i += nchunks) {
        const int32_t T = a->pos + i + 1, t0 = first_key(T, a->window), n_keys = T - t0;
        for (int32_t g = 0; g < a->kv_heads; g++) {
            const float *qg = a->q + i * hd + (int64_t)g * rep * d, *kg = a->k + (int64_t)g * d, *vg = a->v + (int64_t)g * d;
            float *og = a->out + i * hd + (int64_t)g * rep * d;
            for (int32_t t = t0; t < T; t += ROWS)
                score_rows(qg, rep, d, kg + t * kv, kv, T - t < ROWS ? T - t : ROWS, s + (t - t0), n_keys);
            softmax_heads(s, rep, n_keys, a->scale, inv, og, d);
            for (int32_t t = t0; t < T; t += ROWS)
                weigh_rows(s + (t - t0), rep, n_keys, vg + t * kv, kv, T - t < ROWS ? T - t : ROWS, d, og);
            scale_heads(og, rep, d, inv);
        }
    }
}

int64_t lut_attention_prompt_scratch(int32_t positions, int32_t heads, int32_t kv_heads) {
    if (positions < 1 || kv_heads < 1 || heads < kv_heads)
        return 0;
    pthread_mutex_lock(&lut_call_mu);
    int64_t n = lut_pool_chunks() * chunk_scratch(positions, heads, kv_heads);
    pthread_mutex_unlock(&lut_call_mu);
    return n;
}

int lut_attention_prompt(const float *q, const float *k, const float *v, int32_t pos, int32_t n, int32_t heads,
                         int32_t kv_heads, int32_t d, float query_scale, int32_t window, float *scratch,
                         int64_t scratch_floats, float *out) {
    if (!q || !k || !v || !out || !scratch || pos < 0 || n < 1 || kv_heads < 1 || heads % kv_heads || d < 1 ||
        window < 0 || !(query_scale > 0.0f))
        return LUT_EINVAL;
    pthread_mutex_lock(&lut_call_mu);
    int32_t chunks = lut_pool_chunks();
    int rc = LUT_EINVAL;
    if (scratch_floats >= chunks * chunk_scratch(pos + n, heads, kv_heads)) {
        prompt_attn a = {.q = q, .k = k, .v = v, .out = out, .scratch = scratch, .pos = pos, .n = n, .heads = heads,
                         .kv_heads = kv_heads, .d = d, .window = window, .scale = 1.0f / sqrtf(query_scale)};
        lut_pool_run(prompt_chunk, &a);
        rc = LUT_OK;
    }
    pthread_mutex_unlock(&lut_call_mu);
    return rc;
}

OPS_CLONES void lut_silu_mul(float *g, const float *u, int32_t n) {
    for (int32_t i = 0; i < n; i++)
        g[i] = g[i] / (1.0f + exp_poly(-g[i])) * u[i];
}

/* GELU's tanh approximation, 0.5 x (1 + tanh(z)), is x sigmoid(2z): the same branch-free
 * exp as silu, no libm call. exp_poly's clamp at |87| leaves the sigmoid 0 or 1 there. */
OPS_CLONES void lut_gelu_tanh_mul(float *g, const float *u, int32_t n) {
    const float c = 1.5957691216057308f; /* 2 sqrt(2 / pi) */
    for (int32_t i = 0; i < n; i++) {
        const float x = g[i];
        g[i] = x / (1.0f + exp_poly(-c * (x + 0.044715f * (x * x * x)))) * u[i];
    }
}

OPS_CLONES void lut_head_rmsnorm(float *x, int32_t heads, int32_t d, const float *w, float eps) {
    for (int32_t h = 0; h < heads; h++) {
        float *xh = x + (int64_t)h * d;
        const float r = 1.0f / sqrtf(dot(xh, xh, d) / (float)d + eps);
        for (int32_t i = 0; i < d; i++)
            xh[i] = w[i] * (xh[i] * r);
    }
}

/* An 8-point Walsh-Hadamard transform in registers: the first three stages of n's. */
INLINE void hadamard8(float *c) {
    const float a0 = c[0] + c[1], a1 = c[0] - c[1], a2 = c[2] + c[3], a3 = c[2] - c[3];
    const float a4 = c[4] + c[5], a5 = c[4] - c[5], a6 = c[6] + c[7], a7 = c[6] - c[7];
    const float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
    const float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
    c[0] = b0 + b4;
    c[1] = b1 + b5;
    c[2] = b2 + b6;
    c[3] = b3 + b7;
    c[4] = b0 - b4;
    c[5] = b1 - b5;
    c[6] = b2 - b6;
    c[7] = b3 - b7;
}

/* The unnormalised Walsh-Hadamard transform of c[0..n) in place (n a power of two): stage h
 * replaces each pair (c[i], c[i+h]) by (sum, difference). Stages of h >= 8 go 8 lanes at a time. */
INLINE void hadamard(float *c, int32_t n) {
    int32_t h = 1;
    if (n >= 8) {
        for (int32_t s = 0; s < n; s += 8)
            hadamard8(c + s);
        h = 8;
    }
    for (; h < n; h *= 2)
        for (int32_t s = 0; s < n; s += 2 * h) {
            if (h >= LANES) {
                for (int32_t i = s; i < s + h; i += LANES) {
                    v8f p, q, sum, diff;
                    load8(&p, c + i);
                    load8(&q, c + i + h);
                    sum = p + q;
                    diff = p - q;
                    memcpy(c + i, &sum, sizeof sum);
                    memcpy(c + i + h, &diff, sizeof diff);
                }
                continue;
            }
            for (int32_t i = s; i < s + h; i++) {
                const float p = c[i], q = c[i + h];
                c[i] = p + q;
                c[i + h] = p - q;
            }
        }
}

/* Rows of a*n floats (n a power of two) each become R x: signs, then a
 * Walsh-Hadamard transform of each run of n, then the a runs mixed by the
 * a x a matrix `mix` (scaled by 1/sqrt(n), which makes R orthogonal).
 * O(a*n*(log n + a)) per row instead of a dense product's (a*n)^2. */
OPS_CLONES void lut_rotate_rows(float *x, int64_t rows, int32_t a, int32_t n, const float *signs,
                                const float *mix, float *tmp) {
    const int64_t F = (int64_t)a * n;
    const float norm = 1.0f / sqrtf((float)n);
    for (int64_t r = 0; r < rows; r++) {
        float *v = x + r * F;
        for (int64_t i = 0; i < F; i++)
            v[i] *= signs[i];
        for (int32_t j = 0; j < a; j++)
            hadamard(v + (int64_t)j * n, n);
        if (a == 1) {
            const float m = mix[0] * norm;
            for (int32_t p = 0; p < n; p++)
                v[p] *= m;
            continue;
        }
        for (int32_t i = 0; i < a; i++) {
            float *o = tmp + (int64_t)i * n;
            memset(o, 0, (size_t)n * sizeof(float));
            for (int32_t j = 0; j < a; j++) {
                const float m = mix[(int64_t)i * a + j] * norm;
                const float *c = v + (int64_t)j * n;
                for (int32_t p = 0; p < n; p++)
                    o[p] += m * c[p];
            }
        }
        memcpy(v, tmp, (size_t)F * sizeof(float));
    }
}
