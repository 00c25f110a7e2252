/* Attention for training on the CPU, forward and backward, in float32 tiles (attnkit/nn/bmm_attention.py):
 *
 *   S = Q·Kᵀ + M     P = softmax(S)     O = P·V           (Q already multiplied by the softmax scale)
 *   dV = Pᵀ·dO   dP = dO·Vᵀ   dS = P ⊙ (dP − δ), δ = rowsum(dO ⊙ O)   dQ = dS·K·scale   dK = dSᵀ·Q
 *
 * FlashAttention's two passes (Dao et al. 2022, Algorithms 1 and 4; the backward as FlashAttention-2 orders it):
 * the forward keeps a running max and sum per query row and stores only O and the rows' log-sum-exp L; the
 * backward recomputes P = exp(S − L) tile by tile. A tile of BQ query rows × BK keys whose mask entries are all −∞
 * (a causal mask's upper triangle, another document of a packed row) is skipped, in both passes. Tiles stay in L1;
 * no (T × T) matrix is ever written to memory.
 *
 * Layouts: q (B, nh, T, D), k and v (B, nkv, Tk, D), out and dq like q, dk and dv like k, all float32 contiguous;
 * the mask additive float (T, Tk) per batch row, mask_bstride floats apart (0: one mask for the batch), or NULL;
 * lse (B, nh, T). GQA: query head h reads KV head h / (nh / nkv). The forward's tasks are (b, h, query tile), the
 * backward's (b, KV head) — each owns its rows of dk and dv — so no two threads write one float and the sums run in
 * one order whatever the thread count. 512-bit only (return 1 elsewhere: the caller keeps PyTorch's products). */
#include <omp.h>
#include <stdlib.h>

#include "blocks.h"

#define BQ 32 /* query rows a tile */
#define BK 64 /* keys a tile: four 512-bit vectors */
#define MAX_D 256

#ifdef __AVX512F__
static inline __mmask16 tail(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* C[r][0..nj) = Σ_d A[r·lda + d] · BT[d·ldb + j], r < NR, nj <= BK (BT: a transposed operand, keys contiguous);
 * NR a constant where inlined, so that the 4 × 4 accumulators stay in registers */
AK_INLINE void prod_nt_rows(const float *A, int lda, const float *BT, int ldb, int D, const int NR, int nj, float *C, int ldc) {
    __m512 acc[4][4];
    const __mmask16 t[4] = {tail(nj), tail(nj - 16), tail(nj - 32), tail(nj - 48)};
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m512 b[4];
        for (int c = 0; c < 4; c++) b[c] = _mm512_maskz_loadu_ps(t[c], BT + (size_t)d * ldb + 16 * c);
        for (int r = 0; r < NR; r++) {
            const __m512 a = _mm512_set1_ps(A[(size_t)r * lda + d]);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < 4; c++) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16 * c, t[c], acc[r][c]);
}

static void prod_nt(const float *A, int lda, const float *BT, int ldb, int D, int nr, int nj, float *C, int ldc) {
    switch (nr) {
        case 1: prod_nt_rows(A, lda, BT, ldb, D, 1, nj, C, ldc); break;
        case 2: prod_nt_rows(A, lda, BT, ldb, D, 2, nj, C, ldc); break;
        case 3: prod_nt_rows(A, lda, BT, ldb, D, 3, nj, C, ldc); break;
        default: prod_nt_rows(A, lda, BT, ldb, D, 4, nj, C, ldc);
    }
}

