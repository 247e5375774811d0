/* Paged attention reading the KV cache in place (serve/layers/attention.py says why). */
#ifndef SLIMLM_ATTENTION_C
#define SLIMLM_ATTENTION_C
#include "prelude.h"

/* Attention over a paged KV cache, one query row at a time: out[h] = softmax(scale q[h] . K) V for each
   query head h of row i, over positions < len[i], read through the row's block table.

   The softmax follows the arithmetic of PyTorch's CPU flash attention (what Hugging Face's SDPA path
   runs), so bf16 outputs round like the reference's: scores scaled after the dot product; keys in
   chunks of KV_SPLIT with a running max; e^x by the same degree-5 polynomial (exp_u20) on whole
   vectors of 16 and by expf on the rest of a chunk; the probabilities rounded to the dtype before
   they weigh V, while their sum is kept unrounded; the output scaled by 1 / sum. nkeys[i] >= len[i]
   is how many keys the reference multiplies row i with (its sequence's length: the causal mask
   zeroes those past the row), which decides where the vector part of each chunk ends. */
#define MAXDV 16  /* D / 16 */
#define AHEAD 2  /* blocks */
#define KV_SPLIT 512

/* PyTorch's Vectorized<float>::exp_u20 (ATen, AVX-512): e^x = 2^n e^r, r = x - n ln2, degree 5. */
static inline __m512 exp_u20(__m512 x) {
    const __m512 ln_flt_min = _mm512_castsi512_ps(_mm512_set1_epi32(0xc2aeac50));
    const __m512 ln_flt_max = _mm512_castsi512_ps(_mm512_set1_epi32(0x42b17218));
    __mmask16 tiny = _mm512_cmp_ps_mask(x, ln_flt_min, _CMP_LT_OS);
    __m512 v = _mm512_max_ps(_mm512_min_ps(x, ln_flt_max), ln_flt_min);
    __m512 fx = _mm512_fmadd_ps(v, _mm512_castsi512_ps(_mm512_set1_epi32(0x3fb8aa3b)), _mm512_set1_ps(0.5f));
    fx = _mm512_cvtepi32_ps(_mm512_cvt_roundps_epi32(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_castsi512_ps(_mm512_set1_epi32(0x3f317218)), v);
    __m512 y = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
    y = _mm512_fmadd_ps(r, y, _mm512_set1_ps(0.166676521f));
    y = _mm512_fmadd_ps(r, y, _mm512_set1_ps(0.499991506f));
    y = _mm512_fmadd_ps(r, y, _mm512_set1_ps(0.999999701f));
    y = _mm512_fmadd_ps(r, y, _mm512_set1_ps(1.f));
    __m512i n1 = _mm512_cvtps_epi32(_mm512_sub_ps(fx, _mm512_set1_ps(1.f)));  /* 2^(n-1), then x2 */
    __m512 pow2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, _mm512_set1_epi32(127)), 23));
    pow2 = _mm512_mask_blend_ps(tiny, pow2, _mm512_setzero_ps());
    return _mm512_mul_ps(_mm512_mul_ps(y, pow2), _mm512_set1_ps(2.f));
}

/* One row, KV heads [kh0, kh1) and their G query heads each. A block of the cache holds bs positions
   x KVH heads x D contiguously, so the passes go block by block and, within a block, KV head by KV
   head. Blocks lie anywhere in memory, where no hardware prefetcher follows, so each read of a head's
   row also prefetches the same row AHEAD blocks on (without it the kernel runs ~2x slower once the
   cache is out of the CPU's caches, as it is at decode). Passes: scores into s [H][len]; softmax per
   chunk, in place; the weighted sum of V into acc [H][D]. nd = D / 16 is a constant at each call
   site below, so the compiler keeps q and the accumulators in registers. */
