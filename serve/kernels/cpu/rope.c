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
/* Store one head's D values x (dtype) into an int8 cache (serve/layers/kv_quant.py, `quantize_write`, for a
   block that takes one token in this call): the (block, head) scale restarts at slot 0, grows to at
   least 1.25x when the token needs a larger one (re-rounding what the block holds), then x / scale is
   rounded half to even and clamped to +-127. The same float32 operations as the PyTorch code, so the
   same bytes. */
static inline float bf16_at(const void* x, size_t i) {
    uint32_t u = (uint32_t)((const uint16_t*)x)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void store_q8(const void* x, size_t xi, int8_t* data, float* scale, size_t slot, int kh, int KVH,
                            int D, int bs, int bf16) {
    const size_t b = slot / bs;
    float* sc = scale + b * KVH + kh;
    const float old = slot % bs == 0 ? 0.f : *sc;
    float amax = 0.f;
    for (int j = 0; j < D; j++) {
        const float v = bf16 ? bf16_at(x, xi + j) : ((const float*)x)[xi + j];
        amax = fmaxf(amax, fabsf(v));
    }
    const float need = amax / 127.f;
    const float nw = need > old ? fmaxf(need, old * 1.25f) : old;
    if (nw > old && old > 0.f) {
        const float ratio = old / nw;
        for (int o = 0; o < bs; o++) {
            int8_t* p = data + ((b * bs + o) * KVH + kh) * D;
            for (int j = 0; j < D; j++) p[j] = (int8_t)nearbyintf((float)p[j] * ratio);
        }
    }
    *sc = nw;
    const float safe = nw > 0.f ? nw : 1.f;
    int8_t* dst = data + (slot * KVH + kh) * D;
    for (int j = 0; j < D; j++) {
        const float v = bf16 ? bf16_at(x, xi + j) : ((const float*)x)[xi + j];
        float qv = nearbyintf(v / safe);
        dst[j] = (int8_t)(qv > 127.f ? 127.f : qv < -127.f ? -127.f : qv);
    }
}
/* rope_write_kv into int8 caches kc, vc [blocks][bs][KVH][D] with scales ksc, vsc [blocks][KVH]. Every
   token must write to a different block (a decode step: one token per sequence): a block that took two
   tokens here would grow its scale in two steps where PyTorch grows it once. tmp: D values of the dtype. */
static void rope_write_kv_q8(const void* qkv, const void* c, const void* s, const int64_t* slots, void* q_out,
                             int8_t* kc, int8_t* vc, float* ksc, float* vsc, int n, int H, int KVH, int D, int bs,
                             int bf16) {
    const int width = (H + 2 * KVH) * D;
    float tmp[1024];  /* D <= 256 values, as float32 or bf16 */
    for (int i = 0; i < n; i++) {
        size_t row = (size_t)i * width, ci = (size_t)i * D, slot = (size_t)slots[i];
        for (int h = 0; h < H; h++)
            rope_head(qkv, row + (size_t)h * D, c, s, ci, q_out, ((size_t)i * H + h) * D, D, bf16);
        for (int h = 0; h < KVH; h++) {
            rope_head(qkv, row + (size_t)(H + h) * D, c, s, ci, tmp, 0, D, bf16);
            store_q8(tmp, 0, kc, ksc, slot, h, KVH, D, bs, bf16);
            store_q8(qkv, row + (size_t)(H + KVH + h) * D, vc, vsc, slot, h, KVH, D, bs, bf16);
        }
    }
}
void slimlm_rope_write_kv_q8(const void* qkv, const void* c, const void* s, const int64_t* slots, void* q_out,
                             int8_t* kc, int8_t* vc, float* ksc, float* vsc, int n, int H, int KVH, int D, int bs,
                             int bf16) {
    rope_write_kv_q8(qkv, c, s, slots, q_out, kc, vc, ksc, vsc, n, H, KVH, D, bs, bf16);
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