/* C[r][d0 .. d0 + 16·NC) += Σ_t P[r·prs + t·pcs] · B[t·ldb + d0 ..], r < NR, t < nt (NR, NC constants) */
AK_INLINE void prod_acc_part(const float *P, int prs, int pcs, int nt, const float *B, int ldb, const int NR, const int NC,
                             float *C, int ldc) {
    __m512 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < NC; c++) acc[r][c] = _mm512_loadu_ps(C + (size_t)r * ldc + 16 * c);
    for (int t = 0; t < nt; t++) {
        __m512 b[4];
        for (int c = 0; c < NC; c++) b[c] = _mm512_loadu_ps(B + (size_t)t * ldb + 16 * c);
        for (int r = 0; r < NR; r++) {
            const __m512 p = _mm512_set1_ps(P[(size_t)r * prs + (size_t)t * pcs]);
            for (int c = 0; c < NC; c++) acc[r][c] = _mm512_fmadd_ps(p, b[c], acc[r][c]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(C + (size_t)r * ldc + 16 * c, acc[r][c]);
}

#define PROD_ACC_NC(NR)                                                                                   \
    switch (nc) {                                                                                         \
        case 1: prod_acc_part(P, prs, pcs, nt, B + d0, ldb, NR, 1, C + d0, ldc); break;                   \
        case 2: prod_acc_part(P, prs, pcs, nt, B + d0, ldb, NR, 2, C + d0, ldc); break;                   \
        case 3: prod_acc_part(P, prs, pcs, nt, B + d0, ldb, NR, 3, C + d0, ldc); break;                   \
        default: prod_acc_part(P, prs, pcs, nt, B + d0, ldb, NR, 4, C + d0, ldc);                         \
    }

/* C[r][0..D) += Σ_t P[r·prs + t·pcs] · B[t·ldb + 0..D), r < nr <= 4, t < nt; D a multiple of 16 */
static void prod_acc(const float *P, int prs, int pcs, int nt, const float *B, int ldb, int D, int nr, float *C, int ldc) {
    for (int d0 = 0; d0 < D; d0 += 64) {
        const int nc = (D - d0 >= 64 ? 64 : D - d0) / 16;
        switch (nr) {
            case 1: PROD_ACC_NC(1) break;
            case 2: PROD_ACC_NC(2) break;
            case 3: PROD_ACC_NC(3) break;
            default: PROD_ACC_NC(4)
        }
    }
}

/* whether any mask entry of rows [i0, i0 + nq) × keys [j0, j0 + nk) is above −∞ (no mask: yes) */
static int tile_live(const float *m, int Tk, int i0, int nq, int j0, int nk) {
    if (!m) return 1;
    for (int i = i0; i < i0 + nq; i++)
        for (int c = 0; c < nk; c += 16)
            if (_mm512_mask_cmp_ps_mask(tail(nk - c), _mm512_maskz_loadu_ps(tail(nk - c), m + (size_t)i * Tk + j0 + c),
                                        _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ))
                return 1;
    return 0;
}

/* a transposed head's row stride: T_k padded by a cache line, so that a tile's D rows do not share a few L1 sets */
static inline int ld_t(int Tk) { return Tk + 16; }

/* S[r][j] = Q·Kᵀ + M for the tile's nq rows and nk keys (KT: this KV head's keys transposed, (D, ld_t(Tk))) */
static void scores(const float *Q, const float *KT, const float *m, int D, int Tk, int i0, int nq, int j0, int nk, float *S) {
    for (int r = 0; r < nq; r += 4)
        prod_nt(Q + (size_t)(i0 + r) * D, D, KT + j0, ld_t(Tk), D, nq - r < 4 ? nq - r : 4, nk, S + r * BK, BK);
    if (m)
        for (int r = 0; r < nq; r++)
            for (int c = 0; c < nk; c += 16) {
                const __mmask16 t = tail(nk - c);
                const __m512 s = _mm512_maskz_loadu_ps(t, S + r * BK + c);
                _mm512_mask_storeu_ps(S + r * BK + c, t, _mm512_add_ps(s, _mm512_maskz_loadu_ps(t, m + (size_t)(i0 + r) * Tk + j0 + c)));
            }
}

/* exp(s − mx) where s > −∞, else 0 */
static inline __m512 exp_or_zero(__m512 s, __m512 mx) {
    const __mmask16 live = _mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    return _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, mx)));
}

/* One tile's step of the forward's running softmax (Milakov & Gimelshein 2018): for each of the nq rows of scores S
 * (nk keys), raise the row's max mx and sum l, rescale its output O (D floats) by exp(old max − new max), and leave
 * P = exp(S − max) in S (0 where a row has no key yet) */
static void online_softmax(float *S, int nq, int nk, float *mx, float *l, float *O, int D) {
    for (int r = 0; r < nq; r++) {
        float *s = S + r * BK, tmax = -INFINITY;
        for (int c = 0; c < nk; c += 16) tmax = fmaxf(tmax, _mm512_mask_reduce_max_ps(tail(nk - c), _mm512_loadu_ps(s + c)));
        const float m_new = fmaxf(mx[r], tmax);
        if (m_new == -INFINITY) {
            for (int c = 0; c < nk; c++) s[c] = 0.f;
            continue;
        }
        const float corr = mx[r] == -INFINITY ? 0.f : expf(mx[r] - m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < nk; c += 16) {
            const __mmask16 t = tail(nk - c);
            const __m512 e = _mm512_maskz_mov_ps(t, exp_or_zero(_mm512_maskz_loadu_ps(t, s + c), _mm512_set1_ps(m_new)));
            _mm512_mask_storeu_ps(s + c, t, e);
            sum = _mm512_add_ps(sum, e);
        }
        l[r] = l[r] * corr + _mm512_reduce_add_ps(sum);
        mx[r] = m_new;
        if (corr != 1.f)
            for (int d = 0; d < D; d += 16)
                _mm512_storeu_ps(O + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(O + r * D + d), _mm512_set1_ps(corr)));
    }
}

