/* The engine's prompt rows: y (m, n) = x (m, k) · W (n, k)ᵀ on interleaved GGUF blocks, many rows at a time.
 *
 * Prompt products are compute-bound, and the decode kernels (one 512-bit register = 16 weights of each of 4 rows,
 * a float FMA per 32 weights) spend most of their instructions on scales there. Here 16 weight rows (four
 * interleaved groups) are first unpacked into a panel per 256 inputs (ak_panel, by the type's row of the table; the
 * 32-weight types' last panel may hold fewer blocks, so their rows may have any multiple of 32 inputs):
 * a byte per weight, laid out so that one register holds 4 consecutive weights of each of the 16 rows. A panel
 * is unpacked once per call and then multiplied with every activation row, four rows at a time: per 4 inputs,
 * one VNNI dot product (vpdpbusd) per activation row against the 4 activation quants broadcast, summed in int32
 * over a sub-block (32 inputs; 16 for Q6_K), which is scaled by its integer scale (one vpmulld) and added in
 * int32 over the super-block, so a super-block ends in one conversion and one FMA per row (the mins of
 * Q4_K / Q5_K in float: Σ w·x = d·dx·Σ_j sc_j·Σ q·qx − Σ_j dmin·m_j·sx_j). Q8_0 applies each block's d in float.
 * Offsets (Q6_K's q − 32, Q8_0's unsigned q + 128) start the sums at −offset·Σqx; the 32-weight types (Q4_0, Q4_1,
 * Q5_0, Q5_1) add each block's m·sx in float as their decode kernels do.
 *
 * The integer sums are exact and each row's float operations run in the same order whatever m is, so a row's
 * result does not depend on the rows beside it (batch invariance). The activations are quantized as ak_gemv does
 * (llama.cpp's q8_K / q8_0). 1.2–1.6× decoding the weights + oneDNN's bf16 product at 512 rows of a 1B's layers
 * on AVX-512 VNNI + BF16 (Zen 4, 2 threads; benchmarks/gguf_kernels.py, docs/performance.md session 16).
 * Q4_K, Q5_K, Q6_K and Q8_0 on AVX-512 VNNI are stored as panels already (16 rows interleaved 4 bytes at a time,
 * q4_k.c): the K-quants' product is their decode kernel, this tile with the quants taken out of each load
 * (ak_gemv); Q8_0's panel is its chunks with the sign bit flipped (q8.c). */
#include <stdlib.h>

#include "blocks.h"

#ifdef AK_X4
enum { TR = 4 }; /* activation rows a tile */
#ifndef X4R
#define X4R 4
#endif

static inline __m512i x4q(const ak_act *a, size_t i) { int32_t v; memcpy(&v, a->qs + i, 4); return _mm512_set1_epi32(v); }
/* t + Σ w·(the 4 quants at a->qs + i, broadcast): vpdpbusd with the broadcast as its memory operand ({1to16}), where
 * compilers emit a separate vpbroadcastd for x4q */
static inline __m512i dp4(__m512i t, __m512i w, const ak_act *a, size_t i) {
#if defined(__GNUC__) && !defined(AK_NO_ASM)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(t) : "v"(w), "m"(*(const int32_t *)(a->qs + i)));
    return t;
#else
    return _mm512_dpbusd_epi32(t, w, x4q(a, i));
#endif
}

/* R activation rows against nu units of one panel → out[r]: 16 sums, lane 4r' + g for row r' of group g; the last
 * unit holds `last` blocks of 32 (8 but where k % 256: AK_PANEL_B32 and AK_PANEL_L32) */
