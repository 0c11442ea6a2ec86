/* NEON tile kernel for the AArch64 baseline (ARMv8.0: no dotprod, no fp16
 * arithmetic). tbl looks up 16 rows per 128-bit register, one group of 4
 * activations per instruction, exactly the lane split of kernel_scalar.c. */
#include <arm_neon.h>
#include "lut_internal.h"

/* Lane l of a chunk (rows 0-15): group l's table indexed by the low nibbles
 * plus group l+4's by the high nibbles, as int16 rows 0-7 (val[0]) and 8-15
 * (val[1]). Two int8 entries can sum past int8, hence the widening add. */
static inline int16x8x2_t lane_sums(const uint8_t *wc, const int8_t *tc, int l) {
    uint8x16_t wv = vld1q_u8(wc + 16 * l);
    int8x16_t a = vqtbl1q_s8(vld1q_s8(tc + l * LUT_TAB), vandq_u8(wv, vdupq_n_u8(0x0f)));
    int8x16_t b = vqtbl1q_s8(vld1q_s8(tc + (l + 4) * LUT_TAB), vshrq_n_u8(wv, 4));
    return (int16x8x2_t){{vaddl_s8(vget_low_s8(a), vget_low_s8(b)), vaddl_high_s8(a, b)}};
}

/* 16 rows of int16 sums of one plane over nc chunks (halves as lane_sums).
 * The four lanes are summed as a tree so the accumulators' dependency chains
 * get one add per chunk. A row receives at most 64 lookups per block, |sum| <=
 * 8192 (see kernel_scalar.c): int16 partial sums cannot overflow. */
static inline int16x8x2_t block_sums(const uint8_t *wb, const int8_t *tb, int32_t nc, int64_t wstride) {
    int16x8x2_t s = {{vdupq_n_s16(0), vdupq_n_s16(0)}};
    for (int32_t c = 0; c < nc; c++) {
        /* indexed rather than stepped pointers: a step past the last chunk could leave the array */
        const uint8_t *wc = wb + c * wstride;
        const int8_t *tc = tb + (int64_t)c * 8 * LUT_TAB;
        int16x8x2_t l0 = lane_sums(wc, tc, 0), l1 = lane_sums(wc, tc, 1);
        int16x8x2_t l2 = lane_sums(wc, tc, 2), l3 = lane_sums(wc, tc, 3);
        s.val[0] = vaddq_s16(s.val[0], vaddq_s16(vaddq_s16(l0.val[0], l1.val[0]), vaddq_s16(l2.val[0], l3.val[0])));
        s.val[1] = vaddq_s16(s.val[1], vaddq_s16(vaddq_s16(l0.val[1], l1.val[1]), vaddq_s16(l2.val[1], l3.val[1])));
    }
    return s;
}

/* fp16 -> fp32 by the ARMv8.0 conversion instruction: exact, like lut_h2f. */
static inline float32x4_t h2f4(const uint16_t *h) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h))); }

/* 16 scales as float, rows 4i..4i+3 in out[i]: fp16, or lut_f8's bit construction on 8-bit codes. */
static inline void scales16(int32_t scale8, const void *p, float32x4_t out[4]) {
    if (!scale8) {
        for (int i = 0; i < 4; i++)
            out[i] = h2f4((const uint16_t *)p + 4 * i);
        return;
    }
    uint8x16_t u8 = vld1q_u8(p);
    uint16x8_t u16[2] = {vmovl_u8(vget_low_u8(u8)), vmovl_high_u8(u8)};
    for (int i = 0; i < 4; i++) {
        uint32x4_t u = i % 2 ? vmovl_high_u16(u16[i / 2]) : vmovl_u16(vget_low_u16(u16[i / 2]));
        uint32x4_t e = vshlq_n_u32(vaddq_u32(vshrq_n_u32(u, 4), vdupq_n_u32(LUT_F8_BIAS)), 23);
        uint32x4_t m = vshlq_n_u32(vandq_u32(u, vdupq_n_u32(15)), 19);
        out[i] = vreinterpretq_f32_u32(vandq_u32(vorrq_u32(e, m), vtstq_u32(u, u)));
    }
}

/* 16 offsets as float: fp16, or (h * c) * 0.125 on int8 counts c (h: scales16 of plane 0). */
static inline void offsets16(int32_t scale8, const void *p, const float32x4_t h[4], float32x4_t out[4]) {
    if (!scale8) {
        for (int i = 0; i < 4; i++)
            out[i] = h2f4((const uint16_t *)p + 4 * i);
        return;
    }
    int8x16_t c8 = vld1q_s8(p);
    int16x8_t c16[2] = {vmovl_s8(vget_low_s8(c8)), vmovl_high_s8(c8)};
    for (int i = 0; i < 4; i++) {
        int32x4_t c = i % 2 ? vmovl_high_s16(c16[i / 2]) : vmovl_s16(vget_low_s16(c16[i / 2]));
        out[i] = vmulq_f32(vmulq_f32(h[i], vcvtq_f32_s32(c)), vdupq_n_f32(0.125f));
    }
}