/* the forward's end for a tile of rows: out = O / l and L = max + log l (0 and −∞ for a row with no key) */
static void finish_rows(const float *O, const float *mx, const float *l, int nq, int D, float *out, float *L) {
    for (int r = 0; r < nq; r++) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(out + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(O + r * D + d), _mm512_set1_ps(inv)));
        L[r] = l[r] > 0.f ? mx[r] + logf(l[r]) : -INFINITY;
    }
}

/* the backward's P = exp(S − L) for a tile, in place (0 for a row with no key, L = −∞) */
static void probs_from_lse(float *P, const float *L, int nq, int nk) {
    for (int r = 0; r < nq; r++)
        for (int c = 0; c < nk; c += 16) {
            const __mmask16 t = tail(nk - c);
            const __m512 p = L[r] == -INFINITY ? _mm512_setzero_ps()
                                               : exp_or_zero(_mm512_maskz_loadu_ps(t, P + r * BK + c), _mm512_set1_ps(L[r]));
            _mm512_mask_storeu_ps(P + r * BK + c, t, p);
        }
}

/* KT[u·D·ld + d·ld + t] = K[u, t, d] for each of the BH heads, ld = ld_t(Tk) */
static void transpose_heads(const float *k, float *kt, int BH, int Tk, int D, int threads) {
    const int ld = ld_t(Tk);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int u = 0; u < BH; u++)
        for (int t = 0; t < Tk; t++)
            for (int d = 0; d < D; d++) kt[(size_t)u * D * ld + (size_t)d * ld + t] = k[(size_t)u * Tk * D + (size_t)t * D + d];
}
#endif

/* whether this build has the float32 kernels (``bf16`` 0) or the bf16 ones (1) */
int ak_attn_train_available(int bf16) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    (void)bf16;
    return 1;
#elif defined(__AVX512F__)
    return !bf16;
#else
    (void)bf16;
    return 0;
#endif
}

/* 0, or 1 where this build has no such kernel (not 512-bit) or D is not a multiple of 16 up to MAX_D, or 2 where
 * memory for the transposed keys could not be had */
int ak_attn_train_forward(const float *q, const float *k, const float *v, const float *mask, int64_t mask_bstride,
                          float *out, float *lse, int B, int nh, int nkv, int T, int Tk, int D, int threads) {
#ifdef __AVX512F__
    if (D % 16 || D > MAX_D || nh % nkv) return 1;
    float *kt = malloc(sizeof(float) * (size_t)B * nkv * D * ld_t(Tk));
    if (!kt) return 2;
    transpose_heads(k, kt, B * nkv, Tk, D, threads);
    const int rep = nh / nkv, nqt = (T + BQ - 1) / BQ;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t u = 0; u < (int64_t)B * nh * nqt; u++) {
        const int b = (int)(u / ((int64_t)nh * nqt)), h = (int)(u / nqt % nh), i0 = (int)(u % nqt) * BQ;
        const int nq = T - i0 < BQ ? T - i0 : BQ, g = h / rep;
        const float *Q = q + ((size_t)b * nh + h) * T * D, *KT = kt + ((size_t)b * nkv + g) * D * ld_t(Tk);
        const float *V = v + ((size_t)b * nkv + g) * Tk * D, *m = mask ? mask + (size_t)b * mask_bstride : NULL;
        float S[BQ * BK], O[BQ * MAX_D], mx[BQ], l[BQ];
        for (int r = 0; r < nq; r++) mx[r] = -INFINITY, l[r] = 0.f;
        memset(O, 0, sizeof(float) * nq * D);
        for (int j0 = 0; j0 < Tk; j0 += BK) {
            const int nk = Tk - j0 < BK ? Tk - j0 : BK;
            if (!tile_live(m, Tk, i0, nq, j0, nk)) continue;
            scores(Q, KT, m, D, Tk, i0, nq, j0, nk, S);
            online_softmax(S, nq, nk, mx, l, O, D);
            for (int r = 0; r < nq; r += 4)
                prod_acc(S + r * BK, BK, 1, nk, V + (size_t)j0 * D, D, D, nq - r < 4 ? nq - r : 4, O + r * D, D);
        }
        float *o = out + (((size_t)b * nh + h) * T + i0) * D, *L = lse + ((size_t)b * nh + h) * T + i0;
        finish_rows(O, mx, l, nq, D, o, L);
    }
    free(kt);
    return 0;
