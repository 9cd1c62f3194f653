/* Products of float32 rows with weights kept in GGUF's Q4_1 or Q8_0 blocks (32 weights along
 * the input dimension), for guardrail's observer (observer.options.matmul: q4_1; built and
 * driven by guardrail/observer/blockq.py, which also makes the layouts below).
 *
 * y[r, n] = sum_k x[r, k] * w[n, k] with w = q * d + m (Q4_1) or q * d (Q8_0): q * d is exact
 * in float32, so these are the model's float32 weights, and the products are float32's but
 * for the summation order. Up to 4 rows each block is taken as d * (q . x) + m * sum(x) (one
 * product per block and row fewer than rebuilding the weights; each row's block sums computed
 * once per call). From 5 rows (bound by the multiply-adds) the weights are rebuilt once per
 * call, fma(q, d, m), four output rows at a time into a buffer in L1 (product_small) or from 64
 * rows a chunk of them into a panel in L2 (product_panel), which a register-blocked
 * micro-kernel multiplies with the rows: the same floats either way. The weights are streamed
 * from memory once per call. Single-threaded. Built with -O3 -mavx2 -mfma -mf16c.
 *
 * The second half ("Integer products", observer.options.matmul: q4_1_q8 / q4_1_q16) multiplies
 * the same blocks, regrouped, in integers with the rows quantized per block to int8 or int16:
 * not float32's products. */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TILE 4   /* rows of x per register tile (up to 4 rows) */
#define CHUNK 32 /* output rows whose weights are reused across the row tiles */
#define MANY 5   /* from this many rows the weights are rebuilt as float32 (product_small) */
#define PANEL_ROWS 64 /* ... and from this many into a panel of many output rows */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 h = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, h);
    h = _mm_movehl_ps(h, s);
    s = _mm_add_ss(s, h);
    return _mm_cvtss_f32(s);
}

/* A block's 32 q as floats: Q4_1 bytes j < 8 hold weights j (low nibble) and j + 8 (high),
 * bytes 8 + j weights 16 + j and 24 + j; Q8_0 32 int8. */
static inline __attribute__((always_inline)) void widen(int kind, const uint8_t *q,
                                                        __m256 w[4]) {
    if (kind == 0) {
        const __m256i low4 = _mm256_set1_epi32(0x0F);
        __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
        w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, low4));
        w[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
        w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(b, low4));
        w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
    } else {
        for (int j = 0; j < 4; j++)
            w[j] = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * j))));
    }
}

/* One block b of output row n against R rows: acc[r] += d_b * (q_b . x_r,b). */
static inline __attribute__((always_inline)) void block(int kind, int R, const float *x,
                                                        size_t ldx, const uint8_t *q,
                                                        const float *d, int b, __m256 *acc) {
    const size_t qbytes = kind == 0 ? 16 : 32;
    __m256 w[4];
    widen(kind, q + b * qbytes, w);
    __m256 db = _mm256_broadcast_ss(d + b);
    for (int r = 0; r < R; r++) {
        const float *xr = x + r * ldx + (size_t)b * 32;
        __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xr));
        s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), s);
        s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), s);
        s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), s);
        acc[r] = _mm256_fmadd_ps(db, s, acc[r]);
    }
}

/* R rows of x (R <= TILE, a constant after inlining) against output rows n0..n1:
 * y = sum_b d_b * (q_b . x_b) [+ sum_b m_b * xs_b], with xs the rows' block sums (Q4_1);
 * two running sums per row (even and odd blocks: independent FMA chains). */
static inline __attribute__((always_inline)) void tile(
    int kind, int R, const float *x, size_t ldx, const float *xs, int nbp, const uint8_t *qs,
    const float *ds, const uint16_t *ms, int nb, int n0, int n1, float *y, size_t ldy) {
    const size_t qbytes = kind == 0 ? 16 : 32;
    for (int n = n0; n < n1; n++) {
        const uint8_t *q = qs + (size_t)n * nb * qbytes;
        const float *d = ds + (size_t)n * nbp;
        __m256 even[TILE], odd[TILE];
        for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();
        int b = 0;
        for (; b + 1 < nb; b += 2) {
            block(kind, R, x, ldx, q, d, b, even);
            block(kind, R, x, ldx, q, d, b + 1, odd);
        }
        if (b < nb) block(kind, R, x, ldx, q, d, b, even);
        if (kind == 0) {  /* the minima: m . xs, nbp a multiple of 8, both zero-padded */
            const uint16_t *m = ms + (size_t)n * nbp;
            for (int c = 0; c < nbp; c += 8) {
                __m256 mc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + c)));
                for (int r = 0; r < R; r++)
                    odd[r] = _mm256_fmadd_ps(mc, _mm256_loadu_ps(xs + r * nbp + c), odd[r]);
            }
        }
        for (int r = 0; r < R; r++) y[r * ldy + n] = hsum(_mm256_add_ps(even[r], odd[r]));
    }
}

#define TILES(kind, name)                                                                     \
    static void name(int R, const float *x, size_t ldx, const float *xs, int nbp,             \
                     const uint8_t *qs, const float *ds, const uint16_t *ms, int nb, int n0,   \
                     int n1, float *y,                                                        \
                     size_t ldy) {                                                            \
        switch (R) {                                                                          \
        case 1: tile(kind, 1, x, ldx, xs, nbp, qs, ds, ms, nb, n0, n1, y, ldy); break;            \
        case 2: tile(kind, 2, x, ldx, xs, nbp, qs, ds, ms, nb, n0, n1, y, ldy); break;            \
        case 3: tile(kind, 3, x, ldx, xs, nbp, qs, ds, ms, nb, n0, n1, y, ldy); break;            \
        default: tile(kind, 4, x, ldx, xs, nbp, qs, ds, ms, nb, n0, n1, y, ldy); break;           \
        }                                                                                     \
    }
