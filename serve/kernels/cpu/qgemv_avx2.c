/* The AVX2 form of slimlm_qgemv's few-row kernel (included by qgemv.c where __AVX512F__ is not set).

   Without vdpbf16ps the bf16 trick of qgemv.c costs four integer ops per pair of FMAs per row (the
   compat header's emulation), and the AVX-512 tile's 16 accumulators per row spill: the kernel ran
   at ~19 GMAC/s whatever the number of rows. Here codes become float32 once per chunk for all rows, by
   an AND and an exact int -> float conversion, and x is float32 (one part, not three: an FMA's product
   is exact before its one rounding, as vdpbf16ps's bf16 products are).

   Lane i (32 bits) of half h (bytes 32h..32h+31) of a chunk holds, for rows 16q + 8h + i (q = 0..3),
   int4: the even input's code at bits 4q..4q+3 and the odd input's at bits 16+4q..19+4q. `w & (15 << 4q)`
   converts to c * 16^q and `w & (15 << (16 + 4q))` to c * 2^(16+4q); the top nibble, which would read
   as a sign, is shifted down by 4 first for both slots of q = 3. x's odd input comes prepared as
   x * 2^-16, so both slots of q carry the same power of two, 2^e with e = 0, 4, 8, 8.
   int8: the low nibble of one input's code at bits 4q.. and the high one at bits 16+4q..; the code is
   put together in integers, (w & (15 << 4q)) | ((w >> 12) & (240 << 4q)) = c * 16^q (e = 4q), one
   conversion and one FMA per code and row.
   The group's epilogue takes the power of two off with the scale: y += s 2^-e (acc - z 2^e sum(x over
   the group)), each factor a power-of-two multiple of the exact one. */
#ifndef SLIMLM_QGEMV_AVX2_C
#define SLIMLM_QGEMV_AVX2_C
#include "prelude.h"

/* x row -> xf [steps][2] floats (int4: even input, odd input * 2^-16; int8: the input, 0) and xs [G],
   the group sums of x. */
static void prep_row_avx2(const void* x, int x_bf16, int in, int gs, int bits, int G, float* xf, float* xs) {
    const int gsteps = bits == 4 ? (gs + 1) / 2 : gs;
    for (int g = 0; g < G; g++) {
        float sum = 0.f;
        for (int j = 0; j < gsteps; j++) {
            const int k = g * gs + (bits == 4 ? 2 * j : j);
            float a, b = 0.f;
            if (x_bf16) {
                uint32_t u = (uint32_t)((const uint16_t*)x)[k] << 16;
                memcpy(&a, &u, 4);
                if (bits == 4 && 2 * j + 1 < gs) {
                    u = (uint32_t)((const uint16_t*)x)[k + 1] << 16;
                    memcpy(&b, &u, 4);
                }
            } else {
                a = ((const float*)x)[k];
                if (bits == 4 && 2 * j + 1 < gs) b = ((const float*)x)[k + 1];
            }
            sum += a + b;
            xf[2 * ((size_t)g * gsteps + j)] = a;
            xf[2 * ((size_t)g * gsteps + j) + 1] = b * (1.f / 65536.f);
        }
        xs[g] = sum;
    }
}

/* 8 scales of sdt (0 f32, 1 f16, 2 bf16) from entry i, as floats. */
static inline __m256 scales8(const void* s, size_t i, int sdt) {
    if (sdt == 0) return _mm256_loadu_ps((const float*)s + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)s + i));
    if (sdt == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Codes of chunk half w as floats c * 2^e (w4 = w >> 4, w12 = w >> 12): int4's even (lo) or odd (hi)
   input of q, or int8's code of q. */
#define QNIB(w, w4, q, lowest) \
    _mm256_cvtepi32_ps(_mm256_and_si256((q) == 3 ? (w4) : (w), _mm256_set1_epi32((lowest) << 4 * ((q) < 3 ? (q) : 2))))
#define QLO(w, w4, q) QNIB(w, w4, q, 0xF)
#define QHI(w, w4, q) QNIB(w, w4, q, 0xF0000)
#define Q8(w, w12, q) _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi32(0xF << 4 * (q))), \
                                                        _mm256_and_si256(w12, _mm256_set1_epi32(0xF0 << 4 * (q)))))
#define FMA _mm256_fmadd_ps

/* a0..a3 += chunk half w's codes of q = 0..3 times row x (xe, xo: its two prepared floats of the step).
   Macros, not functions over arrays of vectors: GCC kept such arrays in memory inside the loop. */
