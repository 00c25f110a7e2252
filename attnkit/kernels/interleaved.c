/* GGUF blocks with four rows interleaved, for 512-bit integer dot products (AVX-512 VNNI).
 *
 * In GGUF's layout each row is its own run of blocks, so one 32-weight block is 16 (Q4_1) or 32 (Q8_0)
 * bytes of quants beside a 2-byte scale: a 256-bit product per block, and a scale to broadcast for it.
 * Here rows 4g..4g+3 are stored block column by block column:
 *   Q4_1x4: d[4], m[4] (fp16), qs[4][16]   80 bytes = four Q4_1 blocks
 *   Q8_0x4: d[4] (fp16),       qs[4][32]  136 bytes = four Q8_0 blocks
 * so one 512-bit load holds the quants of four rows' blocks (two, for Q8_0), one activation block is
 * broadcast against all of them, and the four scales are one 64-bit load. A group of four rows takes the
 * same bytes as before, in the same place: packing permutes bytes within each group (attnkit.quant.native).
 * The sums are those of kernels.c's per-row products: the same integer block sums, the same scales,
 * only added in another order. Used where ak_x4_available() says so (AVX-512 F/BW/VL + VNNI).
 */
#include "blocks.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__AVX512DQ__)
#define AK_X4 1
#endif

int ak_x4_available(void) {
#ifdef AK_X4
    return 1;
#else
    return 0;
#endif
}

#ifdef AK_X4
/* out[r] = sum of the four lanes of 128-bit lane r of v, for r = 0..3 */
static inline __m128 lane_sums(__m512 v) {
    __m128 a = _mm512_castps512_ps128(v), b = _mm512_extractf32x4_ps(v, 1), c = _mm512_extractf32x4_ps(v, 2),
           d = _mm512_extractf32x4_ps(v, 3);
    _MM_TRANSPOSE4_PS(a, b, c, d);
    return _mm_add_ps(_mm_add_ps(a, b), _mm_add_ps(c, d));
}

/* y[r][0..3] for M (<= 4, a literal) activation rows against one group of four Q4_1 rows */
static inline __attribute__((always_inline)) void q4_1x4_group(const char *w, const block_q8x *x, int nb, const int M,
                                                               float *y, size_t ystride) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[4];
    __m128 accm[4];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps(), accm[r] = _mm_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const char *col = w + (size_t)b * Q4X4_BYTES;
        const __m512i q = _mm512_loadu_si512(col + 16);
        const __m512i lo = _mm512_and_si512(q, low), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
        const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)col));
        const __m128 m4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(col + 8)));
        for (int r = 0; r < M; r++) {
            const block_q8x *xb = x + (size_t)r * nb + b;
            const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xb->qs));
            const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb->qs + 16)));
            const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
            const __m512 sc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(d4, _mm_set1_ps(xb->d))));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r]);
            accm[r] = _mm_fmadd_ps(m4, _mm_set1_ps(xb->s), accm[r]);
        }
    }
    for (int r = 0; r < M; r++) _mm_storeu_ps(y + (size_t)r * ystride, _mm_add_ps(lane_sums(acc[r]), accm[r]));
}

/* the same for Q8_0: two rows' 32 quants per 512-bit register; |q| times x carrying q's sign */
static inline __attribute__((always_inline)) void q8_0x4_group(const char *w, const block_q8x *x, int nb, const int M,
                                                               float *y, size_t ystride) {
    const __m512i spread01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i spread23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc01[4], acc23[4];
    for (int r = 0; r < M; r++) acc01[r] = _mm512_setzero_ps(), acc23[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const char *col = w + (size_t)b * Q8X4_BYTES;
        const __m512i q01 = _mm512_loadu_si512(col + 8), q23 = _mm512_loadu_si512(col + 72);
        const __m512i a01 = _mm512_abs_epi8(q01), a23 = _mm512_abs_epi8(q23);
        const __mmask64 n01 = _mm512_movepi8_mask(q01), n23 = _mm512_movepi8_mask(q23);
        const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)col));
        for (int r = 0; r < M; r++) {
            const block_q8x *xb = x + (size_t)r * nb + b;
            const __m512i xx = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xb->qs));
            const __m512i s01 = _mm512_dpbusd_epi32(zero, a01, _mm512_mask_sub_epi8(xx, n01, zero, xx));
            const __m512i s23 = _mm512_dpbusd_epi32(zero, a23, _mm512_mask_sub_epi8(xx, n23, zero, xx));
            const __m512 sc = _mm512_castps128_ps512(_mm_mul_ps(d4, _mm_set1_ps(xb->d)));
            acc01[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s01), _mm512_permutexvar_ps(spread01, sc), acc01[r]);
            acc23[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s23), _mm512_permutexvar_ps(spread23, sc), acc23[r]);
        }
    }
    for (int r = 0; r < M; r++) {
        /* lanes 0-7: row 0, 8-15: row 1 (acc01); the same for rows 2, 3: fold 8 lanes to 4, then lane_sums */
        const __m512 f01 = _mm512_add_ps(acc01[r], _mm512_permutexvar_ps(
            _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4), acc01[r]));
        const __m512 f23 = _mm512_add_ps(acc23[r], _mm512_permutexvar_ps(
            _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4), acc23[r]));
        /* 128-bit lanes: f01 = [row0, row0, row1, row1], f23 = [row2, row2, row3, row3]: take one of each */
        const __m512 four = _mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(2, 0, 2, 0));
        _mm_storeu_ps(y + (size_t)r * ystride, lane_sums(four));
    }
}

/* y (m, n) = x (m, k) · W (n, k)ᵀ with W in x4 layout (n % 4 == 0); xq: m rows of nb activation blocks */
void gemv_x4(int kind, const void *w, const block_q8x *xq, float *y, int m, int n, int nb, int threads) {
    const size_t gbytes = (size_t)nb * (kind == AK_Q4_1X4 ? Q4X4_BYTES : Q8X4_BYTES);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 64 && threads > 1)
    for (int g = 0; g < n / 4; g++) {
        const char *wg = (const char *)w + (size_t)g * gbytes;
        for (int r0 = 0; r0 < m; r0 += 4) {
            const block_q8x *x = xq + (size_t)r0 * nb;
            float *yg = y + (size_t)r0 * n + 4 * (size_t)g;
            const int M = m - r0 < 4 ? m - r0 : 4;
            if (kind == AK_Q4_1X4) {
                switch (M) {
                    case 1: q4_1x4_group(wg, x, nb, 1, yg, n); break;
                    case 2: q4_1x4_group(wg, x, nb, 2, yg, n); break;
                    case 3: q4_1x4_group(wg, x, nb, 3, yg, n); break;
                    default: q4_1x4_group(wg, x, nb, 4, yg, n);
                }
            } else {
                switch (M) {
                    case 1: q8_0x4_group(wg, x, nb, 1, yg, n); break;
                    case 2: q8_0x4_group(wg, x, nb, 2, yg, n); break;
                    case 3: q8_0x4_group(wg, x, nb, 3, yg, n); break;
                    default: q8_0x4_group(wg, x, nb, 4, yg, n);
                }
            }
        }
    }
}
#else
void gemv_x4(int kind, const void *w, const block_q8x *xq, float *y, int m, int n, int nb, int threads) {
    (void)kind, (void)w, (void)xq, (void)y, (void)m, (void)n, (void)nb, (void)threads; /* never called: ak_x4_available() is 0 */
}
#endif
