/* ggml's Q8_0: w = d·q, fp16 d and 32 int8 q (34 bytes). Against an activation block (x = dx·qx):
 * Σ w·x = d·dx·Σ q·qx, an integer sum taken as |q| times qx carrying q's sign (vec_dot_q8_0_q8_0), or on
 * interleaved rows as (q + 128)·qx − 128·Σqx. */
#include "blocks.h"

static void q8_0_to_float(const uint8_t *blocks, int count, float *o) {
    for (int k = 0; k < count; k++, o += 32) {
        const uint8_t *b = blocks + 34 * (size_t)k;
        const float d = ld_half(b);
        const int8_t *q = (const int8_t *)(b + 2);
#ifdef __AVX512F__
        for (int h = 0; h < 2; h++)
            _mm512_storeu_ps(o + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                             _mm_loadu_si128((const __m128i *)(q + 16 * h)))), _mm512_set1_ps(d)));
#else
        for (int i = 0; i < 32; i++) o[i] = (float)q[i] * d;
#endif
    }
}

#ifdef AK_AVX2
/* one row against M activation rows: each block's |q| loaded once for all of them; even and odd blocks summed
 * apart (two FMA chains: one would bound the loop by its latency); row r's operations are the same, in the same
 * order, whatever M (batch invariance) */
AK_INLINE void dot_rows(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys) {
    __m256 acc[2][4];
    for (int r = 0; r < M; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 2) {
        for (int e = 0; e < 2 && b0 + e < nb; e++) { /* e: the chain; an odd count ends on the even one */
            const int b = b0 + e;
            const uint8_t *blk = w + 34 * (size_t)b;
            const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2)), aq = _mm256_sign_epi8(q, q);
            const float d = ld_half(blk);
            for (int r = 0; r < M; r++) {
                const __m256i s = _mm256_loadu_si256((const __m256i *)(x[r].qs + 32 * b));
                const __m256i p = dot_u8s8(aq, _mm256_sign_epi8(s, q));
                acc[e][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[r].d[b]), acc[e][r]);
            }
        }
    }
    for (int r = 0; r < M; r++) y[r * ys] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
}
static void q8_0_dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {
    AK_DISPATCH_M(dot_rows, w, nb, x, M, y, ys)
}
#else
static float dot1(const uint8_t *w, int nb, ak_act x) {
    float sum = 0.f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + 34 * (size_t)b;
        int isum = 0;
        for (int i = 0; i < 32; i++) isum += (int8_t)blk[2 + i] * x.qs[32 * b + i];
        sum += ld_half(blk) * x.d[b] * (float)isum;
    }
    return sum;
}
static void q8_0_dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {
    for (int r = 0; r < M; r++) y[r * ys] = dot1(w, nb, x[r]);
}
#endif

#ifdef AK_X4
/* Sixteen rows interleaved, 4 bytes of each at a time (a panel of gemm.c as it lies, as q4_k.c's): per block
 * column d[16] (fp16), then the quants in 8 chunks of 4 bytes of each row (lane L: row L); 544 bytes. A chunk, as
 * unsigned q + 128, is one vpdpbusd per activation row against its 4 quants broadcast, the sums starting from
 * −128·Σqx of the block (ak_act.off4: the type's offsets, one a block), so they sum q·qx (even and odd chunks in
 * two chains, then added), then acc_e += Σ·(d·dx) per block and row, e the block's parity, summed at the end:
 * gemm.c's AK_PANEL_B32 arithmetic in its order, so the two give the same bits. From 64 rows ak_gemv hands the
 * rows to gemm.c, whose panels (each chunk's q + 128 as it lies, q8_0_panel) serve all the rows: 0.87× this
 * kernel's time at 512 rows of a 1B's 8192×2048 (Zen 5, 2 threads), equal at 64, 0.6–1.4× slower below. */
