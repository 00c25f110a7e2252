/* attnkit's C kernels for CPU decode steps: matrix-vector products straight on GGUF blocks
 * (attnkit/quant/native.py). The paged decode attention and the quantized KV rows it reads are attention.c's.
 *
 * y[m, n] = Σ_k x[m, k] · W[n, k], W kept in the checkpoint's own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
 * Q5_K, Q6_K). The activations are quantized per weight block (32, or 256 for the K-quants: llama.cpp's q8_0 and
 * q8_K), x = dx·qx (qx int8, dx = max|x|/127), and each block type's product (its kernel file: legacy.c, q8.c,
 * q4_k.c, q6_k.c) multiplies its quants with qx in 8-bit integers and applies the scales in float, as llama.cpp
 * does (ggml-cpu's vec_dot_*). A decode step reads the 4.5–8.5 bits per weight of the blocks instead of 32.
 *
 * The block types are the rows of TYPES (ggml's type traits: block size, bytes, decoding to float, the product
 * per instruction set); ak_gemv, ak_dequantize and ak_dequantize_rows dispatch through them, so a new type is one
 * kernel file and one row here. Built at run time by attnkit/kernels/__init__.py for the machine's instruction
 * set: AVX-512 VNNI (512-bit products on rows interleaved in sixteens), AVX2 (in fours), or portable C.
 *
 * Batch invariance: activation row r's outputs are computed by the same instructions in the same order whatever
 * the number of rows m, the other rows and the thread count (threads split the output columns); with AVX-512 VNNI
 * every type's decode kernel sums in gemm.c's order, and batches of GEMM_ROWS rows or more of a type with a panel
 * take gemm.c's matrix product instead, which gives each row the same bits.
 */
#include <omp.h>
#include <stdlib.h>

#include "blocks.h"
#include "decode.h" /* the KV row formats (ak_kv_row_bytes, ak_float_to_half) */

static const ak_type *const TYPES[] = {&ak_type_q4_0, &ak_type_q4_1, &ak_type_q5_0, &ak_type_q5_1,
                                       &ak_type_q8_0, &ak_type_q4_k, &ak_type_q5_k, &ak_type_q6_k};

/* the table row of a kind (a ggml type id, | AK_X4_FLAG for the interleaved layout), NULL if this build has none */
static const ak_type *find_type(int kind) {
    for (size_t i = 0; i < sizeof TYPES / sizeof *TYPES; i++)
        if (TYPES[i]->id == (kind & ~AK_X4_FLAG))
            return (kind & AK_X4_FLAG) && !TYPES[i]->dot_x4 ? NULL : TYPES[i];
    return NULL;
}

const ak_type *ak_find_type(int kind) { return find_type(kind); }

/* activation rows from which ak_gemv hands a type with a panel (Q6_K, Q8_0 and the 32-weight types, interleaved in
 * sixteens) to gemm.c's product, the same bits: Q8_0's panels took 0.87× its decode kernel's time at 512 rows of a
 * 1B's 8192×2048, the same at 64, more below; Q6_K's 0.77× at 512, 0.87× at 64 (Zen 5, 2 threads;
 * docs/performance.md, session 23). Q4_K and Q5_K never: their decode kernel is that product's arithmetic on the
 * weights as they lie, ahead of unpacking them at every row count (0.61× the time at 16 rows, 0.84× at 64, 0.93× at
 * 512). */
enum { GEMM_ROWS = 64 };
/* ak_gemv's chunk of row groups that 4 activation rows pass before the next 4: within half of a 1 MiB L2 (32 groups of
 * 16 Q8_0 rows of 2048 inputs took 1.1 MB and ran 1.2–1.4× slower at 6–16 rows than chunks of 15; Zen 5); a quarter
 * where the passes also bring the next chunk in (ak_side: 128–256 KB chunks then ran 2–9% faster than 384–512 KB
 * ones at 6–16 rows; at 512 rows, without the side stream, 256 KB chunks ran 3% slower than 512 KB; session 25) */
