/* A prompt's causal attention (the engine's prompt rows): out = softmax(q·kᵀ·scale + causal mask)·v with grouped-query
 * heads, in AVX-512 registers, each row getting the bits the decode attention (attention.c) gives it as a decode
 * query at its position.
 *
 * q (nh, n, hd), k and v (nkv, ctx, hd), out (nh, n, hd), all float32 and contiguous; query i sits at cache
 * position c0 + i (c0 = ctx − n: the keys before it are a cached prefix) and sees keys j <= c0 + i. The g = nh/nkv
 * query heads of a KV head share its keys. The keys are transposed once per call into tiles of 16 (a register
 * holds one input dimension of 16 keys), so 16 scores take hd multiply-adds and 15 additions where the decode
 * kernel spends hd/16 and a horizontal sum on each; a task (one KV head, up to 16 query positions) then softmaxes
 * each row as the decode kernel does and multiplies 4 (hd 64) or 2 (hd 128) rows with v at a time, the
 * accumulators in registers across the keys, so each V row is read once for them.
 *
 * A row's numbers depend only on its query, the keys it sees and their values — not on n, the other rows, the
 * threads or how a prompt was cut into chunks — and equal the decode attention's: the engine's batch invariance
 * (prompt rows as decode rows would compute them) holds. 1.5–2.4× the decode kernel run row by row, 2–2.6×
 * SDPA's flash kernel, at 300–512 tokens on two Zen 4 cores (docs/performance.md, session 18). */
#include <stdlib.h>

#include "blocks.h"

#ifdef __AVX512F__
enum { QB_MAX = 16 }; /* query positions a task */

/* one query row against key tiles 0..nt-1 of kt (hd × 16 floats a tile) → s[16t ..]: the decode attention's bits
 * (attention.c's attend_task512). There lane l of a register sums dims l, 16 + l, … in one multiply-add chain and
 * the 16 lanes are then added by hsum16; here register A[l] holds that chain for 16 keys at once, and the 16
 * registers are added in hsum16's tree. */
AK_INLINE void score_row(const float *q, const float *kt, int nt, const int HD, float scale, float *s) {
    const __m512 sc = _mm512_set1_ps(scale);
    for (int t = 0; t < nt; t++) {
        const float *tile = kt + (size_t)t * HD * 16;
        __m512 A[16];
        for (int l = 0; l < 16; l++) A[l] = _mm512_mul_ps(_mm512_set1_ps(q[l]), _mm512_load_ps(tile + 16 * l));
        for (int i = 1; i < HD / 16; i++)
            for (int l = 0; l < 16; l++)
                A[l] = _mm512_fmadd_ps(_mm512_set1_ps(q[16 * i + l]), _mm512_load_ps(tile + 16 * (16 * i + l)), A[l]);
        for (int l = 0; l < 8; l++) A[l] = _mm512_add_ps(A[l + 8], A[l]);
        for (int l = 0; l < 4; l++) A[l] = _mm512_add_ps(A[l + 4], A[l]);
        for (int l = 0; l < 2; l++) A[l] = _mm512_add_ps(A[l], A[l + 2]);
        _mm512_storeu_ps(s + 16 * (size_t)t, _mm512_mul_ps(_mm512_add_ps(A[0], A[1]), sc));
    }
}

/* s[0 .. lim) ← softmax, as attend_task512 takes it (max, exp16 of the difference, lanes summed by hsum16, each
 * weight times the reciprocal), and zeros on to `pad` (a multiple of 16) */
static inline void softmax_row(float *s, int64_t lim, int64_t pad) {
    __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < lim; t += 16) {
        const __mmask16 m = lim - t >= 16 ? 0xffff : (__mmask16)((1u << (lim - t)) - 1);
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, m, s + t));
    }
    const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    for (int64_t t = 0; t < lim; t += 16) {
        const __mmask16 m = lim - t >= 16 ? 0xffff : (__mmask16)((1u << (lim - t)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), vmx));
        _mm512_mask_storeu_ps(s + t, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const __m512 inv = _mm512_set1_ps(1.f / hsum16(sum));
    for (int64_t t = 0; t < pad; t += 16) {
        const __mmask16 m = lim - t >= 16 ? 0xffff : lim > t ? (__mmask16)((1u << (lim - t)) - 1) : 0;
        _mm512_storeu_ps(s + t, _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, s + t), inv));
    }
}

/* RB rows' outputs o_r = Σ_{j < nk} p_r[j] · v_j (p_r = p + r·ls), in key order from zero as attend_task512 sums
 * them; a row's weights past its own keys are 0 and leave its sums as they are */
