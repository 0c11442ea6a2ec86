/* Persistent worker pool. Workers spin briefly on a generation counter
 * (decode issues hundreds of small matmuls per token, so waking through the
 * kernel each time would cost more than the work), then sleep on a condvar.
 *
 * A job is cut into more chunks than threads, and every thread (the caller
 * included) claims chunks until none are left. On a shared machine a worker
 * may not be scheduled for milliseconds; with a fixed split the caller would
 * wait that long on every matmul (hundreds per token), while here it simply
 * takes the absent worker's chunks. Which thread runs a chunk never changes
 * its result, so outputs stay identical for any thread count.
 *
 * A claim is a compare-and-swap on one 64-bit ticket holding (job number,
 * next chunk): a worker that wakes late for a finished job sees another job
 * number and cannot claim a chunk of the next job with the old job's
 * function and context. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include "lut_internal.h"

#define POOL_MAX 256
#define SPIN_ITERS 2000   /* ~0.1 ms: longer spinning starves the caller when another process holds a core (measured: 2 threads at 29 vs 67 tok/s with 200000) */
#define CHUNKS_PER_THREAD 4

static struct {
    pthread_t th[POOL_MAX];
    int32_t n;                 /* threads including the caller */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen;           /* bumped once per job: wakes the workers */
    atomic_int stop;
    unsigned start_gen;        /* gen when workers were created: a job posted before a worker first runs is not missed */
    _Atomic uint64_t ticket;   /* job number << 32 | next chunk to claim */
    atomic_int done;           /* chunks finished of the current job */
    _Atomic(lut_pool_fn) fn;   /* atomic: a late worker may read them while the caller sets the next job */
    _Atomic(void *) ctx;
    atomic_int nchunks;
} pool = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* Runs chunks of the job numbered `job` until none are left or another job is posted. */
static void claim_chunks(uint32_t job) {
    uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(t >> 32) != job)
            return;
        lut_pool_fn fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&pool.ctx, memory_order_relaxed);
        int32_t nchunks = atomic_load_explicit(&pool.nchunks, memory_order_relaxed);
        uint32_t chunk = (uint32_t)t;
        if (chunk >= (uint32_t)nchunks)
            return;
        /* Success proves fn, ctx and nchunks belonged to `job`: they change only after all its chunks are done. */
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        fn(ctx, (int32_t)chunk, nchunks);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    }
}

static void *worker(void *arg) {
    (void)arg;
    unsigned seen = pool.start_gen;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool.gen, memory_order_acquire) == seen && spins < SPIN_ITERS) {
            cpu_relax();
            spins++;
        }
        if (atomic_load_explicit(&pool.gen, memory_order_acquire) == seen) {
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.gen) == seen)
                pthread_cond_wait(&pool.cv, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = atomic_load(&pool.gen);
        if (atomic_load(&pool.stop))
            return NULL;
        claim_chunks((uint32_t)(atomic_load_explicit(&pool.ticket, memory_order_acquire) >> 32));
    }
}

int32_t lut_pool_chunks(void) { return pool.n == 1 ? 1 : pool.n * CHUNKS_PER_THREAD; }

void lut_pool_run(lut_pool_fn fn, void *ctx) {
    int32_t nchunks = lut_pool_chunks();
    if (nchunks == 1) {
        fn(ctx, 0, 1);
        return;
    }
    uint32_t job = (uint32_t)(atomic_load(&pool.ticket) >> 32) + 1;
    atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool.nchunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.ticket, (uint64_t)job << 32, memory_order_release);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    claim_chunks(job);
    int spins = 0;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks) {
        if (++spins < SPIN_ITERS)
            cpu_relax();
        else
            sched_yield();
    }
}

static void stop_workers(void) {
    if (pool.n == 1)
        return;
    atomic_store(&pool.stop, 1);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.gen, 1);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int32_t i = 1; i < pool.n; i++)
        pthread_join(pool.th[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.n = 1;
}

int lut_pool_resize(int32_t n) {
    if (n < 1 || n > POOL_MAX)
        return LUT_EINVAL;
    if (n == pool.n)
        return LUT_OK;
    stop_workers();
    pool.start_gen = atomic_load(&pool.gen);
    for (int32_t i = 1; i < n; i++) {
        if (pthread_create(&pool.th[i], NULL, worker, NULL) != 0) {
            pool.n = i;
            stop_workers();
            return LUT_ETHREAD;
        }
        pool.n = i + 1;
    }
    return LUT_OK;
}

/* Under the call lock: lut_set_threads may be resizing the pool from another thread. */
int32_t lut_pool_size(void) {
    pthread_mutex_lock(&lut_call_mu);
    int32_t n = pool.n;
    pthread_mutex_unlock(&lut_call_mu);
    return n;
}
