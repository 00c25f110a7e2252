/* A whole decode step of a Llama-family model with GGUF weights in one call (attnkit/engine/native_decode.py).
 *
 * For B sequences with one new token each, every layer computes, as attnkit.models.llama does eagerly:
 *   h   = x + [N_a] W_o · Attn(RoPE(W_qkv · RMSNorm(x)))        (the new K/V written into the paged pool)
 *   x'  = h + [N_f] W_down · (act(W_gate · RMSNorm(h)) ⊙ W_up · RMSNorm(h))
 * with the projections on the checkpoint's blocks (ak_gemv) and the attention over the block tables
 * (ak_paged_attention_kv, over float32, float16, Q8_0 or Q4_0 K/V rows). Eagerly the same step is ~80 PyTorch
 * operations per layer, each with its Python and dispatch overhead; here it is one call for all layers.
 *
 * Options of the families: Qwen2's q/k/v bias; q/k RMSNorm before RoPE, per head (Qwen3) or over the whole
 * projection (OLMoE); served LoRA adapters, each row its own (lora_add); RoPE on part of each head (Phi-4-mini); Gemma's sandwich norms N_a, N_f on each sublayer's output,
 * GeGLU, softmax scale and soft-capping, and layers of two kinds (Gemma 3: windowed layers with their own block tables and RoPE base:
 * ak_view); and in place of the dense FFN a sparse mixture of experts (moe.c: Qwen3-MoE, Mixtral, OLMoE).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "decode.h" /* ak_layer, ak_rmsnorm, ak_act_mul, the K/V rows, ak_paged_attention_kv */

int ak_gemv(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads);

/* half-split RoPE on the first rd of each of n heads of hd (the rest as they are: partial rotary, Phi-4-mini):
 * (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin); cos/sin (rd,) */
static void rope(float *x, int n, int hd, int rd, const float *cos, const float *sin) {
    const int h2 = rd / 2;
    for (int h = 0; h < n; h++) {
        float *v = x + (size_t)h * hd;
        for (int i = 0; i < h2; i++) {
            const float a = v[i], b = v[i + h2];
            v[i] = a * cos[i] - b * sin[i];
            v[i + h2] = b * cos[i + h2] + a * sin[i + h2];
        }
    }
}

/* the nkv new rows src (nkv, hd) -> their slot of the pool, as kv_type stores them, and as Q8_0 rows into their
 * exact block's tail slot ts (of tail (nkv, tail_slots, bs, Q8_0 row); ts < 0: none) */
static void store_kv(void *pool, int kv_type, const float *src, int nkv, int hd, int num_blocks, int bs, int64_t slot,
                     void *tail, int tail_slots, int64_t ts) {
    const int64_t block = slot / bs, off = slot % bs;
    const size_t rb = ak_kv_row_bytes(kv_type, hd);
    for (int h = 0; h < nkv; h++) {
        const float *x = src + (size_t)h * hd;
        if (tail && ts >= 0)
            ak_quantize_kv_rows(AK_KV_Q8_0, x, (uint8_t *)tail + (((size_t)h * tail_slots + (size_t)ts) * bs + (size_t)off) *
                                                   ak_kv_row_bytes(AK_KV_Q8_0, hd), 1, hd);
        uint8_t *row = (uint8_t *)pool + (((size_t)h * num_blocks + (size_t)block) * bs + (size_t)off) * rb;
        if (kv_type == AK_KV_F32)
            memcpy(row, x, rb);
        else if (kv_type == AK_KV_F16)
            for (int i = 0; i < hd; i++) ((uint16_t *)row)[i] = ak_float_to_half(x[i]);
        else
            ak_quantize_kv_rows(kv_type, x, row, 1, hd);
    }
}

/* x (n values, n a multiple of 64) ← x·H per 64 values, H the orthonormal Sylvester-Hadamard matrix, by the fast
 * Walsh-Hadamard butterflies in the order of attnkit.engine.kv_format.hadamard64 (the same floats): quantized K/V
 * rows are stored rotated, queries rotated alike and the attention output rotated back (H is its own inverse) */
static void hadamard64(float *x, size_t n) {
    for (size_t o = 0; o < n; o += 64) {
        float *y = x + o;
        for (int h = 1; h < 64; h *= 2)
            for (int j = 0; j < 64; j += 2 * h)
                for (int i = j; i < j + h; i++) {
                    const float a = y[i], b = y[i + h];
                    y[i] = a + b;
                    y[i + h] = a - b;
                }
        for (int i = 0; i < 64; i++) y[i] *= 0.125f;
    }
}

/* x (n floats, n a multiple of 64) ← x·H per 64 values, in place: hadamard64 for attnkit.engine.kv_format's rows
 * (the same floats as its PyTorch butterflies, which make a tensor for every stage); 0, or 1 (n not a multiple of
 * 64) */
