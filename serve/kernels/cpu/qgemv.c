/* Weight-only int4/int8 matrix products (W4A16, W8A16) over a layout repacked once at load:
   slimlm_qgemv (few rows, exact) and slimlm_qgemm_bf16 (many rows, below). serve/kernels/quant_cpu.py
   documents the layout, builds it and says why it looks like this.

   y[r][o] = sum_g s[o][g] * sum_{k in g} (c[o][k] - z[o][g]) * x[r][k] + bias[o], in float32.

   Codes become bf16 with one bit operation: 0x4300 | n is the bf16 of 128 + n for a nibble n, so
   each 64-byte chunk (64 rows x 2 inputs of int4, or 64 rows x 1 input of int8 as lo/hi nibbles) is
   four `vdpbf16ps` operands after 7 integer ops. The dot product then sums (128 + n) * x exactly in
   float32 (bf16 x bf16 products are exact); the offset and the zero point come off once per group:
   acc - (z + off) * sum(x over the group), with off = 128 (int4) or 128 * 17 (int8, whose pairs are
   (lo, hi) against (x, 16 x), so lo * x + hi * 16 x = c * x). Activations in bf16 are used as they are;
   float32 activations are split exactly into three bf16 parts (x = x0 + x1 + x2) run as three rows. */
#ifndef SLIMLM_QGEMV_C
#define SLIMLM_QGEMV_C
#include "prelude.h"

#define QB 64  /* output rows per block */
/* Software prefetch distance in bytes. At one row a 64-byte chunk takes ~15 instructions, so the
   out-of-order window alone keeps only ~2 KB of loads in flight: ~17 GB/s from memory on one core.
   Prefetching 4 KB ahead measured 25-35 GB/s (8 KB: the same), against ~32 GB/s for the bf16 GEMV. */
#ifndef QPF
#define QPF 4096
#endif

static inline __m512 ld_scales(const void* s, size_t i, int sdt) {  /* sdt 0 f32, 1 f16, 2 bf16 */
    if (sdt == 0) return _mm512_loadu_ps((const float*)s + i);
    if (sdt == 1) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)s + i)));
    return ld16(s, i, 1);
}

static inline __m512 bf16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Nibble q of each 16-bit lane as the bf16 of 128 + nibble: (w >> 4q) & 0xF | 0x4300 (ternlog 0xEA
   is (A & B) | C; the top nibble needs no mask). */
static inline __m512i nibble(__m512i w, const int q) {
    const __m512i one28 = _mm512_set1_epi16(0x4300);
    if (q == 3) return _mm512_or_si512(_mm512_srli_epi16(w, 12), one28);
    return _mm512_ternarylogic_epi32(q ? _mm512_srli_epi16(w, 4 * q) : w, _mm512_set1_epi16(0x000F), one28, 0xEA);
}

#ifdef __AVX512F__  /* the few-row kernel in vdpbf16ps (AVX2: qgemv_avx2.c) */
/* T virtual rows (1..4) of x against one 64-row block: tot[t][q] = rows 16q..16q+15 of row t.
   wb: the block's codes [steps][64 B]; sc, zp: its scales and zeros [G][64]; xp: [T][xstride] u32
   bf16 pairs; xs: [T][G] group sums of x. always_inline with a constant T: the loops over t unroll
   and the accumulators live in registers. */
