/* Greedy sampling's argmax over the vocabulary (serve/layers/sampler.py), as torch.argmax picks it: the
   first index of the largest value, or of the first NaN where a row holds one (NaN counts as the largest).
   PyTorch's CPU argmax is a scalar loop: ~90 us for SmolLM2's 49,152 float32 logits and ~250 us in bf16,
   a few percent of a batch-1 decode step; two vector passes over the row, called from Python, 28-34 us. */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* 8 values from x[i] (bf16 or float32) as floats. */
static inline __m256 ld8(const void* x, int64_t i, int bf16) {
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(
                  _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)x + i))), 16));
    return _mm256_loadu_ps((const float*)x + i);
}
static inline float ld1(const void* x, int64_t i, int bf16) {
    if (!bf16) return ((const float*)x)[i];
    union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t*)x)[i] << 16};
    return v.f;
}

static int64_t argmax_row(const void* x, int64_t n, int bf16) {
    const int64_t n8 = n & ~(int64_t)7;
    __m256 mx = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) {
        const __m256 v = ld8(x, i, bf16);
        mx = _mm256_max_ps(mx, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], best = -INFINITY;
    _mm256_storeu_ps(lanes, mx);
    for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
    int any_nan = _mm256_movemask_ps(nan) != 0;
    for (int64_t i = n8; i < n; i++) {
        const float v = ld1(x, i, bf16);
        if (v != v) any_nan = 1;
        else if (v > best) best = v;
    }
    for (int64_t i = 0; i < n8; i += 8) {  /* the first lane equal to the maximum (or unordered: a NaN) */
        const __m256 v = ld8(x, i, bf16);
        const int hit = _mm256_movemask_ps(any_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)
                                                   : _mm256_cmp_ps(v, _mm256_set1_ps(best), _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz((unsigned)hit);
    }
    for (int64_t i = n8; i < n; i++) {
        const float v = ld1(x, i, bf16);
        if (any_nan ? v != v : v == best) return i;
    }
    return 0;  /* n == 0 */
}

/* out[r] = argmax of row r of x [rows][n] (bf16 if bf16, else float32). */
void slimlm_argmax(const void* x, int64_t* out, int rows, int64_t n, int bf16) {
    for (int r = 0; r < rows; r++)
        out[r] = argmax_row((const char*)x + (size_t)r * (size_t)n * (bf16 ? 2 : 4), n, bf16);
}