#define CHUNK_BYTES ((size_t)512 << 10)
#define CHUNK_BYTES_SIDE ((size_t)256 << 10)

/* 0 and the block's elements and bytes when this build multiplies `kind`, -1 otherwise */
int ak_type_info(int kind, int *block_elems, int *block_bytes) {
    const ak_type *t = find_type(kind);
    if (!t || (kind & ~(AK_X4_FLAG | 0xff))) return -1;
    if (block_elems) *block_elems = t->block_elems;
    if (block_bytes) *block_bytes = t->block_bytes;
    return 0;
}

/* the interleaved layout's fields (offset, bytes, granule triples; n_max at most), for attnkit.quant.native to
 * check its own packing against; returns how many */
int ak_type_x4_fields(int kind, int *out, int n_max) {
    const ak_type *t = find_type(kind | AK_X4_FLAG);
    int n = 0;
    if (!t) return -1;
    for (const ak_field *f = t->x4_fields; f->granule && n < n_max; f++)
        if (f->bytes) out[3 * n] = f->offset, out[3 * n + 1] = f->bytes, out[3 * n + 2] = f->granule, n++;
    return n;
}

/* rows a group of kind's interleaved layout (4 or 16), -1 where this build has no such layout */
int ak_type_x4_rows(int kind) {
    const ak_type *t = find_type(kind | AK_X4_FLAG);
    return t ? ak_group_rows(t) : -1;
}

int ak_x4_available(void) {
#if defined(AK_X4) || defined(AK_AVX2)
    return 1;
#else
    return 0;
#endif
}

int ak_act_block_bytes(void) { return (int)sizeof(block_q8x); }

/* activation row r of x (k floats, k % g == 0) → its blocks in scratch (act_row), as llama.cpp's x86
 * quantize_row_q8_0 / q8_1 (t's block g = 32) and q8_K (g = 256) make them: per group, q = round-to-nearest-even(x ·
 * 127 / max|x|); for g = 32, d = fp16(max|x| / 127) and s = d·Σq (q8_0) or fp16(max|x| / 127 · Σq) (q8_1, where
 * t->act_q8_1): those formats hold d and s in half precision, and so a GGUF file multiplies here as in llama.cpp
 * (the default model's perplexity moved 0.4% with this rounding; docs/quantization.md, session 31); for g = 256,
 * d = 1 / (127 / max|x|) in float, written as the d of each block of 32, and s = d·Σq per block of 32. Every build
 * computes the same values (max and products are exact or identically rounded; cvtps rounds as lrintf; round_to_half
 * as vcvtps2ph). */
static void quantize_row(const float *x, void *scratch, int r, int k, const ak_type *t) {
    const int g = t->block_elems;
    const ak_act a = act_row(scratch, r, k);
    int8_t *qs = (int8_t *)a.qs;
    float *ds = (float *)a.d, *ss = (float *)a.s;
    for (int g0 = 0; g0 < k; g0 += g) {
        float amax = 0.f;
        int i = 0;
#if defined(__AVX512F__)
        __m512 m16 = _mm512_setzero_ps();
        for (; i < g; i += 16) m16 = _mm512_max_ps(m16, _mm512_abs_ps(_mm512_loadu_ps(x + g0 + i)));
        amax = _mm512_reduce_max_ps(m16);
#elif defined(AK_AVX2)
        const __m256 sign = _mm256_set1_ps(-0.f);
        __m256 m8 = _mm256_setzero_ps();
        for (; i < g; i += 8) m8 = _mm256_max_ps(m8, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + g0 + i)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#endif
        for (; i < g; i++) amax = fmaxf(amax, fabsf(x[g0 + i]));
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        const float d = g == 32 ? amax / 127.f : id > 0.f ? 1.f / id : 0.f; /* q8_0/q8_1's d; q8_K's 1 / iscale */
        for (int b = g0 / 32; b < (g0 + g) / 32; b++) {
            const float *xb = x + 32 * b;
#if defined(__AVX512F__)
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb), _mm512_set1_ps(id)));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16), _mm512_set1_ps(id)));
            _mm_storeu_si128((__m128i *)(qs + 32 * b), _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(qs + 32 * b + 16), _mm512_cvtepi32_epi8(q1));
            const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#elif defined(AK_AVX2)
            __m256i q[4];
            for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), _mm256_set1_ps(id)));
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *)(qs + 32 * b), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            const int sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
#else
            int sum = 0;
            for (int j = 0; j < 32; j++) { int q = (int)lrintf(xb[j] * id); qs[32 * b + j] = (int8_t)q; sum += q; }
