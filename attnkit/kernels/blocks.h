/* What attnkit's kernel files share: the GGUF block layouts, the activation blocks, fp16 widening, and the
 * four-row interleaved products (interleaved.c) that ak_gemv and ak_dequantize dispatch to. */
#ifndef AK_BLOCKS_H
#define AK_BLOCKS_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__)
#define AK_AVX2 1
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef struct { uint16_t d, m; uint8_t qs[16]; } block_q4_1;
typedef struct { uint16_t d; int8_t qs[32]; } block_q8_0;
typedef struct { float d, s; int8_t qs[32]; } block_q8x; /* activations */

static inline float half_to_float(uint16_t h) {
#ifdef AK_AVX2
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

#endif

/* kinds: 0 = Q4_1, 1 = Q8_0 in GGUF's row layout; 2, 3 = the same blocks with rows interleaved in fours */
enum { AK_Q4_1 = 0, AK_Q8_0 = 1, AK_Q4_1X4 = 2, AK_Q8_0X4 = 3 };

int ak_x4_available(void);
void gemv_x4(int kind, const void *w, const block_q8x *xq, float *y, int m, int n, int nb, int threads);
/* where one block's fields are: fp16 scale d, fp16 min m (Q4_1; 0 for Q8_0) and its quants */
typedef struct { uint16_t d, m; const uint8_t *qs; } ak_fields;
#define Q4X4_BYTES 80  /* a block column of four Q4_1 rows: d[4], m[4], qs[4][16] */
#define Q8X4_BYTES 136 /* of four Q8_0 rows: d[4], qs[4][32] */

/* the fields of block b of row j of an x4 matrix, read in place (for dequantization) */
static inline ak_fields x4_fields(int kind, const void *w, int j, int b, int nb) {
    const int q4 = kind == AK_Q4_1X4, r = j % 4;
    const uint8_t *col = (const uint8_t *)w + ((size_t)(j / 4) * nb + b) * (q4 ? Q4X4_BYTES : Q8X4_BYTES);
    ak_fields f;
    memcpy(&f.d, col + 2 * r, 2);
    if (q4) memcpy(&f.m, col + 8 + 2 * r, 2);
    else f.m = 0;
    f.qs = q4 ? col + 16 + 16 * r : col + 8 + 32 * r;
    return f;
}

#endif