static inline __attribute__((always_inline)) void attend_impl(
        const void* q, const void* kc, const void* vc, const float* ksc, const float* vsc, const int32_t* table,
        int len, int nkeys, int bs, int kvh, int kh0, int kh1, int G, int D, float scale, void* out, float* s,
        float* qs, float* acc, float* rescale, int bf16, const int nd, const int kv8) {
    /* kv8: the caches hold int8 with one float scale per (block, KV head) (serve/layers/kv_quant.py): a
       key's scale multiplies its score, a value's its softmax weight, so each int8 is read once. */
    const int esz = kv8 ? 1 : bf16 ? 2 : 4, nblocks = (len + bs - 1) / bs, h0 = kh0 * G, h1 = kh1 * G;
    const int nchunks = (len + KV_SPLIT - 1) / KV_SPLIT;
    const size_t bstride = (size_t)bs * kvh * D, pstride = (size_t)kvh * D;
    for (int h = h0; h < h1; h++)
        for (int j = 0; j < nd; j++) _mm512_storeu_ps(qs + (size_t)h * D + j * 16, ld16(q, (size_t)h * D + j * 16, bf16));
    for (int b = 0; b < AHEAD && b < nblocks; b++)
        prefetch_range((const char*)kc + table[b] * bstride * esz, bstride * esz);
    for (int b = 0; b < nblocks; b++) {
        const size_t base = (size_t)table[b] * bstride;
        const char* ahead = b + AHEAD < nblocks ? (const char*)kc + (size_t)table[b + AHEAD] * bstride * esz : NULL;
        const int p0 = b * bs, n = len - p0 < bs ? len - p0 : bs;
        for (int kh = kh0; kh < kh1; kh++)
            for (int g = 0; g < G; g++) {
                const int h = kh * G + g;
                __m512 qg[MAXDV];
                for (int j = 0; j < nd; j++) qg[j] = _mm512_loadu_ps(qs + (size_t)h * D + j * 16);
                const float sc = kv8 ? scale * ksc[(size_t)table[b] * kvh + kh] : scale;
                for (int o = 0; o < n; o++) {
                    const size_t k0 = base + o * pstride + (size_t)kh * D;
                    if (ahead && g == 0) prefetch_range(ahead + (o * pstride + (size_t)kh * D) * esz, (size_t)D * esz);
                    __m512 a = _mm512_mul_ps(qg[0], kv8 ? ld16_i8(kc, k0) : ld16(kc, k0, bf16));
                    for (int j = 1; j < nd; j++)
                        a = _mm512_fmadd_ps(qg[j], kv8 ? ld16_i8(kc, k0 + j * 16) : ld16(kc, k0 + j * 16, bf16), a);
                    s[(size_t)h * len + p0 + o] = _mm512_reduce_add_ps(a) * sc;
                }
            }
    }
    for (int b = 0; b < AHEAD && b < nblocks; b++)
        prefetch_range((const char*)vc + table[b] * bstride * esz, bstride * esz);
    float inv[1024];  /* H <= 1024, checked by the caller */
    for (int h = h0; h < h1; h++) {
        float* sh = s + (size_t)h * len;
        float mx = -INFINITY, sum = 0.f;
        for (int c = 0; c < nchunks; c++) {
            const int c0 = c * KV_SPLIT, c1 = c0 + KV_SPLIT < len ? c0 + KV_SPLIT : len;
            const int ckeys = nkeys - c0 < KV_SPLIT ? nkeys - c0 : KV_SPLIT;   /* the reference's chunk */
            const int cvec = c0 + ckeys / 16 * 16;                              /* its vector part ends here */
            __m512 vmax = _mm512_set1_ps(mx);
            int p = c0;
            for (; p + 16 <= c1; p += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sh + p));
            if (p < c1)
                vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, (__mmask16)((1u << (c1 - p)) - 1), sh + p));
            const float m = _mm512_reduce_max_ps(vmax);
            __m512 vsum = _mm512_setzero_ps(), vm = _mm512_set1_ps(m);
            p = c0;
            for (; p + 16 <= c1 && p + 16 <= cvec; p += 16) {
                __m512 e = exp_u20(_mm512_sub_ps(_mm512_loadu_ps(sh + p), vm));
                vsum = _mm512_add_ps(vsum, e);
                _mm512_storeu_ps(sh + p, rnd(e, bf16));
            }
            if (p < c1 && p < cvec) {  /* the row ends inside a vector whose other lanes are masked keys */
                __mmask16 k = (__mmask16)((1u << (c1 - p)) - 1);
                __m512 e = _mm512_maskz_mov_ps(k, exp_u20(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sh + p), vm)));
                vsum = _mm512_add_ps(vsum, e);
                _mm512_mask_storeu_ps(sh + p, k, rnd(e, bf16));
                p = c1;
            }
            float csum = _mm512_reduce_add_ps(vsum);
            for (; p < c1; p++) {
                float e = expf(sh[p] - m);
                csum += e;
                sh[p] = bf16 ? _mm_cvtss_f32(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(
                            (__m128i)_mm_cvtneps_pbh(_mm_set1_ps(e))), 16))) : e;
            }
            const float shrink = expf(mx - m);   /* e^(old max - new max): 0 for the first chunk */
            rescale[(size_t)h * nchunks + c] = shrink;
            sum = csum + shrink * sum;
            mx = m;
        }
        inv[h] = 1.f / sum;
        for (int j = 0; j < nd; j++) _mm512_storeu_ps(acc + (size_t)h * D + j * 16, _mm512_setzero_ps());
    }
    for (int b = 0; b < nblocks; b++) {
        const size_t base = (size_t)table[b] * bstride;
        const char* ahead = b + AHEAD < nblocks ? (const char*)vc + (size_t)table[b + AHEAD] * bstride * esz : NULL;
        const int p0 = b * bs, n = len - p0 < bs ? len - p0 : bs;
        for (int kh = kh0; kh < kh1; kh++)
            for (int g = 0; g < G; g++) {
                const int h = kh * G + g;
                const float* sh = s + (size_t)h * len + p0;
                __m512 a[MAXDV];
                for (int j = 0; j < nd; j++) a[j] = _mm512_loadu_ps(acc + (size_t)h * D + j * 16);
                for (int o = 0; o < n; o++) {
                    const size_t v0 = base + o * pstride + (size_t)kh * D;
                    if (ahead && g == 0) prefetch_range(ahead + (o * pstride + (size_t)kh * D) * esz, (size_t)D * esz);
                    if ((p0 + o) % KV_SPLIT == 0 && p0 + o > 0) {  /* a new chunk: rescale what came before */
                        __m512 f = _mm512_set1_ps(rescale[(size_t)h * nchunks + (p0 + o) / KV_SPLIT]);
                        for (int j = 0; j < nd; j++) a[j] = _mm512_mul_ps(a[j], f);
                    }
                    if (kv8) {
                        __m512 w = _mm512_set1_ps(sh[o] * vsc[(size_t)table[b] * kvh + kh]);
                        for (int j = 0; j < nd; j++) a[j] = _mm512_fmadd_ps(w, ld16_i8(vc, v0 + j * 16), a[j]);
                    } else {
                        __m512 w = _mm512_set1_ps(sh[o]);
                        for (int j = 0; j < nd; j++) a[j] = _mm512_fmadd_ps(w, ld16(vc, v0 + j * 16, bf16), a[j]);
                    }
                }
                for (int j = 0; j < nd; j++) _mm512_storeu_ps(acc + (size_t)h * D + j * 16, a[j]);
            }
    }
    for (int h = h0; h < h1; h++)
        for (int j = 0; j < nd; j++)
            st16(out, (size_t)h * D + j * 16,
                 _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)h * D + j * 16), _mm512_set1_ps(inv[h])), bf16);
}