int ak_hadamard64(float *x, int64_t n, int threads) {
    if (n < 0 || n % 64) return 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 65536)
    for (int64_t o = 0; o < n; o += 4096) hadamard64(x + o, (size_t)(n - o < 4096 ? n - o : 4096));
    return 0;
}

/* y (B, n) = x (B, k) · [W_0; W_1; …]ᵀ for the np parts (n their rows together); tmp: B · n floats */
static int gemv_parts(const ak_part *p, int np, const float *x, float *y, float *tmp, int B, int k, void *act,
                      int threads) {
    if (np == 1) return ak_gemv(p[0].kind, p[0].w, x, y, B, p[0].rows, k, act, threads);
    int n = 0;
    for (int i = 0; i < np; i++) n += p[i].rows;
    for (int i = 0, off = 0; i < np; off += p[i].rows, i++) {
        if (ak_gemv(p[i].kind, p[i].w, x, tmp, B, p[i].rows, k, act, threads)) return 1;
        for (int b = 0; b < B; b++)
            memcpy(y + (size_t)b * n + off, tmp + (size_t)b * p[i].rows, sizeof(float) * (size_t)p[i].rows);
    }
    return 0;
}

/* y (B, n) += each row's LoRA update (Hu et al. 2021; multi-LoRA serving as Punica / S-LoRA): for row b with adapter
 * a = row_adapter[b] (0: none), Σ over the columns r of adapter a of (A[r] · x_b) · Bt[r] over column r's span; x (B, k) */
static void lora_add(const ak_lora *L, const float *x, float *y, int B, int k, int n, const int64_t *row_adapter,
                     int threads) {
    if (!L || !row_adapter) return;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B > 1)
    for (int b = 0; b < B; b++) { /* each row by itself (its own y row): the same sums however many rows */
        const int64_t a = row_adapter[b];
        if (!a) continue;
        const float *xb = x + (size_t)b * k;
        float *yb = y + (size_t)b * n;
        for (int r = 0; r < L->R; r++) {
            if (L->cols[r] != a) continue;
            const float *ar = L->A + (size_t)r * k;
            float t = 0.f;
#pragma omp simd reduction(+ : t)
            for (int i = 0; i < k; i++) t += ar[i] * xb[i];
            const float *br = L->Bt + (size_t)r * n;
            const int64_t lo = L->span[2 * r], hi = L->span[2 * r + 1] < n ? L->span[2 * r + 1] : n;
#pragma omp simd
            for (int64_t o = lo; o < hi; o++) yb[o] += t * br[o];
        }
    }
}

/* x (B, d) in/out: the residual stream before layer 0 in, after the last layer out.
 * views: what each kind of layer sees (ak_view: where each new K/V goes, the block tables and keys, the RoPE angles of
 * rd dims; layer l reads views[layers[l].view]); kv_type: the pools' rows (AK_KV_*: 0 float32, 1 float16, 2 Q8_0,
 * 3 Q4_0; the new rows quantized as ak_quantize_kv_rows).
 * work: B·(2d + nqkv + 2·nh·hd + 2·ff + max(nqkv, 2·ff)) floats (ff: the dense layers' hidden size, 0 when every
 * layer is a mixture of experts); act: the quantized activations (ak_gemv's scratch, for the widest input:
 * B · max(d, ff, nh·hd)/32 · 40 bytes); scores: ak_paged_attention_kv's scratch (for the largest max_nb); moe_work:
 * moe_bytes bytes, at least ak_moe_work_bytes for the widest MoE layer (NULL, 0 without one); tail: the exact blocks'
 * slots (ak_kv_tail, its k and v unused: each layer's k_tail, v_tail) or NULL; row_adapter: each row's LoRA adapter
 * (B,) (0: the base alone), or NULL without adapters. Returns 0, or 1 (a product refused), 2
 * (the attention refused; a kv_type or hd the pools cannot hold: before any row is written), 3–5 (an MoE layer:
 * ak_moe_ffn's code + 2). */
