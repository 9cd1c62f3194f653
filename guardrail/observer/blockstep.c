/* The decoder blocks of one forward of a Llama-family model in one call, for guardrail's
 * observer under observer.options.matmul: q4_1 (driven by guardrail/observer/blockstep.py;
 * built into one library with blockq.c, whose products it calls).
 *
 * Why: a read of a few tokens ran ~60 small torch ops per block besides its four products
 * (norms, rotary, attention, residual adds, silu, views), each paying torch's dispatch: about
 * 11 ms of a 30-block forward, as much as the products themselves on Q4_1 blocks. Here each
 * block is RMSNorm -> q/k/v product -> rotary -> attention over the stream's cache and its new
 * keys -> o product -> residual -> RMSNorm -> gate/up product -> silu(gate) * up -> down
 * product -> residual, as guardrail/observer/llama_step.py's _packed_qkv, attend_blocked and
 * _finish compute it, in float32 (other summation orders; exp as a polynomial, about 1 ulp).
 *
 * Several streams' new tokens may be packed in one sequence (segments): the products run on all
 * rows at once, attention segment by segment over that segment's own cache (read where it lies,
 * never written) and its own new keys, causal within them. The new keys and values go to an
 * output buffer the caller appends to the caches. Under observer.options.matmul: q4_1_tail_q8
 * the blocks from int_from on (past the deepest layer a monitor reads) call blockq's int8
 * products instead. Single-threaded. Built with -O3 -mavx2 -mfma -mf16c. */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* blockq.c: y (M, N) = x (M, K) times a weight (N, K) in Q4_1 blocks; 0, or -1 out of memory.
 * _q8: the same blocks in its integer layout, the rows quantized to int8 (not float32's sums). */
int guardrail_q4_1(const float *x, int M, int K, const uint8_t *qs, const float *d,
                   const uint16_t *m, int N, float *y);
int guardrail_q4_1_q8(const float *x, int M, int K, const uint8_t *wq, const float *wd,
                      const float *wm, int N, float *y);
/* _fixed: guardrail_q4_1 with each row's floats independent of the rows beside it */
int guardrail_q4_1_fixed(const float *x, int M, int K, const uint8_t *qs, const float *d,
                         const uint16_t *m, int N, float *y);

/* Products by block kind: float32 ones; float32 ones before int8 blocks (whose rows' rounding
 * would turn the float noise of another row count into a visible change, so each row's floats
 * must not depend on the rows beside it); int8 ones, for a block past the deepest layer any
 * monitor reads (its weights in the integer layout). */
enum { FLOAT, FLOAT_FIXED, INT8 };

/* y = x times the weight whose three pointers start at w[at], in products of kind `kind`. */
static int project(int kind, const float *x, int M, int K, const void *const *w, int at, int N,
                   float *y) {
    if (kind == INT8) return guardrail_q4_1_q8(x, M, K, w[at], w[at + 1], w[at + 2], N, y);
    if (kind == FLOAT_FIXED)
        return guardrail_q4_1_fixed(x, M, K, w[at], w[at + 1], w[at + 2], N, y);
    return guardrail_q4_1(x, M, K, w[at], w[at + 1], w[at + 2], N, y);
}

/* The pointers of a block's weights, in this order (blockstep.py builds them); each product's
 * three (_Q, _D, _M) are blockq's Q4_1 blocks, or its integer layout from block int_from on. */
enum { W_IN, W_POST, QKV_Q, QKV_D, QKV_M, O_Q, O_D, O_M, GU_Q, GU_D, GU_M, DN_Q, DN_D, DN_M,
       W_PER_BLOCK };

/* The model's shapes: hidden, query heads, key/value heads, head_dim, intermediate. */
enum { D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_INTER, D_COUNT };

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 h = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, h);
    h = _mm_movehl_ps(h, s);
    s = _mm_add_ss(s, h);
    return _mm_cvtss_f32(s);
}