#else
    (void)q, (void)k, (void)v, (void)mask, (void)mask_bstride, (void)out, (void)lse, (void)B, (void)nh, (void)nkv;
    (void)T, (void)Tk, (void)D, (void)threads;
    return 1;
#endif
}

/* dq, dk, dv from d_out and the forward's out and lse (dk, dv overwritten); ``scale`` the softmax scale that q
 * carries (dq = dS·K·scale). Returns as the forward. */
int ak_attn_train_backward(const float *q, const float *k, const float *v, const float *mask, int64_t mask_bstride,
                           const float *out, const float *lse, const float *dout, float *dq, float *dk, float *dv,
                           int B, int nh, int nkv, int T, int Tk, int D, float scale, int threads) {
#ifdef __AVX512F__
    if (D % 16 || D > MAX_D || nh % nkv) return 1;
    float *kt = malloc(sizeof(float) * (size_t)B * nkv * D * ld_t(Tk) * 2);
    if (!kt) return 2;
    float *vt = kt + (size_t)B * nkv * D * ld_t(Tk);
    transpose_heads(k, kt, B * nkv, Tk, D, threads);
    transpose_heads(v, vt, B * nkv, Tk, D, threads);
    const int rep = nh / nkv;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int u = 0; u < B * nkv; u++) {
        const int b = u / nkv, g = u % nkv;
        const float *K = k + (size_t)u * Tk * D, *KT = kt + (size_t)u * D * ld_t(Tk), *VT = vt + (size_t)u * D * ld_t(Tk);
        const float *m = mask ? mask + (size_t)b * mask_bstride : NULL;
        float *dK = dk + (size_t)u * Tk * D, *dV = dv + (size_t)u * Tk * D;
        memset(dK, 0, sizeof(float) * Tk * D);
        memset(dV, 0, sizeof(float) * Tk * D);
        float P[BQ * BK], dS[BQ * BK], dQ[BQ * MAX_D], delta[BQ];
        for (int h = g * rep; h < (g + 1) * rep; h++) {
            const size_t head = (size_t)b * nh + h;
            const float *Q = q + head * T * D, *O = out + head * T * D, *dO = dout + head * T * D, *L = lse + head * T;
            for (int i0 = 0; i0 < T; i0 += BQ) {
                const int nq = T - i0 < BQ ? T - i0 : BQ;
                for (int r = 0; r < nq; r++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int d = 0; d < D; d += 16)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(dO + (size_t)(i0 + r) * D + d), _mm512_loadu_ps(O + (size_t)(i0 + r) * D + d), acc);
                    delta[r] = _mm512_reduce_add_ps(acc);
                }
                memset(dQ, 0, sizeof(float) * nq * D);
                for (int j0 = 0; j0 < Tk; j0 += BK) {
                    const int nk = Tk - j0 < BK ? Tk - j0 : BK;
                    if (!tile_live(m, Tk, i0, nq, j0, nk)) continue;
                    scores(Q, KT, m, D, Tk, i0, nq, j0, nk, P);
                    probs_from_lse(P, L + i0, nq, nk); /* the forward's probabilities */
                    for (int c = 0; c < nk; c += 4) /* dV += Pᵀ·dO */
                        prod_acc(P + c, 1, BK, nq, dO + (size_t)i0 * D, D, D, nk - c < 4 ? nk - c : 4, dV + (size_t)(j0 + c) * D, D);
                    for (int r = 0; r < nq; r += 4) /* dP = dO·Vᵀ */
                        prod_nt(dO + (size_t)(i0 + r) * D, D, VT + j0, ld_t(Tk), D, nq - r < 4 ? nq - r : 4, nk, dS + r * BK, BK);
                    for (int r = 0; r < nq; r++) /* dS = P ⊙ (dP − δ) */
                        for (int c = 0; c < nk; c += 16) {
                            const __mmask16 t = tail(nk - c);
                            const __m512 ds = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, P + r * BK + c),
                                                            _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dS + r * BK + c), _mm512_set1_ps(delta[r])));
                            _mm512_mask_storeu_ps(dS + r * BK + c, t, ds);
                        }
                    for (int r = 0; r < nq; r += 4) /* dQ += dS·K */
                        prod_acc(dS + r * BK, BK, 1, nk, K + (size_t)j0 * D, D, D, nq - r < 4 ? nq - r : 4, dQ + r * D, D);
                    for (int c = 0; c < nk; c += 4) /* dK += dSᵀ·Q */
                        prod_acc(dS + c, 1, BK, nq, Q + (size_t)i0 * D, D, D, nk - c < 4 ? nk - c : 4, dK + (size_t)(j0 + c) * D, D);
                }
                float *dq_rows = dq + (head * T + i0) * D;
                for (int r = 0; r < nq; r++)
                    for (int d = 0; d < D; d += 16)
                        _mm512_storeu_ps(dq_rows + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(dQ + r * D + d), _mm512_set1_ps(scale)));
            }
        }
    }
    free(kt);
    return 0;