int ak_llama_decode(const ak_layer *layers, int n_layers, float *x, int B, int d, int nh, int nkv, int hd, int rd,
                    int ff, float eps, const ak_view *views, int bs, int num_blocks, int kv_type, float *work, void *act,
                    float *scores, void *moe_work, size_t moe_bytes, int threads, const ak_kv_tail *tail,
                    const int64_t *row_adapter) {
    const int nq = nh * hd, nkvd = nkv * hd, nqkv = nq + 2 * nkvd;
    float *xn = work;                            /* (B, d)     normed input */
    float *qkv = xn + (size_t)B * d;             /* (B, nqkv)  projections */
    float *q = qkv + (size_t)B * nqkv;           /* (B, nq)    rotated queries, contiguous */
    float *att = q + (size_t)B * nq;             /* (B, nq)    attention output */
    float *gu = att + (size_t)B * nq;            /* (B, 2·ff)  gate | up, then act(gate)·up in the first ff */
    float *dn = gu + (size_t)B * 2 * ff;         /* (B, d)     a sublayer's output */
    float *tmp = dn + (size_t)B * d;             /* (B, max(nqkv, 2·ff)) one part's output (gemv_parts) */
    const int rot = (kv_type == AK_KV_Q8_0 || kv_type == AK_KV_Q4_0) && hd % 64 == 0; /* as KVFormat.rotates */
    if (!ak_kv_row_bytes(kv_type, hd) || rd < 2 || rd > hd || rd % 2) return 2;
    for (int l = 0; l < n_layers; l++) {
        const ak_layer *L = layers + l;
        const ak_view *V = views + L->view;
        for (int b = 0; b < B; b++) ak_rmsnorm(x + (size_t)b * d, L->attn_norm, xn + (size_t)b * d, d, eps);
        if (gemv_parts(L->qkv, L->n_qkv, xn, qkv, tmp, B, d, act, threads)) return 1;
        lora_add(L->lora_qkv, xn, qkv, B, d, nqkv, row_adapter, threads);
        for (int b = 0; b < B; b++) {
            float *r = qkv + (size_t)b * nqkv;
            if (L->qkv_bias)
                for (int i = 0; i < nqkv; i++) r[i] += L->qkv_bias[i];
            if (L->qk_norm == 1) { /* each q head, then each k head (adjacent), over its hd features */
                for (int h = 0; h < nh; h++) ak_rmsnorm(r + (size_t)h * hd, L->q_norm, r + (size_t)h * hd, hd, L->qk_eps);
                for (int h = nh; h < nh + nkv; h++) ak_rmsnorm(r + (size_t)h * hd, L->k_norm, r + (size_t)h * hd, hd, L->qk_eps);
            } else if (L->qk_norm == 2) { /* all of q, all of k */
                ak_rmsnorm(r, L->q_norm, r, nq, L->qk_eps);
                ak_rmsnorm(r + nq, L->k_norm, r + nq, nkvd, L->qk_eps);
            }
            rope(r, nh + nkv, hd, rd, V->cos + (size_t)b * rd, V->sin + (size_t)b * rd); /* q and k heads are adjacent */
            if (rot) hadamard64(r, (size_t)nqkv); /* q, k and v */
            for (int i = 0; i < nq; i++) q[(size_t)b * nq + i] = r[i];
            const int64_t ts = tail ? tail->slot[b] : -1;
            const int n_ts = tail ? tail->slots : 0;
            store_kv(L->k_pool, kv_type, r + nq, nkv, hd, num_blocks, bs, V->slots[b], L->k_tail, n_ts, ts);
            store_kv(L->v_pool, kv_type, r + nq + nkvd, nkv, hd, num_blocks, bs, V->slots[b], L->v_tail, n_ts, ts);
        }
        ak_kv_tail lt;
        if (tail) lt = (ak_kv_tail){L->k_tail, L->v_tail, tail->slots, tail->slot, tail->from};
        int rc = ak_paged_attention_kv(q, L->k_pool, L->v_pool, kv_type, V->tables, V->lens, V->starts, att, B, nh, nkv,
                                       hd, bs, num_blocks, V->max_nb, L->scale, scores, threads,
                                       tail && L->k_tail ? &lt : NULL, L->softcap);
        if (rc) return 2;
        if (rot) hadamard64(att, (size_t)B * nq);
        if (ak_gemv(L->o.kind, L->o.w, att, dn, B, d, nq, act, threads)) return 1;
        lora_add(L->lora_o, att, dn, B, nq, d, row_adapter, threads);
        if (L->post_attn_norm)
            for (int b = 0; b < B; b++) ak_rmsnorm(dn + (size_t)b * d, L->post_attn_norm, dn + (size_t)b * d, d, eps);
        for (size_t i = 0; i < (size_t)B * d; i++) x[i] += dn[i];
        for (int b = 0; b < B; b++) ak_rmsnorm(x + (size_t)b * d, L->ffn_norm, xn + (size_t)b * d, d, eps);
        if (L->moe) {
            if ((rc = ak_moe_ffn(L->moe, xn, dn, B, d, moe_work, moe_bytes, threads))) return rc + 2;
        } else {
            if (gemv_parts(L->gate_up, L->n_gate_up, xn, gu, tmp, B, d, act, threads)) return 1;
            lora_add(L->lora_gate_up, xn, gu, B, d, 2 * ff, row_adapter, threads);
            for (int b = 0; b < B; b++) ak_act_mul(gu + (size_t)b * 2 * ff, gu + (size_t)b * ff, ff, L->act);
            if (ak_gemv(L->down.kind, L->down.w, gu, dn, B, d, ff, act, threads)) return 1;
            lora_add(L->lora_down, gu, dn, B, ff, d, row_adapter, threads);
        }
        if (L->post_ffn_norm)
            for (int b = 0; b < B; b++) ak_rmsnorm(dn + (size_t)b * d, L->post_ffn_norm, dn + (size_t)b * d, d, eps);
        for (size_t i = 0; i < (size_t)B * d; i++) x[i] += dn[i];
    }
    return 0;
}