TILES(0, tiles_q4_1)
TILES(1, tiles_q8_0)

/* PANEL_ROWS rows or more: a chunk of output rows' weights rebuilt once per call into a float32
 * panel (one output row after another), then a register-blocked micro-kernel: 3 rows of x
 * against 4 output rows, 12 running sums in registers, so each x vector loaded serves 4
 * outputs and each weight vector 3 rows: 7 loads per 12 multiply-adds. (The earlier version
 * rebuilt each block once per tile of 8 rows and loaded a row of x per multiply-add: 0.75x
 * float16 at 72 rows. 4 rows against 3 outputs loads as little but ends in scattered stores:
 * slower here.) */
#define PANEL 65536    /* bytes of a chunk's panel: in L2 */
#define SLICE 768      /* most inputs per slice of K */
#define GROUP 16384    /* bytes of a group's panel for a slice: in L1 with the rows' tile */

/* The sums of a, b, c and d's lanes. */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* y[r, o] (+)= the lanes' sum of acc[r][o] (k0 = 0: =). */
static inline __attribute__((always_inline)) void sums(int R, int O, __m256 acc[3][4], int k0,
                                                       float *y, size_t ldy) {
    if (O == 4) {  /* a row's four outputs at once */
        for (int r = 0; r < R; r++) {
            __m128 s = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
            if (k0) s = _mm_add_ps(s, _mm_loadu_ps(y + r * ldy));
            _mm_storeu_ps(y + r * ldy, s);
        }
    } else {  /* a group's last output rows */
        for (int r = 0; r < R; r++)
            for (int o = 0; o < O; o++)
                y[r * ldy + o] = (k0 ? y[r * ldy + o] : 0.0f) + hsum(acc[r][o]);
    }
}

/* y[r, o] (+)= x[r, k0:k1] . w[o, k0:k1] for R <= 3 rows and O <= 4 output rows (the sums, the
 * rows' x vectors and a weight vector: 16 ymm registers); the first slice of K stores, the
 * others add. */
static inline __attribute__((always_inline)) void micro(int R, int O, const float *x, int K,
                                                        int k0, int k1, const float *w,
                                                        float *y, size_t ldy) {
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int o = 0; o < O; o++) acc[r][o] = _mm256_setzero_ps();
    for (int k = k0; k < k1; k += 8) {
        __m256 xv[3];
        for (int r = 0; r < R; r++) xv[r] = _mm256_loadu_ps(x + (size_t)r * K + k);
        for (int o = 0; o < O; o++) {
            __m256 wv = _mm256_loadu_ps(w + (size_t)o * K + k);
            for (int r = 0; r < R; r++) acc[r][o] = _mm256_fmadd_ps(wv, xv[r], acc[r][o]);
        }
    }
    sums(R, O, acc, k0, y, ldy);
}

#define MICRO(R, ...)                                                                         \
    switch (O) {                                                                              \
    case 1: micro(R, 1, __VA_ARGS__); break;                                                  \
    case 2: micro(R, 2, __VA_ARGS__); break;                                                  \
    case 3: micro(R, 3, __VA_ARGS__); break;                                                  \
    default: micro(R, 4, __VA_ARGS__); break;                                                 \
    }
static void micros(int R, int O, const float *x, int K, int k0, int k1, const float *w,
                   float *y, size_t ldy) {
    switch (R) {
    case 1: MICRO(1, x, K, k0, k1, w, y, ldy) break;
    case 2: MICRO(2, x, K, k0, k1, w, y, ldy) break;
    default: MICRO(3, x, K, k0, k1, w, y, ldy) break;
    }
}

/* Rows in the next tile with `left` rows to go: tiles of 3, two of 2 where a single row would
 * be left (16: 2, 3, 3, 3, 3, 2): a row alone loads a weight vector per multiply-add. */
static inline int row_tile(int left) {
    return (left % 3 == 1 && left > 1) || left == 2 ? 2 : (left < 3 ? left : 3);
}

/* Output rows n0..n1's weights, rebuilt as float32 into panel (n1 - n0, K). */
static void rebuild(int kind, const uint8_t *qs, const float *ds, const uint16_t *ms, int nb,
                    int nbp, int n0, int n1, float *panel) {
    const size_t qbytes = kind == 0 ? 16 : 32;
    for (int n = n0; n < n1; n++) {
        const uint8_t *q = qs + (size_t)n * nb * qbytes;
        float *out = panel + (size_t)(n - n0) * nb * 32;
        for (int b = 0; b < nb; b++) {
            __m256 w[4];
            widen(kind, q + b * qbytes, w);
            __m256 db = _mm256_broadcast_ss(ds + (size_t)n * nbp + b);
            if (kind == 0) {
                __m256 mb = _mm256_set1_ps(_cvtsh_ss(ms[(size_t)n * nbp + b]));
                for (int j = 0; j < 4; j++) w[j] = _mm256_fmadd_ps(w[j], db, mb);
            } else {
                for (int j = 0; j < 4; j++) w[j] = _mm256_mul_ps(w[j], db);
            }
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + b * 32 + 8 * j, w[j]);
        }
    }
}

