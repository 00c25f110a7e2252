/* attnkit's C kernels for CPU decode steps: matrix-vector products straight on GGUF Q4_1 / Q8_0
 * blocks (attnkit/quant/native.py) and paged decode attention (attnkit/engine/paged_attention.py).
 *
 * y[m, n] = sum_k x[m, k] * W[n, k], W kept in the checkpoint's own blocks of 32 weights:
 *   Q4_1: w = d * q + min,  q in 0..15   (20 bytes: fp16 d, fp16 min, 16 bytes of nibbles)
 *   Q8_0: w = d * q,        q in -128..127 (34 bytes: fp16 d, 32 int8)
 * The activations are quantized the same way, per block of 32: x = dx * qx (qx int8), with
 * sx = dx * sum(qx) kept for Q4_1's min term. One block's dot product is then integer:
 *   Q4_1: sum w*x = d*dx * sum(q*qx) + min * sx
 *   Q8_0: sum w*x = d*dx * sum(q*qx)
 * as llama.cpp does (ggml-quants.c, vec_dot_q4_1_q8_1 / vec_dot_q8_0_q8_0). A decode step reads
 * 4.5 (Q4_1) or 8.5 (Q8_0) bits per weight instead of 32 and multiplies in 8-bit integers.
 *
 * Built at run time by attnkit/kernels/__init__.py with the machine's own instruction set
 * (-march=native): AVX-512 VNNI or AVX-VNNI when present, else AVX2, else portable C.
 */
#include "blocks.h"

/* x (k floats, k % 32 == 0) -> k/32 activation blocks: q = round-to-nearest-even(x / d), d = max|x| / 127 */
static void quantize_row(const float *x, block_q8x *y, int k) {
    for (int b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
#ifdef __AVX512F__ /* the same values: max and products are exact or identically rounded, cvtps rounds as lrintf */
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id)));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)y[b].qs, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(y[b].qs + 16), _mm512_cvtepi32_epi8(q1));
        const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
        float amax = 0.f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int i = 0; i < 32; i++) { int q = (int)lrintf(xb[i] * id); y[b].qs[i] = (int8_t)q; sum += q; }
#endif
        y[b].d = d; y[b].s = d * (float)sum;
    }
}

#ifdef AK_AVX2
static inline __m256i dot_u8s8(__m256i u, __m256i s) { /* 8 int32 lanes of sums of u*s */
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
#endif

static float dot_q4_1(const block_q4_1 *w, const block_q8x *x, int nb) {
#ifdef AK_AVX2
    __m256 acc = _mm256_setzero_ps();
    float summ = 0.f;
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int b = 0; b < nb; b++) {
        __m128i q = _mm_loadu_si128((const __m128i *)w[b].qs);
        __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
        __m256i s = _mm256_loadu_si256((const __m256i *)x[b].qs);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, s)), _mm256_set1_ps(half_to_float(w[b].d) * x[b].d), acc);
        summ += half_to_float(w[b].m) * x[b].s;
    }
    return hsum(acc) + summ;
#else
    float sum = 0.f;
    for (int b = 0; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < 16; j++)
            isum += (w[b].qs[j] & 0x0f) * x[b].qs[j] + (w[b].qs[j] >> 4) * x[b].qs[j + 16];
        sum += half_to_float(w[b].d) * x[b].d * (float)isum + half_to_float(w[b].m) * x[b].s;
    }
    return sum;
#endif
}

#ifdef AK_AVX2
/* four Q4_1 rows against one activation row: each activation block is loaded once for four rows */
static void dot4_q4_1(const block_q4_1 *w0, size_t stride, const block_q8x *x, int nb, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float summ[4] = {0.f, 0.f, 0.f, 0.f};
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int b = 0; b < nb; b++) {
        const __m256i s = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const float dx = x[b].d, sx = x[b].s;
        for (int r = 0; r < 4; r++) {
            const block_q4_1 *blk = (const block_q4_1 *)((const char *)w0 + r * stride) + b;
            __m128i q = _mm_loadu_si128((const __m128i *)blk->qs);
            __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, s)), _mm256_set1_ps(half_to_float(blk->d) * dx), acc[r]);
            summ[r] += half_to_float(blk->m) * sx;
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum(acc[r]) + summ[r];
}
#endif