#else
    (void)q, (void)k, (void)v, (void)mask, (void)mask_bstride, (void)out, (void)lse, (void)dout, (void)dq, (void)dk;
    (void)dv, (void)B, (void)nh, (void)nkv, (void)T, (void)Tk, (void)D, (void)scale, (void)threads;
    return 1;
#endif
}

/* ---- the same passes on bfloat16 inputs (training under autocast): every product by vdpbf16ps, which multiplies
 * pairs of bf16 and adds them into float32 lanes, twice the rate of float32 FMAs per instruction. Each product reads
 * its right-hand operand in pairs along the summed index, laid out once per call: the keys (and values) transposed
 * as 32-bit words (pairs of dims, summed in S = Q·Kᵀ and dP = dO·Vᵀ), and row pairs interleaved (pairs of keys or
 * query rows, summed in P·V, dS·K, Pᵀ·dO and dSᵀ·Q); P and dS round to bf16 as they enter a product, as they do
 * in PyTorch's bf16 products. The softmax scale applies to S in float32 (dS carries it into dQ and dK). */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
typedef uint32_t pair16; /* two bf16: the lower half the first */

/* C[r][0..nj) = Σ_p A[r·lda + p] ⊙ BT[p·ldb + j] (pairs of bf16 each), r < NR, nj <= BK */
AK_INLINE void bnt_rows(const pair16 *A, int lda, const pair16 *BT, int ldb, int np, const int NR, int nj, float *C, int ldc) {
    __m512 acc[4][4];
    const __mmask16 t[4] = {tail(nj), tail(nj - 16), tail(nj - 32), tail(nj - 48)};
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < np; p++) {
        __m512i b[4];
        for (int c = 0; c < 4; c++) b[c] = _mm512_maskz_loadu_epi32(t[c], BT + (size_t)p * ldb + 16 * c);
        for (int r = 0; r < NR; r++) {
            const __m512i a = _mm512_set1_epi32((int)A[(size_t)r * lda + p]);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)a, (__m512bh)b[c]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < 4; c++) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16 * c, t[c], acc[r][c]);
}

static void bnt(const pair16 *A, int lda, const pair16 *BT, int ldb, int np, int nr, int nj, float *C, int ldc) {
    switch (nr) {
        case 1: bnt_rows(A, lda, BT, ldb, np, 1, nj, C, ldc); break;
        case 2: bnt_rows(A, lda, BT, ldb, np, 2, nj, C, ldc); break;
        case 3: bnt_rows(A, lda, BT, ldb, np, 3, nj, C, ldc); break;
        default: bnt_rows(A, lda, BT, ldb, np, 4, nj, C, ldc);
    }
}

/* C[r][d0 .. d0 + 16·NC) += Σ_t P[r·prs + t·pcs] ⊙ B2[t·ldb + d0 ..] (pairs), r < NR, t < nt (NR, NC constants) */
AK_INLINE void bacc_part(const pair16 *P, int prs, int pcs, int nt, const pair16 *B2, int ldb, const int NR, const int NC,
                         float *C, int ldc) {
    __m512 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < NC; c++) acc[r][c] = _mm512_loadu_ps(C + (size_t)r * ldc + 16 * c);
    for (int t = 0; t < nt; t++) {
        __m512i b[4];
        for (int c = 0; c < NC; c++) b[c] = _mm512_loadu_si512(B2 + (size_t)t * ldb + 16 * c);
        for (int r = 0; r < NR; r++) {
            const __m512i p = _mm512_set1_epi32((int)P[(size_t)r * prs + (size_t)t * pcs]);
            for (int c = 0; c < NC; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)p, (__m512bh)b[c]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(C + (size_t)r * ldc + 16 * c, acc[r][c]);
}

#define BACC_NC(NR)                                                                                       \
    switch (nc) {                                                                                         \
        case 1: bacc_part(P, prs, pcs, nt, B2 + d0, ldb, NR, 1, C + d0, ldc); break;                      \
        case 2: bacc_part(P, prs, pcs, nt, B2 + d0, ldb, NR, 2, C + d0, ldc); break;                      \
        case 3: bacc_part(P, prs, pcs, nt, B2 + d0, ldb, NR, 3, C + d0, ldc); break;                      \
        default: bacc_part(P, prs, pcs, nt, B2 + d0, ldb, NR, 4, C + d0, ldc);                            \
    }

/* C[r][0..D) += Σ_t P[r·prs + t·pcs] ⊙ B2[t·ldb + 0..D), r < nr <= 4, t < nt pairs; D a multiple of 16 */
static void bacc(const pair16 *P, int prs, int pcs, int nt, const pair16 *B2, int ldb, int D, int nr, float *C, int ldc) {
    for (int d0 = 0; d0 < D; d0 += 64) {
        const int nc = (D - d0 >= 64 ? 64 : D - d0) / 16;
        switch (nr) {
            case 1: BACC_NC(1) break;
            case 2: BACC_NC(2) break;
            case 3: BACC_NC(3) break;
            default: BACC_NC(4)
        }
    }
}

/* out[u][p][t] = in[u][t][p]: each of U heads' (T, np) words transposed to (np, ld_t(T)) */
static void transpose_words(const pair16 *in, pair16 *out, int U, int T, int np, int threads) {
    const int ld = ld_t(T);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int u = 0; u < U; u++)
        for (int t = 0; t < T; t++)
            for (int p = 0; p < np; p++) out[(size_t)u * np * ld + (size_t)p * ld + t] = in[(size_t)u * T * np + (size_t)t * np + p];
}

