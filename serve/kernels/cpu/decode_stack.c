/* The fused decode stack for a few sequences (serve/models/cpu_decode.py): it calls the kernels of
   the files included here directly, so they inline across the layer. */
#include "gemv.c"
#include "norm.c"
#include "rope.c"
#include "attention.c"
#include "qgemv.c"
#include "prelude.h"

/* out[n][I] = round(round(silu(gate)) * up) for gate_up [n][2I] = gate | up; silu(g) = g / (1 + e^-g). */
static void silu_mul(const void* gu, void* out, int n, int I, int threads, int bf16) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 16)
    for (int r = 0; r < n; r++)
        for (int j = 0; j < I; j += 16) {
            __m512 g = ld16(gu, (size_t)r * 2 * I + j, bf16), u = ld16(gu, (size_t)r * 2 * I + I + j, bf16);
            __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 s = rnd(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), bf16);
            st16(out, (size_t)r * I + j, _mm512_mul_ps(s, u), bf16);
        }
}
void slimlm_silu_mul_bf16(const void* gu, void* out, int n, int I, int threads) { silu_mul(gu, out, n, I, threads, 1); }
void slimlm_silu_mul_f32(const void* gu, void* out, int n, int I, int threads) { silu_mul(gu, out, n, I, threads, 0); }

/* Per projection either a dense weight in the GEMV's layout (*_w, *_b in the model dtype) or, where *_q is
   not NULL, a quantized one (QuantLinear's slimlm_qweight: codes, scales, zeros, float32 bias). */
typedef struct {
    const void *in_norm, *post_norm, *qkv_w, *qkv_b, *o_w, *o_b, *gu_w, *gu_b, *down_w, *down_b;
    const slimlm_qweight *qkv_q, *o_q, *gu_q, *down_q;
    void *k_cache, *v_cache;
    float *k_scale, *v_scale;   /* int8 caches (QuantizedKV): their scales; NULL for caches in the model dtype */
} slimlm_layer;

static void gemv(const slimlm_qweight* q, const void* w, const void* x, void* y, const void* b, int m, int out, int in,
                 int threads, int bf16) {
    if (q) slimlm_qlinear(q, x, y, m, threads);   /* what QuantLinear.forward calls: the same results */
    else if (bf16) slimlm_gemv_bf16(w, x, y, b, m, out, in, threads);
    else slimlm_gemv_f32(w, x, y, b, m, out, in, threads);
}

/* The decoder layers of a decode step, each as DecoderLayer.forward computes it:
   x += o_proj(attention(rope(qkv_proj(norm(x))))); x += down_proj(silu_mul(gate_up_proj(norm(x)))).
   x [m][hidden] is updated in place; work holds m x (2 hidden + (H + 2 KVH) D + 2 H D + 3 I + hidden). */
void slimlm_decode_stack(const slimlm_layer* L, int nl, void* x, int m, int hidden, int H, int KVH, int D, int I,
                         const void* cos, const void* sin, const int64_t* slots, const int32_t* tables, int tstride,
                         const int32_t* lens, int bs, float scale, float eps, void* work, int threads, int bf16) {
    const size_t esz = bf16 ? 2 : 4, qkvw = (size_t)(H + 2 * KVH) * D;
    char* w = (char*)work;
    void* h = w;            w += (size_t)m * hidden * esz;
    void* qkv = w;          w += (size_t)m * qkvw * esz;
    void* q = w;            w += (size_t)m * H * D * esz;
    void* attn = w;         w += (size_t)m * H * D * esz;
    void* o = w;            w += (size_t)m * hidden * esz;
    void* gu = w;           w += (size_t)m * 2 * I * esz;
    void* act = w;          w += (size_t)m * I * esz;
    void* dn = w;
    for (int l = 0; l < nl; l++) {
        rms_norm(x, NULL, NULL, L[l].in_norm, h, m, hidden, eps, 1, bf16);
        gemv(L[l].qkv_q, L[l].qkv_w, h, qkv, L[l].qkv_b, m, (int)qkvw, hidden, threads, bf16);
        if (L[l].k_scale)   /* a decode step: every sequence writes its own block */
            rope_write_kv_q8(qkv, cos, sin, slots, q, (int8_t*)L[l].k_cache, (int8_t*)L[l].v_cache, L[l].k_scale,
                             L[l].v_scale, m, H, KVH, D, bs, bf16);
        else
            rope_write_kv(qkv, cos, sin, slots, q, L[l].k_cache, L[l].v_cache, m, H, KVH, D, 1, bf16);
        decode_attention(q, H * D, L[l].k_cache, L[l].v_cache, L[l].k_scale, L[l].v_scale, tables, tstride, lens,
                         NULL, attn, m, H, KVH, D, bs, scale, threads, bf16);
        gemv(L[l].o_q, L[l].o_w, attn, o, L[l].o_b, m, hidden, H * D, threads, bf16);
        rms_norm(x, o, x, L[l].post_norm, h, m, hidden, eps, 1, bf16);   /* x += o; h = norm(x) */
        gemv(L[l].gu_q, L[l].gu_w, h, gu, L[l].gu_b, m, 2 * I, hidden, threads, bf16);
        silu_mul(gu, act, m, I, 1, bf16);
        gemv(L[l].down_q, L[l].down_w, act, dn, L[l].down_b, m, hidden, I, threads, bf16);
        for (size_t j = 0; j < (size_t)m * hidden; j += 16)                /* x += down (rounded) */
            st16(x, j, _mm512_add_ps(ld16(x, j, bf16), ld16(dn, j, bf16)), bf16);
    }
}
