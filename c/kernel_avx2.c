/* AVX2 tile kernel: vpshufb looks up 16 rows per 128-bit lane, two lanes
 * (two groups of 4 activations) per instruction. */
#include <immintrin.h>
#include "lut_internal.h"

#define TGT __attribute__((target("avx2,fma,f16c")))

/* 16 rows of int16 sums over nc chunks of a run of R planes (plane q at wb +
 * 64q, weighted by 2^q; lut_plane_run bounds the total). A chunk's 4 lookups
 * per row and lane are paired byte-wise (unpack) and summed into int16 by
 * vpmaddubsw against 2^q, which cannot saturate (|2^q (a + b)| <= 16 * 256). */
TGT static inline __attribute__((always_inline)) __m256i block_sums(const uint8_t *wb, const int8_t *tb, int32_t nc,
                                                                   int64_t wstride, int32_t R) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256(); /* rows 0-7 / 8-15, one partial per lane */
    for (int32_t c = 0; c < nc; c++) {
        const int8_t *t = tb + c * 8 * LUT_TAB;
        __m256i t0 = _mm256_loadu_si256((const __m256i *)t), t1 = _mm256_loadu_si256((const __m256i *)(t + 64));
        __m256i t2 = _mm256_loadu_si256((const __m256i *)(t + 32)), t3 = _mm256_loadu_si256((const __m256i *)(t + 96));
        __m256i mul = one;
        /* 2^q by doubling: a broadcast from a general register would take the shuffle port */
        for (int32_t q = 0; q < R; q++, mul = _mm256_add_epi8(mul, mul)) {
            const uint8_t *w = wb + c * wstride + 64 * q; /* indexed, not stepped: no pointer past the array's end */
            _mm_prefetch(LUT_PREFETCH_AT(w), _MM_HINT_T0);
            __m256i w0 = _mm256_loadu_si256((const __m256i *)w), w1 = _mm256_loadu_si256((const __m256i *)(w + 32));
            /* lane l of r0: groups l (low nibbles of bytes 0-31); r1: l+4; r2: l+2; r3: l+6 */
            __m256i r0 = _mm256_shuffle_epi8(t0, _mm256_and_si256(w0, m4));
            __m256i r1 = _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16(w0, 4), m4));
            __m256i r2 = _mm256_shuffle_epi8(t2, _mm256_and_si256(w1, m4));
            __m256i r3 = _mm256_shuffle_epi8(t3, _mm256_and_si256(_mm256_srli_epi16(w1, 4), m4));
            __m256i a = _mm256_add_epi16(_mm256_maddubs_epi16(mul, _mm256_unpacklo_epi8(r0, r1)),
                                         _mm256_maddubs_epi16(mul, _mm256_unpacklo_epi8(r2, r3)));
            __m256i b = _mm256_add_epi16(_mm256_maddubs_epi16(mul, _mm256_unpackhi_epi8(r0, r1)),
                                         _mm256_maddubs_epi16(mul, _mm256_unpackhi_epi8(r2, r3)));
            lo = _mm256_add_epi16(lo, a);
            hi = _mm256_add_epi16(hi, b);
        }
    }
    /* fold the two lanes: [rows 0-7, rows 8-15] */
    return _mm256_add_epi16(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

/* Rows 0-7 and 8-15 of a tile as two float vectors. */
typedef struct {
    __m256 v[2];
} rows16;

/* y += s * (scale * ts) for rows 0-7 (y0) and 8-15 (y1): the scalar kernel's rounding order. */
TGT static inline __attribute__((always_inline)) void scale_add(__m256 *y0, __m256 *y1, __m256i s0, __m256i s1,
                                                                rows16 sc, __m256 tsv) {
    *y0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(sc.v[0], tsv), *y0);
    *y1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(sc.v[1], tsv), *y1);
}

