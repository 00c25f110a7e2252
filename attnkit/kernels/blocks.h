/* What attnkit's kernel files share: the block-type table's row (ak_type), the activation rows, fp16 widening
 * and a few vector helpers. One kernel file per block type or family (q4.c, q5.c, q8.c, q4_k.c, q6_k.c) defines
 * its row; kernels.c lists the rows and dispatches ak_gemv / ak_dequantize through them. */
#ifndef AK_BLOCKS_H
#define AK_BLOCKS_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define AK_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512DQ__)
#define AK_X4 1 /* the 512-bit products on rows interleaved in fours */
#endif
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* ---- activations: each row of x quantized per block of 32, x ≈ d·q (q int8, d = max|x|/127 over the weights'
 * block: 32 values, or 256 for the K-quants, where the 8 blocks of a super-block share one d), s = d·Σq; d and s
 * as llama.cpp's q8_0 / q8_1 store them (in fp16) for the 32-weight types, in float for the K-quants (q8_K).
 * One row of k inputs takes 40·k/32 bytes of scratch, laid out as qs[k] int8, d[k/32], s[k/32] float (so that
 * 64 consecutive quants are one load and the scales of a super-block are contiguous). */
typedef struct { float d, s; int8_t qs[32]; } block_q8x; /* its size is what one block of 32 takes */
/* off4: for the interleaved products of a type with a quant offset o (its row's `offset`), −o · Σ of each 4
 * consecutive qs (k/4 int32, the start of the 4-lane dot products: Σ (q − o)·x = Σ q·x − o·Σ x); else NULL */
/* a second stream of prefetches that a batch's products carry along (ak_gemv): `per` lines from p into L2 at each
 * weight column, p advanced past them */
typedef struct { const char *p; int per; } ak_side;
typedef struct { const int8_t *qs; const float *d, *s; const int32_t *off4; ak_side *side; } ak_act;

static inline ak_act act_row(const void *scratch, int r, int k) {
    const int8_t *p = (const int8_t *)scratch + (size_t)r * (size_t)(k / 32) * sizeof(block_q8x);
    ak_act a = {p, (const float *)(p + k), (const float *)(p + k) + k / 32, NULL, NULL};
    return a;
}

/* ---- the prompt rows' product (gemm.c) reads a panel of 16 weight rows (one interleaved group) unpacked per 256
 * inputs: one quant byte per weight and the scales in 512-bit lanes, lane L holding row L. How the scales apply
 * (the type's mode): AK_PANEL_B32 (Q8_0: w = d_b·(q − 128) as unsigned q, blocks of 32), AK_PANEL_L32 (Q4_0, Q4_1,
 * Q5_0, Q5_1: w = d_b·q + m_b, Σ w·x = d·dx·Σ q·qx + m·sx), AK_PANEL_K16 (Q6_K: w = d·sc_j·(q − 32), groups of
 * 16); AK_PANEL_MIN (Q4_K, Q5_K: w = d·sc_j·q − dmin·m_j, sub-blocks of 32) is their decode kernel's arithmetic,
 * with no panel. */
enum { AK_PANEL_MIN = 1, AK_PANEL_K16 = 2, AK_PANEL_B32 = 3, AK_PANEL_L32 = 5 };
#ifdef AK_X4
typedef struct {
    __m512i q[64];  /* unsigned quants: slot s holds inputs 4s .. 4s + 3 of each lane's row */
    __m512i sc[16]; /* AK_PANEL_K16: each group of 16 inputs' int8 scale, widened */
    __m512 d[8];    /* each block of 32's d (AK_PANEL_K16: d[0], the super-block's) */
    __m512 mn[8];  /* each block's m (AK_PANEL_L32) */
} ak_panel;
/* unit u (inputs 256u ..) of the group of 16 interleaved rows at w → *p; nb: its blocks of 32 (8, or fewer in the
 * last unit of a row of k % 256 inputs) */
typedef void (*ak_panel_fn)(const uint8_t *group, int u, int nb, ak_panel *p);
#else
typedef struct ak_panel ak_panel;
typedef void (*ak_panel_fn)(const uint8_t *group, int u, int nb, ak_panel *p);
#endif

/* ---- one row of the block-type table (ggml's type traits). Kinds are ggml's type ids; AK_X4_FLAG selects the
 * same blocks with rows interleaved in fours, field by field (x4_fields: a field's offset and bytes in the block,
 * and the granule in which the four rows' bytes alternate; in the order they lie in a block column), for the
 * 512-bit products. */
enum { AK_Q4_0 = 2, AK_Q4_1 = 3, AK_Q5_0 = 6, AK_Q5_1 = 7, AK_Q8_0 = 8, AK_Q4_K = 12, AK_Q5_K = 13, AK_Q6_K = 14 };
enum { AK_X4_FLAG = 0x100 };
typedef struct { short offset, bytes, granule; } ak_field;
/* y[r·ystride + i] = weight row i · activation row x[r], for r < M (<= 4) and the rows i of one row (dot) or of
 * one interleaved group of four (dot_x4); nb blocks per row. Each activation row's result is computed by the
 * same instructions in the same order whatever M is (batch invariance). */
