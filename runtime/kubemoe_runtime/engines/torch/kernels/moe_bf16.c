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
 * Weights are the engine's row-major stacks: w_gate_up [E, 2F, D], w_down [E, D, F]. D and F must be
 * multiples of 32. One source, two libraries (build.py), which differ only in the dot products:
 *
 *   -mavx512bf16        (moe_bf16)       vdpbf16ps: 32 bf16 products a step into 16 float lanes, for
 *                                        blocks of more than WIDENED_MAX_ROWS rows; fewer (decode's one to
 *                                        four rows an expert) take the widened form below, which streams a
 *                                        weight row faster there on Zen 4 (bench model, 8 layers, 2 threads,
 *                                        old and new library called in turn, seven runs: 1 token a median
 *                                        0.50 -> 0.45 ms a layer, 2 tokens 0.97 -> 0.83, 16 tokens 3.4 ->
 *                                        3.2; 64 tokens unchanged, 5.4, where vdpbf16ps is 1.4x the widened
 *                                        form). The AMX library keeps vdpbf16ps there: on an AMX Xeon (the
 *                                        same A/B, nine runs) the widened form took 1.04-1.10x as long on
 *                                        the MoE layer at 1 to 16 tokens (dense products of 2 rows: 0.8x,
 *                                        1 row the same; not split out)
 *   -mavx2 -mfma        (moe_bf16_avx2)  16 bf16 a step widened to float in registers: a bf16 is the high
 *                                        half of a float, so a 32-bit lane's low element shifted left 16
 *                                        is one float (the even elements) and the lane masked to its high
 *                                        16 bits the other (the odd ones); both sides of a dot are split
 *                                        the same way, so float FMAs sum the same products in another order
 *
 * Everything else (the indexing, the work split, the rounding) is this one code for both.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define FB 16  /* hidden units per gate/up work item */
#define DB 32  /* the down loop splits the output columns between threads in blocks of DB */
#define PF 2   /* prefetch the weight row PF rows ahead: the hardware prefetcher stops at each 4 KiB page,
                  and a software prefetch does not (decode at batch 16: 18 -> 25 GB/s, 27 GB/s the bound) */

#define INLINE static inline __attribute__((always_inline))

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX2__) && defined(__FMA__)

/* The widened form, in every library (AVX-512 implies AVX2 and the libraries name FMA). 16 ymm registers
   (AVX-512 has 32): at most 4 rows against a weight row, and their accumulators, the widened weights and
   one widened x row must all stay in registers. */
#define WIDENED_MAX_ROWS 4