static inline __attribute__((always_inline)) void block_rows(
        const uint8_t* wb, const void* sc, const uint8_t* zp, const uint32_t* xp, size_t xstride,
        const float* xs, int G, int gsteps, int sdt, float off, __m512 tot[4][4], const int T) {
    for (int t = 0; t < T; t++) for (int q = 0; q < 4; q++) tot[t][q] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512 acc[4][4];
        for (int t = 0; t < T; t++) for (int q = 0; q < 4; q++) acc[t][q] = _mm512_setzero_ps();
        const uint8_t* wg = wb + (size_t)g * gsteps * 64;
        const uint32_t* xg = xp + (size_t)g * gsteps;
        for (int s = 0; s < gsteps; s++) {
            prefetch(wg + (size_t)s * 64 + QPF);
            __m512i w = _mm512_loadu_si512(wg + (size_t)s * 64);
            __m512bh v0 = (__m512bh)nibble(w, 0), v1 = (__m512bh)nibble(w, 1);
            __m512bh v2 = (__m512bh)nibble(w, 2), v3 = (__m512bh)nibble(w, 3);
            for (int t = 0; t < T; t++) {
                __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xg[t * xstride + s]);
                acc[t][0] = _mm512_dpbf16_ps(acc[t][0], v0, xb);
                acc[t][1] = _mm512_dpbf16_ps(acc[t][1], v1, xb);
                acc[t][2] = _mm512_dpbf16_ps(acc[t][2], v2, xb);
                acc[t][3] = _mm512_dpbf16_ps(acc[t][3], v3, xb);
            }
        }
        for (int q = 0; q < 4; q++) {
            __m512 s = ld_scales(sc, (size_t)g * QB + 16 * q, sdt);
            __m512 z = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                           _mm_loadu_si128((const __m128i*)(zp + (size_t)g * QB + 16 * q)))), _mm512_set1_ps(off));
            for (int t = 0; t < T; t++)  /* tot += s * (acc - (z + off) * sum_g x) */
                tot[t][q] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, _mm512_set1_ps(xs[t * G + g]), acc[t][q]),
                                            tot[t][q]);
        }
    }
}

/* x row -> `split` bf16 parts (x = x0 + x1 + x2 exactly for float32; x itself for bf16), each written
   as the kernel reads it: int4 as consecutive bf16 (zero-padded to an even count), int8 as pairs
   (x, 16 x); and each part's sums over the groups. */
static void prep_row(const void* x, int x_bf16, int in, int gs, int bits, int split, size_t xstride, int G,
                     uint32_t* xp, float* xs) {
    __m512 sum[3];  /* per part, this group's sum so far (xs NULL: no sums wanted) */
    int g_now = 0;
    for (int p = 0; p < split; p++) {
        memset(xp + p * xstride, 0, xstride * 4);
        sum[p] = _mm512_setzero_ps();
    }
    for (int k0 = 0; k0 < in; k0 += 16) {
        __mmask16 m = in - k0 >= 16 ? 0xFFFF : (__mmask16)((1u << (in - k0)) - 1);
        __m512 v = x_bf16 ? bf16_to_f32(_mm256_maskz_loadu_epi16(m, (const uint16_t*)x + k0))
                          : _mm512_maskz_loadu_ps(m, (const float*)x + k0);
        const int g = k0 / gs;  /* gs is a multiple of 16, or in itself (one group) */
        if (xs && g != g_now) {
            for (int p = 0; p < split; p++) {
                xs[p * G + g_now] = _mm512_reduce_add_ps(sum[p]);
                sum[p] = _mm512_setzero_ps();
            }
            g_now = g;
        }
        for (int p = 0; p < split; p++) {
            __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
            __m512 hf = bf16_to_f32(h);
            v = _mm512_sub_ps(v, hf);  /* the exact remainder, for the next part */
            sum[p] = _mm512_add_ps(sum[p], hf);
            if (bits == 4) {
                _mm256_mask_storeu_epi16((uint16_t*)(xp + p * xstride) + k0, m, h);
            } else {
                __m256i h16 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(hf, _mm512_set1_ps(16.f)));
                __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(h),
                                               _mm512_slli_epi32(_mm512_cvtepu16_epi32(h16), 16));
                _mm512_mask_storeu_epi32(xp + p * xstride + k0, m, pair);
            }
        }
    }
    if (xs)
        for (int p = 0; p < split; p++) xs[p * G + g_now] = _mm512_reduce_add_ps(sum[p]);
}
#endif

typedef struct {  /* one call's arguments, shared by the blocks */
    const uint8_t *w, *zeros;
    const void* scales;
    const float* bias;
    const uint32_t* xp;
    const float* xs;
    const float* xf;            /* the AVX2 form's prepared x (qgemv_avx2.c) */
    void* y;
    size_t steps, xstride, mstride;
    int out, G, gsteps, sdt, split, x_bf16, bits;
    float off;
} qcall;

