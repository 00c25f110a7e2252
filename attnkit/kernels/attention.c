/* attnkit's paged decode attention (attnkit/engine/paged_attention.py, the C decode step) and the rows of a
 * quantized KV cache it reads (llama.cpp's -ctk q8_0 / q4_0), for the machine's instruction set: AVX-512, AVX2
 * or portable C. Each (sequence, KV head) is one task; a sequence's result never depends on the others in the
 * call (batch invariance). */
#include <omp.h>
#include <stdlib.h>

#include "blocks.h"
#include "decode.h" /* the KV row formats (ak_kv_row_bytes, ak_float_to_half) */

/* ---- the rows of a quantized KV cache (llama.cpp's -ctk q8_0 / q4_0): hd/32 GGUF blocks a row ------------------
 *   Q8_0: half d, 32 int8 q (34 bytes), x = q·d;  Q4_0: half d, 16 bytes of nibbles (element j the low nibble of
 *   byte j, element j + 16 its high one; 18 bytes), x = (n − 8)·d. Quantized as ggml's reference quantizers
 *   (quantize_row_q8_0_ref, quantize_row_q4_0_ref), byte for byte what gguf-py writes. */

/* products x/d rounded to float before anything is added to them, as in ggml's C and gguf-py (GCC would fuse the
 * two into one FMA, and a code would differ where the sum lands next to an integer) */
#define UNFUSED __attribute__((optimize("fp-contract=off")))

/* one block of 32 floats -> Q8_0: d = max|x|/127, q = roundf(x/d) (half away from zero; |x/d| <= 127, so the
 * truncation to int and the exact fraction x/d − trunc decide it) */
UNFUSED static void quantize_q8_0(const float *x, uint8_t *b) {
    float amax = 0.f;
    for (int j = 0; j < 32; j++) amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const uint16_t h = ak_float_to_half(d);
    memcpy(b, &h, 2);
    for (int j = 0; j < 32; j++) {
        const float v = x[j] * id, f = v - (float)(int)v;
        b[2 + j] = (uint8_t)(int8_t)((int)v + (f >= .5f) - (f <= -.5f));
    }
}

/* one block of 32 floats -> Q4_0: d = m / −8 for m the first element of largest |x|, n = min(15, (int8)(x/d + 8.5))
 * (of a block of zeros m is the first, ±0, as gguf-py takes it; ggml's C starts from m = +0, so its d is −0) */
UNFUSED static void quantize_q4_0(const float *x, uint8_t *b) {
    float amax = fabsf(x[0]), max = x[0];
    for (int j = 1; j < 32; j++)
        if (amax < fabsf(x[j])) amax = fabsf(x[j]), max = x[j];
    const float d = max / -8.f, id = d != 0.f ? 1.f / d : 0.f;
    const uint16_t h = ak_float_to_half(d);
    memcpy(b, &h, 2);
    for (int j = 0; j < 16; j++) {
        const float x0 = x[j] * id, x1 = x[j + 16] * id;
        const int n0 = (int8_t)(x0 + 8.5f), n1 = (int8_t)(x1 + 8.5f);
        b[2 + j] = (uint8_t)((n0 < 15 ? n0 : 15) | (n1 < 15 ? n1 : 15) << 4);
    }
}

/* n_rows rows of x (hd floats each) -> out (n_rows, row bytes) as kv_type (2 Q8_0, 3 Q4_0); 0, 3 (hd % 32), 4 (type) */
int ak_quantize_kv_rows(int kv_type, const float *x, void *out, int n_rows, int hd) {
    if (kv_type != AK_KV_Q8_0 && kv_type != AK_KV_Q4_0) return 4;
    if (hd % 32) return 3;
    void (*const quantize)(const float *, uint8_t *) = kv_type == AK_KV_Q8_0 ? quantize_q8_0 : quantize_q4_0;
    const size_t bb = kv_type == AK_KV_Q8_0 ? 34 : 18, nb = (size_t)n_rows * (hd / 32);
    for (size_t i = 0; i < nb; i++) quantize(x + 32 * i, (uint8_t *)out + bb * i);
    return 0;
}

#ifdef __AVX2__
/* the low 8 int8 of v, times d -> o[0..7] */
static inline void i8x8_scaled(__m128i v, __m256 d, float *o) {
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d));
}
#endif

/* a Q8_0 row (hd/32 blocks) -> hd floats */
static inline void q8_0_row(const uint8_t *b, float *o, int hd) {
    for (int k = 0; k < hd / 32; k++, b += 34, o += 32) {
#ifdef __AVX2__
        const __m256 d = _mm256_set1_ps(ld_half(b));
        for (int i = 0; i < 4; i++) i8x8_scaled(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i)), d, o + 8 * i);
#else
        const float d = ld_half(b);
        for (int i = 0; i < 32; i++) o[i] = (float)(int8_t)b[2 + i] * d;
#endif
    }
}

