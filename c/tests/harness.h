/* What both standalone harnesses share: allocation that exits on failure, and the
 * guard words after every output. Include after defining HARNESS (the program's name). */
#ifndef LUT_TESTS_HARNESS_H
#define LUT_TESTS_HARNESS_H
#include <stdio.h>
#include <stdlib.h>

/* Sentinel elements after y and acc: where no sanitizer runs (qemu, valgrind's
 * blind spots) a write past the last row of a partial tile would otherwise go unseen. */
#define GUARD 16
/* memset bytes for unwritten outputs: y becomes NaN, which no tolerance
 * accepts; acc becomes 0x7f7f7f7f, far above any block sum. */
#define Y_FILL 0xff
#define ACC_FILL 0x7f

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, HARNESS ": out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

static int untouched(const void *p, size_t n, unsigned char byte) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != byte)
            return 0;
    return 1;
}

#endif
