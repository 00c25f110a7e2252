/* ggml's 32-weight block types Q4_0, Q4_1, Q5_0, Q5_1: fp16 d, [fp16 m], [32 high bits qh], 16 bytes of nibbles
 * (weight i in the low nibble of qs[i], weight i+16 in the high one; bit i of qh is bit 4 of weight i):
 *   Q4_0: w = d·(q − 8)    Q4_1: w = d·q + m    (q 4-bit)       18 / 20 bytes
 *   Q5_0: w = d·(q − 16)   Q5_1: w = d·q + m    (q 5-bit)       22 / 24 bytes
 * One block against an activation block (x = dx·qx, sx = dx·Σqx):  Σ w·x = d·dx·Σ q·qx + m·sx,
 * with m = −8d / −16d for the types without a min (llama.cpp's vec_dot_q4_1_q8_1). MIN and HIGH (the min field,
 * the high bits) are literals at every call of the always_inline bodies, so each type gets its own code. */
#include "blocks.h"

#define BB(MIN, HIGH) (18 + 2 * (MIN) + 4 * (HIGH))

AK_INLINE float blk_d(const uint8_t *b) { return ld_half(b); }
AK_INLINE float blk_m(const uint8_t *b, const int MIN, const int HIGH) {
    return MIN ? ld_half(b + 2) : -(HIGH ? 16.f : 8.f) * ld_half(b);
}
AK_INLINE uint32_t blk_qh(const uint8_t *b, const int MIN) { return ld_u32(b + 2 + 2 * MIN); }
AK_INLINE const uint8_t *blk_qs(const uint8_t *b, const int MIN, const int HIGH) { return b + 2 + 2 * MIN + 4 * HIGH; }

/* weight i of a block as its unsigned quant q */
AK_INLINE int blk_q(const uint8_t *b, int i, const int MIN, const int HIGH) {
    const uint8_t *qs = blk_qs(b, MIN, HIGH);
    int q = i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4;
    if (HIGH) q |= (int)((blk_qh(b, MIN) >> i) & 1) << 4;
    return q;
}

#ifdef AK_AVX2
/* the 32 unsigned quants of a block, in weight order */
AK_INLINE __m256i blk_u(const uint8_t *b, const int MIN, const int HIGH) {
    __m256i u = nibbles32(blk_qs(b, MIN, HIGH));
    if (HIGH) u = _mm256_or_si256(u, _mm256_and_si256(bits32(blk_qh(b, MIN)), _mm256_set1_epi8(0x10)));
    return u;
}
#endif

/* one block → 32 floats, exactly as gguf-py: d·q + m (d·q is exact, so one rounding), or d·(q − 8|16) (exact);
 * its fields given where they lie (GGUF's layout or the interleaved one) */
AK_INLINE void block_floats(float d, float m, const uint8_t *qs, uint32_t qh, float *o, const int MIN, const int HIGH) {
    const int off = HIGH ? 16 : 8;
#if defined(__AVX512F__) && defined(AK_AVX2)
    __m256i u = nibbles32(qs);
    if (HIGH) u = _mm256_or_si256(u, _mm256_and_si256(bits32(qh), _mm256_set1_epi8(0x10)));
    for (int h = 0; h < 2; h++) {
        __m512i q = _mm512_cvtepu8_epi32(h ? _mm256_extracti128_si256(u, 1) : _mm256_castsi256_si128(u));
        if (!MIN) q = _mm512_sub_epi32(q, _mm512_set1_epi32(off));
        const __m512 f = _mm512_cvtepi32_ps(q);
        _mm512_storeu_ps(o + 16 * h, MIN ? _mm512_fmadd_ps(f, _mm512_set1_ps(d), _mm512_set1_ps(m)) : _mm512_mul_ps(f, _mm512_set1_ps(d)));
    }
#else
    for (int i = 0; i < 32; i++) {
        int q = i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4;
        if (HIGH) q |= (int)((qh >> i) & 1) << 4;
        o[i] = MIN ? d * (float)q + m : d * (float)(q - off);
    }
#endif
}

AK_INLINE void to_float(const uint8_t *blocks, int count, float *o, const int MIN, const int HIGH) {
    for (int k = 0; k < count; k++, o += 32) {
        const uint8_t *b = blocks + (size_t)k * BB(MIN, HIGH);
        block_floats(blk_d(b), MIN ? blk_m(b, MIN, HIGH) : 0.f, blk_qs(b, MIN, HIGH), HIGH ? blk_qh(b, MIN) : 0, o, MIN, HIGH);
    }
}