#ifdef AK_AVX2
/* four Q8_0 rows against one activation row (the output head: 49,152 rows), as dot4_q4_1 */
static void dot4_q8_0(const block_q8_0 *w0, size_t stride, const block_q8x *x, int nb, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        const __m256i s = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const float dx = x[b].d;
        for (int r = 0; r < 4; r++) {
            const block_q8_0 *blk = (const block_q8_0 *)((const char *)w0 + r * stride) + b;
            const __m256i q = _mm256_loadu_si256((const __m256i *)blk->qs);
            const __m256i p = dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(s, q));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(half_to_float(blk->d) * dx), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum(acc[r]);
}
#endif

static float dot_q8_0(const block_q8_0 *w, const block_q8x *x, int nb) {
#ifdef AK_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)w[b].qs);
        __m256i s = _mm256_loadu_si256((const __m256i *)x[b].qs);
        /* unsigned x signed: |q| times s with q's sign moved onto s */
        __m256i p = dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(s, q));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(half_to_float(w[b].d) * x[b].d), acc);
    }
    return hsum(acc);
#else
    float sum = 0.f;
    for (int b = 0; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < 32; j++) isum += w[b].qs[j] * x[b].qs[j];
        sum += half_to_float(w[b].d) * x[b].d * (float)isum;
    }
    return sum;
#endif
}

/* y (m, n) = x (m, k) . W (n, k)^T ; kind 0 = Q4_1, 1 = Q8_0, 2 / 3 = those interleaved in fours (blocks.h);
 * scratch holds m * k/32 activation blocks */
int ak_gemv(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads) {
    if (k % 32 != 0 || m < 1 || n < 1) return 1;
    const int nb = k / 32;
    block_q8x *xq = (block_q8x *)scratch;
#pragma omp parallel for schedule(static) num_threads(threads) if (m >= 4 && threads > 1)
    for (int r = 0; r < m; r++) quantize_row(x + (size_t)r * k, xq + (size_t)r * nb, k);
    if (kind == AK_Q4_1X4 || kind == AK_Q8_0X4) { /* rows interleaved in fours (interleaved.c) */
        if (!ak_x4_available() || n % 4) return 1;
        gemv_x4(kind, w, xq, y, m, n, nb, threads);
        return 0;
    }
    const size_t row_bytes = (size_t)nb * (kind == 0 ? sizeof(block_q4_1) : sizeof(block_q8_0));
    (void)threads;
#ifdef AK_AVX2
    if (n % 4 == 0) { /* rows of W four at a time */
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 64 && threads > 1)
        for (int j = 0; j < n; j += 4) {
            const char *wr = (const char *)w + (size_t)j * row_bytes;
            float o[4];
            for (int r = 0; r < m; r++) {
                if (kind == 0) dot4_q4_1((const block_q4_1 *)wr, row_bytes, xq + (size_t)r * nb, nb, o);
                else dot4_q8_0((const block_q8_0 *)wr, row_bytes, xq + (size_t)r * nb, nb, o);
                for (int t = 0; t < 4; t++) y[(size_t)r * n + j + t] = o[t];
            }
        }
        return 0;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 64 && threads > 1)
    for (int j = 0; j < n; j++) {
        const void *wr = (const char *)w + (size_t)j * row_bytes;
        for (int r = 0; r < m; r++) /* the row of W stays in L1 while every activation row passes */
            y[(size_t)r * n + j] = kind == 0 ? dot_q4_1((const block_q4_1 *)wr, xq + (size_t)r * nb, nb)
                                             : dot_q8_0((const block_q8_0 *)wr, xq + (size_t)r * nb, nb);
    }
    return 0;
}

/* one block of 32 weights -> 32 floats (d·q and d·q + min are exact products of an fp16 and a small
 * integer, so the order of the operations cannot change a value) */
