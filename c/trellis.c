/* Trellis-coded layers (lutkernels/trellis.py is the spec): y = W x with each
 * weight decoded from an (8 + k)-bit window of its column's stream, value() a
 * hash of the window. A tile of 16 rows decodes one block of 32 columns into
 * int32 values once, then every token's int8 activations multiply them: block
 * sums are exact integers, identical on every path, and the float combination
 * is one shared loop (a multiply and an add per row and block, no contraction).
 * The SIMD paths (AVX-512, AVX2, NEON) only decode and multiply: each row's window
 * from the tile's 16 bytes, picked by a byte shuffle and shifted, then value()'s
 * multiply-add and byte sum. */
#define _POSIX_C_SOURCE 200809L
#include "lut_internal.h"

#define TR_BLOCK 32
#define TR_MUL 2004492963u
#define TR_ADD 1608935200u

static inline int32_t tr_value(uint32_t u) {
    uint32_t x = u * TR_MUL + TR_ADD;
    return (int32_t)((x & 255) + (x >> 8 & 255) + (x >> 16 & 255) + (x >> 24)) - 510;
}

typedef void (*tr_decode_fn)(const lut_trellis *w, int32_t tile, int32_t col0, int32_t *v);
typedef void (*tr_dot_fn)(const int32_t *v, const int8_t *q, int32_t *s);

/* v[j][r] for the block of 32 columns at col0, rows r of the tile. */
static void decode_scalar(const lut_trellis *w, int32_t tile, int32_t col0, int32_t *v) {
    int32_t k = w->k, stride = 2 * k * ((w->M + LUT_TILE - 1) / LUT_TILE) + 1;
    uint32_t mask = (1u << (k + 8)) - 1;
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        const uint8_t *p = w->streams + (int64_t)(col0 + j) * stride + 2 * k * tile;
        for (int32_t r = 0; r < LUT_TILE; r++) {
            int32_t bit = k * r;
            const uint8_t *b = p + bit / 8;
            uint32_t word = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
            v[j * LUT_TILE + r] = tr_value(word >> (bit % 8) & mask);
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

#if ((defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)) || defined(__aarch64__)
/* What the SIMD paths shuffle: row r's window starts at bit k*r of the tile's 16 bytes, so the
 * 4 bytes from k*r/8 (idx[4r..4r+3], a byte-shuffle index) shifted right by k*r % 8 (sh[r]). */
static void window_shuffle(int32_t k, uint8_t idx[64], int32_t sh[16]) {
    for (int32_t r = 0; r < LUT_TILE; r++) {
        for (int32_t b = 0; b < 4; b++)
            idx[4 * r + b] = (uint8_t)(k * r / 8 + b);
        sh[r] = k * r % 8;
    }
}
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define TR_AVX512 __attribute__((target("avx512f,avx512bw")))
#define TR_AVX2 __attribute__((target("avx2")))

/* The 16 windows of a column: the tile's 16 bytes go to every 128-bit lane, where vpshufb
 * can pick each row's 4 (window_shuffle). */
TR_AVX512 static void decode_avx512(const lut_trellis *w, int32_t tile, int32_t col0, int32_t *v) {
    int32_t k = w->k, stride = 2 * k * ((w->M + LUT_TILE - 1) / LUT_TILE) + 1;
    uint8_t idx[64];
    int32_t sh[16];
    window_shuffle(k, idx, sh);
    const __m512i vidx = _mm512_loadu_si512(idx), vsh = _mm512_loadu_si512(sh);
    const __m512i mask = _mm512_set1_epi32((1 << (k + 8)) - 1), mul = _mm512_set1_epi32((int32_t)TR_MUL);
    const __m512i add = _mm512_set1_epi32((int32_t)TR_ADD), ones8 = _mm512_set1_epi8(1);
    const __m512i ones16 = _mm512_set1_epi16(1), bias = _mm512_set1_epi32(510);
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        const uint8_t *p = w->streams + (int64_t)(col0 + j) * stride + 2 * k * tile;
        __m512i bytes = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p));
        __m512i u = _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(bytes, vidx), vsh), mask);
        __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(u, mul), add);
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

/* As decode_avx512, 8 rows per 256-bit vector: rows 0..7, then 8..15. */
TR_AVX2 static void decode_avx2(const lut_trellis *w, int32_t tile, int32_t col0, int32_t *v) {
    int32_t k = w->k, stride = 2 * k * ((w->M + LUT_TILE - 1) / LUT_TILE) + 1;
    uint8_t idx[64];
    int32_t sh[16];
    window_shuffle(k, idx, sh);
    const __m256i idx0 = _mm256_loadu_si256((const __m256i *)idx), idx1 = _mm256_loadu_si256((const __m256i *)(idx + 32));
    const __m256i sh0 = _mm256_loadu_si256((const __m256i *)sh), sh1 = _mm256_loadu_si256((const __m256i *)(sh + 8));
    const __m256i mask = _mm256_set1_epi32((1 << (k + 8)) - 1), mul = _mm256_set1_epi32((int32_t)TR_MUL);
    const __m256i add = _mm256_set1_epi32((int32_t)TR_ADD), ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1), bias = _mm256_set1_epi32(510);
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        const uint8_t *p = w->streams + (int64_t)(col0 + j) * stride + 2 * k * tile;
        __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
        for (int h = 0; h < 2; h++) {
            __m256i u = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, h ? idx1 : idx0), h ? sh1 : sh0),
                                         mask);
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
static void decode_neon(const lut_trellis *w, int32_t tile, int32_t col0, int32_t *v) {
    int32_t k = w->k, stride = 2 * k * ((w->M + LUT_TILE - 1) / LUT_TILE) + 1;
    uint8_t idx[64];
    int32_t sh[16];
    window_shuffle(k, idx, sh);
    const uint32x4_t mask = vdupq_n_u32((1u << (k + 8)) - 1), mul = vdupq_n_u32(TR_MUL), add = vdupq_n_u32(TR_ADD);
    const int32x4_t bias = vdupq_n_s32(510);
    for (int32_t j = 0; j < TR_BLOCK; j++) {
        uint8x16_t bytes = vld1q_u8(w->streams + (int64_t)(col0 + j) * stride + 2 * k * tile);
        for (int32_t g = 0; g < 4; g++) {
            uint32x4_t u = vreinterpretq_u32_u8(vqtbl1q_u8(bytes, vld1q_u8(idx + 16 * g)));
            u = vandq_u32(vshlq_u32(u, vnegq_s32(vld1q_s32(sh + 4 * g))), mask);
            uint32x4_t sum = vpaddlq_u16(vpaddlq_u8(vreinterpretq_u8_u32(vmlaq_u32(add, u, mul))));
            vst1q_s32(v + j * LUT_TILE + 4 * g, vsubq_s32(vreinterpretq_s32_u32(sum), bias));
        }
    }
}

