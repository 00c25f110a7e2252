/* The engine's prompt rows: y (m, n) = x (m, k) · W (n, k)ᵀ on blocks interleaved in sixteens (AVX-512 VNNI), many
 * rows at a time.
 *
 * Every type is stored 16 rows to a group, 4 bytes of each row at a time (kernels.c, BlockType.x16_fields), so a
 * 512-bit load is 4 weights of each of 16 rows: lane L row L. Q4_K and Q5_K have no panel here: their decode kernel
 * is this product's arithmetic on the weights as they lie, the nibbles taken out of each load again for every 4
 * rows, and that ran ahead of unpacking them into memory at every row count (0.61× the time at 16 rows, 0.93× at
 * 512; docs/performance.md, session 23), so ak_gemm hands them to ak_gemv. For Q6_K (whose 6-bit quants cost more
 * to take out), Q8_0 and the 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1), a panel per 256 inputs (ak_panel: a byte per
 * weight, the scales widened; the type's `panel`) is unpacked once per call and multiplied with every activation
 * row, four rows at a time: per 4 inputs one VNNI dot product (vpdpbusd) per row against the 4 activation quants
 * broadcast. Q6_K (AK_PANEL_K16) sums each group of 16 inputs from −32·Σqx, scales it by its int8 scale in int32
 * and ends a super-block in one FMA, as q6_k.c's kernel. The others sum in int32 over a block of 32 (Q8_0's from
 * −128·Σqx: its quants as unsigned q + 128), then per block and row
 *   acc_e += Σ·(d·dx)   [then acc_e += m·sx for the 32-weight types, w = d·q + m],
 * e the block's parity (two chains: shorter dependencies), and out = acc_0 + acc_1: the order of the types' decode
 * kernels (q8.c, legacy.c), so ak_gemv may hand a batch of rows to either with the same bits.
 *
 * The integer sums are exact and each row's float operations run in the same order whatever m is, so a row's
 * result does not depend on the rows beside it (batch invariance). The activations are quantized as ak_gemv does
 * (llama.cpp's q8_0). */
#include <stdlib.h>

#include "blocks.h"

int ak_gemv(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads);
int ak_gemv_gated(int kind, const void *w, const float *x, float *h, int m, int n, int k, void *scratch, int act, int threads);
int ak_act_offsets(int kind, const void *scratch, int m, int k, int32_t *off4);

#ifdef AK_X4
enum { TR = 4 }; /* activation rows a tile */

/* R activation rows against nu units of one panel → out[r] (lane L: weight row L); the last unit holds `last`
 * blocks of 32 (8 but where k % 256). t0[r]: row r's offsets (ak_act_offsets: −128·Σqx of each block of 32 for
 * AK_PANEL_B32, −32·Σqx of each group of 16 for AK_PANEL_K16), else unused. */