static int product_panel(int kind, const float *x, int M, int K, const uint8_t *qs,
                         const float *ds, const uint16_t *ms, int N, float *y) {
    const int nb = K / 32, nbp = (nb + 7) / 8 * 8;
    const int slices = (K + SLICE - 1) / SLICE;
    const int slice = (K / slices + 7) / 8 * 8;  /* even slices: 1,536 as 768 + 768 */
    int group = GROUP / (slice * 4) / 4 * 4, chunk = PANEL / (K * 4) / 4 * 4;
    group = group < 4 ? 4 : group;
    chunk = chunk < group ? group : chunk / group * group;
    float *panel = aligned_alloc(32, (size_t)chunk * K * sizeof(float));
    if (panel == NULL) return -1;
    for (int n0 = 0; n0 < N; n0 += chunk) {
        int n1 = n0 + chunk < N ? n0 + chunk : N;
        rebuild(kind, qs, ds, ms, nb, nbp, n0, n1, panel);
        /* A group's panel for a slice of K stays in L1 across the row tiles, and each tile's
         * rows across the group's output rows: only the rows stream from L2. */
        for (int g0 = n0; g0 < n1; g0 += group) {
            int g1 = g0 + group < n1 ? g0 + group : n1;
            for (int k0 = 0; k0 < K; k0 += slice) {
                int k1 = k0 + slice < K ? k0 + slice : K;
                for (int r0 = 0, R; r0 < M; r0 += R) {
                    R = row_tile(M - r0);
                    for (int o0 = g0; o0 < g1; o0 += 4) {
                        int O = g1 - o0 < 4 ? g1 - o0 : 4;
                        micros(R, O, x + (size_t)r0 * K, K, k0, k1,
                               panel + (size_t)(o0 - n0) * K, y + (size_t)r0 * N + o0,
                               (size_t)N);
                    }
                }
            }
        }
    }
    free(panel);
    return 0;
}

/* The panel path's arithmetic (the same rebuilt weights, slices and sums in the same order)
 * with four output rows' weights rebuilt at a time into a buffer that stays in L1, the rows
 * read again for each four: from MANY to PANEL_ROWS rows 0.90-0.95x the panel's time (the
 * panel's chunk goes through L2); below MANY, for guardrail_q4_1_fixed, 1.1-1.4x the
 * block-factored tiles' time. (Rebuilding in registers as the k loop reaches each block, with
 * no buffer, was 2x.) Either path gives a row the same floats whatever rows share the call. */
static int product_small(int kind, const float *x, int M, int K, const uint8_t *qs,
                         const float *ds, const uint16_t *ms, int N, float *y) {
    const int nb = K / 32, nbp = (nb + 7) / 8 * 8;
    const int slices = (K + SLICE - 1) / SLICE;
    const int slice = (K / slices + 7) / 8 * 8;
    float *w = aligned_alloc(32, (size_t)4 * K * sizeof(float));
    if (w == NULL) return -1;
    for (int o0 = 0; o0 < N; o0 += 4) {
        const int O = N - o0 < 4 ? N - o0 : 4;
        rebuild(kind, qs, ds, ms, nb, nbp, o0, o0 + O, w);
        for (int k0 = 0; k0 < K; k0 += slice) {
            int k1 = k0 + slice < K ? k0 + slice : K;
            for (int r0 = 0, R; r0 < M; r0 += R) {
                R = row_tile(M - r0);
                micros(R, O, x + (size_t)r0 * K, K, k0, k1, w, y + (size_t)r0 * N + o0,
                       (size_t)N);
            }
        }
    }
    free(w);
    return 0;
}

typedef void (*tiles_fn)(int, const float *, size_t, const float *, int, const uint8_t *,
                         const float *, const uint16_t *, int, int, int, float *, size_t);

static int product(int kind, int fixed, const float *x, int M, int K, const uint8_t *qs,
                   const float *ds, const uint16_t *ms, int N, float *y) {
    const int nb = K / 32, nbp = (nb + 7) / 8 * 8;
    tiles_fn f = kind == 0 ? tiles_q4_1 : tiles_q8_0;
    float *xs = NULL;
    if (M <= 0) return 0;
    if (M >= PANEL_ROWS) return product_panel(kind, x, M, K, qs, ds, ms, N, y);
    if (M >= MANY || fixed) return product_small(kind, x, M, K, qs, ds, ms, N, y);
    if (kind == 0) {  /* each row's block sums, zero-padded to nbp */
        xs = calloc((size_t)M * nbp, sizeof(float));
        if (xs == NULL) return -1;
        for (int r = 0; r < M; r++)
            for (int b = 0; b < nb; b++) {
                const float *xr = x + (size_t)r * K + (size_t)b * 32;
                __m256 lo = _mm256_add_ps(_mm256_loadu_ps(xr), _mm256_loadu_ps(xr + 8));
                __m256 hi = _mm256_add_ps(_mm256_loadu_ps(xr + 16), _mm256_loadu_ps(xr + 24));
                __m256 s = _mm256_add_ps(lo, hi);
                xs[(size_t)r * nbp + b] = hsum(s);
            }
    }
    for (int n0 = 0; n0 < N; n0 += CHUNK) {
        int n1 = n0 + CHUNK < N ? n0 + CHUNK : N;
        for (int r0 = 0; r0 < M; r0 += TILE) {
            int R = M - r0 < TILE ? M - r0 : TILE;
            f(R, x + (size_t)r0 * K, (size_t)K, xs == NULL ? NULL : xs + (size_t)r0 * nbp, nbp,
              qs, ds, ms, nb, n0, n1, y + (size_t)r0 * N, (size_t)N);
        }
    }
    free(xs);
    return 0;
}

