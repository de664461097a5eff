/*
 * The routed experts of one MoE layer on AMX tiles (Intel Sapphire Rapids and later: amx_tile, amx_bf16),
 * from a few rows an expert on average (prefill). The library also holds moe_bf16.c's AVX512-BF16 kernel,
 * as fast at decode's one or two rows an expert, where both read the weights at memory bandwidth;
 * kernels/moe.py chooses per call (AMX_MIN_ROWS).
 *
 * Why: the dot-product kernel is near memory bandwidth at decode, but at prefill it is compute-bound (a
 * 128-token prompt: 16 rows an expert at about 100 GFLOP/s), and oneDNN's AMX GEMM, two calls an expert,
 * only pays from hundreds of rows an expert. Here a 128-token layer of the bench model takes 5.3 ms
 * against 17.1 (dot products) — its weights' read time — and 2048 tokens 44 against 340.
 *
 * A tile multiply (TDPBF16PS) is C[16 x 16] += A[16 x 32] . B[32 x 16], bf16 in, float sums, with B in
 * "VNNI" form: B's row i holds, for each of its 16 columns n, the pair of elements 2i and 2i + 1. Computed
 * here the other way round, as y^T = W . x^T:
 *
 *   A   16 rows of the engine's own row-major weights, 32 columns: a tile loads them as they are, with the
 *       row stride, so the experts need no second, re-laid-out copy
 *   B   16 tokens' 32 inputs: as a token's elements 2i and 2i + 1 are one 32-bit word, B's VNNI form is
 *       the token rows (as 32-bit words) transposed, [D/2][16]: each expert's rows are packed so once
 *   C   16 output units x 16 tokens, float
 *
 * Three phases in one OpenMP region:
 *
 *   0. pack     each expert's rows, in blocks of 16 tokens (the last zero-padded), to B form: xp
 *   1. gate/up  items (expert, 16 hidden units): two A tiles (gate rows j, up rows F + j) against two token
 *               blocks at a time, four C tiles; h = silu(gate) * up (16 lanes at once: exp16 is within 2
 *               ulp of expf), rounded to bf16 and written straight into B form for the down projection
 *               (hp: pair j/2, token n, half j%2)
 *   2. down     each thread owns a contiguous range of output columns d, in blocks of 32 (two A tiles of
 *               16 down rows); for every picked expert, acc[token, d] += weight * C, in float, then
 *               y = bf16(acc): the same order of sums as moe_bf16.c, no two threads write one element
 *
 * Before a thread uses tiles it loads the tile configuration; before any thread does, the process asks
 * Linux for the AMX state (kubemoe_amx_init: arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16 or later).
 */
#include "moe_bf16.c"

#include <immintrin.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TB 16 /* tokens per B tile */

/* Tiles: 0-3 C (A tile a x B tile b is C tile 2b + a), 4-5 A, 6-7 B; every tile 16 rows of 64 bytes. */
typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* 0 when Linux lets this process use AMX tiles (it asks; asking again is harmless), else -1. */
int kubemoe_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

/* Prefetch, into L2, columns k .. k + 31 of the 16 rows at n0 and the 16 at n1: the thread's next A tiles.
   A tile load that misses waits for its 16 rows from memory; the next item's rows, requested while this
   one computes, are in L2 when it starts (128 tokens, bench model: 11.6 -> 7.7 ms a layer). */
INLINE void prefetch_next(const uint16_t *n0, const uint16_t *n1, int64_t lda, int k) {
    if (!n0) return;
    for (int r = 0; r < TB; r++) {
        _mm_prefetch((const char *)(n0 + r * lda + k), _MM_HINT_T1);
        _mm_prefetch((const char *)(n1 + r * lda + k), _MM_HINT_T1);
    }
}

/* c[0..nb-1][0..1][16][16] = (A tiles: rows a0 and a1, 16 each, row stride lda elements) . B blocks b0,
   b1 (each [len/2][16] 32-bit words), for nb = 1 or 2 token blocks; len a multiple of 32. n0, n1: the
   rows of the next A tiles, to prefetch (NULL: none). */