static inline __m512i widen16(const uint16_t *p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)); }

/* out[u][tp][d] = (in[u][2tp][d], in[u][2tp + 1][d]): each of U heads' (T, D) bf16 rows interleaved by pairs into
 * ((T + 1) / 2, D) pairs (an odd T's last row paired with zeros) */
static void pair_rows(const uint16_t *in, pair16 *out, int U, int T, int D, int threads) {
    const int TP = (T + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int u = 0; u < U; u++)
        for (int tp = 0; tp < TP; tp++) {
            const uint16_t *r0 = in + ((size_t)u * T + 2 * tp) * D, *r1 = r0 + D;
            pair16 *o = out + ((size_t)u * TP + tp) * D;
            for (int d = 0; d < D; d += 16) {
                const __m512i hi = 2 * tp + 1 < T ? _mm512_slli_epi32(widen16(r1 + d), 16) : _mm512_setzero_si512();
                _mm512_storeu_si512(o + d, _mm512_or_si512(widen16(r0 + d), hi));
            }
        }
}

static inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

/* a (nq, BK) float tile as bf16: row-major pairs of keys (rows) and pairs of query rows interleaved (inter: word
 * (ip, j) at ip·BK + j; an odd nq's last pair with zeros); columns past nk zero */
static void tile_bf16(const float *X, int nq, int nk, uint16_t *rows, pair16 *inter) {
    for (int r = 0; r < nq; r++)
        for (int c = 0; c < BK; c += 16)
            _mm256_storeu_si256((__m256i *)(rows + r * BK + c), to_bf16(_mm512_maskz_loadu_ps(tail(nk - c), X + r * BK + c)));
    if (!inter) return;
    for (int ip = 0; ip < (nq + 1) / 2; ip++)
        for (int c = 0; c < BK; c += 16) {
            const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(rows + 2 * ip * BK + c)));
            const __m512i hi = 2 * ip + 1 < nq ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(rows + (2 * ip + 1) * BK + c))), 16)
                                               : _mm512_setzero_si512();
            _mm512_storeu_si512(inter + ip * BK + c, _mm512_or_si512(lo, hi));
        }
}

/* S = scale·Q·Kᵀ + M for the tile (KT: this KV head's key pairs transposed, (D/2, ld_t(Tk)) words) */
static void scores_bf16(const pair16 *Q, const pair16 *KT, const float *m, float scale, int D, int Tk, int i0, int nq,
                        int j0, int nk, float *S) {
    for (int r = 0; r < nq; r += 4)
        bnt(Q + (size_t)(i0 + r) * (D / 2), D / 2, KT + j0, ld_t(Tk), D / 2, nq - r < 4 ? nq - r : 4, nk, S + r * BK, BK);
    for (int r = 0; r < nq; r++)
        for (int c = 0; c < nk; c += 16) {
            const __mmask16 t = tail(nk - c);
            __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, S + r * BK + c), _mm512_set1_ps(scale));
            if (m) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(t, m + (size_t)(i0 + r) * Tk + j0 + c));
            _mm512_mask_storeu_ps(S + r * BK + c, t, s);
        }
}
#endif

/* As ak_attn_train_forward on bf16 q, k, v (not scaled: ``scale`` applies to the scores); out and lse float32.
 * Returns 1 where this build has no AVX512-BF16. */