/* y += s * (scale * ts), rows 4i..4i+3 in y[i]: scale * ts rounded first, then one
 * fused step, the scalar kernel's fmaf order. */
static inline void scale_add(float32x4_t y[4], const int32x4_t s[4], int32_t scale8, const void *sc,
                             float32x4_t tsv) {
    float32x4_t f[4];
    scales16(scale8, sc, f);
    for (int i = 0; i < 4; i++)
        y[i] = vfmaq_f32(y[i], vcvtq_f32_s32(s[i]), vmulq_f32(f[i], tsv));
}

/* One tile, instantiated by LUT_DEFINE_TILE with its mode as constants. */
static inline __attribute__((always_inline)) void tile_rows(const lut_job *j, int32_t tile, int32_t tok, int32_t ntab,
                                                           int32_t uniform, int32_t scale8, int32_t keep) {
    const lut_layer *w = j->w;
    int32_t K = w->K, P = w->P, nb = K / j->Kb, ng = K / w->G, bpg = w->G / j->Kb, cpb = j->Kb / LUT_CHUNK;
    int32_t nchunk = K / LUT_CHUNK, rows = ((w->M + LUT_TILE - 1) / LUT_TILE) * LUT_TILE;
    const uint8_t *wt = w->planes + (int64_t)tile * nchunk * P * 64;
    const int8_t *tab = j->tab + tok * lut_tab_stride(j);
    const float *ts = j->tscale + (int64_t)tok * nb, *xs = j->xsum + (int64_t)tok * ng;
    float32x4_t y[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    int32_t g = 0, bg = 0; /* block b's group and its place there: counted, so no division runs per block */
    for (int32_t b = 0; b < nb; b++) {
        int64_t grp = (int64_t)tile * ng + g;
        float32x4_t tsv = vdupq_n_f32(ts[b]);
        /* uniform: sum_p 2^p * s_p (vshlq shifts bits: defined for negative lanes) */
        int32x4_t u[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
        for (int32_t p = 0; p < P; p++) {
            const uint8_t *wb = wt + ((int64_t)b * cpb * P + p) * 64;
            const int8_t *tb = tab + (int64_t)b * cpb * 8 * LUT_TAB;
            int16x8x2_t s16 = block_sums(wb, tb, cpb, (int64_t)P * 64);
            int32x4_t s[4] = {vmovl_s16(vget_low_s16(s16.val[0])), vmovl_high_s16(s16.val[0]),
                              vmovl_s16(vget_low_s16(s16.val[1])), vmovl_high_s16(s16.val[1])};
            if (ntab == 2) {
                /* widening shift: |hi sum| <= 2 * 64, and 256 * 128 does not fit int16 */
                int16x8x2_t h = block_sums(wb, tb + (int64_t)K * 4, cpb, (int64_t)P * 64);
                s[0] = vaddq_s32(s[0], vshll_n_s16(vget_low_s16(h.val[0]), 8));
                s[1] = vaddq_s32(s[1], vshll_high_n_s16(h.val[0], 8));
                s[2] = vaddq_s32(s[2], vshll_n_s16(vget_low_s16(h.val[1]), 8));
                s[3] = vaddq_s32(s[3], vshll_high_n_s16(h.val[1], 8));
            }
            if (keep) {
                int32_t tmp[LUT_TILE];
                for (int i = 0; i < 4; i++)
                    vst1q_s32(tmp + 4 * i, s[i]);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    j->acc[(((int64_t)tok * rows + tile * LUT_TILE + r) * P + p) * nb + b] = lut_block_sum(ntab, tmp[r]);
            }
            if (uniform)
                for (int i = 0; i < 4; i++)
                    u[i] = vaddq_s32(u[i], vshlq_s32(s[i], vdupq_n_s32(p)));
            else
                scale_add(y, s, scale8, lut_scale_ptr(w, grp, p), tsv);
        }
        if (uniform)
            scale_add(y, u, scale8, lut_scale_ptr(w, grp, 0), tsv);
        if (++bg == bpg) { /* the group's last block */
            if (lut_has_offsets(w)) {
                float32x4_t h[4], z[4], xv = vdupq_n_f32(xs[g]);
                scales16(scale8, lut_scale_ptr(w, grp, 0), h);
                if (w->offsets)
                    offsets16(scale8, lut_offset_ptr(w, grp), h, z);
                for (int i = 0; i < 4; i++)
                    y[i] = w->offsets ? vfmaq_f32(y[i], z[i], xv) : vfmsq_f32(y[i], h[i], xv);
            }
            bg = 0;
            g++;
        }
    }
    float out[LUT_TILE];
    for (int i = 0; i < 4; i++)
        vst1q_f32(out + 4 * i, y[i]);
    int32_t n = w->M - tile * LUT_TILE < LUT_TILE ? w->M - tile * LUT_TILE : LUT_TILE;
    memcpy(j->y + (int64_t)tok * w->M + tile * LUT_TILE, out, (size_t)n * sizeof(float));
}

LUT_DEFINE_TILE(, lut_tile_neon, tile_rows)

/* ---- integer GEMM (lut_iblock in lut_internal.h) ----
 * A decoded column pair is four registers of 4 rows x 2 int16; a token's two
 * activations, duplicated as a 32-bit lane, multiply them by vmlal into
 * [row, column] int32 lanes, and vpaddq folds the two columns at the end of
 * the block (the same integers: nothing can overflow, lut_internal.h). */
static inline __attribute__((always_inline)) void iblock_tokens(const lut_iblock *bk, int32_t t0, int32_t T) {
    float32x4_t y[2][4], tsv[2];
    int32x4_t u[2][4];
    for (int32_t t = 0; t < T; t++) {
        for (int i = 0; i < 4; i++) {
            y[t][i] = vld1q_f32(bk->yacc + (int64_t)(t0 + t) * LUT_TILE + 4 * i);
            u[t][i] = vdupq_n_s32(0);
        }
        tsv[t] = vdupq_n_f32(bk->ts[(int64_t)(t0 + t) * bk->nb]);
    }
    for (int32_t c = 0; c < bk->ncomp; c++) {
        int32x4_t lo[2][4], hi[2][4], s[2][4];
        for (int32_t t = 0; t < T; t++)
            for (int i = 0; i < 4; i++)
                lo[t][i] = hi[t][i] = vdupq_n_s32(0);
        for (int32_t ch = 0; ch < bk->nchunk; ch++) {
            const int16_t *wc = bk->wd + ((int64_t)ch * bk->ncomp + c) * LUT_IG_WORDS;
            const int16_t *qc = bk->q + (int64_t)t0 * bk->qstride + ch * LUT_CHUNK;
            for (int32_t kp = 0; kp < LUT_CHUNK / 2; kp++) {
                int16x8_t wv[4];
                for (int i = 0; i < 4; i++)
                    wv[i] = vld1q_s16(wc + kp * 2 * LUT_TILE + 8 * i);
                for (int32_t t = 0; t < T; t++) {
                    int32_t pair;
                    memcpy(&pair, qc + (int64_t)t * bk->qstride + 2 * kp, sizeof pair);
                    int16x8_t qv = vreinterpretq_s16_s32(vdupq_n_s32(pair));
                    for (int i = 0; i < 4; i++) {
                        lo[t][i] = vmlal_s16(lo[t][i], vget_low_s16(wv[i]), vget_low_s16(qv));
                        hi[t][i] = vmlal_high_s16(hi[t][i], wv[i], qv);
                    }
                }
            }
        }
        const float *scp = bk->sc + (bk->uniform ? 0 : c) * LUT_TILE;
        for (int32_t t = 0; t < T; t++) {
            for (int i = 0; i < 4; i++)
                s[t][i] = vpaddq_s32(lo[t][i], hi[t][i]);
            if (bk->acc) {
                int32_t tmp[LUT_TILE];
                for (int i = 0; i < 4; i++)
                    vst1q_s32(tmp + 4 * i, s[t][i]);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    bk->acc[(int64_t)(t0 + t) * bk->acc_tok + (int64_t)r * bk->acc_row + (int64_t)c * bk->nb] = tmp[r];
            }
            for (int i = 0; i < 4; i++) {
                if (bk->halve) /* even sums: the arithmetic shift halves exactly */
                    s[t][i] = vshrq_n_s32(s[t][i], 1);
                if (bk->uniform) /* vshlq shifts bits: defined for negative lanes */
                    u[t][i] = vaddq_s32(u[t][i], vshlq_s32(s[t][i], vdupq_n_s32(c)));
                else
                    y[t][i] = vfmaq_f32(y[t][i], vcvtq_f32_s32(s[t][i]), vmulq_f32(vld1q_f32(scp + 4 * i), tsv[t]));
            }
        }
    }
    for (int32_t t = 0; t < T; t++)
        for (int i = 0; i < 4; i++) {
            if (bk->uniform)
                y[t][i] = vfmaq_f32(y[t][i], vcvtq_f32_s32(u[t][i]), vmulq_f32(vld1q_f32(bk->sc + 4 * i), tsv[t]));
            if (bk->z)
                y[t][i] = vfmaq_f32(y[t][i], vld1q_f32(bk->z + 4 * i), vdupq_n_f32(bk->xs[(int64_t)(t0 + t) * bk->ng]));
            vst1q_f32(bk->yacc + (int64_t)(t0 + t) * LUT_TILE + 4 * i, y[t][i]);
        }
}

void lut_iblock_neon(const lut_iblock *bk) {
    int32_t t = 0;
    for (; t + 2 <= bk->n; t += 2)
        iblock_tokens(bk, t, 2);
    for (; t < bk->n; t++)
        iblock_tokens(bk, t, 1);
}