AK_INLINE void rows_tile(const ak_panel *P, int nu, int last, const ak_act *x, const int32_t *const *t0, const int R,
                         const int MODE, __m512 *out) {
    __m512 acc[TR];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int u = 0; u < nu; u++) {
        const ak_panel *S = P + u;
        const size_t base = 256 * (size_t)u;
        if (MODE == AK_PANEL_B32 || MODE == AK_PANEL_L32) {
            for (int j = 0, nb = u == nu - 1 ? last : 8; j < nb; j++) {
                __m512i t[TR];
                for (int r = 0; r < R; r++) t[r] = MODE == AK_PANEL_B32 ? _mm512_set1_epi32(t0[r][8 * (size_t)u + j]) : _mm512_setzero_si512();
                for (int s = 0; s < 8; s++) {
                    const __m512i wq = _mm512_load_si512(S->q + 8 * j + s);
                    for (int r = 0; r < R; r++) t[r] = dp4(t[r], wq, x + r, base + 32 * j + 4 * s);
                }
                for (int r = 0; r < R; r++) {
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[r]), _mm512_mul_ps(S->d[j], _mm512_set1_ps(x[r].d[8 * (size_t)u + j])), acc[r]);
                    if (MODE == AK_PANEL_L32) acc[r] = _mm512_fmadd_ps(S->mn[j], _mm512_set1_ps(x[r].s[8 * (size_t)u + j]), acc[r]);
                }
            }
            continue;
        }
        const int G = MODE == AK_PANEL_K16 ? 16 : 8, SL = 64 / G; /* sub-blocks, slots a sub-block */
        __m512i is[TR];
        for (int r = 0; r < R; r++) is[r] = _mm512_setzero_si512();
        for (int c = 0; c < G; c++) {
            __m512i t[TR];
            for (int r = 0; r < R; r++) t[r] = MODE == AK_PANEL_K16 ? _mm512_set1_epi32(t0[r][16 * (size_t)u + c]) : _mm512_setzero_si512();
            for (int s = 0; s < SL; s++) {
                const __m512i wq = _mm512_load_si512(S->q + SL * c + s);
                for (int r = 0; r < R; r++) t[r] = dp4(t[r], wq, x + r, base + 4 * (SL * c + s));
            }
            for (int r = 0; r < R; r++) is[r] = _mm512_add_epi32(is[r], _mm512_mullo_epi32(t[r], S->sc[c]));
        }
        for (int r = 0; r < R; r++) {
            const __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r]), _mm512_mul_ps(S->d[0], _mm512_set1_ps(x[r].d[8 * (size_t)u])), acc[r]);
            if (MODE == AK_PANEL_MIN) { /* the mins' sum apart, then subtracted: a short chain through acc */
                const float *sx = x[r].s + 8 * (size_t)u;
                __m512 mn = _mm512_mul_ps(S->mn[0], _mm512_set1_ps(sx[0]));
                for (int j = 1; j < 8; j++) mn = _mm512_fmadd_ps(S->mn[j], _mm512_set1_ps(sx[j]), mn);
                acc[r] = _mm512_sub_ps(a, mn);
            } else
                acc[r] = a;
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

/* the decode kernels' own order (rows interleaved in fours): per activation row and weight row, four partial sums
 * by lane (inputs 4i..4i+3 and 16+4i..16+4i+3 of each block), each scaled by d·dx in its own FMA chain, summed at
 * the end as (A0 + A1) + (A2 + A3): so a generated row gets the bits it would get from dot_x4 (batch invariance).
 * AK_X4_B32 (q8.c's x4): a chain for the even and one for the odd blocks (A_i = even_i + odd_i), the sums starting
 * at a row's −128 · Σ of the 8 quants of each lane of each block (x4's two off4 words, added). AK_X4_L32 (legacy.c's
 * dot_x4): one chain a lane, and each block's m·sx in a fifth chain added last. */