/* x (M, K) float32, K a multiple of 32; y (M, N) float32; all contiguous. qs: Q4_1
 * (N, K/32, 16) nibbles or Q8_0 (N, K/32, 32) int8; d (N, nbp) float32 and (Q4_1) m (N, nbp)
 * float16 per block, zero-padded to nbp = K/32 rounded up to 8. Returns 0, or -1 when out of
 * memory for the row sums or the panel (y not written). */
int guardrail_q4_1(const float *x, int M, int K, const uint8_t *qs, const float *d,
                   const uint16_t *m, int N, float *y) {
    return product(0, 0, x, M, K, qs, d, m, N, y);
}

int guardrail_q8_0(const float *x, int M, int K, const int8_t *qs, const float *d, int N,
                   float *y) {
    return product(1, 0, x, M, K, (const uint8_t *)qs, d, NULL, N, y);
}

/* guardrail_q4_1 whose every row is the same floats whatever rows share the call (the rebuilt
 * weights' arithmetic below MANY rows too): where int8 rounding follows, as under
 * observer.options.matmul: q4_1_tail_q8, a float noise of 1e-7 would otherwise move it. */
int guardrail_q4_1_fixed(const float *x, int M, int K, const uint8_t *qs, const float *d,
                         const uint16_t *m, int N, float *y) {
    return product(0, 1, x, M, K, qs, d, m, N, y);
}

/* Recovering the blocks from float32 weights (the model's GGUF dequantized), checked bit
 * for bit. Quantizers give a block's minimum q = 0 and its maximum q = 15 (Q4_1) or its
 * largest magnitude |q| = 127 (Q8_0); d and m are float16 values. Each block is tried with
 * the candidate d that makes the extreme weight's q = top, top from 15 (127) down, and kept
 * when every weight is exactly q * d + m (q * d); a block no top fits is counted, and the
 * count returned (0: the whole weight is exact). d and m zero-padded to nbp by the caller. */
static inline float half_round(double v) { return _cvtsh_ss(_cvtss_sh((float)v, 0)); }

long guardrail_pack_q4_1(const float *w, int N, int K, uint8_t *qs, float *ds, uint16_t *ms) {
    const int nb = K / 32, nbp = (nb + 7) / 8 * 8;
    long bad = 0;
    for (long n = 0; n < N; n++)
        for (int b = 0; b < nb; b++) {
            const float *v = w + n * K + (size_t)b * 32;
            uint8_t *out = qs + (n * nb + b) * 16;
            float lo = v[0], hi = v[0];
            for (int k = 1; k < 32; k++) {
                lo = v[k] < lo ? v[k] : lo;
                hi = v[k] > hi ? v[k] : hi;
            }
            int fit = 0;
            float d = 0.0f;
            uint8_t q[32];
            if (half_round(lo) == lo && isfinite(lo) && isfinite(hi)) {
                for (int top = 15; top >= 1 && !fit; top--) {
                    d = half_round(((double)hi - lo) / top);
                    fit = 1;
                    for (int k = 0; k < 32 && fit; k++) {
                        float t = d > 0.0f ? nearbyintf((v[k] - lo) / d) : 0.0f;
                        t = t < 0.0f ? 0.0f : (t > 15.0f ? 15.0f : t);
                        q[k] = (uint8_t)t;
                        fit = t * d + lo == v[k];
                    }
                    if (d == 0.0f) break;
                }
            }
            if (!fit) {
                bad++;
                continue;
            }
            for (int j = 0; j < 8; j++) {
                out[j] = (uint8_t)(q[j] | q[j + 8] << 4);
                out[8 + j] = (uint8_t)(q[16 + j] | q[24 + j] << 4);
            }
            ds[n * nbp + b] = d;
            ms[n * nbp + b] = _cvtss_sh(lo, 0);
        }
    return bad;
}

long guardrail_pack_q8_0(const float *w, int N, int K, int8_t *qs, float *ds) {
    const int nb = K / 32, nbp = (nb + 7) / 8 * 8;
    long bad = 0;
    for (long n = 0; n < N; n++)
        for (int b = 0; b < nb; b++) {
            const float *v = w + n * K + (size_t)b * 32;
            int8_t *out = qs + (n * nb + b) * 32;
            float amax = 0.0f;
            for (int k = 0; k < 32; k++) amax = fabsf(v[k]) > amax ? fabsf(v[k]) : amax;
            int fit = 0;
            float d = 0.0f;
            if (isfinite(amax)) {
                for (int top = 127; top >= 100 && !fit; top--) {
                    d = half_round((double)amax / top);
                    fit = 1;
                    for (int k = 0; k < 32 && fit; k++) {
                        float t = d > 0.0f ? nearbyintf(v[k] / d) : 0.0f;
                        t = t < -128.0f ? -128.0f : (t > 127.0f ? 127.0f : t);
                        out[k] = (int8_t)t;
                        fit = t * d == v[k];
                    }
                    if (d == 0.0f) break;
                }
            }
            if (!fit) {
                bad++;
                continue;
            }
            ds[n * nbp + b] = d;
        }
    return bad;
}

