/* A read-bandwidth probe for the benchmarks (benchmarks/sizes.py): the sum of n 64-bit words, read once by
 * `threads` threads, vectorized by the compiler. Timing it over a buffer far larger than the last-level cache
 * gives the rate at which this machine's cores can stream memory — the roofline of a memory-bound decode step. */
#include <stddef.h>
#include <stdint.h>

uint64_t ak_read_sum(const uint64_t *p, size_t n, int threads) {
    uint64_t total = 0;
    (void)threads;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads)
    for (size_t i = 0; i < n; i++) total += p[i];
    return total;
}