/* A call's arguments as the blocks read them; split: float32 x runs as three bf16 parts (AVX-512 form). */
static qcall qcall_of(const uint8_t* w, const void* scales, const uint8_t* zeros, const float* bias, void* y, int out,
                      int in, int gs, int bits, int sdt, int x_bf16) {
    qcall c = {.w = w, .zeros = zeros, .scales = scales, .bias = bias, .y = y, .out = out, .G = in / gs,
               .gsteps = bits == 4 ? (gs + 1) / 2 : gs, .sdt = sdt, .split = x_bf16 ? 1 : 3, .x_bf16 = x_bf16,
               .bits = bits, .off = bits == 4 ? 128.f : 128.f * 17.f};
    c.steps = (size_t)c.G * c.gsteps;
    c.xstride = (c.steps + 15) & ~(size_t)15;
    c.mstride = (size_t)c.G * QB * (sdt == 0 ? 4 : 2);
    return c;
}

#ifndef __AVX512F__
#include "qgemv_avx2.c"
#else
/* Rows [r_begin, r_end) of y, output block b: R real rows (4 bf16, or 1 float32 as 3 parts) per pass. */
static void run_block(const qcall* c, int b, int r_begin, int r_end) {
    const uint8_t* wb = c->w + (size_t)b * c->steps * 64;
    const void* sc = (const char*)c->scales + (size_t)b * c->mstride;
    const uint8_t* zp = c->zeros + (size_t)b * c->G * QB;
    const int split = c->split, R = c->x_bf16 ? 4 : 1;
    for (int r0 = r_begin; r0 < r_end; r0 += R) {
        const int rows = r_end - r0 < R ? r_end - r0 : R, T = rows * split;
        const uint32_t* xr = c->xp + (size_t)r0 * split * c->xstride;
        const float* sr = c->xs + (size_t)r0 * split * c->G;
        __m512 tot[4][4];
        switch (T) {
            case 1: block_rows(wb, sc, zp, xr, c->xstride, sr, c->G, c->gsteps, c->sdt, c->off, tot, 1); break;
            case 2: block_rows(wb, sc, zp, xr, c->xstride, sr, c->G, c->gsteps, c->sdt, c->off, tot, 2); break;
            case 3: block_rows(wb, sc, zp, xr, c->xstride, sr, c->G, c->gsteps, c->sdt, c->off, tot, 3); break;
            default: block_rows(wb, sc, zp, xr, c->xstride, sr, c->G, c->gsteps, c->sdt, c->off, tot, 4); break;
        }
        for (int q = 0; q < 4; q++) {
            const int o0 = b * QB + 16 * q, left = c->out - o0;
            if (left <= 0) break;
            const __mmask16 mk = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            const __m512 bv = c->bias ? _mm512_maskz_loadu_ps(mk, c->bias + o0) : _mm512_setzero_ps();
            for (int i = 0; i < rows; i++) {  /* sum the parts, add the bias, round once */
                __m512 v = tot[i * split][q];
                for (int p = 1; p < split; p++) v = _mm512_add_ps(v, tot[i * split + p][q]);
                v = _mm512_add_ps(v, bv);
                const size_t at = (size_t)(r0 + i) * c->out + o0;
                if (c->x_bf16) _mm256_mask_storeu_epi16((uint16_t*)c->y + at, mk, (__m256i)_mm512_cvtneps_pbh(v));
                else _mm512_mask_storeu_ps((float*)c->y + at, mk, v);
            }
        }
    }
}
#endif  /* __AVX512F__ */

/* w: codes [ceil(out/64)][steps][64 B]; scales (sdt) and zeros (u8) [ceil(out/64)][G][64]; bias f32 or
   NULL; x [m][in] bf16 (x_bf16) or f32; y [m][out] in x's dtype. gs divides in; G = in / gs;
   steps = G * gsteps, gsteps = ceil(gs / 2) (int4) or gs (int8). */
