/* Persistent worker pool. Workers spin briefly on a generation counter
 * (decode issues hundreds of small matmuls per token, so waking through the
 * kernel each time would cost more than the work), then sleep on a condvar. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include "lut_internal.h"

#define POOL_MAX 256
#define SPIN_ITERS 200000

static struct {
    pthread_t th[POOL_MAX];
    int32_t n;                 /* threads including the caller */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen;           /* bumped once per job */
    atomic_int pending;        /* workers still running the current job */
    atomic_int stop;
    unsigned start_gen;        /* gen when workers were created: a job posted before a worker first runs is not missed */
    lut_pool_fn fn;
    void *ctx;
} pool = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void *worker(void *arg) {
    int32_t ith = (int32_t)(intptr_t)arg;
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
        pool.fn(pool.ctx, ith, pool.n);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
}

void lut_pool_run(lut_pool_fn fn, void *ctx) {
    if (pool.n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.pending, pool.n - 1);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(ctx, 0, pool.n);
    int spins = 0;
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) {
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
        if (pthread_create(&pool.th[i], NULL, worker, (void *)(intptr_t)i) != 0) {
            pool.n = i;
            stop_workers();
            return LUT_ETHREAD;
        }
        pool.n = i + 1;
    }
    return LUT_OK;
}

int32_t lut_pool_size(void) { return pool.n; }
