"""cffi build of the C core (c/). Run by setup.py at install time: the only
toolchain needed is a C compiler. ISA-specific kernels carry target
attributes and are chosen at run time, so the build never uses -march=native."""
import os
import platform

from cffi import FFI

# setuptools wants paths relative to the project root, where setup.py runs.
C_DIR = "c"
SOURCES = ["lut.c", "pool.c", "kernel_scalar.c", "roofline.c", "ops.c", "trellis.c"]
if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
    SOURCES += ["kernel_avx2.c", "kernel_avx512.c"]
elif platform.machine().lower() in ("aarch64", "arm64"):
    SOURCES += ["kernel_neon.c"]

CDEF = """
typedef struct lut_layer {
    int32_t M, K, P, G;
    int32_t uniform;
    int32_t scale8;
    int32_t int_grid;
    const uint8_t *planes;
    const void *scales;
    const void *offsets;
} lut_layer;
int lut_gemm(const lut_layer *w, const float *x, int32_t n, float *y, int32_t exact, int32_t *acc);
#define LUT_FUSE_MAX ...
int lut_gemm_multi(const lut_layer *const *w, int32_t count, const float *x, int32_t n, float *const *y,
                   int32_t exact);
typedef struct lut_trellis {
    int32_t M, K, k;
    const uint8_t *streams;
    const float *scales;
} lut_trellis;
int lut_trellis_gemm(const lut_trellis *w, const float *x, int32_t n, float *y, int32_t *acc);
int32_t lut_act_block(int32_t K, int32_t G);
int lut_set_igemm_rows(int32_t n);
int lut_set_int8(int32_t on);
int32_t lut_isa_supported(void);
int32_t lut_isa(void);
int lut_set_isa(int32_t isa);
const char *lut_isa_name(int32_t isa);
int lut_set_threads(int32_t n);
int32_t lut_threads(void);
double lut_stream_read(const float *buf, int64_t n);
void lut_add_rmsnorm(float *x, const float *delta, const float *w, int32_t n, float eps, float *y);
#define LUT_KV_F32 ...
#define LUT_KV_F16 ...
#define LUT_KV_Q8 ...
#define LUT_ATTN_ROWS ...
void lut_attention_step(float *q, float *k, float *v, const float *q_bias, const float *k_bias,
                        const float *v_bias, const float *cos, const float *sin, int32_t kv_type,
                        void *k_cache, void *v_cache, float *k_scale, float *v_scale, int32_t pos,
                        int32_t heads, int32_t kv_heads, int32_t d, float query_scale, int32_t window,
                        float *scores, float *work, float *out);
int lut_attention_prompt(const float *q, const float *k, const float *v, int32_t pos, int32_t n, int32_t heads,
                         int32_t kv_heads, int32_t d, float query_scale, int32_t window, float *scratch,
                         int64_t scratch_floats, float *out);
int64_t lut_attention_prompt_scratch(int32_t positions, int32_t heads, int32_t kv_heads);
void lut_silu_mul(float *g, const float *u, int32_t n);
void lut_gelu_tanh_mul(float *g, const float *u, int32_t n);
void lut_head_rmsnorm(float *x, int32_t heads, int32_t d, const float *w, float eps);
void lut_rotate_rows(float *x, int64_t rows, int32_t a, int32_t n, const float *signs,
                     const float *mix, float *tmp);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "lutkernels._lut",
    '#include "lut.h"',
    sources=[os.path.join(C_DIR, s) for s in SOURCES],
    include_dirs=[C_DIR],
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-Wall"],
    libraries=["m", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