/* a Q4_0 row (hd/32 blocks) -> hd floats */
static inline void q4_0_row(const uint8_t *b, float *o, int hd) {
    for (int k = 0; k < hd / 32; k++, b += 18, o += 32) {
#ifdef __AVX2__
        const __m256 d = _mm256_set1_ps(ld_half(b));
        const __m128i q = _mm_loadu_si128((const __m128i *)(b + 2)), m = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m), eight);                    /* elements 0-15, n − 8 */
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m), eight); /* elements 16-31 */
        i8x8_scaled(lo, d, o), i8x8_scaled(_mm_srli_si128(lo, 8), d, o + 8);
        i8x8_scaled(hi, d, o + 16), i8x8_scaled(_mm_srli_si128(hi, 8), d, o + 24);
#else
        const float d = ld_half(b);
        for (int j = 0; j < 16; j++)
            o[j] = (float)((b[2 + j] & 15) - 8) * d, o[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
#endif
    }
}

/* ---- paged decode attention --------------------------------------------------------------------
 * One query token per sequence over its K/V in the block pool, read in place through the block
 * table (no gather copy): out[b, h] = softmax(q[b, h]·K_bᵀ · scale) · V_b over keys start_b ≤ j < len_b.
 *   q, out  (B, nh, hd) float32;  k_pool, v_pool (n_kv, num_blocks, bs, row) of kv_type: float32 rows
 *   (read in place), IEEE halves or Q8_0 / Q4_0 blocks (each row decoded to float32 once, for all g heads;
 *   float32 sums); tables (B, max_nb) int64;  lens, starts (B,) int64;  the g = nh / n_kv query heads of one
 *   KV head share each K/V row read. scratch: threads · g · max_nb · bs floats (the scores).
 */
/* n halves -> floats: 8 at a time with F16C, the rest (and everything without F16C) one by one */
static inline void halves_to_floats(const uint16_t *h, float *f, int n) {
    int i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) f[i] = half_to_float(h[i]);
}

/* row r of a pool of kv_type as hd floats: in place for float32, decoded into buf for the others */
static inline const float *kv_row(const void *pool, int kv_type, size_t r, int hd, float *buf) {
    const uint8_t *p = (const uint8_t *)pool + r * ak_kv_row_bytes(kv_type, hd);
    switch (kv_type) {
        case AK_KV_F32: return (const float *)p;
        case AK_KV_F16: halves_to_floats((const uint16_t *)p, buf, hd); break;
        case AK_KV_Q8_0: q8_0_row(p, buf, hd); break;
        default: q4_0_row(p, buf, hd);
    }
    return buf;
}


/* for key t = st .. len − 1 of KV head h, with r its row in the pool: the sequence's blocks, then the rows of each
 * (one table lookup a block, no division a key); used as a for statement */
#define KV_ROWS(tab, st, len, h, bs, num_blocks, t, r)                                                              \
    for (int64_t j_ = (st) / (bs), t0_; (t0_ = j_ * (bs) > (st) ? j_ * (bs) : (st)) < (len); j_++)                  \
        for (int64_t t = t0_, e_ = (j_ + 1) * (bs) < (len) ? (j_ + 1) * (bs) : (len),                                \
                     r = ((int64_t)(h) * (num_blocks) + (tab)[j_]) * (bs) + t0_ - j_ * (bs);                         \
             t < e_; t++, r++)

/* Inside a KV_ROWS body: the lines of the pool row AHEAD keys on prefetched (further in this block, or at the same
 * place of the sequence's next block: the hardware prefetchers follow neither a block table's jumps nor, on the
 * machine measured, much of a block's own rows) */
#define KV_AHEAD 8
#define KV_PREFETCH(pool, rb, tab, len, h, bs, num_blocks, t, r)                                                    \
    do {                                                                                                       \
        const int64_t o_ = (t) - j_ * (bs) + KV_AHEAD;                                                         \
        const int64_t n_ = o_ < (bs) ? (r) + KV_AHEAD                                                          \
                           : (j_ + 1) * (bs) + o_ - (bs) < (len)                                               \
                               ? ((int64_t)(h) * (num_blocks) + (tab)[j_ + 1]) * (bs) + o_ - (bs)              \
                               : -1;                                                                           \
        if (n_ >= 0)                                                                                           \
            for (size_t l_ = 0; l_ < (rb); l_ += 64) _mm_prefetch((const char *)(pool) + (size_t)n_ * (rb) + l_, _MM_HINT_T0); \
    } while (0)

/* p[0 .. n) ← tanh(p / c) · c: attention logit soft-capping (Gemma 2), as the eager decode_attention computes it;
 * tanh(y) = 1 − 2 / (e^{2y} + 1) on the vector lanes */