#ifdef AK_X4
/* the interleaved layout (below): 16 rows, d[16], [m[16],] [qh[16],] qs in 4 chunks of 4 bytes of each row */
#define GROUP 16
#define OFF_M 32
#define OFF_QH(MIN) (32 + 32 * (MIN))
#define OFF_QS(MIN, HIGH) (32 + 32 * (MIN) + 64 * (HIGH))
#else /* AVX2: 4 rows, d[4], [m[4],] [qh[4],] qs[4][16] */
#define GROUP 4
#define OFF_M 8
#define OFF_QH(MIN) (8 + 8 * (MIN))
#define OFF_QS(MIN, HIGH) (8 + 8 * (MIN) + 16 * (HIGH))
#endif
/* row r of an interleaved group, block columns b0 .. b0 + count − 1 */
AK_INLINE void to_float_x4(const uint8_t *group, int r, int b0, int count, float *o, const int MIN, const int HIGH) {
    for (int k = 0; k < count; k++, o += 32) {
        const uint8_t *c = group + (size_t)(b0 + k) * GROUP * BB(MIN, HIGH), *qs = c + OFF_QS(MIN, HIGH);
        uint8_t q[16];
        for (int i = 0; i < 16; i += 4) memcpy(q + i, GROUP == 16 ? qs + 16 * i + 4 * r : qs + 16 * r + i, 4);
        block_floats(ld_half(c + 2 * r), MIN ? ld_half(c + OFF_M + 2 * r) : 0.f, q,
                     HIGH ? ld_u32(c + OFF_QH(MIN) + 4 * r) : 0, o, MIN, HIGH);
    }
}

#ifndef AK_AVX2
/* one row against one activation row */
AK_INLINE float dot1(const uint8_t *w, int nb, ak_act x, const int MIN, const int HIGH) {
    float sum = 0.f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * BB(MIN, HIGH);
        int isum = 0;
        for (int i = 0; i < 32; i++) isum += blk_q(blk, i, MIN, HIGH) * x.qs[32 * b + i];
        sum += blk_d(blk) * x.d[b] * (float)isum + blk_m(blk, MIN, HIGH) * x.s[b];
    }
    return sum;
}
#endif

#ifdef AK_AVX2
/* one row against M activation rows: each block unpacked once for all of them; even and odd blocks summed apart
 * (two FMA chains: one would bound the loop by its latency); row r's operations are the same, in the same order,
 * whatever M (batch invariance) */
AK_INLINE void dot_rows(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys, const int MIN,
                        const int HIGH) {
    __m256 acc0[4], acc1[4];
    float summ0[4], summ1[4];
    for (int r = 0; r < M; r++) acc0[r] = acc1[r] = _mm256_setzero_ps(), summ0[r] = summ1[r] = 0.f;
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *b0 = w + (size_t)b * BB(MIN, HIGH), *b1 = b0 + BB(MIN, HIGH);
        const __m256i u0 = blk_u(b0, MIN, HIGH), u1 = blk_u(b1, MIN, HIGH);
        const float d0 = blk_d(b0), m0 = blk_m(b0, MIN, HIGH), d1 = blk_d(b1), m1 = blk_m(b1, MIN, HIGH);
        for (int r = 0; r < M; r++) {
            const __m256i p0 = dot_u8s8(u0, _mm256_loadu_si256((const __m256i *)(x[r].qs + 32 * b)));
            const __m256i p1 = dot_u8s8(u1, _mm256_loadu_si256((const __m256i *)(x[r].qs + 32 * b + 32)));
            acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * x[r].d[b]), acc0[r]);
            acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * x[r].d[b + 1]), acc1[r]);
            summ0[r] += m0 * x[r].s[b];
            summ1[r] += m1 * x[r].s[b + 1];
        }
    }
    if (b < nb) { /* an odd count: the last block on the even chain */
        const uint8_t *b0 = w + (size_t)b * BB(MIN, HIGH);
        const __m256i u0 = blk_u(b0, MIN, HIGH);
        const float d0 = blk_d(b0), m0 = blk_m(b0, MIN, HIGH);
        for (int r = 0; r < M; r++) {
            const __m256i p0 = dot_u8s8(u0, _mm256_loadu_si256((const __m256i *)(x[r].qs + 32 * b)));
            acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * x[r].d[b]), acc0[r]);
            summ0[r] += m0 * x[r].s[b];
        }
    }
    for (int r = 0; r < M; r++) y[r * ys] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + (summ0[r] + summ1[r]);
}
#define AK_ROWS_M(F, w, nb, x, M, y, ys, MIN, HIGH)       \
    switch (M) {                                          \
        case 1: F(w, nb, x, 1, y, ys, MIN, HIGH); break;  \
        case 2: F(w, nb, x, 2, y, ys, MIN, HIGH); break;  \
        case 3: F(w, nb, x, 3, y, ys, MIN, HIGH); break;  \
        default: F(w, nb, x, 4, y, ys, MIN, HIGH);        \
    }