INLINE __m256i load16(const uint16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
INLINE __m256 even_f32(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
INLINE __m256 odd_f32(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

INLINE float reduce8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[r] = dot(w, x[r]) for N rows (a constant: the loops unroll and the accumulators are registers).
   Even and odd products go to separate accumulators: two FMA chains a row hide the FMA's latency at the
   one row of batch-1 decode. */
INLINE void widened_dots_n(const uint16_t *w, const uint16_t *const *x, const int N, int len, float *out) {
    __m256 ae[WIDENED_MAX_ROWS], ao[WIDENED_MAX_ROWS];
    for (int r = 0; r < N; r++) ae[r] = ao[r] = _mm256_setzero_ps();
    for (int k = 0; k < len; k += 32) {
        _mm_prefetch((const char *)(w + k + PF * len), _MM_HINT_T0); /* one 64-byte line a step */
        for (int half = 0; half < 32; half += 16) {
            const __m256i wk = load16(w + k + half);
            const __m256 we = even_f32(wk), wo = odd_f32(wk);
            for (int r = 0; r < N; r++) {
                const __m256i xk = load16(x[r] + k + half);
                ae[r] = _mm256_fmadd_ps(we, even_f32(xk), ae[r]);
                ao[r] = _mm256_fmadd_ps(wo, odd_f32(xk), ao[r]);
            }
        }
    }
    for (int r = 0; r < N; r++) out[r] = reduce8(_mm256_add_ps(ae[r], ao[r]));
}

/* As widened_dots_n for the gate row and the up row at once. From 3 rows, even and odd share an accumulator (there
   are not registers for 4 a row), and the rows' chains are enough to hide the latency. */
INLINE void widened_dots2_n(const uint16_t *wg, const uint16_t *wu, const uint16_t *const *x, const int N, int len,
                    float *gate, float *up) {
    enum { SPLIT = 2 };
    const int split = N <= 2; /* separate even/odd accumulators */
    __m256 ag[WIDENED_MAX_ROWS][SPLIT], au[WIDENED_MAX_ROWS][SPLIT];
    for (int r = 0; r < N; r++)
        for (int c = 0; c < SPLIT; c++) ag[r][c] = au[r][c] = _mm256_setzero_ps();
    for (int k = 0; k < len; k += 32) {
        _mm_prefetch((const char *)(wg + k + PF * len), _MM_HINT_T0);
        _mm_prefetch((const char *)(wu + k + PF * len), _MM_HINT_T0);
        for (int half = 0; half < 32; half += 16) {
            const __m256i g = load16(wg + k + half), u = load16(wu + k + half);
            const __m256 ge = even_f32(g), go = odd_f32(g), ue = even_f32(u), uo = odd_f32(u);
            for (int r = 0; r < N; r++) {
                const __m256i xk = load16(x[r] + k + half);
                const __m256 xe = even_f32(xk), xo = odd_f32(xk);
                ag[r][0] = _mm256_fmadd_ps(ge, xe, ag[r][0]);
                au[r][0] = _mm256_fmadd_ps(ue, xe, au[r][0]);
                ag[r][split] = _mm256_fmadd_ps(go, xo, ag[r][split]);
                au[r][split] = _mm256_fmadd_ps(uo, xo, au[r][split]);
            }
        }
    }
    for (int r = 0; r < N; r++) {
        gate[r] = reduce8(split ? _mm256_add_ps(ag[r][0], ag[r][1]) : ag[r][0]);
        up[r] = reduce8(split ? _mm256_add_ps(au[r][0], au[r][1]) : au[r][0]);
    }
}
#else
#error "build with -mavx2 -mfma (and -mavx512bf16 -mavx512f -mavx512bw -mavx512vl for vdpbf16ps)"
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)

#define ROWS 8 /* rows dotted against one loaded weight row at a time */

INLINE float reduce(__m512 v) { return _mm512_reduce_add_ps(v); }

INLINE __m512bh load_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }

/* Up to this many rows, each row's sum is two FMA chains (even and odd steps of 32), as in the widened form:
   at decode's one or two rows an expert, one chain a row waits on vdpbf16ps's latency instead of the memory
   (Zen 4, bench_moe_kernel.py: 1.2-1.3x at 1-16 tokens). Only the AMX library runs vdpbf16ps on so few rows
   now; the others take the widened form there. */
#define SPLIT_ROWS 4

/* out[r] = dot(w, x[r]) for N rows x[0..N-1] of length len (a multiple of 32). */
INLINE void dots_n(const uint16_t *w, const uint16_t *const *x, const int N, int len, float *out) {
#ifndef __AMX_TILE__
    if (N <= WIDENED_MAX_ROWS) {
        widened_dots_n(w, x, N, len, out);
        return;
    }
#endif
    const int c1 = N <= SPLIT_ROWS; /* the second chain's index: 0 (one chain) or 1 */
    __m512 acc[ROWS][2];
    for (int r = 0; r < N; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= len; k += 64) {
        _mm_prefetch((const char *)(w + k + PF * len), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k + 32 + PF * len), _MM_HINT_T0);
        const __m512bh w0 = load_bh(w + k), w1 = load_bh(w + k + 32);
        for (int r = 0; r < N; r++) acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, load_bh(x[r] + k));
        for (int r = 0; r < N; r++) acc[r][c1] = _mm512_dpbf16_ps(acc[r][c1], w1, load_bh(x[r] + k + 32));
    }
    if (k < len) {
        const __m512bh wk = load_bh(w + k);
        for (int r = 0; r < N; r++) acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wk, load_bh(x[r] + k));
    }
    for (int r = 0; r < N; r++) out[r] = reduce(c1 ? _mm512_add_ps(acc[r][0], acc[r][1]) : acc[r][0]);
}

