/* The sparse mixture-of-experts FFN of the C decode step (decode.h's ak_moe; attnkit.nn.moe.SparseMoE eagerly).
 *
 * For B rows xn (B, d), as SparseMoE.forward computes them:
 *   p = softmax(W_r · x) in float32; the top_k experts by p (ties: the lower index first, as torch.topk);
 *   w = p, or p / Σ_chosen p (norm_topk);
 *   out = Σ_{e chosen} w_e · down_e(SiLU(gate_e · x) ⊙ up_e · x), each w_e · y rounded, then summed in ascending
 *   e from zero (SparseMoE adds the experts' outputs with index_add_, expert 0 first).
 * The rows are grouped by expert, so each chosen expert's blocks are read once in a step for all the rows that
 * chose it, through ak_gemv on those rows. ak_gemv computes each row by the same instructions whatever rows come
 * with it, and a row's sum runs over its own experts in a fixed order: a row's result does not depend on the other
 * rows of the step (batch invariance).
 *
 * The rows' inputs are quantized to 8 bits once (as ak_gemv quantizes them) and every product of the layer runs
 * on them through ak_gemv_rows (kernels.c) in one parallel region per layer: the threads take tasks (one expert,
 * one matrix, a chunk of its output rows) of the gate/up products, then the assignments' SiLU (quantized for
 * down), then the down products' tasks, then the rows' sums. Each thread takes one contiguous run of the tasks,
 * split by their estimated cost: it then reads each expert's matrix as one stream, which this machine's
 * prefetchers follow (tasks dealt out one at a time, a thread's reads skip a chunk every 37 KB, and a Qwen3-MoE
 * step decoded 20–28% slower). The dot products are the kernels' own (portable, AVX2 and AVX-512 paths).
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "decode.h"

int ak_gemv(int kind, const void *w, const float *x, float *y, int m, int n, int k, void *scratch, int threads);
int ak_quantize_act(int kind, const float *x, int m, int k, void *scratch);
int ak_type_info(int kind, int *block_elems, int *block_bytes);
int ak_type_offset(int kind);
int ak_gemv_rows(int kind, const void *w, int n0, int n1, const void *scratch, const int32_t *off4, const int *rows,
                 int m, int k, float *y, size_t ystride);

enum { CHUNK = 64 }; /* output rows per task: a multiple of 4 (the interleaved layout's groups) */

typedef struct { int e, part, r0, nr; } task; /* part: 0, 1 the gate/up parts; 2 down */

/* the scratch, carved from work in this order (each piece 64-byte aligned) */
typedef struct {
    float *probs;       /* (B, E) router logits, then probabilities */
    float *wts;         /* (B, K) the chosen experts' weights */
    int *chosen, *gpos; /* (B, K) the chosen experts; each choice's place among the grouped assignments */
    int *start, *cur;   /* (E + 1,) where each expert's assignments start; (E,) a cursor */
    int *arow, *iota;   /* (B·K,) the row of each grouped assignment; 0, 1, 2, … */
    float *aw;          /* (B·K,) the weight of each grouped assignment */
    task *tasks;        /* max_tasks */
    uint8_t *qx[2], *qh; /* the rows' inputs quantized for each gate/up part's type (B rows of d; one buffer when
                          * both types quantize alike); the assignments' h quantized for down's (B·K rows of ff) */
    int32_t *offx;      /* 2 × (B, d/4): −offset · 4-quant sums of qx for the gate/up parts' types (ak_gemv_rows) */
    int32_t *offh;      /* (B·K, ff/4): the same of qh for down's type */
    float *gu, *h;      /* (B·K, 2·ff) gate | up; (B·K, ff) SiLU(gate)·up */
    float *dn;          /* (B·K, d) down(h), then · w */
    int max_tasks;
} layout;

static int max_tasks(int B, int E, int K, int ff, int d) {
    const int active = B * K < E ? B * K : E; /* experts with rows */
    return active * ((2 * ff + CHUNK - 1) / CHUNK + 2 + (d + CHUNK - 1) / CHUNK);
}