AK_INLINE void rows_tile_x4(const ak_panel *P, int nu, const ak_act *x, const int32_t *const *off4, const int R,
                            const int MODE, __m512 *out) {
    __m512 acc[X4R][2][4], accm[X4R]; /* [row][parity][i] */
    for (int r = 0; r < R; r++) {
        accm[r] = _mm512_setzero_ps();
        for (int e = 0; e < 2; e++)
            for (int i = 0; i < 4; i++) acc[r][e][i] = _mm512_setzero_ps();
    }
    for (int u = 0; u < nu; u++) {
        const ak_panel *S = P + u;
        for (int j = 0; j < 8; j++) {
            const size_t b = 8 * (size_t)u + j;
            const int e = MODE == AK_X4_B32 ? j & 1 : 0;
            for (int r = 0; r < R; r++) {
                const __m512 v = _mm512_mul_ps(S->d[j], _mm512_set1_ps(x[r].d[b]));
                for (int i = 0; i < 4; i++) {
                    __m512i t = MODE == AK_X4_B32 ? _mm512_set1_epi32(off4[r][4 * b + i]) : _mm512_setzero_si512();
                    t = dp4(t, _mm512_load_si512(S->q + 8 * j + i), x + r, 32 * b + 4 * i);
                    t = dp4(t, _mm512_load_si512(S->q + 8 * j + 4 + i), x + r, 32 * b + 16 + 4 * i);
                    acc[r][e][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), v, acc[r][e][i]);
                }
                if (MODE == AK_X4_L32) accm[r] = _mm512_fmadd_ps(S->mn[j], _mm512_set1_ps(x[r].s[b]), accm[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 a[4];
        for (int i = 0; i < 4; i++) a[i] = MODE == AK_X4_B32 ? _mm512_add_ps(acc[r][0][i], acc[r][1][i]) : acc[r][0][i];
        out[r] = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        if (MODE == AK_X4_L32) out[r] = _mm512_add_ps(out[r], accm[r]);
    }
}

#define TILE_R(MODE)                                                        \
    switch (R) {                                                            \
        case 1: rows_tile(P, nu, last, x, t0, 1, MODE, out); break;         \
        case 2: rows_tile(P, nu, last, x, t0, 2, MODE, out); break;         \
        case 3: rows_tile(P, nu, last, x, t0, 3, MODE, out); break;         \
        default: rows_tile(P, nu, last, x, t0, TR, MODE, out);              \
    }
static void tile(const ak_panel *P, int nu, int last, const ak_act *x, const int32_t *const *t0, int R, int mode,
                 __m512 *out) {
#define TILE_X4(MODE)                                                                   \
    for (int r = 0; r < R; r += X4R) /* X4R rows: 32 accumulators, a few spilled, still ~10% faster than 2 */ \
        switch (R - r < X4R ? R - r : X4R) {                                                \
            case 1: rows_tile_x4(P, nu, x + r, t0 + r, 1, MODE, out + r); break;             \
            case 2: rows_tile_x4(P, nu, x + r, t0 + r, 2, MODE, out + r); break;             \
            case 3: rows_tile_x4(P, nu, x + r, t0 + r, 3, MODE, out + r); break;             \
            default: rows_tile_x4(P, nu, x + r, t0 + r, X4R, MODE, out + r);                 \
        }
    if (mode == AK_X4_B32) {
        TILE_X4(AK_X4_B32)
    } else if (mode == AK_X4_L32) {
        TILE_X4(AK_X4_L32)
    } else if (mode == AK_PANEL_MIN) { TILE_R(AK_PANEL_MIN) }
    else if (mode == AK_PANEL_L32) { TILE_R(AK_PANEL_L32) }
    else if (mode == AK_PANEL_K16) { TILE_R(AK_PANEL_K16) }
    else { TILE_R(AK_PANEL_B32) }
}
#endif

/* 1 when ak_gemm multiplies kind (interleaved blocks of a type with a panel, in a build with the 512-bit
 * products), else 0 */
int ak_gemm_available(int kind) {
    const ak_type *t = ak_find_type(kind);
    return t && (kind & AK_X4_FLAG) && (t->panel || ak_group_rows(t) == 16) ? 1 : 0;
}

/* 1 when ak_gemm multiplies kind's (n, k) weights: n % 16 == 0 and k % 256 == 0, or k % 32 == 0 for the 32-weight
 * types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the last panel unit holds fewer blocks) */
int ak_gemm_takes(int kind, int n, int k) {
    if (!ak_gemm_available(kind) || n < 16 || n % 16 || k < 32) return 0;
    const int mode = ak_find_type(kind)->panel_mode;
    return k % 256 == 0 || (k % 32 == 0 && (mode == AK_PANEL_B32 || mode == AK_PANEL_L32));
}

int ak_gemv(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads);

static int gemm(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads,
                int x4_order) {
#ifdef AK_X4
    const ak_type *t = ak_find_type(kind);
    if (!ak_gemm_takes(kind, n, k) || m < 1 || (x4_order && k % 256)) return 1;
    if (ak_group_rows(t) == 16 && !t->panel) /* the decode kernel is this tile on the weights as they lie */
        return ak_gemv(kind, w, x, y, m, n, k, scratch, threads);
    const int mode = x4_order ? t->x4_mode : t->panel_mode;
    if (!mode) return 1;
    const int nu = (k + 255) / 256, last = k % 256 ? k % 256 / 32 : 8; /* units of 256 inputs; the last one's blocks */
    const int per = mode == AK_PANEL_K16 ? 16 : mode == AK_PANEL_B32 ? 8 : mode == AK_X4_B32 ? 32 : 0;
    const int len = per ? 256 / per : 0, off = mode == AK_PANEL_K16 ? 32 : 128;
    int32_t *t0 = NULL; /* −offset · Σqx of each sub-block (Q6_K: of 16, offset 32) or block (Q8_0: of 32, 128) */
    if (per && !(t0 = malloc(sizeof(int32_t) * (size_t)m * nu * per))) return 2;
    const size_t row_bytes = (size_t)(k / 32) * sizeof(block_q8x);
    const size_t gbytes = (size_t)4 * (k / t->block_elems) * t->block_bytes;
    const __m512i unperm = ak_group_rows(t) == 16 ? _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
                                                  : transpose4x4(); /* 4g + r ← 4r + g; a group of 16: lane L is row L */
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1 && n >= 32)
    {
        static __thread ak_panel *P; /* this thread's panel, grown and kept */
        static __thread int cap;
        if (cap < nu) {
            free(P);
            P = aligned_alloc(64, sizeof(ak_panel) * (size_t)nu);
            cap = P ? nu : 0;
        }
        if (!P) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int r = 0; r < m; r++) { /* the rows quantized as ak_gemv does, each on its own */
            ak_quantize_act(kind, x + (size_t)r * k, 1, k, (uint8_t *)scratch + r * row_bytes);
            const int8_t *q = act_row(scratch, r, k).qs;
            for (int i = 0; i < nu * per && len * i < k; i++) { /* a short last unit: its missing blocks unread */
                int sum = 0;
                if (mode == AK_X4_B32) /* lane i % 4 of block i / 4: inputs 4i'..4i'+3 and 16+4i'.. of the block */
                    for (int l = 0; l < 4; l++) sum += q[32 * (i / 4) + 4 * (i % 4) + l] + q[32 * (i / 4) + 16 + 4 * (i % 4) + l];
                else
                    for (int l = 0; l < len; l++) sum += q[len * i + l];
                t0[(size_t)r * nu * per + i] = -off * sum;
            }
        }
#pragma omp for schedule(static)
        for (int pn = 0; pn < n / 16; pn++) {
            if (!P) continue;
            for (int u = 0; u < nu; u++)
                t->panel((const uint8_t *)w + (size_t)pn * 4 * gbytes, gbytes, u, u == nu - 1 ? last : 8, P + u);
            for (int r0 = 0; r0 < m; r0 += TR) {
                const int R = m - r0 < TR ? m - r0 : TR;
                ak_act xs[TR];
                const int32_t *t0s[TR] = {NULL};
                __m512 out[TR];
                for (int i = 0; i < R; i++) {
                    xs[i] = act_row(scratch, r0 + i, k);
                    if (t0) t0s[i] = t0 + (size_t)(r0 + i) * nu * per;
                }
                tile(P, nu, last, xs, t0s, R, mode, out);
                for (int i = 0; i < R; i++) _mm512_storeu_ps(y + (size_t)(r0 + i) * n + 16 * (size_t)pn, _mm512_permutexvar_ps(unperm, out[i]));
            }
        }
    }
    free(t0);
    return failed ? 2 : 0;
#else
    (void)kind, (void)w, (void)x, (void)y, (void)m, (void)n, (void)k, (void)scratch, (void)threads, (void)x4_order;
    return 1;
#endif
}

/* y (m, n) = x (m, k) · W (n, k)ᵀ for interleaved blocks W of `kind` (shapes as ak_gemm_takes); scratch as
 * ak_gemv's (m · k/32 activation blocks). Threads take panels of 16 output columns. 0, or 1 (a kind or shape
 * this build does not multiply), 2 (out of memory). */
int ak_gemm(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads) {
    return gemm(kind, w, x, y, m, n, k, scratch, threads, 0);
}

/* ak_gemm in the order of the type's decode kernel (dot_x4), so each row gets ak_gemv's bits: for batches of
 * generated rows (ak_gemv hands them over from GEMM_ROWS rows); 1 where the type has no such order */
int ak_gemm_x4(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads) {
    return gemm(kind, w, x, y, m, n, k, scratch, threads, 1);
}
