/* lutengine LUT matmul core: public C API.
 *
 * A packed linear layer W[M,K] is P binary planes B_p in {-1,+1} with fp16
 * scales per plane per group of G activations, and optional fp16 offsets:
 *     W ~= sum_p s_p[m,g] * B_p[m,k] + z[m,g]
 * uniform=1 stores only plane 0's scale h; plane p's is h * 2^p (a uniform
 * grid of step s has h = s/2), so S = 1 scale per row and group, else S = P.
 * scale8=1 stores each scale as an 8-bit float (lut_f8 in lut_internal.h) and
 * each offset as an int8 count of eighths of the row and group's first scale:
 * 4-bit uniform groups of 32 then cost 4 + 8/32 + 8/32 = 4.5 bits per weight.
 * int_grid=1 (uniform, no stored offsets) implies each group's offset as -h:
 * the levels are 2h times the integers -2^(P-1) .. 2^(P-1)-1, zero among them,
 * the grid of llama.cpp's Q4_0, Q5_0 and Q8_0, kept exactly at their bits.
 * The byte layout is specified by lutkernels/layout.py (the executable spec):
 *     planes  uint8  [ceil(M/16)][K/32][P][64]
 *     scales  fp16   [ceil(M/16)][K/G][S][16]   (uint8 codes when scale8)
 *     offsets fp16   [ceil(M/16)][K/G][16]      (int8 when scale8; or NULL)
 */
#ifndef LUT_H
#define LUT_H
#include <stdint.h>

typedef struct lut_layer {
    int32_t M, K, P, G;
    int32_t uniform; /* 0: a scale per plane; 1: one scale, plane p's implied as scale * 2^p */
    int32_t scale8;  /* 0: fp16 scales and offsets; 1: 8-bit float scales, int8 offsets */
    int32_t int_grid; /* 1: offsets not stored, each -h (uniform layers only) */
    const uint8_t *planes;
    const void *scales;
    const void *offsets;
} lut_layer;

enum { LUT_ISA_SCALAR = 0, LUT_ISA_AVX2 = 1, LUT_ISA_AVX512 = 2, LUT_ISA_NEON = 3, LUT_ISA_COUNT = 4 };

enum {
    LUT_OK = 0,
    LUT_EINVAL = -1,   /* shape or pointer argument out of range */
    LUT_ENOMEM = -2,   /* workspace allocation failed */
    LUT_EISA = -3,     /* requested ISA not supported by this CPU or build */
    LUT_ETHREAD = -4   /* could not start worker threads */
};

/* y[n][M] = W x[n][K]. Activations are rounded to integers per block, and the
 * tables hold their exact sums. exact=0: integers small enough that every
 * table entry fits int8 (one byte plane, fast); exact=1: 12-bit integers,
 * tables kept as two byte planes.
 * acc, if not NULL, receives the integer block sums
 * int32 [n][ceil(M/16)*16][P][K/Kb] (Kb = lut_act_block(K,G)) for testing. */
int lut_gemm(const lut_layer *w, const float *x, int32_t n, float *y, int32_t exact, int32_t *acc);

/* y[l][n][M_l] = W_l x[n][K] for count <= LUT_FUSE_MAX layers sharing K and G (each its
 * own M, planes and scale format): the activations' tables are built once and one pool
 * run covers every layer's tiles, so a decode step's q/k/v or gate/up pay one hand-off.
 * Each y[l] equals lut_gemm's for W_l bit for bit. */
#define LUT_FUSE_MAX 4
int lut_gemm_multi(const lut_layer *const *w, int32_t count, const float *x, int32_t n, float *const *y,
                   int32_t exact);

/* Calls with at least n tokens run the integer GEMM (lut_internal.h), whose outputs
 * and sums equal the tables' bit for bit; n = 0 restores the defaults (lut.c, chosen per
 * path by speed), n < 0 is LUT_EINVAL. lut_igemm_rows gives the override, 0 for none. */
int lut_set_igemm_rows(int32_t n);
int32_t lut_igemm_rows(void);
/* on = 0: the integer GEMM keeps to its int16 variant even where the CPU has the int8 one
 * (the same outputs; tests cover both on one machine); 1, the default: int8 where it can. */
int lut_set_int8(int32_t on);

/* A trellis-coded layer (lutkernels/trellis.py is the spec): k bits per weight,
 * 1..6; streams uint8 [K][2*k*ceil(M/16) + 1] then 16 zero bytes; scales
 * float32 [ceil(M/16)*16]. */
typedef struct lut_trellis {
    int32_t M, K, k;
    const uint8_t *streams;
    const float *scales;
} lut_trellis;

