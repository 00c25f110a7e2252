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
/* Four rows interleaved: d[4], dmin[4], the scales' three 32-bit words word by word (w0 of rows 0-3, w1, w2),
 * [qh: 4 rows × 16 bytes, twice], qs: 4 rows × 16 bytes, 8 times. A 512-bit register of nibbles holds 16 weights
 * of a sub-block for each row (lane 4r..4r+3: row r), against those 16 activations broadcast. The arithmetic is
 * gemm.c's AK_PANEL_MIN in its order, so the two give the same bits and ak_gemv may take either for any row:
 * each sub-block's integer sums are scaled by its 6-bit scale in int32 (two sub-blocks' sums packed to int16, one
 * vpdpwssd) and summed over the super-block, completed across lanes (rows_sums), then
 *   acc = (acc + Σ·(d·dx)) − Σ_j (dmin·m_j)·sx_j,
 * the mins' sum taken apart (m_0·sx_0 first, then one FMA each) so that the chain through acc is two operations. */
AK_INLINE void x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys, const int HIGH) {
    const __m512i low = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(0x10);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    /* pair[e]: the bytes of sc_2e, sc_2e+1 of row c (x4_scales' 4c + j) as int16, four times each, in 128-bit lane c */
#define P4(c, j) 4 * (c) + (j), -128
#define PAIR(c, e) P4(c, 2 * (e)), P4(c, 2 * (e)), P4(c, 2 * (e)), P4(c, 2 * (e)), P4(c, 2 * (e) + 1), P4(c, 2 * (e) + 1), P4(c, 2 * (e) + 1), P4(c, 2 * (e) + 1)
    static const int8_t pairs[2][64] __attribute__((aligned(64))) = {{PAIR(0, 0), PAIR(1, 0), PAIR(2, 0), PAIR(3, 0)},
                                                                      {PAIR(0, 1), PAIR(1, 1), PAIR(2, 1), PAIR(3, 1)}};
#undef PAIR
#undef P4
    const __m512i pair[2] = {_mm512_load_si512(pairs[0]), _mm512_load_si512(pairs[1])};
    __m512 acc = _mm512_setzero_ps(); /* lane 4c + r: weight row c · activation row r */
    __m128 acc1 = _mm_setzero_ps();   /* M = 1: lane c */
    for (int b = 0; b < nb; b++) {
        const uint8_t *col = w + (size_t)b * 4 * SB(HIGH), *qs = col + 64 + 128 * HIGH;
        const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)col));
        const __m512 DM = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(col + 8)))));
        __m128i scs[2], mns[2];
        x4_scales(col, scs, mns);
        const __m512i SC[2] = {_mm512_broadcast_i32x4(scs[0]), _mm512_broadcast_i32x4(scs[1])};
        const __m512 MF[2] = {_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mns[0])), DM),  /* lane 4c+j: dmin·m_j */
                              _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mns[1])), DM)}; /* j + 4 */
        __m512i h0 = _mm512_setzero_si512(), h1 = h0, is[4];
        if (HIGH) h0 = _mm512_loadu_si512(col + 64), h1 = _mm512_loadu_si512(col + 128);
        for (int r = 0; r < M; r++) is[r] = _mm512_setzero_si512();
        for (int p = 0; p < 4; p++) { /* sub-blocks 2p (low nibbles) and 2p+1 (high), weights 0-15 (a) and 16-31 (b) */
            const __m512i qa = _mm512_loadu_si512(qs + 128 * p), qb = _mm512_loadu_si512(qs + 128 * p + 64);
            __m512i la = _mm512_and_si512(qa, low), lb = _mm512_and_si512(qb, low);
            __m512i ha = _mm512_and_si512(_mm512_srli_epi16(qa, 4), low), hb = _mm512_and_si512(_mm512_srli_epi16(qb, 4), low);
            if (HIGH) { /* | bit j of qh as bit 4: (qh >> j) << 4 & 0x10 */
                la = _mm512_ternarylogic_epi32(la, _mm512_slli_epi16(_mm512_srli_epi16(h0, 2 * p), 4), sixteen, 0xF8);
                lb = _mm512_ternarylogic_epi32(lb, _mm512_slli_epi16(_mm512_srli_epi16(h1, 2 * p), 4), sixteen, 0xF8);
                ha = _mm512_ternarylogic_epi32(ha, _mm512_slli_epi16(_mm512_srli_epi16(h0, 2 * p + 1), 4), sixteen, 0xF8);
                hb = _mm512_ternarylogic_epi32(hb, _mm512_slli_epi16(_mm512_srli_epi16(h1, 2 * p + 1), 4), sixteen, 0xF8);
            }
            const __m512i s16 = _mm512_shuffle_epi8(SC[p >> 1], pair[p & 1]); /* sc_2p ×4, sc_2p+1 ×4 a row, int16 */
            for (int r = 0; r < M; r++) { /* a lane's 8 products fit int16 (8·31·127): packed in pairs, then scaled */
                const int8_t *xq = x[r].qs + 256 * (size_t)b + 64 * p;
                const __m512i ilo = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), la, bcast16(xq)), lb, bcast16(xq + 16));
                const __m512i ihi = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ha, bcast16(xq + 32)), hb, bcast16(xq + 48));
                is[r] = _mm512_dpwssd_epi32(is[r], _mm512_packs_epi32(ilo, ihi), s16);
            }
        }
        if (M == 1) { /* one activation row: the four weight rows' sums in 128 bits (lane c) */
            const __m512i t = _mm512_add_epi32(is[0], _mm512_shuffle_epi32(is[0], _MM_PERM_CDAB));
            const __m512i u = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_BADC));
            const __m128i tot = _mm512_castsi512_si128(_mm512_permutexvar_epi32(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), u));
            const __m512i tr = transpose4x4(); /* lane 4j + c ← 4c + j */
            const __m512 T[2] = {_mm512_permutexvar_ps(tr, MF[0]), _mm512_permutexvar_ps(tr, MF[1])};
            const float *sx = x[0].s + 8 * (size_t)b;
            __m128 mn = _mm_mul_ps(_mm512_castps512_ps128(T[0]), _mm_set1_ps(sx[0]));
            mn = _mm_fmadd_ps(_mm512_extractf32x4_ps(T[0], 1), _mm_set1_ps(sx[1]), mn);
            mn = _mm_fmadd_ps(_mm512_extractf32x4_ps(T[0], 2), _mm_set1_ps(sx[2]), mn);
            mn = _mm_fmadd_ps(_mm512_extractf32x4_ps(T[0], 3), _mm_set1_ps(sx[3]), mn);
            mn = _mm_fmadd_ps(_mm512_castps512_ps128(T[1]), _mm_set1_ps(sx[4]), mn);
            mn = _mm_fmadd_ps(_mm512_extractf32x4_ps(T[1], 1), _mm_set1_ps(sx[5]), mn);
            mn = _mm_fmadd_ps(_mm512_extractf32x4_ps(T[1], 2), _mm_set1_ps(sx[6]), mn);
            mn = _mm_fmadd_ps(_mm512_extractf32x4_ps(T[1], 3), _mm_set1_ps(sx[7]), mn);
            acc1 = _mm_sub_ps(_mm_fmadd_ps(_mm_cvtepi32_ps(tot), _mm_mul_ps(d4, _mm_set1_ps(x[0].d[8 * (size_t)b])), acc1), mn);
            continue;
        }
        float dx[4] = {0.f, 0.f, 0.f, 0.f};
        for (int r = 0; r < M; r++) dx[r] = x[r].d[8 * (size_t)b];
        const __m512 D = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d4));
        const __m512 s01 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x[0].s + 8 * (size_t)b)), _mm256_loadu_ps(x[1].s + 8 * (size_t)b), 1);
        __m512 s23 = s01; /* rows 0, 1 | rows 2, 3: their 8 sx_j each */
        if (M > 2)
            s23 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x[2].s + 8 * (size_t)b)),
                                     _mm256_loadu_ps(x[M > 3 ? 3 : 2].s + 8 * (size_t)b), 1);
        /* lane 4c + r ← row r's sx_j: lane 8r + j of (s01, s23) */
