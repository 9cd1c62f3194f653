/* Products of float32 rows with weights kept in GGUF's Q4_1 or Q8_0 blocks (32 weights along
 * the input dimension), for guardrail's observer (observer.options.matmul: q4_1; built and
 * driven by guardrail/observer/blockq.py, which also makes the layouts below).
 *
 * y[r, n] = sum_k x[r, k] * w[n, k] with w = q * d + m (Q4_1) or q * d (Q8_0): q * d is exact
 * in float32, so these are the model's float32 weights, and the products are float32's but
 * for the summation order. Up to 4 rows each block is taken as d * (q . x) + m * sum(x) (one
 * product per block and row fewer than rebuilding the weights; each row's block sums computed
 * once per call). From 5 rows (bound by the multiply-adds) a chunk of output rows' weights is
 * rebuilt once, fma(q, d, m), into a float32 panel that a register-blocked micro-kernel
 * multiplies with the rows (product_panel). Either way the weights are streamed from memory
 * once per call. Single-threaded. Built with -O3 -mavx2 -mfma -mf16c. */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define TILE 4   /* rows of x per register tile (up to 4 rows) */
#define CHUNK 32 /* output rows whose weights are reused across the row tiles */
#define MANY 5   /* from this many rows the weights are rebuilt into a panel */

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

/* MANY rows or more: a chunk of output rows' weights rebuilt once per call into a float32
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
                /* tiles of 3 rows, two of 2 where a single row would be left (16: 2, 3,
                 * 3, 3, 3, 2): a row alone loads a weight vector per multiply-add */
                for (int r0 = 0, R; r0 < M; r0 += R) {
                    int left = M - r0;
                    R = (left % 3 == 1 && left > 1) || left == 2 ? 2 : (left < 3 ? left : 3);
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

typedef void (*tiles_fn)(int, const float *, size_t, const float *, int, const uint8_t *,
                         const float *, const uint16_t *, int, int, int, float *, size_t);

static int product(int kind, const float *x, int M, int K, const uint8_t *qs,
                   const float *ds, const uint16_t *ms, int N, float *y) {
    const int nb = K / 32, nbp = (nb + 7) / 8 * 8;
    tiles_fn f = kind == 0 ? tiles_q4_1 : tiles_q8_0;
    float *xs = NULL;
    if (M <= 0) return 0;
    if (M >= MANY) return product_panel(kind, x, M, K, qs, ds, ms, N, y);
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
    return product(0, x, M, K, qs, d, m, N, y);
}

int guardrail_q8_0(const float *x, int M, int K, const int8_t *qs, const float *d, int N,
                   float *y) {
    return product(1, x, M, K, (const uint8_t *)qs, d, NULL, N, y);
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

/* The version of this interface, checked at load. */
int guardrail_blockq_version(void) { return 6; }