static inline void block_to_floats(int kind, const ak_fields *f, float *o) {
    if (kind == 0) {
        const float d = half_to_float(f->d), mn = half_to_float(f->m);
#ifdef __AVX512F__
        const __m128i q = _mm_loadu_si128((const __m128i *)f->qs), low = _mm_set1_epi8(0x0f);
        const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(mn);
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low))), vd), vm));
        _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low))), vd), vm));
#else
        for (int i = 0; i < 16; i++) {
            o[i] = d * (float)(f->qs[i] & 0x0f) + mn;
            o[i + 16] = d * (float)(f->qs[i] >> 4) + mn;
        }
#endif
    } else {
        const float d = half_to_float(f->d);
        const int8_t *qs = (const int8_t *)f->qs;
#ifdef __AVX512F__
        const __m512 vd = _mm512_set1_ps(d);
        _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qs))), vd));
        _mm512_storeu_ps(o + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16)))), vd));
#else
        for (int i = 0; i < 32; i++) o[i] = d * (float)qs[i];
#endif
    }
}

/* the fields of block b of row j in GGUF's row layout */
static inline ak_fields row_fields(int kind, const void *w, int j, int b, int nb) {
    ak_fields f;
    if (kind == 0) {
        const block_q4_1 *blk = (const block_q4_1 *)w + (size_t)j * nb + b;
        f.d = blk->d, f.m = blk->m, f.qs = blk->qs;
    } else {
        const block_q8_0 *blk = (const block_q8_0 *)w + (size_t)j * nb + b;
        f.d = blk->d, f.m = 0, f.qs = (const uint8_t *)blk->qs;
    }
    return f;
}

/* 32 floats -> 32 bfloat16, rounded to nearest even as torch's .to(torch.bfloat16) (weights are finite) */
static inline void floats_to_bf16(const float *f, uint16_t *h) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    _mm256_storeu_si256((__m256i *)h, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(f)));
    _mm256_storeu_si256((__m256i *)(h + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(f + 16)));
#else
    for (int i = 0; i < 32; i++) {
        uint32_t u;
        memcpy(&u, f + i, 4);
        h[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
#endif
}

/* row j of W into out; x4 a literal at each call (always_inline), so each layout gets its own loop */
static inline __attribute__((always_inline)) void dequantize_row(int kind, int base, const int x4, const void *w,
                                                                 void *out, int bf16, int j, int k) {
    const int nb = k / 32;
    float tmp[32];
    for (int b = 0; b < nb; b++) {
        const size_t at = (size_t)j * k + 32 * (size_t)b;
        const ak_fields f = x4 ? x4_fields(kind, w, j, b, nb) : row_fields(base, w, j, b, nb);
        if (bf16) {
            block_to_floats(base, &f, tmp);
            floats_to_bf16(tmp, (uint16_t *)out + at);
        } else {
            block_to_floats(base, &f, (float *)out + at);
        }
    }
}

/* W (n, k) blocks -> dense (n, k): float32, or bfloat16 when bf16 is set (the dense products of prefill) */
int ak_dequantize(int kind, const void *w, void *out, int bf16, int n, int k, int threads) {
    const int x4 = kind == AK_Q4_1X4 || kind == AK_Q8_0X4, base = x4 ? kind - 2 : kind;
    if (k % 32 != 0 || (x4 && n % 4)) return 1;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int j = 0; j < n; j++) {
        if (x4) dequantize_row(kind, base, 1, w, out, bf16, j, k);
        else dequantize_row(kind, base, 0, w, out, bf16, j, k);
    }
    return 0;
}

int ak_block_bytes(int kind) { return kind == 0 ? (int)sizeof(block_q4_1) : (int)sizeof(block_q8_0); }
int ak_act_block_bytes(void) { return (int)sizeof(block_q8x); }

/* ---- paged decode attention --------------------------------------------------------------------
 * One query token per sequence over its K/V in the block pool, read in place through the block
 * table (no gather copy): out[b, h] = softmax(q[b, h]·K_bᵀ · scale) · V_b over keys start_b ≤ j < len_b.
 *   q, out  (B, nh, hd) float32;  k_pool, v_pool (n_kv, num_blocks, bs, hd) float32, or IEEE halves
 *   for ak_paged_attention_f16 (each row converted to float32 once, for all g heads; float32 sums)
 *   tables  (B, max_nb) int64;    lens, starts (B,) int64;  the g = nh / n_kv query heads of one KV
 *   head share each K/V row read. scratch: threads · g · max_nb · bs floats (the scores).
 */