/* 16 scales as float: fp16, or lut_f8's bit construction on 8-bit codes. */
TGT static inline __attribute__((always_inline)) rows16 scales16(int32_t scale8, const void *p) {
    rows16 r;
    for (int i = 0; i < 2; i++) {
        if (!scale8) {
            r.v[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + 8 * i)));
            continue;
        }
        __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)p + 8 * i)));
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_srli_epi32(u, 4), _mm256_set1_epi32(LUT_F8_BIAS)), 23);
        __m256i m = _mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(15)), 19);
        __m256i zero = _mm256_cmpeq_epi32(u, _mm256_setzero_si256());
        r.v[i] = _mm256_castsi256_ps(_mm256_andnot_si256(zero, _mm256_or_si256(e, m)));
    }
    return r;
}

/* 16 offsets as float: fp16, or (h * c) * 0.125 on int8 counts c (h: scales16 of plane 0). */
TGT static inline __attribute__((always_inline)) rows16 offsets16(int32_t scale8, const void *p, rows16 h) {
    rows16 r;
    for (int i = 0; i < 2; i++) {
        if (!scale8) {
            r.v[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + 8 * i)));
            continue;
        }
        __m128i c8 = _mm_loadl_epi64((const __m128i *)((const int8_t *)p + 8 * i));
        __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c8));
        r.v[i] = _mm256_mul_ps(_mm256_mul_ps(h.v[i], c), _mm256_set1_ps(0.125f));
    }
    return r;
}

TGT void lut_bscales_avx2(const lut_layer *w, int64_t grp, int32_t nsc, int32_t offsets, float *sc, float *z) {
    for (int32_t p = 0; p < nsc; p++) {
        rows16 r = scales16(w->scale8, lut_scale_ptr(w, grp, p));
        _mm256_storeu_ps(sc + p * LUT_TILE, r.v[0]);
        _mm256_storeu_ps(sc + p * LUT_TILE + 8, r.v[1]);
    }
    if (offsets) {
        rows16 h = scales16(w->scale8, lut_scale_ptr(w, grp, 0)), r;
        const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN));
        r = w->offsets ? offsets16(w->scale8, lut_offset_ptr(w, grp), h)
                       : (rows16){{_mm256_xor_ps(h.v[0], sign), _mm256_xor_ps(h.v[1], sign)}};
        _mm256_storeu_ps(z, r.v[0]);
        _mm256_storeu_ps(z + 8, r.v[1]);
    }
}