static void tiles_2x2(const uint16_t *a0, const uint16_t *a1, int64_t lda, const uint16_t *n0,
                      const uint16_t *n1, const uint32_t *b0, const uint32_t *b1, int nb, int len,
                      float c[2][2][TB * TB]) {
    const int64_t sa = lda * 2; /* bytes */
    _tile_zero(0);
    _tile_zero(1);
    if (nb == 2) {
        _tile_zero(2);
        _tile_zero(3);
        for (int k = 0; k < len; k += 32) {
            prefetch_next(n0, n1, lda, k);
            _tile_loadd(4, a0 + k, sa);
            _tile_loadd(5, a1 + k, sa);
            _tile_loadd(6, b0 + k / 2 * TB, 64);
            _tile_loadd(7, b1 + k / 2 * TB, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(2, c[1][0], 64);
        _tile_stored(3, c[1][1], 64);
    } else {
        for (int k = 0; k < len; k += 32) {
            prefetch_next(n0, n1, lda, k);
            _tile_loadd(4, a0 + k, sa);
            _tile_loadd(5, a1 + k, sa);
            _tile_loadd(6, b0 + k / 2 * TB, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
        }
    }
    _tile_stored(0, c[0][0], 64);
    _tile_stored(1, c[0][1], 64);
}

/* e^x for 16 floats, within 2 ulp of expf for |x| <= 88 (inputs are clamped there): Cephes' expf, x =
   n ln 2 + r, |r| <= ln 2 / 2, e^r by a degree-7 polynomial, times 2^n by vscalefps. */
INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* silu(g) * u for 16 floats, in moe_bf16.c's order: g / (1 + e^-g) * u. */
INLINE __m512 silu_mul(const float *g, const float *u) {
    const __m512 gv = _mm512_load_ps(g);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    return _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_load_ps(u));
}

/* to_bf16 (moe_bf16.c) of 16 floats, each in the low 16 bits of its 32-bit lane. */
INLINE __m512i bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

/* 16 rows (NULL: a padding row of zeros), len elements each, to B form: out[i][n] is row n's 32-bit
   word i (its elements 2i and 2i + 1). */
static void pack_block(const uint16_t *const rows[TB], int len, uint32_t *out) {
    for (int n = 0; n < TB; n++) {
        const uint32_t *row = (const uint32_t *)rows[n];
        for (int i = 0; i < len / 2; i++) out[i * TB + n] = row ? row[i] : 0;
    }
}

/* Column n of a 16 x 16 float C tile (stored row-major): its 16 rows' elements n, a gather. */
INLINE __m512 c_column(const float *c, int n) {
    const __m512i rows = /* the offsets of the tile's rows */
        _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
    return _mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(n)), c, 4);
}

/* Scratch that lives as long as its thread, grown when a call needs more: a buffer allocated per call
   comes back from the system as fresh pages, and faulting them in cost more than the layer's tiles. */
typedef struct {
    void *p;
    size_t size;
} scratch;

#define KEEP ((size_t)64 << 20) /* a scratch buffer above this (a long prefill's) is freed after the call */

static void *grown(scratch *s, size_t size) {
    if (size > s->size) {
        free(s->p);
        s->p = aligned_alloc(64, (size + 63) / 64 * 64);
        s->size = s->p ? size : 0;
    }
    return s->p;
}

static void trimmed(scratch *s) {
    if (s->size > KEEP) {
        free(s->p);
        s->p = NULL;
        s->size = 0;
    }
}

static __thread scratch block_scratch, xp_scratch, hp_scratch;

/* Same arguments as kubemoe_moe_bf16 (moe_bf16.c); h is unused (h goes to its own B-form buffer here).
   Returns -1 for shapes the kernel does not take, -2 when out of memory. */