static inline void softcap_scores(float *p, int64_t n, float c) {
    int64_t t = 0;
#ifdef __AVX512F__
    const __m512 vc = _mm512_set1_ps(c), one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
    for (; t + 16 <= n; t += 16) {
        const __m512 y = _mm512_div_ps(_mm512_loadu_ps(p + t), vc), e = exp16(_mm512_add_ps(y, y));
        _mm512_storeu_ps(p + t, _mm512_mul_ps(_mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one))), vc));
    }
#elif defined(AK_AVX2)
    const __m256 vc = _mm256_set1_ps(c), one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
    for (; t + 8 <= n; t += 8) {
        const __m256 y = _mm256_div_ps(_mm256_loadu_ps(p + t), vc), e = exp8(_mm256_add_ps(y, y));
        _mm256_storeu_ps(p + t, _mm256_mul_ps(_mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one))), vc));
    }
#endif
    for (; t < n; t++) p[t] = tanhf(p[t] / c) * c;
}

/* p[0 .. n) ← softmax(p), n >= 1 (8 lanes at a time with AVX2) */
static inline void softmax(float *p, int64_t n) {
    float mx = -INFINITY, sum = 0.f;
    int64_t t = 0;
#ifdef AK_AVX2
    __m256 vm = _mm256_set1_ps(-INFINITY), vs = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(p + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (int64_t u = t; u < n; u++) mx = p[u] > mx ? p[u] : mx;
    const __m256 vmx = _mm256_set1_ps(mx);
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), vmx));
        _mm256_storeu_ps(p + t, e);
        vs = _mm256_add_ps(vs, e);
    }
    sum = hsum(vs);
#else
    for (; t < n; t++) mx = p[t] > mx ? p[t] : mx;
    t = 0;
#endif
    for (int64_t u = t; u < n; u++) { p[u] = expf(p[u] - mx); sum += p[u]; }
    const float inv = 1.f / sum;
    for (int64_t u = 0; u < n; u++) p[u] *= inv;
}

/* the scores of key row k (key t; k a decoded row, evaluated once per use) for the g heads */
#define SCORE_ROW(t, k)                                                                          \
    for (int gi = 0; gi < g; gi++) {                                                            \
        const float *qg = qb + (size_t)gi * hd;                                                 \
        float acc = 0.f;                                                                        \
        _Pragma("omp simd reduction(+ : acc)") for (int d = 0; d < hd; d++) acc += qg[d] * (k)[d]; \
        s[(size_t)gi * L + (t)] = acc * scale;                                                  \
    }
/* value row v (key t) weighed into the g heads' outputs */
#define ADD_ROW(t, v)                                                                            \
    for (int gi = 0; gi < g; gi++) {                                                            \
        const float p = s[(size_t)gi * L + (t)];                                                \
        float *og = ob + (size_t)gi * hd;                                                       \
        _Pragma("omp simd") for (int d = 0; d < hd; d++) og[d] += p * (v)[d];                   \
    }

/* One (sequence, KV head) task: its g query heads against keys st <= t < len. ``hd`` is a compile-time
 * constant where the caller passes a literal (always_inline), so the row loops have known trip counts; a
 * row that is not float32 is decoded once into kt for all g heads. With an exact tail (tk, tv: Q8_0 rows), keys
 * tf <= t < len are its rows trow + t % bs instead of the pool's. */
static inline __attribute__((always_inline)) void attend_task(
        const float *qb, const void *k_pool, const void *v_pool, int kv_type, const int64_t *tab, int64_t st,
        int64_t len, int h, int g, const int hd, int bs, int num_blocks, size_t L, float scale, float softcap, float *s, float *ob,
        const void *tk, const void *tv, int64_t tf, int64_t trow) {
    float kt[hd];
    for (int i = 0; i < g * hd; i++) ob[i] = 0.f;
    if (len <= st) return;
    const int64_t pend = tk ? tf : len, t0 = pend > st ? pend : st;
/* each key row in order: the pool's (st <= t < pend), then the exact tail's (t0 <= t < len), decoded, through ROW */
#define EACH_ROW(pool, tail, ROW)                                                          \
    KV_ROWS(tab, st, pend, h, bs, num_blocks, t, r) {                                      \
        const float *x = kv_row(pool, kv_type, r, hd, kt);                                 \
        ROW(t, x)                                                                          \
    }                                                                                      \
    for (int64_t t = t0; t < len; t++) {                                                   \
        const float *x = kv_row(tail, AK_KV_Q8_0, (size_t)(trow + t % bs), hd, kt);       \
        ROW(t, x)                                                                          \
    }
    EACH_ROW(k_pool, tk, SCORE_ROW)
    for (int gi = 0; gi < g; gi++) {
        if (softcap > 0.f) softcap_scores(s + (size_t)gi * L + st, len - st, softcap);
        softmax(s + (size_t)gi * L + st, len - st);
    }
    EACH_ROW(v_pool, tv, ADD_ROW)
#undef EACH_ROW
}
#undef SCORE_ROW
#undef ADD_ROW