/* block j of panel unit S (block b of the row) into acc[r] */
AK_INLINE void block_tile(const ak_panel *S, int j, size_t b, const ak_act *x, const int32_t *const *t0, const int R,
                          const int MODE, __m512 *acc) {
    __m512i t[TR];
    for (int r = 0; r < R; r++) t[r] = MODE == AK_PANEL_B32 ? _mm512_set1_epi32(t0[r][b]) : _mm512_setzero_si512();
    for (int s = 0; s < 8; s++) {
        const __m512i wq = _mm512_load_si512(S->q + 8 * j + s);
        for (int r = 0; r < R; r++) t[r] = ak_dp4(t[r], wq, x + r, 32 * b + 4 * s);
    }
    for (int r = 0; r < R; r++) {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[r]), _mm512_mul_ps(S->d[j], _mm512_set1_ps(x[r].d[b])), acc[r]);
        if (MODE == AK_PANEL_L32) acc[r] = _mm512_fmadd_ps(S->mn[j], _mm512_set1_ps(x[r].s[b]), acc[r]);
    }
}
AK_INLINE void rows_tile(const ak_panel *P, int nu, int last, const ak_act *x, const int32_t *const *t0, const int R,
                         const int MODE, __m512 *out) {
    if (MODE == AK_PANEL_K16) { /* Q6_K: q6_k.c's x4 arithmetic, a group of 16 inputs at a time, one FMA a unit */
        __m512 acc[TR];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        for (int u = 0; u < nu; u++) {
            const ak_panel *S = P + u;
            __m512i is[TR];
            for (int r = 0; r < R; r++) is[r] = _mm512_setzero_si512();
            for (int g = 0; g < 16; g++) {
                __m512i t[TR];
                for (int r = 0; r < R; r++) t[r] = _mm512_set1_epi32(t0[r][16 * (size_t)u + g]);
                for (int s = 0; s < 4; s++) {
                    const __m512i wq = _mm512_load_si512(S->q + 4 * g + s);
                    for (int r = 0; r < R; r++) t[r] = ak_dp4(t[r], wq, x + r, 256 * (size_t)u + 16 * g + 4 * s);
                }
                for (int r = 0; r < R; r++) is[r] = _mm512_add_epi32(is[r], _mm512_mullo_epi32(t[r], S->sc[g]));
            }
            for (int r = 0; r < R; r++)
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r]), _mm512_mul_ps(S->d[0], _mm512_set1_ps(x[r].d[8 * (size_t)u])), acc[r]);
        }
        for (int r = 0; r < R; r++) out[r] = acc[r];
        return;
    }
    __m512 even[TR], odd[TR]; /* the chains of even and odd blocks (8 a unit: a unit starts even) */
    for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
    for (int u = 0; u < nu; u++)
        for (int j = 0, nb = u == nu - 1 ? last : 8; j < nb; j += 2) {
            block_tile(P + u, j, 8 * (size_t)u + j, x, t0, R, MODE, even);
            if (j + 1 < nb) block_tile(P + u, j + 1, 8 * (size_t)u + j + 1, x, t0, R, MODE, odd);
        }
    for (int r = 0; r < R; r++) out[r] = _mm512_add_ps(even[r], odd[r]);
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
    if (mode == AK_PANEL_B32) { TILE_R(AK_PANEL_B32) }
    else if (mode == AK_PANEL_K16) { TILE_R(AK_PANEL_K16) }
    else { TILE_R(AK_PANEL_L32) }
}
#endif

/* 1 when ak_gemm multiplies kind (blocks interleaved in sixteens, in a build with the 512-bit products), else 0 */
int ak_gemm_available(int kind) {
#ifdef AK_X4
    const ak_type *t = ak_find_type(kind);
    return t && (kind & AK_X4_FLAG) && ak_group_rows(t) == 16 ? 1 : 0;
#else
    (void)kind;
    return 0;
#endif
}

/* 1 when ak_gemm multiplies kind's (n, k) weights: n % 16 == 0 and k a multiple of the type's block (256 for the
 * K-quants, 32 for the others: the last panel unit then holds fewer blocks) */
int ak_gemm_takes(int kind, int n, int k) {
    if (!ak_gemm_available(kind) || n < 16 || n % 16 || k < 32) return 0;
    return k % ak_find_type(kind)->block_elems == 0;
}

/* y (m, n) = x (m, k) · W (n, k)ᵀ for interleaved blocks W of `kind` (shapes as ak_gemm_takes); scratch as
 * ak_gemv's (m · k/32 activation blocks). Threads take panels of 16 output columns. act >= 0: W holds 2n rows, a
 * gate's n then an up's n, and y = act(x·W_gateᵀ) ⊙ x·W_upᵀ (ak_gate_act16 on each panel's 16 outputs: the gate/up
 * product never lies in memory). 0, or 1 (a kind or shape this build does not multiply), 2 (out of memory). */
