/* ggml's Q4_K and Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, each with a 6-bit scale sc_j and min
 * m_j packed in 12 bytes (k_scale_min), under fp16 d and dmin:
 *   w = d·sc_j · q − dmin·m_j,   q 4-bit (Q4_K: d, dmin, scales[12], qs[128]; 144 bytes)
 *                                q 5-bit (Q5_K: d, dmin, scales[12], qh[32], qs[128]; 176 bytes)
 * Sub-block j's quants: the low (j even) or high (j odd) nibbles of qs[32·(j/2) ..], and for Q5_K bit j of qh[l]
 * as bit 4 of weight l. A sub-block is one activation block (x = dx·qx, sx = dx·Σqx):
 *   Σ w·x = d·sc_j·dx · Σ q·qx − dmin·m_j · sx.
 * HIGH (Q5_K's high bits) is a literal at every call of the always_inline bodies. */
#include "blocks.h"

#define SB(HIGH) (144 + 32 * (HIGH))

/* the 256 unsigned quants of a super-block, in weight order */
AK_INLINE void quants(const uint8_t *b, uint8_t *u, const int HIGH) {
    const uint8_t *qh = b + 16, *qs = b + 16 + 32 * HIGH;
    for (int j = 0; j < 8; j++) {
#ifdef AK_AVX2
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * (j / 2)));
        __m256i v = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(0x0f));
        if (HIGH) {
            const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
            v = _mm256_or_si256(v, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(h, j), 4), _mm256_set1_epi8(0x10)));
        }
        _mm256_storeu_si256((__m256i *)(u + 32 * j), v);
#else
        for (int l = 0; l < 32; l++)
            u[32 * j + l] = (uint8_t)(((qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 0xF) | (HIGH ? ((qh[l] >> j) & 1) << 4 : 0));
#endif
    }
}

/* count super-blocks → floats as gguf-py: (d·sc)·q − dmin·m (d·sc·q is exact: one rounding) */
AK_INLINE void to_float(const uint8_t *blocks, int count, float *o, const int HIGH) {
    uint8_t u[256];
    for (int k = 0; k < count; k++, o += 256) {
        const uint8_t *b = blocks + (size_t)k * SB(HIGH);
        const float d = ld_half(b), dmin = ld_half(b + 2);
        quants(b, u, HIGH);
        for (int j = 0; j < 8; j++) {
            int sc, mn;
            k_scale_min(j, b + 4, &sc, &mn);
            const float dj = d * (float)sc, mj = dmin * (float)mn;
#ifdef __AVX512F__
            for (int h = 0; h < 2; h++) {
                const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(u + 32 * j + 16 * h))));
                _mm512_storeu_ps(o + 32 * j + 16 * h, _mm512_fmsub_ps(q, _mm512_set1_ps(dj), _mm512_set1_ps(mj)));
            }
#else
            for (int l = 0; l < 32; l++) o[32 * j + l] = dj * (float)u[32 * j + l] - mj;
#endif
        }
    }
}

#ifdef AK_AVX2
/* one row against M activation rows (256-bit), with one activation scale dx per super-block (q8_K): the integer
 * sums of the 8 sub-blocks are weighted by their 6-bit scales in int16×int16 products (_mm256_madd_epi16) and
 * added in int32, so a super-block ends in one conversion and one FMA per row (ggml's vec_dot_q4_K_q8_K):
 *   Σ w·x = d·dx · Σ_j sc_j · Σ q·qx  −  Σ_j dmin·m_j · sx_j */
