/* Quantized-weight matmuls for x86 CPUs with AVX512-VNNI: y[T, N] = x[T, K] @ W[N, K]^T.
 *
 * A decode pass reads every weight once and does a few multiply-adds per byte, so it runs at the
 * speed the weights stream from memory if the arithmetic keeps up. Here it does: the weight codes
 * stay 4 (or 8) bits all the way to an int8 dot-product instruction (vpdpbusd: 64 u8 x s8 products
 * per instruction), as llama.cpp multiplies its Q4/Q8 blocks.
 *
 * Activations are quantized per token in blocks of 32 inputs (int8, scale = block max / 127), so
 * each token's result depends on that token only. Weights are packed (by the Python side) in tiles
 * of 16 output rows: the 16 lanes of a vector are 16 rows, each lane's 4 bytes 4 consecutive inputs,
 * and an input's 4 bytes are broadcast to all lanes.
 *
 *   int4: per 32-input group g and row n, w = d[g, n] * (q - 8) + z[g, n] with q in 0..15. A tile's
 *         group is one 352-byte block: four 64-byte chunks of 8 inputs, byte (r, j) = q[r, k + j] |
 *         q[r, k + 4 + j] << 4; then d and z (16 bf16 each) and the sums of (q - 8) (16 int16). The
 *         codes are centred (q - 8, signed) and the activations offset by 128 (unsigned), so the
 *         activations' rounding error is scaled by |q - 8|, not by q: half the error of Q4_1 x Q8.
 *   int8: per row n, w = s[n] * q with q in -127..127, stored as q + 128 (vpdpbusd's unsigned
 *         operand); a 64-byte chunk holds 4 inputs of 16 rows.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 32
#define TILE 16
#define TOKEN_BLOCK 4
#define Q4_CODES 256 /* bytes of codes in a tile's group block */
#define Q4_BLOCK (Q4_CODES + 96)

/* Per token and 32-input block: int8 codes, their scale, the sum of the float inputs (int4's
 * offset term) and of the codes (int8's +128 correction); the codes are stored plus `offset`. With
 * `levels` 2 each token becomes two rows: its codes, then those of what they left over (the
 * residual, at 1/127 of the first step or less), so activations carry ~14 bits for twice the
 * integer work (the weight bytes, which bound a decode pass, stay the same). */
static void quantize_activations(const float *x, int64_t T, int64_t K, int offset, int levels, int8_t *xq,
                                 float *dx, float *xs, int32_t *xqs) {
    const int64_t G = K / GROUP;
    const __m512i off = _mm512_set1_epi32(offset);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t g = 0; g < G; g++) {
            const float *v = x + t * K + g * GROUP;
            __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
            for (int l = 0; l < levels; l++) {
                const int64_t r = t * levels + l;
                float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
                float d = amax / 127.0f;
                __m512 s = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
                /* round half to even, as torch.round: the product is never out of range */
                __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, s));
                __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, s));
                int8_t *out = xq + r * K + g * GROUP;
                _mm_storeu_si128((__m128i *)out, _mm512_cvtepi32_epi8(_mm512_add_epi32(qa, off)));
                _mm_storeu_si128((__m128i *)(out + 16), _mm512_cvtepi32_epi8(_mm512_add_epi32(qb, off)));
                dx[r * G + g] = d;
                xs[r * G + g] = l == 0 ? sum : 0.0f; /* the offset term once per token */
                xqs[r * G + g] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
                /* what this level left for the next */
                __m512 dv = _mm512_set1_ps(d);
                a = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qa), dv, a);
                b = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qb), dv, b);
            }
        }
    }
}

static inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

