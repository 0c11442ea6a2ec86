/* Built with -fsanitize=thread by tests/test_concurrency.py: matmuls of both kernel families from
 * several threads while another thread resizes the pool, switches the ISA and reads both back (what
 * Python threads do through cffi, which lets go of the GIL in C). ThreadSanitizer reports any data
 * race; the weights are arbitrary bytes, only the memory accesses matter. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include "lut.h"

#define ROWS 64
#define COLS 256
#define CALLERS 4

static uint8_t planes[(ROWS / 16) * (COLS / 32) * 2 * 64];
static uint16_t scales[(ROWS / 16) * (COLS / 128) * 2 * 16];
static uint8_t streams[COLS * (2 * 2 * (ROWS / 16) + 1) + 16];
static float trellis_scales[ROWS];
static atomic_int stop;

static void *caller(void *arg) {
    intptr_t id = (intptr_t)arg;
    float x[COLS], y[ROWS];
    for (int i = 0; i < COLS; i++)
        x[i] = (float)((i * 7 + id) % 13) - 6.0f;
    lut_layer w = {.M = ROWS, .K = COLS, .P = 2, .G = 128, .planes = planes, .scales = scales};
    lut_trellis t = {.M = ROWS, .K = COLS, .k = 2, .streams = streams, .scales = trellis_scales};
    for (int it = 0; it < 200; it++) {
        if (lut_gemm(&w, x, 1, y, it & 1, NULL) || lut_trellis_gemm(&t, x, 1, y, NULL))
            abort();
        if (lut_threads() < 1 || lut_isa() < 0)
            abort();
    }
    return NULL;
}

static void *resizer(void *arg) {
    (void)arg;
    int32_t isas = lut_isa_supported();
    for (int it = 0; !atomic_load(&stop); it++) {
        if (lut_set_threads(1 + it % 3))
            abort();
        if (isas & (1 << (it % 3)))
            lut_set_isa(it % 3);
    }
    return NULL;
}

int main(void) {
    for (size_t i = 0; i < sizeof planes; i++)
        planes[i] = (uint8_t)(i * 31);
    for (size_t i = 0; i < sizeof scales / sizeof scales[0]; i++)
        scales[i] = 0x3c00; /* 1.0 in fp16 */
    for (size_t i = 0; i < sizeof streams; i++)
        streams[i] = (uint8_t)(i * 17);
    for (int i = 0; i < ROWS; i++)
        trellis_scales[i] = 1.0f;
    pthread_t th[CALLERS + 1];
    for (intptr_t i = 0; i < CALLERS; i++)
        pthread_create(&th[i], NULL, caller, (void *)i);
    pthread_create(&th[CALLERS], NULL, resizer, NULL);
    for (int i = 0; i < CALLERS; i++)
        pthread_join(th[i], NULL);
    atomic_store(&stop, 1);
    pthread_join(th[CALLERS], NULL);
    lut_set_threads(1);
    puts("done");
    return 0;
}
