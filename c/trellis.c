/* Trellis-coded layers (lutkernels/trellis.py is the spec): y = W x with each
 * weight decoded from an (8 + k)-bit window of its column's stream, value() a
 * hash of the window. Integer block sums S = sum_j q[j] * value(u[r][j]) over
 * 32 columns are exact and identical on every path; the float combination is
 * one shared loop (a multiply and an add per row and block, no contraction).
 *
 * Two ways to the sums. Several tokens: a tile of 16 rows decodes a block of
 * 32 columns into int32 values once (decode), then each token multiplies them
 * (dot). One token (decoding): with AVX-512 VNNI a single vpdpbusd multiplies
 * the window hash's four bytes by the activation and sums them, so decoding
 * and multiplying fuse (sums), without the values ever being stored:
 * sum_j q_j * (bytesum(x_j) - 510) = sum_j dpbusd(x_j, q_j) - 510 * sum_j q_j.
 * The SIMD decoders (AVX-512, AVX2, NEON) pick each row's window from the
 * tile's 16 bytes with a byte shuffle and shift it (window_shuffle). */
#define _POSIX_C_SOURCE 200809L
#include "lut_internal.h"

#define TR_BLOCK 32
#define TR_MUL 2004492963u
#define TR_ADD 1608935200u

/* A call's layer geometry, and what the SIMD decoders shuffle: row r's window starts at bit
 * k*r of the tile's 16 bytes, so the 4 bytes from k*r/8 (idx[4r..4r+3]) shifted right by
 * k*r % 8 (sh[r]). */
typedef struct {
    const lut_trellis *w;
    int32_t k, stride;
    uint8_t idx[64];
    int32_t sh[16];
} tr_geom;

typedef void (*tr_decode_fn)(const tr_geom *g, int32_t tile, int32_t col0, int32_t *v);
typedef void (*tr_dot_fn)(const int32_t *v, const int8_t *q, int32_t *s);
typedef void (*tr_sums_fn)(const tr_geom *g, int32_t tile, int32_t col0, const int8_t *q, int32_t qsum, int32_t *s);

static inline const uint8_t *tile_bytes(const tr_geom *g, int32_t tile, int32_t col) {
    return g->w->streams + (int64_t)col * g->stride + 2 * g->k * tile;
}

static inline int32_t tr_value(uint32_t u) {
    uint32_t x = u * TR_MUL + TR_ADD;
    return (int32_t)((x & 255) + (x >> 8 & 255) + (x >> 16 & 255) + (x >> 24)) - 510;
}

/* v[j][r] for the block of 32 columns at col0, rows r of the tile. */
static void decode_scalar(const tr_geom *g, int32_t tile, int32_t col0, int32_t *v) {
    uint32_t mask = (1u << (g->k + 8)) - 1;
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        const uint8_t *p = tile_bytes(g, tile, col0 + j);
        for (int32_t r = 0; r < LUT_TILE; r++) {
            const uint8_t *b = p + g->k * r / 8;
            uint32_t word = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
            v[j * LUT_TILE + r] = tr_value(word >> (g->k * r % 8) & mask);
        }
    }
}

/* s[r] = sum_j q[j] * v[j][r] over the block. */
static void dot_scalar(const int32_t *v, const int8_t *q, int32_t *s) {
    for (int32_t r = 0; r < LUT_TILE; r++)
        s[r] = 0;
    for (int32_t j = 0; j < TR_BLOCK; j++)
        for (int32_t r = 0; r < LUT_TILE; r++)
            s[r] += q[j] * v[j * LUT_TILE + r];
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define TR_AVX512 __attribute__((target("avx512f,avx512bw")))
#define TR_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define TR_AVX2 __attribute__((target("avx2")))

/* The 16 windows' hashed words u * MUL + ADD of the column whose tile bytes are at p: the 16
 * bytes go to every 128-bit lane, where vpshufb picks each row's 4. */
TR_AVX512 static inline __m512i hash_avx512(const tr_geom *g, const uint8_t *p) {
    __m512i bytes = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p));
    __m512i u = _mm512_srlv_epi32(_mm512_shuffle_epi8(bytes, _mm512_loadu_si512(g->idx)), _mm512_loadu_si512(g->sh));
    u = _mm512_and_si512(u, _mm512_set1_epi32((1 << (g->k + 8)) - 1));
    return _mm512_add_epi32(_mm512_mullo_epi32(u, _mm512_set1_epi32((int32_t)TR_MUL)), _mm512_set1_epi32((int32_t)TR_ADD));
}