AK_INLINE void dot_rows(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys, const int HIGH) {
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    const __m256i low = _mm256_set1_epi8(0x0f), sixteen = _mm256_set1_epi8(0x10);
    __m256 acc[4], accm[4];
    for (int r = 0; r < M; r++) acc[r] = accm[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * SB(HIGH), *qs = blk + 16 + 32 * HIGH;
        const uint32_t w0 = ld_u32(blk + 4), w1 = ld_u32(blk + 8), w2 = ld_u32(blk + 12);
        const __m128i sc = _mm_setr_epi32((int)(w0 & k1), (int)((w2 & k2) | (((w0 >> 6) & k3) << 4)), 0, 0);
        const __m128i mn = _mm_setr_epi32((int)(w1 & k1), (int)(((w2 >> 4) & k2) | (((w1 >> 6) & k3) << 4)), 0, 0);
        const __m256 MN = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)), _mm256_set1_ps(ld_half(blk + 2)));
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc)); /* sc_0..sc_7 as int16, both lanes */
        const float d = ld_half(blk);
        __m256i isum[4];
        for (int r = 0; r < M; r++) {
            accm[r] = _mm256_fmadd_ps(MN, _mm256_loadu_ps(x[r].s + 8 * (size_t)b), accm[r]);
            isum[r] = _mm256_setzero_si256();
        }
        const __m256i h = HIGH ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
        for (int p = 0; p < 4; p++) { /* sub-blocks 2p (low nibbles), 2p + 1 (high) */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
            __m256i lo = _mm256_and_si256(q, low), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
            if (HIGH) {
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(h, 2 * p), 4), sixteen));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(h, 2 * p + 1), 4), sixteen));
            }
            /* sc_2p, sc_2p+1 in every int16 lane */
            const __m256i sl = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 * (4 * p + 1) + 4 * p)));
            const __m256i sh = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 * (4 * p + 3) + 4 * p + 2)));
            for (int r = 0; r < M; r++) { /* u8·s8 pairs < 2·31·127: no int16 saturation */
                const int8_t *xq = x[r].qs + 256 * (size_t)b + 64 * p;
                const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));
                const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32)));
                isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(_mm256_madd_epi16(pl, sl), _mm256_madd_epi16(ph, sh)));
            }
        }
        for (int r = 0; r < M; r++) /* x[r].d is constant over the super-block */
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * x[r].d[8 * (size_t)b]), acc[r]);
    }
    for (int r = 0; r < M; r++) y[r * ys] = hsum(acc[r]) - hsum(accm[r]);
}
#define AK_ROWS_M(F, w, nb, x, M, y, ys, HIGH) \
    switch (M) {                              \
        case 1: F(w, nb, x, 1, y, ys, HIGH); break; \
        case 2: F(w, nb, x, 2, y, ys, HIGH); break; \
        case 3: F(w, nb, x, 3, y, ys, HIGH); break; \
        default: F(w, nb, x, 4, y, ys, HIGH);       \
    }
AK_INLINE void dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys, const int HIGH) {
    AK_ROWS_M(dot_rows, w, nb, x, M, y, ys, HIGH)
}
#else
/* one row against one activation row, portable C */
static float dot1(const uint8_t *w, int nb, ak_act x, const int HIGH) {
    float sum = 0.f;
    uint8_t u[256];
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * SB(HIGH);
        const float d = ld_half(blk), dmin = ld_half(blk + 2);
        quants(blk, u, HIGH);
        for (int j = 0; j < 8; j++) {
            int sc, mn, isum = 0;
            k_scale_min(j, blk + 4, &sc, &mn);
            const int a = 8 * b + j;
            for (int l = 0; l < 32; l++) isum += u[32 * j + l] * x.qs[32 * a + l];
            sum += d * (float)sc * x.d[a] * (float)isum - dmin * (float)mn * x.s[a];
        }
    }
    return sum;
}

AK_INLINE void dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys, const int HIGH) {
    for (int r = 0; r < M; r++) y[r * ys] = dot1(w, nb, x[r], HIGH);
}
#endif

#if defined(AK_AVX2) || defined(AK_X4)
/* the 6-bit scales and mins of a column of four interleaved super-blocks (the scales' three 32-bit words of rows 0-3
 * at col + 16, + 32, + 48), unpacked as ggml's kmask arithmetic on 32-bit lanes: byte 4r + j of sc[0] / mn[0] is
 * row r's sc_j / m_j for j < 4, of sc[1] / mn[1] its sc_j+4 / m_j+4 */