#endif
            ds[b] = g == 32 ? round_to_half(d) : d; /* the half's product with an int of < 2^13 is exact */
            ss[b] = t->act_q8_1 ? round_to_half(d * (float)sum) : ds[b] * (float)sum;
        }
    }
}

/* the offsets of scratch row r for t's interleaved product (ak_act.off4, k/4 int32 reserved a row): −offset · the
 * sum of each 4 quants, or for a type interleaved in sixteens of each scale group's (Q6_K: 16) or block's (Q8_0: 32) */
static void row_offsets(const ak_type *t, const void *scratch, int r, int k, int32_t *dst) {
    const int8_t *q = act_row(scratch, r, k).qs;
    const int span = ak_group_rows(t) == 4 ? 4 : t->block_elems == 32 ? 32 : 16; /* in sixteens: a block's or a scale group's */
    for (int g = 0; g < k / span; g++) {
        int sum = 0;
        for (int l = 0; l < span; l++) sum += q[span * g + l];
        dst[g] = -t->offset * sum;
    }
}

/* rows 0 .. m − 1 of scratch (quantized for kind) → off4 (m, k/4): the offsets kind's interleaved product wants
 * (ak_gemv_rows' off4); 0, or 1 for a kind without offsets */
int ak_act_offsets(int kind, const void *scratch, int m, int k, int32_t *off4) {
    const ak_type *t = find_type(kind | AK_X4_FLAG);
    if (!t || !t->offset || k % 16) return 1;
    for (int r = 0; r < m; r++) row_offsets(t, scratch, r, k, off4 + (size_t)r * (k / 4));
    return 0;
}

int ak_gemm_gated(int kind, const void *w, const float *x, float *h, int m, int n, int k, void *scratch, int act, int threads);

/* y (m, n) = x (m, k) · W (n, k)ᵀ for W of block type `kind`; scratch holds m · k/32 activation blocks (40 bytes
 * each). Threads take groups of output rows; each group multiplies activation rows four at a time. act >= 0: W
 * holds 2n rows, a gate's n then an up's n, and y = act(x·W_gateᵀ) ⊙ x·W_upᵀ (ak_act_mul2 on each group's outputs,
 * the gate/up product never in memory). */
