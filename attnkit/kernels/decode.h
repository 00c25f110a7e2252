/* What the C decode step's files share (decode_step.c: the layers; moe.c: the sparse mixture-of-experts FFN;
 * attention.c: the paged attention and the K/V rows it reads): the structs attnkit/engine/native_decode.py fills
 * through ctypes (keep the two in step), the K/V row formats, and the row helpers. */
#ifndef AK_DECODE_H
#define AK_DECODE_H
#include "blocks.h" /* exp16 */

/* the K/V pools' row formats (kv_type; attnkit/engine/kv_format.py's codes): hd floats, hd IEEE halves, or hd/32
 * GGUF blocks of Q8_0 (34 bytes) / Q4_0 (18 bytes) */
enum { AK_KV_F32, AK_KV_F16, AK_KV_Q8_0, AK_KV_Q4_0 };

/* the bytes of one row of hd values of kv_type; 0 for an unknown type, or a quantized one and hd % 32 */
static inline size_t ak_kv_row_bytes(int kv_type, int hd) {
    switch (kv_type) {
        case AK_KV_F32: return 4 * (size_t)hd;
        case AK_KV_F16: return 2 * (size_t)hd;
        case AK_KV_Q8_0: return hd % 32 ? 0 : (size_t)hd / 32 * 34;
        case AK_KV_Q4_0: return hd % 32 ? 0 : (size_t)hd / 32 * 18;
        default: return 0;
    }
}

/* float -> IEEE half, rounded to nearest even */
static inline uint16_t ak_float_to_half(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, 0);
#else
    /* round-to-nearest-even float -> IEEE half, for compilers without F16C */
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = (v.u >> 16) & 0x8000, e = (v.u >> 23) & 0xff, m = v.u & 0x7fffff;
    if (e == 0xff) return (uint16_t)(sign | 0x7c00 | (m ? 0x200 : 0));
    int ne = (int)e - 127 + 15;
    if (ne >= 31) return (uint16_t)(sign | 0x7c00);
    if (ne <= 0) {
        if (ne < -10) return (uint16_t)sign;
        m |= 0x800000;
        uint32_t shift = (uint32_t)(14 - ne), half = m >> shift, rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)ne << 10) | (m >> 13), rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
#endif
}

/* n_rows rows of hd floats -> Q8_0 / Q4_0 rows (kv_type 2 / 3), as ggml's reference quantizers; 0, 3 (hd % 32),
 * 4 (another kv_type) */
int ak_quantize_kv_rows(int kv_type, const float *x, void *out, int n_rows, int hd);
/* A 4-bit cache's exact blocks (attnkit/engine/kv_tail.py): query b reads the keys of its own block at cache
 * indices from[b] <= t < lens[b] as Q8_0 rows from tail slot slot[b] (slot < 0: none), not from the pool;
 * k, v: this layer's (nkv, slots, bs, Q8_0 row) rows. */
typedef struct { const void *k, *v; int slots; const int64_t *slot, *from; } ak_kv_tail;
/* the paged decode attention (attention.c) over K/V pools of kv_type (tail: NULL, or the exact blocks; softcap > 0:
 * the scores soft-capped, Gemma 2); 0, 1
 * (nh % nkv), 3 (hd % 32 for a quantized kv_type), 4 (an unknown kv_type) */
int ak_paged_attention_kv(const float *q, const void *k_pool, const void *v_pool, int kv_type, const int64_t *tables,
                          const int64_t *lens, const int64_t *starts, float *out, int B, int nh, int nkv, int hd,
                          int bs, int num_blocks, int max_nb, float scale, float *scratch, int threads,
                          const ak_kv_tail *tail, float softcap);

/* one matrix of GGUF blocks: its kernel kind (ak_gemv) and output rows */
typedef struct { const void *w; int kind, rows; } ak_part;

/* one expert's SwiGLU: gate/up (2·ff rows: one fused matrix, or one part each, gate's rows then up's) and down */
typedef struct {
    ak_part gate_up[2], down;
    int n_gate_up;
} ak_expert;

/* a sparse mixture-of-experts FFN (attnkit.nn.moe.SparseMoE): p = softmax(router · x) over n_experts, the top_k
 * experts by p (ties: the lower index first, as torch.topk), weights p (norm_topk 0) or p / Σ of the chosen p
 * (norm_topk 1), y = Σ w_e · down_e(SiLU(gate_e · x) ⊙ up_e · x) */
typedef struct {
    int n_experts, top_k, norm_topk, ff; /* ff: each expert's hidden size */
    const float *router_f32;             /* (n_experts, d) float32, or NULL: the router is `router` (GGUF blocks) */
    ak_part router;
    const ak_expert *experts; /* n_experts */
} ak_moe;

/* the LoRA adapters served on one projection (attnkit.engine.lora.MultiLoraLinear), stacked: A (R, in) the adapters'
 * A's one after the other, Bt (R, out) their B's transposed (scaling folded in), cols (R,) the adapter of each
 * column, span (R, 2) the outputs [lo, hi) where column r's B is not zero (a fused q/k/v or gate/up: one part's) */