AK_INLINE void x4_scales(const uint8_t *col, __m128i sc[2], __m128i mn[2]) {
    const __m128i k1 = _mm_set1_epi32(0x3f3f3f3f), k2 = _mm_set1_epi32(0x0f0f0f0f), k3 = _mm_set1_epi32(0x03030303);
    const __m128i w0 = _mm_loadu_si128((const __m128i *)(col + 16)), w1 = _mm_loadu_si128((const __m128i *)(col + 32)),
                  w2 = _mm_loadu_si128((const __m128i *)(col + 48));
    sc[0] = _mm_and_si128(w0, k1), mn[0] = _mm_and_si128(w1, k1);
    sc[1] = _mm_or_si128(_mm_and_si128(w2, k2), _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(w0, 6), k3), 4));
    mn[1] = _mm_or_si128(_mm_and_si128(_mm_srli_epi32(w2, 4), k2), _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(w1, 6), k3), 4));
}
#endif

#ifdef AK_X4
/* Sixteen rows interleaved (a panel of gemm.c): per super-block column d[16], dmin[16] (fp16), the scales' three
 * 32-bit words word by word (w0 of rows 0-15, w1, w2), [qh: 8 chunks,] qs: 32 chunks, a chunk holding 4 bytes of
 * each of the 16 rows, so that 32-bit lane L of any 512-bit load is row L. A qs chunk's low nibbles are a panel
 * slot (4 inputs of each row) of an even sub-block, its high nibbles the same 4 inputs of the next sub-block:
 * the weights' bytes come out of a load by an AND and a shift, with no transpose (Q5_K's bit 4 of weight l of
 * sub-block j: bit j of qh byte l). Per slot, one vpdpbusd per activation row against its 4 quants broadcast;
 * each sub-block's integer sum is scaled by its 6-bit scale in int32 and summed over the super-block, then
 *   acc = (acc + Σ·(d·dx)) − Σ_j (dmin·m_j)·sx_j
 * per row (gemm.c's AK_PANEL_MIN arithmetic, rows_tile). This is the product for any number of rows, prompts
 * included (ak_gemm hands these types to ak_gemv): the nibbles taken out of each load again for every 4 rows cost
 * less than unpacking a panel into memory (0.61× gemm.c's time at 16 rows, 0.93× at 512; docs/performance.md), and
 * a row's bits never depend on the rows beside it. Four integer chains a row (the low and high slots of even and
 * odd chunks) hide vpdpbusd's latency for one row. */