static int gemv(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads, int act) {
    const ak_type *t = find_type(kind);
    const int x4 = (kind & AK_X4_FLAG) != 0, R = !t ? 1 : x4 ? ak_group_rows(t) : 1;
    if (!t || m < 1 || n < 1 || k % t->block_elems || n % R) return 1;
    if (x4 && t->panel && m >= GEMM_ROWS && ak_gemm_takes(kind, act >= 0 ? 2 * n : n, k)) /* the same order on its panels */
        return act >= 0 ? ak_gemm_gated(kind, w, x, y, m, n, k, scratch, act, threads) : ak_gemm(kind, w, x, y, m, n, k, scratch, threads);
    const int nb = k / t->block_elems;
    const size_t gbytes = (size_t)R * nb * t->block_bytes;
    const ak_dot_fn dot = x4 ? t->dot_x4 : t->dot;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && m >= 8)
    for (int r = 0; r < m; r++) quantize_row(x + (size_t)r * k, scratch, r, k, t); /* each on its own */
    static __thread int32_t *off4; /* −offset · sums of 4 quants, for the types that want them (grown, kept) */
    static __thread size_t off4_cap;
    const int want_off4 = x4 && t->offset;
    if (want_off4) {
        if (off4_cap < (size_t)m * (k / 4)) {
            int32_t *p = realloc(off4, sizeof(int32_t) * (size_t)m * (k / 4));
            if (!p) return 2;
            off4 = p, off4_cap = (size_t)m * (k / 4);
        }
        for (int r = 0; r < m; r++) row_offsets(t, scratch, r, k, off4 + (size_t)r * (k / 4));
    }
    const int32_t *const sums = want_off4 ? off4 : NULL; /* off4 is this thread's: the workers take the pointer */
    (void)threads;
    /* Each thread takes an equal run of row groups (±1: a whole number of chunks a thread left one thread a chunk
     * more, 5–11% of a 1B's gate/up and down products, the other thread waiting) and goes through it in chunks;
     * within a chunk, each 4 activation rows (in L1) pass all of its groups (in L2) before the next 4, so more than
     * 4 rows are read from memory once per chunk, not once per group. Chunks of up to 32 groups and CHUNK_BYTES, at
     * least 4 a thread; the whole run at once for at most 4 rows (nothing to reuse). */
    /* With more than 4 rows, every pass over a chunk carries a share of the next chunk's prefetches into L2, at an
     * even pace, so that its first pass reads it from cache: the memory is read while the later passes compute
     * (without: the first pass of each chunk waited on memory, the others on arithmetic). At least a line a weight
     * column: on while that covers at most twice the chunk. */
    const size_t col = (size_t)R * t->block_bytes; /* a weight column's bytes */
    const size_t passes = (size_t)(m + 3) / 4;
    const int side_on = x4 && passes > 1 && col >= 32 * passes;
    const size_t chunk_bytes = side_on ? CHUNK_BYTES_SIDE : CHUNK_BYTES;
    const int groups = n / R, per = groups / (4 * (threads > 1 ? threads : 1));
    const int most = gbytes >= chunk_bytes ? 1 : chunk_bytes / gbytes > 32 ? 32 : (int)(chunk_bytes / gbytes);
    const int chunk = m <= 4 ? groups : per < 1 ? 1 : per > most ? most : per;
#pragma omp parallel num_threads(threads) if (n >= 64 && threads > 1)
    {
        const int nt = omp_get_num_threads(), th = omp_get_thread_num();
        const int a = (int)((int64_t)groups * th / nt), b = (int)((int64_t)groups * (th + 1) / nt);
        ak_side side;
        for (int c0 = a; c0 < b; c0 += chunk) {
            const int g1 = b - c0 < chunk ? b : c0 + chunk;
            ak_act xs[4];
            side.p = (const char *)w + (size_t)g1 * gbytes;
            side.per = (int)((col + 64 * passes - 1) / (64 * passes));
            for (int r0 = 0; r0 < m; r0 += 4) {
                const int M = m - r0 < 4 ? m - r0 : 4;
                for (int i = 0; i < M; i++) {
                    xs[i] = act_row(scratch, r0 + i, k);
                    if (sums) xs[i].off4 = sums + (size_t)(r0 + i) * (k / 4);
                }
                xs[0].side = side_on && g1 < b ? &side : NULL;
                if (act < 0)
                    for (int g = c0; g < g1; g++)
                        dot((const uint8_t *)w + (size_t)g * gbytes, nb, xs, M, y + (size_t)r0 * n + (size_t)g * R, (size_t)n);
                else
                    for (int g = c0; g < g1; g++) { /* the group's gate outputs, its up outputs, then act(gate)·up */
                        float gate[4 * 16], up[4 * 16];
                        dot((const uint8_t *)w + (size_t)g * gbytes, nb, xs, M, gate, (size_t)R);
                        dot((const uint8_t *)w + (size_t)(g + groups) * gbytes, nb, xs, M, up, (size_t)R);
                        for (int i = 0; i < M; i++)
                            ak_act_mul2(gate + i * R, up + i * R, y + (size_t)(r0 + i) * n + (size_t)g * R, R, act);
                    }
            }
        }
    }
    return 0;
}

