/* AVX-512BW tile kernel: one 512-bit vpshufb looks up four different
 * 16-entry tables (one per lane), i.e. 16 rows x 4 activation groups. */
#include <immintrin.h>
#include "lut_internal.h"

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

/* 16 rows of int16 sums over nc chunks of a run of R planes from p0, plane
 * p0 + q weighted by 2^q (lut_plane_run bounds the total). Lane l of r0 holds
 * the 16 rows' lookups of group l (low nibbles), of r1 those of group l+4 (high
 * nibbles). Their bytes are paired row by row (unpack) and summed into int16 by
 * vpmaddubsw against 2^q, which cannot saturate (|2^q (a + b)| <= 16 * 256):
 * the pairing stays inside 128-bit lanes, where sign-extending each lookup
 * would cross lanes (vpmovsxbw), which doubled the shuffle-port work per chunk. */
TGT static inline __attribute__((always_inline)) __m256i block_sums(const uint8_t *wt, const int8_t *tab, int32_t c0,
                                                                   int32_t nc, int32_t P, int32_t p0, int32_t R) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512(); /* rows 0-7 / 8-15, one partial per lane */
    for (int32_t c = c0; c < c0 + nc; c++) {
        const int8_t *tb = tab + (int64_t)c * 8 * LUT_TAB;
        __m512i t0 = _mm512_loadu_si512(tb), t1 = _mm512_loadu_si512(tb + 64), mul = _mm512_set1_epi8(1);
        /* 2^q by doubling: a broadcast from a general register would take the shuffle port */
        for (int32_t q = 0; q < R; q++, mul = _mm512_add_epi8(mul, mul)) {
            const uint8_t *wc = wt + ((int64_t)c * P + p0 + q) * 64;
            _mm_prefetch(LUT_PREFETCH_AT(wc), _MM_HINT_T0);
            __m512i wv = _mm512_loadu_si512(wc);
            __m512i r0 = _mm512_shuffle_epi8(t0, _mm512_and_si512(wv, m4));
            __m512i r1 = _mm512_shuffle_epi8(t1, _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4));
            lo = _mm512_add_epi16(lo, _mm512_maddubs_epi16(mul, _mm512_unpacklo_epi8(r0, r1)));
            hi = _mm512_add_epi16(hi, _mm512_maddubs_epi16(mul, _mm512_unpackhi_epi8(r0, r1)));
        }
    }
    /* fold the four lanes: [lo lanes 0+2, 1+3, hi lanes 0+2, 1+3], then [rows 0-7, rows 8-15] */
    __m512i s = _mm512_add_epi16(_mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(3, 2, 3, 2)));
    s = _mm512_shuffle_i64x2(s, s, _MM_SHUFFLE(3, 1, 2, 0));
    return _mm256_add_epi16(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
}

/* y += s * (scale * ts), 16 rows: the scalar kernel's rounding order. */
TGT static inline __attribute__((always_inline)) __m512 scale_add(__m512 y, __m512i s, __m512 sc, __m512 tsv) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sc, tsv), y);
}

/* 16 scales as float: fp16, or lut_f8's bit construction on 8-bit codes. */
TGT static inline __attribute__((always_inline)) __m512 scales16(int32_t scale8, const void *p) {
    if (!scale8)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_srli_epi32(u, 4), _mm512_set1_epi32(LUT_F8_BIAS)), 23);
    __m512i m = _mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(15)), 19);
    return _mm512_castsi512_ps(_mm512_maskz_mov_epi32(_mm512_test_epi32_mask(u, u), _mm512_or_si512(e, m)));
}

/* 16 offsets as float: fp16, or (h * c) * 0.125 on int8 counts c (h: scales16 of plane 0). */
TGT static inline __attribute__((always_inline)) __m512 offsets16(int32_t scale8, const void *p, __m512 h) {
    if (!scale8)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    return _mm512_mul_ps(_mm512_mul_ps(h, c), _mm512_set1_ps(0.125f));
}

TGT void lut_bscales_avx512(const lut_layer *w, int64_t grp, int32_t nsc, int32_t offsets, float *sc, float *z) {
    for (int32_t p = 0; p < nsc; p++)
        _mm512_storeu_ps(sc + p * LUT_TILE, scales16(w->scale8, lut_scale_ptr(w, grp, p)));
    if (offsets) {
        __m512 h = scales16(w->scale8, lut_scale_ptr(w, grp, 0));
        __m512 minus_h = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(h), _mm512_set1_epi32(INT32_MIN)));
        _mm512_storeu_ps(z, w->offsets ? offsets16(w->scale8, lut_offset_ptr(w, grp), h) : minus_h);
    }
}