static inline __m512 bf16_to_ps(const uint8_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* One tile (16 rows) for NT activation rows; with `levels` 2, rows pair up into one token's output. */
static inline __attribute__((always_inline)) void q4_tile(int NT, int levels, const uint8_t *wt,
                                                          const int8_t *xq, const float *dx, const float *xs,
                                                          int64_t K, float *y, int64_t N) {
    const int64_t G = K / GROUP;
    const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    __m512 tot[TOKEN_BLOCK];
    for (int u = 0; u < NT; u++) tot[u] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i acc[TOKEN_BLOCK];
        for (int u = 0; u < NT; u++) acc[u] = _mm512_setzero_si512();
        const uint8_t *blk = wt + g * Q4_BLOCK;
        for (int c = 0; c < GROUP / 8; c++) {
            __m512i z = _mm512_loadu_si512((const void *)(blk + c * 64));
            __m512i lo = _mm512_sub_epi8(_mm512_and_si512(z, low), eight);
            __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(z, 4), low), eight);
            for (int u = 0; u < NT; u++) {
                const int8_t *xp = xq + u * K + g * GROUP + c * 8;
                acc[u] = _mm512_dpbusd_epi32(acc[u], bcast4(xp), lo);
                acc[u] = _mm512_dpbusd_epi32(acc[u], bcast4(xp + 4), hi);
            }
        }
        __m512 dv = bf16_to_ps(blk + Q4_CODES);
        __m512 zv = bf16_to_ps(blk + Q4_CODES + 32);
        /* the activations' +128 times the centred codes' sum, taken back out */
        __m512i shift = _mm512_slli_epi32(
            _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(blk + Q4_CODES + 64))), 7);
        for (int u = 0; u < NT; u++) {
            __m512 part = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[u], shift));
            tot[u] = _mm512_fmadd_ps(part, _mm512_mul_ps(dv, _mm512_set1_ps(dx[u * G + g])), tot[u]);
            tot[u] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xs[u * G + g]), tot[u]);
        }
    }
    for (int u = 0; u < NT; u += levels)
        _mm512_storeu_ps(y + (u / levels) * N, levels == 2 ? _mm512_add_ps(tot[u], tot[u + 1]) : tot[u]);
}

static inline __attribute__((always_inline)) void q8_tile(int NT, int levels, const uint8_t *wt, const float *st,
                                                          const int8_t *xq, const float *dx, const int32_t *xqs,
                                                          int64_t K, float *y, int64_t N) {
    const int64_t G = K / GROUP;
    __m512 tot[TOKEN_BLOCK];
    float shift[TOKEN_BLOCK];
    for (int u = 0; u < NT; u++) {
        tot[u] = _mm512_setzero_ps();
        shift[u] = 0.0f;
    }
    for (int64_t g = 0; g < G; g++) {
        __m512i acc[TOKEN_BLOCK];
        for (int u = 0; u < NT; u++) acc[u] = _mm512_setzero_si512();
        const uint8_t *wg = wt + g * (GROUP / 4) * 64;
        for (int c = 0; c < GROUP / 4; c++) {
            __m512i z = _mm512_loadu_si512((const void *)(wg + c * 64));
            for (int u = 0; u < NT; u++)
                acc[u] = _mm512_dpbusd_epi32(acc[u], z, bcast4(xq + u * K + g * GROUP + c * 4));
        }
        for (int u = 0; u < NT; u++) {
            float d = dx[u * G + g];
            tot[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[u]), _mm512_set1_ps(d), tot[u]);
            shift[u] += 128.0f * (float)xqs[u * G + g] * d; /* the stored codes are q + 128 */
        }
    }
    __m512 sv = _mm512_loadu_ps(st);
    for (int u = 0; u < NT; u += levels) {
        __m512 v = _mm512_sub_ps(tot[u], _mm512_set1_ps(shift[u]));
        if (levels == 2) v = _mm512_add_ps(v, _mm512_sub_ps(tot[u + 1], _mm512_set1_ps(shift[u + 1])));
        _mm512_storeu_ps(y + (u / levels) * N, _mm512_mul_ps(sv, v));
    }
}

typedef struct {
    int8_t *xq;
    float *dx, *xs;
    int32_t *xqs;
} Scratch;

static int scratch_alloc(Scratch *s, int64_t T, int64_t K) {
    const int64_t G = K / GROUP;
    s->xq = (int8_t *)malloc((size_t)(T * K));
    s->dx = (float *)malloc((size_t)(T * G) * sizeof(float));
    s->xs = (float *)malloc((size_t)(T * G) * sizeof(float));
    s->xqs = (int32_t *)malloc((size_t)(T * G) * sizeof(int32_t));
    return s->xq && s->dx && s->xs && s->xqs;
}