#ifdef __AVX512F__
/* row r of a pool of type KV as HD floats in HD / 16 registers, as kv_row decodes it: read in place (float32),
 * widened from halves, or d·q of each Q8_0 / Q4_0 block (KV a literal at every call: one branch is compiled) */
AK_INLINE void row512(const void *pool, const int KV, size_t r, const int HD, __m512 *o) {
    const uint8_t *row = (const uint8_t *)pool + r * ak_kv_row_bytes(KV, HD);
    for (int i = 0; i < HD / 16; i++) {
        if (KV == AK_KV_F32) o[i] = _mm512_loadu_ps((const float *)row + 16 * i);
        else if (KV == AK_KV_F16) o[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)row + i));
        else if (KV == AK_KV_Q8_0) {
            const uint8_t *b = row + 34 * (i / 2);
            o[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2 + 16 * (i % 2))))),
                                 _mm512_set1_ps(ld_half(b)));
        } else { /* Q4_0: elements 0-15 the low nibbles, 16-31 the high ones, minus 8 */
            const uint8_t *b = row + 18 * (i / 2);
            __m128i q = _mm_loadu_si128((const __m128i *)(b + 2));
            if (i % 2) q = _mm_srli_epi16(q, 4);
            q = _mm_sub_epi8(_mm_and_si128(q, _mm_set1_epi8(15)), _mm_set1_epi8(8));
            o[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(ld_half(b)));
        }
    }
}

/* sg[0 .. n) ← softmax(sg) (soft-capped first where softcap > 0), 16 scores at a time from sg[0] */
static inline void softmax512(float *sg, int64_t n, float softcap) {
    if (softcap > 0.f) softcap_scores(sg, n, softcap);
    __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, m, sg + t));
    }
    const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + t), vmx));
        _mm512_mask_storeu_ps(sg + t, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
        _mm512_mask_storeu_ps(sg + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sg + t), inv));
    }
}

/* attend_task for HD = 64 or 128 in AVX-512 over pools of type KV: K and V rows decoded once into registers (V once
 * a pass), the softmax 16 scores at a time, and the output rows of up to 4 (HD 64) or 2 (HD 128) query heads a pass
 * accumulated in registers across the keys */
AK_INLINE void attend_task512(const float *qb, const void *k_pool, const void *v_pool, const int KV, const int64_t *tab,
                              int64_t st, int64_t len, int h, int g, const int HD, int bs, int num_blocks, size_t L,
                              float scale, float softcap, float *s, float *ob) {
    enum { GMAX = 4 };
    const int GB = HD == 64 ? 4 : 2; /* heads a pass over V: GB · HD/16 accumulators + HD/16 for the row */
    for (int i = 0; i < g * HD; i++) ob[i] = 0.f;
    if (len <= st) return;
    const size_t rb = ak_kv_row_bytes(KV, HD);
    KV_ROWS(tab, st, len, h, bs, num_blocks, t, r) {
        __m512 k[8]; /* fixed sizes, not HD / 16: a variable-length array stays in memory */
        KV_PREFETCH(k_pool, rb, tab, len, h, bs, num_blocks, t, r);
        row512(k_pool, KV, (size_t)r, HD, k);
        for (int gi = 0; gi < g; gi++) {
            const float *qg = qb + (size_t)gi * HD;
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
            for (int i = 1; i < HD / 16; i++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * i), k[i], a);
            s[(size_t)gi * L + t] = _mm512_reduce_add_ps(a) * scale;
        }
    }
    for (int gi = 0; gi < g; gi++) softmax512(s + (size_t)gi * L + st, len - st, softcap);
    for (int g0 = 0; g0 < g; g0 += GB) {
        const int ng = g - g0 < GB ? g - g0 : GB;
        __m512 acc[GMAX][8];
        for (int a = 0; a < GB; a++)
            for (int i = 0; i < HD / 16; i++) acc[a][i] = _mm512_setzero_ps();
        KV_ROWS(tab, st, len, h, bs, num_blocks, t, r) {
            __m512 v[8];
            KV_PREFETCH(v_pool, rb, tab, len, h, bs, num_blocks, t, r);
            row512(v_pool, KV, (size_t)r, HD, v);
            for (int a = 0; a < ng; a++) {
                const __m512 p = _mm512_set1_ps(s[(size_t)(g0 + a) * L + t]);
                for (int i = 0; i < HD / 16; i++) acc[a][i] = _mm512_fmadd_ps(p, v[i], acc[a][i]);
            }
        }
        for (int a = 0; a < ng; a++)
            for (int i = 0; i < HD / 16; i++) _mm512_storeu_ps(ob + (size_t)(g0 + a) * HD + 16 * i, acc[a][i]);
    }
}
/* ---- several query rows of one sequence at a time: a prompt's chunk, a speculative verification. Rows at
 * consecutive positions (lens l, l + 1, …, one start, one block table) share each K and V row decoded, and their
 * scores come out 16 keys at a time. A row's result is bit for bit attend_task512's for it alone: each score the
 * same products summed in the same order (reduce16 pairs a key's 16 lanes as _mm512_reduce_add_ps does), the same
 * softmax (softmax512), each output the same chain of FMAs over the keys in order. */