/* ---- Integer products (observer.options.matmul: q4_1_q8 and q4_1_q16) ----
 *
 * The rows are quantized per block of 32 inputs, as llama.cpp does on the CPU: x ~ qx * dx with
 * dx = max|x| / 127 (int8, "q8") or / 32767 (int16, "q16"), qx rounded to nearest, and each
 * block's sx = dx * sum(qx) kept for Q4_1's minimum term (ggml's Q8_1 keeps it too). A block's
 * product is then an integer dot product plus floats:
 *     y[r, n] = sum_b  dw[n, b] * dx[r, b] * (qw[n, b] . qx[r, b])  +  m[n, b] * sx[r, b]
 * (Q8_0: without the m term). The weights are laid out in groups of 8 output rows so that one
 * int32 lane holds one output row: a row's few inputs are broadcast and multiplied with the 8
 * outputs' weights at once, the integer sums of a block come out as 8 outputs side by side, and
 * one float multiply-add per block and row scales them (no horizontal sums, no rebuilt float
 * weights). Register tiles: up to GROWS rows of x against a group; the group's blocks stay in L1
 * across the row tiles. Single-threaded.
 *
 * q8: _mm256_maddubs_epi16 (unsigned 4-bit weights x signed int8 rows, adjacent pairs summed to
 * int16; 8 of those per block fit int16: 8 * 2 * 15 * 127 = 30480), one _mm256_madd_epi16 per
 * block to int32. Q8_0 (the head): the signed-by-signed trick, |w| x (x with w's sign), each
 * pair's int16 sum widened to int32 at once (2 * 128 * 127 leaves no room for a second).
 * q16: _mm256_madd_epi16 (16-bit weights widened from the nibbles x int16 rows, pairs summed to
 * int32; a block's sum at most 32 * 15 * 32767 < 2^24, so exact as a float). */
#define GROWS 4  /* rows of x per tile */

/* Row block quantization: qx (M, K) int8 or int16, dx and sx (M, K/32). */
static void quantize_rows(int bits, const float *x, int M, int K, void *qx, float *dx,
                          float *sx) {
    const int nb = K / 32;
    const float top = bits == 8 ? 127.0f : 32767.0f;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (long r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            const float *v = x + r * K + (size_t)b * 32;
            __m256 a[4];
            for (int j = 0; j < 4; j++) a[j] = _mm256_loadu_ps(v + 8 * j);
            __m256 mx = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(a[0], abs_mask), _mm256_and_ps(a[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(a[2], abs_mask), _mm256_and_ps(a[3], abs_mask)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            const float d = amax / top, id = amax > 0.0f ? top / amax : 0.0f;
            const __m256 idv = _mm256_set1_ps(id);
            __m256i q[4];  /* round to nearest even, as torch.round */
            for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(a[j], idv));
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                         _mm256_add_epi32(q[2], q[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            const int sum = _mm_cvtsi128_si32(s4);
            /* packs work within 128-bit lanes: the permutes put the values back in order */
            __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
            if (bits == 8) {
                __m256i p = _mm256_packs_epi16(p01, p23);
                p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256((__m256i *)((int8_t *)qx + r * K + (size_t)b * 32), p);
            } else {
                int16_t *out = (int16_t *)qx + r * K + (size_t)b * 32;
                _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(p01, 0xD8));
                _mm256_storeu_si256((__m256i *)(out + 16), _mm256_permute4x64_epi64(p23, 0xD8));
            }
            dx[r * nb + b] = d;
            sx[r * nb + b] = d * (float)sum;
        }
}

static inline __m256i bcast4(const void *p) {  /* 4 bytes to every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Row r's results for the group: 8 outputs, or the first O. */
static inline void store_group(float *y, __m256 acc, int O) {
    if (O == 8) {
        _mm256_storeu_ps(y, acc);
    } else {
        float t[8];
        _mm256_storeu_ps(t, acc);
        for (int o = 0; o < O; o++) y[o] = t[o];
    }
}

/* A group's tile of R rows: the block's weights are unpacked once into registers, then each
 * row's block is summed and scaled by ROW (a macro of the kernel below) into its accumulator.
 * The accumulators are named values, not an array: gcc kept an array in memory, and each
 * block's multiply-add then waited on a store and a load. */
#define TILE_ROWS(ROW)                                                                        \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                               \
    for (int b = 0; b < nb; b++) {                                                            \
        UNPACK                                                                                \
        const __m256 d = _mm256_loadu_ps(wd + (size_t)b * 8);                                 \
        a0 = ROW(0, a0);                                                                      \
        if (R > 1) a1 = ROW(1, a1);                                                           \
        if (R > 2) a2 = ROW(2, a2);                                                           \
        if (R > 3) a3 = ROW(3, a3);                                                           \
    }                                                                                         \
    store_group(y, a0, O);                                                                    \
    if (R > 1) store_group(y + ldy, a1, O);                                                   \
    if (R > 2) store_group(y + 2 * ldy, a2, O);                                               \
    if (R > 3) store_group(y + 3 * ldy, a3, O);

/* acc + d * dx[r, b] * s (+ m * sx[r, b] for Q4_1), s the block's 8 int32 sums. */
static inline __attribute__((always_inline)) __m256 scaled(int kind, __m256 acc, __m256i s,
                                                           __m256 d, const float *wm,
                                                           const float *dx, const float *sx,
                                                           int nb, int r, int b) {
    __m256 scale = _mm256_mul_ps(d, _mm256_broadcast_ss(dx + (size_t)r * nb + b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    if (kind == 0)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(wm + (size_t)b * 8),
                              _mm256_broadcast_ss(sx + (size_t)r * nb + b), acc);
    return acc;
}

/* int8 rows. kind 0: Q4_1 groups, 4 vectors of 32 bytes a block: byte 4o + t of vector j
 * holds output o's weights 8j + t (low nibble) and 8j + 4 + t (high); 8 int16 sums of
 * products fit (8 * 2 * 15 * 127), so one _mm256_madd_epi16 a block widens them.
 * kind 1: Q8_0 groups, 8 vectors of 32 int8 a block: byte 4o + t of vector j is output o's
 * weight 4j + t; |w| x (x with w's sign), each pair's sum widened at once (2 * 128 * 127
 * leaves no room for a second). */
static inline __attribute__((always_inline)) __m256 row_q8(int kind, const __m256i *w,
                                                           const uint8_t *wb, const int8_t *xr,
                                                           __m256 d, const float *wm,
                                                           const float *dx, const float *sx,
                                                           int nb, int r, int b, __m256 acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s;
    if (kind == 0) {
        s = _mm256_maddubs_epi16(w[0], bcast4(xr));
        for (int j = 1; j < 8; j++)
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[j], bcast4(xr + 4 * j)));
        s = _mm256_madd_epi16(s, ones);
    } else {
        s = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            __m256i signed_x = _mm256_sign_epi8(
                bcast4(xr + 4 * j), _mm256_loadu_si256((const __m256i *)(wb + 32 * j)));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w[j], signed_x),
                                                      ones));
        }
    }
    return scaled(kind, acc, s, d, wm, dx, sx, nb, r, b);
}