/* One tile, instantiated by LUT_DEFINE_TILE with its mode as constants. */
TGT static inline __attribute__((always_inline)) void tile_rows(const lut_job *j, int32_t tile, int32_t tok,
                                                               int32_t ntab, int32_t uniform, int32_t scale8,
                                                               int32_t keep) {
    const lut_layer *w = j->w;
    int32_t K = w->K, P = w->P, nb = K / j->Kb, ng = K / w->G, bpg = w->G / j->Kb, cpb = j->Kb / LUT_CHUNK;
    int32_t nchunk = K / LUT_CHUNK, rows = ((w->M + LUT_TILE - 1) / LUT_TILE) * LUT_TILE;
    const uint8_t *wt = w->planes + (int64_t)tile * nchunk * P * 64;
    const int8_t *tab = j->tab + tok * lut_tab_stride(j);
    const float *ts = j->tscale + (int64_t)tok * nb, *xs = j->xsum + (int64_t)tok * ng;
    __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
    int32_t g = 0, bg = 0, R = uniform ? lut_plane_run(j) : 1; /* block b's group and its place there: counted, not divided */
    for (int32_t b = 0; b < nb; b++) {
        int64_t grp = (int64_t)tile * ng + g;
        __m256 tsv = _mm256_set1_ps(ts[b]);
        __m256i u0 = _mm256_setzero_si256(), u1 = _mm256_setzero_si256(); /* uniform: sum_p 2^p * s_p */
        for (int32_t p = 0; p < P; p += R) {
            int32_t n = P - p < R ? P - p : R;
            const uint8_t *wb = wt + ((int64_t)b * cpb * P + p) * 64;
            const int8_t *tb = tab + (int64_t)b * cpb * 8 * LUT_TAB;
            __m256i s = block_sums(wb, tb, cpb, (int64_t)P * 64, n);
            __m256i s0 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s));
            __m256i s1 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1));
            if (ntab == 2) {
                __m256i h = block_sums(wb, tb + (int64_t)K * 4, cpb, (int64_t)P * 64, n);
                s0 = _mm256_add_epi32(s0, _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(h)), 8));
                s1 = _mm256_add_epi32(s1, _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(h, 1)), 8));
            }
            if (keep) { /* runs of one plane (lut_plane_run) */
                int32_t tmp[LUT_TILE];
                _mm256_storeu_si256((__m256i *)tmp, s0);
                _mm256_storeu_si256((__m256i *)(tmp + 8), s1);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    j->acc[(((int64_t)tok * rows + tile * LUT_TILE + r) * P + p) * nb + b] = lut_block_sum(ntab, tmp[r]);
            }
            if (uniform) {
                __m128i sh = _mm_cvtsi32_si128(p);
                u0 = _mm256_add_epi32(u0, _mm256_sll_epi32(s0, sh));
                u1 = _mm256_add_epi32(u1, _mm256_sll_epi32(s1, sh));
            } else {
                scale_add(&y0, &y1, s0, s1, scales16(scale8, lut_scale_ptr(w, grp, p)), tsv);
            }
        }
        if (uniform)
            scale_add(&y0, &y1, u0, u1, scales16(scale8, lut_scale_ptr(w, grp, 0)), tsv);
        if (++bg == bpg) { /* the group's last block */
            if (lut_has_offsets(w)) {
                rows16 h = scales16(scale8, lut_scale_ptr(w, grp, 0));
                __m256 xv = _mm256_set1_ps(xs[g]);
                if (w->offsets) {
                    rows16 z = offsets16(scale8, lut_offset_ptr(w, grp), h);
                    y0 = _mm256_fmadd_ps(z.v[0], xv, y0);
                    y1 = _mm256_fmadd_ps(z.v[1], xv, y1);
                } else {
                    y0 = _mm256_fnmadd_ps(h.v[0], xv, y0);
                    y1 = _mm256_fnmadd_ps(h.v[1], xv, y1);
                }
            }
            bg = 0;
            g++;
        }
    }
    float out[LUT_TILE];
    _mm256_storeu_ps(out, y0);
    _mm256_storeu_ps(out + 8, y1);
    int32_t n = w->M - tile * LUT_TILE < LUT_TILE ? w->M - tile * LUT_TILE : LUT_TILE;
    memcpy(j->y + (int64_t)tok * w->M + tile * LUT_TILE, out, (size_t)n * sizeof(float));
}

LUT_DEFINE_TILE(TGT, lut_tile_avx2, tile_rows)

/* ---- integer GEMM (lut_iblock in lut_internal.h) ----
 * vpmaddwd on a 256-bit half of a decoded column pair (rows 0-7 or 8-15, x 2
 * int16) and a 32-bit broadcast of a token's two activations, then an add:
 * T tokens share each weight load. */