/* exp(x) (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, times 2^n): within 1.2e-7
 * relative of the true value over -87..88; below -87.3 it gives 0, not a subnormal, and from
 * 88.38 the largest float, not inf (silu of a large negative stays a tiny negative, not -0). */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3f);
    x = _mm256_min_ps(x, hi);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
    fx = _mm256_floor_ps(fx);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
    return _mm256_andnot_ps(under, y);
}

static inline float exp1(float x) {
    float in[8] = {x}, out[8];
    _mm256_storeu_ps(out, exp8(_mm256_loadu_ps(in)));
    return out[0];
}

/* x = h / sqrt(mean(h^2) + eps) * w, row by row (LlamaRMSNorm). */
static void rms_norm(const float *h, int T, int H, const float *w, float eps, float *x) {
    for (int t = 0; t < T; t++) {
        const float *r = h + (size_t)t * H;
        float *o = x + (size_t)t * H;
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        int i = 0;
        for (; i + 16 <= H; i += 16) {
            __m256 u = _mm256_loadu_ps(r + i), v = _mm256_loadu_ps(r + i + 8);
            a = _mm256_fmadd_ps(u, u, a);
            b = _mm256_fmadd_ps(v, v, b);
        }
        float ss = hsum8(_mm256_add_ps(a, b));
        for (; i < H; i++) ss += r[i] * r[i];
        float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (i = 0; i < H; i++) o[i] = (r[i] * inv) * w[i];
    }
}

/* Row tile of attention scores: s[r, j] = q_r . k_j for R <= 3 rows and KC <= 4 keys
 * (12 sums, 3 query vectors and a key vector: 16 registers). */