#include <omp.h>

/* n halves -> floats: 8 at a time with F16C, the rest (and everything without F16C) one by one */
static inline void halves_to_floats(const uint16_t *h, float *f, int n) {
    int i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) f[i] = half_to_float(h[i]);
}

/* row `at` (in elements) of a pool: in place for float32, converted into buf for float16 */
static inline const float *pool_row(const void *pool, int f16, size_t at, int hd, float *buf) {
    if (!f16) return (const float *)pool + at;
    halves_to_floats((const uint16_t *)pool + at, buf, hd);
    return buf;
}

/* where key t of KV head h starts in a pool, in elements, through the sequence's block table */
static inline size_t slot_at(const int64_t *tab, int64_t t, int h, int bs, int num_blocks, int hd) {
    return (((size_t)h * num_blocks + (size_t)tab[t / bs]) * bs + (size_t)(t % bs)) * hd;
}

/* One (sequence, KV head) task: its g query heads against keys st <= t < len. ``hd`` is a compile-time
 * constant where the caller passes a literal (always_inline), so the row loops have known trip counts; a
 * float16 row is widened once into kt for all g heads. */
static inline __attribute__((always_inline)) void attend_task(
        const float *qb, const void *k_pool, const void *v_pool, int f16, const int64_t *tab, int64_t st, int64_t len,
        int h, int g, const int hd, int bs, int num_blocks, size_t L, float scale, float *s, float *ob) {
    float kt[hd];
    for (int i = 0; i < g * hd; i++) ob[i] = 0.f;
    if (len <= st) return;
    for (int64_t t = st; t < len; t++) {
        const size_t at = slot_at(tab, t, h, bs, num_blocks, hd);
        if (f16) halves_to_floats((const uint16_t *)k_pool + at, kt, hd);
        const float *k = f16 ? kt : (const float *)k_pool + at;
        for (int gi = 0; gi < g; gi++) {
            const float *qg = qb + (size_t)gi * hd;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int d = 0; d < hd; d++) acc += qg[d] * k[d];
            s[(size_t)gi * L + t] = acc * scale;
        }
    }
    for (int gi = 0; gi < g; gi++) {
        float *sg = s + (size_t)gi * L, mx = -INFINITY, sum = 0.f;
        for (int64_t t = st; t < len; t++) mx = fmaxf(mx, sg[t]);
        for (int64_t t = st; t < len; t++) { sg[t] = expf(sg[t] - mx); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = st; t < len; t++) sg[t] *= inv;
    }
    for (int64_t t = st; t < len; t++) {
        const size_t at = slot_at(tab, t, h, bs, num_blocks, hd);
        if (f16) halves_to_floats((const uint16_t *)v_pool + at, kt, hd);
        const float *v = f16 ? kt : (const float *)v_pool + at;
        for (int gi = 0; gi < g; gi++) {
            const float p = s[(size_t)gi * L + t];
            float *og = ob + (size_t)gi * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) og[d] += p * v[d];
        }
    }
}

#ifdef __AVX512F__
/* 64 floats of row `at`: read in place (float32) or widened from halves */
static inline void row64(const void *pool, int f16, size_t at, __m512 r[4]) {
    for (int i = 0; i < 4; i++)
        r[i] = f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)pool + at) + i))
                   : _mm512_loadu_ps((const float *)pool + at + 16 * i);
}

/* attend_task for hd = 64 in AVX-512: K and V rows in registers, the softmax 16 scores at a time, and
 * the output rows of up to 4 query heads accumulated in registers across the keys */