static void q8_0_to_float_x4(const uint8_t *group, int r, int b0, int count, float *o) {
    for (int k = 0; k < count; k++, o += 32) {
        const uint8_t *c = group + (size_t)(b0 + k) * 544;
        const float d = ld_half(c + 2 * r);
        for (int i = 0; i < 32; i++) o[i] = (float)(int8_t)c[32 + 64 * (i / 4) + 4 * r + i % 4] * d;
    }
}
/* block column b into acc[r] (the chain of b's parity; literal in the caller, so the accumulators stay registers) */
AK_INLINE void x16_block(const uint8_t *w, size_t b, const ak_act *x, const int M, __m512 *acc) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const uint8_t *col = w + b * 544;
    AK_PREFETCH_SHARE(col, 544, 8, 0, 1, 9); /* the column 8 ahead (8.5 lines) */
    AK_SIDE_PREFETCH(x);
    __m512i t[4][2];
    for (int r = 0; r < M; r++) t[r][0] = _mm512_set1_epi32(x[r].off4[b]), t[r][1] = _mm512_setzero_si512();
    for (int c = 0; c < 8; c++) {
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(col + 32 + 64 * c), flip);
        for (int r = 0; r < M; r++) t[r][c & 1] = ak_dp4(t[r][c & 1], u, x + r, 32 * b + 4 * c);
    }
    const __m512 D = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)col));
    for (int r = 0; r < M; r++)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t[r][0], t[r][1])), _mm512_mul_ps(D, _mm512_set1_ps(x[r].d[b])), acc[r]);
}
AK_INLINE void x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys) {
    __m512 even[4], odd[4]; /* even and odd block columns: shorter FMA dependency chains */
    for (int r = 0; r < M; r++) even[r] = odd[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b += 2) {
        x16_block(w, (size_t)b, x, M, even);
        if (b + 1 < nb) x16_block(w, (size_t)b + 1, x, M, odd);
    }
    for (int r = 0; r < M; r++) _mm512_storeu_ps(y + r * ys, _mm512_add_ps(even[r], odd[r]));
}
/* unit u (block columns 8u .. 8u + 7) of a group of 16 rows → a panel (gemm.c): each chunk as unsigned q + 128 */
static void q8_0_panel(const uint8_t *w, int u, int nb, ak_panel *P) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int j = 0; j < nb; j++) {
        const uint8_t *col = w + ((size_t)8 * u + j) * 544;
        P->d[j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)col));
        for (int c = 0; c < 8; c++) P->q[8 * j + c] = _mm512_xor_si512(_mm512_loadu_si512(col + 32 + 64 * c), flip);
    }
}
static void q8_0_dot_x4(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {
    AK_DISPATCH_M(x4, w, nb, x, M, y, ys)
}
#define Q8_0_TO_FLOAT_X4 q8_0_to_float_x4
#define Q8_0_PANEL q8_0_panel
#define Q8_0_OFFSET 128
#define Q8_0_X4_ROWS 16
#define Q8_0_QS_GRANULE 4
#elif defined(AK_AVX2)
/* Four rows interleaved, 256-bit: a register holds 16 quants of two rows (128-bit lane 0 row 2p, lane 1 row
 * 2p + 1), |q| against the activation's 16 quants broadcast to both lanes carrying q's sign; per block column and
 * activation row one float FMA for the four rows (hadd leaves lanes [r0 r0 r2 r2 | r1 r1 r3 r3]). */
AK_INLINE void x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys) {
    const __m256i spread = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3), ones = _mm256_set1_epi16(1);
    __m256 acc[4]; /* one chain a row: a block column's ~12 operations a row outlast an FMA's latency */
    for (int r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *col = w + (size_t)b * 136;
        __m256i q[4], a[4]; /* rows 0-1 then 2-3 of quants 0-15, then of quants 16-31 */
        for (int i = 0; i < 4; i++) q[i] = _mm256_loadu_si256((const __m256i *)(col + 8 + 32 * i)), a[i] = _mm256_sign_epi8(q[i], q[i]);
        const __m256 D = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)col))), spread);
        for (int r = 0; r < M; r++) {
            const int8_t *xq = x[r].qs + 32 * (size_t)b;
            const __m256i x0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xq));
            const __m256i x1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + 16)));
#define P(i, xx) _mm256_madd_epi16(_mm256_maddubs_epi16(a[i], _mm256_sign_epi8(xx, q[i])), ones)
            const __m256i s01 = _mm256_add_epi32(P(0, x0), P(2, x1)), s23 = _mm256_add_epi32(P(1, x0), P(3, x1));
#undef P
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(s01, s23)), _mm256_mul_ps(D, _mm256_set1_ps(x[r].d[b])), acc[r]);
        }
    }
    for (int r = 0; r < M; r++) _mm_storeu_ps(y + r * ys, x4_sums(acc[r]));
}
static void q8_0_dot_x4(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {
    AK_DISPATCH_M(x4, w, nb, x, M, y, ys)
}
#define Q8_0_OFFSET 0 /* signs, not an offset */
#endif
#ifndef Q8_0_X4_ROWS
#define Q8_0_TO_FLOAT_X4 NULL
#define Q8_0_PANEL NULL
#define Q8_0_X4_ROWS 4
#define Q8_0_QS_GRANULE 16
#endif
#ifndef Q8_0_OFFSET
#define q8_0_dot_x4 NULL
#define Q8_0_OFFSET 0
#endif

const ak_type ak_type_q8_0 = {AK_Q8_0, 32, 34, q8_0_to_float, q8_0_dot, q8_0_dot_x4, {{0, 2, 2}, {2, 32, Q8_0_QS_GRANULE}, {0, 0, 0}},
                              Q8_0_OFFSET, Q8_0_TO_FLOAT_X4, Q8_0_PANEL, AK_PANEL_B32, Q8_0_X4_ROWS, 0};