#define MN_J(j) _mm512_shuffle_ps(MF[(j) >> 2], MF[(j) >> 2], 0x55 * ((j) & 3))
#define SX_J(j) _mm512_permutex2var_ps(s01, _mm512_set_epi32(24 + (j), 16 + (j), 8 + (j), j, 24 + (j), 16 + (j), 8 + (j), j, \
                                                             24 + (j), 16 + (j), 8 + (j), j, 24 + (j), 16 + (j), 8 + (j), j), s23)
        __m512 mn = _mm512_mul_ps(MN_J(0), SX_J(0));
#define MIN_A(j) mn = _mm512_fmadd_ps(MN_J(j), SX_J(j), mn)
        MIN_A(1); MIN_A(2); MIN_A(3); MIN_A(4); MIN_A(5); MIN_A(6); MIN_A(7);
#undef MIN_A
#undef SX_J
#undef MN_J
        acc = _mm512_sub_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(rows_sums(is, M)), _mm512_mul_ps(D, _mm512_broadcast_f32x4(_mm_loadu_ps(dx))), acc), mn);
    }
    if (M == 1) _mm_storeu_ps(y, acc1);
    else store_rows(acc, M, y, ys);
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
/* unit u (super-block u) of four interleaved groups → a panel (gemm.c): the quants' nibbles (and Q5_K's high bits)
 * unpacked to bytes, slot by slot; the scales and mins unpacked by x4_scales and moved to lane 4r + g */