AK_INLINE void dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys, const int MIN, const int HIGH) {
    AK_ROWS_M(dot_rows, w, nb, x, M, y, ys, MIN, HIGH)
}
#else
AK_INLINE void dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys, const int MIN, const int HIGH) {
    for (int r = 0; r < M; r++) y[r * ys] = dot1(w, nb, x[r], MIN, HIGH);
}
#endif

#ifdef AK_X4
/* the slots of block column b of a group (the kernel's u[8]: slot s = weights 4s .. 4s + 3 of each row, unsigned) */
AK_INLINE void slots(const uint8_t *col, __m512i u[8], const int MIN, const int HIGH) {
    const __m512i low = _mm512_set1_epi8(0x0f), sixteen = _mm512_set1_epi8(0x10);
    for (int c = 0; c < 4; c++) {
        const __m512i v = _mm512_loadu_si512(col + OFF_QS(MIN, HIGH) + 64 * c);
        u[c] = _mm512_and_si512(v, low), u[4 + c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    if (HIGH) { /* slot s's byte i gets bit 4s + i of its row's qh: byte s/2 of the lane, bit 4·(s & 1) + i */
        const __m512i qh = _mm512_loadu_si512(col + OFF_QH(MIN));
        const __m512i lane = _mm512_set4_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0); /* its 32-bit lane's byte 0 */
        for (int s = 0; s < 8; s++) {
            const __m512i lanes = _mm512_add_epi8(lane, _mm512_set1_epi8((char)(s >> 1)));
            const __m512i bits = _mm512_set1_epi32((int)(0x08040201u << (4 * (s & 1))));
            u[s] = _mm512_mask_add_epi8(u[s], _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, lanes), bits), u[s], sixteen);
        }
    }
}
/* Sixteen rows interleaved, 4 bytes of each at a time (as q4_k.c's): a block column holds d[16], [m[16],] [qh[16]
 * (32-bit lane L: row L's high bits),] and qs in 4 chunks of 4 bytes of each row: chunk c's low nibbles are weights
 * 4c .. 4c + 3 of each row (lane L), its high nibbles weights 16 + 4c ..; Q5's bit 4 spread from byte c/2 of qh's
 * lane. Per chunk and activation row two vpdpbusd (low and high) against its 4 quants broadcast, summed in int32
 * over the block, then acc_e += Σ·(d·dx) and acc_e += m·sx, e the block's parity (two chains), summed at the end:
 * gemm.c's AK_PANEL_L32 order, so from GEMM_ROWS rows ak_gemv hands the rows to its panels (panel, below) with the
 * same bits. */