typedef struct {
    const float *A, *Bt;
    const int64_t *cols, *span;
    int R;
} ak_lora;

typedef struct {
    /* q/k/v ((nh+2·nkv)·hd rows) and gate/up (2·ff rows): one fused matrix, or one part each where their block
     * types differ (Q4_K_M keeps attn_v in Q6_K in some layers); the outputs of the parts lie side by side */
    ak_part qkv[3], gate_up[2], o, down;
    int n_qkv, n_gate_up;
    const float *qkv_bias; /* (nh+2·nkv)·hd or NULL (Qwen2) */
    const float *attn_norm, *ffn_norm; /* RMSNorm weights (d,) */
    void *k_pool, *v_pool; /* this layer's (nkv, num_blocks, bs, row) rows of the step's kv_type */
    void *k_tail, *v_tail; /* this layer's exact blocks (nkv, slots, bs, Q8_0 row) (ak_kv_tail), or NULL */
    /* q/k RMSNorm before RoPE: 0 none; 1 each head over its hd features (Qwen3: q_norm, k_norm (hd,)); 2 over the
     * whole projection (OLMoE: q_norm (nh·hd,), k_norm (nkv·hd,)) */
    int qk_norm;
    float qk_eps;
    const float *q_norm, *k_norm;
    const ak_moe *moe; /* NULL: the dense SwiGLU above (gate_up, down); else this FFN, and gate_up/down are unused */
    const float *post_attn_norm, *post_ffn_norm; /* sandwich norms on each sublayer's output (Gemma 2/3), or NULL */
    float scale;   /* the softmax scale (1/√hd, or Gemma's query_pre_attn_scalar^−½) */
    float softcap; /* > 0: the attention scores soft-capped, tanh(s / softcap) · softcap (Gemma 2) */
    int act;     /* the gated FFN's activation: 0 SiLU (SwiGLU), 1 GELU with the tanh approximation (GeGLU, Gemma) */
    int view;    /* its entry of the step's ak_view array: the keys it sees and its RoPE angles */
    const ak_lora *lora_qkv, *lora_o, *lora_gate_up, *lora_down; /* LoRA adapters on the projections, or NULL */
} ak_layer;

/* what the layers of one kind see in a step: a KV group's block tables and slots, a window's first keys, a RoPE's
 * angles (Gemma 3's windowed layers: their own tables, window and base) */
typedef struct {
    const int64_t *slots, *tables, *lens, *starts; /* (B,) where each new K/V goes; (B, max_nb); (B,) keys st <= t < len */
    const float *cos, *sin;                        /* (B, rd) the rows' RoPE angles */
    int max_nb;
} ak_view;

/* y = x / √(mean(x²) + eps) · w over d features (y may be x: each y[i] is written after x[i] is read) */
static inline void ak_rmsnorm(const float *x, const float *w, float *y, int d, float eps) {
    float ss = 0.f;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)d + eps);
    for (int i = 0; i < d; i++) y[i] = x[i] * r * w[i];
}

/* h = act(g) · u over n values, act(g) = g · σ(z): SiLU (act 0, z = g) or GELU with PyTorch's tanh approximation (act 1:
 * g/2 · (1 + tanh(y)) = g · σ(2y), y = √(2/π) · (g + 0.044715 g³)); h may be g (h[i] is written after g[i] and u[i]
 * are read). 16 values at a time with AVX-512 (the gated products' epilogue: kernels.c, gemm.c), 8 with AVX2. */
static inline void ak_act_mul2(const float *g, const float *u, float *h, int ff, int act) {
    const float c2 = 2.f * 0.7978845608028654f, a = 0.044715f;
    int i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= ff; i += 16)
        _mm512_storeu_ps(h + i, _mm512_mul_ps(ak_gate_act16(_mm512_loadu_ps(g + i), act), _mm512_loadu_ps(u + i)));
#elif defined(AK_AVX2)
    for (; i + 8 <= ff; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 z = act ? _mm256_mul_ps(_mm256_set1_ps(c2), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(a), gv),
                                                                                  _mm256_mul_ps(gv, gv), gv)) : gv;
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), z));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                              _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < ff; i++) {
        const float z = act ? c2 * (g[i] + a * g[i] * g[i] * g[i]) : g[i];
        h[i] = g[i] / (1.f + expf(-z)) * u[i];
    }
}

/* ak_act_mul2 for one row's gate/up output gu = [g (ff) | u (ff)]; h may overlap the start of gu */
static inline void ak_act_mul(const float *gu, float *h, int ff, int act) { ak_act_mul2(gu, gu + ff, h, ff, act); }

/* the bytes of the MoE scratch (ak_moe_ffn's work) for B rows of d features, experts of `ff`, threads threads */
size_t ak_moe_work_bytes(int B, int d, int n_experts, int top_k, int ff, int threads);
/* out (B, d) = the MoE FFN of xn (B, d); 0, or 1 (a product refused), 2 (work too small), 3 (bad shapes) */
int ak_moe_ffn(const ak_moe *m, const float *xn, float *out, int B, int d, void *work, size_t work_bytes,
               int threads);
#endif