static void attend_task64(const float *qb, const void *k_pool, const void *v_pool, int f16, const int64_t *tab,
                          int64_t st, int64_t len, int h, int g, int bs, int num_blocks, size_t L, float scale,
                          float *s, float *ob) {
    for (int i = 0; i < g * 64; i++) ob[i] = 0.f;
    if (len <= st) return;
    for (int64_t t = st; t < len; t++) {
        __m512 k[4];
        row64(k_pool, f16, slot_at(tab, t, h, bs, num_blocks, 64), k);
        for (int gi = 0; gi < g; gi++) {
            const float *qg = qb + (size_t)gi * 64;
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
            for (int i = 1; i < 4; i++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * i), k[i], a);
            s[(size_t)gi * L + t] = _mm512_reduce_add_ps(a) * scale;
        }
    }
    const int64_t n = len - st;
    for (int gi = 0; gi < g; gi++) {
        float *sg = s + (size_t)gi * L + st;
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
    for (int g0 = 0; g0 < g; g0 += 4) {
        const int ng = g - g0 < 4 ? g - g0 : 4;
        __m512 acc[4][4];
        for (int a = 0; a < 4; a++)
            for (int i = 0; i < 4; i++) acc[a][i] = _mm512_setzero_ps();
        for (int64_t t = st; t < len; t++) {
            __m512 v[4];
            row64(v_pool, f16, slot_at(tab, t, h, bs, num_blocks, 64), v);
            for (int a = 0; a < ng; a++) {
                const __m512 p = _mm512_set1_ps(s[(size_t)(g0 + a) * L + t]);
                for (int i = 0; i < 4; i++) acc[a][i] = _mm512_fmadd_ps(p, v[i], acc[a][i]);
            }
        }
        for (int a = 0; a < ng; a++)
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(ob + (size_t)(g0 + a) * 64 + 16 * i, acc[a][i]);
    }
}
#endif

static int paged_attention(const float *q, const void *k_pool, const void *v_pool, int f16, const int64_t *tables,
                           const int64_t *lens, const int64_t *starts, float *out, int B, int nh, int nkv, int hd,
                           int bs, int num_blocks, int max_nb, float scale, float *scratch, int threads) {
    if (nh % nkv != 0) return 1;
    const int g = nh / nkv;
    const size_t L = (size_t)max_nb * bs;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads) if (threads > 1 && B * nkv > 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < nkv; h++) {
            float *s = scratch + (size_t)omp_get_thread_num() * g * L;
            const float *qb = q + ((size_t)b * nh + (size_t)h * g) * hd;
            float *ob = out + ((size_t)b * nh + (size_t)h * g) * hd;
            const int64_t *tab = tables + (size_t)b * max_nb;
#ifdef __AVX512F__
            if (hd == 64)
                attend_task64(qb, k_pool, v_pool, f16, tab, starts[b], lens[b], h, g, bs, num_blocks, L, scale, s, ob);
#else
            if (hd == 64)
                attend_task(qb, k_pool, v_pool, f16, tab, starts[b], lens[b], h, g, 64, bs, num_blocks, L, scale, s, ob);
#endif
            else if (hd == 128)
                attend_task(qb, k_pool, v_pool, f16, tab, starts[b], lens[b], h, g, 128, bs, num_blocks, L, scale, s, ob);
            else
                attend_task(qb, k_pool, v_pool, f16, tab, starts[b], lens[b], h, g, hd, bs, num_blocks, L, scale, s, ob);
        }
    }
    return 0;
}

int ak_paged_attention(const float *q, const float *k_pool, const float *v_pool, const int64_t *tables,
                       const int64_t *lens, const int64_t *starts, float *out, int B, int nh, int nkv, int hd,
                       int bs, int num_blocks, int max_nb, float scale, float *scratch, int threads) {
    return paged_attention(q, k_pool, v_pool, 0, tables, lens, starts, out, B, nh, nkv, hd, bs, num_blocks, max_nb,
                           scale, scratch, threads);
}

int ak_paged_attention_f16(const float *q, const uint16_t *k_pool, const uint16_t *v_pool, const int64_t *tables,
                           const int64_t *lens, const int64_t *starts, float *out, int B, int nh, int nkv, int hd,
                           int bs, int num_blocks, int max_nb, float scale, float *scratch, int threads) {
    return paged_attention(q, k_pool, v_pool, 1, tables, lens, starts, out, B, nh, nkv, hd, bs, num_blocks, max_nb,
                           scale, scratch, threads);
}
