/* Shared between the dispatcher (lut.c) and the per-ISA tile kernels. */
#ifndef LUT_INTERNAL_H
#define LUT_INTERNAL_H
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include "lut.h"

#define LUT_TILE 16   /* rows per tile: one 16-byte table lane of lookups */
#define LUT_CHUNK 32  /* activations per 64-byte chunk of one plane of a tile */
#define LUT_TAB 16    /* table entries per group of 4 activations */

/* Everything a tile kernel reads for one call. Tables are per token:
 * tab[tok][t][K/4][16] int8 (t < ntab byte planes, 1 fast / 2 exact),
 * tscale[tok][K/Kb], xsum[tok][K/G]. Fast tables hold the halves of the sums
 * (all even: lut.c act_ints) and their scales are doubled to match. */
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

/* The block sum a tile kernel reports in acc: twice its lookups' sum s with fast tables,
 * which hold halves; s itself with exact ones. */
static inline int32_t lut_block_sum(int32_t ntab, int32_t s) { return ntab == 1 ? 2 * s : s; }

/* Each SIMD kernel writes its tile loop once, as an always-inline
 * body(job, tile, tok, ntab, uniform, scale8, keep), and defines its entry point
 * with this macro. The calls inference makes (fast tables, no per-plane sums
 * kept) get copies with the layer's mode as constants: the compiler then drops
 * the branches between blocks and keeps the loop state in registers. That is
 * most of the time at small groups (G = 64 puts 2 chunks in a block): on
 * 1536x576 AVX-512 went from 22.8 to 17.7 us per GEMV at P = 1 and from 33.6 to
 * 23.4 at P = 2. Per-plane bodies also set their plane run R to a literal 1,
 * which lut_plane_run would return anyway, so the copies know it. */
#define LUT_DEFINE_TILE(attrs, name, body)                                                                             \
    attrs void name(const lut_job *j, int32_t tile, int32_t tok) {                                                    \
        const lut_layer *w = j->w;                                                                                     \
        if (j->acc || j->ntab != 1)                                                                                    \
            body(j, tile, tok, j->ntab, w->uniform, w->scale8, j->acc != NULL);                                       \
        else if (w->uniform)                                                                                           \
            w->scale8 ? body(j, tile, tok, 1, 1, 1, 0) : body(j, tile, tok, 1, 1, 0, 0);                              \
        else                                                                                                           \
            w->scale8 ? body(j, tile, tok, 1, 0, 1, 0) : body(j, tile, tok, 1, 0, 0, 0);                              \
    }

/* Integer GEMM (n >= lut_igemm_rows() tokens, either mode): a tile's weights are
 * decoded once per call, a chunk of 32 columns at a time, to int16 and every
 * token's integer activations multiply them into int32 block sums. They are
 * exact integers, so they equal the tables' sums: the same integers
 * enter the same float steps, and the output is the LUT path's bit for bit.
 * Decoded chunk: int16 [16 column pairs][16 rows][2], the pair layout of
 * vpmaddwd / vpdpwssd (one 32-bit broadcast of a token's two activations
 * multiplies 16 rows). A component is one plane's +-1 weights or, for a
 * uniform layer, sum_p 2^p B_p in one (|.| <= 255). Bound: |q| <= 2047, so a
 * block of Kb <= 256 columns sums at most 256 * 255 * 2047 < 2^27 in int32. */
#define LUT_IG_WORDS (LUT_CHUNK * LUT_TILE) /* int16 per decoded chunk and component */

/* The int8 variant (fast mode, where |q| <= 127; AVX-512 with VNNI, VBMI and
 * BITALG): a component's chunk decodes to the unsigned v of 2 v - top as
 * uint8 [8 column quads][16 rows][4], the layout of vpdpbusd (one 32-bit
 * broadcast of a token's four activations multiplies 16 rows), and the sums
 * are 2 sum(v q) - top * sum(q), the same integers, halved as sum(v q) -
 * top * sum(q) / 2 (sum(q) is even). Bound: 256 * 255 * 127 < 2^23. It takes
 * a whole tile at a time (every block decoded first), so a token's 16 outputs
 * stay in a register across the blocks instead of a load and a store each. */
#define LUT_IG_BYTES (LUT_CHUNK * LUT_TILE) /* uint8 per decoded chunk and component */

typedef struct lut_itile8 {
    int32_t n, nb, cpb, ncomp, uniform, P, Kb, ng, bpg, nr; /* nr: the tile's rows below M */
    const uint8_t *wd8;                                     /* [nb * cpb][ncomp][LUT_IG_BYTES] */
    const int8_t *q8;                                       /* block b, token t at q8 + (b * n + t) * Kb */
    const int32_t *qs;                                      /* half their sum at qs[b * n + t] */
    const float *ts;                                        /* [n][nb] */
    const float *sc;                                        /* [nb][S][16] (S: 1 uniform, else P) */
    const float *z;                                         /* [ng][16], or NULL without offsets */
    const float *xs;                                        /* [n][ng] */
    float *y;                                               /* token t's 16 rows at y + t * ystride */
    int64_t ystride;
    int32_t *acc; /* NULL, or token 0's row 0 component 0 block 0 sum; strides: */
    int64_t acc_tok;
    int32_t acc_row; /* (component: nb, block: 1) */
} lut_itile8;