/* the pieces' places in work (none set when work is NULL); returns the bytes they take */
static size_t carve(layout *L, uint8_t *work, int B, int d, int E, int K, int ff) {
    size_t at = 0;
    const size_t BK = (size_t)B * K;
    L->max_tasks = max_tasks(B, E, K, ff, d);
#define TAKE(field, type, n)                                    \
    L->field = work ? (type *)(void *)(work + at) : NULL;       \
    at = (at + sizeof(type) * (size_t)(n) + 63) & ~(size_t)63;
    TAKE(probs, float, (size_t)B * E)
    TAKE(wts, float, BK)
    TAKE(chosen, int, BK)
    TAKE(gpos, int, BK)
    TAKE(start, int, E + 1)
    TAKE(cur, int, E)
    TAKE(arow, int, BK)
    TAKE(iota, int, BK)
    TAKE(aw, float, BK)
    TAKE(tasks, task, L->max_tasks)
    TAKE(qx[0], uint8_t, (size_t)B * (d / 32) * sizeof(block_q8x))
    TAKE(qx[1], uint8_t, (size_t)B * (d / 32) * sizeof(block_q8x))
    TAKE(qh, uint8_t, BK * (size_t)(ff / 32) * sizeof(block_q8x))
    TAKE(offx, int32_t, 2 * (size_t)B * (d / 4))
    TAKE(offh, int32_t, BK * (size_t)(ff / 4))
    TAKE(gu, float, BK * 2 * ff)
    TAKE(h, float, BK * ff)
    TAKE(dn, float, BK * d)
#undef TAKE
    return at;
}

size_t ak_moe_work_bytes(int B, int d, int n_experts, int top_k, int ff, int threads) {
    layout L;
    (void)threads;
    return carve(&L, NULL, B, d, n_experts, top_k, ff);
}

/* a task's estimated cost: its rows times (the weights' reading, as about two activation rows' products, + the
 * activation rows that chose its expert) */
static inline double task_cost(const task *T, const int *start) {
    return (double)T->nr * (2 + start[T->e + 1] - start[T->e]);
}

/* tasks t0 .. t1 − 1 split into contiguous runs of about equal cost, one per thread: run i is cut[i] .. cut[i + 1] */
static void split(const task *tasks, int t0, int t1, const int *start, int threads, int *cut) {
    double total = 0, acc = 0;
    for (int i = t0; i < t1; i++) total += task_cost(tasks + i, start);
    cut[0] = t0;
    int i = t0;
    for (int th = 1; th < threads; th++) {
        const double goal = total * th / threads;
        while (i < t1 && acc + 0.5 * task_cost(tasks + i, start) < goal) acc += task_cost(tasks + i, start), i++;
        cut[th] = i;
    }
    cut[threads] = t1;
}

int ak_act_offsets(int kind, const void *scratch, int m, int k, int32_t *off4);