AK_INLINE void weigh(const float *p, size_t ls, const float *v, int64_t nk, const int HD, const int RB, float *const *o) {
    __m512 acc[4][8]; /* fixed sizes (not RB, HD): a variable-length array would stay in memory */
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < HD / 16; i++) acc[r][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; j++) {
        __m512 vj[8];
        for (int i = 0; i < HD / 16; i++) vj[i] = _mm512_loadu_ps(v + (size_t)j * HD + 16 * i);
        for (int r = 0; r < RB; r++) {
            const __m512 pr = _mm512_set1_ps(p[r * ls + j]);
            for (int i = 0; i < HD / 16; i++) acc[r][i] = _mm512_fmadd_ps(pr, vj[i], acc[r][i]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < HD / 16; i++) _mm512_storeu_ps(o[r] + 16 * i, acc[r][i]);
}

/* one task: KV head h, query positions i0 .. i0 + nq − 1 (rows ordered position-major: r = ii·g + gi) */
AK_INLINE void task(const float *q, const float *kt, const float *v, float *out, int h, int g, int n, int ctx, int i0,
                    int nq, const int HD, float scale, float *s, size_t ls) {
    const int c0 = ctx - n, rows = nq * g;
    for (int rr = 0; rr < rows; rr++) {
        const int ii = rr / g, gi = rr % g;
        const int64_t lim = (int64_t)c0 + i0 + ii + 1; /* the keys row rr sees */
        const int nt = (int)((lim + 15) / 16);
        score_row(q + ((size_t)(h * g + gi) * n + i0 + ii) * HD, kt, nt, HD, scale, s + (size_t)rr * ls);
        softmax_row(s + (size_t)rr * ls, lim, 16 * (int64_t)((c0 + i0 + nq + 15) / 16));
    }
    const int RB = HD == 64 ? 4 : 2;
    const float *vh = v + (size_t)h * ctx * HD;
    for (int r0 = 0; r0 < rows; r0 += RB) {
        const int nr = rows - r0 < RB ? rows - r0 : RB;
        float *o[4];
        for (int r = 0; r < nr; r++) {
            const int rr = r0 + r, ii = rr / g, gi = rr % g;
            o[r] = out + ((size_t)(h * g + gi) * n + i0 + ii) * HD;
        }
        const int64_t nk = (int64_t)c0 + i0 + (r0 + nr - 1) / g + 1; /* the block's last row sees the most keys */
        const float *p = s + (size_t)r0 * ls;
        if (nr == RB && HD == 64) weigh(p, ls, vh, nk, HD, 4, o);
        else if (nr == RB) weigh(p, ls, vh, nk, HD, 2, o);
        else if (nr == 3) weigh(p, ls, vh, nk, HD, 3, o);
        else if (nr == 2) weigh(p, ls, vh, nk, HD, 2, o);
        else weigh(p, ls, vh, nk, HD, 1, o);
    }
}
#endif

/* 1 when this build's ak_prefill_attention takes nh query heads over nkv KV heads of head dim hd, else 0 */
int ak_prefill_attention_takes(int nh, int nkv, int hd) {
#ifdef __AVX512F__
    return (hd == 64 || hd == 128) && nkv >= 1 && nh % nkv == 0 && nh / nkv <= 8;
#else
    (void)nh, (void)nkv, (void)hd;
    return 0;
#endif
}

/* 0, or 1 (a shape or build this kernel does not take: head dim other than 64 or 128, no AVX-512, n > ctx, nh not a
 * multiple of nkv), 2 (out of memory) */
int ak_prefill_attention(const float *q, const float *k, const float *v, float *out, int nh, int nkv, int n, int ctx,
                         int hd, float scale, int threads) {
#ifdef __AVX512F__
    if (!ak_prefill_attention_takes(nh, nkv, hd) || n < 1 || n > ctx) return 1;
    const int g = nh / nkv, nt = (ctx + 15) / 16;
    int qb = (int)((1 << 20) / ((size_t)g * nt * 16)); /* a task's scores within 4 MB */
    qb = qb < 1 ? 1 : qb > QB_MAX ? QB_MAX : qb;
    const size_t ls = (size_t)16 * nt, srows = (size_t)qb * g;
    float *kt = aligned_alloc(64, sizeof(float) * (size_t)nkv * nt * hd * 16);
    if (!kt) return 2;
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static) collapse(2)
        for (int h = 0; h < nkv; h++)
            for (int t = 0; t < nt; t++) { /* keys 16t .. 16t + 15 of head h → tile (hd × 16), zeros past ctx */
                float *tile = kt + ((size_t)h * nt + t) * hd * 16;
                for (int j = 0; j < 16; j++) {
                    const int key = 16 * t + j;
                    const float *kr = k + ((size_t)h * ctx + key) * hd;
                    for (int d = 0; d < hd; d++) tile[16 * d + j] = key < ctx ? kr[d] : 0.f;
                }
            }
        float *s = malloc(sizeof(float) * srows * ls);
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
        const int nb = (n + qb - 1) / qb;
        /* the last query blocks see the most keys: dealt first, one at a time */
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int b = nb - 1; b >= 0; b--)
            for (int h = 0; h < nkv; h++) {
                if (!s) continue;
                const int i0 = b * qb, nq = n - i0 < qb ? n - i0 : qb;
                const float *kth = kt + (size_t)h * nt * hd * 16;
                if (hd == 64) task(q, kth, v, out, h, g, n, ctx, i0, nq, 64, scale, s, ls);
                else task(q, kth, v, out, h, g, n, ctx, i0, nq, 128, scale, s, ls);
            }
        free(s);
    }
    free(kt);
    return failed ? 2 : 0;
#else
    (void)q, (void)k, (void)v, (void)out, (void)nh, (void)nkv, (void)n, (void)ctx, (void)hd, (void)scale, (void)threads;
    return 1;
#endif
}
