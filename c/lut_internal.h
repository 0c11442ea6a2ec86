/* Shared between the dispatcher (lut.c) and the per-ISA tile kernels. */
#ifndef LUT_INTERNAL_H
#define LUT_INTERNAL_H
#include <stdint.h>
#include <string.h>
#include "lut.h"

#define LUT_TILE 16   /* rows per tile: one 16-byte table lane of lookups */
#define LUT_CHUNK 32  /* activations per 64-byte chunk of one plane of a tile */
#define LUT_TAB 16    /* table entries per group of 4 activations */

/* Everything a tile kernel reads for one call. Tables are per token:
 * tab[tok][t][K/4][16] int8 (t < ntab byte planes, 1 fast / 2 exact),
 * tscale[tok][K/Kb], xsum[tok][K/G]. */
typedef struct lut_job {
    const lut_layer *w;
    int32_t Kb, ntab;
    const int8_t *tab;
    const float *tscale, *xsum;
    float *y;
    int32_t *acc;
} lut_job;

typedef void (*lut_tile_fn)(const lut_job *job, int32_t tile, int32_t tok);

void lut_tile_scalar(const lut_job *job, int32_t tile, int32_t tok);
#if defined(__x86_64__) || defined(__i386__)
void lut_tile_avx2(const lut_job *job, int32_t tile, int32_t tok);
void lut_tile_avx512(const lut_job *job, int32_t tile, int32_t tok);
#endif
#if defined(__aarch64__)
void lut_tile_neon(const lut_job *job, int32_t tile, int32_t tok);
#endif

static inline int64_t lut_tab_stride(const lut_job *j) { return (int64_t)j->ntab * j->w->K * 4; }

/* Exact IEEE half -> float (subnormals included), the scalar twin of F16C/NEON fcvt. */
static inline float lut_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0) {
        float f = (float)m * 0x1p-24f;
        return sign ? -f : f;
    }
    bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Thread pool: fn(ctx, ith, nth) runs once on each of nth threads (the caller is ith 0). */
/* fn(ctx, chunk, nchunks) runs once for every chunk in [0, nchunks), on any thread,
 * in any order: it must compute its share from (chunk, nchunks) alone. */
typedef void (*lut_pool_fn)(void *ctx, int32_t chunk, int32_t nchunks);
void lut_pool_run(lut_pool_fn fn, void *ctx);
int32_t lut_pool_chunks(void);
int lut_pool_resize(int32_t n);
int32_t lut_pool_size(void);

#endif