int ak_attn_train_forward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *mask,
                               int64_t mask_bstride, float *out, float *lse, int B, int nh, int nkv, int T, int Tk, int D,
                               float scale, int threads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (D % 16 || D > MAX_D || nh % nkv) return 1;
    const int np = D / 2, TkP = (Tk + 1) / 2;
    pair16 *kt = malloc(sizeof(pair16) * ((size_t)B * nkv * np * ld_t(Tk) + (size_t)B * nkv * TkP * D));
    if (!kt) return 2;
    pair16 *v2 = kt + (size_t)B * nkv * np * ld_t(Tk);
    transpose_words((const pair16 *)k, kt, B * nkv, Tk, np, threads);
    pair_rows(v, v2, B * nkv, Tk, D, threads);
    const int rep = nh / nkv, nqt = (T + BQ - 1) / BQ;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t u = 0; u < (int64_t)B * nh * nqt; u++) {
        const int b = (int)(u / ((int64_t)nh * nqt)), h = (int)(u / nqt % nh), i0 = (int)(u % nqt) * BQ;
        const int nq = T - i0 < BQ ? T - i0 : BQ, g = h / rep;
        const pair16 *Q = (const pair16 *)(q + ((size_t)b * nh + h) * T * D), *KT = kt + ((size_t)b * nkv + g) * np * ld_t(Tk);
        const pair16 *V2 = v2 + ((size_t)b * nkv + g) * TkP * D;
        const float *m = mask ? mask + (size_t)b * mask_bstride : NULL;
        float S[BQ * BK], O[BQ * MAX_D], mx[BQ], l[BQ];
        uint16_t Pb[BQ * BK];
        for (int r = 0; r < nq; r++) mx[r] = -INFINITY, l[r] = 0.f;
        memset(O, 0, sizeof(float) * nq * D);
        for (int j0 = 0; j0 < Tk; j0 += BK) {
            const int nk = Tk - j0 < BK ? Tk - j0 : BK;
            if (!tile_live(m, Tk, i0, nq, j0, nk)) continue;
            scores_bf16(Q, KT, m, scale, D, Tk, i0, nq, j0, nk, S);
            online_softmax(S, nq, nk, mx, l, O, D);
            tile_bf16(S, nq, nk, Pb, NULL);
            for (int r = 0; r < nq; r += 4)
                bacc((const pair16 *)Pb + r * (BK / 2), BK / 2, 1, (nk + 1) / 2, V2 + (size_t)(j0 / 2) * D, D, D,
                     nq - r < 4 ? nq - r : 4, O + r * D, D);
        }
        float *o = out + (((size_t)b * nh + h) * T + i0) * D, *L = lse + ((size_t)b * nh + h) * T + i0;
        finish_rows(O, mx, l, nq, D, o, L);
    }
    free(kt);
    return 0;
#else
    (void)q, (void)k, (void)v, (void)mask, (void)mask_bstride, (void)out, (void)lse, (void)B, (void)nh, (void)nkv;
    (void)T, (void)Tk, (void)D, (void)scale, (void)threads;
    return 1;
#endif
}

/* As ak_attn_train_backward on bf16 q, k, v, d_out and out (q not scaled), lse float32 from the forward; dq, dk, dv
 * float32. */
