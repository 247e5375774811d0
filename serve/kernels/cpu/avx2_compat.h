/* The AVX-512 intrinsics the kernels use, for CPUs with AVX2 + FMA + F16C only (cpu_build.py compiles
   every kernel for AVX-512 F/BW/VL/DQ/BF16 where the CPU has it, else with this header for AVX2).

   Each 512-bit type becomes a pair of 256-bit registers (a struct the compiler keeps in registers), and
   each `_mm512_*` intrinsic (and the few AVX-512VL forms on 256-bit vectors) a macro for a function here
   that does the same on the two halves, so the kernels' source stays as it is. (GCC's own 512-bit vector
   types on an AVX2 target were tried first: it splits and joins them lane by lane, ~15x slower.)
   Results are the AVX-512 instruction's bits wherever the kernels' tests look: `vdpbf16ps` is two fused
   multiply-adds, the odd element of each pair first as the instruction sums (a product of two bf16 is
   exact in float32); `vcvtneps2bf16` rounds to nearest even in integers (NaN kept quiet; denormals are
   rounded, not flushed, as PyTorch's bf16 conversion does); the reductions add in GCC's AVX-512 order.
   Masked loads and stores touch only the lanes their mask names, as the instructions do. A cast to the
   same struct type, as the kernels write `(__m512bh)v`, is a GCC extension (ISO C forbids it). */
#ifndef SLIMLM_AVX2_COMPAT_H
#define SLIMLM_AVX2_COMPAT_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct { __m256 lo, hi; } sl_v16f;
typedef struct { __m256i lo, hi; } sl_v16i;   /* 16 x 32-bit, 32 x 16-bit (bf16 pairs), or 64 bytes */
#define __m512 sl_v16f
#define __m512i sl_v16i
#define __m512bh sl_v16i

static inline sl_v16f sl_f(__m256 lo, __m256 hi) { sl_v16f r = {lo, hi}; return r; }
static inline sl_v16i sl_i(__m256i lo, __m256i hi) { sl_v16i r = {lo, hi}; return r; }
/* A 16-bit lane mask as lanes of all ones (bit set) or zero, 8 per half. */
static inline __m256i sl_lanes8(unsigned k) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)(k & 0xFF)), bit), bit);
}

/* ---- float32 x 16 ---- */
static inline sl_v16f sl_set1_ps(float x) { return sl_f(_mm256_set1_ps(x), _mm256_set1_ps(x)); }
static inline sl_v16f sl_setzero_ps(void) { return sl_f(_mm256_setzero_ps(), _mm256_setzero_ps()); }
static inline sl_v16f sl_loadu_ps(const void* p) {
    return sl_f(_mm256_loadu_ps((const float*)p), _mm256_loadu_ps((const float*)p + 8));
}
static inline void sl_storeu_ps(void* p, sl_v16f v) {
    _mm256_storeu_ps((float*)p, v.lo);
    _mm256_storeu_ps((float*)p + 8, v.hi);
}
#define SL_F2(name, op) \
    static inline sl_v16f name(sl_v16f a, sl_v16f b) { return sl_f(op(a.lo, b.lo), op(a.hi, b.hi)); }