int kubemoe_moe_amx(const uint16_t *x, const uint16_t *w_gate_up, const uint16_t *w_down, const int64_t *slot,
                    const int64_t *experts, const int64_t *starts, int n_picked, const float *weight, int M,
                    int K, int D, int F, uint16_t *h, float *acc, uint16_t *y, int threads) {
    (void)h;
    if (D % DB || D % 32 || F % 32) return -1;
    /* block[p]: expert p's first token block; blocks in all */
    int64_t *block = grown(&block_scratch, (n_picked + 1) * sizeof *block);
    if (!block) return -2;
    block[0] = 0;
    for (int p = 0; p < n_picked; p++) block[p + 1] = block[p] + (starts[p + 1] - starts[p] + TB - 1) / TB;
    const int64_t blocks = block[n_picked];
    const int64_t xp_words = (int64_t)D / 2 * TB, hp_words = (int64_t)F / 2 * TB; /* 32-bit words a block */
    uint32_t *xp = grown(&xp_scratch, blocks * xp_words * 4), *hp = grown(&hp_scratch, blocks * hp_words * 4);
    if (!xp || !hp) return -2;
    const int units = F / TB, n1 = n_picked * units;
#pragma omp parallel num_threads(threads)
    {
        /* 0. pack the rows, one token block an item */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int p = 0;
            while (block[p + 1] <= b) p++;
            const int64_t first = starts[p] + (b - block[p]) * TB, end = starts[p + 1];
            const uint16_t *rows[TB];
            for (int n = 0; n < TB; n++) rows[n] = first + n < end ? x + slot[first + n] / K * D : NULL;
            pack_block(rows, D, xp + b * xp_words);
        }
        configure_tiles();
        float c[2][2][TB * TB] __attribute__((aligned(64)));
        /* 1. gate/up: one expert's 16 hidden units an item */
#pragma omp for schedule(static)
        for (int item = 0; item < n1; item++) {
            const int p = item / units, j0 = (item % units) * TB;
            const uint16_t *w = w_gate_up + experts[p] * 2 * (int64_t)F * D;
            const int64_t nb = block[p + 1] - block[p];
            for (int64_t t = 0; t < nb; t += 2) {
                const int two = nb - t >= 2 ? 2 : 1;
                const uint32_t *b0 = xp + (block[p] + t) * xp_words;
                const uint16_t *g = w + (int64_t)j0 * D, *u = w + (int64_t)(F + j0) * D;
                const int next = t == 0 && j0 + TB < F; /* the next item's rows: 16 on (same expert) */
                tiles_2x2(g, u, D, next ? g + TB * D : NULL, next ? u + TB * D : NULL, b0, b0 + xp_words, two,
                          D, c);
                for (int q = 0; q < two; q++) {
                    uint32_t *out = hp + (block[p] + t + q) * hp_words; /* [j / 2][n]: (h[j], h[j + 1]) */
                    for (int m = 0; m < TB; m += 2) { /* units j0 + m and j0 + m + 1: one pair, 16 tokens */
                        const __m512i even = bf16_bits(silu_mul(c[q][0] + m * TB, c[q][1] + m * TB));
                        const float *g1 = c[q][0] + (m + 1) * TB, *u1 = c[q][1] + (m + 1) * TB;
                        const __m512i odd = bf16_bits(silu_mul(g1, u1));
                        _mm512_store_si512((void *)(out + (j0 + m) / 2 * TB),
                                           _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
                    }
                }
            }
        }
        /* implicit barrier: hp is complete. 2. down: this thread's columns. */
        const int tn = omp_get_thread_num(), nt = omp_get_num_threads();
        const int d_lo = D / DB * tn / nt * DB, d_hi = D / DB * (tn + 1) / nt * DB;
        for (int m = 0; m < M; m++) memset(acc + (int64_t)m * D + d_lo, 0, (d_hi - d_lo) * sizeof(float));
        for (int p = 0; p < n_picked; p++) {
            const uint16_t *w = w_down + experts[p] * (int64_t)D * F;
            const int64_t nb = block[p + 1] - block[p];
            for (int d0 = d_lo; d0 < d_hi; d0 += 2 * TB) {
                for (int64_t t = 0; t < nb; t += 2) {
                    const int two = nb - t >= 2 ? 2 : 1;
                    const uint32_t *b0 = hp + (block[p] + t) * hp_words;
                    const uint16_t *rows = w + (int64_t)d0 * F;
                    const int next = t == 0 && d0 + 2 * TB < d_hi; /* this thread's next 32 down rows */
                    tiles_2x2(rows, rows + TB * F, F, next ? rows + 2 * TB * F : NULL,
                              next ? rows + 3 * TB * F : NULL, b0, b0 + hp_words, two, F, c);
                    for (int q = 0; q < two; q++) {
                        const int64_t r0 = starts[p] + (t + q) * TB;
                        const int tokens = starts[p + 1] - r0 < TB ? (int)(starts[p + 1] - r0) : TB;
                        for (int n = 0; n < tokens; n++) { /* token n is C's column n: 16 units a gather */
                            const int64_t s = slot[r0 + n];
                            float *sum = acc + s / K * D + d0;
                            const __m512 ws = _mm512_set1_ps(weight[s]);
                            for (int half = 0; half < 2; half++) {
                                const __m512 v = c_column(c[q][half], n);
                                _mm512_storeu_ps(sum + half * TB,
                                                 _mm512_fmadd_ps(ws, v, _mm512_loadu_ps(sum + half * TB)));
                            }
                        }
                    }
                }
            }
        }
        for (int m = 0; m < M; m++)
            for (int d = d_lo; d < d_hi; d++) y[(int64_t)m * D + d] = to_bf16(acc[(int64_t)m * D + d]);
        _tile_release();
    }
    trimmed(&xp_scratch);
    trimmed(&hp_scratch);
    return 0;
}