/* One tile and block for n tokens: the kernels' unit. */
typedef struct lut_iblock {
    int32_t n, nchunk, ncomp, uniform, P; /* ncomp: 1 (a uniform layer's planes in one) or P */
    const int16_t *wd;                    /* [nchunk][ncomp][LUT_IG_WORDS] */
    const int16_t *q;                     /* token t's activations of the block at q + t * qstride */
    int32_t halve;                        /* fast mode: the sums are halved, as the tables' */
    int32_t qstride, nb, ng;
    const float *ts;  /* token t's block scale at ts[t * nb] */
    const float *sc;  /* [ncomp][16] rows' scales (uniform: plane 0's, [1][16]) */
    const float *z;   /* [16] offsets, at a group's last block of a layer with offsets; else NULL */
    const float *xs;  /* token t's group sum at xs[t * ng] */
    float *yacc;      /* [n][16] */
    int32_t *acc;     /* NULL, or token 0's row 0 plane 0 sum of this block; */
    int64_t acc_tok;  /* strides: token, row (plane: nb) */
    int32_t acc_row;
} lut_iblock;

/* The 16 rows' scales of plane s (0 when uniform) and offsets of group grp as float
 * (h: the rows' plane-0 scales): exact decodes, shared by the scalar paths. */
void lut_scales16(const lut_layer *w, int64_t grp, int32_t s, float out[LUT_TILE]);
void lut_offsets16(const lut_layer *w, int64_t grp, const float h[LUT_TILE], float out[LUT_TILE]);
typedef void (*lut_iblock_fn)(const lut_iblock *b);
/* A block's float scales for the integer GEMM: sc [nsc][16] of planes 0..nsc-1 and, when
 * `offsets` (a group's last block of a layer with offsets), z [16]: the tile kernels' exact
 * decodes, vectorised where the ISA can (scalar, the per-block decode took most of a batched
 * decode step's head: 49152 x 576, 4 rows, fp16 scales and offsets). */
typedef void (*lut_bscales_fn)(const lut_layer *w, int64_t grp, int32_t nsc, int32_t offsets, float *sc, float *z);
void lut_bscales_scalar(const lut_layer *w, int64_t grp, int32_t nsc, int32_t offsets, float *sc, float *z);
/* Decodes one chunk's planes to the int8 variant's components (ncomp 1: all planes in one). */
typedef void (*lut_decode8_fn)(const uint8_t *wc, int32_t P, int32_t ncomp, uint8_t *wd8);
void lut_iblock_scalar(const lut_iblock *b);
#if defined(__x86_64__) || defined(__i386__)
void lut_iblock_avx2(const lut_iblock *b);
void lut_iblock_avx512(const lut_iblock *b);
void lut_bscales_avx2(const lut_layer *w, int64_t grp, int32_t nsc, int32_t offsets, float *sc, float *z);
void lut_bscales_avx512(const lut_layer *w, int64_t grp, int32_t nsc, int32_t offsets, float *sc, float *z);
/* The int8 variant; call only where lut_int8_dot() says the CPU has it. */
int lut_int8_dot(void);
void lut_itile8_avx512(const lut_itile8 *t);
void lut_decode8_avx512(const uint8_t *wc, int32_t P, int32_t ncomp, uint8_t *wd8);
#endif
#if defined(__aarch64__)
void lut_iblock_neon(const lut_iblock *b);
#endif

/* Exact-mode activations are integers up to LUT_EXACT_Q in magnitude: 12 bits.
 * Qwen2.5-Coder's rtn8g32 file, wiki / c4: 12-bit 20.309 / 53.219, 8-bit
 * 20.359 / 53.148, int8 tables (fast) 20.331 / 53.316, dense 20.292 / 53.199:
 * at 5 bits and more the activations' rounding, not the weights', decides. */
#define LUT_EXACT_Q 2047

/* Fast-mode block scale: the largest sum of 4 |x| over LUT_FAST_SUM, or max|x| over
 * LUT_FAST_Q if that is larger (lut.c act_ints). */
#define LUT_FAST_SUM 252
#define LUT_FAST_Q 127

