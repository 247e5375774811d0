/* Shared by every CPU kernel: 16-lane loads and stores of bf16 or fp32 as fp32 vectors, the rounding
   to the storage dtype that each PyTorch op on bf16 tensors applies to its result, prefetch, exp. */
#ifndef SLIMLM_PRELUDE_H
#define SLIMLM_PRELUDE_H
#include <immintrin.h>
#ifndef __AVX512F__
#include "avx2_compat.h"  /* the AVX2 build (cpu_build.py) */
#endif
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512 ld16(const void* p, size_t i, int bf16) {
    if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                  _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i))), 16));
    return _mm512_loadu_ps((const float*)p + i);
}
static inline __m512 ld16_i8(const void* p, size_t i) {  /* 16 int8 as fp32 */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)p + i))));
}
static inline void st16(void* p, size_t i, __m512 v, int bf16) {
    if (bf16) _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), (__m256i)_mm512_cvtneps_pbh(v));
    else _mm512_storeu_ps((float*)p + i, v);
}
static inline __m512 rnd(__m512 v, int bf16) {
    if (!bf16) return v;
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
/* A software prefetch into L1 the compiler cannot drop (gcc deletes _mm_prefetch loops it deems
   side-effect free). */
static inline void prefetch(const void* p) { __asm__ volatile("prefetcht0 %0" : : "m"(*(const char*)p)); }
static inline void prefetch_range(const void* p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) prefetch((const char*)p + o);
}
/* e^x as 2^n 2^f, f in [-0.5, 0.5], degree-6 polynomial (relative error ~2e-7); x clamped to
   [-87, 88], so e^x for very negative x is ~1e-38 rather than 0, which no softmax or SiLU notices. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif  /* SLIMLM_PRELUDE_H */