/* One tile, instantiated by LUT_DEFINE_TILE with its mode as constants. */
TGT static inline __attribute__((always_inline)) void tile_rows(const lut_job *j, int32_t tile, int32_t tok,
                                                               int32_t ntab, int32_t uniform, int32_t scale8, int32_t keep) {
    const lut_layer *w = j->w;
    int32_t K = w->K, P = w->P, nb = K / j->Kb, ng = K / w->G, bpg = w->G / j->Kb, cpb = j->Kb / LUT_CHUNK;
    int32_t nchunk = K / LUT_CHUNK, rows = ((w->M + LUT_TILE - 1) / LUT_TILE) * LUT_TILE;
    const uint8_t *wt = w->planes + (int64_t)tile * nchunk * P * 64;
    const int8_t *tab = j->tab + tok * lut_tab_stride(j);
    const float *ts = j->tscale + (int64_t)tok * nb, *xs = j->xsum + (int64_t)tok * ng;
    __m512 y = _mm512_setzero_ps();
    int32_t g = 0, bg = 0, R = uniform ? lut_plane_run(j) : 1; /* block b's group and its place there: counted, not divided */
    for (int32_t b = 0; b < nb; b++) {
        int64_t grp = (int64_t)tile * ng + g;
        __m512 tsv = _mm512_set1_ps(ts[b]);
        __m512i u = _mm512_setzero_si512(); /* uniform: sum_p 2^p * s_p */
        for (int32_t p = 0; p < P; p += R) {
            int32_t n = P - p < R ? P - p : R;
            __m512i s = _mm512_cvtepi16_epi32(block_sums(wt, tab, b * cpb, cpb, P, p, n));
            if (ntab == 2) {
                __m256i h = block_sums(wt, tab + (int64_t)K * 4, b * cpb, cpb, P, p, n);
                s = _mm512_add_epi32(s, _mm512_slli_epi32(_mm512_cvtepi16_epi32(h), 8));
            }
            if (keep) { /* runs of one plane (lut_plane_run) */
                int32_t tmp[LUT_TILE];
                _mm512_storeu_si512(tmp, s);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    j->acc[(((int64_t)tok * rows + tile * LUT_TILE + r) * P + p) * nb + b] = lut_block_sum(ntab, tmp[r]);
            }
            if (uniform)
                u = _mm512_add_epi32(u, _mm512_sll_epi32(s, _mm_cvtsi32_si128(p)));
            else
                y = scale_add(y, s, scales16(scale8, lut_scale_ptr(w, grp, p)), tsv);
        }
        if (uniform)
            y = scale_add(y, u, scales16(scale8, lut_scale_ptr(w, grp, 0)), tsv);
        if (++bg == bpg) { /* the group's last block */
            if (lut_has_offsets(w)) {
                __m512 h = scales16(scale8, lut_scale_ptr(w, grp, 0)), xv = _mm512_set1_ps(xs[g]);
                y = w->offsets ? _mm512_fmadd_ps(offsets16(scale8, lut_offset_ptr(w, grp), h), xv, y)
                               : _mm512_fnmadd_ps(h, xv, y);
            }
            bg = 0;
            g++;
        }
    }
    int32_t n = w->M - tile * LUT_TILE < LUT_TILE ? w->M - tile * LUT_TILE : LUT_TILE;
    _mm512_mask_storeu_ps(j->y + (int64_t)tok * w->M + tile * LUT_TILE, (__mmask16)((1u << n) - 1u), y);
}

LUT_DEFINE_TILE(TGT, lut_tile_avx512, tile_rows)

/* ---- integer GEMM (lut_iblock in lut_internal.h) ----
 * One decoded pair of columns is a 512-bit register of 16 rows x 2 int16; a
 * 32-bit broadcast of a token's two activations multiplies it into the rows'
 * int32 sums: vpdpwssd where the CPU has AVX512-VNNI, else vpmaddwd and an
 * add (the same integers: neither can overflow, lut_internal.h). T tokens
 * share each weight load; their sums are T independent dependency chains. */
#define TGT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