static inline __attribute__((always_inline)) void dots(int R, int KC, const float *q, int d,
                                                       const float *k, size_t ldk, float *s,
                                                       size_t lds) {
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < KC; j++) acc[r][j] = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) {
        __m256 qv[3];
        for (int r = 0; r < R; r++) qv[r] = _mm256_loadu_ps(q + (size_t)r * d + c);
        for (int j = 0; j < KC; j++) {
            __m256 kv = _mm256_loadu_ps(k + j * ldk + c);
            for (int r = 0; r < R; r++) acc[r][j] = _mm256_fmadd_ps(qv[r], kv, acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < KC; j++) s[r * lds + j] = hsum8(acc[r][j]);
}

/* fn(R, n, ...) with n (1..4, known at run time) a constant, so the tile's loops unroll. */
#define UP_TO_4(n, fn, R, ...)                                                                \
    switch (n) {                                                                              \
    case 1: fn(R, 1, __VA_ARGS__); break;                                                     \
    case 2: fn(R, 2, __VA_ARGS__); break;                                                     \
    case 3: fn(R, 3, __VA_ARGS__); break;                                                     \
    default: fn(R, 4, __VA_ARGS__); break;                                                    \
    }

/* Keys (and values) per pass over the rows: 16 KB of them at d = 64, in L1. */
#define CACHE_BLOCK 64

/* s[r, j] = q_r . k_j for R rows of q (R, d) and keys j < nk at stride ldk: the keys in blocks,
 * each shared by every row tile while it is in L1. */
static void scores(int R, const float *q, int d, const float *k, size_t ldk, int nk, float *s,
                   size_t lds) {
    for (int b0 = 0; b0 < nk; b0 += CACHE_BLOCK) {
        const int b1 = nk - b0 < CACHE_BLOCK ? nk : b0 + CACHE_BLOCK;
        for (int r0 = 0; r0 < R; r0 += 3) {
            int rr = R - r0 < 3 ? R - r0 : 3;
            for (int j0 = b0; j0 < b1; j0 += 4) {
                int KC = b1 - j0 < 4 ? b1 - j0 : 4;
                const float *qr = q + (size_t)r0 * d, *kj = k + j0 * ldk;
                float *sr = s + r0 * lds + j0;
                switch (rr) {
                case 1: UP_TO_4(KC, dots, 1, qr, d, kj, ldk, sr, lds) break;
                case 2: UP_TO_4(KC, dots, 2, qr, d, kj, ldk, sr, lds) break;
                default: UP_TO_4(KC, dots, 3, qr, d, kj, ldk, sr, lds) break;
                }
            }
        }
    }
}

/* o[r, c0 : c0 + 8 VC] (+)= sum_j w[r, j] v_j[c0 : ...] for R <= 3 rows (12 sums, 3 weights
 * and a value vector: 16 registers). */
static inline __attribute__((always_inline)) void wsum(int R, int VC, const float *w,
                                                       size_t ldw, const float *v, size_t ldv,
                                                       int nk, int c0, float *o, int d,
                                                       int add) {
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < VC; c++)
            acc[r][c] = add ? _mm256_loadu_ps(o + (size_t)r * d + c0 + 8 * c)
                            : _mm256_setzero_ps();
    for (int j = 0; j < nk; j++) {
        __m256 wj[3];
        for (int r = 0; r < R; r++) wj[r] = _mm256_broadcast_ss(w + r * ldw + j);
        for (int c = 0; c < VC; c++) {
            __m256 vv = _mm256_loadu_ps(v + j * ldv + c0 + 8 * c);
            for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(wj[r], vv, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < VC; c++) _mm256_storeu_ps(o + (size_t)r * d + c0 + 8 * c, acc[r][c]);
}

/* o (R, d) (+)= w (R, nk) @ v (nk, d at stride ldv). The values in blocks, each shared by every
 * row tile while it is in L1 (rather than every row tile streaming all of them); each sum
 * still runs over the values in order, carried in o from block to block. */
static void weighted(int R, const float *w, size_t ldw, const float *v, size_t ldv, int nk,
                     float *o, int d, int add) {
    for (int j0 = 0; j0 < nk; j0 += CACHE_BLOCK) {
        const int kb = nk - j0 < CACHE_BLOCK ? nk - j0 : CACHE_BLOCK;
        const int more = add || j0 > 0;
        const float *vb = v + (size_t)j0 * ldv;
        for (int r0 = 0; r0 < R; r0 += 3) {
            int rr = R - r0 < 3 ? R - r0 : 3;
            for (int c0 = 0; c0 < d; c0 += 32) {
                int VC = (d - c0) / 8 < 4 ? (d - c0) / 8 : 4;
                const float *wr = w + r0 * ldw + j0;
                float *orow = o + (size_t)r0 * d;
                switch (rr) {
                case 1: UP_TO_4(VC, wsum, 1, wr, ldw, vb, ldv, kb, c0, orow, d, more) break;
                case 2: UP_TO_4(VC, wsum, 2, wr, ldw, vb, ldv, kb, c0, orow, d, more) break;
                default: UP_TO_4(VC, wsum, 3, wr, ldw, vb, ldv, kb, c0, orow, d, more) break;
                }
            }
        }
    }
}

/* Each row's softmax over its first `visible` scores; the rest of the row set to 0. */
static void softmax_row(float *s, int visible, int width) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 8 <= visible; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float mx = _mm_cvtss_f32(h);
    for (; j < visible; j++) mx = s[j] > mx ? s[j] : mx;
    __m256 sum8 = _mm256_setzero_ps();
    m8 = _mm256_set1_ps(mx);
    for (j = 0; j + 8 <= visible; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum8(sum8);
    for (; j < visible; j++) {
        s[j] = exp1(s[j] - mx);
        sum += s[j];
    }
    const float inv = 1.0f / sum;  /* one division a row, then products */
    const __m256 inv8 = _mm256_set1_ps(inv);
    for (j = 0; j + 8 <= visible; j += 8)
        _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv8));
    for (; j < visible; j++) s[j] = s[j] * inv;
    for (; j < width; j++) s[j] = 0.0f;
}

/* Attention of one segment's n new rows (tokens s0.. of the sequence) over its cache of P
 * positions (keys and values of kv head g at pk + g * stride, rows of d) and its own new keys
 * (causal). q: the sequence's rotated, scaled q/k/v rows (T, qkvw); nk, nv: the new keys and
 * values (kv_heads, T, d); out (T, heads * d). work: R * (P + n) + R * d floats, R = groups * n. */
