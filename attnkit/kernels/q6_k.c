/* ggml's Q6_K: super-blocks of 256 weights, ql[128] (low 4 bits), qh[64] (high 2 bits), 16 int8 scales (one per
 * 16 weights), fp16 d; 210 bytes.   w = d·sc_g · (q − 32),  q 6-bit.
 * Weight 128h + 32i + l (h < 2, i < 4, l < 32): the low (i < 2) or high nibble of ql[64h + 32·(i&1) + l] and bits
 * 2i, 2i+1 of qh[32h + l]; g = its index / 16. Against an activation block of 32 (x = dx·qx):
 *   Σ w·x = d·dx · (sc_g·Σ_g (q−32)·qx + sc_g+1·Σ_g+1 (q−32)·qx),
 * the integer sums taken as |q − 32| times qx carrying the sign of q − 32 (vec_dot_q6_K_q8_K). */
#include "blocks.h"

/* the 256 quants of a super-block minus 32, in weight order */
static inline void quants(const uint8_t *b, int8_t *q) {
    const uint8_t *ql = b, *qh = b + 128;
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 4; i++) {
            const uint8_t *lo = ql + 64 * h + 32 * (i & 1), *hi = qh + 32 * h;
            int8_t *o = q + 128 * h + 32 * i;
#ifdef AK_AVX2
            const __m256i l = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)lo), 4 * (i >> 1)),
                                               _mm256_set1_epi8(0x0f));
            const __m256i t = _mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)hi), 2 * i);
            const __m256i u = _mm256_or_si256(l, _mm256_and_si256(_mm256_slli_epi16(t, 4), _mm256_set1_epi8(0x30)));
            _mm256_storeu_si256((__m256i *)o, _mm256_sub_epi8(u, _mm256_set1_epi8(32)));
#else
            for (int l = 0; l < 32; l++) o[l] = (int8_t)((((lo[l] >> (4 * (i >> 1))) & 0xF) | (((hi[l] >> (2 * i)) & 3) << 4)) - 32);
#endif
        }
}

/* count super-blocks → floats as gguf-py: (d·sc)·(q − 32), exact */
static void q6_k_to_float(const uint8_t *blocks, int count, float *o) {
    int8_t q[256];
    for (int k = 0; k < count; k++, o += 256) {
        const uint8_t *b = blocks + 210 * (size_t)k;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = ld_half(b + 208);
        quants(b, q);
        for (int g = 0; g < 16; g++) {
            const float s = d * (float)sc[g];
#ifdef __AVX512F__
            _mm512_storeu_ps(o + 16 * g, _mm512_mul_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(
                                             _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * g))))));
#else
            for (int l = 0; l < 16; l++) o[16 * g + l] = s * (float)q[16 * g + l];
#endif
        }
    }
}

#ifdef AK_AVX2
/* one row against M activation rows (256-bit), with one activation scale dx per super-block (q8_K): the 32 quants
 * of an activation block as |q − 32| and its sign (_mm256_sign_epi8), shared by the rows; their pair sums weighted
 * by the block's two int8 scales (sc_g on weights 0-15, sc_g+1 on 16-31) in int16×int16 products and added in
 * int32, so a super-block ends in one conversion and one FMA per row (ggml's vec_dot_q6_K_q8_K):
 *   Σ w·x = d·dx · Σ_g sc_g · Σ (q − 32)·qx */