int ak_attn_train_backward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *mask,
                                int64_t mask_bstride, const uint16_t *out, const float *lse, const uint16_t *dout, float *dq,
                                float *dk, float *dv, int B, int nh, int nkv, int T, int Tk, int D, float scale, int threads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (D % 16 || D > MAX_D || nh % nkv) return 1;
    const int np = D / 2, TkP = (Tk + 1) / 2, TP = (T + 1) / 2;
    const size_t kv_t = (size_t)B * nkv * np * ld_t(Tk), kv_p = (size_t)B * nkv * TkP * D, q_p = (size_t)B * nh * TP * D;
    pair16 *kt = malloc(sizeof(pair16) * (2 * kv_t + 2 * kv_p + 2 * q_p));
    if (!kt) return 2;
    pair16 *vt = kt + kv_t, *k2 = vt + kv_t, *v2 = k2 + kv_p, *q2 = v2 + kv_p, *do2 = q2 + q_p;
    transpose_words((const pair16 *)k, kt, B * nkv, Tk, np, threads);
    transpose_words((const pair16 *)v, vt, B * nkv, Tk, np, threads);
    pair_rows(k, k2, B * nkv, Tk, D, threads);
    pair_rows(v, v2, B * nkv, Tk, D, threads);
    pair_rows(q, q2, B * nh, T, D, threads);
    pair_rows(dout, do2, B * nh, T, D, threads);
    const int rep = nh / nkv;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int u = 0; u < B * nkv; u++) {
        const int b = u / nkv, g = u % nkv;
        const pair16 *KT = kt + (size_t)u * np * ld_t(Tk), *VT = vt + (size_t)u * np * ld_t(Tk);
        const pair16 *K2 = k2 + (size_t)u * TkP * D;
        const float *m = mask ? mask + (size_t)b * mask_bstride : NULL;
        float *dK = dk + (size_t)u * Tk * D, *dV = dv + (size_t)u * Tk * D;
        memset(dK, 0, sizeof(float) * Tk * D);
        memset(dV, 0, sizeof(float) * Tk * D);
        float P[BQ * BK], dS[BQ * BK], dQ[BQ * MAX_D], delta[BQ];
        uint16_t Pb[BQ * BK], dSb[BQ * BK];
        pair16 PI[BQ / 2 * BK], dSI[BQ / 2 * BK];
        for (int h = g * rep; h < (g + 1) * rep; h++) {
            const size_t head = (size_t)b * nh + h;
            const pair16 *Q = (const pair16 *)(q + head * T * D), *dO = (const pair16 *)(dout + head * T * D);
            const pair16 *Q2 = q2 + head * TP * D, *dO2 = do2 + head * TP * D;
            const float *L = lse + head * T;
            for (int i0 = 0; i0 < T; i0 += BQ) {
                const int nq = T - i0 < BQ ? T - i0 : BQ;
                for (int r = 0; r < nq; r++) {
                    __m512 acc = _mm512_setzero_ps();
                    const uint16_t *dor = dout + (head * T + i0 + r) * D, *orow = out + (head * T + i0 + r) * D;
                    for (int d = 0; d < D; d += 16)
                        acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(widen16(dor + d), 16)),
                                              _mm512_castsi512_ps(_mm512_slli_epi32(widen16(orow + d), 16)), acc);
                    delta[r] = _mm512_reduce_add_ps(acc);
                }
                memset(dQ, 0, sizeof(float) * nq * D);
                for (int j0 = 0; j0 < Tk; j0 += BK) {
                    const int nk = Tk - j0 < BK ? Tk - j0 : BK;
                    if (!tile_live(m, Tk, i0, nq, j0, nk)) continue;
                    scores_bf16(Q, KT, m, scale, D, Tk, i0, nq, j0, nk, P);
                    probs_from_lse(P, L + i0, nq, nk);
                    tile_bf16(P, nq, nk, Pb, PI);
                    for (int c = 0; c < nk; c += 4) /* dV += Pᵀ·dO */
                        bacc(PI + c, 1, BK, (nq + 1) / 2, dO2 + (size_t)(i0 / 2) * D, D, D, nk - c < 4 ? nk - c : 4,
                             dV + (size_t)(j0 + c) * D, D);
                    for (int r = 0; r < nq; r += 4) /* dP = dO·Vᵀ */
                        bnt(dO + (size_t)(i0 + r) * np, np, VT + j0, ld_t(Tk), np, nq - r < 4 ? nq - r : 4, nk, dS + r * BK, BK);
                    for (int r = 0; r < nq; r++) /* dS·scale = P ⊙ (dP − δ)·scale */
                        for (int c = 0; c < nk; c += 16) {
                            const __mmask16 t = tail(nk - c);
                            const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, P + r * BK + c), _mm512_set1_ps(scale)),
                                                            _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dS + r * BK + c), _mm512_set1_ps(delta[r])));
                            _mm512_mask_storeu_ps(dS + r * BK + c, t, ds);
                        }
                    tile_bf16(dS, nq, nk, dSb, dSI);
                    for (int r = 0; r < nq; r += 4) /* dQ += dS·K */
                        bacc((const pair16 *)dSb + r * (BK / 2), BK / 2, 1, (nk + 1) / 2, K2 + (size_t)(j0 / 2) * D, D, D,
                             nq - r < 4 ? nq - r : 4, dQ + r * D, D);
                    for (int c = 0; c < nk; c += 4) /* dK += dSᵀ·Q */
                        bacc(dSI + c, 1, BK, (nq + 1) / 2, Q2 + (size_t)(i0 / 2) * D, D, D, nk - c < 4 ? nk - c : 4,
                             dK + (size_t)(j0 + c) * D, D);
                }
                memcpy(dq + (head * T + i0) * D, dQ, sizeof(float) * nq * D);
            }
        }
    }
    free(kt);
    return 0;
#else
    (void)q, (void)k, (void)v, (void)mask, (void)mask_bstride, (void)out, (void)lse, (void)dout, (void)dq, (void)dk;
    (void)dv, (void)B, (void)nh, (void)nkv, (void)T, (void)Tk, (void)D, (void)scale, (void)threads;
    return 1;
#endif
}