static void attend(const int *dims, const float *qkv, int qkvw, int T, int s0, int n,
                   const float *pk, const float *pv, long stride, int P, const float *nk,
                   const float *nv, float *out, float *work) {
    const int heads = dims[D_HEADS], kvh = dims[D_KV_HEADS], d = dims[D_HEAD_DIM];
    const int groups = heads / kvh, R = groups * n, width = P + n;
    float *s = work, *q = work + (size_t)R * width, *o = q + (size_t)R * d;
    for (int g = 0; g < kvh; g++) {
        /* query head g * groups + j's rows: j * n + t, as attend_blocked folds them */
        for (int j = 0; j < groups; j++)
            for (int t = 0; t < n; t++)
                memcpy(q + (size_t)(j * n + t) * d,
                       qkv + (size_t)(s0 + t) * qkvw + (size_t)(g * groups + j) * d,
                       sizeof(float) * d);
        const float *kp = pk + (size_t)g * stride, *vp = pv + (size_t)g * stride;
        const float *kn = nk + ((size_t)g * T + s0) * d, *vn = nv + ((size_t)g * T + s0) * d;
        if (P) scores(R, q, d, kp, (size_t)d, P, s, (size_t)width);
        scores(R, q, d, kn, (size_t)d, n, s + P, (size_t)width);
        for (int r = 0; r < R; r++) softmax_row(s + (size_t)r * width, P + r % n + 1, width);
        if (P) weighted(R, s, (size_t)width, vp, (size_t)d, P, o, d, 0);
        weighted(R, s + P, (size_t)width, vn, (size_t)d, n, o, d, P > 0);
        for (int j = 0; j < groups; j++)
            for (int t = 0; t < n; t++)
                memcpy(out + (size_t)(s0 + t) * heads * d + (size_t)(g * groups + j) * d,
                       o + (size_t)(j * n + t) * d, sizeof(float) * d);
    }
}

/* The first `depth` blocks over T rows.
 * dims: D_COUNT shapes; eps: the norms' epsilon; scale: the queries' (1.0: in their weights);
 * weights: W_PER_BLOCK pointers per block; h_in, h (T, hidden): the embeddings, and the state
 * after the last block; cos, sin (T, head_dim): the rotary embedding at each row's position;
 * segs: 3 ints per segment (first row, end row, cached positions P); past: per segment, per
 * block, its cache's keys then values (kv head g at + g * strides[segment], rows of head_dim);
 * new_kv (depth, 2, kv_heads, T, head_dim): the new keys and values; keep: per block, NULL
 * or (T, hidden) for the state after it; int_from: the first block whose products run on int8
 * rows (depth or more: none). Returns 0, -1 out of memory, -2 a bad argument. */