static inline __attribute__((always_inline)) void group_q8(
    int kind, int R, const int8_t *qx, const float *dx, const float *sx, int K,
    const uint8_t *wq, const float *wd, const float *wm, int nb, float *y, size_t ldy, int O) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i w[8];
    const uint8_t *wb;
#define UNPACK                                                                                \
    wb = wq + (size_t)b * (kind == 0 ? 128 : 256);                                            \
    if (kind == 0) {                                                                          \
        for (int j = 0; j < 4; j++) {                                                         \
            __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * j));                   \
            w[2 * j] = _mm256_and_si256(v, low4);                                             \
            w[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);                   \
        }                                                                                     \
    } else {                                                                                  \
        for (int j = 0; j < 8; j++)                                                           \
            w[j] = _mm256_abs_epi8(_mm256_loadu_si256((const __m256i *)(wb + 32 * j)));       \
    }
#define ROW(r, acc) row_q8(kind, w, wb, qx + (size_t)(r) * K + (size_t)b * 32, d, wm, dx, sx, \
                           nb, r, b, acc)
    TILE_ROWS(ROW)
#undef ROW
#undef UNPACK
}

/* int16 rows. kind 0: Q4_1 groups, 4 vectors of 32 bytes a block; vector h's low nibbles
 * widened (unpacklo / unpackhi with zero) give the 16-bit weights of inputs 8h + 0..3, its high
 * nibbles those of 8h + 4..7, each as 8 outputs x 2 adjacent inputs (int16 lane 2o + p); a
 * block's sum is at most 32 * 15 * 32767 < 2^24, exact as a float.
 * kind 1: Q8_0 groups, 16 vectors of 16 int8 a block: byte 2o + p of vector j is output o's
 * weight 2j + p, sign-extended to 16 bits (read from L1 per row: 16 vectors do not fit). */
static inline __attribute__((always_inline)) __m256 row_q16(int kind, const __m256i *w,
                                                            const uint8_t *wb,
                                                            const int16_t *xr, __m256 d,
                                                            const float *wm, const float *dx,
                                                            const float *sx, int nb, int r,
                                                            int b, __m256 acc) {
    __m256i s = _mm256_setzero_si256();
    if (kind == 0) {
        for (int j = 0; j < 16; j += 2)
            s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_madd_epi16(w[j], bcast4(xr + 2 * j)),
                                                     _mm256_madd_epi16(w[j + 1],
                                                                       bcast4(xr + 2 * j + 2))));
    } else {
        for (int j = 0; j < 16; j += 2) {
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 16 * j)));
            __m256i w1 = _mm256_cvtepi8_epi16(
                _mm_loadu_si128((const __m128i *)(wb + 16 * j + 16)));
            s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_madd_epi16(w0, bcast4(xr + 2 * j)),
                                                     _mm256_madd_epi16(w1, bcast4(xr + 2 * j + 2))));
        }
    }
    return scaled(kind, acc, s, d, wm, dx, sx, nb, r, b);
}
static inline __attribute__((always_inline)) void group_q16(
    int kind, int R, const int16_t *qx, const float *dx, const float *sx, int K,
    const uint8_t *wq, const float *wd, const float *wm, int nb, float *y, size_t ldy, int O) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    __m256i w[16];  /* Q4_1: the block's 16-bit weights (in L1: more than the registers) */
    const uint8_t *wb;
#define UNPACK                                                                                \
    wb = wq + (size_t)b * (kind == 0 ? 128 : 256);                                            \
    if (kind == 0) {                                                                          \
        for (int h = 0; h < 4; h++) {                                                         \
            __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * h));                   \
            __m256i lo = _mm256_and_si256(v, low4);                                           \
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);                     \
            w[4 * h] = _mm256_unpacklo_epi8(lo, zero);                                        \
            w[4 * h + 1] = _mm256_unpackhi_epi8(lo, zero);                                    \
            w[4 * h + 2] = _mm256_unpacklo_epi8(hi, zero);                                    \
            w[4 * h + 3] = _mm256_unpackhi_epi8(hi, zero);                                    \
        }                                                                                     \
    }
#define ROW(r, acc) row_q16(kind, w, wb, qx + (size_t)(r) * K + (size_t)b * 32, d, wm, dx, \
                            sx, nb, r, b, acc)
    TILE_ROWS(ROW)
#undef ROW
#undef UNPACK
}