int ak_gemv(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads) {
    return gemv(kind, w, x, y, m, n, k, scratch, threads, -1);
}

/* h (m, n) = act(x·W_gateᵀ) ⊙ x·W_upᵀ, W (2n, k) the gate's rows then the up's (act 0 SiLU, 1 GELU-tanh); each
 * output is ak_gemv's gate and up products' (their bits) through ak_act_mul2 */
int ak_gemv_gated(int kind, const void *w, const float *x, float *h, int m, int n, int k, void *scratch, int act, int threads) {
    return act < 0 || act > 1 ? 1 : gemv(kind, w, x, h, m, n, k, scratch, threads, act);
}

/* ---- products on activation rows quantized once, for a caller that runs many products on the same rows from
 * its own threads (kernels/moe.c: each expert on the rows routed to it). Row r's results are those ak_gemv gives
 * it: the same quantization (ak_quantize_act), the same dot instructions. */

/* m rows of x (k floats each) → scratch rows 0 .. m − 1 (m · k/32 activation blocks), quantized for kind's
 * products as ak_gemv quantizes them; 0, or 1 (a kind this build cannot multiply, or k not a multiple of its block) */
int ak_quantize_act(int kind, const float *x, int m, int k, void *scratch) {
    const ak_type *t = find_type(kind);
    if (!t || k % t->block_elems) return 1;
    for (int r = 0; r < m; r++) quantize_row(x + (size_t)r * k, scratch, r, k, t);
    return 0;
}

/* the quant offset o whose −o · sums of 4 quants (ak_act.off4) kind's product wants, 0 when it wants none, −1 for
 * a kind this build cannot multiply */
int ak_type_offset(int kind) {
    const ak_type *t = find_type(kind);
    return !t ? -1 : kind & AK_X4_FLAG ? t->offset : 0;
}

/* y[i · ystride + j − n0] = W row j · scratch row rows[i] for i < m and n0 <= j < n1 (multiples of the interleaved
 * layout's group rows), on the calling thread. off4: the scratch rows' offsets (ak_act_offsets; k/4 int32 a row,
 * indexed as the scratch), NULL when the type's offset is 0. */
int ak_gemv_rows(int kind, const void *w, int n0, int n1, const void *scratch, const int32_t *off4, const int *rows,
                 int m, int k, float *y, size_t ystride) {
    const ak_type *t = find_type(kind);
    const int x4 = (kind & AK_X4_FLAG) != 0, R = !t ? 1 : x4 ? ak_group_rows(t) : 1;
    if (!t || m < 1 || n0 < 0 || n1 <= n0 || k % t->block_elems || n0 % R || n1 % R ||
        ((x4 && t->offset) != (off4 != NULL)))
        return 1;
    const int nb = k / t->block_elems;
    const size_t gbytes = (size_t)R * nb * t->block_bytes;
    const ak_dot_fn dot = x4 ? t->dot_x4 : t->dot;
    for (int g = n0 / R; g < n1 / R; g++) {
        ak_act xs[4];
        for (int r0 = 0; r0 < m; r0 += 4) {
            const int M = m - r0 < 4 ? m - r0 : 4;
            for (int i = 0; i < M; i++) {
                xs[i] = act_row(scratch, rows[r0 + i], k);
                if (off4) xs[i].off4 = off4 + (size_t)rows[r0 + i] * (k / 4);
            }
            dot((const uint8_t *)w + (size_t)g * gbytes, nb, xs, M, y + (size_t)r0 * ystride + (size_t)(g * R - n0),
                ystride);
        }
    }
    return 0;
}

