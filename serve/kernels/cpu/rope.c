/* Rotary embedding fused with the KV-cache write (serve/layers/rotary.py). */
#ifndef SLIMLM_ROPE_C
#define SLIMLM_ROPE_C
#include "prelude.h"

/* One head of D (D % 32 == 0): y = x * cos + roll(x, D/2) * sin (sin's first half negated: rotate_half),
   each product and the sum rounded to the dtype, as PyTorch's three ops do. */
static inline void rope_head(const void* x, size_t xi, const void* c, const void* s, size_t ci, void* y, size_t yi,
                             int D, int bf16) {
    const int half = D / 2;
    for (int j = 0; j < D; j += 16) {
        int jr = j < half ? j + half : j - half;
        __m512 a = rnd(_mm512_mul_ps(ld16(x, xi + j, bf16), ld16(c, ci + j, bf16)), bf16);
        __m512 b = rnd(_mm512_mul_ps(ld16(x, xi + jr, bf16), ld16(s, ci + j, bf16)), bf16);
        st16(y, yi + j, _mm512_add_ps(a, b), bf16);
    }
}
/* qkv [n][H + 2 KVH][D]; cos, sin [n][D]; slots int64 [n]. Writes q_out [n][H][D] = rope(q),
   k_cache[slot][KVH][D] = rope(k), v_cache[slot][KVH][D] = v. */
static void rope_write_kv(const void* qkv, const void* c, const void* s, const int64_t* slots, void* q_out,
                          void* kc, void* vc, int n, int H, int KVH, int D, int threads, int bf16) {
    const int esz = bf16 ? 2 : 4, width = (H + 2 * KVH) * D;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 64)
    for (int i = 0; i < n; i++) {
        size_t row = (size_t)i * width, ci = (size_t)i * D, slot = (size_t)slots[i] * KVH * D;
        for (int h = 0; h < H; h++)
            rope_head(qkv, row + (size_t)h * D, c, s, ci, q_out, ((size_t)i * H + h) * D, D, bf16);
        for (int h = 0; h < KVH; h++)
            rope_head(qkv, row + (size_t)(H + h) * D, c, s, ci, kc, slot + (size_t)h * D, D, bf16);
        memcpy((char*)vc + slot * esz, (const char*)qkv + (row + (size_t)(H + KVH) * D) * esz, (size_t)KVH * D * esz);
    }
}
void slimlm_rope_write_kv_bf16(const void* qkv, const void* c, const void* s, const int64_t* slots, void* q_out,
                               void* kc, void* vc, int n, int H, int KVH, int D, int threads) {
    rope_write_kv(qkv, c, s, slots, q_out, kc, vc, n, H, KVH, D, threads, 1);
}
void slimlm_rope_write_kv_f32(const void* qkv, const void* c, const void* s, const int64_t* slots, void* q_out,
                              void* kc, void* vc, int n, int H, int KVH, int D, int threads) {
    rope_write_kv(qkv, c, s, slots, q_out, kc, vc, n, H, KVH, D, threads, 0);
}

#endif  /* SLIMLM_ROPE_C */