enum { TILE_ROWS = 16, TILE_SCORES = 1 << 20 }; /* rows a tile (fewer where their scores would pass TILE_SCORES floats) */

/* a[k]: key k's 16 lane sums → lane k: the sum of a[k]'s lanes, paired as _mm512_reduce_add_ps pairs them (lanes
 * j + 8 and j, then j + 4 and j, then 0 + 2 and 1 + 3, then 0 + 1; addition commutes, so only the pairing counts) */
AK_INLINE __m512 reduce16(const __m512 *a) {
    __m512 z[8], w[4], u[2];
    for (int p = 0; p < 8; p++) /* keys 2p, 2p + 1 in lanes 0-7, 8-15: lane j + 8 plus lane j */
        z[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x44), _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xEE));
    for (int p = 0; p < 4; p++) /* key 4p + i in 128-bit lane i: element j + 4 plus element j */
        w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * p], z[2 * p + 1], 0x88), _mm512_shuffle_f32x4(z[2 * p], z[2 * p + 1], 0xDD));
    for (int p = 0; p < 2; p++) /* 128-bit lane i: key 8p + i in elements 0, 1, key 8p + 4 + i in 2, 3 (0 + 2, 1 + 3) */
        u[p] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * p], w[2 * p + 1], 0x44), _mm512_shuffle_ps(w[2 * p], w[2 * p + 1], 0xEE));
    /* 0 + 1: element e of 128-bit lane i holds key 4e + i */
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

/* key t's row of KV head h in a pool */
static inline size_t pool_row(const int64_t *tab, int64_t t, int h, int bs, int num_blocks) {
    return (size_t)(((int64_t)h * num_blocks + tab[t / bs]) * bs + t % bs);
}

/* nq rows of one sequence (row ρ: queries q + ρ·nh·HD, its g heads of KV head h at + gi·HD; keys st .. lens[ρ] − 1,
 * lens[ρ] = lens[0] + ρ) → out alike. s: nq · g · LS scores (LS ≥ lens[nq − 1] − st rounded up to 16); kbuf: 16 · HD
 * floats, 64-byte aligned. */
AK_INLINE void attend_tile512(const float *q, const void *k_pool, const void *v_pool, const int KV, const int64_t *tab,
                              int64_t st, const int64_t *lens, int nq, int h, int g, int nh, const int HD, int bs,
                              int num_blocks, float scale, float softcap, float *s, size_t LS, float *kbuf, float *out) {
    const int64_t end = lens[nq - 1];
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = st; t0 < end; t0 += 16) {
        for (int k = 0; k < 16; k++) {
            __m512 kr[8];
            if (t0 + k < end) row512(k_pool, KV, pool_row(tab, t0 + k, h, bs, num_blocks), HD, kr);
            else
                for (int i = 0; i < HD / 16; i++) kr[i] = _mm512_setzero_ps();
            for (int i = 0; i < HD / 16; i++) _mm512_store_ps(kbuf + k * HD + 16 * i, kr[i]);
        }
        for (int rho = 0; rho < nq; rho++) {
            if (lens[rho] <= t0) continue;
            for (int gi = 0; gi < g; gi++) {
                const float *qg = q + (size_t)rho * nh * HD + (size_t)gi * HD;
                __m512 qv[8], a[16];
                for (int i = 0; i < HD / 16; i++) qv[i] = _mm512_loadu_ps(qg + 16 * i);
                for (int k = 0; k < 16; k++) {
                    __m512 acc = _mm512_mul_ps(qv[0], _mm512_load_ps(kbuf + k * HD));
                    for (int i = 1; i < HD / 16; i++) acc = _mm512_fmadd_ps(qv[i], _mm512_load_ps(kbuf + k * HD + 16 * i), acc);
                    a[k] = acc;
                }
                _mm512_storeu_ps(s + ((size_t)rho * g + gi) * LS + (size_t)(t0 - st), _mm512_mul_ps(reduce16(a), vscale));
            }
        }
    }
    for (int rho = 0; rho < nq; rho++)
        for (int gi = 0; gi < g; gi++) softmax512(s + ((size_t)rho * g + gi) * LS, lens[rho] - st, softcap);
    /* the outputs, GB (row, head) pairs a pass over V, pairs in row order (their key counts never fall); a pass short
     * of GB pairs repeats its last, so the loops over pairs have a fixed count */
    const int GB = HD == 64 ? 6 : 3, np = nq * g;
    for (int p0 = 0; p0 < np; p0 += GB) {
        const float *ps[6];
        int64_t plen[6];
        __m512 acc[6][8];
        for (int a = 0; a < GB; a++) {
            const int pr = p0 + a < np ? p0 + a : np - 1;
            ps[a] = s + (size_t)pr * LS - st, plen[a] = lens[pr / g];
            for (int i = 0; i < HD / 16; i++) acc[a][i] = _mm512_setzero_ps();
        }
        const int64_t all = plen[0], last = plen[GB - 1];
        KV_ROWS(tab, st, last, h, bs, num_blocks, t, r) {
            __m512 v[8];
            row512(v_pool, KV, (size_t)r, HD, v);
            if (t < all)
                for (int a = 0; a < GB; a++) {
                    const __m512 p = _mm512_set1_ps(ps[a][t]);
                    for (int i = 0; i < HD / 16; i++) acc[a][i] = _mm512_fmadd_ps(p, v[i], acc[a][i]);
                }
            else
                for (int a = 0; a < GB; a++)
                    if (t < plen[a]) {
                        const __m512 p = _mm512_set1_ps(ps[a][t]);
                        for (int i = 0; i < HD / 16; i++) acc[a][i] = _mm512_fmadd_ps(p, v[i], acc[a][i]);
                    }
        }
        for (int a = 0; a < GB && p0 + a < np; a++) {
            float *o = out + (size_t)((p0 + a) / g) * nh * HD + (size_t)((p0 + a) % g) * HD;
            for (int i = 0; i < HD / 16; i++) _mm512_storeu_ps(o + 16 * i, acc[a][i]);
        }
    }
}
#endif