TR_AVX512 static void decode_avx512(const tr_geom *g, int32_t tile, int32_t col0, int32_t *v) {
    const __m512i ones8 = _mm512_set1_epi8(1), ones16 = _mm512_set1_epi16(1), bias = _mm512_set1_epi32(510);
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        __m512i x = hash_avx512(g, tile_bytes(g, tile, col0 + j));
        __m512i sum = _mm512_madd_epi16(_mm512_maddubs_epi16(x, ones8), ones16);
        _mm512_storeu_si512(v + j * LUT_TILE, _mm512_sub_epi32(sum, bias));
    }
}

TR_AVX512 static void dot_avx512(const int32_t *v, const int8_t *q, int32_t *s) {
    __m512i acc = _mm512_setzero_si512();
    for (int32_t j = 0; j < TR_BLOCK; j++)
        acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(_mm512_loadu_si512(v + j * LUT_TILE), _mm512_set1_epi32(q[j])));
    _mm512_storeu_si512(s, acc);
}

/* vpdpbusd: each row's 4 hash bytes (unsigned) times q_j (signed, in all 4 bytes), summed. */
TR_VNNI static void sums_vnni(const tr_geom *g, int32_t tile, int32_t col0, const int8_t *q, int32_t qsum,
                              int32_t *s) {
    __m512i acc = _mm512_set1_epi32(-510 * qsum);
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        __m512i x = hash_avx512(g, tile_bytes(g, tile, col0 + j));
        acc = _mm512_dpbusd_epi32(acc, x, _mm512_set1_epi8(q[j]));
    }
    _mm512_storeu_si512(s, acc);
}

/* As decode_avx512, 8 rows per 256-bit vector: rows 0..7, then 8..15. */
TR_AVX2 static void decode_avx2(const tr_geom *g, int32_t tile, int32_t col0, int32_t *v) {
    const __m256i idx[2] = {_mm256_loadu_si256((const __m256i *)g->idx), _mm256_loadu_si256((const __m256i *)(g->idx + 32))};
    const __m256i sh[2] = {_mm256_loadu_si256((const __m256i *)g->sh), _mm256_loadu_si256((const __m256i *)(g->sh + 8))};
    const __m256i mask = _mm256_set1_epi32((1 << (g->k + 8)) - 1), mul = _mm256_set1_epi32((int32_t)TR_MUL);
    const __m256i add = _mm256_set1_epi32((int32_t)TR_ADD), ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1), bias = _mm256_set1_epi32(510);
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tile_bytes(g, tile, col0 + j)));
        for (int h = 0; h < 2; h++) {
            __m256i u = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, idx[h]), sh[h]), mask);
            __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(u, mul), add);
            __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(x, ones8), ones16);
            _mm256_storeu_si256((__m256i *)(v + j * LUT_TILE + 8 * h), _mm256_sub_epi32(sum, bias));
        }
    }
}

TR_AVX2 static void dot_avx2(const int32_t *v, const int8_t *q, int32_t *s) {
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        __m256i qj = _mm256_set1_epi32(q[j]);
        a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(v + j * LUT_TILE)), qj));
        a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(v + j * LUT_TILE + 8)), qj));
    }
    _mm256_storeu_si256((__m256i *)s, a0);
    _mm256_storeu_si256((__m256i *)(s + 8), a1);
}
#endif

#if defined(__aarch64__)
#include <arm_neon.h>

/* As decode_avx512, 4 rows per vector: vqtbl1q picks each row's 4 bytes, vshlq by a negative
 * count shifts right, pairwise adds sum a row's bytes. */