static void scratch_free(Scratch *s) {
    free(s->xq);
    free(s->dx);
    free(s->xs);
    free(s->xqs);
}

/* y[T0, N] for x[T0, K]. Returns 0, or -1 when out of memory. K % 32 == 0 and N % 16 == 0 (checked by
 * the caller); `levels` 1 or 2 (see quantize_activations). `threads` is explicit: the caller may run its
 * own small ops on fewer threads than a matmul is worth. */
int rf_q4_matmul(const float *x, int64_t T0, int64_t K, int64_t N, const uint8_t *w, float *y, int levels,
                 int threads) {
    Scratch s;
    const int64_t T = T0 * levels; /* activation rows */
    if (!scratch_alloc(&s, T, K)) {
        scratch_free(&s);
        return -1;
    }
    quantize_activations(x, T0, K, 128, levels, s.xq, s.dx, s.xs, s.xqs);
    const int64_t tiles = N / TILE, G = K / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < tiles; i++) {
        const uint8_t *wt = w + i * G * Q4_BLOCK;
        for (int64_t t = 0; t < T; t += TOKEN_BLOCK) {
            const int8_t *xq = s.xq + t * K;
            const float *dx = s.dx + t * G, *xs = s.xs + t * G;
            float *yt = y + (t / levels) * N + i * TILE;
            const int nt = T - t >= TOKEN_BLOCK ? TOKEN_BLOCK : (int)(T - t);
            if (levels == 2) {
                if (nt == 4) q4_tile(4, 2, wt, xq, dx, xs, K, yt, N);
                else q4_tile(2, 2, wt, xq, dx, xs, K, yt, N);
            } else {
                switch (nt) {
                case 4: q4_tile(4, 1, wt, xq, dx, xs, K, yt, N); break;
                case 3: q4_tile(3, 1, wt, xq, dx, xs, K, yt, N); break;
                case 2: q4_tile(2, 1, wt, xq, dx, xs, K, yt, N); break;
                default: q4_tile(1, 1, wt, xq, dx, xs, K, yt, N); break;
                }
            }
        }
    }
    scratch_free(&s);
    return 0;
}

int rf_q8_matmul(const float *x, int64_t T0, int64_t K, int64_t N, const uint8_t *w, const float *scale,
                 float *y, int levels, int threads) {
    Scratch s;
    const int64_t T = T0 * levels; /* activation rows */
    if (!scratch_alloc(&s, T, K)) {
        scratch_free(&s);
        return -1;
    }
    quantize_activations(x, T0, K, 0, levels, s.xq, s.dx, s.xs, s.xqs);
    const int64_t tiles = N / TILE, G = K / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < tiles; i++) {
        const uint8_t *wt = w + i * K * TILE;
        const float *st = scale + i * TILE;
        for (int64_t t = 0; t < T; t += TOKEN_BLOCK) {
            const int8_t *xq = s.xq + t * K;
            const float *dx = s.dx + t * G;
            const int32_t *xqs = s.xqs + t * G;
            float *yt = y + (t / levels) * N + i * TILE;
            const int nt = T - t >= TOKEN_BLOCK ? TOKEN_BLOCK : (int)(T - t);
            if (levels == 2) {
                if (nt == 4) q8_tile(4, 2, wt, st, xq, dx, xqs, K, yt, N);
                else q8_tile(2, 2, wt, st, xq, dx, xqs, K, yt, N);
            } else {
                switch (nt) {
                case 4: q8_tile(4, 1, wt, st, xq, dx, xqs, K, yt, N); break;
                case 3: q8_tile(3, 1, wt, st, xq, dx, xqs, K, yt, N); break;
                case 2: q8_tile(2, 1, wt, st, xq, dx, xqs, K, yt, N); break;
                default: q8_tile(1, 1, wt, st, xq, dx, xqs, K, yt, N); break;
                }
            }
        }
    }
    scratch_free(&s);
    return 0;
}