/* Uniform layers: plane p's scale is h * 2^p, so every kernel adds the planes'
 * integer block sums as sum_p 2^p * S_p, then converts and scales once (one
 * multiply and one fma per row and block instead of P). Bound: a fast-mode
 * |S_p| <= 64 * 127 (halves) and an exact-mode S_p = lo + 256*hi sums at most 64
 * table entries |T| <= 4 * LUT_EXACT_Q = 8188, so |S_p| <= 524032; with
 * P <= 8, |sum_p 2^p S_p| <= 255 * 524032 < 2^28. It fits int32; the
 * conversion to float32 is exact in fast mode (< 2^24) and otherwise rounds
 * to nearest even, the same on every ISA. */

/* Bytes ahead of the current weight chunk that the x86 kernels prefetch: the
 * planes stream once per token, and on the 2-core VM the hardware prefetcher
 * alone left decode at ~60% of the speed this reaches (SmolLM2 tg64, 1 thread:
 * 57-61 against 78-81 tok/s, same run). The address is formed as an integer:
 * it may lie past the array, where pointer arithmetic would be undefined, and
 * a prefetch never faults. */
#define LUT_PREFETCH 2048
#define LUT_PREFETCH_AT(p) ((const char *)((uintptr_t)(p) + LUT_PREFETCH))

/* Planes a SIMD kernel may sum in int16 before widening (a "run"): a uniform
 * layer weights plane p by 2^p, so runs of R planes starting at p0 sum
 * sum_q 2^q S_{p0+q}, then widen, shift by p0 and add. Every lookup is at most
 * 128 in magnitude (fast entries and exact low bytes alike) and a row takes
 * Kb/4 of them per block, so a run is bounded by (2^R - 1) * 32 * Kb, kept
 * below 2^15: R = 5 at Kb = 32, 4 at 64, 3 at 128, 2 at 256. Per-plane layers,
 * and calls that ask for each plane's sums (acc), take runs of 1. */
static inline int32_t lut_plane_run(const lut_job *j) {
    int32_t r = 1;
    if (j->w->uniform && !j->acc)
        while (r < j->w->P && ((1 << (r + 1)) - 1) * 32 * j->Kb < 32768)
            r++;
    return r;
}

/* The 16 rows' scales of plane s (0 when uniform) for group grp = tile * (K/G) + g
 * (the kernels count it, so no division runs per block): fp16 [16], or uint8
 * codes [16] when scale8. */
static inline const void *lut_scale_ptr(const lut_layer *w, int64_t grp, int32_t s) {
    int64_t i = (grp * (w->uniform ? 1 : w->P) + s) * LUT_TILE;
    return w->scale8 ? (const void *)((const uint8_t *)w->scales + i) : (const void *)((const uint16_t *)w->scales + i);
}

/* Whether the layer adds an offset per row and group (stored, or implied by int_grid). */
static inline int lut_has_offsets(const lut_layer *w) { return w->offsets != NULL || w->int_grid; }

/* The 16 rows' offsets for group grp (as lut_scale_ptr): fp16 [16], or int8 [16] when scale8. */
static inline const void *lut_offset_ptr(const lut_layer *w, int64_t grp) {
    int64_t i = grp * LUT_TILE;
    return w->scale8 ? (const void *)((const int8_t *)w->offsets + i) : (const void *)((const uint16_t *)w->offsets + i);
}

/* 8-bit float scale (scale8 layers): code 0 is 0 (padding rows, empty groups);
 * code u = 16e + m otherwise stands for (1 + m/16) * 2^(e - 13), from about
 * 1.3e-4 to 7.75, 16 steps per octave (relative spacing <= 1/16). Its float32
 * bits are ((e + 114) << 23) | (m << 19): an exact decode, the same integer
 * operations on every ISA. An int8 offset c stands for (h * c) * 0.125 with h
 * the row and group's first scale: h has 5 significant bits and c 8, so both
 * products are exact in float32. */
#define LUT_F8_BIAS 114
static inline float lut_f8(uint8_t u) {
    uint32_t bits = u ? ((uint32_t)(u >> 4) + LUT_F8_BIAS) << 23 | (uint32_t)(u & 15) << 19 : 0;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

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

/* Held by every call that uses the shared workspace or resizes the pool. */
extern pthread_mutex_t lut_call_mu;
/* The shared workspace, grown to at least `need` bytes (NULL if that fails); hold lut_call_mu. */
void *lut_workspace(size_t need);

/* Thread pool: fn(ctx, ith, nth) runs once on each of nth threads (the caller is ith 0). */
/* fn(ctx, chunk, nchunks) runs once for every chunk in [0, nchunks), on any thread,
 * in any order: it must compute its share from (chunk, nchunks) alone. */
typedef void (*lut_pool_fn)(void *ctx, int32_t chunk, int32_t nchunks);
void lut_pool_run(lut_pool_fn fn, void *ctx);
int32_t lut_pool_chunks(void);
int lut_pool_resize(int32_t n);
int32_t lut_pool_size(void);

#endif