#if defined(AK_AVX2)
/* floats 8i .. 8i + 7 of pool row r (HD values of KV) as kv_row decodes them: read in place (float32), widened
 * from halves, or d·q of a Q8_0 / Q4_0 block (KV a literal at every call: one branch is compiled) */
AK_INLINE __m256 row8(const void *pool, const int KV, size_t r, const int HD, int i) {
    const uint8_t *row = (const uint8_t *)pool + r * ak_kv_row_bytes(KV, HD);
    if (KV == AK_KV_F32) return _mm256_loadu_ps((const float *)row + 8 * i);
    if (KV == AK_KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)row + i));
    if (KV == AK_KV_Q8_0) {
        const uint8_t *b = row + 34 * (i / 4);
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * (i % 4))))),
                             _mm256_set1_ps(ld_half(b)));
    }
    const uint8_t *b = row + 18 * (i / 4); /* Q4_0: elements 0-15 the low nibbles, 16-31 the high ones, minus 8 */
    __m128i q = _mm_loadl_epi64((const __m128i *)(b + 2 + 8 * (i % 2)));
    if (i % 4 >= 2) q = _mm_srli_epi16(q, 4);
    q = _mm_sub_epi8(_mm_and_si128(q, _mm_set1_epi8(15)), _mm_set1_epi8(8));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(ld_half(b)));
}

/* attend_task for HD = 64 or 128 in AVX2 over pools of type KV: a K row decoded once into registers for the g
 * heads, the softmax 8 scores at a time, and one query head's output row accumulated in registers across the keys
 * (on AVX-512 machines too, for the exact tails attend_task512 does not read) */
AK_INLINE void attend_task_avx2(const float *qb, const void *k_pool, const void *v_pool, const int KV,
                                const int64_t *tab, int64_t st, int64_t len, int h, int g, const int HD, int bs,
                                int num_blocks, size_t L, float scale, float softcap, float *s, float *ob,
                                const void *tk, const void *tv, int64_t tf, int64_t trow) {
    if (len <= st) {
        for (int i = 0; i < g * HD; i++) ob[i] = 0.f;
        return;
    }
    const int64_t pend = tk ? tf : len; /* keys pend <= t < len: Q8_0 rows of the exact tail, row trow + t % bs */
#define SCORE_ROW(POOL, KIND, R, T)                                                                              \
    {                                                                                                          \
        __m256 k[16]; /* fixed sizes, not HD / 8 (see attend_task512) */                                       \
        for (int i = 0; i < HD / 8; i++) k[i] = row8(POOL, KIND, R, HD, i);                                    \
        for (int gi = 0; gi < g; gi++) {                                                                       \
            const float *qg = qb + (size_t)gi * HD;                                                            \
            __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(qg), k[0]), a1 = _mm256_mul_ps(_mm256_loadu_ps(qg + 8), k[1]); \
            for (int i = 2; i < HD / 8; i += 2) {                                                              \
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * i), k[i], a0);                                    \
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * i + 8), k[i + 1], a1);                            \
            }                                                                                                  \
            s[(size_t)gi * L + (T)] = hsum(_mm256_add_ps(a0, a1)) * scale;                                     \
        }                                                                                                      \
    }
    KV_ROWS(tab, st, pend, h, bs, num_blocks, t, r) SCORE_ROW(k_pool, KV, r, t)
    for (int64_t t = pend > st ? pend : st; t < len; t++) SCORE_ROW(tk, AK_KV_Q8_0, (size_t)(trow + t % bs), t)