AK_INLINE void panel(const uint8_t *w, size_t gbytes, int u, ak_panel *P, const int HIGH) {
    const __m512i low = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(0x10);
    const size_t at = (size_t)u * 4 * SB(HIGH);
    const __m512i tr = transpose4x4(); /* 4r + g ← 4g + r */
    __m512i S[2], M[2]; /* 32-bit lane 4r + g: row r of group g's scale (mins) bytes j = 0..3 (S[0]) or 4..7 (S[1]) */
    for (int h = 0; h < 2; h++) S[h] = M[h] = _mm512_setzero_si512();
    for (int g = 0; g < 4; g++) {
        __m128i scs[2], mns[2];
        x4_scales(w + g * gbytes + at, scs, mns);
        for (int h = 0; h < 2; h++) { /* lane 4g + r, for now */
            S[h] = _mm512_mask_broadcast_i32x4(S[h], (__mmask16)(0xF << (4 * g)), scs[h]);
            M[h] = _mm512_mask_broadcast_i32x4(M[h], (__mmask16)(0xF << (4 * g)), mns[h]);
        }
    }
    for (int h = 0; h < 2; h++) S[h] = _mm512_permutexvar_epi32(tr, S[h]), M[h] = _mm512_permutexvar_epi32(tr, M[h]);
    const __m512 D = panel_halves(w, gbytes, at), DM = panel_halves(w, gbytes, at + 8);
    const __m512i byte = _mm512_set1_epi32(0xff);
    P->d[0] = D;
    for (int j = 0; j < 8; j++) { /* byte j % 4 of each lane */
        P->sc[j] = _mm512_and_si512(_mm512_srli_epi32(S[j >> 2], 8 * (j & 3)), byte);
        P->mn[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(M[j >> 2], 8 * (j & 3)), byte)), DM);
    }
    for (int p = 0; p < 4; p++)      /* qs chunk 2p + half: weights 16·half .. of sub-blocks 2p (low) and 2p + 1 (high) */
        for (int half = 0; half < 2; half++) {
            __m512i lo[4], hi[4];
            for (int g = 0; g < 4; g++) {
                const uint8_t *col = w + g * gbytes + at;
                const __m512i q = _mm512_loadu_si512(col + 64 + 128 * HIGH + 128 * p + 64 * half);
                lo[g] = _mm512_and_si512(q, low), hi[g] = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
                if (HIGH) { /* | bit j of qh as bit 4 */
                    const __m512i h = _mm512_loadu_si512(col + 64 + 64 * half);
                    lo[g] = _mm512_ternarylogic_epi32(lo[g], _mm512_slli_epi16(_mm512_srli_epi16(h, 2 * p), 4), sixteen, 0xF8);
                    hi[g] = _mm512_ternarylogic_epi32(hi[g], _mm512_slli_epi16(_mm512_srli_epi16(h, 2 * p + 1), 4), sixteen, 0xF8);
                }
            }
            panel_slots(lo, P->q + 8 * (2 * p) + 4 * half);
            panel_slots(hi, P->q + 8 * (2 * p + 1) + 4 * half);
        }
}
#define KTYPE_PANEL(name, HIGH) \
    static void name##_panel(const uint8_t *w, size_t gbytes, int u, int nb, ak_panel *P) { (void)nb; panel(w, gbytes, u, P, HIGH); }
#define PANEL(name) name##_panel
#define X4_MODE AK_PANEL_MIN /* x4 sums in gemm.c's order */
#else
#define X4_MODE 0
#define KTYPE_PANEL(name, HIGH)
#define PANEL(name) NULL
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
    KTYPE_PANEL(name, HIGH)                                                                               \
    const ak_type ak_type_##name = {ID, 256, SB(HIGH), name##_to_float, name##_dot, X4(name##_dot_x4),   \
                                    {{0, 2, 2}, {2, 2, 2}, {4, 12, 4}, {16, HIGH ? 32 : 0, 16}, {16 + 32 * HIGH, 128, 16}, {0, 0, 0}}, 0, NULL, \
                                    PANEL(name), AK_PANEL_MIN, X4_MODE};

KTYPE(q4_k, AK_Q4_K, 0)
KTYPE(q5_k, AK_Q5_K, 1)
