/*
 * The routed experts of one MoE layer for a few tokens, bf16 weights, one OpenMP region.
 *
 * Decode reads every picked expert's weights once for a handful of rows. As separate GEMM calls that is
 * two calls per expert (about 56 a layer at batch 16), each paying a parallel fork/join and a ramp-up
 * before it streams; here the whole layer is two work-shared loops in one parallel region:
 *
 *   1. gate/up  items (expert, block of FB hidden units): for each unit j, the gate row j and the up
 *               row F + j are read once and dotted with each of the expert's rows;
 *               h[r, j] = silu(gate) * up, rounded to bf16 (as the torch path rounds it)
 *   2. down     each thread owns a contiguous range of output columns d; for every picked expert, each
 *               down row d is read once and dotted with the expert's h rows; acc[token(r), d] +=
 *               weight(r) * dot, in float, then y = bf16(acc); no two threads write one element
 *
 * Dots use AVX512-BF16 (vdpbf16ps: 32 bf16 products a step into 16 float lanes). Weights are the
 * engine's row-major stacks: w_gate_up [E, 2F, D], w_down [E, D, F]. D and F must be multiples of 32.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define FB 16  /* hidden units per gate/up work item */
#define DB 32  /* the down loop splits the output columns between threads in blocks of DB */
#define ROWS 8 /* rows dotted against one loaded weight row at a time */
#define PF 2   /* prefetch the weight row PF rows ahead: the hardware prefetcher stops at each 4 KiB page,
                  and a software prefetch does not (decode at batch 16: 18 -> 25 GB/s, 27 GB/s the bound) */

static inline float reduce(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m512bh load_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }

/* out[r] = dot(w, x[r]) for n rows x[0..n-1] of length len (a multiple of 32). */
static inline void dots(const uint16_t *w, const uint16_t *const *x, int n, int len, float *out) {
    __m512 acc[ROWS];
    for (int r = 0; r < n; r++) acc[r] = _mm512_setzero_ps();
    for (int k = 0; k < len; k += 32) {
        _mm_prefetch((const char *)(w + k + PF * len), _MM_HINT_T0);
        __m512bh wk = load_bh(w + k);
        for (int r = 0; r < n; r++) acc[r] = _mm512_dpbf16_ps(acc[r], wk, load_bh(x[r] + k));
    }
    for (int r = 0; r < n; r++) out[r] = reduce(acc[r]);
}

/* As dots, for the gate row and the up row at once (both against the same x rows). */
static inline void dots2(const uint16_t *wg, const uint16_t *wu, const uint16_t *const *x, int n, int len,
                         float *gate, float *up) {
    __m512 ag[ROWS], au[ROWS];
    for (int r = 0; r < n; r++) ag[r] = au[r] = _mm512_setzero_ps();
    for (int k = 0; k < len; k += 32) {
        _mm_prefetch((const char *)(wg + k + PF * len), _MM_HINT_T0);
        _mm_prefetch((const char *)(wu + k + PF * len), _MM_HINT_T0);
        __m512bh g = load_bh(wg + k), u = load_bh(wu + k);
        for (int r = 0; r < n; r++) {
            __m512bh xr = load_bh(x[r] + k);
            ag[r] = _mm512_dpbf16_ps(ag[r], g, xr);
            au[r] = _mm512_dpbf16_ps(au[r], u, xr);
        }
    }
    for (int r = 0; r < n; r++) {
        gate[r] = reduce(ag[r]);
        up[r] = reduce(au[r]);
    }
}

/*
 * x [M, D]: the layer's tokens. slot[0..S-1]: the (token, choice) slots this rank computes, token * K +
 * choice, grouped by expert: picked expert p (local id experts[p]) owns slots starts[p] .. starts[p+1]-1.
 * weight [M * K]: every slot's routing weight. h [S, F] bf16 and acc [M, D] float are scratch; y [M, D]
 * bf16 is the result: each token's weighted sum over its slots here (zero for a token with none).
 */
int kubemoe_moe_bf16(const uint16_t *x, const uint16_t *w_gate_up, const uint16_t *w_down,
                     const int64_t *slot, const int64_t *experts, const int64_t *starts, int n_picked,
                     const float *weight, int M, int K, int D, int F,
                     uint16_t *h, float *acc, uint16_t *y, int threads) {
    if (D % DB || D % 32 || F % FB || F % 32) return -1;
    const int units = F / FB, n1 = n_picked * units;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int item = 0; item < n1; item++) {
            const int p = item / units, j0 = (item % units) * FB;
            const int64_t e = experts[p], first = starts[p], rows = starts[p + 1] - first;
            const uint16_t *w = w_gate_up + e * 2 * (int64_t)F * D;
            const uint16_t *xr[ROWS];
            float gate[ROWS], up[ROWS];
            for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
                const int n = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
                for (int r = 0; r < n; r++) xr[r] = x + slot[first + r0 + r] / K * D;
                for (int j = j0; j < j0 + FB; j++) {
                    dots2(w + (int64_t)j * D, w + (int64_t)(F + j) * D, xr, n, D, gate, up);
                    for (int r = 0; r < n; r++) {
                        const float g = gate[r];
                        h[(first + r0 + r) * F + j] = to_bf16(g / (1.0f + expf(-g)) * up[r]);
                    }
                }
            }
        }
        /* implicit barrier: every h row is done. Each thread now owns one contiguous range of columns. */
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int d_lo = D / DB * t / nt * DB, d_hi = D / DB * (t + 1) / nt * DB;
        for (int m = 0; m < M; m++) memset(acc + (int64_t)m * D + d_lo, 0, (d_hi - d_lo) * sizeof(float));
        for (int p = 0; p < n_picked; p++) {
            const int64_t e = experts[p], first = starts[p], rows = starts[p + 1] - first;
            const uint16_t *w = w_down + e * (int64_t)D * F;
            const uint16_t *hr[ROWS];
            float out[ROWS];
            for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
                const int n = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
                for (int r = 0; r < n; r++) hr[r] = h + (first + r0 + r) * F;
                for (int d = d_lo; d < d_hi; d++) {
                    dots(w + (int64_t)d * F, hr, n, F, out);
                    for (int r = 0; r < n; r++) {
                        const int64_t s = slot[first + r0 + r];
                        acc[s / K * D + d] += weight[s] * out[r];
                    }
                }
            }
        }
        for (int m = 0; m < M; m++)
            for (int d = d_lo; d < d_hi; d++) y[(int64_t)m * D + d] = to_bf16(acc[(int64_t)m * D + d]);
    }
    return 0;
}