#undef SCORE_ROW
    for (int gi = 0; gi < g; gi++) {
        if (softcap > 0.f) softcap_scores(s + (size_t)gi * L + st, len - st, softcap);
        softmax(s + (size_t)gi * L + st, len - st);
    }
    for (int gi = 0; gi < g; gi++) {
        __m256 acc[16];
        for (int i = 0; i < HD / 8; i++) acc[i] = _mm256_setzero_ps();
        const float *sg = s + (size_t)gi * L;
        KV_ROWS(tab, st, pend, h, bs, num_blocks, t, r) {
            const __m256 p = _mm256_set1_ps(sg[t]);
            for (int i = 0; i < HD / 8; i++) acc[i] = _mm256_fmadd_ps(p, row8(v_pool, KV, r, HD, i), acc[i]);
        }
        for (int64_t t = pend > st ? pend : st; t < len; t++) {
            const __m256 p = _mm256_set1_ps(sg[t]);
            for (int i = 0; i < HD / 8; i++)
                acc[i] = _mm256_fmadd_ps(p, row8(tv, AK_KV_Q8_0, (size_t)(trow + t % bs), HD, i), acc[i]);
        }
        for (int i = 0; i < HD / 8; i++) _mm256_storeu_ps(ob + (size_t)gi * HD + 8 * i, acc[i]);
    }
}
#endif

/* TASK(KV, HD) for the call's kv_type, KV a literal in each case (one branch of the row decoding compiled) */
#define BY_KV(TASK, HD)                               \
    switch (kv_type) {                                \
        case AK_KV_F32: TASK(AK_KV_F32, HD); break;   \
        case AK_KV_F16: TASK(AK_KV_F16, HD); break;   \
        case AK_KV_Q8_0: TASK(AK_KV_Q8_0, HD); break; \
        default: TASK(AK_KV_Q4_0, HD);                \
    }

/* query row b's g heads of KV head h over its keys starts[b] .. lens[b] − 1 (s: g · L scores) */
static void attend_row(const float *q, const void *k_pool, const void *v_pool, int kv_type, const int64_t *tables,
                       const int64_t *lens, const int64_t *starts, float *out, int b, int h, int nh, int g, int hd, int bs,
                       int num_blocks, int max_nb, float scale, float *s, const ak_kv_tail *tail, float softcap) {
    const size_t L = (size_t)max_nb * bs;
    const float *qb = q + ((size_t)b * nh + (size_t)h * g) * hd;
    float *ob = out + ((size_t)b * nh + (size_t)h * g) * hd;
    const int64_t *tab = tables + (size_t)b * max_nb;
    const int64_t st = starts[b], len = lens[b];
    const int slot = tail && tail->slot[b] >= 0 ? (int)tail->slot[b] : -1;
    const void *tk = slot >= 0 ? tail->k : NULL, *tv = slot >= 0 ? tail->v : NULL;
    const int64_t tf = slot >= 0 ? tail->from[b] : len, trow = ((int64_t)h * (slot >= 0 ? tail->slots : 0) + slot) * bs;
#ifdef __AVX512F__
#define TASK512(KV, HD) attend_task512(qb, k_pool, v_pool, KV, tab, st, len, h, g, HD, bs, num_blocks, L, scale, softcap, s, ob)
    if (hd == 64 && !tk) BY_KV(TASK512, 64) /* the AVX-512 kernel; an exact tail's rows: AVX2's below */
    else if (hd == 128 && !tk) BY_KV(TASK512, 128)
    else
#undef TASK512
#endif
#if defined(AK_AVX2)
#define AVX2_TASK(KV, HD) \
    attend_task_avx2(qb, k_pool, v_pool, KV, tab, st, len, h, g, HD, bs, num_blocks, L, scale, softcap, s, ob, tk, tv, tf, trow)
    if (hd == 64) BY_KV(AVX2_TASK, 64)
    else if (hd == 128) BY_KV(AVX2_TASK, 128)
    else
#undef AVX2_TASK
#endif
    if (hd == 64)
        attend_task(qb, k_pool, v_pool, kv_type, tab, st, len, h, g, 64, bs, num_blocks, L, scale, softcap, s, ob, tk, tv, tf, trow);
    else if (hd == 128)
        attend_task(qb, k_pool, v_pool, kv_type, tab, st, len, h, g, 128, bs, num_blocks, L, scale, softcap, s, ob, tk, tv, tf, trow);
    else
        attend_task(qb, k_pool, v_pool, kv_type, tab, st, len, h, g, hd, bs, num_blocks, L, scale, softcap, s, ob, tk, tv, tf, trow);
}

