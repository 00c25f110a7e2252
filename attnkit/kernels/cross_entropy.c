/* Next-token cross-entropy of a chunk of logits and its gradient, in two passes over each row
 * (attnkit/train/chunked_loss.py, for a frozen head):
 *
 *   loss_i = log Σ_v exp(z_iv) − z_i,y_i        ∂loss_i/∂z_iv = softmax(z_i)_v − [v = y_i]
 *
 * The first pass keeps a running max and a running sum of exponentials (rescaled when the max grows: Milakov &
 * Gimelshein 2018), the second writes the gradient over the logits in their own dtype (bf16 under autocast, or
 * float32), in place when the caller asks. PyTorch's ops take about seven passes over a float32 copy of the chunk
 * (cast, max, subtract, exp, sum, divide, cast back). Rows are independent: each thread takes whole rows. */
#include <omp.h>

#include "blocks.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CE_512 1 /* 16-bit masked loads and stores */
#endif

#ifdef CE_512
static inline __m512 load16(const void *z, int bf16, size_t i) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)z + i))), 16));
    return _mm512_loadu_ps((const float *)z + i);
}
static inline __m512 load16_masked(const void *z, int bf16, size_t i, __mmask16 m) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)z + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)z + i);
}
/* float32 → bf16, rounding to nearest even (as PyTorch's casts round) */
static inline __m256i round_bf16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_cvtepi32_epi16(r);
}
#endif

static inline float scalar_at(const void *z, int bf16, size_t i) {
    if (bf16) {
        const uint32_t u = (uint32_t)((const uint16_t *)z)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)z)[i];
}

static inline void scalar_store(void *g, int bf16, size_t i, float x) {
    if (bf16) {
        uint32_t u;
        memcpy(&u, &x, 4);
        if ((u & 0x7f800000u) != 0x7f800000u) u += 0x7fffu + ((u >> 16) & 1u); /* nearest even; inf/NaN as they are */
        ((uint16_t *)g)[i] = (uint16_t)(u >> 16);
    } else
        ((float *)g)[i] = x;
}

/* z (n, V) logits (bf16 when ``bf16``, else float32), y (n) labels in [0, V); loss (n) float32 per row; grad (n, V)
 * in z's dtype (may be z itself; NULL: the loss alone, one pass). Returns 0, or 1 for a label out of range
 * (nothing written for that row). */
int ak_cross_entropy(const void *z, const int64_t *y, int n, int V, int bf16, float *loss, void *grad, int threads) {
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int i = 0; i < n; i++) {
        const size_t row = (size_t)i * V;
        if (y[i] < 0 || y[i] >= V) {
            bad = 1;
            continue;
        }
        float mx = -INFINITY, sum = 0.f;
        int v = 0;
#ifdef CE_512
        __m512 vmx = _mm512_set1_ps(-INFINITY), vs = _mm512_setzero_ps();
        for (; v + 16 <= V; v += 16) {
            const __m512 x = load16(z, bf16, row + v), m2 = _mm512_max_ps(vmx, x);
            /* lanes whose max is still −∞ add nothing (exp of −∞ − −∞ would be NaN) */
            const __mmask16 live = _mm512_cmp_ps_mask(m2, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            vs = _mm512_mask_mov_ps(vs, live, _mm512_add_ps(_mm512_mul_ps(vs, exp16(_mm512_sub_ps(vmx, m2))), exp16(_mm512_sub_ps(x, m2))));
            vmx = m2;
        }
        mx = _mm512_reduce_max_ps(vmx);
        if (mx != -INFINITY) {
            const __mmask16 live = _mm512_cmp_ps_mask(vmx, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            sum = _mm512_mask_reduce_add_ps(live, _mm512_mul_ps(vs, exp16(_mm512_sub_ps(vmx, _mm512_set1_ps(mx)))));
        }
#endif
        for (; v < V; v++) { /* the tail (or every column without 512-bit vectors) */
            const float x = scalar_at(z, bf16, row + v);
            if (x > mx) {
                sum = (mx == -INFINITY ? 0.f : sum * expf(mx - x)) + 1.f;
                mx = x;
            } else if (x != -INFINITY)
                sum += expf(x - mx);
        }
        const float lse = mx + logf(sum), zy = scalar_at(z, bf16, row + (size_t)y[i]), inv = 1.f / sum;
        loss[i] = lse - zy;
        if (!grad) continue; /* the loss alone (an evaluation) */
        v = 0;
#ifdef CE_512
        for (; v < V; v += 16) {
            const __mmask16 t = V - v >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (V - v)) - 1);
            const __m512 p = _mm512_mul_ps(exp16(_mm512_sub_ps(load16_masked(z, bf16, row + v, t), _mm512_set1_ps(mx))), _mm512_set1_ps(inv));
            if (bf16)
                _mm256_mask_storeu_epi16((uint16_t *)grad + row + v, t, round_bf16(p));
            else
                _mm512_mask_storeu_ps((float *)grad + row + v, t, p);
        }
#else
        for (; v < V; v++) scalar_store(grad, bf16, row + v, expf(scalar_at(z, bf16, row + v) - mx) * inv);
#endif
        const float py = expf(zy - mx) * inv; /* the label's column: p − 1, from the logit as read above */
        scalar_store(grad, bf16, row + (size_t)y[i], py - 1.f);
    }
    return bad;
}