/* block column b into acc[r] (the chain of b's parity; literal in the caller, so the accumulators stay registers) */
AK_INLINE void x16_block(const uint8_t *w, size_t b, const ak_act *x, const int M, __m512 *acc, const int MIN, const int HIGH) {
    const size_t cb = 16 * BB(MIN, HIGH);
    const uint8_t *col = w + b * cb;
    AK_PREFETCH_SHARE(col, cb, 8, 0, 1, (int)(cb + 63) / 64); /* the column 8 ahead */
    AK_SIDE_PREFETCH(x);
    __m512i u[8]; /* slot s: weights 4s .. 4s + 3 of each row */
    slots(col, u, MIN, HIGH);
    const __m512 D = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)col));
    const __m512 MN = MIN ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(col + OFF_M))) : _mm512_mul_ps(D, _mm512_set1_ps(HIGH ? -16.f : -8.f));
    for (int r = 0; r < M; r++) {
        __m512i t0 = _mm512_setzero_si512(), t1 = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            t0 = ak_dp4(t0, u[c], x + r, 32 * b + 4 * c);
            t1 = ak_dp4(t1, u[4 + c], x + r, 32 * b + 16 + 4 * c);
        }
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)), _mm512_mul_ps(D, _mm512_set1_ps(x[r].d[b])), acc[r]);
        acc[r] = _mm512_fmadd_ps(MN, _mm512_set1_ps(x[r].s[b]), acc[r]);
    }
}
AK_INLINE void dot_x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys, const int MIN,
                      const int HIGH) {
    __m512 even[4], odd[4];
    for (int r = 0; r < M; r++) even[r] = odd[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b += 2) {
        x16_block(w, (size_t)b, x, M, even, MIN, HIGH);
        if (b + 1 < nb) x16_block(w, (size_t)b + 1, x, M, odd, MIN, HIGH);
    }
    for (int r = 0; r < M; r++) _mm512_storeu_ps(y + r * ys, _mm512_add_ps(even[r], odd[r]));
}
#endif

#if defined(AK_AVX2) && !defined(AK_X4)
/* Four rows interleaved, 256-bit: a register holds the nibbles of one block of two rows (rows 0-1, then 2-3:
 * 128-bit lane 0 row 2p, lane 1 row 2p + 1), against the activation block's 16 + 16 quants broadcast to both
 * lanes. Per block column and activation row: 4 maddubs for 128 weights, the 16-bit sums of the low and high
 * nibbles added (at most 2·31·127·2 < 2^15), and one float FMA for the four rows (hadd leaves lanes
 * [r0 r0 r2 r2 | r1 r1 r3 r3]). The row-layout product spends an FMA on every 32 weights. */
AK_INLINE void dot_x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys, const int MIN,
                      const int HIGH) {
    const size_t cb = 4 * BB(MIN, HIGH);
    const __m256i low = _mm256_set1_epi8(0x0f), sixteen = _mm256_set1_epi8(0x10), ones = _mm256_set1_epi16(1);
    const __m256i spread = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
    __m256 acc[4];
    __m128 accm[4];
    for (int r = 0; r < M; r++) acc[r] = _mm256_setzero_ps(), accm[r] = _mm_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *col = w + (size_t)b * cb, *qs = col + 8 + 8 * MIN + 16 * HIGH;
        const __m256i q01 = _mm256_loadu_si256((const __m256i *)qs), q23 = _mm256_loadu_si256((const __m256i *)(qs + 32));
        __m256i lo01 = _mm256_and_si256(q01, low), hi01 = _mm256_and_si256(_mm256_srli_epi16(q01, 4), low);
        __m256i lo23 = _mm256_and_si256(q23, low), hi23 = _mm256_and_si256(_mm256_srli_epi16(q23, 4), low);
        if (HIGH) { /* bits 0-15 of row r's qh belong to its low nibbles, bits 16-31 to its high ones */
            const uint8_t *qh = col + 8 + 8 * MIN;
            const uint32_t h0 = ld_u32(qh), h1 = ld_u32(qh + 4), h2 = ld_u32(qh + 8), h3 = ld_u32(qh + 12);
            lo01 = _mm256_or_si256(lo01, _mm256_and_si256(bits32((h0 & 0xffffu) | (h1 << 16)), sixteen));
            hi01 = _mm256_or_si256(hi01, _mm256_and_si256(bits32((h0 >> 16) | (h1 & 0xffff0000u)), sixteen));
            lo23 = _mm256_or_si256(lo23, _mm256_and_si256(bits32((h2 & 0xffffu) | (h3 << 16)), sixteen));
            hi23 = _mm256_or_si256(hi23, _mm256_and_si256(bits32((h2 >> 16) | (h3 & 0xffff0000u)), sixteen));
        }
        const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)col));
        const __m256 d8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d4), spread);
        const __m128 m4 = MIN ? _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(col + 8)))
                              : _mm_mul_ps(d4, _mm_set1_ps(HIGH ? -16.f : -8.f));
        for (int r = 0; r < M; r++) {
            const int8_t *xq = x[r].qs + 32 * (size_t)b;
            const __m256i x0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xq));
            const __m256i x1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + 16)));
            const __m256i s01 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo01, x0), _mm256_maddubs_epi16(hi01, x1)), ones);
            const __m256i s23 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo23, x0), _mm256_maddubs_epi16(hi23, x1)), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(s01, s23)), _mm256_mul_ps(d8, _mm256_set1_ps(x[r].d[b])), acc[r]);
            accm[r] = _mm_fmadd_ps(m4, _mm_set1_ps(x[r].s[b]), accm[r]);
        }
    }
    for (int r = 0; r < M; r++) _mm_storeu_ps(y + r * ys, _mm_add_ps(x4_sums(acc[r]), accm[r]));
}
#endif