void slimlm_qgemv(const uint8_t* w, const void* scales, const uint8_t* zeros, const float* bias, const void* x,
                  void* y, int m, int out, int in, int gs, int bits, int sdt, int x_bf16, int threads) {
    if (m <= 0 || out <= 0) return;
    qcall c = qcall_of(w, scales, zeros, bias, y, out, in, gs, bits, sdt, x_bf16);
#ifdef __AVX512F__
    const size_t row_bytes = (size_t)c.split * c.xstride * 4;
#else
    const size_t row_bytes = c.steps * 2 * sizeof(float);
#endif
    const size_t esz = x_bf16 ? 2 : 4;
    uint32_t* xp = (uint32_t*)aligned_alloc(64, ((size_t)m * row_bytes + 63) & ~(size_t)63);
    float* xs = (float*)malloc((size_t)m * c.split * c.G * sizeof(float));
    if (!xp || !xs) abort();  /* a few KB per row: out of memory indeed */
    for (int r = 0; r < m; r++) {
        const void* xr = (const char*)x + (size_t)r * in * esz;
#ifdef __AVX512F__
        prep_row(xr, x_bf16, in, gs, bits, c.split, c.xstride, c.G, xp + (size_t)r * c.split * c.xstride,
                 xs + (size_t)r * c.split * c.G);
#else
        prep_row_avx2(xr, x_bf16, in, gs, bits, c.G, (float*)xp + (size_t)r * c.steps * 2, xs + (size_t)r * c.G);
#endif
    }
    c.xp = xp;
    c.xf = (const float*)xp;
    c.xs = xs;
    const int nb = (out + QB - 1) / QB;
    /* Rows in chunks of <= 128 KB of prepared x, which every block re-reads: it stays in L2. Each chunk
       walks every block, the blocks split among the threads. */
    int mc = (int)((128 * 1024) / row_bytes) & ~3;
    mc = mc < 4 ? 4 : mc;
    for (int c0 = 0; c0 < m; c0 += mc) {
        const int c1 = m - c0 < mc ? m : c0 + mc;
        /* Threads only for >= 64 KB of code passes: below, starting them costs more than it saves, and
           on a busy machine a parallel region can wait milliseconds for a descheduled thread. */
        const int par = threads > 1 && nb > 1 && (size_t)nb * c.steps * 64 * ((c1 - c0 + 3) / 4) >= 65536;
        #pragma omp parallel for schedule(static) num_threads(threads) if (par)
        for (int b = 0; b < nb; b++) {
#ifdef __AVX512F__
            run_block(&c, b, c0, c1);
#else
            run_block_avx2(&c, b, c0, c1);
#endif
        }
    }
    free(xp);
    free(xs);
}

/* ---- Many rows (prefill): dequantize a block once, then multiply it like a bf16 weight ---------------
   Above a few dozen rows the exact kernel above is bound by its per-group epilogue (two FMAs per 16
   outputs, row and group: 6% at group 64, 12% at 32) on the pipes `vdpbf16ps` needs. Here each 64-row
   block becomes bf16 weights bf16((c - z) * s) in a per-thread scratch ([in/2][4][32]: the pair layout
   of oneDNN's bf16 blocks), amortised over all rows, and the rows take only `vdpbf16ps`: bf16 GEMM
   speed, with each weight rounded to bf16 once, as a bf16 checkpoint's weights are. */

/* Lane 2i = bf16(a[i]), lane 2i + 1 = bf16(b[i]): 16 rows x inputs (k, k + 1). */
static inline __m512i pair_bf16(__m512 a, __m512 b) {
    __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
    __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(b));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

/* The two slots of each pair lane of v (bf16 of 128 + nibble) as float32: slot 0, slot 1. */
static inline __m512 slot0(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline __m512 slot1(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)));
}

/* c - z for int8 step k (lo, hi nibbles in the slots): (lo + 128) + 16 (hi + 128) - (z + 2176). */
static inline __m512 int8_centred(const uint8_t* wk, int q, __m512 zf) {
    __m512i v = nibble(_mm512_loadu_si512(wk), q);
    return _mm512_sub_ps(_mm512_fmadd_ps(slot1(v), _mm512_set1_ps(16.f), slot0(v)), zf);
}