typedef void (*ak_dot_fn)(const uint8_t *w, int nb, const ak_act *x, int M, float *y, size_t ystride);
typedef struct {
    int id, block_elems, block_bytes;
    void (*to_float)(const uint8_t *blocks, int count, float *out); /* count blocks (GGUF layout) → floats */
    ak_dot_fn dot;    /* one row in GGUF's layout */
    ak_dot_fn dot_x4; /* four rows interleaved (x4_fields), NULL where this build has no such kernel */
    ak_field x4_fields[8];
    int offset; /* dot_x4 takes unsigned quants q and wants ak_act.off4 for w ∝ q − offset (0: no off4) */
    /* row r of an interleaved group, block columns b0 .. b0 + count − 1 → floats, read in place (NULL: the blocks
     * are gathered into GGUF's layout for to_float) */
    void (*to_float_x4)(const uint8_t *group, int r, int b0, int count, float *out);
    ak_panel_fn panel; /* interleaved blocks → the prompt product's panels (NULL: none, or the K-quants' decode kernel) */
    int panel_mode;    /* AK_PANEL_*: the arithmetic of the type's interleaved product */
    int x4_rows;       /* rows a group of the interleaved layout: 16 with AVX-512 VNNI (gemm.c's panel), 4 with AVX2 */
    int act_q8_1;      /* the activations' s as llama.cpp's q8_1 (the type's vec_dot_type) holds it, fp16(d·Σq); else
                        * (q8_0, q8_K) d·Σq with the block's d as stored: Q4_1 and Q5_1 (w = d·q + m) multiply m by it */
} ak_type;
/* the rows of one interleaved group of t's blocks (dot_x4 multiplies one group) */
static inline int ak_group_rows(const ak_type *t) { return t->x4_rows ? t->x4_rows : 4; }

/* the table's row for a kind (kernels.c), NULL where this build has none; the activation rows as ak_gemv
 * quantizes them */
const ak_type *ak_find_type(int kind);
int ak_quantize_act(int kind, const float *x, int m, int k, void *scratch);
int ak_gemm(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads);
int ak_gemm_takes(int kind, int n, int k);

extern const ak_type ak_type_q4_0, ak_type_q4_1, ak_type_q5_0, ak_type_q5_1, ak_type_q8_0, ak_type_q4_k,
    ak_type_q5_k, ak_type_q6_k;

/* ---- helpers */
static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; exp--; } man &= 0x3ff; bits = sign | (exp << 23) | (man << 13); }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

/* f rounded to the nearest half (ties to even) and widened back: GGML_FP32_TO_FP16 then to float (F16C's
 * vcvtps2ph, or the FP16 library's bit arithmetic, which gives the same bits for finite f) */
static inline float round_to_half(float f) {
#ifdef __F16C__
    return _cvtsh_ss(_cvtss_sh(f, 0));
#else
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w, bias, bits;
    memcpy(&w, &f, 4);
    const uint32_t shl1 = w + w, sign = w & 0x80000000u;
    bias = shl1 & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    bias = (bias >> 1) + 0x07800000u;
    float b;
    memcpy(&b, &bias, 4);
    base = b + base;
    memcpy(&bits, &base, 4);
    const uint16_t h = (uint16_t)((sign >> 16) | (shl1 > 0xff000000u ? 0x7e00u : ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu)));
    return half_to_float(h);
#endif
}

static inline float ld_half(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return half_to_float(h); }
static inline uint32_t ld_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* the 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (12 packed bytes q) */
static inline void k_scale_min(int j, const uint8_t *q, int *sc, int *mn) {
    if (j < 4) *sc = q[j] & 63, *mn = q[j + 4] & 63;
    else *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
}

#ifdef AK_AVX2
static inline __m256i dot_u8s8(__m256i u, __m256i s) { /* 8 int32 lanes of sums of u*s (u <= 128 with |s| <= 127) */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 16 bytes of nibbles → 32 bytes: the low nibbles, then the high ones */
static inline __m256i nibbles32(const uint8_t *p) {
    const __m128i q = _mm_loadu_si128((const __m128i *)p), low = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
}
/* 32 bits → 32 bytes: byte i = 0xff where bit i is set, else 0 */
static inline __m256i bits32(uint32_t b) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)b),
        _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}
#endif

#if defined(AK_AVX2) && !defined(AK_X4)
/* out[r] = row r's sum in a 256-bit interleaved product's accumulator, lanes [r0 r0 r2 r2 | r1 r1 r3 r3] */
static inline __m128 x4_sums(__m256 v) {
    const __m128 s = _mm_hadd_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); /* r0 r2 r1 r3 */
    return _mm_shuffle_ps(s, s, _MM_SHUFFLE(3, 1, 2, 0));
}
#endif