static int gemm(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads, int act) {
#ifdef AK_X4
    const ak_type *t = ak_find_type(kind);
    if (!ak_gemm_takes(kind, act >= 0 ? 2 * n : n, k) || m < 1 || (act >= 0 && n % 16)) return 1;
    if (!t->panel) /* the K-quants: their decode kernel */
        return act >= 0 ? ak_gemv_gated(kind, w, x, y, m, n, k, scratch, act, threads) : ak_gemv(kind, w, x, y, m, n, k, scratch, threads);
    const int mode = t->panel_mode;
    const int nu = (k + 255) / 256, last = k % 256 ? k % 256 / 32 : 8; /* units of 256 inputs; the last one's blocks */
    int32_t *t0 = NULL; /* the rows' offsets (k/4 int32 reserved a row), for the types with a quant offset */
    if (t->offset && !(t0 = malloc(sizeof(int32_t) * (size_t)m * (k / 4)))) return 2;
    const size_t row_bytes = (size_t)(k / 32) * sizeof(block_q8x), gbytes = (size_t)16 * (k / t->block_elems) * t->block_bytes;
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1 && n >= 32)
    {
        static __thread ak_panel *P; /* this thread's panel (two: gate and up), grown and kept */
        static __thread int cap;
        if (cap < 2 * nu) {
            free(P);
            P = aligned_alloc(64, sizeof(ak_panel) * 2 * (size_t)nu);
            cap = P ? 2 * nu : 0;
        }
        if (!P) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int r = 0; r < m; r++) { /* the rows quantized as ak_gemv does, each on its own */
            ak_quantize_act(kind, x + (size_t)r * k, 1, k, (uint8_t *)scratch + r * row_bytes);
            if (t0) ak_act_offsets(kind, (uint8_t *)scratch + r * row_bytes, 1, k, t0 + (size_t)r * (k / 4));
        }
#pragma omp for schedule(static)
        for (int pn = 0; pn < n / 16; pn++) {
            if (!P) continue;
            for (int u = 0; u < nu; u++) t->panel((const uint8_t *)w + (size_t)pn * gbytes, u, u == nu - 1 ? last : 8, P + u);
            if (act >= 0) /* the up rows' panel of the same outputs */
                for (int u = 0; u < nu; u++)
                    t->panel((const uint8_t *)w + (size_t)(pn + n / 16) * gbytes, u, u == nu - 1 ? last : 8, P + nu + u);
            for (int r0 = 0; r0 < m; r0 += TR) {
                const int R = m - r0 < TR ? m - r0 : TR;
                ak_act xs[TR];
                const int32_t *t0s[TR] = {NULL};
                __m512 out[TR];
                for (int i = 0; i < R; i++) {
                    xs[i] = act_row(scratch, r0 + i, k);
                    if (t0) t0s[i] = t0 + (size_t)(r0 + i) * (k / 4);
                }
                tile(P, nu, last, xs, t0s, R, mode, out);
                if (act >= 0) {
                    __m512 up[TR];
                    tile(P + nu, nu, last, xs, t0s, R, mode, up);
                    for (int i = 0; i < R; i++) /* (ak_act_mul2's arithmetic, as the decode kernel's path gives it) */
                        _mm512_storeu_ps(y + (size_t)(r0 + i) * n + 16 * (size_t)pn, _mm512_mul_ps(ak_gate_act16(out[i], act), up[i]));
                } else
                    for (int i = 0; i < R; i++) _mm512_storeu_ps(y + (size_t)(r0 + i) * n + 16 * (size_t)pn, out[i]);
            }
        }
    }
    free(t0);
    return failed ? 2 : 0;
#else
    (void)kind, (void)w, (void)x, (void)y, (void)m, (void)n, (void)k, (void)scratch, (void)threads, (void)act;
    return 1;
#endif
}

int ak_gemm(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads) {
    return gemm(kind, w, x, y, m, n, k, scratch, threads, -1);
}

/* h (m, n) = act(x·W_gateᵀ) ⊙ x·W_upᵀ, W (2n, k) the gate's rows then the up's (act 0 SiLU, 1 GELU-tanh) */
int ak_gemm_gated(int kind, const void *w, const float *x, float *h, int m, int n, int k, void *scratch, int act, int threads) {
    return act < 0 || act > 1 ? 1 : gemm(kind, w, x, h, m, n, k, scratch, threads, act);
}