static void dequant_block(const qcall* c, int bits, int in, int b, __m512i* dst) {
    const uint8_t* wb = c->w + (size_t)b * c->steps * 64;
    const void* sc = (const char*)c->scales + (size_t)b * c->mstride;
    const uint8_t* zp = c->zeros + (size_t)b * c->G * QB;
    const int gs = in / c->G;
    for (int g = 0; g < c->G; g++)
        for (int q = 0; q < 4; q++) {
            const __m512 s = ld_scales(sc, (size_t)g * QB + 16 * q, c->sdt);
            const __m512 zf = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                  _mm_loadu_si128((const __m128i*)(zp + (size_t)g * QB + 16 * q)))),
                                  _mm512_set1_ps(c->off));
            if (bits == 4) {  /* step j of the group is pair g * gsteps + j */
                for (int j = 0; j < c->gsteps; j++) {
                    const size_t p = (size_t)g * c->gsteps + j;
                    __m512i v = nibble(_mm512_loadu_si512(wb + p * 64), q);
                    dst[p * 4 + q] = pair_bf16(_mm512_mul_ps(_mm512_sub_ps(slot0(v), zf), s),
                                               _mm512_mul_ps(_mm512_sub_ps(slot1(v), zf), s));
                }
            } else {          /* step k is input k; pairs (k, k + 1) never straddle a group (gs even, or one group) */
                for (int k = g * gs; k < (g + 1) * gs; k += 2) {
                    __m512 a = _mm512_mul_ps(int8_centred(wb + (size_t)k * 64, q, zf), s);
                    __m512 b2 = k + 1 < (g + 1) * gs ? _mm512_mul_ps(int8_centred(wb + (size_t)(k + 1) * 64, q, zf), s)
                                                     : _mm512_setzero_ps();
                    dst[(size_t)(k / 2) * 4 + q] = pair_bf16(a, b2);
                }
            }
        }
}

/* T rows (1..4) of bf16 pairs xp [T][xstride] against pairs [p0, p1) of the dequantized block w [kp][4].
   The sums carry over between slices of pairs through part [T][64] (float32, so the order of the
   sum is that of one pass); after the last slice, y rows get sum + bias, rounded to bf16. */
static inline __attribute__((always_inline)) void gemm_rows(const __m512i* w, const uint32_t* xp, size_t xstride,
        int p0, int p1, int kp, float* part, const float* bias, uint16_t* y, int out, int o_begin, const int T) {
    __m512 acc[4][4];
    for (int t = 0; t < T; t++)
        for (int q = 0; q < 4; q++) acc[t][q] = p0 ? _mm512_load_ps(part + t * QB + 16 * q) : _mm512_setzero_ps();
    for (int p = p0; p < p1; p++) {
        const __m512bh w0 = (__m512bh)w[p * 4], w1 = (__m512bh)w[p * 4 + 1];
        const __m512bh w2 = (__m512bh)w[p * 4 + 2], w3 = (__m512bh)w[p * 4 + 3];
        for (int t = 0; t < T; t++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[t * xstride + p]);
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, xb);
            acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, xb);
            acc[t][2] = _mm512_dpbf16_ps(acc[t][2], w2, xb);
            acc[t][3] = _mm512_dpbf16_ps(acc[t][3], w3, xb);
        }
    }
    if (p1 < kp) {
        for (int t = 0; t < T; t++) for (int q = 0; q < 4; q++) _mm512_store_ps(part + t * QB + 16 * q, acc[t][q]);
        return;
    }
    for (int q = 0; q < 4; q++) {
        const int o0 = o_begin + 16 * q, left = out - o0;
        if (left <= 0) break;
        const __mmask16 mk = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + o0) : _mm512_setzero_ps();
        for (int t = 0; t < T; t++)
            _mm256_mask_storeu_epi16(y + (size_t)t * out + o0, mk,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[t][q], bv)));
    }
}

/* Pairs per slice: 96 x 256 B = 24 KB of dequantized weights stay in L1 while every row tile of the
   chunk passes over them (the whole block, in L2, cost K = 1536 layers ~5%). */
#ifndef QKC
#define QKC 96
#endif
#define QMC 128  /* rows per work unit */

#ifdef __AVX512F__
/* The arguments of slimlm_qgemv, bf16 x and y only. Work units are (block, 128-row chunk): enough
   of them to keep both threads busy when a layer has few blocks; a thread dequantizes a block once
   for its consecutive chunks of it. */