/* ---- decoding to float32 / bfloat16 */

/* n floats -> n bfloat16, rounded to nearest even as torch's .to(torch.bfloat16) (weights are finite) */
static inline void floats_to_bf16(const float *f, uint16_t *h, int n) {
    int i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(h + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(f + i)));
#endif
    for (; i < n; i++) {
        uint32_t u;
        memcpy(&u, f + i, 4);
        h[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

static inline void copy_granule(uint8_t *d, const uint8_t *s, int g) {
    switch (g) { /* fixed sizes: moves, not calls */
        case 1: *d = *s; break;
        case 2: memcpy(d, s, 2); break;
        case 4: memcpy(d, s, 4); break;
        case 16: memcpy(d, s, 16); break;
        case 32: memcpy(d, s, 32); break;
        default: memcpy(d, s, (size_t)g);
    }
}

/* block b of row j of an interleaved matrix, gathered field by field into buf in GGUF's layout */
static const uint8_t *x4_block(const ak_type *t, const uint8_t *w, int j, int b, int nb, uint8_t *buf) {
    const int R = ak_group_rows(t), r = j % R;
    const uint8_t *col = w + ((size_t)(j / R) * nb + b) * R * t->block_bytes;
    int at = 0;
    for (const ak_field *f = t->x4_fields; f->granule; f++) {
        for (int c = 0; c < f->bytes; c += f->granule) copy_granule(buf + f->offset + c, col + R * (at + c) + r * f->granule, f->granule);
        at += f->bytes;
    }
    return buf;
}

/* count block columns of an interleaved group → its R rows' blocks in GGUF's layout (dst: R rows of count
 * blocks), field by field; the granule's switch is outside the copy loops, so each loop moves a fixed size */
static void x4_columns(const ak_type *t, const uint8_t *col, int count, uint8_t *dst) {
    const int R = ak_group_rows(t);
    const size_t bb = (size_t)t->block_bytes, rb = (size_t)count * bb;
    for (int b = 0; b < count; b++, col += R * bb) {
        int at = 0;
        for (const ak_field *f = t->x4_fields; f->granule; f++) {
#define COPY(G)                                                                                      \
    for (int c = 0; c < f->bytes; c += G)                                                            \
        for (int r = 0; r < R; r++) memcpy(dst + r * rb + b * bb + f->offset + c, col + R * (at + c) + r * G, G);
            switch (f->granule) {
                case 1: COPY(1) break;
                case 2: COPY(2) break;
                case 4: COPY(4) break;
                case 16: COPY(16) break;
                case 32: COPY(32) break;
                default: for (int c = 0; c < f->bytes; c += f->granule)
                        for (int r = 0; r < R; r++) copy_granule(dst + r * rb + b * bb + f->offset + c, col + R * (at + c) + r * f->granule, f->granule);
            }
#undef COPY
            at += f->bytes;
        }
    }
}

enum { CHUNK = 1024 }; /* floats decoded at a time */

/* count blocks (GGUF layout) → out32 (floats) or out16 (bfloat16, through tmp) */
static inline void blocks_out(const ak_type *t, const uint8_t *blocks, int count, float *out32, uint16_t *out16, float *tmp) {
    t->to_float(blocks, count, out16 ? tmp : out32);
    if (out16) floats_to_bf16(tmp, out16, count * t->block_elems);
}

/* rows j0 .. j0 + R − 1 of W (x4: one interleaved group of R rows, else 1 row) → k floats or bfloat16 each, a chunk
 * at a time */
static void dequantize_rows_of(const ak_type *t, int x4, const uint8_t *w, int j0, int nb, float *out32, uint16_t *out16) {
    float tmp[CHUNK];
    uint8_t buf[16 * (CHUNK / 32) * 34]; /* 16 rows of CHUNK weights at <= 34/32 bytes a weight (Q8_0's) */
    const int R = ak_group_rows(t);
    const int be = t->block_elems, per = be >= CHUNK ? 1 : CHUNK / be;
    const size_t k = (size_t)nb * be;
    for (int b = 0; b < nb; b += per) {
        const int cnt = nb - b < per ? nb - b : per;
        if (!x4) {
            blocks_out(t, w + ((size_t)j0 * nb + b) * t->block_bytes, cnt, out32 ? out32 + (size_t)b * be : NULL,
                       out16 ? out16 + (size_t)b * be : NULL, tmp);
            continue;
        }
        if (t->to_float_x4) {
            for (int r = 0; r < R; r++) {
                t->to_float_x4(w + (size_t)(j0 / R) * nb * R * t->block_bytes, r, b, cnt, out16 ? tmp : out32 + r * k + (size_t)b * be);
                if (out16) floats_to_bf16(tmp, out16 + r * k + (size_t)b * be, cnt * be);
            }
            continue;
        }
        x4_columns(t, w + ((size_t)(j0 / R) * nb + b) * R * t->block_bytes, cnt, buf);
        for (int r = 0; r < R; r++)
            blocks_out(t, buf + (size_t)r * cnt * t->block_bytes, cnt, out32 ? out32 + r * k + (size_t)b * be : NULL,
                       out16 ? out16 + r * k + (size_t)b * be : NULL, tmp);
    }
}

/* W (n, k) blocks -> dense (n, k): float32, or bfloat16 when bf16 is set (the dense products of prefill) */
int ak_dequantize(int kind, const void *w, void *out, int bf16, int n, int k, int threads) {
    const ak_type *t = find_type(kind);
    const int x4 = (kind & AK_X4_FLAG) != 0, R = !t ? 1 : x4 ? ak_group_rows(t) : 1;
    if (!t || k % t->block_elems || n % R) return 1;
    const int nb = k / t->block_elems;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int g = 0; g < n / R; g++)
        dequantize_rows_of(t, x4, (const uint8_t *)w, g * R, nb, bf16 ? NULL : (float *)out + (size_t)g * R * k,
                           bf16 ? (uint16_t *)out + (size_t)g * R * k : NULL);
    return 0;
}

/* row j of W → k floats: in place for GGUF's layout, block by block gathered for the interleaved one */
static void dequantize_row(const ak_type *t, int x4, const uint8_t *w, int j, int nb, float *out) {
    uint8_t buf[256];
    if (!x4) {
        t->to_float(w + (size_t)j * nb * t->block_bytes, nb, out);
        return;
    }
    if (t->to_float_x4) {
        const int R = ak_group_rows(t);
        t->to_float_x4(w + (size_t)(j / R) * nb * R * t->block_bytes, j % R, 0, nb, out);
        return;
    }
    for (int b = 0; b < nb; b++) t->to_float(x4_block(t, w, j, b, nb, buf), 1, out + (size_t)b * t->block_elems);
}

/* rows[i] of W (n, k) -> out[i] (nrows, k) float32: token embeddings looked up in a tied head's blocks */
int ak_dequantize_rows(int kind, const void *w, const int64_t *rows, int nrows, float *out, int n, int k) {
    const ak_type *t = find_type(kind);
    const int x4 = (kind & AK_X4_FLAG) != 0;
    if (!t || k % t->block_elems || (x4 && n % ak_group_rows(t))) return 1;
    for (int i = 0; i < nrows; i++)
        if (rows[i] < 0 || rows[i] >= n) return 2;
    for (int i = 0; i < nrows; i++)
        dequantize_row(t, x4, (const uint8_t *)w, (int)rows[i], k / t->block_elems, out + (size_t)i * k);
    return 0;
}
