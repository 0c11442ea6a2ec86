/* Portable tile kernel: the reference every SIMD path must match bit for bit
 * on integer sums and (by using the same mul-then-fma order) on floats. */
#include <math.h>
#include "lut_internal.h"

/* Integer sums of one plane over one block for 16 rows, for one table byte plane.
 * Bound: fast-mode entries are in [-127,127], exact-mode bytes in [-128,127];
 * a block holds Kb/4 <= 64 groups, so |sum| <= 128*64 = 8192, which also fits
 * the int16 accumulators of the SIMD paths. */
static void block_sums(const lut_job *j, const uint8_t *wt, const int8_t *tab, int32_t c0, int32_t p, int32_t *out) {
    int32_t P = j->w->P;
    for (int32_t r = 0; r < LUT_TILE; r++)
        out[r] = 0;
    for (int32_t c = c0; c < c0 + j->Kb / LUT_CHUNK; c++) {
        const uint8_t *wb = wt + ((int64_t)c * P + p) * 64;
        const int8_t *tb = tab + (int64_t)c * 8 * LUT_TAB;
        for (int32_t b = 0; b < 64; b++) {
            int32_t lane = b >> 4;
            out[b & 15] += tb[lane * LUT_TAB + (wb[b] & 15)] + tb[(lane + 4) * LUT_TAB + (wb[b] >> 4)];
        }
    }
}

/* y + s * (scale * ts): the rounding order every SIMD path repeats. */
static inline float scale_add(float y, int32_t s, float scale, float ts) {
    return fmaf((float)s, scale * ts, y);
}

/* The 16 rows' scales of plane s (0 when uniform) as float. */
void lut_scales16(const lut_layer *w, int64_t grp, int32_t s, float out[LUT_TILE]) {
    const void *p = lut_scale_ptr(w, grp, s);
    for (int32_t r = 0; r < LUT_TILE; r++)
        out[r] = w->scale8 ? lut_f8(((const uint8_t *)p)[r]) : lut_h2f(((const uint16_t *)p)[r]);
}

/* The 16 rows' offsets as float; h: the rows' first scales (lut_scales16, plane 0). */
void lut_offsets16(const lut_layer *w, int64_t grp, const float h[LUT_TILE], float out[LUT_TILE]) {
    const void *p = w->offsets ? lut_offset_ptr(w, grp) : NULL;
    for (int32_t r = 0; r < LUT_TILE; r++)
        out[r] = !p ? -h[r] : w->scale8 ? h[r] * (float)((const int8_t *)p)[r] * 0.125f : lut_h2f(((const uint16_t *)p)[r]);
}

void lut_tile_scalar(const lut_job *j, int32_t tile, int32_t tok) {
    const lut_layer *w = j->w;
    int32_t K = w->K, P = w->P, nb = K / j->Kb, ng = K / w->G, bpg = w->G / j->Kb;
    int32_t nchunk = K / LUT_CHUNK, rows = ((w->M + LUT_TILE - 1) / LUT_TILE) * LUT_TILE;
    const uint8_t *wt = w->planes + (int64_t)tile * nchunk * P * 64;
    const int8_t *tab = j->tab + tok * lut_tab_stride(j);
    const float *ts = j->tscale + (int64_t)tok * nb, *xs = j->xsum + (int64_t)tok * ng;
    float yacc[LUT_TILE] = {0};
    int32_t g = 0, bg = 0; /* block b's group and its place there: counted, so no division runs per block */
    for (int32_t b = 0; b < nb; b++) {
        int64_t grp = (int64_t)tile * ng + g;
        float sc[LUT_TILE], z[LUT_TILE];
        int32_t u[LUT_TILE] = {0}; /* uniform: sum_p 2^p * s_p (bound in lut_internal.h) */
        for (int32_t p = 0; p < P; p++) {
            int32_t s[LUT_TILE], s_hi[LUT_TILE];
            block_sums(j, wt, tab, b * (j->Kb / LUT_CHUNK), p, s);
            if (j->ntab == 2) {
                block_sums(j, wt, tab + (int64_t)K * 4, b * (j->Kb / LUT_CHUNK), p, s_hi);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    s[r] += 256 * s_hi[r];
            }
            for (int32_t r = 0; r < LUT_TILE; r++) {
                if (j->acc)
                    j->acc[(((int64_t)tok * rows + tile * LUT_TILE + r) * P + p) * nb + b] = lut_block_sum(j->ntab, s[r]);
                if (w->uniform)
                    u[r] += s[r] * (1 << p); /* a multiply: shifting a negative int left is UB in C */
            }
            if (!w->uniform) {
                lut_scales16(w, grp, p, sc);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    yacc[r] = scale_add(yacc[r], s[r], sc[r], ts[b]);
            }
        }
        if (w->uniform) {
            lut_scales16(w, grp, 0, sc);
            for (int32_t r = 0; r < LUT_TILE; r++)
                yacc[r] = scale_add(yacc[r], u[r], sc[r], ts[b]);
        }
        if (++bg == bpg) { /* the group's last block */
            if (lut_has_offsets(w)) {
                lut_scales16(w, grp, 0, sc);
                lut_offsets16(w, grp, sc, z);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    yacc[r] = fmaf(z[r], xs[g], yacc[r]);
            }
            bg = 0;
            g++;
        }
    }
    for (int32_t r = 0; r < LUT_TILE && tile * LUT_TILE + r < w->M; r++)
        j->y[(int64_t)tok * w->M + tile * LUT_TILE + r] = yacc[r];
}