#define X16_COL(HIGH) (16 * SB(HIGH))
#define X16_QH 256 /* after d, dmin and the scale words */
#ifndef X16_PREFETCH
#define X16_PREFETCH 2 /* columns ahead, a 16th of one per step (AK_PREFETCH_SHARE); without it ~1.3× slower (Zen 5) */
#endif
/* a column's scales (S: bytes j of sc_j, j < 4 in [0], 4..7 in [1]; Mn the same for the mins) as ggml's kmasks */
AK_INLINE void x16_scales(const uint8_t *col, __m512i S[2], __m512i Mn[2]) {
    const __m512i k1 = _mm512_set1_epi32(0x3f3f3f3f), k2 = _mm512_set1_epi32(0x0f0f0f0f), k3 = _mm512_set1_epi32(0x03030303);
    const __m512i w0 = _mm512_loadu_si512(col + 64), w1 = _mm512_loadu_si512(col + 128), w2 = _mm512_loadu_si512(col + 192);
    S[0] = _mm512_and_si512(w0, k1), Mn[0] = _mm512_and_si512(w1, k1);
    S[1] = _mm512_or_si512(_mm512_and_si512(w2, k2), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w0, 6), k3), 4));
    Mn[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 4), k2), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w1, 6), k3), 4));
}
/* byte j % 4 of v's lanes as int32 */
static inline __m512i x16_byte(__m512i v, int j) { return _mm512_and_si512(_mm512_srli_epi32(v, 8 * (j & 3)), _mm512_set1_epi32(0xff)); }
/* chunk c of a column → the low (sub-block 2p) and high (2p + 1) slots' bytes, Q5_K's bit 4 added */
AK_INLINE void x16_slots(const uint8_t *col, int p, int i, __m512i *lo, __m512i *hi, const int HIGH) {
    const __m512i low = _mm512_set1_epi8(0x0f), v = _mm512_loadu_si512(col + X16_QH + 512 * HIGH + 64 * (8 * p + i));
    *lo = _mm512_and_si512(v, low), *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    if (HIGH) {
        const __m512i h = _mm512_loadu_si512(col + X16_QH + 64 * i), sixteen = _mm512_set1_epi8(0x10);
        *lo = _mm512_ternarylogic_epi32(*lo, _mm512_slli_epi16(_mm512_srli_epi16(h, 2 * p), 4), sixteen, 0xF8);
        *hi = _mm512_ternarylogic_epi32(*hi, _mm512_slli_epi16(_mm512_srli_epi16(h, 2 * p + 1), 4), sixteen, 0xF8);
    }
}
AK_INLINE void x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys, const int HIGH) {
    __m512 acc[4];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *col = w + (size_t)b * X16_COL(HIGH);
        __m512i S[2], Mn[2], is[4];
        x16_scales(col, S, Mn);
        for (int r = 0; r < M; r++) is[r] = _mm512_setzero_si512();
        AK_SIDE_PREFETCH(x);
        for (int p = 0; p < 4; p++) { /* sub-blocks 2p and 2p + 1 */
            __m512i t[4][4];
            for (int r = 0; r < M; r++) t[r][0] = t[r][1] = t[r][2] = t[r][3] = _mm512_setzero_si512();
            for (int i = 0; i < 8; i += 2) {
                __m512i lo0, hi0, lo1, hi1;
                AK_PREFETCH_SHARE(col, X16_COL(HIGH), X16_PREFETCH, 4 * p + i / 2, 16, 3); /* 144 or 176 bytes */
                x16_slots(col, p, i, &lo0, &hi0, HIGH);
                x16_slots(col, p, i + 1, &lo1, &hi1, HIGH);
                const size_t at = 256 * (size_t)b + 64 * p + 4 * i;
                for (int r = 0; r < M; r++) {
                    t[r][0] = ak_dp4(t[r][0], lo0, x + r, at);
                    t[r][1] = ak_dp4(t[r][1], hi0, x + r, at + 32);
                    t[r][2] = ak_dp4(t[r][2], lo1, x + r, at + 4);
                    t[r][3] = ak_dp4(t[r][3], hi1, x + r, at + 36);
                }
            }
            const __m512i sl = x16_byte(S[p >> 1], 2 * p), sh = x16_byte(S[p >> 1], 2 * p + 1);
            for (int r = 0; r < M; r++)
                is[r] = _mm512_add_epi32(is[r], _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(t[r][0], t[r][2]), sl),
                                                                 _mm512_mullo_epi32(_mm512_add_epi32(t[r][1], t[r][3]), sh)));
        }
        const __m512 D = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)col));
        const __m512 DM = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(col + 32)));
        __m512 mf[8];
        for (int j = 0; j < 8; j++) mf[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(x16_byte(Mn[j >> 2], j)), DM);
        for (int r = 0; r < M; r++) {
            const __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r]), _mm512_mul_ps(D, _mm512_set1_ps(x[r].d[8 * (size_t)b])), acc[r]);
            const float *sx = x[r].s + 8 * (size_t)b;
            __m512 mn = _mm512_mul_ps(mf[0], _mm512_set1_ps(sx[0]));
            for (int j = 1; j < 8; j++) mn = _mm512_fmadd_ps(mf[j], _mm512_set1_ps(sx[j]), mn);
            acc[r] = _mm512_sub_ps(a, mn);
        }
    }
    for (int r = 0; r < M; r++) _mm512_storeu_ps(y + r * ys, acc[r]);
}
#endif