AK_INLINE void dot_rows(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys) {
    const __m256i low = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30), k32 = _mm256_set1_epi8(32);
    __m256 acc[4];
    for (int r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + 210 * (size_t)b, *ql = blk, *qh = blk + 128;
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)(blk + 192));
        const float d = ld_half(blk + 208);
        __m256i isum[4];
        for (int r = 0; r < M; r++) isum[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            for (int i = 0; i < 4; i++) {
                const __m256i l = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32 * (i & 1))), 4 * (i >> 1)), low);
                const __m256i v = _mm256_sub_epi8(_mm256_or_si256(l, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hb, 2 * i), 4), m30)), k32);
                const __m256i av = _mm256_sign_epi8(v, v);
                const int g = 8 * h + 2 * i, a = 8 * b + 4 * h + i; /* scales g, g + 1; activation block a */
                /* int16 sc_g in the low 128-bit lane (weights 0-15), sc_g+1 in the high one */
                const __m256i sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_set_epi64x(0x0101010101010101LL * (g + 1),
                                                                                           0x0101010101010101LL * g)));
                for (int r = 0; r < M; r++) { /* |q − 32| · ±qx pairs <= 2·32·127: no int16 saturation */
                    const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x[r].qs + 32 * (size_t)a)), v);
                    isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(av, xs), sc));
                }
            }
        }
        for (int r = 0; r < M; r++) /* x[r].d is constant over the super-block */
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * x[r].d[8 * (size_t)b]), acc[r]);
    }
    for (int r = 0; r < M; r++) y[r * ys] = hsum(acc[r]);
}
static void q6_k_dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {
    AK_DISPATCH_M(dot_rows, w, nb, x, M, y, ys)
}
#else
static float dot1(const uint8_t *w, int nb, ak_act x) {
    int8_t q[256];
    float sum = 0.f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + 210 * (size_t)b;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = ld_half(blk + 208);
        quants(blk, q);
        for (int j = 0; j < 8; j++) {
            const int a = 8 * b + j;
            int s0 = 0, s1 = 0;
            for (int l = 0; l < 16; l++) s0 += q[32 * j + l] * x.qs[32 * a + l], s1 += q[32 * j + 16 + l] * x.qs[32 * a + 16 + l];
            sum += d * x.d[a] * (float)(sc[2 * j] * s0 + sc[2 * j + 1] * s1);
        }
    }
    return sum;
}

static void q6_k_dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {
    for (int r = 0; r < M; r++) y[r * ys] = dot1(w, nb, x[r]);
}
#endif

#ifdef AK_X4
/* Sixteen rows interleaved, 4 bytes of each at a time (a panel of gemm.c as it lies, as Q4_K's x16): per column
 * d[16] (fp16), the scales byte by byte (sc_g of rows 0-15, g = 0..15), qh: 16 chunks, ql: 32 chunks, a chunk
 * holding 4 bytes of each of the 16 rows (lane L: row L); 3360 bytes. A qh chunk (half h, bytes 4j..) and the two
 * ql chunks of the same bytes give the unsigned 6-bit quants q of inputs 128h + 32i + 4j .. + 3 for i = 0..3, a
 * slot of scale group 8h + 2i + j/4 each. Per slot one vpdpbusd per activation row; a group's four sums start from
 * −32·Σqx of its 16 inputs (ak_act.off4: the type's offsets, 16 inputs each) so they sum (q − 32)·qx, are scaled
 * by the int8 scale in int32 and summed over the super-block, then acc += Σ·(d·dx): gemm.c's AK_PANEL_K16
 * arithmetic (rows_tile), so from 64 rows ak_gemv hands the rows to its panels (q6_k_panel: the quants taken out
 * once per call; 0.77× this kernel's time at 512 rows of an 8192×2048) with the same bits. */
#define X16_COL 3360
#define X16_QH 288
#define X16_QL 1312
/* the unsigned 6-bit quants of slots i = 0..3 (inputs 128h + 32i + 4j .. + 3 of each row) of a column, from its qh
 * chunk 8h + j and ql chunks 16h + j and 16h + 8 + j */