#define QHALF1(bits, w, xe, xo, a0, a1, a2, a3) do {                                                   \
    if ((bits) == 4) {                                                                                 \
        const __m256i w4_ = _mm256_srli_epi32(w, 4);                                                   \
        a0 = FMA(QLO(w, w4_, 0), xe, a0); a1 = FMA(QLO(w, w4_, 1), xe, a1);                            \
        a2 = FMA(QLO(w, w4_, 2), xe, a2); a3 = FMA(QLO(w, w4_, 3), xe, a3);                            \
        a0 = FMA(QHI(w, w4_, 0), xo, a0); a1 = FMA(QHI(w, w4_, 1), xo, a1);                            \
        a2 = FMA(QHI(w, w4_, 2), xo, a2); a3 = FMA(QHI(w, w4_, 3), xo, a3);                            \
    } else {                                                                                           \
        const __m256i w12_ = _mm256_srli_epi32(w, 12);                                                 \
        a0 = FMA(Q8(w, w12_, 0), xe, a0); a1 = FMA(Q8(w, w12_, 1), xe, a1);                            \
        a2 = FMA(Q8(w, w12_, 2), xe, a2); a3 = FMA(Q8(w, w12_, 3), xe, a3);                            \
    }                                                                                                  \
} while (0)

/* The same for two rows (x0, x1; accumulators a and b), each code made once. */
#define QHALF2(bits, w, xe0, xo0, xe1, xo1, a0, a1, a2, a3, b0, b1, b2, b3) do {                       \
    __m256 c_;                                                                                         \
    if ((bits) == 4) {                                                                                 \
        const __m256i w4_ = _mm256_srli_epi32(w, 4);                                                   \
        c_ = QLO(w, w4_, 0); a0 = FMA(c_, xe0, a0); b0 = FMA(c_, xe1, b0);                             \
        c_ = QLO(w, w4_, 1); a1 = FMA(c_, xe0, a1); b1 = FMA(c_, xe1, b1);                             \
        c_ = QLO(w, w4_, 2); a2 = FMA(c_, xe0, a2); b2 = FMA(c_, xe1, b2);                             \
        c_ = QLO(w, w4_, 3); a3 = FMA(c_, xe0, a3); b3 = FMA(c_, xe1, b3);                             \
        c_ = QHI(w, w4_, 0); a0 = FMA(c_, xo0, a0); b0 = FMA(c_, xo1, b0);                             \
        c_ = QHI(w, w4_, 1); a1 = FMA(c_, xo0, a1); b1 = FMA(c_, xo1, b1);                             \
        c_ = QHI(w, w4_, 2); a2 = FMA(c_, xo0, a2); b2 = FMA(c_, xo1, b2);                             \
        c_ = QHI(w, w4_, 3); a3 = FMA(c_, xo0, a3); b3 = FMA(c_, xo1, b3);                             \
    } else {                                                                                           \
        const __m256i w12_ = _mm256_srli_epi32(w, 12);                                                 \
        c_ = Q8(w, w12_, 0); a0 = FMA(c_, xe0, a0); b0 = FMA(c_, xe1, b0);                             \
        c_ = Q8(w, w12_, 1); a1 = FMA(c_, xe0, a1); b1 = FMA(c_, xe1, b1);                             \
        c_ = Q8(w, w12_, 2); a2 = FMA(c_, xe0, a2); b2 = FMA(c_, xe1, b2);                             \
        c_ = Q8(w, w12_, 3); a3 = FMA(c_, xe0, a3); b3 = FMA(c_, xe1, b3);                             \
    }                                                                                                  \
} while (0)

/* tot + s 2^-e (acc - z 2^e xsum) for the 8 rows of a block from `at` (scales and zeros [G][64]), group sum
   xsum; e = 4q for int8, 0, 4, 8, 8 for int4. */
static inline __m256 qepilogue(__m256 tot, __m256 acc, const void* sc, const uint8_t* zp, size_t at, int sdt, int q,
                               int bits, float xsum) {
    const int e = bits == 8 || q < 3 ? 4 * q : 8;
    const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zp + at))));
    const __m256 s8 = _mm256_mul_ps(scales8(sc, at, sdt), _mm256_set1_ps(1.f / (float)(1 << e)));
    const __m256 z8 = _mm256_mul_ps(z, _mm256_set1_ps((float)(1 << e)));
    return _mm256_fmadd_ps(s8, _mm256_fnmadd_ps(z8, _mm256_set1_ps(xsum), acc), tot);
}