TGT static inline __attribute__((always_inline)) void iblock_tokens(const lut_iblock *bk, int32_t t0, int32_t T,
                                                                   int32_t ncomp, int32_t uniform, int32_t keep) {
    __m256 y[4][2], tsv[4];
    __m256i u[4][2];
    for (int32_t t = 0; t < T; t++) {
        for (int h = 0; h < 2; h++) {
            y[t][h] = _mm256_loadu_ps(bk->yacc + (int64_t)(t0 + t) * LUT_TILE + 8 * h);
            u[t][h] = _mm256_setzero_si256();
        }
        tsv[t] = _mm256_set1_ps(bk->ts[(int64_t)(t0 + t) * bk->nb]);
    }
    for (int32_t c = 0; c < ncomp; c++) {
        __m256i s[4][2];
        for (int32_t t = 0; t < T; t++)
            s[t][0] = s[t][1] = _mm256_setzero_si256();
        for (int32_t ch = 0; ch < bk->nchunk; ch++) {
            const int16_t *wc = bk->wd + ((int64_t)ch * ncomp + c) * LUT_IG_WORDS;
            const int16_t *qc = bk->q + (int64_t)t0 * bk->qstride + ch * LUT_CHUNK;
            for (int32_t kp = 0; kp < LUT_CHUNK / 2; kp++) {
                __m256i w0 = _mm256_loadu_si256((const __m256i *)(wc + kp * 2 * LUT_TILE));
                __m256i w1 = _mm256_loadu_si256((const __m256i *)(wc + kp * 2 * LUT_TILE + LUT_TILE));
                for (int32_t t = 0; t < T; t++) {
                    int32_t pair;
                    memcpy(&pair, qc + (int64_t)t * bk->qstride + 2 * kp, sizeof pair);
                    __m256i qv = _mm256_set1_epi32(pair);
                    s[t][0] = _mm256_add_epi32(s[t][0], _mm256_madd_epi16(w0, qv));
                    s[t][1] = _mm256_add_epi32(s[t][1], _mm256_madd_epi16(w1, qv));
                }
            }
        }
        rows16 scv = {{_mm256_loadu_ps(bk->sc + (uniform ? 0 : c) * LUT_TILE),
                       _mm256_loadu_ps(bk->sc + (uniform ? 0 : c) * LUT_TILE + 8)}};
        for (int32_t t = 0; t < T; t++) {
            if (keep) {
                int32_t tmp[LUT_TILE];
                _mm256_storeu_si256((__m256i *)tmp, s[t][0]);
                _mm256_storeu_si256((__m256i *)(tmp + 8), s[t][1]);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    bk->acc[(int64_t)(t0 + t) * bk->acc_tok + (int64_t)r * bk->acc_row + (int64_t)c * bk->nb] = tmp[r];
            }
            if (bk->halve) /* even sums: the arithmetic shift halves exactly */
                for (int h = 0; h < 2; h++)
                    s[t][h] = _mm256_srai_epi32(s[t][h], 1);
            if (uniform)
                for (int h = 0; h < 2; h++)
                    u[t][h] = _mm256_add_epi32(u[t][h], _mm256_sll_epi32(s[t][h], _mm_cvtsi32_si128(c)));
            else
                scale_add(&y[t][0], &y[t][1], s[t][0], s[t][1], scv, tsv[t]);
        }
    }
    rows16 scv = {{_mm256_loadu_ps(bk->sc), _mm256_loadu_ps(bk->sc + 8)}};
    for (int32_t t = 0; t < T; t++) {
        if (uniform)
            scale_add(&y[t][0], &y[t][1], u[t][0], u[t][1], scv, tsv[t]);
        for (int h = 0; h < 2; h++) {
            if (bk->z)
                y[t][h] = _mm256_fmadd_ps(_mm256_loadu_ps(bk->z + 8 * h),
                                          _mm256_set1_ps(bk->xs[(int64_t)(t0 + t) * bk->ng]), y[t][h]);
            _mm256_storeu_ps(bk->yacc + (int64_t)(t0 + t) * LUT_TILE + 8 * h, y[t][h]);
        }
    }
}

TGT void lut_iblock_avx2(const lut_iblock *bk) {
    int32_t t = 0;
    if (bk->ncomp == 1 && bk->uniform && !bk->acc) { /* inference: a copy with the mode as constants, no spills */
        for (; t + 4 <= bk->n; t += 4)
            iblock_tokens(bk, t, 4, 1, 1, 0);
        for (; t < bk->n; t++)
            iblock_tokens(bk, t, 1, 1, 1, 0);
        return;
    }
    for (; t + 4 <= bk->n; t += 4)
        iblock_tokens(bk, t, 4, bk->ncomp, bk->uniform, bk->acc != NULL);
    for (; t < bk->n; t++)
        iblock_tokens(bk, t, 1, bk->ncomp, bk->uniform, bk->acc != NULL);
}
