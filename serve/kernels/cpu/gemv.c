/* GEMV over weights held in oneDNN's packed layout (serve/layers/linear.py says why). */
#ifndef SLIMLM_GEMV_C
#define SLIMLM_GEMV_C
#include "prelude.h"

#ifdef __AVX512F__
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

#else  /* AVX2 */

/* The AVX2 form. vdpbf16ps emulated by the compat header (four integer ops per pair of FMAs) in the
   AVX-512 tile (4 rows x 64 columns: 32 ymm accumulators, which spill) ran at 20-23 GMAC/s at one row
   and ~40-55 from 16 rows on this machine's two Zen 3 cores. Here each weight pair is split into its odd
   and even floats once for all rows, x's pairs once per call (xo, xe: [m][in/2] floats, broadcast from
   memory), and a tile is 16 output columns by up to AVX2_ROWS rows: 8 ymm accumulators, which with the
   weights' 4 and a broadcast fit the 16 registers (6 rows spilled: 0.8x). One row takes the whole
   64-column block in one pass. Each sum runs in vdpbf16ps's order (odd product, then even, per input
   pair), so the results are the AVX-512 form's bits. */
#define AVX2_ROWS 4
/* Up to this many rows (decode batches) every 4-row tile reads a whole block in one pass (bf16_rows_avx2);
   from here on (prefill) each 16-column slice is copied into L1 once and every tile reads the copy. */
#define AVX2_ONE_PASS_ROWS 16

/* 8 bias entries from `col` as floats: bf16 `bias`, else float32 `fbias`, else zeros. */
static inline __m256 bias8(const uint16_t* bias, const float* fbias, int col) {
    if (fbias) return _mm256_loadu_ps(fbias + col);
    if (!bias) return _mm256_setzero_ps();
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(bias + col))), 16));
}

static inline __attribute__((always_inline)) void bf16_slice_avx2(
        const uint16_t* ws, size_t kstride, const float* xo, const float* xe, int half_in, uint16_t* y,
        const uint16_t* bias, const float* fbias, int m, int out, int col) {
    __m256 acc[AVX2_ROWS][2];
    for (int r = 0; r < m; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000);
    for (int k = 0; k < half_in; k++) {           /* 16 columns x input pair k: 64 bytes */
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)(ws + k * kstride));
        const __m256i w1 = _mm256_loadu_si256((const __m256i*)(ws + k * kstride + 16));
        __m256 p0 = _mm256_castsi256_ps(_mm256_and_si256(w0, hi)), p1 = _mm256_castsi256_ps(_mm256_and_si256(w1, hi));
        for (int r = 0; r < m; r++) {
            __m256 xv = _mm256_broadcast_ss(xo + (size_t)r * half_in + k);
            acc[r][0] = _mm256_fmadd_ps(p0, xv, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(p1, xv, acc[r][1]);
        }
        p0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
        p1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
        for (int r = 0; r < m; r++) {
            __m256 xv = _mm256_broadcast_ss(xe + (size_t)r * half_in + k);
            acc[r][0] = _mm256_fmadd_ps(p0, xv, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(p1, xv, acc[r][1]);
        }
    }
    const __m256 b0 = bias8(bias, fbias, col), b1 = bias8(bias, fbias, col + 8);
    for (int r = 0; r < m; r++)
        _mm256_storeu_si256((__m256i*)(y + (size_t)r * out + col),
                            sl_cvtneps_pbh(sl_f(_mm256_add_ps(acc[r][0], b0), _mm256_add_ps(acc[r][1], b1))));
}

/* One row of x against a whole 64-row block (decode at batch 1: one pass over the weight). */
static inline void bf16_row_avx2(const uint16_t* wb, const float* xo, const float* xe, int half_in, uint16_t* y,
                                 const uint16_t* bias, int col) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000);
    for (int k = 0; k < half_in; k++) {
        const uint16_t* wk = wb + (size_t)k * 128;
        const __m256 xov = _mm256_broadcast_ss(xo + k), xev = _mm256_broadcast_ss(xe + k);
        for (int j = 0; j < 8; j++) {
            const __m256i wj = _mm256_loadu_si256((const __m256i*)(wk + 16 * j));
            acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wj, hi)), xov, acc[j]);
            acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wj, 16)), xev, acc[j]);
        }
    }
    for (int j = 0; j < 8; j += 2) {
        const __m256 b0 = bias8(bias, NULL, col + 8 * j), b1 = bias8(bias, NULL, col + 8 * j + 8);
        _mm256_storeu_si256((__m256i*)(y + col + 8 * j), sl_cvtneps_pbh(sl_f(_mm256_add_ps(acc[j], b0), _mm256_add_ps(acc[j + 1], b1))));
    }
}