/* int16 rows on Q4_1, WIDEN_ROWS rows or more: the weights of a group are widened to 16 bits
 * once per product (512 bytes a block, in L1 or L2; the tiles above widen them again for every
 * tile of 4 rows) and each row's inputs 2j, 2j + 1 are broadcast once for two groups, 16
 * outputs. Vector j of a block's 16 holds inputs 2j and 2j + 1 of the 8 outputs (int16 lane
 * 2o + p), from the layout above. (The head's Q8_0 blocks stay on the tiles: widened the same
 * way they were slower here at every row count.) */
#define WIDEN_ROWS 5
static void widen_group(const uint8_t *wg, int nb, __m256i *out) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    for (int b = 0; b < nb; b++, out += 16)
        for (int h = 0; h < 4; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(wg + (size_t)b * 128 + 32 * h));
            __m256i lo = _mm256_and_si256(v, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            out[4 * h] = _mm256_unpacklo_epi8(lo, zero);
            out[4 * h + 1] = _mm256_unpackhi_epi8(lo, zero);
            out[4 * h + 2] = _mm256_unpacklo_epi8(hi, zero);
            out[4 * h + 3] = _mm256_unpackhi_epi8(hi, zero);
        }
}

/* R rows of int16 x against G (1 or 2) widened groups wa, wb (scales da, db; minima ma, mb). */
static inline __attribute__((always_inline)) void rows16(
    int R, int G, const int16_t *qx, int K, const float *dx, const float *sx,
    const __m256i *wa, const __m256i *wb, const float *da, const float *db, const float *ma,
    const float *mb, int nb, float *y, size_t ldy, int oa, int ob) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  /* group a, rows 0-3 */
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;                   /* group b */
    for (int b = 0; b < nb; b++) {
        const __m256i *va = wa + (size_t)b * 16, *vb = wb + (size_t)b * 16;
#define ROW16(r, acca, accb)                                                                  \
        do {                                                                                  \
            const int16_t *xr = qx + (size_t)(r) * K + (size_t)b * 32;                        \
            __m256i sa = _mm256_setzero_si256(), sb = sa;                                     \
            for (int j = 0; j < 16; j++) {                                                    \
                __m256i xb = bcast4(xr + 2 * j);                                              \
                sa = _mm256_add_epi32(sa, _mm256_madd_epi16(va[j], xb));                      \
                if (G == 2) sb = _mm256_add_epi32(sb, _mm256_madd_epi16(vb[j], xb));          \
            }                                                                                 \
            acca = scaled(0, acca, sa, _mm256_loadu_ps(da + (size_t)b * 8), ma, dx, sx, nb,   \
                          r, b);                                                              \
            if (G == 2)                                                                       \
                accb = scaled(0, accb, sb, _mm256_loadu_ps(db + (size_t)b * 8), mb, dx, sx,   \
                              nb, r, b);                                                      \
        } while (0)
        ROW16(0, a0, b0);
        if (R > 1) ROW16(1, a1, b1);
        if (R > 2) ROW16(2, a2, b2);
        if (R > 3) ROW16(3, a3, b3);
#undef ROW16
    }
    store_group(y, a0, oa);
    if (R > 1) store_group(y + ldy, a1, oa);
    if (R > 2) store_group(y + 2 * ldy, a2, oa);
    if (R > 3) store_group(y + 3 * ldy, a3, oa);
    if (G == 2) {
        store_group(y + 8, b0, ob);
        if (R > 1) store_group(y + 8 + ldy, b1, ob);
        if (R > 2) store_group(y + 8 + 2 * ldy, b2, ob);
        if (R > 3) store_group(y + 8 + 3 * ldy, b3, ob);
    }
}

#define ROWS16_ARGS qx, K, dx, sx, wa, wb, da, db, ma, mb, nb, y, ldy, oa, ob
#define ROWS16_CASES(G)                                                                       \
    switch (R) {                                                                              \
    case 1: rows16(1, G, ROWS16_ARGS); break;                                                 \
    case 2: rows16(2, G, ROWS16_ARGS); break;                                                 \
    case 3: rows16(3, G, ROWS16_ARGS); break;                                                 \
    default: rows16(4, G, ROWS16_ARGS); break;                                                \
    }
static void tile16(int R, int G, const int16_t *qx, int K, const float *dx, const float *sx,
                   const __m256i *wa, const __m256i *wb, const float *da, const float *db,
                   const float *ma, const float *mb, int nb, float *y, size_t ldy, int oa,
                   int ob) {
    if (G == 2) { ROWS16_CASES(2) } else { ROWS16_CASES(1) }
}

static int widened_product(const int16_t *qx, const float *dx, const float *sx, int M, int K,
                           const uint8_t *wq, const float *wd, const float *wm, int N,
                           float *y) {
    const int nb = K / 32, groups = (N + 7) / 8;
    const size_t gbytes = (size_t)nb * 128;
    __m256i *wide = aligned_alloc(32, 2 * (size_t)nb * 16 * sizeof(__m256i));
    if (wide == NULL) return -1;
    __m256i *wa = wide, *wb = wide + (size_t)nb * 16;
    for (int g = 0; g < groups; g += 2) {
        const int G = g + 1 < groups ? 2 : 1;
        const int oa = N - 8 * g < 8 ? N - 8 * g : 8;
        const int ob = G == 2 ? (N - 8 * (g + 1) < 8 ? N - 8 * (g + 1) : 8) : 0;
        widen_group(wq + g * gbytes, nb, wa);
        if (G == 2) widen_group(wq + (g + 1) * gbytes, nb, wb);
        const float *da = wd + (size_t)g * nb * 8, *db = da + (size_t)nb * 8;
        const float *ma = wm + (size_t)g * nb * 8, *mb = ma + (size_t)nb * 8;
        for (int r0 = 0; r0 < M; r0 += GROWS) {
            const int R = M - r0 < GROWS ? M - r0 : GROWS;
            tile16(R, G, qx + (size_t)r0 * K, K, dx + (size_t)r0 * nb, sx + (size_t)r0 * nb,
                   wa, wb, da, db, ma, mb, nb, y + (size_t)r0 * N + 8 * g, (size_t)N, oa, ob);
        }
    }
    free(wide);
    return 0;
}