static __thread scratch linear_scratch;

/*
 * A dense projection on tiles, for decode's rows: y [M, O] = x [M, I] @ w [O, I]^T, bf16 in and out, float
 * sums, one rounding, as kubemoe_linear_bf16 (moe_bf16.c). The rows are packed to B form once; each item is
 * 32 output units (two A tiles of the row-major weight) against every block of 16 rows, two at a time.
 * I and O must be multiples of 32 (-1 otherwise; -2 when out of memory).
 */
int kubemoe_linear_amx(const uint16_t *x, const uint16_t *w, int M, int O, int I, uint16_t *y, int threads) {
    if (I % 32 || O % (2 * TB)) return -1;
    const int64_t blocks = (M + TB - 1) / TB, words = (int64_t)I / 2 * TB;
    uint32_t *xp = grown(&linear_scratch, blocks * words * 4);
    if (!xp) return -2;
    const int items = O / (2 * TB);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const uint16_t *rows[TB];
            for (int n = 0; n < TB; n++) rows[n] = b * TB + n < M ? x + (b * TB + n) * I : NULL;
            pack_block(rows, I, xp + b * words);
        }
        configure_tiles();
        float c[2][2][TB * TB] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int item = 0; item < items; item++) {
            const int o0 = item * 2 * TB;
            const uint16_t *rows = w + (int64_t)o0 * I;
            for (int64_t t = 0; t < blocks; t += 2) {
                const int two = blocks - t >= 2 ? 2 : 1;
                const int next = t == 0 && item + 1 < items; /* the next item's 32 rows */
                tiles_2x2(rows, rows + TB * I, I, next ? rows + 2 * TB * I : NULL,
                          next ? rows + 3 * TB * I : NULL, xp + t * words, xp + (t + 1) * words, two, I, c);
                for (int q = 0; q < two; q++)
                    for (int n = 0; n < TB && (t + q) * TB + n < M; n++) { /* row n is C's column n */
                        uint16_t *out = y + ((t + q) * TB + n) * (int64_t)O + o0;
                        for (int half = 0; half < 2; half++) {
                            const __m512i bits = bf16_bits(c_column(c[q][half], n));
                            _mm256_storeu_si256((__m256i *)(out + half * TB), _mm512_cvtepi32_epi16(bits));
                        }
                    }
            }
        }
        _tile_release();
    }
    trimmed(&linear_scratch);
    return 0;
}
