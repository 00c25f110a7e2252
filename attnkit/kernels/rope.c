/* RoPE over many rows in one pass (a prompt's q and k heads, attnkit/nn/positional.py), in place, in the half-split
 * convention (Su et al. 2021, as Llama's checkpoints store q and k):
 *   (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin)
 * on the first rd features of each head. Each product is rounded before the sum, as PyTorch's
 * x·cos + rotate_half(x)·sin rounds it, so the result is PyTorch's bit for bit (no FMA: fp-contract off). */
#include <omp.h>

#include "blocks.h"

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF /* GCC takes the function attribute below */
#endif

/* n rows (row r at x + r·stride) of `heads` heads of hd floats; row r's angles cos, sin + r·rd (rd each, the
 * halves' angles alike as RotaryEmbedding.cos_sin makes them); 0, or 1 (rd odd or > hd) */
__attribute__((optimize("fp-contract=off"))) int ak_rope_rows(float *x, int64_t stride, int n, int heads, int hd,
                                                              int rd, const float *cos, const float *sin, int threads) {
    if (rd % 2 || rd > hd || rd < 2) return 1;
    const int h2 = rd / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && (int64_t)n * heads * rd >= (1 << 16))
    for (int r = 0; r < n; r++) {
        const float *c = cos + (size_t)r * rd, *s = sin + (size_t)r * rd;
        for (int h = 0; h < heads; h++) {
            float *v = x + (size_t)r * stride + (size_t)h * hd;
            int i = 0;
#ifdef __AVX512F__
            for (; i + 16 <= h2; i += 16) {
                const __m512 a = _mm512_loadu_ps(v + i), b = _mm512_loadu_ps(v + h2 + i);
                _mm512_storeu_ps(v + i, _mm512_sub_ps(_mm512_mul_ps(a, _mm512_loadu_ps(c + i)), _mm512_mul_ps(b, _mm512_loadu_ps(s + i))));
                _mm512_storeu_ps(v + h2 + i, _mm512_add_ps(_mm512_mul_ps(b, _mm512_loadu_ps(c + h2 + i)),
                                                           _mm512_mul_ps(a, _mm512_loadu_ps(s + h2 + i))));
            }
#endif
            for (; i < h2; i++) {
                const float a = v[i], b = v[h2 + i];
                v[i] = a * c[i] - b * s[i];
                v[h2 + i] = b * c[h2 + i] + a * s[h2 + i];
            }
        }
    }
    return 0;
}