/* A group function of one weight kind and row width: R (1..4) rows as a constant. */
#define GROUP_FN(name, fn, kind, T)                                                           \
    static void name(int R, const void *qx, const float *dx, const float *sx, int K,         \
                     const uint8_t *wq, const float *wd, const float *wm, int nb, float *y,   \
                     size_t ldy, int O) {                                                     \
        switch (R) {                                                                          \
        case 1: fn(kind, 1, (const T *)qx, dx, sx, K, wq, wd, wm, nb, y, ldy, O); break;     \
        case 2: fn(kind, 2, (const T *)qx, dx, sx, K, wq, wd, wm, nb, y, ldy, O); break;     \
        case 3: fn(kind, 3, (const T *)qx, dx, sx, K, wq, wd, wm, nb, y, ldy, O); break;     \
        default: fn(kind, 4, (const T *)qx, dx, sx, K, wq, wd, wm, nb, y, ldy, O); break;    \
        }                                                                                     \
    }
GROUP_FN(group_q4_8, group_q8, 0, int8_t)
GROUP_FN(group_h8_8, group_q8, 1, int8_t)
GROUP_FN(group_q4_16, group_q16, 0, int16_t)
GROUP_FN(group_h8_16, group_q16, 1, int16_t)

typedef void (*group_fn)(int, const void *, const float *, const float *, int, const uint8_t *,
                         const float *, const float *, int, float *, size_t, int);

/* Bytes of one group's block: Q4_1 4 x 32 nibble bytes, Q8_0 8 x 32 int8. */
static int int_product(int bits, int kind, const float *x, int M, int K, const uint8_t *wq,
                       const float *wd, const float *wm, int N, float *y) {
    const int nb = K / 32, groups = (N + 7) / 8;
    const size_t gbytes = (size_t)nb * (kind == 0 ? 128 : 256);
    const size_t xbytes = (size_t)M * K * (bits / 8);
    group_fn f = bits == 8 ? (kind == 0 ? group_q4_8 : group_h8_8)
                           : (kind == 0 ? group_q4_16 : group_h8_16);
    if (M <= 0) return 0;
    char *buf = malloc(xbytes + 2 * (size_t)M * nb * sizeof(float) + 64);
    if (buf == NULL) return -1;
    float *dx = (float *)(buf + (xbytes + 63) / 64 * 64), *sx = dx + (size_t)M * nb;
    quantize_rows(bits, x, M, K, buf, dx, sx);
    if (bits == 16 && kind == 0 && M >= WIDEN_ROWS) {
        int err = widened_product((const int16_t *)buf, dx, sx, M, K, wq, wd, wm, N, y);
        free(buf);
        return err;
    }
    for (int g = 0; g < groups; g++) {
        const int O = N - 8 * g < 8 ? N - 8 * g : 8;
        const uint8_t *wg = wq + g * gbytes;
        const float *dg = wd + (size_t)g * nb * 8, *mg = wm ? wm + (size_t)g * nb * 8 : NULL;
        for (int r0 = 0; r0 < M; r0 += GROWS) {
            const int R = M - r0 < GROWS ? M - r0 : GROWS;
            f(R, buf + (size_t)r0 * K * (bits / 8), dx + (size_t)r0 * nb, sx + (size_t)r0 * nb,
              K, wg, dg, mg, nb, y + (size_t)r0 * N + 8 * g, (size_t)N, O);
        }
    }
    free(buf);
    return 0;
}

/* x (M, K) float32, K a multiple of 32; y (M, N). Weights in groups of 8 output rows (N rounded
 * up to a multiple of 8, the padding rows zero): wq the group blocks above, wd and wm (groups,
 * K/32, 8) float32 scales and minima. Returns 0, or -1 when out of memory (y not written). */
int guardrail_q4_1_q8(const float *x, int M, int K, const uint8_t *wq, const float *wd,
                      const float *wm, int N, float *y) {
    return int_product(8, 0, x, M, K, wq, wd, wm, N, y);
}
int guardrail_q8_0_q8(const float *x, int M, int K, const uint8_t *wq, const float *wd, int N,
                      float *y) {
    return int_product(8, 1, x, M, K, wq, wd, NULL, N, y);
}
int guardrail_q4_1_q16(const float *x, int M, int K, const uint8_t *wq, const float *wd,
                       const float *wm, int N, float *y) {
    return int_product(16, 0, x, M, K, wq, wd, wm, N, y);
}
int guardrail_q8_0_q16(const float *x, int M, int K, const uint8_t *wq, const float *wd, int N,
                       float *y) {
    return int_product(16, 1, x, M, K, wq, wd, NULL, N, y);
}

/* The rows' quantization alone (for tests): qx (M, K) int8 (bits 8) or int16 (16). */
void guardrail_quantize_rows(int bits, const float *x, int M, int K, void *qx, float *dx,
                             float *sx) {
    quantize_rows(bits, x, M, K, qx, dx, sx);
}

/* The version of this interface, checked at load. */
int guardrail_blockq_version(void) { return 8; }