static void attend(const void* q, const void* kc, const void* vc, const float* ksc, const float* vsc,
                   const int32_t* table, int len, int nkeys, int bs, int kvh, int kh0, int kh1, int G, int D,
                   float scale, void* out, float* s, float* qs, float* acc, float* rescale, int bf16) {
#define ATTEND(BF16, ND, KV8) attend_impl(q, kc, vc, ksc, vsc, table, len, nkeys, bs, kvh, kh0, kh1, G, D, scale, \
                                          out, s, qs, acc, rescale, BF16, ND, KV8)
#define BY_D(BF16, KV8) if (D == 64) ATTEND(BF16, 4, KV8); else if (D == 128) ATTEND(BF16, 8, KV8); \
                        else ATTEND(BF16, D / 16, KV8)
    const int kv8 = ksc != NULL;
    if (bf16) {
        if (kv8) { BY_D(1, 1); } else { BY_D(1, 0); }
    } else {
        if (kv8) { BY_D(0, 1); } else { BY_D(0, 0); }
    }
#undef BY_D
#undef ATTEND
}

/* q: S rows of [H][D] (row stride qstride elements); out [S][H][D]; row i attends over positions
   < lens[i] through block table i (nkeys: see the top; NULL = lens). caches [blocks][bs][KVH][D];
   tables int32 [S][tstride]. ksc, vsc: NULL, or the int8 caches' scales [blocks][KVH]. A row is one
   unit of work, or KVH units (one per KV head) when there are fewer rows than threads. */
