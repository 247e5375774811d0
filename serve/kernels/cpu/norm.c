/* RMSNorm, optionally fused with the residual add (serve/layers/norm.py). */
#ifndef SLIMLM_NORM_C
#define SLIMLM_NORM_C
#include "prelude.h"

/* Rows of D (D % 16 == 0): if delta, x = x + delta first (rounded to the dtype; written to res, the
   new residual stream); then out = w * round(x / sqrt(mean(x^2) + eps)), all arithmetic in fp32. */
static void rms_norm(const void* x, const void* delta, void* res, const void* w, void* out, int n, int D,
                     float eps, int threads, int bf16) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int i = 0; i < n; i++) {
        size_t r = (size_t)i * D;
        __m512 ss = _mm512_setzero_ps();
        for (int j = 0; j < D; j += 16) {
            __m512 v = ld16(x, r + j, bf16);
            if (delta) { v = rnd(_mm512_add_ps(v, ld16(delta, r + j, bf16)), bf16); st16(res, r + j, v, bf16); }
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        __m512 s = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
        const void* src = delta ? res : x;
        for (int j = 0; j < D; j += 16)
            st16(out, r + j, _mm512_mul_ps(rnd(_mm512_mul_ps(ld16(src, r + j, bf16), s), bf16), ld16(w, j, bf16)),
                 bf16);
    }
}
void slimlm_rms_norm_bf16(const void* x, const void* delta, void* res, const void* w, void* out, int n, int D,
                          float eps, int threads) { rms_norm(x, delta, res, w, out, n, D, eps, threads, 1); }
void slimlm_rms_norm_f32(const void* x, const void* delta, void* res, const void* w, void* out, int n, int D,
                         float eps, int threads) { rms_norm(x, delta, res, w, out, n, D, eps, threads, 0); }

#endif  /* SLIMLM_NORM_C */
