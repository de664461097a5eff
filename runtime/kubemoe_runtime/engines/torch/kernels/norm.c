/*
 * RMSNorm over rows of bf16: y = bf16(x * w / sqrt(mean(x^2) + eps)), float inside, one rounding (as
 * torch's F.rms_norm on bf16 computes it). Every kernel library has it (moe_bf16.c includes this file,
 * after attention.c, whose widen8 it uses); AVX2 + FMA code, which the AVX-512 libraries run too.
 *
 * Why: torch's rms_norm on bf16 is a chain of float32 ops, each a pass over the rows: a 16 x 128-token
 * prefill of the bench model spent about a quarter of its time in them (its hidden and q/k norms, ~8 ms a
 * call on [2048, 1024] with the rows out of cache). This reads each row twice (the second from cache) and
 * writes it once.
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

int kubemoe_rms_norm(const uint16_t *x, int64_t outer_stride, int64_t inner_stride, int64_t inner,
                     const uint16_t *w, int64_t rows, int dim, float eps, uint16_t *y, int threads) {
    if (rows < 0 || inner <= 0 || rows % inner || dim <= 0 || dim % 8 || inner_stride < dim ||
        outer_stride < (inner - 1) * inner_stride + dim)
        return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r / inner * outer_stride + r % inner * inner_stride;
        uint16_t *yr = y + r * (int64_t)dim;
        __m256 ss = _mm256_setzero_ps();
        for (int j = 0; j < dim; j += 8) {
            const __m256 v = widen8(xr + j);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(sum8(ss) / (float)dim + eps));
        for (int j = 0; j < dim; j += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_mul_ps(widen8(xr + j), inv), widen8(w + j));
            _mm_storeu_si128((__m128i *)(yr + j), narrow8(v));
        }
    }
    return 0;
}
