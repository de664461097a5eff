/*
 * Decode attention: each sequence's one new token (T = 1) against its cached keys and values; bf16 in and
 * out, float inside, one rounding. Every kernel library has it (moe_bf16.c includes this file); it is AVX2
 * + FMA code (reduce8 from moe_bf16.c), which the AVX-512 libraries run too.
 *
 * Why: at decode torch's CPU attention does little work for a lot of bookkeeping. Without AVX-512 the
 * engine widened the cached keys and values to float32 for it on every step (as an AVX2 CPU, batch 16,
 * 16 heads over 4 KV heads of 64, 141 keys: 0.80 ms a layer for 2.3 MB of keys and values), and with
 * AVX-512 its bf16 flash attention took 0.6 ms a layer.
 *
 * Items are (sequence b, KV head g), shared among the threads. In an item, the cached keys are widened to
 * float a block of ATT_BLOCK rows at a time, once for the R = H / G query heads that share them, and each
 * head dots eight keys at once (eight FMA chains, their sums folded together: no reduction per key); each
 * query's scores go through a softmax (the largest subtracted, an exp within 2 ulp of expf), and the value
 * rows, widened the same way, are summed with those weights in registers, then divided once by the
 * weights' sum. (Batch 16, 16 heads over 4 KV heads of 64, 2 threads, Zen 4: 160 keys 0.28 ms a layer
 * with a key widened per key and a reduction per score, 0.19 ms this way; 2048 keys 10 ms, 5 ms.)
 *
 *   q    [B, H, C] contiguous                keep  [B, S] bytes: 1 where the query may attend the key
 *   k, v [B, S, G, C]: [S, G, C] contiguous, kv_stride elements from one sequence to the next
 *   out  [B, H, C]                           C a multiple of 8, at most ATT_MAX_HEAD; R at most ATT_MAX_GROUP
 *
 * Returns 0; -1 for sizes it does not take; -2 where a thread could not allocate its scores (out is then
 * incomplete). A thread's scratch (scores, widened rows) is kept for its next call and grows as needed.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ATT_MAX_HEAD 256
#define ATT_MAX_GROUP 16

INLINE __m256 widen8(const uint16_t *p) { /* 8 bf16 -> 8 floats: a bf16 is the high half of a float */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

INLINE float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* e^x for x <= 0 (a score less the row's largest; -inf for a masked key), within 2 ulp of expf: Cephes'
   expf, x = n ln 2 + r, e^r by a polynomial, 2^n put into the exponent bits. Below -87, 0. */
INLINE __m256 exp8_nonpositive(__m256 x) {
    const __m256 low = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
    x = _mm256_max_ps(x, low);
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 e = _mm256_set1_ps(1.9875691500e-4f);
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.3981999507e-3f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(8.3334519073e-3f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(4.1665795894e-2f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.6666665459e-1f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(5.0000001201e-1f));
    e = _mm256_fmadd_ps(_mm256_mul_ps(e, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(e, _mm256_castsi256_ps(bits)));
}

static __thread float *att_scores; /* per thread: scores [R][SP], then keys or values widened [ATT_BLOCK][C] */
static __thread size_t att_size;

#define ATT_BLOCK 64 /* keys (or values) widened to float at a time: 32 KiB at C = 128, held in L1/L2 */

#define ATT_AHEAD 8 /* rows prefetched ahead: a sequence's rows lie G * C apart, one KV head's part of each
                       (a stride the hardware prefetcher does not follow far), and the cache holds them in
                       memory, not in cache, after a step's MoE layers (in the engine the kernel took 2.2x
                       as long as on the same rows in cache) */

/* `n` rows of C bf16 elements, `stride` elements apart, widened into dst [n][C] floats. */
static void widen_rows(const uint16_t *src, int64_t stride, int n, int C, float *dst) {
    for (int s = 0; s < n; s++) {
        const char *ahead = (const char *)(src + (s + ATT_AHEAD) * stride);
        for (int b = 0; b < C * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
        for (int i = 0; i < C; i += 8) _mm256_storeu_ps(dst + (int64_t)s * C + i, widen8(src + s * stride + i));
    }
}

/* Eight sums at once: lane j of the result is the sum of a[j]'s lanes. */
INLINE __m256 sum8x8(const __m256 a[8]) {
    const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

/* The scores of one query (qs: C floats, already scaled) against n widened keys kf [n][C], into p[0..n-1].
   Eight keys at a time, each its own FMA chain (no reduction per key: sum8x8 folds eight at once). */
static void scores_block(const float *qs, const float *kf, int n, int C, float *p) {
    int s = 0;
    for (; s + 8 <= n; s += 8) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int i = 0; i < C; i += 8) {
            const __m256 qi = _mm256_loadu_ps(qs + i);
            for (int j = 0; j < 8; j++)
                a[j] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(kf + (int64_t)(s + j) * C + i), a[j]);
        }
        _mm256_storeu_ps(p + s, sum8x8(a));
    }
    for (; s < n; s++) {
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < C; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(qs + i), _mm256_loadu_ps(kf + (int64_t)s * C + i), a);
        p[s] = reduce8(a);
    }
}