int ak_moe_ffn(const ak_moe *m, const float *xn, float *out, int B, int d, void *work, size_t work_bytes,
               int threads) {
    const int E = m->n_experts, K = m->top_k, ff = m->ff;
    if (B < 1 || d < 32 || d % 32 || E < 1 || K < 1 || K > E || ff < 32 || ff % 32 || threads < 1 || !m->experts)
        return 3;
    layout L;
    if (!work || carve(&L, NULL, B, d, E, K, ff) > work_bytes) return 2;
    carve(&L, (uint8_t *)work, B, d, E, K, ff);

    /* router logits (B, E); the rows quantized (by ak_gemv for a GGUF router, as it does for every product) */
    if (m->router_f32) {
        const float *W = m->router_f32;
        (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && (size_t)E * d >= 65536)
        for (int e = 0; e < E; e++) {
            const float *we = W + (size_t)e * d;
            for (int b = 0; b < B; b++) {
                const float *xb = xn + (size_t)b * d;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < d; i++) acc += we[i] * xb[i];
                L.probs[(size_t)b * E + e] = acc;
            }
        }
    } else if (m->router.rows != E || ak_gemv(m->router.kind, m->router.w, xn, L.probs, B, E, d, L.qx[0], threads)) {
        return 1;
    }
    /* each row: softmax, its top_k, their weights (rows apart: a prompt's hundreds of rows over both threads) */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B >= 16)
    for (int b = 0; b < B; b++) {
        float *p = L.probs + (size_t)b * E, mx = p[0], sum = 0.f;
        for (int e = 1; e < E; e++) mx = fmaxf(mx, p[e]);
        for (int e = 0; e < E; e++) { p[e] = expf(p[e] - mx); sum += p[e]; }
        const float inv = 1.f / sum;
        for (int e = 0; e < E; e++) p[e] *= inv;
        int *c = L.chosen + (size_t)b * K;
        float *w = L.wts + (size_t)b * K;
        for (int j = 0; j < K; j++) { /* the largest p not yet taken; the lower index on ties (and NaNs) */
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= c[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            c[j] = best, w[j] = p[best];
        }
        if (m->norm_topk) {
            float s = 0.f;
            for (int j = 0; j < K; j++) s += w[j];
            for (int j = 0; j < K; j++) w[j] /= s;
        }
    }

    /* the assignments grouped by expert (ascending), rows in order within each; the tasks of the active experts */
    memset(L.cur, 0, sizeof(int) * (size_t)E);
    for (int i = 0; i < B * K; i++) L.cur[L.chosen[i]]++;
    L.start[0] = 0;
    for (int e = 0; e < E; e++) L.start[e + 1] = L.start[e] + L.cur[e], L.cur[e] = L.start[e];
    for (int b = 0; b < B; b++)
        for (int j = 0; j < K; j++) {
            const int pos = L.cur[L.chosen[(size_t)b * K + j]]++;
            L.gpos[(size_t)b * K + j] = pos, L.arow[pos] = b, L.aw[pos] = L.wts[(size_t)b * K + j];
        }
    for (int i = 0; i < B * K; i++) L.iota[i] = i;
    /* every expert's matrices in the same block types (one stacked tensor per layer in a file): the quant offsets
     * of the first active expert's, and their 4-quant sums of the inputs, serve all */
    int o_gu[2] = {0, 0}, o_dn = 0, nt = 0, ngu = 0;
    const ak_expert *X0 = m->experts + L.chosen[0];
    for (int p = 0; p < X0->n_gate_up && p < 2; p++)
        if ((o_gu[p] = ak_type_offset(X0->gate_up[p].kind)) < 0) return 1;
    if ((o_dn = ak_type_offset(X0->down.kind)) < 0) return 1;
    int g_gu[2] = {0, 0}, g_dn = 0, g = 0, unused; /* each part's block: the values of one activation scale */
    for (int p = 0; p < X0->n_gate_up && p < 2; p++) ak_type_info(X0->gate_up[p].kind, &g_gu[p], &unused);
    ak_type_info(X0->down.kind, &g_dn, &unused);
    for (int pass = 0; pass < 2; pass++) {
        if (pass) ngu = nt;
        for (int e = 0; e < E; e++) {
            if (L.start[e + 1] == L.start[e]) continue;
            const ak_expert *X = m->experts + e;
            if (X->n_gate_up != X0->n_gate_up || X->n_gate_up < 1 || X->n_gate_up > 2 || X->down.rows != d ||
                X->gate_up[0].rows + (X->n_gate_up == 2 ? X->gate_up[1].rows : 0) != 2 * ff ||
                ak_type_offset(X->down.kind) != o_dn || ak_type_info(X->down.kind, &g, &unused) || g != g_dn)
                return 3;
            for (int p = 0; p < X->n_gate_up; p++)
                if (ak_type_offset(X->gate_up[p].kind) != o_gu[p] || ak_type_info(X->gate_up[p].kind, &g, &unused) || g != g_gu[p])
                    return 3;
            for (int part = pass ? 2 : 0; part < (pass ? 3 : X->n_gate_up); part++) {
                const int rows = part == 2 ? d : X->gate_up[part].rows;
                for (int r0 = 0; r0 < rows; r0 += CHUNK) {
                    if (nt == L.max_tasks) return 3;
                    L.tasks[nt++] = (task){e, part, r0, rows - r0 < CHUNK ? rows - r0 : CHUNK};
                }
            }
        }
    }
    /* the inputs quantized as each gate/up part's type wants them (its block: 32 or 256 values a scale) */
    const uint8_t *qx[2] = {L.qx[0], g_gu[1] && g_gu[1] != g_gu[0] ? L.qx[1] : L.qx[0]};
    for (int p = 0; p < X0->n_gate_up; p++)
        if ((p == 0 || qx[1] != qx[0]) && ak_quantize_act(X0->gate_up[p].kind, xn, B, d, (void *)qx[p])) return 1;
    for (int p = 0; p < 2; p++)
        if (o_gu[p]) ak_act_offsets(X0->gate_up[p].kind, qx[p], B, d, L.offx + (size_t)p * B * (d / 4));

    int err = 0;
    const int nas = B * K;
    enum { MAX_TEAM = 512 };
    int cuts[2 * (MAX_TEAM + 1)]; /* each thread's runs of the gate/up tasks, then of the down tasks */
#pragma omp parallel num_threads(threads < MAX_TEAM ? threads : MAX_TEAM) if (threads > 1)
    {
        const int nth = omp_get_num_threads(), th = omp_get_thread_num();
#pragma omp single
        {
            split(L.tasks, 0, ngu, L.start, nth, cuts);
            split(L.tasks, ngu, nt, L.start, nth, cuts + nth + 1);
        }
        for (int i = cuts[th]; i < cuts[th + 1]; i++) {
            const task T = L.tasks[i];
            const ak_part *P = &m->experts[T.e].gate_up[T.part];
            const int s0 = L.start[T.e], me = L.start[T.e + 1] - s0;
            const int off = T.part ? m->experts[T.e].gate_up[0].rows : 0;
            if (ak_gemv_rows(P->kind, P->w, T.r0, T.r0 + T.nr, qx[T.part], o_gu[T.part] ? L.offx + (size_t)T.part * B * (d / 4) : NULL,
                             L.arow + s0, me, d, L.gu + (size_t)s0 * 2 * ff + off + T.r0, (size_t)2 * ff)) {
#pragma omp atomic write
                err = 1;
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int a = 0; a < nas; a++) {
            uint8_t *qa = L.qh + (size_t)a * (ff / 32) * sizeof(block_q8x); /* scratch row a */
            ak_act_mul(L.gu + (size_t)a * 2 * ff, L.h + (size_t)a * ff, ff, 0);
            ak_quantize_act(X0->down.kind, L.h + (size_t)a * ff, 1, ff, qa); /* its kind was checked above */
            if (o_dn) ak_act_offsets(X0->down.kind, qa, 1, ff, L.offh + (size_t)a * (ff / 4));
        }
        for (int i = cuts[nth + 1 + th]; i < cuts[nth + 2 + th]; i++) {
            const task T = L.tasks[i];
            const ak_part *P = &m->experts[T.e].down;
            const int s0 = L.start[T.e], me = L.start[T.e + 1] - s0;
            if (ak_gemv_rows(P->kind, P->w, T.r0, T.r0 + T.nr, L.qh, o_dn ? L.offh : NULL, L.iota + s0, me, ff,
                             L.dn + (size_t)s0 * d + T.r0, (size_t)d)) {
#pragma omp atomic write
                err = 1;
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            int *g = L.gpos + (size_t)b * K; /* the row's assignments: ascending place is ascending expert */
            for (int j = 1; j < K; j++)
                for (int i = j; i > 0 && g[i - 1] > g[i]; i--) { const int s = g[i]; g[i] = g[i - 1], g[i - 1] = s; }
            for (int j = 0; j < K; j++) { /* w · y rounded, as the eager product before its sum */
                float *v = L.dn + (size_t)g[j] * d;
                const float w = L.aw[g[j]];
                for (int i = 0; i < d; i++) v[i] *= w;
            }
            float *o = out + (size_t)b * d;
            memcpy(o, L.dn + (size_t)g[0] * d, sizeof(float) * (size_t)d);
            for (int j = 1; j < K; j++) {
                const float *v = L.dn + (size_t)g[j] * d;
                for (int i = 0; i < d; i++) o[i] += v[i];
            }
        }
    }
    return err;
}