/* y[n][M] = W x[n][K]; activations quantized to int8 per block of 32. acc, if
 * not NULL, receives the integer block sums int32 [n][ceil(M/16)*16][K/32]. */
int lut_trellis_gemm(const lut_trellis *w, const float *x, int32_t n, float *y, int32_t *acc);

/* Activations that share one table scale (and one integer accumulator). */
int32_t lut_act_block(int32_t K, int32_t G);

/* Bitmask of ISAs this CPU and build can run (1 << LUT_ISA_*). */
int32_t lut_isa_supported(void);
/* Current ISA; initially the best supported one, or LUTENGINE_ISA if set. */
int32_t lut_isa(void);
int lut_set_isa(int32_t isa);
const char *lut_isa_name(int32_t isa);

int lut_set_threads(int32_t n);
int32_t lut_threads(void);

/* Benchmark roofline (c/roofline.c): sums buf[0..n) split across the
 * lut_set_threads pool, vectorised and bandwidth-bound; returns the sum so
 * the reads are kept. Not for concurrent use with itself, lut_gemm or
 * lut_set_threads. */
double lut_stream_read(const float *buf, int64_t n);

/* Decode-step helpers (c/ops.c), one token, float32, no allocation.
 * x += delta (delta may be NULL); y = w * x / sqrt(mean(x^2) + eps). */
void lut_add_rmsnorm(float *x, const float *delta, const float *w, int32_t n, float eps, float *y);
/* Element types of the KV cache. LUT_KV_Q8: int8 per (position, kv head) row of d
 * values, symmetric, with a float32 scale max|x|/127 per row (x = q * scale). */
#define LUT_KV_F32 0
#define LUT_KV_F16 1
#define LUT_KV_Q8 2
/* Cache rows one attention step converts at a time (the size of its work buffer). */
#define LUT_ATTN_ROWS 4
/* q [heads*d], k and v [kv_heads*d]: add the biases (each may be NULL), apply
 * RoPE (HF rotate-half; cos/sin tables [positions][d/2]) at `pos`, store k and v
 * in row `pos` of the caches [positions][kv_heads*d] of type kv_type (float,
 * IEEE half bits rounded to nearest even, or int8; k_scale and v_scale
 * [positions][kv_heads] are used by LUT_KV_Q8 only and may be NULL otherwise),
 * then grouped-query attention of q over rows 0..pos (window > 0: only the last
 * `window` of them) into out [heads*d], scores scaled by 1/sqrt(query_scale)
 * (d, unless the model sets its own).
 * scores: heads*(pos+1) floats; work: LUT_ATTN_ROWS*d + heads floats. */
void lut_attention_step(float *q, float *k, float *v, const float *q_bias, const float *k_bias,
                        const float *v_bias, const float *cos, const float *sin, int32_t kv_type,
                        void *k_cache, void *v_cache, float *k_scale, float *v_scale, int32_t pos,
                        int32_t heads, int32_t kv_heads, int32_t d, float query_scale, int32_t window,
                        float *scores, float *work, float *out);
/* A prompt's attention: queries q [n][heads*d] (RoPE applied) at positions pos..pos+n-1
 * over float32 keys and values k, v [pos+n][kv_heads*d] (the cache as floats), into
 * out [n][heads*d], on the lut_set_threads pool. Each query's output equals
 * lut_attention_step's for it bit for bit (same sums in the same order). scratch holds
 * at least lut_attention_prompt_scratch(pos + n, heads, kv_heads) floats (for the pool's
 * size at the call); LUT_EINVAL for less or a bad argument. */
int lut_attention_prompt(const float *q, const float *k, const float *v, int32_t pos, int32_t n, int32_t heads,
                         int32_t kv_heads, int32_t d, float query_scale, int32_t window, float *scratch,
                         int64_t scratch_floats, float *out);
int64_t lut_attention_prompt_scratch(int32_t positions, int32_t heads, int32_t kv_heads);
/* g = silu(g) * u */
void lut_silu_mul(float *g, const float *u, int32_t n);
/* g = gelu_tanh(g) * u (GELU's tanh approximation) */
void lut_gelu_tanh_mul(float *g, const float *u, int32_t n);
/* each of the `heads` runs of d floats of x in place: x = w * x / sqrt(mean(x^2) + eps) */
void lut_head_rmsnorm(float *x, int32_t heads, int32_t d, const float *w, float eps);
/* Each of `rows` rows of x [rows][a*n] (n a power of two) in place: x <- R x for
 * the orthogonal R = (mix (x) H_n / sqrt(n)) diag(signs); tmp holds a*n floats.
 * lutkernels/reference.py rotate_rows is its definition. */
void lut_rotate_rows(float *x, int64_t rows, int32_t a, int32_t n, const float *signs,
                     const float *mix, float *tmp);

#endif