/* One row of x against a whole 64-row block: res[hh * 4 + q] (8 floats) = rows 16q + 8hh + 0..7. */
static inline __attribute__((always_inline)) void qtile_row(const uint8_t* wb, const void* sc, const uint8_t* zp,
        const float* xf, const float* xs, int G, int gsteps, int sdt, float res[8][8], const int bits) {
    __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0, t4 = t0, t5 = t0, t6 = t0, t7 = t0;
    for (int g = 0; g < G; g++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        const uint8_t* wg = wb + (size_t)g * gsteps * 64;
        const float* xg = xf + (size_t)g * gsteps * 2;
        for (int s = 0; s < gsteps; s++) {
            prefetch(wg + (size_t)s * 64 + QPF);
            const __m256 xe = _mm256_broadcast_ss(xg + 2 * s);
            const __m256 xo = bits == 4 ? _mm256_broadcast_ss(xg + 2 * s + 1) : xe;
            const __m256i w0 = _mm256_loadu_si256((const __m256i*)(wg + (size_t)s * 64));
            QHALF1(bits, w0, xe, xo, a0, a1, a2, a3);
            const __m256i w1 = _mm256_loadu_si256((const __m256i*)(wg + (size_t)s * 64 + 32));
            QHALF1(bits, w1, xe, xo, a4, a5, a6, a7);
        }
        const size_t at = (size_t)g * QB;
        t0 = qepilogue(t0, a0, sc, zp, at, sdt, 0, bits, xs[g]);
        t1 = qepilogue(t1, a1, sc, zp, at + 16, sdt, 1, bits, xs[g]);
        t2 = qepilogue(t2, a2, sc, zp, at + 32, sdt, 2, bits, xs[g]);
        t3 = qepilogue(t3, a3, sc, zp, at + 48, sdt, 3, bits, xs[g]);
        t4 = qepilogue(t4, a4, sc, zp, at + 8, sdt, 0, bits, xs[g]);
        t5 = qepilogue(t5, a5, sc, zp, at + 24, sdt, 1, bits, xs[g]);
        t6 = qepilogue(t6, a6, sc, zp, at + 40, sdt, 2, bits, xs[g]);
        t7 = qepilogue(t7, a7, sc, zp, at + 56, sdt, 3, bits, xs[g]);
    }
    _mm256_storeu_ps(res[0], t0); _mm256_storeu_ps(res[1], t1); _mm256_storeu_ps(res[2], t2);
    _mm256_storeu_ps(res[3], t3); _mm256_storeu_ps(res[4], t4); _mm256_storeu_ps(res[5], t5);
    _mm256_storeu_ps(res[6], t6); _mm256_storeu_ps(res[7], t7);
}

/* Two rows of x (row 1 xfstride floats after row 0) against half h of a block: res[t * 4 + q] = rows
   16q + 8h + 0..7 of row t. */
static inline __attribute__((always_inline)) void qtile_rows2(const uint8_t* wb, int h, const void* sc,
        const uint8_t* zp, const float* xf, size_t xfstride, const float* xs, int G, int gsteps, int sdt,
        float res[8][8], const int bits) {
    __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0, u0 = t0, u1 = t0, u2 = t0, u3 = t0;
    for (int g = 0; g < G; g++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        const uint8_t* wg = wb + (size_t)g * gsteps * 64 + 32 * h;
        const float* xg = xf + (size_t)g * gsteps * 2;
        for (int s = 0; s < gsteps; s++) {
            if (h == 0) prefetch(wg + (size_t)s * 64 + QPF);
            const __m256i w = _mm256_loadu_si256((const __m256i*)(wg + (size_t)s * 64));
            const __m256 xe0 = _mm256_broadcast_ss(xg + 2 * s), xe1 = _mm256_broadcast_ss(xg + xfstride + 2 * s);
            const __m256 xo0 = bits == 4 ? _mm256_broadcast_ss(xg + 2 * s + 1) : xe0;
            const __m256 xo1 = bits == 4 ? _mm256_broadcast_ss(xg + xfstride + 2 * s + 1) : xe1;
            QHALF2(bits, w, xe0, xo0, xe1, xo1, a0, a1, a2, a3, b0, b1, b2, b3);
        }
        const size_t at = (size_t)g * QB + 8 * h;
        const float s0 = xs[g], s1 = xs[G + g];
        t0 = qepilogue(t0, a0, sc, zp, at, sdt, 0, bits, s0);
        t1 = qepilogue(t1, a1, sc, zp, at + 16, sdt, 1, bits, s0);
        t2 = qepilogue(t2, a2, sc, zp, at + 32, sdt, 2, bits, s0);
        t3 = qepilogue(t3, a3, sc, zp, at + 48, sdt, 3, bits, s0);
        u0 = qepilogue(u0, b0, sc, zp, at, sdt, 0, bits, s1);
        u1 = qepilogue(u1, b1, sc, zp, at + 16, sdt, 1, bits, s1);
        u2 = qepilogue(u2, b2, sc, zp, at + 32, sdt, 2, bits, s1);
        u3 = qepilogue(u3, b3, sc, zp, at + 48, sdt, 3, bits, s1);
    }
    _mm256_storeu_ps(res[0], t0); _mm256_storeu_ps(res[1], t1); _mm256_storeu_ps(res[2], t2);
    _mm256_storeu_ps(res[3], t3); _mm256_storeu_ps(res[4], u0); _mm256_storeu_ps(res[5], u1);
    _mm256_storeu_ps(res[6], u2); _mm256_storeu_ps(res[7], u3);
}