/* 2..AVX2_ROWS rows of x against a whole 64-row block in one pass over it, as bf16_row_avx2 reads it
   (each input pair's 256 bytes in one go). The 16-column slices of bf16_block_avx2 read a block four
   times, 64 of every 256 bytes each time: 4-6 GB/s from memory on two Zen 3 cores against 13-14 GB/s
   for one row, so a 2-row step (a speculative verify pass, two decoding sequences) cost 2.3x a 1-row
   one. Here the m x 8 accumulators spill (from m = 2), which costs L1 traffic, not memory bandwidth.
   Same sums in the same order as the other forms: the same bits. */
static inline __attribute__((always_inline)) void bf16_rows_avx2(
        const uint16_t* wb, const float* xo, const float* xe, int half_in, int m, uint16_t* y, int out,
        const uint16_t* bias, const float* fbias, int col) {
    __m256 acc[AVX2_ROWS][8];
    for (int r = 0; r < m; r++)
        for (int j = 0; j < 8; j++) acc[r][j] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000);
    for (int k = 0; k < half_in; k++) {
        const uint16_t* wk = wb + (size_t)k * 128;
        __m256 xov[AVX2_ROWS], xev[AVX2_ROWS];
        for (int r = 0; r < m; r++) {
            xov[r] = _mm256_broadcast_ss(xo + (size_t)r * half_in + k);
            xev[r] = _mm256_broadcast_ss(xe + (size_t)r * half_in + k);
        }
        for (int j = 0; j < 8; j++) {
            const __m256i wj = _mm256_loadu_si256((const __m256i*)(wk + 16 * j));
            const __m256 ph = _mm256_castsi256_ps(_mm256_and_si256(wj, hi));
            const __m256 pl = _mm256_castsi256_ps(_mm256_slli_epi32(wj, 16));
            for (int r = 0; r < m; r++) {
                acc[r][j] = _mm256_fmadd_ps(ph, xov[r], acc[r][j]);
                acc[r][j] = _mm256_fmadd_ps(pl, xev[r], acc[r][j]);
            }
        }
    }
    for (int j = 0; j < 8; j += 2) {
        const __m256 b0 = bias8(bias, fbias, col + 8 * j), b1 = bias8(bias, fbias, col + 8 * j + 8);
        for (int r = 0; r < m; r++)
            _mm256_storeu_si256((__m256i*)(y + (size_t)r * out + col + 8 * j),
                                sl_cvtneps_pbh(sl_f(_mm256_add_ps(acc[r][j], b0), _mm256_add_ps(acc[r][j + 1], b1))));
    }
}

/* x [m][in] bf16 as input pairs split into their odd and even entries as floats, xo and xe [m][(in + 1) / 2]
   (an odd count pairs its last input with a zero). */
static void split_pairs(const uint16_t* x, int m, int in, float* xo, float* xe) {
    const int kp = (in + 1) / 2;
    for (int r = 0; r < m; r++)
        for (int k = 0; k < kp; k++) {
            const uint16_t* xr = x + (size_t)r * in;
            uint32_t odd = 2 * k + 1 < in ? (uint32_t)xr[2 * k + 1] << 16 : 0, even = (uint32_t)xr[2 * k] << 16;
            memcpy(xo + (size_t)r * kp + k, &odd, 4);
            memcpy(xe + (size_t)r * kp + k, &even, 4);
        }
}

/* m rows of x (split: xo, xe [m][half_in]) against one 64-row block wb ([half_in][64][2] bf16) into y's
   columns col..col + 63 (rows `out` apart), bias bf16 or float32 (fbias) or none. From AVX2_ROWS + 1
   rows each 16-column slice is first copied out contiguously into buf (half_in * 32 entries; in the
   block its lines lie 256 bytes apart, which L1 holds only a quarter of), then every tile of rows reads
   the copy. */