#if defined(AK_AVX2) && !defined(AK_X4)
/* Four rows interleaved (the fields of the 512-bit layout below), 256-bit: a register holds 16 quant bytes of two
 * rows (128-bit lane 0 row 2p, lane 1 row 2p + 1). The two halves of a sub-block are summed in int16 (at most
 * 2·31·127·2 < 2^15), weighted by the two rows' scales in one madd_epi16 and added in int32; a super-block ends
 * in one float FMA for the four rows (hadd leaves lanes [r0 r0 r2 r2 | r1 r1 r3 r3]). Per activation row and 64
 * weights of four rows: 8 maddubs, 4 adds, 4 madds, 4 adds (the row layout: 8, 8, 8). */
AK_INLINE void x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys, const int HIGH) {
    const __m256i low = _mm256_set1_epi8(0x0f), sixteen = _mm256_set1_epi8(0x10);
    const __m256i spread = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
    __m256i pick[4][2]; /* scale byte j of rows 0|1 (pick[j][0]) or 2|3 (pick[j][1]) as int16 in each lane's 8 lanes */
    for (int j = 0; j < 4; j++)
        for (int p = 0; p < 2; p++) {
            const short a = (short)(4 * (2 * p) + j), b = (short)(4 * (2 * p + 1) + j); /* high byte 0: zero */
            pick[j][p] = _mm256_setr_m128i(_mm_set1_epi16((short)(a | 0xff00)), _mm_set1_epi16((short)(b | 0xff00)));
        }
    __m256 acc[4], accm[4];
    for (int r = 0; r < M; r++) acc[r] = accm[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *col = w + (size_t)b * 4 * SB(HIGH), *qs = col + 64 + 128 * HIGH;
        const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)col));
        const __m256 D8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d4), spread);
        const __m128 dm4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(col + 8)));
        __m128i scs[2], mns[2]; /* bytes 4r + j: row r's j */
        x4_scales(col, scs, mns);
        const __m128i sc03 = scs[0], sc47 = scs[1], m03 = mns[0], m47 = mns[1];
        /* row r's mins m_0..m_7 · dmin_r as 8 floats */
        const __m128i mlo = _mm_unpacklo_epi32(m03, m47), mhi = _mm_unpackhi_epi32(m03, m47);
        const __m256 MN[4] = {
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mlo)), _mm256_set1_ps(_mm_cvtss_f32(dm4))),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mlo, 8))), _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(dm4, dm4, 1)))),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mhi)), _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(dm4, dm4, 2)))),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mhi, 8))), _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(dm4, dm4, 3))))};
        const __m256i S03 = _mm256_broadcastsi128_si256(sc03), S47 = _mm256_broadcastsi128_si256(sc47);
        __m256i isum[4][2];
        for (int r = 0; r < M; r++) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
        for (int p = 0; p < 4; p++) /* sub-blocks 2p (low nibbles) and 2p + 1 (high) */
            for (int e = 0; e < 2; e++) { /* rows 0|1, then 2|3: fewer live registers than both pairs at once */
                const uint8_t *q = qs + 128 * p + 32 * e;
                __m256i lo[2], hi[2]; /* weights 0-15, then 16-31, of the pair */
                for (int i = 0; i < 2; i++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 64 * i));
                    lo[i] = _mm256_and_si256(v, low), hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    if (HIGH) {
                        const __m256i h = _mm256_loadu_si256((const __m256i *)(col + 64 + 32 * e + 64 * i));
                        lo[i] = _mm256_or_si256(lo[i], _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(h, 2 * p), 4), sixteen));
                        hi[i] = _mm256_or_si256(hi[i], _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(h, 2 * p + 1), 4), sixteen));
                    }
                }
                const __m256i src = p < 2 ? S03 : S47;
                const __m256i sl = _mm256_shuffle_epi8(src, pick[(2 * p) & 3][e]), sh = _mm256_shuffle_epi8(src, pick[(2 * p + 1) & 3][e]);
                for (int r = 0; r < M; r++) {
                    const int8_t *xq = x[r].qs + 256 * (size_t)b + 64 * p;
#define B16(o) _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + (o))))
#define HALVES(u, v, o) _mm256_add_epi16(_mm256_maddubs_epi16(u, B16(o)), _mm256_maddubs_epi16(v, B16((o) + 16)))
                    isum[r][e] = _mm256_add_epi32(isum[r][e], _mm256_add_epi32(_mm256_madd_epi16(HALVES(lo[0], lo[1], 0), sl),
                                                                               _mm256_madd_epi16(HALVES(hi[0], hi[1], 32), sh)));
#undef HALVES
#undef B16
                }
            }
        for (int r = 0; r < M; r++) { /* x[r].d is constant over the super-block */
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(isum[r][0], isum[r][1])),
                                     _mm256_mul_ps(D8, _mm256_set1_ps(x[r].d[8 * (size_t)b])), acc[r]);
            const __m256 s = _mm256_loadu_ps(x[r].s + 8 * (size_t)b); /* Σ_j dmin·m_j · sx_j of each row */
            const __m256 h01 = _mm256_hadd_ps(_mm256_mul_ps(MN[0], s), _mm256_mul_ps(MN[1], s));
            const __m256 h23 = _mm256_hadd_ps(_mm256_mul_ps(MN[2], s), _mm256_mul_ps(MN[3], s));
            accm[r] = _mm256_add_ps(accm[r], _mm256_hadd_ps(h01, h23)); /* [r0 r1 r2 r3 | r0 r1 r2 r3] */
        }
    }
    for (int r = 0; r < M; r++) {
        const __m128 m = _mm_add_ps(_mm256_castps256_ps128(accm[r]), _mm256_extractf128_ps(accm[r], 1));
        _mm_storeu_ps(y + r * ys, _mm_sub_ps(x4_sums(acc[r]), m));
    }
}
#endif