/* Each tile a function of its own (per bits), so that its loop has the registers to itself. */
static __attribute__((noinline)) void qtile_row4(const uint8_t* wb, const void* sc, const uint8_t* zp, const float* xf,
                                                 const float* xs, int G, int gsteps, int sdt, float res[8][8]) {
    qtile_row(wb, sc, zp, xf, xs, G, gsteps, sdt, res, 4);
}
static __attribute__((noinline)) void qtile_row8(const uint8_t* wb, const void* sc, const uint8_t* zp, const float* xf,
                                                 const float* xs, int G, int gsteps, int sdt, float res[8][8]) {
    qtile_row(wb, sc, zp, xf, xs, G, gsteps, sdt, res, 8);
}
static __attribute__((noinline)) void qtile_rows2_4(const uint8_t* wb, int h, const void* sc, const uint8_t* zp,
        const float* xf, size_t xfstride, const float* xs, int G, int gsteps, int sdt, float res[8][8]) {
    qtile_rows2(wb, h, sc, zp, xf, xfstride, xs, G, gsteps, sdt, res, 4);
}
static __attribute__((noinline)) void qtile_rows2_8(const uint8_t* wb, int h, const void* sc, const uint8_t* zp,
        const float* xf, size_t xfstride, const float* xs, int G, int gsteps, int sdt, float res[8][8]) {
    qtile_rows2(wb, h, sc, zp, xf, xfstride, xs, G, gsteps, sdt, res, 8);
}

/* 8 floats as bf16 (round to nearest even), in order. */
static inline __m128i bf16x8(__m256 v) {
    const __m256i h = sl_bf16_bits8(v);
    return _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* 8 outputs from column o0 of row y (bf16 or float32), only those below `out`. */
static inline void store8(void* y, size_t at, int left, __m256 v, int bf16) {
    if (left >= 8) {
        if (bf16) _mm_storeu_si128((__m128i*)((uint16_t*)y + at), bf16x8(v));
        else _mm256_storeu_ps((float*)y + at, v);
        return;
    }
    float f[8];
    uint16_t h[8];
    _mm256_storeu_ps(f, v);
    _mm_storeu_si128((__m128i*)h, bf16x8(v));
    for (int i = 0; i < left; i++) {
        if (bf16) ((uint16_t*)y)[at + i] = h[i];
        else ((float*)y)[at + i] = f[i];
    }
}

/* Rows [r_begin, r_end) of y, output block b: one row over the whole block, or two rows per half. */
static void run_block_avx2(const qcall* c, int b, int r_begin, int r_end) {
    const uint8_t* wb = c->w + (size_t)b * c->steps * 64;
    const void* sc = (const char*)c->scales + (size_t)b * c->mstride;
    const uint8_t* zp = c->zeros + (size_t)b * c->G * QB;
    const size_t xfs = c->steps * 2;
    for (int r0 = r_begin; r0 < r_end; r0 += 2) {
        const int rows = r_end - r0 < 2 ? 1 : 2;
        const float* xr = c->xf + (size_t)r0 * xfs;
        const float* sr = c->xs + (size_t)r0 * c->G;
        for (int h = 0; h < 2; h++) {
            float res[8][8];  /* one row: [hh * 4 + q]; two rows: [t * 4 + q] */
            const int int4 = c->bits == 4;
            if (rows == 1) (int4 ? qtile_row4 : qtile_row8)(wb, sc, zp, xr, sr, c->G, c->gsteps, c->sdt, res);
            else (int4 ? qtile_rows2_4 : qtile_rows2_8)(wb, h, sc, zp, xr, xfs, sr, c->G, c->gsteps, c->sdt, res);
            for (int i = 0; i < 8; i++) {
                const int t = rows == 1 ? 0 : i / 4, q = i % 4, hh = rows == 1 ? i / 4 : h;
                const int o0 = b * QB + 16 * q + 8 * hh, left = c->out - o0;
                if (left <= 0) continue;
                __m256 v = _mm256_loadu_ps(res[i]);
                if (c->bias && left >= 8) v = _mm256_add_ps(v, _mm256_loadu_ps(c->bias + o0));
                else if (c->bias) {  /* a short tail: no read past the bias */
                    float f[8];
                    _mm256_storeu_ps(f, v);
                    for (int j = 0; j < left; j++) f[j] += c->bias[o0 + j];
                    v = _mm256_loadu_ps(f);
                }
                store8(c->y, (size_t)(r0 + t) * c->out + o0, left, v, c->x_bf16);
            }
            if (rows == 1) break;  /* both halves done in one pass */
        }
    }
}
#endif  /* SLIMLM_QGEMV_AVX2_C */
