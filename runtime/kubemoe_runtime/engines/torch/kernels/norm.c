/*
 * RMSNorm over rows of bf16, the same after the residual add, and fused with rotary embedding in the
 * halves form (Qwen3's q/k norm then RoPE, or Mixtral's RoPE alone), float inside, one rounding. Every
 * kernel library has them (moe_bf16.c includes this file, after attention.c, whose widen8 it uses);
 * AVX2 + FMA code, which the AVX-512 libraries run too.
 *
 * Why: torch's rms_norm on bf16 is a chain of float32 ops, each a pass over the rows: a 16 x 128-token
 * prefill of the bench model spent about a quarter of its time in them (its hidden and q/k norms, ~8 ms a
 * call on [2048, 1024] with the rows out of cache); rotary in torch is five more passes over q and k (a
 * multiply, a roll, a multiply, an add, each rounding to bf16: ~45 ms of that prefill's ~600). This reads
 * each row twice (the second from cache) and writes it once.
 *
 *   x  [rows / inner, inner, dim]: row r at (r / inner) * outer_stride + (r % inner) * inner_stride elements
 *      (the q heads of a fused projection's output are rows of a head, `inner` a token, a token's stride
 *      apart); w [dim]; y [rows, dim] contiguous; dim a multiple of 8. Returns 0; -1 for sizes it does
 *      not take.
 */
INLINE __m128i narrow8(__m256 f) { /* 8 floats -> 8 bf16, round to nearest even (to_bf16's rule) */
    const __m256i u = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)); /* NaN stays a (quiet) NaN */
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)); /* each <= 0xffff */
}

static int norm_rows_fit(int64_t outer_stride, int64_t inner_stride, int64_t inner, int64_t rows, int dim) {
    return rows >= 0 && inner > 0 && rows % inner == 0 && dim > 0 && dim % 8 == 0 && inner_stride >= dim &&
           outer_stride >= (inner - 1) * inner_stride + dim;
}

INLINE __m256 inv_rms(const uint16_t *xr, int dim, float eps) { /* 1 / sqrt(mean(x^2) + eps), 8 wide */
    __m256 ss = _mm256_setzero_ps();
    for (int j = 0; j < dim; j += 8) {
        const __m256 v = widen8(xr + j);
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    return _mm256_set1_ps(1.0f / sqrtf(reduce8(ss) / (float)dim + eps));
}

int kubemoe_rms_norm(const uint16_t *x, int64_t outer_stride, int64_t inner_stride, int64_t inner,
                     const uint16_t *w, int64_t rows, int dim, float eps, uint16_t *y, int threads) {
    if (!norm_rows_fit(outer_stride, inner_stride, inner, rows, dim))
        return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r / inner * outer_stride + r % inner * inner_stride;
        uint16_t *yr = y + r * (int64_t)dim;
        const __m256 inv = inv_rms(xr, dim, eps);
        for (int j = 0; j < dim; j += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_mul_ps(widen8(xr + j), inv), widen8(w + j));
            _mm_storeu_si128((__m128i *)(yr + j), narrow8(v));
        }
    }
    return 0;
}

/*
 * The residual add and the next norm in one pass (each layer's two, as vLLM's fused_add_rms_norm):
 * h = bf16(x + r), y = RMSNorm(h) of the rounded h, w. The very bits of torch's bf16 add, then
 * kubemoe_rms_norm on its result; h is read back from cache, not memory. x, r, h, y [rows, dim] contiguous.
 */
int kubemoe_add_rms_norm(const uint16_t *x, const uint16_t *r, const uint16_t *w, int64_t rows, int dim,
                         float eps, uint16_t *h, uint16_t *y, int threads) {
    if (rows < 0 || dim <= 0 || dim % 8)
        return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xr = x + i * dim, *rr = r + i * dim;
        uint16_t *hr = h + i * dim, *yr = y + i * dim;
        for (int j = 0; j < dim; j += 8)
            _mm_storeu_si128((__m128i *)(hr + j), narrow8(_mm256_add_ps(widen8(xr + j), widen8(rr + j))));
        const __m256 inv = inv_rms(hr, dim, eps);
        for (int j = 0; j < dim; j += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_mul_ps(widen8(hr + j), inv), widen8(w + j));
            _mm_storeu_si128((__m128i *)(yr + j), narrow8(v));
        }
    }
    return 0;
}

/*
 * Rotary embedding of heads, after their RMSNorm where w is given (w NULL: rotation alone, eps unused).
 * x, w, y as kubemoe_rms_norm's, a row a head and `inner` heads a token; cos and sin float [rows / inner,
 * dim / 2], a row per token (the heads of a token share its rotation); dim a multiple of 16. Halves form
 * (rotate-half, transformers' default), with a = the normed head and h = dim / 2:
 *   y[j] = a[j] cos[j] - a[j + h] sin[j],   y[j + h] = a[j + h] cos[j] + a[j] sin[j].
 */
int kubemoe_norm_rope(const uint16_t *x, int64_t outer_stride, int64_t inner_stride, int64_t inner,
                      const uint16_t *w, int64_t rows, int dim, float eps, const float *cos, const float *sin,
                      uint16_t *y, int threads) {
    if (!norm_rows_fit(outer_stride, inner_stride, inner, rows, dim) || dim % 16)
        return -1;
    const int half = dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t token = r / inner;
        const uint16_t *xr = x + token * outer_stride + r % inner * inner_stride;
        const float *cr = cos + token * half, *sr = sin + token * half;
        uint16_t *yr = y + r * (int64_t)dim;
        const __m256 inv = w ? inv_rms(xr, dim, eps) : _mm256_set1_ps(1.0f);
        for (int j = 0; j < half; j += 8) {
            __m256 a = _mm256_mul_ps(widen8(xr + j), inv), b = _mm256_mul_ps(widen8(xr + half + j), inv);
            if (w) {
                a = _mm256_mul_ps(a, widen8(w + j));
                b = _mm256_mul_ps(b, widen8(w + half + j));
            }
            const __m256 c = _mm256_loadu_ps(cr + j), s = _mm256_loadu_ps(sr + j);
            _mm_storeu_si128((__m128i *)(yr + j), narrow8(_mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s))));
            _mm_storeu_si128((__m128i *)(yr + half + j), narrow8(_mm256_fmadd_ps(b, c, _mm256_mul_ps(a, s))));
        }
    }
    return 0;
}
