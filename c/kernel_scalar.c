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
static void scales16(const lut_layer *w, int64_t grp, int32_t s, float out[LUT_TILE]) {
    const void *p = lut_scale_ptr(w, grp, s);
    for (int32_t r = 0; r < LUT_TILE; r++)
        out[r] = w->scale8 ? lut_f8(((const uint8_t *)p)[r]) : lut_h2f(((const uint16_t *)p)[r]);
}

/* The 16 rows' offsets as float; h: the rows' first scales (scales16, plane 0). */
static void offsets16(const lut_layer *w, int64_t grp, const float h[LUT_TILE], float out[LUT_TILE]) {
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
                    j->acc[(((int64_t)tok * rows + tile * LUT_TILE + r) * P + p) * nb + b] = s[r];
                if (w->uniform)
                    u[r] += s[r] * (1 << p); /* a multiply: shifting a negative int left is UB in C */
            }
            if (!w->uniform) {
                scales16(w, grp, p, sc);
                for (int32_t r = 0; r < LUT_TILE; r++)
                    yacc[r] = scale_add(yacc[r], s[r], sc[r], ts[b]);
            }
        }
        if (w->uniform) {
            scales16(w, grp, 0, sc);
            for (int32_t r = 0; r < LUT_TILE; r++)
                yacc[r] = scale_add(yacc[r], u[r], sc[r], ts[b]);
        }
        if (++bg == bpg) { /* the group's last block */
            if (lut_has_offsets(w)) {
                scales16(w, grp, 0, sc);
                offsets16(w, grp, sc, z);
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
