/* Decode attention over the decode workspace (radixfair/engine/decode_workspace.py), for AVX512 CPUs.
 *
 * One call per layer does what a dozen small tensor ops did: it writes each request's new key and
 * value into its workspace row, then for each (request, kv head) computes the scores of the kv
 * head's query heads against exactly the request's context (no padding to the batch's longest, no
 * mask), the softmax and the weighted sum of values. Queries sharing a kv head (GQA) are scored in
 * one pass over the keys. Accumulation is in float32; K/V are float32 or bf16 (the model's dtype).
 *
 * Layouts (elements): K workspace [rows, kvh, D, cap] (transposed: a position is a column, so 16
 * positions are one vector), V workspace [rows, kvh, cap, D]; q [B, H, D], k/v new [B, kvh, D] with
 * the given row strides; out [B, H, D] contiguous.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16 /* query heads per kv head */

static inline float load1(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffff) > 0x7f800000) return (uint16_t)((b >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

static inline void store1(void *p, int64_t i, float f, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = to_bf16(f);
    else
        ((float *)p)[i] = f;
}

static inline __m512 load16(const void *p, int64_t i, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16_masked(const void *p, int64_t i, int n, int bf16) {
    __mmask16 m = (__mmask16)((1u << n) - 1);
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Returns 0, -1 on bad arguments (head_dim not a multiple of 16, too many query heads per kv head),
 * -2 when out of memory. */
int rf_decode_attention(const void *q, int64_t q_stride, const void *k_new, int64_t k_stride, const void *v_new,
                        int64_t v_stride, void *kw, void *vw, const int64_t *slots, const int64_t *lens, int64_t B,
                        int64_t H, int64_t KVH, int64_t D, int64_t cap, float scale, int bf16, void *out,
                        int threads) {
    const int64_t G = H / KVH;
    if (D % 16 || G > MAX_GROUP || G * KVH != H || D > 256) return -1;
    int64_t lmax = 0;
    for (int64_t b = 0; b < B; b++) lmax = lens[b] > lmax ? lens[b] : lmax;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = (float *)malloc((size_t)(G * (lmax + 16)) * sizeof(float));
        if (!scores) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * KVH; item++) {
            if (!scores) continue;
            const int64_t b = item / KVH, h = item % KVH, len = lens[b], pos = len - 1;
            const int64_t row = slots[b] * KVH + h;
            /* the new token's key (a column of the transposed K) and value */
            for (int64_t d = 0; d < D; d++) {
                store1(kw, (row * D + d) * cap + pos, load1(k_new, b * k_stride + h * D + d, bf16), bf16);
                store1(vw, (row * cap + pos) * D + d, load1(v_new, b * v_stride + h * D + d, bf16), bf16);
            }
            float qf[MAX_GROUP][256];
            for (int64_t g = 0; g < G; g++)
                for (int64_t d = 0; d < D; d++) qf[g][d] = load1(q, b * q_stride + (h * G + g) * D + d, bf16) * scale;
            /* scores: 16 positions at a time, every query head of the group per key load */
            const int64_t kbase = row * D * cap;
            for (int64_t l = 0; l < len; l += 16) {
                const int n = len - l >= 16 ? 16 : (int)(len - l);
                __m512 acc[MAX_GROUP];
                for (int64_t g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
                for (int64_t d = 0; d < D; d++) {
                    __m512 kv = n == 16 ? load16(kw, kbase + d * cap + l, bf16)
                                        : load16_masked(kw, kbase + d * cap + l, n, bf16);
                    for (int64_t g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(qf[g][d]), kv, acc[g]);
                }
                for (int64_t g = 0; g < G; g++)
                    _mm512_mask_storeu_ps(scores + g * (lmax + 16) + l, (__mmask16)((1u << n) - 1), acc[g]);
            }
            /* softmax per query head */
            for (int64_t g = 0; g < G; g++) {
                float *s = scores + g * (lmax + 16), m = -INFINITY, sum = 0.0f;
                for (int64_t l = 0; l < len; l++) m = s[l] > m ? s[l] : m;
                for (int64_t l = 0; l < len; l++) {
                    s[l] = expf(s[l] - m);
                    sum += s[l];
                }
                const float inv = 1.0f / sum;
                for (int64_t l = 0; l < len; l++) s[l] *= inv;
            }
            /* out = probs @ V: a value row is D contiguous elements */
            const int64_t vbase = row * cap * D;
            for (int64_t g = 0; g < G; g++) {
                const float *s = scores + g * (lmax + 16);
                for (int64_t d0 = 0; d0 < D; d0 += 64) {
                    const int chunks = (int)((D - d0) >= 64 ? 4 : (D - d0) / 16);
                    __m512 o[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                    for (int64_t l = 0; l < len; l++) {
                        __m512 p = _mm512_set1_ps(s[l]);
                        for (int c = 0; c < chunks; c++)
                            o[c] = _mm512_fmadd_ps(p, load16(vw, vbase + l * D + d0 + c * 16, bf16), o[c]);
                    }
                    float tmp[64];
                    for (int c = 0; c < chunks; c++) _mm512_storeu_ps(tmp + c * 16, o[c]);
                    for (int c = 0; c < chunks * 16; c++) store1(out, (b * H + h * G + g) * D + d0 + c, tmp[c], bf16);
                }
            }
        }
        free(scores);
    }
    return failed ? -2 : 0;
}