static void decode_neon(const tr_geom *g, int32_t tile, int32_t col0, int32_t *v) {
    const uint32x4_t mask = vdupq_n_u32((1u << (g->k + 8)) - 1), mul = vdupq_n_u32(TR_MUL);
    const uint32x4_t add = vdupq_n_u32(TR_ADD);
    const int32x4_t bias = vdupq_n_s32(510);
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        uint8x16_t bytes = vld1q_u8(tile_bytes(g, tile, col0 + j));
        for (int32_t r = 0; r < 4; r++) {
            uint32x4_t u = vreinterpretq_u32_u8(vqtbl1q_u8(bytes, vld1q_u8(g->idx + 16 * r)));
            u = vandq_u32(vshlq_u32(u, vnegq_s32(vld1q_s32(g->sh + 4 * r))), mask);
            uint32x4_t sum = vpaddlq_u16(vpaddlq_u8(vreinterpretq_u8_u32(vmlaq_u32(add, u, mul))));
            vst1q_s32(v + j * LUT_TILE + 4 * r, vsubq_s32(vreinterpretq_s32_u32(sum), bias));
        }
    }
}

static void dot_neon(const int32_t *v, const int8_t *q, int32_t *s) {
    int32x4_t a[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int32_t j = 0; j < TR_BLOCK; j++)
        for (int32_t r = 0; r < 4; r++)
            a[r] = vmlaq_n_s32(a[r], vld1q_s32(v + j * LUT_TILE + 4 * r), q[j]);
    for (int32_t r = 0; r < 4; r++)
        vst1q_s32(s + 4 * r, a[r]);
}
#endif

typedef struct {
    tr_geom g;
    const float *x;
    int8_t *q;
    float *a, *y, *accf;
    int32_t *acc, *vbuf, *qsum;
    int32_t n;
    tr_decode_fn decode;
    tr_dot_fn dot;
    tr_sums_fn sums; /* one token: decode and dot fused, where the ISA has it; else NULL */
} tr_ctx;

static inline uint32_t abs_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x7fffffffu;
}

/* int8 activations per block of 32, scale max|x| / 127, rounded half to even; and their sums. */
static void quantize_acts(void *arg, int32_t chunk, int32_t nchunks) {
    tr_ctx *c = arg;
    int32_t nb = c->g.w->K / TR_BLOCK;
    int64_t units = (int64_t)c->n * nb;
    for (int64_t u = units * chunk / nchunks; u < units * (chunk + 1) / nchunks; u++) {
        const float *x = c->x + u * TR_BLOCK;
        uint32_t maxbits = 0;
        for (int32_t j = 0; j < TR_BLOCK; j++) {
            uint32_t b = abs_bits(x[j]);
            maxbits = b > maxbits ? b : maxbits;
        }
        float maxabs;
        memcpy(&maxabs, &maxbits, sizeof maxabs);
        float inv = maxabs > 0.0f ? 127.0f / maxabs : 0.0f;
        int32_t qsum = 0;
        for (int32_t j = 0; j < TR_BLOCK; j++) {
            c->q[u * TR_BLOCK + j] = (int8_t)((x[j] * inv + 12582912.0f) - 12582912.0f);
            qsum += c->q[u * TR_BLOCK + j];
        }
        c->qsum[u] = qsum;
        c->a[u] = maxabs / 127.0f;
    }
}