#ifdef __AVX512F__
/* 1 when row b + 1 continues row b's sequence one position on: the same start and blocks, no exact tail */
static int next_position(const int64_t *tables, const int64_t *lens, const int64_t *starts, int b, int bs, int max_nb,
                         const ak_kv_tail *tail) {
    if (starts[b + 1] != starts[b] || lens[b + 1] != lens[b] + 1 || lens[b] <= starts[b]) return 0;
    if (tail && (tail->slot[b] >= 0 || tail->slot[b + 1] >= 0)) return 0;
    const int64_t nb = (lens[b + 1] + bs - 1) / bs;
    if (nb > max_nb) return 0;
    return memcmp(tables + (size_t)b * max_nb, tables + (size_t)(b + 1) * max_nb, sizeof(int64_t) * (size_t)nb) == 0;
}
#endif

/* 0, or 1 (nh % nkv), 2 (out of memory), 3 (a quantized kv_type and hd % 32), 4 (an unknown kv_type) */
static int paged_attention(const float *q, const void *k_pool, const void *v_pool, int kv_type, const int64_t *tables,
                           const int64_t *lens, const int64_t *starts, float *out, int B, int nh, int nkv, int hd,
                           int bs, int num_blocks, int max_nb, float scale, float *scratch, int threads,
                           const ak_kv_tail *tail, float softcap) {
    if (nh % nkv != 0) return 1;
    if (kv_type < AK_KV_F32 || kv_type > AK_KV_Q4_0) return 4;
    if (!ak_kv_row_bytes(kv_type, hd)) return 3;
    const int g = nh / nkv;
    const size_t L = (size_t)max_nb * bs;
    int *first = NULL, ntiles = B; /* tile i: rows first[i] .. first[i + 1] − 1 (one row each without tiles) */
#ifdef __AVX512F__
    const size_t LS = (L + 15) / 16 * 16; /* a tile row's scores for each of its g heads */
    int most = (int)(TILE_SCORES / ((size_t)g * LS));
    most = most > TILE_ROWS ? TILE_ROWS : most;
    if ((hd == 64 || hd == 128) && B > 1 && most >= 2) {
        if (!(first = malloc(sizeof(int) * ((size_t)B + 1)))) return 2;
        ntiles = 0;
        for (int b = 0; b < B; b++)
            if (b == 0 || b - first[ntiles - 1] >= most || !next_position(tables, lens, starts, b - 1, bs, max_nb, tail))
                first[ntiles++] = b;
        first[ntiles] = B;
    }
#endif
    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && ntiles * nkv > 1)
    for (int task = 0; task < ntiles * nkv; task++) {
        const int ti = task / nkv, h = task % nkv, b0 = first ? first[ti] : ti, nq = first ? first[ti + 1] - b0 : 1;
        if (nq == 1) {
            attend_row(q, k_pool, v_pool, kv_type, tables, lens, starts, out, b0, h, nh, g, hd, bs, num_blocks, max_nb,
                       scale, scratch + (size_t)omp_get_thread_num() * g * L, tail, softcap);
            continue;
        }
#ifdef __AVX512F__
        static __thread float *buf; /* this thread's scores and decoded keys, grown and kept */
        static __thread size_t cap;
        const size_t need = (size_t)most * g * LS + 16 * 128;
        if (cap < need) {
            free(buf);
            buf = aligned_alloc(64, (need * sizeof(float) + 63) / 64 * 64);
            cap = buf ? need : 0;
        }
        if (!buf) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        const float *qt = q + ((size_t)b0 * nh + (size_t)h * g) * hd;
        float *ot = out + ((size_t)b0 * nh + (size_t)h * g) * hd;
        const int64_t *tab = tables + (size_t)b0 * max_nb;
        float *kbuf = buf + (size_t)most * g * LS;
#define TILE512(KV, HD) attend_tile512(qt, k_pool, v_pool, KV, tab, starts[b0], lens + b0, nq, h, g, nh, HD, bs, num_blocks, \
                                       scale, softcap, buf, LS, kbuf, ot)
        if (hd == 64) BY_KV(TILE512, 64)
        else BY_KV(TILE512, 128)
#undef TILE512
#endif
    }
    free(first);
    return failed ? 2 : 0;
}
#undef BY_KV

/* the paged attention over pools of kv_type (AK_KV_*: float32, float16, Q8_0 or Q4_0 rows), tail: NULL or the
 * exact blocks (ak_kv_tail); softcap > 0: the scores s ← tanh(s / softcap) · softcap before the softmax (Gemma 2) */
int ak_paged_attention_kv(const float *q, const void *k_pool, const void *v_pool, int kv_type, const int64_t *tables,
                          const int64_t *lens, const int64_t *starts, float *out, int B, int nh, int nkv, int hd,
                          int bs, int num_blocks, int max_nb, float scale, float *scratch, int threads,
                          const ak_kv_tail *tail, float softcap) {
    return paged_attention(q, k_pool, v_pool, kv_type, tables, lens, starts, out, B, nh, nkv, hd, bs, num_blocks,
                           max_nb, scale, scratch, threads, tail, softcap);
}