#ifdef AK_X4
/* t + Σ w·(the 4 activation quants at a->qs + i, broadcast to every 32-bit lane): vpdpbusd with the broadcast as
 * its memory operand ({1to16}), where compilers emit a separate vpbroadcastd for the intrinsic's set1 */
static inline __m512i ak_dp4(__m512i t, __m512i w, const ak_act *a, size_t i) {
#if defined(__GNUC__) && !defined(AK_NO_ASM)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(t) : "v"(w), "m"(*(const int32_t *)(a->qs + i)));
    return t;
#else
    int32_t v;
    memcpy(&v, a->qs + i, 4);
    return _mm512_dpbusd_epi32(t, w, _mm512_set1_epi32(v));
#endif
}
#endif

#ifdef AK_X4
/* Share i of n of a streamed matrix's column (cb bytes), `ahead` columns on, prefetched into L1: called once per
 * step of the column's loop, so the prefetches go out at the rate the kernel consumes the stream, in address order,
 * rather than a burst per quarter column. The hardware prefetchers follow these streams poorly: without software
 * prefetch the Q6_K kernel read 12 GB/s on one core of a Zen 5, with a burst per quarter column 31, spread so 39;
 * plain loads 42 (docs/performance.md, session 25). LINES = ceil(cb / n / 64) lines from the line holding the
 * share's first byte: consecutive shares' lines chain, and a constant count takes no branch (a loop to the share's
 * exact end cost twice the time with the matrix in cache: its trip count changed step by step). */
#define AK_PREFETCH_SHARE(col, cb, ahead, i, n, LINES)                                                              \
    do {                                                                                                         \
        const uintptr_t at_ = (uintptr_t)((col) + (size_t)(ahead) * (cb) + (size_t)(cb) * (size_t)(i) / (size_t)(n)) & ~(uintptr_t)63; \
        for (int l_ = 0; l_ < (LINES); l_++) _mm_prefetch((const char *)(at_ + 64 * (uintptr_t)l_), _MM_HINT_T0); \
    } while (0)
#endif

#ifdef AK_X4
/* the side stream's lines for one weight column of an interleaved kernel (x->side: NULL but in ak_gemv's batches) */
#define AK_SIDE_PREFETCH(x)                                                                                \
    do {                                                                                                   \
        ak_side *s_ = (x)->side;                                                                           \
        if (s_) {                                                                                          \
            for (int l_ = 0; l_ < s_->per; l_++) _mm_prefetch(s_->p + 64 * l_, _MM_HINT_T1);              \
            s_->p += 64 * s_->per;                                                                         \
        }                                                                                                  \
    } while (0)
#endif

/* M (1..4 activation rows) as a literal: each M gets its own unrolled copy of the always_inline body
 * F(w, nb, x, M, y, ystride) */
#define AK_DISPATCH_M(F, w, nb, x, M, y, ys)         \
    switch (M) {                                     \
        case 1: F(w, nb, x, 1, y, ys); break;        \
        case 2: F(w, nb, x, 2, y, ys); break;        \
        case 3: F(w, nb, x, 3, y, ys); break;        \
        default: F(w, nb, x, 4, y, ys);              \
    }
#define AK_INLINE static inline __attribute__((always_inline))

#ifdef __AVX512F__
/* exp of 16 floats: 2^n · p(r), x = n·ln2 + r, |r| <= ln2/2, p of degree 6 (relative error < 2e-7);
 * clamped below at -87 (exp(-87) ~ 1.6e-38: attention's scores minus their maximum weigh nothing there); above
 * ~88.7 the result is +inf, which SiLU's g / (1 + exp(-g)) turns into the right 0 */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* act(g) = g·σ(z) = g / (1 + exp(−z)) of 16 gates: SiLU (act 0, z = g) or GELU with PyTorch's tanh approximation
 * (act 1: g/2 · (1 + tanh(y)) = g·σ(2y), y = √(2/π) · (g + 0.044715 g³)) — the gated FFN's activation, one
 * definition for the decode step (ak_act_mul2), the prompts' gated products (gemm.c) and training (train_ops.c) */
static inline __m512 ak_gate_act16(__m512 g, int act) {
    const __m512 z = act ? _mm512_mul_ps(_mm512_set1_ps(2.f * 0.7978845608028654f),
                                         _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), _mm512_mul_ps(g, g), g))
                         : g;
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
}
#endif

#ifdef AK_AVX2
/* exp of 8 floats, as exp16: 2^n · p(r), x = n·ln2 + r, p of degree 6; clamped below at -87; n at most 128, whose
 * 2^n is +inf (SiLU's g / (1 + exp(-g)) turns it into the right 0) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    n = _mm256_min_ps(n, _mm256_set1_ps(128.f));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

#endif