static void bf16_block_avx2(const uint16_t* wb, const float* xo, const float* xe, int half_in, int m, uint16_t* y,
                            int out, int col, const uint16_t* bias, const float* fbias, uint16_t* buf) {
    if (m <= AVX2_ROWS) {                       /* constant row counts: registers where they fit */
        switch (m) {
            case 1: bf16_rows_avx2(wb, xo, xe, half_in, 1, y, out, bias, fbias, col); return;
            case 2: bf16_rows_avx2(wb, xo, xe, half_in, 2, y, out, bias, fbias, col); return;
            case 3: bf16_rows_avx2(wb, xo, xe, half_in, 3, y, out, bias, fbias, col); return;
            default: bf16_rows_avx2(wb, xo, xe, half_in, 4, y, out, bias, fbias, col); return;
        }
    }
    for (int s = 0; s < 4; s++) {               /* a 16-column slice */
        const uint16_t* ws = wb + s * 32;
        size_t kstride = 128;
        if (m > AVX2_ROWS) {
            for (int k = 0; k < half_in; k++) memcpy(buf + (size_t)k * 32, ws + (size_t)k * 128, 64);
            ws = buf;
            kstride = 32;
        }
        for (int r = 0; r < m; r += AVX2_ROWS) {
            const float* o = xo + (size_t)r * half_in;
            const float* e = xe + (size_t)r * half_in;
            uint16_t* yr = y + (size_t)r * out;
            const int c = col + s * 16;
            switch (m - r < AVX2_ROWS ? m - r : AVX2_ROWS) {  /* constant row counts: registers */
                case 1: bf16_slice_avx2(ws, kstride, o, e, half_in, yr, bias, fbias, 1, out, c); break;
                case 2: bf16_slice_avx2(ws, kstride, o, e, half_in, yr, bias, fbias, 2, out, c); break;
                case 3: bf16_slice_avx2(ws, kstride, o, e, half_in, yr, bias, fbias, 3, out, c); break;
                default: bf16_slice_avx2(ws, kstride, o, e, half_in, yr, bias, fbias, 4, out, c); break;
            }
        }
    }
}

void slimlm_gemv_bf16(const uint16_t* w, const uint16_t* x, uint16_t* y, const uint16_t* bias,
                      int m, int out, int in, int threads) {
    const int nb = out / 64, half_in = in / 2;
    float* xo = (float*)malloc(sizeof(float) * 2 * (size_t)m * half_in);
    if (!xo) abort();
    float* xe = xo + (size_t)m * half_in;
    split_pairs(x, m, in, xo, xe);
    if (m == 1) {
        #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nb >= 8)
        for (int ob = 0; ob < nb; ob++) bf16_row_avx2(w + (size_t)ob * 64 * in, xo, xe, half_in, y, bias, ob * 64);
        free(xo);
        return;
    }
    if (m <= AVX2_ONE_PASS_ROWS) {  /* tiles of up to AVX2_ROWS rows, each one pass over the block (L2 after the first) */
        #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nb >= 8)
        for (int ob = 0; ob < nb; ob++)
            for (int r = 0; r < m; r += AVX2_ROWS)
                bf16_block_avx2(w + (size_t)ob * 64 * in, xo + (size_t)r * half_in, xe + (size_t)r * half_in, half_in,
                                m - r < AVX2_ROWS ? m - r : AVX2_ROWS, y + (size_t)r * out, out, ob * 64, bias, NULL, NULL);
        free(xo);
        return;
    }
    #pragma omp parallel num_threads(threads) if (threads > 1 && nb >= 8)
    {
        uint16_t* buf = m > AVX2_ROWS ? (uint16_t*)aligned_alloc(64, (size_t)half_in * 64) : NULL;
        #pragma omp for schedule(static)
        for (int ob = 0; ob < nb; ob++)
            bf16_block_avx2(w + (size_t)ob * 64 * in, xo, xe, half_in, m, y, out, ob * 64, bias, NULL, buf);
        free(buf);
    }
    free(xo);
}
#endif  /* __AVX512F__ */

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