int guardrail_blocks(const int *dims, float eps, float scale, int depth, int int_from,
                     const void *const *weights, const float *h_in, float *h, int T,
                     const float *cos, const float *sin, int nseg, const int *segs,
                     const float *const *past, const long *strides, float *new_kv,
                     float *const *keep) {
    const int H = dims[D_HIDDEN], heads = dims[D_HEADS], kvh = dims[D_KV_HEADS];
    const int d = dims[D_HEAD_DIM], inter = dims[D_INTER], half = d / 2;
    const int qkvw = (heads + 2 * kvh) * d, rotated = heads + kvh;
    if (T <= 0 || int_from < 0 || d % 8 || kvh <= 0 || heads % kvh || H % 32 || inter % 32 || (heads * d) % 32)
        return -2;
    size_t work = 0;
    for (int sg = 0, at = 0; sg < nseg; sg++) {
        const int s0 = segs[3 * sg], s1 = segs[3 * sg + 1], P = segs[3 * sg + 2];
        if (s0 != at || s1 <= s0 || s1 > T || P < 0) return -2;
        at = s1;
        if (sg == nseg - 1 && s1 != T) return -2;
        size_t R = (size_t)(heads / kvh) * (s1 - s0);
        size_t need = R * (P + s1 - s0) + 2 * R * d;
        work = need > work ? need : work;
    }
    size_t rows = (size_t)T;
    size_t wide = (size_t)(2 * inter > qkvw ? 2 * inter : qkvw);
    float *x = malloc(sizeof(float) * (rows * H + rows * wide + rows * inter + rows * H +
                                       rows * heads * d + work));
    if (x == NULL) return -1;
    float *big = x + rows * H, *act = big + rows * wide, *tmp = act + rows * inter;
    float *att = tmp + rows * H, *scratch = att + rows * heads * d;
    int rc = 0;
    memcpy(h, h_in, sizeof(float) * rows * H);
    for (int b = 0; b < depth && rc == 0; b++) {
        const void *const *w = weights + (size_t)b * W_PER_BLOCK;
        float *nk = new_kv + (size_t)b * 2 * kvh * T * d, *nv = nk + (size_t)kvh * T * d;
        const int kind = b >= int_from ? INT8 : int_from < depth ? FLOAT_FIXED : FLOAT;
        rms_norm(h, T, H, (const float *)w[W_IN], eps, x);
        rc = project(kind, x, T, H, w, QKV_Q, qkvw, big);
        if (rc) break;
        for (int t = 0; t < T; t++) {
            float *row = big + (size_t)t * qkvw;
            const float *c = cos + (size_t)t * d, *sn = sin + (size_t)t * d;
            for (int hd = 0; hd < rotated; hd++) {  /* x * cos + rotate_half(x) * sin */
                float *v = row + (size_t)hd * d;
                for (int i = 0; i < half; i++) {
                    float a = v[i], bb = v[i + half];
                    v[i] = a * c[i] + bb * -sn[i];
                    v[i + half] = bb * c[i + half] + a * sn[i + half];
                }
            }
            if (scale != 1.0f)
                for (int i = 0; i < heads * d; i++) row[i] = row[i] * scale;
            for (int g = 0; g < kvh; g++) {
                memcpy(nk + ((size_t)g * T + t) * d, row + (size_t)(heads + g) * d,
                       sizeof(float) * d);
                memcpy(nv + ((size_t)g * T + t) * d, row + (size_t)(rotated + g) * d,
                       sizeof(float) * d);
            }
        }
        for (int sg = 0; sg < nseg; sg++) {
            const int s0 = segs[3 * sg], n = segs[3 * sg + 1] - s0, P = segs[3 * sg + 2];
            const float *const *pp = past + ((size_t)sg * depth + b) * 2;
            attend(dims, big, qkvw, T, s0, n, pp[0], pp[1], strides[sg], P, nk, nv, att,
                   scratch);
        }
        rc = project(kind, att, T, heads * d, w, O_Q, H, tmp);
        if (rc) break;
        for (size_t i = 0; i < rows * H; i++) h[i] = h[i] + tmp[i];
        rms_norm(h, T, H, (const float *)w[W_POST], eps, x);
        rc = project(kind, x, T, H, w, GU_Q, 2 * inter, big);
        if (rc) break;
        for (int t = 0; t < T; t++) {  /* silu(gate) * up: gate / (1 + exp(-gate)) * up */
            const float *gate = big + (size_t)t * 2 * inter, *up = gate + inter;
            float *a = act + (size_t)t * inter;
            for (int i = 0; i < inter; i += 8) {
                __m256 gv = _mm256_loadu_ps(gate + i);
                __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                __m256 sv = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
                _mm256_storeu_ps(a + i, _mm256_mul_ps(sv, _mm256_loadu_ps(up + i)));
            }
        }
        rc = project(kind, act, T, inter, w, DN_Q, H, tmp);
        if (rc) break;
        for (size_t i = 0; i < rows * H; i++) h[i] = h[i] + tmp[i];
        if (keep[b] != NULL) memcpy(keep[b], h, sizeof(float) * rows * H);
    }
    free(x);
    return rc ? -1 : 0;
}

/* The version of this interface, checked at load. */
int guardrail_blockstep_version(void) { return 2; }