AK_INLINE void q6_slots(const uint8_t *col, int h, int j, __m512i u[4]) {
    const __m512i low = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    const __m512i hc = _mm512_loadu_si512(col + X16_QH + 64 * (8 * h + j));
    const __m512i a = _mm512_loadu_si512(col + X16_QL + 64 * (16 * h + j));
    const __m512i c = _mm512_loadu_si512(col + X16_QL + 64 * (16 * h + 8 + j));
    u[0] = _mm512_ternarylogic_epi32(_mm512_and_si512(a, low), _mm512_slli_epi16(hc, 4), m30, 0xF8);
    u[1] = _mm512_ternarylogic_epi32(_mm512_and_si512(c, low), _mm512_slli_epi16(hc, 2), m30, 0xF8);
    u[2] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(a, 4), low), hc, m30, 0xF8);
    u[3] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(c, 4), low), _mm512_srli_epi16(hc, 2), m30, 0xF8);
}
AK_INLINE void x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys) {
    __m512 acc[4];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *col = w + (size_t)b * X16_COL;
        __m512i is[4];
        for (int r = 0; r < M; r++) is[r] = _mm512_setzero_si512();
        AK_SIDE_PREFETCH(x);
        for (int h = 0; h < 2; h++)
            for (int jh = 0; jh < 2; jh++) { /* groups 8h + 2i + jh, i = 0..3: inputs 128h + 32i + 16jh .. + 15 */
                __m512i t[4][4]; /* [row][i] */
                for (int r = 0; r < M; r++)
                    for (int i = 0; i < 4; i++) t[r][i] = _mm512_set1_epi32(x[r].off4[16 * (size_t)b + 8 * h + 2 * i + jh]);
                for (int j = 4 * jh; j < 4 * jh + 4; j++) {
                    __m512i u[4];
                    AK_PREFETCH_SHARE(col, X16_COL, 2, 8 * h + j, 16, 4); /* the column 2 ahead, a 16th a step */
                    q6_slots(col, h, j, u);
                    for (int r = 0; r < M; r++)
                        for (int i = 0; i < 4; i++) t[r][i] = ak_dp4(t[r][i], u[i], x + r, 256 * (size_t)b + 128 * h + 32 * i + 4 * j);
                }
                for (int i = 0; i < 4; i++) {
                    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(col + 32 + 16 * (8 * h + 2 * i + jh))));
                    for (int r = 0; r < M; r++) is[r] = _mm512_add_epi32(is[r], _mm512_mullo_epi32(t[r][i], sc));
                }
            }
        const __m512 D = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)col));
        for (int r = 0; r < M; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r]), _mm512_mul_ps(D, _mm512_set1_ps(x[r].d[8 * (size_t)b])), acc[r]);
    }
    for (int r = 0; r < M; r++) _mm512_storeu_ps(y + r * ys, acc[r]);
}
static void q6_k_dot_x4(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {
    AK_DISPATCH_M(x4, w, nb, x, M, y, ys)
}
/* unit u (super-block column u) of a group of 16 rows → a panel (gemm.c's AK_PANEL_K16): the quants as x4 takes them
 * out, slot 32h + 8i + j = inputs 128h + 32i + 4j .. + 3; the scales widened; d */
static void q6_k_panel(const uint8_t *w, int u, int nb, ak_panel *P) {
    const uint8_t *col = w + (size_t)u * X16_COL;
    (void)nb;
    P->d[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)col));
    for (int g = 0; g < 16; g++) P->sc[g] = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(col + 32 + 16 * g)));
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 8; j++) {
            __m512i q[4];
            q6_slots(col, h, j, q);
            for (int i = 0; i < 4; i++) P->q[32 * h + 8 * i + j] = q[i];
        }
}
#define Q6_K_PANEL q6_k_panel
#define Q6_K_X4_FIELDS {{208, 2, 2}, {192, 16, 1}, {128, 64, 4}, {0, 128, 4}, {0, 0, 0}}
#define Q6_K_X4_ROWS 16
#else
#define q6_k_dot_x4 NULL
#define Q6_K_PANEL NULL
#define Q6_K_X4_FIELDS {{208, 2, 2}, {192, 16, 1}, {128, 64, 4}, {0, 128, 4}, {0, 0, 0}}
#define Q6_K_X4_ROWS 16
#endif

const ak_type ak_type_q6_k = {AK_Q6_K, 256, 210, q6_k_to_float, q6_k_dot, q6_k_dot_x4, Q6_K_X4_FIELDS,
                              32, NULL, Q6_K_PANEL, AK_PANEL_K16, Q6_K_X4_ROWS, 0};
