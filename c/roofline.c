/* Streaming-read roofline for the kernel benchmark (bench/kernels.py): sum a
 * buffer much larger than the last-level cache on the thread pool, so that
 * N threads read from N cores just as lut_gemm does. The sum is returned so
 * the reads cannot be optimised away.
 *
 * Each thread reads one contiguous slice with LANES independent float
 * accumulators: with no fast-math the compiler still vectorises the inner
 * loop (every lane is its own accumulator, so no reassociation is needed),
 * and the many independent add chains keep the loop bound by memory
 * bandwidth rather than by add latency. */
#include "lut_internal.h"

#define LANES 32          /* floats per step: 128 bytes, two cache lines; 8 SSE accumulators, no spills */
#define SLOT 16           /* doubles per partial sum: one 128-byte slot per chunk, no false sharing */
#define MAX_CHUNKS 1024  /* POOL_MAX threads x CHUNKS_PER_THREAD (c/pool.c) */

typedef struct {
    const float *buf;
    int64_t n;
    double part[MAX_CHUNKS * SLOT];
} stream_ctx;

static void stream_slice(void *arg, int32_t ith, int32_t nth) {
    stream_ctx *c = arg;
    int64_t steps = c->n / LANES, lo = steps * ith / nth * LANES, hi = steps * (ith + 1) / nth * LANES;
    if (ith == nth - 1)
        hi = c->n; /* the last thread also takes the tail of fewer than LANES floats */
    const float *p = c->buf;
    float acc[LANES] = {0};
    int64_t k = lo;
    for (; k + LANES <= hi; k += LANES)
        for (int i = 0; i < LANES; i++)
            acc[i] += p[k + i];
    double s = 0.0;
    for (; k < hi; k++)
        s += p[k];
    for (int i = 0; i < LANES; i++)
        s += acc[i];
    c->part[(int64_t)ith * SLOT] = s;
}

double lut_stream_read(const float *buf, int64_t n) {
    if (!buf || n < 0)
        return 0.0;
    static stream_ctx c; /* too large for the stack; calls are not concurrent (see lut.h) */
    c.buf = buf;
    c.n = n;
    int32_t nth = lut_pool_chunks();
    for (int32_t i = 0; i < nth; i++)
        c.part[(int64_t)i * SLOT] = 0.0;
    lut_pool_run(stream_slice, &c);
    double s = 0.0;
    for (int32_t i = 0; i < nth; i++)
        s += c.part[(int64_t)i * SLOT];
    return s;
}
