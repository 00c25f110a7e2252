/* A training step's elementwise layers, forward and backward, one pass over each row (attnkit/nn/ffn.py,
 * attnkit/nn/norm.py): where PyTorch runs each as 5–15 operations, each reading and writing the whole tensor.
 *
 *   SwiGLU:  h = SiLU(g)·u,  SiLU(g) = g·σ(g);   ∂g = ∂h·u·σ(g)·(1 + g·(1 − σ(g))),  ∂u = ∂h·SiLU(g)
 *   RMSNorm: y = x·r·w,  r = 1/√(mean(x²) + ε);   ∂x = r·(∂y·w) − x·r³·mean(∂y·w·x),  ∂w = Σ_rows ∂y·x·r
 *
 * Arithmetic in float32; bf16 operands (autocast) widened on load and rounded to nearest even on store, as
 * PyTorch's casts round. Rows are split among threads in fixed ranges, and ∂w's per-thread sums are added in
 * thread order, so the results depend only on the thread count. 512-bit (AVX512-BW/VL) only: elsewhere the
 * callers keep PyTorch's operations (return 1). */
#include <omp.h>
#include <stdlib.h>

#include "blocks.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define OPS_512 1

static inline __mmask16 ops_tail(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

static inline __m512 ld(const void *p, int bf16, size_t i, __mmask16 m) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

static inline void st(void *p, int bf16, size_t i, __mmask16 m, __m512 x) {
    if (bf16) {
        const __m512i u = _mm512_castps_si512(x);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtepi32_epi16(r));
    } else
        _mm512_mask_storeu_ps((float *)p + i, m, x);
}

/* σ(g) = 1/(1 + exp(−g)) */
static inline __m512 sigmoid16(__m512 g) {
    return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}
#endif

/* whether this build has these kernels (else each returns 1 and the callers keep PyTorch's operations) */
int ak_train_ops_available(void) {
#ifdef OPS_512
    return 1;
#else
    return 0;
#endif
}

/* h = SiLU(g)·u for n rows of ff; g and u rows gs and us elements apart (views of one gate/up output), h contiguous;
 * all bf16 when ``bf16``, else float32 */
int ak_swiglu_forward(const void *g, const void *u, int64_t gs, int64_t us, int n, int ff, int bf16, void *h, int threads) {
#ifdef OPS_512
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < n; i++)
        for (int c = 0; c < ff; c += 16) {
            const __mmask16 m = ops_tail(ff - c);
            const __m512 gv = ld(g, bf16, (size_t)i * gs + c, m), uv = ld(u, bf16, (size_t)i * us + c, m);
            st(h, bf16, (size_t)i * ff + c, m, _mm512_mul_ps(ak_gate_act16(gv, 0), uv));
        }
    return 0;
#else
    (void)g, (void)u, (void)gs, (void)us, (void)n, (void)ff, (void)bf16, (void)h, (void)threads;
    return 1;
#endif
}

/* ∂g and ∂u (contiguous, g's dtype) from ∂h (contiguous) */
int ak_swiglu_backward(const void *g, const void *u, int64_t gs, int64_t us, const void *dh, int n, int ff, int bf16,
                       void *dg, void *du, int threads) {
#ifdef OPS_512
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < n; i++)
        for (int c = 0; c < ff; c += 16) {
            const __mmask16 m = ops_tail(ff - c);
            const __m512 gv = ld(g, bf16, (size_t)i * gs + c, m), uv = ld(u, bf16, (size_t)i * us + c, m);
            const __m512 d = ld(dh, bf16, (size_t)i * ff + c, m), s = sigmoid16(gv);
            const __m512 one = _mm512_set1_ps(1.f);
            const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one)); /* σ(1 + g(1 − σ)) */
            st(dg, bf16, (size_t)i * ff + c, m, _mm512_mul_ps(_mm512_mul_ps(d, uv), dsilu));
            st(du, bf16, (size_t)i * ff + c, m, _mm512_mul_ps(d, _mm512_mul_ps(gv, s)));
        }
    return 0;