#ifdef AK_X4
/* unit u (block columns 8u .. 8u + nb − 1) of a group of 16 rows → a panel (gemm.c): the slots as the decode kernel
 * takes them out, each block's d and its m (Q4_1, Q5_1) or −8d / −16d */
AK_INLINE void panel(const uint8_t *w, int u, int nb, ak_panel *P, const int MIN, const int HIGH) {
    for (int j = 0; j < nb; j++) {
        const uint8_t *col = w + ((size_t)8 * u + j) * 16 * BB(MIN, HIGH);
        P->d[j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)col));
        P->mn[j] = MIN ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(col + OFF_M))) : _mm512_mul_ps(P->d[j], _mm512_set1_ps(HIGH ? -16.f : -8.f));
        slots(col, P->q + 8 * j, MIN, HIGH);
    }
}
#define LEGACY_PANEL(name, MIN, HIGH) \
    static void name##_panel(const uint8_t *w, int u, int nb, ak_panel *P) { panel(w, u, nb, P, MIN, HIGH); }
#define PANEL(name) name##_panel
#define X4_ROWS 16
#define QS_GRANULE 4
#else
#define LEGACY_PANEL(name, MIN, HIGH)
#define PANEL(name) NULL
#define X4_ROWS 4
#define QS_GRANULE 16
#endif

#define FIELDS(MIN, HIGH) {{0, 2, 2}, {2, MIN ? 2 : 0, 2}, {2 + 2 * MIN, HIGH ? 4 : 0, 4}, {2 + 2 * MIN + 4 * HIGH, 16, QS_GRANULE}, {0, 0, 0}}
#if defined(AK_X4) || defined(AK_AVX2)
#define X4(name) name
#else
#define X4(name) NULL
#endif
/* the four types' functions and table rows */
#define LEGACY_TYPE(name, ID, MIN, HIGH)                                                                        \
    static void name##_to_float(const uint8_t *b, int count, float *o) { to_float(b, count, o, MIN, HIGH); } \
    static void name##_to_float_x4(const uint8_t *g, int r, int b0, int count, float *o) {                 \
        to_float_x4(g, r, b0, count, o, MIN, HIGH);                                                          \
    }                                                                                                        \
    static void name##_dot(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {         \
        dot(w, nb, x, M, y, ys, MIN, HIGH);                                                                  \
    }                                                                                                        \
    LEGACY_X4(name, MIN, HIGH)                                                                               \
    LEGACY_PANEL(name, MIN, HIGH)                                                                            \
    const ak_type ak_type_##name = {ID, 32, BB(MIN, HIGH), name##_to_float, name##_dot, X4(name##_dot_x4),  \
                                    FIELDS(MIN, HIGH), 0, name##_to_float_x4, PANEL(name), AK_PANEL_L32, X4_ROWS, MIN};
#if defined(AK_X4) || defined(AK_AVX2)
#define LEGACY_X4(name, MIN, HIGH)                                                                                \
    AK_INLINE void name##_x4(const uint8_t *w, int nb, const ak_act *x, const int M, float *y, size_t ys) {      \
        dot_x4(w, nb, x, M, y, ys, MIN, HIGH);                                                                 \
    }                                                                                                          \
    static void name##_dot_x4(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ys) {           \
        AK_DISPATCH_M(name##_x4, w, nb, x, M, y, ys)                                                           \
    }
#else
#define LEGACY_X4(name, MIN, HIGH)
#endif

LEGACY_TYPE(q4_0, AK_Q4_0, 0, 0)
LEGACY_TYPE(q4_1, AK_Q4_1, 1, 0)
LEGACY_TYPE(q5_0, AK_Q5_0, 0, 1)
LEGACY_TYPE(q5_1, AK_Q5_1, 1, 1)