void slimlm_qgemm_bf16(const uint8_t* w, const void* scales, const uint8_t* zeros, const float* bias, const void* x,
                       void* y, int m, int out, int in, int gs, int bits, int sdt, int threads) {
    if (m <= 0 || out <= 0) return;
    const qcall c = qcall_of(w, scales, zeros, bias, y, out, in, gs, bits, sdt, 1);
    const int kp = (in + 1) / 2, nb = (out + QB - 1) / QB, nch = (m + QMC - 1) / QMC;
    const int kc = QKC > 0 ? QKC : kp;
    /* x rows are already bf16 pairs of consecutive inputs; only an odd count needs a padded copy. */
    size_t xstride = (size_t)kp;
    uint32_t* copy = NULL;
    if (in % 2) {
        xstride = ((size_t)kp + 15) & ~(size_t)15;
        copy = (uint32_t*)aligned_alloc(64, (size_t)m * xstride * 4);
        if (!copy) abort();
        for (int r = 0; r < m; r++)
            prep_row((const uint16_t*)x + (size_t)r * in, 1, in, gs, 4, 1, xstride, c.G, copy + (size_t)r * xstride,
                     NULL);
    }
    const uint32_t* xp = copy ? copy : (const uint32_t*)x;
    #pragma omp parallel num_threads(threads) if (threads > 1 && nb * nch > 1 && (size_t)m * out * in >= (1u << 20))
    {
        __m512i* dq = (__m512i*)aligned_alloc(64, (size_t)kp * 4 * 64);
        float* part = (float*)aligned_alloc(64, (size_t)QMC * QB * sizeof(float));
        int have = -1;
        if (!dq || !part) abort();
        #pragma omp for schedule(static) collapse(2)
        for (int b = 0; b < nb; b++)
            for (int ch = 0; ch < nch; ch++) {
                if (have != b) { dequant_block(&c, bits, in, b, dq); have = b; }
                const int r1 = (ch + 1) * QMC < m ? (ch + 1) * QMC : m;
                for (int p0 = 0; p0 < kp; p0 += kc) {
                    const int p1 = p0 + kc < kp ? p0 + kc : kp;
                    for (int r0 = ch * QMC; r0 < r1; r0 += 4) {
                        const uint32_t* xr = xp + (size_t)r0 * xstride;
                        uint16_t* yr = (uint16_t*)y + (size_t)r0 * out;
                        float* pr = part + (size_t)(r0 - ch * QMC) * QB;
                        switch (r1 - r0 < 4 ? r1 - r0 : 4) {
                            case 1: gemm_rows(dq, xr, xstride, p0, p1, kp, pr, bias, yr, out, b * QB, 1); break;
                            case 2: gemm_rows(dq, xr, xstride, p0, p1, kp, pr, bias, yr, out, b * QB, 2); break;
                            case 3: gemm_rows(dq, xr, xstride, p0, p1, kp, pr, bias, yr, out, b * QB, 3); break;
                            default: gemm_rows(dq, xr, xstride, p0, p1, kp, pr, bias, yr, out, b * QB, 4); break;
                        }
                    }
                }
            }
        free(part);
        free(dq);
    }
    free(copy);
}

#else  /* AVX2: the dequantized block through gemv.c's AVX2 bf16 tile (no vdpbf16ps to emulate per row) */
#include "gemv.c"

/* As above; the block is dequantized exactly as there (the same bf16 weights), and the tile sums in
   vdpbf16ps's order, so the results are the AVX-512 form's bits. x is split into odd and even floats
   once per call. */
void slimlm_qgemm_bf16(const uint8_t* w, const void* scales, const uint8_t* zeros, const float* bias, const void* x,
                       void* y, int m, int out, int in, int gs, int bits, int sdt, int threads) {
    if (m <= 0 || out <= 0) return;
    const qcall c = qcall_of(w, scales, zeros, bias, y, out, in, gs, bits, sdt, 1);
    const int kp = (in + 1) / 2, nb = (out + QB - 1) / QB, nch = (m + QMC - 1) / QMC;
    float* xo = (float*)malloc(sizeof(float) * 2 * (size_t)m * kp);
    if (!xo) abort();
    float* xe = xo + (size_t)m * kp;
    split_pairs((const uint16_t*)x, m, in, xo, xe);
    const int tail = out % QB;  /* a last block short of 64 rows goes through a 64-column scratch */
    #pragma omp parallel num_threads(threads) if (threads > 1 && nb * nch > 1 && (size_t)m * out * in >= (1u << 20))
    {
        uint16_t* dq = (uint16_t*)aligned_alloc(64, (size_t)kp * 4 * 64);
        uint16_t* buf = (uint16_t*)aligned_alloc(64, (size_t)kp * 64);
        uint16_t* ytail = tail ? (uint16_t*)malloc((size_t)QMC * QB * 2) : NULL;
        float btail[QB];
        int have = -1;
        if (!dq || !buf || (tail && !ytail)) abort();
        if (tail && bias) {
            memset(btail, 0, sizeof btail);
            memcpy(btail, bias + (nb - 1) * QB, (size_t)tail * sizeof(float));
        }
        #pragma omp for schedule(static) collapse(2)
        for (int b = 0; b < nb; b++)
            for (int ch = 0; ch < nch; ch++) {
                if (have != b) { dequant_block(&c, bits, in, b, (__m512i*)dq); have = b; }
                const int r0 = ch * QMC, rows = m - r0 < QMC ? m - r0 : QMC;
                const float* o = xo + (size_t)r0 * kp;
                const float* e = xe + (size_t)r0 * kp;
                if (tail && b == nb - 1) {
                    bf16_block_avx2(dq, o, e, kp, rows, ytail, QB, 0, NULL, bias ? btail : NULL, buf);
                    for (int r = 0; r < rows; r++)
                        memcpy((uint16_t*)y + (size_t)(r0 + r) * out + b * QB, ytail + (size_t)r * QB,
                               (size_t)tail * 2);
                } else {
                    bf16_block_avx2(dq, o, e, kp, rows, (uint16_t*)y + (size_t)r0 * out, out, b * QB, NULL, bias, buf);
                }
            }
        free(ytail);
        free(buf);
        free(dq);
    }
    free(xo);
}
#endif  /* __AVX512F__ */

