/* GEMV over weights held in oneDNN's packed layout (serve/layers/linear.py says why). */
#ifndef SLIMLM_GEMV_C
#define SLIMLM_GEMV_C
#include "prelude.h"

/* bf16: W in oneDNN's AB16b64a2b layout [out/64][in/32][16][64][2]; x [m][in], y [m][out] bf16,
   bias [out] bf16 or NULL. out % 64 == 0, in % 32 == 0. One 64-row block, up to 4 rows of x. */
static inline void bf16_block(const uint16_t* wb, const uint16_t* x, uint16_t* y, const uint16_t* bias,
                              int m, int out, int in, int ob) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++) for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int k = 0; k < in / 2; k++) {           /* input pair k: 4 x 64 bytes, contiguous */
        const uint16_t* wk = wb + (size_t)k * 128;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64), w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
        for (int r = 0; r < m; r++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32(((const uint32_t*)(x + (size_t)r * in))[k]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xb);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xb);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, xb);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, xb);
        }
    }
    for (int j = 0; j < 4; j++) {
        __m512 b = _mm512_setzero_ps();
        if (bias) b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                          _mm256_loadu_si256((const __m256i*)(bias + ob * 64 + j * 16))), 16));
        for (int r = 0; r < m; r++)
            _mm256_storeu_si256((__m256i*)(y + (size_t)r * out + ob * 64 + j * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][j], b)));
    }
}

void slimlm_gemv_bf16(const uint16_t* w, const uint16_t* x, uint16_t* y, const uint16_t* bias,
                      int m, int out, int in, int threads) {
    const int nb = out / 64;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nb >= 8)
    for (int ob = 0; ob < nb; ob++)
        for (int r = 0; r < m; r += 4)
            bf16_block(w + (size_t)ob * 64 * in, x + (size_t)r * in, y + (size_t)r * out, bias,
                       m - r < 4 ? m - r : 4, out, in, ob);
}

/* fp32: W row-major [out][in], in % 16 == 0; one sequential stream, four partial sums per row. */
static inline float f32_dot(const float* w, const float* x, int in) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= in; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k < in; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

void slimlm_gemv_f32(const float* w, const float* x, float* y, const float* bias,
                     int m, int out, int in, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && out >= 256)
    for (int o = 0; o < out; o++)
        for (int r = 0; r < m; r++)
            y[(size_t)r * out + o] = f32_dot(w + (size_t)o * in, x + (size_t)r * in, in) + (bias ? bias[o] : 0.f);
}

#endif  /* SLIMLM_GEMV_C */