/* As dots_n, for the gate row and the up row at once (both against the same x rows). */
INLINE void dots2_n(const uint16_t *wg, const uint16_t *wu, const uint16_t *const *x, const int N, int len,
                    float *gate, float *up) {
#ifndef __AMX_TILE__
    if (N <= WIDENED_MAX_ROWS) {
        widened_dots2_n(wg, wu, x, N, len, gate, up);
        return;
    }
#endif
    const int c1 = N <= SPLIT_ROWS;
    __m512 ag[ROWS][2], au[ROWS][2];
    for (int r = 0; r < N; r++) ag[r][0] = ag[r][1] = au[r][0] = au[r][1] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= len; k += 64) {
        _mm_prefetch((const char *)(wg + k + PF * len), _MM_HINT_T0);
        _mm_prefetch((const char *)(wu + k + PF * len), _MM_HINT_T0);
        _mm_prefetch((const char *)(wg + k + 32 + PF * len), _MM_HINT_T0);
        _mm_prefetch((const char *)(wu + k + 32 + PF * len), _MM_HINT_T0);
        const __m512bh g0 = load_bh(wg + k), u0 = load_bh(wu + k);
        for (int r = 0; r < N; r++) {
            const __m512bh xr = load_bh(x[r] + k);
            ag[r][0] = _mm512_dpbf16_ps(ag[r][0], g0, xr);
            au[r][0] = _mm512_dpbf16_ps(au[r][0], u0, xr);
        }
        const __m512bh g1 = load_bh(wg + k + 32), u1 = load_bh(wu + k + 32);
        for (int r = 0; r < N; r++) {
            const __m512bh xr = load_bh(x[r] + k + 32);
            ag[r][c1] = _mm512_dpbf16_ps(ag[r][c1], g1, xr);
            au[r][c1] = _mm512_dpbf16_ps(au[r][c1], u1, xr);
        }
    }
    if (k < len) {
        const __m512bh g = load_bh(wg + k), u = load_bh(wu + k);
        for (int r = 0; r < N; r++) {
            const __m512bh xr = load_bh(x[r] + k);
            ag[r][0] = _mm512_dpbf16_ps(ag[r][0], g, xr);
            au[r][0] = _mm512_dpbf16_ps(au[r][0], u, xr);
        }
    }
    for (int r = 0; r < N; r++) {
        gate[r] = reduce(c1 ? _mm512_add_ps(ag[r][0], ag[r][1]) : ag[r][0]);
        up[r] = reduce(c1 ? _mm512_add_ps(au[r][0], au[r][1]) : au[r][0]);
    }
}

#else /* AVX2 + FMA: the widened form alone */

#define ROWS WIDENED_MAX_ROWS
#define dots_n widened_dots_n
#define dots2_n widened_dots2_n

#endif

/* The runtime row count (1..ROWS) to a constant, so that each case compiles to its own unrolled loop with
   its accumulators in registers. */
#if ROWS == 8
#define ROW_CASES(CALL) CALL(1) CALL(2) CALL(3) CALL(4) CALL(5) CALL(6) CALL(7)
#elif ROWS == 4
#define ROW_CASES(CALL) CALL(1) CALL(2) CALL(3)
#endif

static void dots(const uint16_t *w, const uint16_t *const *x, int n, int len, float *out) {
#define DOTS(N) case N: dots_n(w, x, N, len, out); return;
    switch (n) { ROW_CASES(DOTS) }
#undef DOTS
    dots_n(w, x, ROWS, len, out);
}

static void dots2(const uint16_t *wg, const uint16_t *wu, const uint16_t *const *x, int n, int len,
                  float *gate, float *up) {
#define DOTS2(N) case N: dots2_n(wg, wu, x, N, len, gate, up); return;
    switch (n) { ROW_CASES(DOTS2) }
#undef DOTS2
    dots2_n(wg, wu, x, ROWS, len, gate, up);
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

/*
 * A dense projection for a few rows: y [M, O] = x [M, I] @ w [O, I]^T, bf16 in and out, float sums, one
 * rounding (as torch's bf16 linear). For CPUs whose bf16 GEMM in torch is slow at more than one row (AVX2
 * without AVX-512: torch has no fast bf16 GEMM there, and batch-16 decode took longer than batch 1). Each
 * item is a block of FB output units: their weight rows are read from memory once and dotted with every
 * row of x, ROWS rows at a time (the block's rows stay in L2 between row blocks). I must be a multiple of
 * 32; O any size.
 */
int kubemoe_linear_bf16(const uint16_t *x, const uint16_t *w, int M, int O, int I, uint16_t *y, int threads) {
    if (I % 32) return -1;
    const int n_items = (O + FB - 1) / FB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int item = 0; item < n_items; item++) {
        const int j0 = item * FB, j1 = j0 + FB < O ? j0 + FB : O;
        const uint16_t *xr[ROWS];
        float out[ROWS];
        for (int r0 = 0; r0 < M; r0 += ROWS) {
            const int n = M - r0 < ROWS ? M - r0 : ROWS;
            for (int r = 0; r < n; r++) xr[r] = x + (int64_t)(r0 + r) * I;
            for (int j = j0; j < j1; j++) {
                dots(w + (int64_t)j * I, xr, n, I, out);
                for (int r = 0; r < n; r++) y[(int64_t)(r0 + r) * O + j] = to_bf16(out[r]);
            }
        }
    }
    return 0;
}
#include "attention.c"
#include "norm.c"