#else
    (void)g, (void)u, (void)gs, (void)us, (void)dh, (void)n, (void)ff, (void)bf16, (void)dg, (void)du, (void)threads;
    return 1;
#endif
}

/* y = x·r·w for n rows of d (x float32 contiguous, w float32 (d)); r (n) written where ``compute_r``, else read;
 * y bf16 when ``y_bf16``, else float32 */
int ak_rmsnorm_forward(const float *x, const float *w, int n, int d, float eps, float *r, int compute_r, void *y, int y_bf16,
                       int threads) {
#ifdef OPS_512
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < n; i++) {
        const float *xr = x + (size_t)i * d;
        if (compute_r) {
            __m512 ss = _mm512_setzero_ps();
            for (int c = 0; c < d; c += 16) {
                const __m512 v = _mm512_maskz_loadu_ps(ops_tail(d - c), xr + c);
                ss = _mm512_fmadd_ps(v, v, ss);
            }
            r[i] = 1.f / sqrtf(_mm512_reduce_add_ps(ss) / (float)d + eps);
        }
        const __m512 rv = _mm512_set1_ps(r[i]);
        for (int c = 0; c < d; c += 16) {
            const __mmask16 m = ops_tail(d - c);
            st(y, y_bf16, (size_t)i * d + c, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + c), rv), _mm512_maskz_loadu_ps(m, w + c)));
        }
    }
    return 0;
#else
    (void)x, (void)w, (void)n, (void)d, (void)eps, (void)r, (void)compute_r, (void)y, (void)y_bf16, (void)threads;
    return 1;
#endif
}

/* ∂x (float32, contiguous) from ∂y (bf16 when ``dy_bf16``); ∂w (d) written where dw is not NULL */
int ak_rmsnorm_backward(const float *x, const float *w, const float *r, const void *dy, int dy_bf16, int n, int d, float *dx,
                        float *dw, int threads) {
#ifdef OPS_512
    if (threads < 1) threads = 1;
    float *part = dw ? calloc((size_t)threads * d, sizeof(float)) : NULL;
    if (dw && !part) return 2;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int i0 = (int)((int64_t)n * t / nt), i1 = (int)((int64_t)n * (t + 1) / nt);
        float *pw = part ? part + (size_t)t * d : NULL;
        for (int i = i0; i < i1; i++) {
            const float *xr = x + (size_t)i * d;
            const __m512 rv = _mm512_set1_ps(r[i]);
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < d; c += 16) { /* Σ ∂y·w·x */
                const __mmask16 m = ops_tail(d - c);
                acc = _mm512_fmadd_ps(_mm512_mul_ps(ld(dy, dy_bf16, (size_t)i * d + c, m), _mm512_maskz_loadu_ps(m, w + c)),
                                      _mm512_maskz_loadu_ps(m, xr + c), acc);
            }
            const float k = _mm512_reduce_add_ps(acc) / (float)d * r[i] * r[i] * r[i];
            for (int c = 0; c < d; c += 16) {
                const __mmask16 m = ops_tail(d - c);
                const __m512 g = ld(dy, dy_bf16, (size_t)i * d + c, m), xv = _mm512_maskz_loadu_ps(m, xr + c);
                const __m512 dxv = _mm512_fnmadd_ps(xv, _mm512_set1_ps(k), _mm512_mul_ps(rv, _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, w + c))));
                _mm512_mask_storeu_ps(dx + (size_t)i * d + c, m, dxv);
                if (pw)
                    _mm512_mask_storeu_ps(pw + c, m, _mm512_fmadd_ps(_mm512_mul_ps(g, xv), rv, _mm512_maskz_loadu_ps(m, pw + c)));
            }
        }
    }
    if (dw) {
        for (int c = 0; c < d; c++) {
            float s = 0.f;
            for (int t = 0; t < threads; t++) s += part[(size_t)t * d + c];
            dw[c] = s;
        }
        free(part);
    }
    return 0;
#else
    (void)x, (void)w, (void)r, (void)dy, (void)dy_bf16, (void)n, (void)d, (void)dx, (void)dw, (void)threads;
    return 1;
#endif
}
