/* Blocks in GGUF's row layout → rows interleaved in groups of R (4 or 16), field by field
 * (attnkit.quant.native.interleave).
 *
 * For rows R·g .. R·g + R − 1 and block column c, the output holds each field (offset, bytes, granule) of the R
 * rows' blocks in turn, the rows' bytes alternating granule by granule: a permutation of bytes within each
 * group of rows. One pass, memory-bound (the tensor-op version costs several strided copies).
 */
#include <stdint.h>
#include <string.h>

/* one field of R rows' blocks (at: row 0's, rows row_bytes apart) → out, granule by granule, row by row */
static inline __attribute__((always_inline)) void copy_field(uint8_t *out, const uint8_t *at, int row_bytes, int bytes,
                                                             const int gran, int R) {
    for (int q = 0; q < bytes; q += gran)
        for (int r = 0; r < R; r++, out += gran) memcpy(out, at + (size_t)r * row_bytes + q, (size_t)gran);
}

/* src, dst (n, row_bytes) with n % R == 0 (R: 4 or 16); fields: n_fields triples (offset, bytes, granule) of one
 * block */
int ak_interleave(const uint8_t *src, uint8_t *dst, int n, int row_bytes, int block_bytes, const int *fields,
                  int n_fields, int R, int threads) {
    if ((R != 4 && R != 16) || n % R || block_bytes <= 0 || row_bytes % block_bytes) return 1;
    int total = 0;
    for (int f = 0; f < n_fields; f++) {
        const int off = fields[3 * f], bytes = fields[3 * f + 1], gran = fields[3 * f + 2];
        if (off < 0 || bytes <= 0 || gran <= 0 || bytes % gran || off + bytes > block_bytes) return 1;
        total += bytes;
    }
    if (total != block_bytes) return 1;
    const int nb = row_bytes / block_bytes;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int g = 0; g < n / R; g++) {
        const uint8_t *rows = src + (size_t)R * g * row_bytes;
        uint8_t *out = dst + (size_t)R * g * row_bytes;
        for (int c = 0; c < nb; c++) {
            for (int f = 0; f < n_fields; f++) {
                const int off = fields[3 * f], bytes = fields[3 * f + 1], gran = fields[3 * f + 2];
                const uint8_t *at = rows + (size_t)c * block_bytes + off;
                switch (gran) { /* constant sizes: the copies inline */
                    case 1: copy_field(out, at, row_bytes, bytes, 1, R); break;
                    case 2: copy_field(out, at, row_bytes, bytes, 2, R); break;
                    case 4: copy_field(out, at, row_bytes, bytes, 4, R); break;
                    case 16: copy_field(out, at, row_bytes, bytes, 16, R); break;
                    default: copy_field(out, at, row_bytes, bytes, gran, R);
                }
                out += (size_t)R * bytes;
            }
        }
    }
    return 0;
}