#ifdef AK_X4
#define X4_ROWS 16
#define QS_GRANULE 4
#else
#define X4_ROWS 4 /* the AVX2 kernel */
#define QS_GRANULE 16
#endif

#if defined(AK_X4) || defined(AK_AVX2)
#define KTYPE_X4(name, HIGH)                                                                                   \
    AK_INLINE void name##_x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys) {  \
        x4(w, nb, x, M, y, ys, HIGH);                                                                      \
    }                                                                                                      \
    static void name##_dot_x4(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {       \
        AK_DISPATCH_M(name##_x4, w, nb, x, M, y, ys)                                                       \
    }
#define X4(name) name
#else
#define KTYPE_X4(name, HIGH)
#define X4(name) NULL
#endif
#define KTYPE(name, ID, HIGH)                                                                                   \
    static void name##_to_float(const uint8_t *b, int count, float *o) { to_float(b, count, o, HIGH); }   \
    static void name##_dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {      \
        dot(w, nb, x, M, y, ys, HIGH);                                                                    \
    }                                                                                                     \
    KTYPE_X4(name, HIGH)                                                                                  \
    const ak_type ak_type_##name = {ID, 256, SB(HIGH), name##_to_float, name##_dot, X4(name##_dot_x4),   \
                                    {{0, 2, 2}, {2, 2, 2}, {4, 12, 4}, {16, HIGH ? 32 : 0, QS_GRANULE}, {16 + 32 * HIGH, 128, QS_GRANULE}, {0, 0, 0}}, \
                                    0, NULL, NULL, AK_PANEL_MIN, X4_ROWS, 0};

KTYPE(q4_k, AK_Q4_K, 0)
KTYPE(q5_k, AK_Q5_K, 1)