/* ---- One entry for a layer ----------------------------------------------------------------------------
   A weight's fixed arguments, filled once at load (serve/layers/quant_linear.py; the fused decode stack
   can hold one per projection): a call then passes 5 arguments, not 15 (~1 us of ctypes per call). */
typedef struct {
    const uint8_t* codes;
    const void* scales;
    const uint8_t* zeros;
    const float* bias;          /* float32 [out] or NULL */
    int out, in, gs, bits, sdt;
    int x_bf16;                 /* activations (x and y): bf16, else float32 */
    int gemm_min_rows;          /* bf16: from this many rows, slimlm_qgemm_bf16 */
    const int32_t* perm;        /* NULL, or the input order of the codes' columns (act-order checkpoints):
                                   column j multiplies x[:, perm[j]] */
} slimlm_qweight;

/* x [m, in] with its columns in the order `perm`, into a buffer of the calling thread that grows as needed
   and is kept (a fresh multi-MB allocation per prefill call costs its page faults every time). Rows are
   split over the threads from 16 rows on. NULL only when out of memory. */
static void* gather_inputs(const void* x, const int32_t* perm, int m, int in, int bf16, int threads) {
    static __thread char* buf = NULL;
    static __thread size_t cap = 0;
    size_t need = (size_t)m * in * (bf16 ? 2 : 4);
    if (need > cap) {
        free(buf);
        buf = malloc(need);
        cap = buf ? need : 0;
        if (!buf) return NULL;
    }
    char* out = buf;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && m >= 16)
    for (int r = 0; r < m; r++) {
        if (bf16) {
            const uint16_t* src = (const uint16_t*)x + (size_t)r * in;
            uint16_t* dst = (uint16_t*)out + (size_t)r * in;
            for (int j = 0; j < in; j++) dst[j] = src[perm[j]];
        } else {
            const float* src = (const float*)x + (size_t)r * in;
            float* dst = (float*)out + (size_t)r * in;
            for (int j = 0; j < in; j++) dst[j] = src[perm[j]];
        }
    }
    return out;
}

void slimlm_qlinear(const slimlm_qweight* w, const void* x, void* y, int m, int threads) {
    if (m <= 0) return;  /* no rows: nothing to gather (an empty gather buffer is NULL) or compute */
    if (w->perm) {
        x = gather_inputs(x, w->perm, m, w->in, w->x_bf16, threads);
        if (!x) abort();  /* the activations' size: out of memory is not recoverable here */
    }
    if (w->x_bf16 && m >= w->gemm_min_rows)
        slimlm_qgemm_bf16(w->codes, w->scales, w->zeros, w->bias, x, y, m, w->out, w->in, w->gs, w->bits, w->sdt,
                          threads);
    else
        slimlm_qgemv(w->codes, w->scales, w->zeros, w->bias, x, y, m, w->out, w->in, w->gs, w->bits, w->sdt,
                     w->x_bf16, threads);
}

#endif  /* SLIMLM_QGEMV_C */