void lut_bscales_scalar(const lut_layer *w, int64_t grp, int32_t nsc, int32_t offsets, float *sc, float *z) {
    for (int32_t p = 0; p < nsc; p++)
        lut_scales16(w, grp, p, sc + p * LUT_TILE);
    if (offsets) {
        float h[LUT_TILE];
        lut_scales16(w, grp, 0, h);
        lut_offsets16(w, grp, h, z);
    }
}

/* One tile and block of the integer GEMM for all tokens (lut_iblock in
 * lut_internal.h): the reference of the SIMD paths, which repeat its float
 * steps in the same order (the LUT kernels' order, hence the same outputs). */
void lut_iblock_scalar(const lut_iblock *bk) {
    for (int32_t t = 0; t < bk->n; t++) {
        const int16_t *q = bk->q + (int64_t)t * bk->qstride;
        float *y = bk->yacc + (int64_t)t * LUT_TILE, tsv = bk->ts[(int64_t)t * bk->nb];
        int32_t u[LUT_TILE] = {0};
        for (int32_t c = 0; c < bk->ncomp; c++) {
            int32_t s[LUT_TILE] = {0};
            for (int32_t ch = 0; ch < bk->nchunk; ch++) {
                const int16_t *wc = bk->wd + ((int64_t)ch * bk->ncomp + c) * LUT_IG_WORDS, *qc = q + ch * LUT_CHUNK;
                for (int32_t kp = 0; kp < LUT_CHUNK / 2; kp++)
                    for (int32_t r = 0; r < LUT_TILE; r++)
                        s[r] += wc[kp * 32 + 2 * r] * qc[2 * kp] + wc[kp * 32 + 2 * r + 1] * qc[2 * kp + 1];
            }
            for (int32_t r = 0; r < LUT_TILE; r++) {
                if (bk->acc)
                    bk->acc[(int64_t)t * bk->acc_tok + (int64_t)r * bk->acc_row + (int64_t)c * bk->nb] = s[r];
                if (bk->halve)
                    s[r] /= 2; /* even */
                if (bk->uniform)
                    u[r] += s[r] * (1 << c);
                else
                    y[r] = scale_add(y[r], s[r], bk->sc[c * LUT_TILE + r], tsv);
            }
        }
        if (bk->uniform)
            for (int32_t r = 0; r < LUT_TILE; r++)
                y[r] = scale_add(y[r], u[r], bk->sc[r], tsv);
        if (bk->z)
            for (int32_t r = 0; r < LUT_TILE; r++)
                y[r] = fmaf(bk->z[r], bk->xs[(int64_t)t * bk->ng], y[r]);
    }
}