SL_F2(sl_add_ps, _mm256_add_ps)
SL_F2(sl_sub_ps, _mm256_sub_ps)
SL_F2(sl_mul_ps, _mm256_mul_ps)
SL_F2(sl_div_ps, _mm256_div_ps)
SL_F2(sl_max_ps, _mm256_max_ps)
SL_F2(sl_min_ps, _mm256_min_ps)
#undef SL_F2
static inline sl_v16f sl_fmadd_ps(sl_v16f a, sl_v16f b, sl_v16f c) {
    return sl_f(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
static inline sl_v16f sl_fnmadd_ps(sl_v16f a, sl_v16f b, sl_v16f c) {
    return sl_f(_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi));
}
/* GCC's AVX-512 order: halves, then quarters, then the pairs of a quarter. */
static inline float sl_reduce_add_ps(sl_v16f v) {
    __m256 a = _mm256_add_ps(v.hi, v.lo);
    __m128 b = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    __m128 c = _mm_add_ps(b, _mm_shuffle_ps(b, b, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, _MM_SHUFFLE(0, 1, 0, 1))));
}
static inline float sl_reduce_max_ps(sl_v16f v) {
    __m256 a = _mm256_max_ps(v.hi, v.lo);
    __m128 b = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    __m128 c = _mm_max_ps(b, _mm_shuffle_ps(b, b, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_max_ss(c, _mm_shuffle_ps(c, c, _MM_SHUFFLE(0, 1, 0, 1))));
}
static inline sl_v16f sl_round_nearest(sl_v16f v) {
    return sl_f(_mm256_round_ps(v.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                _mm256_round_ps(v.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
/* p * 2^n for integral n in [-126, 127] (exp16's range), as vscalefps gives it there. */
static inline __m256 sl_scalef8(__m256 p, __m256 n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline sl_v16f sl_scalef_ps(sl_v16f p, sl_v16f n) { return sl_f(sl_scalef8(p.lo, n.lo), sl_scalef8(p.hi, n.hi)); }
static inline sl_v16f sl_cvtepi32_ps(sl_v16i v) { return sl_f(_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)); }
static inline sl_v16i sl_cvtps_epi32(sl_v16f v) { return sl_i(_mm256_cvtps_epi32(v.lo), _mm256_cvtps_epi32(v.hi)); }
static inline sl_v16i sl_cvt_floor_epi32(sl_v16f v) {
    return sl_i(_mm256_cvtps_epi32(_mm256_floor_ps(v.lo)), _mm256_cvtps_epi32(_mm256_floor_ps(v.hi)));
}
static inline uint16_t sl_cmplt_mask(sl_v16f a, sl_v16f b) {
    return (uint16_t)(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OS))
                      | _mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OS)) << 8);
}
static inline sl_v16f sl_mask_blend_ps(uint16_t k, sl_v16f a, sl_v16f b) {  /* lane i: bit i ? b : a */
    return sl_f(_mm256_blendv_ps(a.lo, b.lo, _mm256_castsi256_ps(sl_lanes8(k))),
                _mm256_blendv_ps(a.hi, b.hi, _mm256_castsi256_ps(sl_lanes8(k >> 8))));
}
static inline sl_v16f sl_maskz_mov_ps(uint16_t k, sl_v16f a) { return sl_mask_blend_ps(k, sl_setzero_ps(), a); }
static inline sl_v16f sl_mask_loadu_ps(sl_v16f src, uint16_t k, const void* p) {
    if (k == 0xFFFF) return sl_loadu_ps(p);
    const __m256i mlo = sl_lanes8(k), mhi = sl_lanes8(k >> 8);
    sl_v16f v = sl_f(_mm256_maskload_ps((const float*)p, mlo), _mm256_maskload_ps((const float*)p + 8, mhi));
    return sl_mask_blend_ps(k, src, v);
}
static inline sl_v16f sl_maskz_loadu_ps(uint16_t k, const void* p) { return sl_mask_loadu_ps(sl_setzero_ps(), k, p); }
static inline void sl_mask_storeu_ps(void* p, uint16_t k, sl_v16f v) {
    if (k == 0xFFFF) { sl_storeu_ps(p, v); return; }
    _mm256_maskstore_ps((float*)p, sl_lanes8(k), v.lo);
    _mm256_maskstore_ps((float*)p + 8, sl_lanes8(k >> 8), v.hi);
}
static inline sl_v16f sl_cvtph_ps(__m256i h) {
    return sl_f(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
}
static inline sl_v16f sl_castsi512_ps(sl_v16i v) { return sl_f(_mm256_castsi256_ps(v.lo), _mm256_castsi256_ps(v.hi)); }

/* ---- integers ---- */
static inline sl_v16i sl_loadu_si512(const void* p) {
    return sl_i(_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)p + 1));
}
static inline sl_v16i sl_set1_epi32(int x) { return sl_i(_mm256_set1_epi32(x), _mm256_set1_epi32(x)); }
static inline sl_v16i sl_set1_epi16(short x) { return sl_i(_mm256_set1_epi16(x), _mm256_set1_epi16(x)); }
static inline sl_v16i sl_slli_epi32(sl_v16i v, int n) { return sl_i(_mm256_slli_epi32(v.lo, n), _mm256_slli_epi32(v.hi, n)); }
static inline sl_v16i sl_srli_epi16(sl_v16i v, int n) { return sl_i(_mm256_srli_epi16(v.lo, n), _mm256_srli_epi16(v.hi, n)); }
static inline sl_v16i sl_add_epi32(sl_v16i a, sl_v16i b) {
    return sl_i(_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi));
}
static inline sl_v16i sl_or_si512(sl_v16i a, sl_v16i b) { return sl_i(_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)); }
static inline sl_v16i sl_and_si512(sl_v16i a, sl_v16i b) {
    return sl_i(_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi));
}
static inline sl_v16i sl_ternlog_ea(sl_v16i a, sl_v16i b, sl_v16i c) { return sl_or_si512(sl_and_si512(a, b), c); }
static inline sl_v16i sl_cvtepu16_epi32(__m256i h) {
    return sl_i(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)));
}
static inline sl_v16i sl_cvtepu8_epi32(__m128i b) {
    return sl_i(_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
}
static inline sl_v16i sl_cvtepi8_epi32(__m128i b) {
    return sl_i(_mm256_cvtepi8_epi32(b), _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}
static inline void sl_mask_storeu_epi32(void* p, uint16_t k, sl_v16i v) {
    if (k == 0xFFFF) {
        _mm256_storeu_si256((__m256i*)p, v.lo);
        _mm256_storeu_si256((__m256i*)p + 1, v.hi);
        return;
    }
    _mm256_maskstore_epi32((int*)p, sl_lanes8(k), v.lo);
    _mm256_maskstore_epi32((int*)p + 8, sl_lanes8(k >> 8), v.hi);
}
static inline void sl_mask_storeu_epi16(void* p, uint16_t k, __m256i v) {
    if (k == 0xFFFF) { _mm256_storeu_si256((__m256i*)p, v); return; }
    uint16_t lanes[16];
    memcpy(lanes, &v, 32);
    for (int i = 0; i < 16; i++) if (k >> i & 1) ((uint16_t*)p)[i] = lanes[i];
}
static inline __m256i sl_maskz_loadu_epi16(uint16_t k, const void* p) {
    if (k == 0xFFFF) return _mm256_loadu_si256((const __m256i*)p);
    uint16_t lanes[16] = {0};
    for (int i = 0; i < 16; i++) if (k >> i & 1) lanes[i] = ((const uint16_t*)p)[i];
    __m256i v;
    memcpy(&v, lanes, 32);
    return v;
}

/* ---- bf16 ---- */
/* float32 -> bf16, round to nearest even, in the low 16 bits of each 32-bit lane. */
static inline __m256i sl_bf16_bits8(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, quiet, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}
static inline __m256i sl_cvtneps_pbh(sl_v16f v) {  /* 16 bf16, in order */
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(sl_bf16_bits8(v.lo), sl_bf16_bits8(v.hi)), 0xD8);
}
static inline __m128i sl_cvtneps_pbh128(__m128 v) {  /* 4 bf16 in the low 64 bits */
    __m128i r = _mm256_castsi256_si128(sl_bf16_bits8(_mm256_castps128_ps256(v)));
    return _mm_packus_epi32(r, r);
}
/* acc + a.odd * b.odd, then + a.even * b.even, per 32-bit lane of bf16 pairs. */
static inline __m256 sl_dpbf16_8(__m256 acc, __m256i a, __m256i b) {
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, hi)), _mm256_castsi256_ps(_mm256_and_si256(b, hi)), acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
                           acc);
}
static inline sl_v16f sl_dpbf16_ps(sl_v16f acc, sl_v16i a, sl_v16i b) {
    return sl_f(sl_dpbf16_8(acc.lo, a.lo, b.lo), sl_dpbf16_8(acc.hi, a.hi, b.hi));
}