static void dot_neon(const int32_t *v, const int8_t *q, int32_t *s) {
    int32x4_t a[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int32_t j = 0; j < TR_BLOCK; j++)
        for (int32_t g = 0; g < 4; g++)
            a[g] = vmlaq_n_s32(a[g], vld1q_s32(v + j * LUT_TILE + 4 * g), q[j]);
    for (int32_t g = 0; g < 4; g++)
        vst1q_s32(s + 4 * g, a[g]);
}
#endif

typedef struct {
    const lut_trellis *w;
    const float *x;
    int8_t *q;
    float *a, *y, *accf;
    int32_t *acc, *vbuf;
    int32_t n, nchunks;
    tr_decode_fn decode;
    tr_dot_fn dot;
} tr_ctx;

static inline uint32_t abs_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x7fffffffu;
}

/* int8 activations per block of 32, scale max|x| / 127, rounded half to even. */
static void quantize_acts(void *arg, int32_t chunk, int32_t nchunks) {
    tr_ctx *c = arg;
    int32_t nb = c->w->K / TR_BLOCK;
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
        for (int32_t j = 0; j < TR_BLOCK; j++)
            c->q[u * TR_BLOCK + j] = (int8_t)((x[j] * inv + 12582912.0f) - 12582912.0f);
        c->a[u] = maxabs / 127.0f;
    }
}

static void run_tiles(void *arg, int32_t chunk, int32_t nchunks) {
    tr_ctx *c = arg;
    const lut_trellis *w = c->w;
    int32_t M = w->M, K = w->K, nb = K / TR_BLOCK, n = c->n, ntiles = (M + LUT_TILE - 1) / LUT_TILE;
    int32_t *v = c->vbuf + (int64_t)chunk * TR_BLOCK * LUT_TILE;
    float *accf = c->accf + (int64_t)chunk * n * LUT_TILE;
    int32_t s[LUT_TILE];
    for (int32_t t = (int32_t)((int64_t)ntiles * chunk / nchunks); t < (int64_t)ntiles * (chunk + 1) / nchunks; t++) {
        for (int64_t i = 0; i < (int64_t)n * LUT_TILE; i++)
            accf[i] = 0.0f;
        for (int32_t b = 0; b < nb; b++) {
            c->decode(w, t, b * TR_BLOCK, v);
            for (int32_t tok = 0; tok < n; tok++) {
                c->dot(v, c->q + (int64_t)tok * K + b * TR_BLOCK, s);
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

int lut_trellis_gemm(const lut_trellis *w, const float *x, int32_t n, float *y, int32_t *acc) {
    if (!w || !x || !y || !w->streams || !w->scales || n < 1 || w->M < 1 || w->K < TR_BLOCK || w->K % TR_BLOCK ||
        w->k < 1 || w->k > 6)
        return LUT_EINVAL;
    int32_t K = w->K, nb = K / TR_BLOCK, nchunks = lut_pool_chunks();
    size_t q_bytes = ((size_t)n * K + 63) / 64 * 64, a_bytes = (size_t)n * nb * sizeof(float);
    size_t v_bytes = (size_t)nchunks * TR_BLOCK * LUT_TILE * sizeof(int32_t);
    size_t f_bytes = (size_t)nchunks * n * LUT_TILE * sizeof(float);
    size_t need = q_bytes + a_bytes + v_bytes + f_bytes;
    pthread_mutex_lock(&lut_call_mu);
    char *ws = lut_workspace(need);
    if (!ws) {
        pthread_mutex_unlock(&lut_call_mu);
        return LUT_ENOMEM;
    }
    tr_ctx c = {.w = w, .x = x, .q = (int8_t *)ws, .a = (float *)(ws + q_bytes),
                .vbuf = (int32_t *)(ws + q_bytes + a_bytes), .accf = (float *)(ws + q_bytes + a_bytes + v_bytes),
                .y = y, .acc = acc, .n = n, .nchunks = nchunks, .decode = decode_scalar, .dot = dot_scalar};
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (lut_isa() == LUT_ISA_AVX512) {
        c.decode = decode_avx512;
        c.dot = dot_avx512;
    } else if (lut_isa() == LUT_ISA_AVX2) {
        c.decode = decode_avx2;
        c.dot = dot_avx2;
    }
#endif
#if defined(__aarch64__)
    if (lut_isa() == LUT_ISA_NEON) {
        c.decode = decode_neon;
        c.dot = dot_neon;
    }
#endif
    lut_pool_run(quantize_acts, &c);
    lut_pool_run(run_tiles, &c);
    pthread_mutex_unlock(&lut_call_mu);
    return LUT_OK;
}