/* acc [C] += sum over n widened values vf [n][C] of w[s] * vf[s], 64 dimensions (8 registers) at a time. */
static void values_block(const float *w, const float *vf, int n, int C, float *acc) {
    for (int i0 = 0; i0 < C; i0 += 64) {
        const int nv = (C - i0 < 64 ? C - i0 : 64) / 8;
        __m256 a[8];
        for (int i = 0; i < nv; i++) a[i] = _mm256_loadu_ps(acc + i0 + 8 * i);
        for (int s = 0; s < n; s++) {
            if (w[s] == 0.0f) continue; /* a masked key, or one far below the largest */
            const __m256 ws = _mm256_set1_ps(w[s]);
            const float *row = vf + (int64_t)s * C + i0;
            for (int i = 0; i < nv; i++) a[i] = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 8 * i), a[i]);
        }
        for (int i = 0; i < nv; i++) _mm256_storeu_ps(acc + i0 + 8 * i, a[i]);
    }
}

/* One item: the R query heads of KV head g of sequence b. scratch: [R][SP] scores, then [ATT_BLOCK][C]
   widened rows, then [R][C] queries (scaled) and later their sums. Keys and values are widened a block at a
   time, once for all R heads; each head then reads them from cache. */
static void attend_item(const uint16_t *q, const uint16_t *kb, const uint16_t *vb, const uint8_t *kept, int R,
                        int G, int S, int SP, int C, float scale, uint16_t *out, float *scratch) {
    float *p = scratch, *rows = scratch + (int64_t)R * SP, *qa = rows + (int64_t)ATT_BLOCK * C;
    const int64_t stride = (int64_t)G * C;
    const __m256 scaled = _mm256_set1_ps(scale);
    for (int r = 0; r < R; r++)
        for (int i = 0; i < C; i += 8)
            _mm256_storeu_ps(qa + (int64_t)r * C + i, _mm256_mul_ps(widen8(q + (int64_t)r * C + i), scaled));
    for (int s0 = 0; s0 < S; s0 += ATT_BLOCK) { /* scores: a block of keys widened once, for every head */
        const int n = S - s0 < ATT_BLOCK ? S - s0 : ATT_BLOCK;
        widen_rows(kb + s0 * stride, stride, n, C, rows);
        for (int r = 0; r < R; r++) scores_block(qa + (int64_t)r * C, rows, n, C, p + (int64_t)r * SP + s0);
    }
    float total[ATT_MAX_GROUP];
    for (int r = 0; r < R; r++) { /* softmax weights, not yet divided by their sum; masked keys weigh 0 */
        float *pr = p + (int64_t)r * SP;
        for (int s = 0; s < S; s++)
            if (!kept[s]) pr[s] = -INFINITY;
        for (int s = S; s < SP; s++) pr[s] = -INFINITY;
        __m256 top8 = _mm256_set1_ps(-INFINITY);
        for (int s = 0; s < SP; s += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(pr + s));
        float top = max8(top8);
        if (top == -INFINITY) top = 0.0f; /* every key masked: every weight 0 */
        const __m256 t = _mm256_set1_ps(top);
        __m256 sum = _mm256_setzero_ps();
        for (int s = 0; s < SP; s += 8) {
            const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(pr + s), t));
            _mm256_storeu_ps(pr + s, e);
            sum = _mm256_add_ps(sum, e);
        }
        total[r] = reduce8(sum);
    }
    for (int r = 0; r < R; r++) memset(qa + (int64_t)r * C, 0, (size_t)C * sizeof(float)); /* now the sums */
    for (int s0 = 0; s0 < S; s0 += ATT_BLOCK) { /* values: a block widened once, for every head */
        const int n = S - s0 < ATT_BLOCK ? S - s0 : ATT_BLOCK;
        widen_rows(vb + s0 * stride, stride, n, C, rows);
        for (int r = 0; r < R; r++) values_block(p + (int64_t)r * SP + s0, rows, n, C, qa + (int64_t)r * C);
    }
    for (int r = 0; r < R; r++) { /* a query that may attend nothing gets zeros, not NaN */
        const __m256 inv = _mm256_set1_ps(total[r] > 0.0f ? 1.0f / total[r] : 0.0f);
        uint16_t *o = out + (int64_t)r * C;
        for (int i = 0; i < C; i += 8) {
            float f[8];
            _mm256_storeu_ps(f, _mm256_mul_ps(_mm256_loadu_ps(qa + (int64_t)r * C + i), inv));
            for (int j = 0; j < 8; j++) o[i + j] = to_bf16(f[j]);
        }
    }
}

int kubemoe_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t kv_stride,
                             const uint8_t *keep, int B, int H, int G, int S, int C, float scale, uint16_t *out,
                             int threads) {
    if (B <= 0 || G <= 0 || H % G || H / G > ATT_MAX_GROUP || C <= 0 || C % 8 || C > ATT_MAX_HEAD || S <= 0 ||
        S > INT32_MAX - 8)
        return -1;
    const int R = H / G, SP = (S + 7) / 8 * 8;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const size_t need = (size_t)R * SP + (size_t)(ATT_BLOCK + R) * C;
        if (need > att_size) {
            free(att_scores);
            att_scores = malloc(need * sizeof(float));
            att_size = att_scores ? need : 0;
        }
        float *p = att_scores;
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int item = 0; item < B * G; item++) {
            if (!p) continue;
            const int b = item / G, g = item % G;
            const int64_t head = (int64_t)b * H + (int64_t)g * R;
            attend_item(q + head * C, k + b * kv_stride + (int64_t)g * C, v + b * kv_stride + (int64_t)g * C,
                        keep + (int64_t)b * S, R, G, S, SP, C, scale, out + head * C, p);
        }
    }
    return failed ? -2 : 0;
}