#define _mm512_set1_ps sl_set1_ps
#define _mm512_setzero_ps sl_setzero_ps
#define _mm512_loadu_ps sl_loadu_ps
#define _mm512_load_ps sl_loadu_ps
#define _mm512_storeu_ps sl_storeu_ps
#define _mm512_store_ps sl_storeu_ps
#define _mm512_add_ps sl_add_ps
#define _mm512_sub_ps sl_sub_ps
#define _mm512_mul_ps sl_mul_ps
#define _mm512_div_ps sl_div_ps
#define _mm512_fmadd_ps sl_fmadd_ps
#define _mm512_fnmadd_ps sl_fnmadd_ps
#define _mm512_max_ps sl_max_ps
#define _mm512_min_ps sl_min_ps
#define _mm512_reduce_add_ps sl_reduce_add_ps
#define _mm512_reduce_max_ps sl_reduce_max_ps
#define _mm512_roundscale_ps(v, imm) sl_round_nearest(v)        /* the kernels pass TO_NEAREST_INT only */
#define _mm512_scalef_ps sl_scalef_ps
#define _mm512_cvtepi32_ps sl_cvtepi32_ps
#define _mm512_cvtps_epi32 sl_cvtps_epi32
#define _mm512_cvt_roundps_epi32(v, imm) sl_cvt_floor_epi32(v)  /* the kernels pass TO_NEG_INF only */
#define _mm512_cmp_ps_mask(a, b, imm) sl_cmplt_mask(a, b)      /* the kernels pass _CMP_LT_OS only */
#define _mm512_mask_blend_ps sl_mask_blend_ps
#define _mm512_maskz_mov_ps sl_maskz_mov_ps
#define _mm512_mask_loadu_ps sl_mask_loadu_ps
#define _mm512_maskz_loadu_ps sl_maskz_loadu_ps
#define _mm512_mask_storeu_ps sl_mask_storeu_ps
#define _mm512_cvtph_ps sl_cvtph_ps
#define _mm512_castsi512_ps sl_castsi512_ps
#define _mm512_loadu_si512 sl_loadu_si512
#define _mm512_set1_epi32 sl_set1_epi32
#define _mm512_set1_epi16 sl_set1_epi16
#define _mm512_slli_epi32 sl_slli_epi32
#define _mm512_srli_epi16 sl_srli_epi16
#define _mm512_add_epi32 sl_add_epi32
#define _mm512_or_si512 sl_or_si512
#define _mm512_and_si512 sl_and_si512
#define _mm512_ternarylogic_epi32(a, b, c, imm) sl_ternlog_ea(a, b, c)  /* the kernels pass 0xEA only */
#define _mm512_cvtepu16_epi32 sl_cvtepu16_epi32
#define _mm512_cvtepu8_epi32 sl_cvtepu8_epi32
#define _mm512_cvtepi8_epi32 sl_cvtepi8_epi32
#define _mm512_mask_storeu_epi32 sl_mask_storeu_epi32
#define _mm256_mask_storeu_epi16 sl_mask_storeu_epi16
#define _mm256_maskz_loadu_epi16 sl_maskz_loadu_epi16
#define _mm512_cvtneps_pbh sl_cvtneps_pbh
#define _mm_cvtneps_pbh sl_cvtneps_pbh128
#define _mm512_dpbf16_ps sl_dpbf16_ps

#endif  /* SLIMLM_AVX2_COMPAT_H */