#define IG_BODY(attrs, name, dot)                                                                                    \
    attrs static inline __attribute__((always_inline)) void name(const lut_iblock *bk, int32_t t0, int32_t T,       \
                                                                 int32_t ncomp, int32_t uniform, int32_t keep) {     \
        __m512 y[8], tsv[8];                                                                                           \
        __m512i u[8];                                                                                                  \
        for (int32_t t = 0; t < T; t++) {                                                                              \
            y[t] = _mm512_loadu_ps(bk->yacc + (int64_t)(t0 + t) * LUT_TILE);                                           \
            tsv[t] = _mm512_set1_ps(bk->ts[(int64_t)(t0 + t) * bk->nb]);                                               \
            u[t] = _mm512_setzero_si512();                                                                             \
        }                                                                                                              \
        for (int32_t c = 0; c < ncomp; c++) {                                                                          \
            __m512i s[8];                                                                                              \
            for (int32_t t = 0; t < T; t++)                                                                            \
                s[t] = _mm512_setzero_si512();                                                                         \
            for (int32_t ch = 0; ch < bk->nchunk; ch++) {                                                              \
                const int16_t *wc = bk->wd + ((int64_t)ch * ncomp + c) * LUT_IG_WORDS;                                 \
                const int16_t *qc = bk->q + (int64_t)t0 * bk->qstride + ch * LUT_CHUNK;                                \
                for (int32_t kp = 0; kp < LUT_CHUNK / 2; kp++) {                                                       \
                    __m512i wv = _mm512_loadu_si512(wc + kp * 2 * LUT_TILE);                                           \
                    for (int32_t t = 0; t < T; t++) {                                                                  \
                        int32_t pair;                                                                                  \
                        memcpy(&pair, qc + (int64_t)t * bk->qstride + 2 * kp, sizeof pair);                            \
                        s[t] = dot(s[t], wv, _mm512_set1_epi32(pair));                                                 \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
            __m512 scv = _mm512_loadu_ps(bk->sc + (uniform ? 0 : c) * LUT_TILE);                                       \
            for (int32_t t = 0; t < T; t++) {                                                                          \
                if (keep) {                                                                                            \
                    int32_t tmp[LUT_TILE];                                                                             \
                    _mm512_storeu_si512(tmp, s[t]);                                                                    \
                    for (int32_t r = 0; r < LUT_TILE; r++)                                                             \
                        bk->acc[(int64_t)(t0 + t) * bk->acc_tok + (int64_t)r * bk->acc_row + (int64_t)c * bk->nb] =     \
                            tmp[r];                                                                                    \
                }                                                                                                      \
                if (bk->halve) /* even sums: the arithmetic shift halves exactly */                                    \
                    s[t] = _mm512_srai_epi32(s[t], 1);                                                                 \
                if (uniform)                                                                                           \
                    u[t] = _mm512_add_epi32(u[t], _mm512_sll_epi32(s[t], _mm_cvtsi32_si128(c)));                       \
                else                                                                                                   \
                    y[t] = scale_add(y[t], s[t], scv, tsv[t]);                                                         \
            }                                                                                                          \
        }                                                                                                              \
        __m512 scv = _mm512_loadu_ps(bk->sc);                                                                          \
        for (int32_t t = 0; t < T; t++) {                                                                              \
            if (uniform)                                                                                               \
                y[t] = scale_add(y[t], u[t], scv, tsv[t]);                                                             \
            if (bk->z)                                                                                                 \
                y[t] = _mm512_fmadd_ps(_mm512_loadu_ps(bk->z), _mm512_set1_ps(bk->xs[(int64_t)(t0 + t) * bk->ng]),    \
                                       y[t]);                                                                          \
            _mm512_storeu_ps(bk->yacc + (int64_t)(t0 + t) * LUT_TILE, y[t]);                                           \
        }                                                                                                              \
    }                                                                                                                  \
    attrs static void name##_all(const lut_iblock *bk) {                                                              \
        int32_t t = 0;                                                                                                 \
        if (bk->ncomp == 1 && bk->uniform && !bk->acc) { /* inference: the loop state in registers */                 \
            for (; t + 8 <= bk->n; t += 8)                                                                             \
                name(bk, t, 8, 1, 1, 0);                                                                               \
            for (; t < bk->n; t++)                                                                                     \
                name(bk, t, 1, 1, 1, 0);                                                                               \
            return;                                                                                                    \
        }                                                                                                              \
        for (; t + 8 <= bk->n; t += 8)                                                                                 \
            name(bk, t, 8, bk->ncomp, bk->uniform, bk->acc != NULL);                                                   \
        for (; t < bk->n; t++)                                                                                         \
            name(bk, t, 1, bk->ncomp, bk->uniform, bk->acc != NULL);                                                   \
    }

TGT_VNNI static inline __attribute__((always_inline)) __m512i dot_vnni(__m512i s, __m512i w, __m512i q) {
    return _mm512_dpwssd_epi32(s, w, q);
}
TGT static inline __attribute__((always_inline)) __m512i dot_madd(__m512i s, __m512i w, __m512i q) {
    return _mm512_add_epi32(s, _mm512_madd_epi16(w, q));
}

IG_BODY(TGT_VNNI, iblock_vnni, dot_vnni)
IG_BODY(TGT, iblock_madd, dot_madd)

void lut_iblock_avx512(const lut_iblock *bk) {
    /* lut_isa_supported has run __builtin_cpu_init; the test reads a word, per block of many tokens */
    (__builtin_cpu_supports("avx512vnni") ? iblock_vnni_all : iblock_madd_all)(bk);
}

/* ---- integer GEMM, int8 variant (lut_internal.h) ----
 * Decoding: vpermb gathers each row's four bytes of a plane chunk into one
 * 32-bit word (row r's lane L byte at 4r + L: a 4 x 16 byte transpose), so a
 * 64-bit word holds rows 2Q and 2Q + 1, all 32 columns; vpshufbitqmb then
 * picks, for every output byte (row, quad, column j), its one bit into a mask,
 * and a masked add puts 2^(p - p0) there. 18 instructions a plane and chunk,
 * where spreading nibbles to bytes with shifts took over 40. */
#define TGT_I8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512bitalg,avx2,fma,f16c")))

int lut_int8_dot(void) {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512bitalg");
}

/* vpshufbitqmb's selectors, one 64-bit pattern per column quad kq (every word alike): output
 * byte 4 rr + j (row 2Q + rr, column 4 kq + j) takes bit 8 (4 rr + (kq & 3)) + 4 (kq >> 2) + j of
 * its word, lane kq & 3's byte of that row, the low nibble for kq < 4, the high one after. */
static const uint64_t pick_bits[8] = {0x2322212003020100ull, 0x2b2a29280b0a0908ull, 0x3332313013121110ull,
                                      0x3b3a39381b1a1918ull, 0x2726252407060504ull, 0x2f2e2d2c0f0e0d0cull,
                                      0x3736353417161514ull, 0x3f3e3d3c1f1e1d1cull};
/* vpermb's indices: output byte 4 r + L is row r's byte of lane L, input byte 16 L + r. */
static const uint8_t row_words[64] = {0,  16, 32, 48, 1,  17, 33, 49, 2,  18, 34, 50, 3,  19, 35, 51,
                                      4,  20, 36, 52, 5,  21, 37, 53, 6,  22, 38, 54, 7,  23, 39, 55,
                                      8,  24, 40, 56, 9,  25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
                                      12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};

TGT_I8 void lut_decode8_avx512(const uint8_t *wc, int32_t P, int32_t ncomp, uint8_t *wd8) {
    __m512i perm = _mm512_loadu_si512(row_words), sel[8];
    for (int32_t kq = 0; kq < 8; kq++)
        sel[kq] = _mm512_set1_epi64((long long)pick_bits[kq]);
    int32_t per = ncomp == 1 ? P : 1;
    for (int32_t c = 0; c < ncomp; c++) {
        __m512i v[8];
        for (int32_t kq = 0; kq < 8; kq++)
            v[kq] = _mm512_setzero_si512();
        for (int32_t p = c * per; p < (c + 1) * per; p++) {
            __m512i rows = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(wc + (int64_t)p * 64));
            __m512i bit = _mm512_set1_epi8((char)(1 << (p - c * per)));
            for (int32_t kq = 0; kq < 8; kq++)
                v[kq] = _mm512_mask_add_epi8(v[kq], _mm512_bitshuffle_epi64_mask(rows, sel[kq]), v[kq], bit);
        }
        for (int32_t kq = 0; kq < 8; kq++)
            _mm512_storeu_si512(wd8 + (int64_t)c * LUT_IG_BYTES + kq * 64, v[kq]);
    }
}

/* T tokens from t0 (T <= 8) over every block of the tile: the int16 body's float steps in
 * the same order, the outputs in registers throughout. */
TGT_I8 static inline __attribute__((always_inline)) void itile8(const lut_itile8 *k, int32_t t0, int32_t T,
                                                               int32_t ncomp, int32_t uniform, int32_t keep) {
    __m512 y[8];
    for (int32_t t = 0; t < T; t++)
        y[t] = _mm512_setzero_ps();
    const int32_t top = ncomp == 1 ? (1 << k->P) - 1 : 1, nsc = uniform ? 1 : k->P;
    int32_t g = 0, bg = 0;
    for (int32_t b = 0; b < k->nb; b++) {
        __m512 tsv[8];
        __m512i u[8];
        for (int32_t t = 0; t < T; t++) {
            tsv[t] = _mm512_set1_ps(k->ts[(int64_t)(t0 + t) * k->nb + b]);
            u[t] = _mm512_setzero_si512();
        }
        const int8_t *qb = k->q8 + ((int64_t)b * k->n + t0) * k->Kb;
        for (int32_t c = 0; c < ncomp; c++) {
            __m512i s[8];
            for (int32_t t = 0; t < T; t++) /* the halved sums start at their correction */
                s[t] = _mm512_set1_epi32(-top * k->qs[(int64_t)b * k->n + t0 + t]);
            for (int32_t ch = 0; ch < k->cpb; ch++) {
                const uint8_t *wc = k->wd8 + (((int64_t)b * k->cpb + ch) * ncomp + c) * LUT_IG_BYTES;
                const int8_t *qc = qb + ch * LUT_CHUNK;
                for (int32_t kq = 0; kq < LUT_CHUNK / 4; kq++) {
                    __m512i wv = _mm512_loadu_si512(wc + kq * 64);
                    for (int32_t t = 0; t < T; t++) {
                        int32_t quad;
                        memcpy(&quad, qc + (int64_t)t * k->Kb + 4 * kq, sizeof quad);
                        s[t] = _mm512_dpbusd_epi32(s[t], wv, _mm512_set1_epi32(quad));
                    }
                }
            }
            __m512 scv = _mm512_loadu_ps(k->sc + ((int64_t)b * nsc + (uniform ? 0 : c)) * LUT_TILE);
            for (int32_t t = 0; t < T; t++) {
                if (keep) {
                    int32_t tmp[LUT_TILE];
                    _mm512_storeu_si512(tmp, s[t]);
                    for (int32_t r = 0; r < LUT_TILE; r++)
                        k->acc[(int64_t)(t0 + t) * k->acc_tok + (int64_t)r * k->acc_row + (int64_t)c * k->nb + b] =
                            2 * tmp[r];
                }
                if (uniform)
                    u[t] = _mm512_add_epi32(u[t], _mm512_sll_epi32(s[t], _mm_cvtsi32_si128(c)));
                else
                    y[t] = scale_add(y[t], s[t], scv, tsv[t]);
            }
        }
        if (uniform) {
            __m512 scv = _mm512_loadu_ps(k->sc + (int64_t)b * nsc * LUT_TILE);
            for (int32_t t = 0; t < T; t++)
                y[t] = scale_add(y[t], u[t], scv, tsv[t]);
        }
        if (++bg == k->bpg) { /* the group's last block */
            if (k->z) {
                __m512 zv = _mm512_loadu_ps(k->z + (int64_t)g * LUT_TILE);
                for (int32_t t = 0; t < T; t++)
                    y[t] = _mm512_fmadd_ps(zv, _mm512_set1_ps(k->xs[(int64_t)(t0 + t) * k->ng + g]), y[t]);
            }
            bg = 0;
            g++;
        }
    }
    for (int32_t t = 0; t < T; t++)
        _mm512_mask_storeu_ps(k->y + (int64_t)(t0 + t) * k->ystride, (__mmask16)((1u << k->nr) - 1u), y[t]);
}

TGT_I8 void lut_itile8_avx512(const lut_itile8 *k) {
    int32_t t = 0;
    if (k->ncomp == 1 && k->uniform && !k->acc) { /* inference: the loop state in registers */
        for (; t + 8 <= k->n; t += 8)
            itile8(k, t, 8, 1, 1, 0);
        for (; t < k->n; t++)
            itile8(k, t, 1, 1, 1, 0);
        return;
    }
    for (; t + 8 <= k->n; t += 8)
        itile8(k, t, 8, k->ncomp, k->uniform, k->acc != NULL);
    for (; t < k->n; t++)
        itile8(k, t, 1, k->ncomp, k->uniform, k->acc != NULL);
}