static void decode_attention(const void* q, int qstride, const void* kc, const void* vc, const float* ksc,
                             const float* vsc, const int32_t* tables, int tstride, const int32_t* lens,
                             const int32_t* nkeys, void* out, int S, int H, int kvh, int D, int bs, float scale,
                             int threads, int bf16) {
    const int G = H / kvh, esz = bf16 ? 2 : 4, split = S < threads ? kvh : 1;
    #pragma omp parallel num_threads(threads) if (threads > 1 && S * split >= 2)
    {
        size_t cap = 0;
        float *s = NULL, *rescale = NULL;
        float* qs = (float*)malloc(sizeof(float) * 2 * H * D);
        #pragma omp for schedule(dynamic, 1)
        for (int u = 0; u < S * split; u++) {
            const int i = u / split, kh0 = (u % split) * kvh / split, kh1 = (u % split + 1) * kvh / split;
            if ((size_t)lens[i] > cap) {  /* grown geometrically: prefill rows come in increasing lengths */
                free(s);
                free(rescale);
                cap = (size_t)lens[i] > 2 * cap ? (size_t)lens[i] : 2 * cap;
                s = (float*)malloc(sizeof(float) * cap * H);
                rescale = (float*)malloc(sizeof(float) * H * (cap / KV_SPLIT + 1));
            }
            attend((const char*)q + (size_t)i * qstride * esz, kc, vc, ksc, vsc, tables + (size_t)i * tstride, lens[i],
                   nkeys ? nkeys[i] : lens[i], bs, kvh, kh0, kh1, G, D, scale, (char*)out + (size_t)i * H * D * esz,
                   s, qs, qs + (size_t)H * D, rescale, bf16);
        }
        free(s);
        free(rescale);
        free(qs);
    }
}
void slimlm_decode_attention_bf16(const void* q, int qstride, const void* kc, const void* vc, const int32_t* tables,
                                  int tstride, const int32_t* lens, const int32_t* nkeys, void* out, int S, int H,
                                  int kvh, int D, int bs, float scale, int threads) {
    decode_attention(q, qstride, kc, vc, NULL, NULL, tables, tstride, lens, nkeys, out, S, H, kvh, D, bs, scale,
                     threads, 1);
}
void slimlm_decode_attention_f32(const void* q, int qstride, const void* kc, const void* vc, const int32_t* tables,
                                 int tstride, const int32_t* lens, const int32_t* nkeys, void* out, int S, int H,
                                 int kvh, int D, int bs, float scale, int threads) {
    decode_attention(q, qstride, kc, vc, NULL, NULL, tables, tstride, lens, nkeys, out, S, H, kvh, D, bs, scale,
                     threads, 0);
}
/* The same over int8 caches (kc, vc int8 [blocks][bs][KVH][D]) with their scales ksc, vsc [blocks][KVH];
   q and out in bf16 (bf16 = 1) or float32. */
void slimlm_decode_attention_kv8(const void* q, int qstride, const void* kc, const void* vc, const float* ksc,
                                 const float* vsc, const int32_t* tables, int tstride, const int32_t* lens,
                                 const int32_t* nkeys, void* out, int S, int H, int kvh, int D, int bs, float scale,
                                 int threads, int bf16) {
    decode_attention(q, qstride, kc, vc, ksc, vsc, tables, tstride, lens, nkeys, out, S, H, kvh, D, bs, scale,
                     threads, bf16);
}

#endif  /* SLIMLM_ATTENTION_C */
