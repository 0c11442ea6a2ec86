/* The non-matmul work of one decode step (one token): RMSNorm with the
 * residual add, RoPE + KV-cache write + attention, SiLU gating. In numpy these
 * are dozens of small calls per layer, which cost more than the layer's
 * matmuls; here they are three calls per layer (four in a model whose MLP
 * output is rotated: lut_rotate_rows).
 *
 * Plain C (GNU vector types for the dot products), written so the compiler
 * vectorises it without fast-math: dot products keep 8 partial sums in one
 * vector, attention walks 4 cache rows at a time (independent add chains
 * instead of one latency-bound chain), and exp is a branch-free polynomial
 * instead of a libm call. An AVX2 clone only widens the vectors (no FMA
 * contraction: -ffp-contract=off), so both clones give the same floats. */
#include <math.h>
#include <string.h>
#include "lut.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define OPS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OPS_CLONES
#endif
/* Helpers are inlined so that each clone compiles them for its own target. */
#define INLINE static inline __attribute__((always_inline))

#define LANES 8
#define ROWS 4

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

OPS_CLONES void lut_attention_step(float *q, float *k, float *v, const float *q_bias, const float *k_bias,
                                   const float *v_bias, const float *cos, const float *sin, float *k_cache,
                                   float *v_cache, int32_t pos, int32_t heads, int32_t kv_heads, int32_t d,
                                   float *scores, float *out) {
    int32_t kv = kv_heads * d, rep = heads / kv_heads, T = pos + 1;
    const float *c = cos + (int64_t)pos * (d / 2), *sn = sin + (int64_t)pos * (d / 2);
    add_bias(q, q_bias, heads * d);
    add_bias(k, k_bias, kv);
    add_bias(v, v_bias, kv);
    rope(q, heads, d, c, sn);
    rope(k, kv_heads, d, c, sn);
    memcpy(k_cache + (int64_t)pos * kv, k, (size_t)kv * sizeof(float));
    memcpy(v_cache + (int64_t)pos * kv, v, (size_t)kv * sizeof(float));
    float scale = 1.0f / sqrtf((float)d);
    for (int32_t h = 0; h < heads; h++) {
        const float *qh = q + (int64_t)h * d, *kh = k_cache + (int64_t)(h / rep) * d;
        const float *vh = v_cache + (int64_t)(h / rep) * d;
        float *s = scores + (int64_t)h * T, *o = out + (int64_t)h * d;
        int32_t t = 0;
        for (; t + ROWS <= T; t += ROWS)
            dot_rows(qh, kh + (int64_t)t * kv, kv, d, s + t);
        for (; t < T; t++)
            s[t] = dot(qh, kh + (int64_t)t * kv, d);
        for (t = 0; t < T; t++)
            s[t] *= scale;
        float inv = 1.0f / softmax_unnormalised(s, T);
        memset(o, 0, (size_t)d * sizeof(float));
        for (t = 0; t + ROWS <= T; t += ROWS) {
            const float *v0 = vh + (int64_t)t * kv, *v1 = v0 + kv, *v2 = v1 + kv, *v3 = v2 + kv;
            for (int32_t i = 0; i < d; i++)
                o[i] += ((s[t] * v0[i] + s[t + 1] * v1[i]) + s[t + 2] * v2[i]) + s[t + 3] * v3[i];
        }
        for (; t < T; t++) {
            const float *vt = vh + (int64_t)t * kv;
            for (int32_t i = 0; i < d; i++)
                o[i] += s[t] * vt[i];
        }
        for (int32_t i = 0; i < d; i++)
            o[i] *= inv;
    }
}

OPS_CLONES void lut_silu_mul(float *g, const float *u, int32_t n) {
    for (int32_t i = 0; i < n; i++)
        g[i] = g[i] / (1.0f + exp_poly(-g[i])) * u[i];
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