static void run_tiles(void *arg, int32_t chunk, int32_t nchunks) {
    tr_ctx *c = arg;
    const lut_trellis *w = c->g.w;
    int32_t M = w->M, K = w->K, nb = K / TR_BLOCK, n = c->n, ntiles = (M + LUT_TILE - 1) / LUT_TILE;
    int32_t *v = c->vbuf + (int64_t)chunk * TR_BLOCK * LUT_TILE;
    float *accf = c->accf + (int64_t)chunk * n * LUT_TILE;
    int32_t s[LUT_TILE];
    for (int32_t t = (int32_t)((int64_t)ntiles * chunk / nchunks); t < (int64_t)ntiles * (chunk + 1) / nchunks; t++) {
        for (int64_t i = 0; i < (int64_t)n * LUT_TILE; i++)
            accf[i] = 0.0f;
        for (int32_t b = 0; b < nb; b++) {
            if (!(n == 1 && c->sums))
                c->decode(&c->g, t, b * TR_BLOCK, v);
            for (int32_t tok = 0; tok < n; tok++) {
                const int8_t *q = c->q + (int64_t)tok * K + b * TR_BLOCK;
                if (n == 1 && c->sums)
                    c->sums(&c->g, t, b * TR_BLOCK, q, c->qsum[b], s);
                else
                    c->dot(v, q, s);
                float ab = c->a[(int64_t)tok * nb + b], *f = accf + (int64_t)tok * LUT_TILE;
                for (int32_t r = 0; r < LUT_TILE; r++)
                    f[r] = f[r] + ab * (float)s[r];
                if (c->acc)
                    for (int32_t r = 0; r < LUT_TILE; r++)
                        c->acc[((int64_t)tok * ntiles * LUT_TILE + t * LUT_TILE + r) * nb + b] = s[r];
            }
        }
        for (int32_t tok = 0; tok < n; tok++)
            for (int32_t r = 0; r < LUT_TILE && t * LUT_TILE + r < M; r++)
                c->y[(int64_t)tok * M + t * LUT_TILE + r] = w->scales[t * LUT_TILE + r] * accf[tok * LUT_TILE + r];
    }
}

static void choose_paths(tr_ctx *c) {
    c->decode = decode_scalar;
    c->dot = dot_scalar;
    c->sums = NULL;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (lut_isa() == LUT_ISA_AVX512) {
        c->decode = decode_avx512;
        c->dot = dot_avx512;
        if (__builtin_cpu_supports("avx512vnni"))
            c->sums = sums_vnni;
    } else if (lut_isa() == LUT_ISA_AVX2) {
        c->decode = decode_avx2;
        c->dot = dot_avx2;
    }
#endif
#if defined(__aarch64__)
    if (lut_isa() == LUT_ISA_NEON) {
        c->decode = decode_neon;
        c->dot = dot_neon;
    }
#endif
}

int lut_trellis_gemm(const lut_trellis *w, const float *x, int32_t n, float *y, int32_t *acc) {
    if (!w || !x || !y || !w->streams || !w->scales || n < 1 || w->M < 1 || w->K < TR_BLOCK || w->K % TR_BLOCK ||
        w->k < 1 || w->k > 6)
        return LUT_EINVAL;
    int32_t K = w->K, nb = K / TR_BLOCK;
    tr_ctx c = {.g = {.w = w, .k = w->k, .stride = 2 * w->k * ((w->M + LUT_TILE - 1) / LUT_TILE) + 1},
                .x = x, .y = y, .acc = acc, .n = n};
    for (int32_t r = 0; r < LUT_TILE; r++) {
        for (int32_t b = 0; b < 4; b++)
            c.g.idx[4 * r + b] = (uint8_t)(w->k * r / 8 + b);
        c.g.sh[r] = w->k * r % 8;
    }
    choose_paths(&c);
    pthread_mutex_lock(&lut_call_mu);
    int32_t nchunks = lut_pool_chunks();
    size_t q_bytes = ((size_t)n * K + 63) / 64 * 64, a_bytes = (size_t)n * nb * sizeof(float);
    size_t s_bytes = (size_t)n * nb * sizeof(int32_t), v_bytes = (size_t)nchunks * TR_BLOCK * LUT_TILE * sizeof(int32_t);
    size_t f_bytes = (size_t)nchunks * n * LUT_TILE * sizeof(float);
    char *ws = lut_workspace(q_bytes + a_bytes + s_bytes + v_bytes + f_bytes);
    if (!ws) {
        pthread_mutex_unlock(&lut_call_mu);
        return LUT_ENOMEM;
    }
    c.q = (int8_t *)ws;
    c.a = (float *)(ws + q_bytes);
    c.qsum = (int32_t *)(ws + q_bytes + a_bytes);
    c.vbuf = (int32_t *)(ws + q_bytes + a_bytes + s_bytes);
    c.accf = (float *)(ws + q_bytes + a_bytes + s_bytes + v_bytes);
    lut_pool_run(quantize_acts, &c);
    lut_pool_run(run_tiles, &c);
    pthread_mutex_unlock(&lut_call_mu);
    return LUT_OK;
}
