/* IVON's two hot loops for float32 CPU buffers, compiled on first use by fedvb/core/ivon_native.py.

   Why C: on a CPU an IVON step pays one standard-normal draw per weight, and torch's generator
   (mt19937, one 32-bit draw per float) costs about half of a whole Adam step on the papers' MLP.
   Here the noise comes from a counter-based generator (a keyed integer hash of the element index,
   so every lane is independent and the loop vectorises) turned into normals by Box-Muller with
   polynomial log/sin/cos, fused with the draw of the weights; the update is one fused pass.
   Plain C and ctypes rather than a torch extension: it compiles in well under a second and needs
   only a C compiler.  Built with -ffp-contract=off and no fast-math, every operation is an
   elementwise IEEE operation, so vector width does not change a single bit of the results. */

#include <stdint.h>
#include <string.h>

static inline uint32_t mix32(uint32_t x) { /* "lowbias32" integer hash (C. Wellons) */
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline uint32_t bits_of(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}

static inline float float_of(uint32_t b) {
    float x;
    memcpy(&x, &b, 4);
    return x;
}

/* ln x for x in (0, 1], |error| < 1e-7 (atanh series to s^7, |s| < 0.172); exactly <= 0.  Branch-free (selects by bit masks) so that
   the compiler vectorises the loops that call it. */
static inline float log_unit(float x) {
    uint32_t bits = bits_of(x);
    uint32_t mantissa = (bits & 0x7fffffU) | 0x3f800000U;          /* x = m 2^e, m in [1, 2) */
    uint32_t big = (uint32_t)(mantissa > 0x3fb504f3U);              /* m > sqrt(2): use m / 2 */
    float m = float_of(mantissa - (big << 23));                      /* m in [0.707, 1.414) */
    int32_t e = (int32_t)((bits >> 23) & 0xffU) - 127 + (int32_t)big;
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;                   /* ln m = 2 atanh s, |s| < 0.172 */
    float p = s * (2.0f + s2 * (0.666666667f + s2 * (0.4f + s2 * 0.285714286f)));
    return p + (float)e * 0.693147181f;
}

/* z0 = r cos(theta), z1 = r sin(theta): Box-Muller from two 32-bit hashes (cos and sin by Taylor
   polynomials on [-pi/4, pi/4), errors below 3e-8 and 4e-7). */
static inline void normal_pair(uint32_t h1, uint32_t h2, float *z0, float *z1) {
    float u1 = (float)(int32_t)((h1 >> 8) + 1U) * 5.9604645e-08f;  /* (0, 1] in steps of 2^-24 */
    float radius = __builtin_sqrtf(__builtin_fabsf(-2.0f * log_unit(u1)));
    uint32_t q = h2 >> 30;                                            /* quadrant */
    float f = (float)(int32_t)((h2 >> 6) & 0xffffffU) * 5.9604645e-08f; /* [0, 1) */
    float phi = (f - 0.5f) * 1.57079633f;                             /* [-pi/4, pi/4) */
    float p2 = phi * phi;
    float c = 1.0f + p2 * (-0.5f + p2 * (0.0416666667f + p2 * (-0.00138888889f + p2 * 2.48015873e-05f)));
    float s = phi * (1.0f + p2 * (-0.166666667f + p2 * (0.00833333333f + p2 * -0.000198412698f)));
    uint32_t cx = bits_of((c - s) * 0.707106781f), sx = bits_of((c + s) * 0.707106781f); /* angle pi/4 + phi */
    /* turn by q pi/2: q = 0 (cx, sx), 1 (-sx, cx), 2 (-cx, -sx), 3 (sx, -cx) */
    uint32_t odd = 0U - (q & 1U);
    uint32_t a = (cx & ~odd) | (sx & odd), b = (sx & ~odd) | (cx & odd);
    *z0 = radius * float_of(a ^ (((q ^ (q >> 1)) & 1U) << 31));
    *z1 = radius * float_of(b ^ ((q >> 1) << 31));
}

/* The Box-Muller pair number `pair` of the stream `key`: hashes of the counters 2 pair and 2 pair + 1. */
static inline void keyed_pair(uint32_t pair, uint32_t k1, uint32_t k2, float *z0, float *z1) {
    normal_pair(mix32(mix32((2U * pair) ^ k1) + k2), mix32(mix32((2U * pair + 1U) ^ k1) + k2), z0, z1);
}

/* noise[i] <- z; saved[i] <- param[i]; param[i] <- param[i] + z / sqrt_precision[i]. */
static inline void move(float *restrict param, float *restrict saved, float *restrict noise,
                        const float *restrict sqrt_precision, int64_t i, float z) {
    noise[i] = z;
    saved[i] = param[i];
    param[i] = param[i] + z / sqrt_precision[i];
}

/* noise <- z ~ N(0, 1) (a function of key and element index only); saved <- param;
   param <- param + z / sqrt_precision.  Element j and j + half share one Box-Muller pair. */
void ivon_sample(float *restrict param, float *restrict saved, float *restrict noise,
                 const float *restrict sqrt_precision, int64_t n, uint64_t key) {
    const uint32_t k1 = (uint32_t)key, k2 = (uint32_t)(key >> 32);
    const int64_t half = (n + 1) / 2, pairs = n / 2; /* n odd: element `pairs` uses only z0 */
    float *restrict param_hi = param + half, *restrict saved_hi = saved + half, *restrict noise_hi = noise + half;
    const float *restrict sqrt_precision_hi = sqrt_precision + half;
    float z0, z1;
    for (int64_t j = 0; j < pairs; j++) {
        keyed_pair((uint32_t)j, k1, k2, &z0, &z1);
        move(param, saved, noise, sqrt_precision, j, z0);
        move(param_hi, saved_hi, noise_hi, sqrt_precision_hi, j, z1);
    }
    if (half > pairs) {
        keyed_pair((uint32_t)pairs, k1, k2, &z0, &z1);
        move(param, saved, noise, sqrt_precision, pairs, z0);
    }
}

/* The update of fedvb.core.ivon.ivon_update_ in one pass; see its docstring.  raw_noise: grad_noise holds
   the draw z (one sample, f uses grad * z) rather than the average of g * z.  Absent terms (NULL) are
   not read: the body is specialised for each combination, so the compiler drops their loads. */
static inline __attribute__((always_inline)) void update_body(
    float *restrict mean, float *restrict hess, float *restrict momentum, const float *restrict grad,
    const float *restrict grad_noise, float *restrict sqrt_precision, const float *restrict s0,
    const float *restrict s0m0, const float *restrict dual_v, const float *restrict dual_big_v, int64_t n,
    float beta1, float beta2, float lam, float c, float lr, float clip, const int raw_noise, const int s0_full,
    const int has_m0, const int has_v, const int has_big_v) {
    const float inv_c = 1.0f / c, inv_lam = 1.0f / lam, correction = 0.5f * (1.0f - beta2) * (1.0f - beta2) * lam;
    const float bound = clip * inv_c, s0_number = s0[0];
    for (int64_t i = 0; i < n; i++) {
        float prior = s0_full ? s0[i] : s0_number;
        float big_v = has_big_v ? dual_big_v[i] : 0.0f;
        float m = momentum[i] + (1.0f - beta1) * (grad[i] - momentum[i]);
        float gz = raw_noise ? grad[i] * grad_noise[i] : grad_noise[i];
        float f = gz * sqrt_precision[i] - big_v * inv_lam;
        float ratio = (hess[i] - f) / sqrt_precision[i];
        float h = hess[i] + (1.0f - beta2) * (f - hess[i]);
        h = h + correction * ratio * ratio;
        float step = m + mean[i] * prior * inv_c;
        if (has_m0) step = step - s0m0[i] * inv_c;
        step = step - big_v * mean[i] * inv_c;
        if (has_v) step = step + dual_v[i] * inv_c;
        float precision = prior + lam * h;
        step = step / precision;
        step = step > bound ? bound : step;
        step = step < -bound ? -bound : step;
        momentum[i] = m;
        hess[i] = h;
        mean[i] = mean[i] - lr * c * step;
        sqrt_precision[i] = __builtin_sqrtf(precision);
    }
}

#define UPDATE_ARGS mean, hess, momentum, grad, grad_noise, sqrt_precision, s0, s0m0, dual_v, dual_big_v, n, \
                    beta1, beta2, lam, c, lr, clip

/* clip may be +inf; s0 holds n values (s0_full) or one; s0m0, dual_v, dual_big_v may be NULL. */
void ivon_update(float *mean, float *hess, float *momentum, const float *grad, const float *grad_noise,
                 float *sqrt_precision, const float *s0, const float *s0m0, const float *dual_v,
                 const float *dual_big_v, int64_t n, float beta1, float beta2, float lam, float c, float lr,
                 float clip, int raw_noise, int s0_full) {
    int federated = s0m0 && dual_v && dual_big_v, plain = !s0m0 && !dual_v && !dual_big_v;
    if (federated && s0_full && raw_noise) update_body(UPDATE_ARGS, 1, 1, 1, 1, 1);  /* a BayesADMM client */
    else if (federated && s0_full) update_body(UPDATE_ARGS, 0, 1, 1, 1, 1);
    else if (plain && !s0_full && raw_noise) update_body(UPDATE_ARGS, 1, 0, 0, 0, 0); /* plain IVON */
    else if (plain && !s0_full) update_body(UPDATE_ARGS, 0, 0, 0, 0, 0);
    else update_body(UPDATE_ARGS, raw_noise, s0_full, s0m0 != 0, dual_v != 0, dual_big_v != 0);
}

/* The same two loops over `rows` consecutive rows of n elements (a cohort of clients, fedvb.core.cohort): row r
   is exactly ivon_sample / ivon_update of its own n elements with its own key, lam and c, so each client gets
   the numbers it would get alone; one call instead of one per client. s0 holds n values per row. */
void ivon_sample_rows(float *param, float *saved, float *noise, const float *sqrt_precision, int64_t rows,
                      int64_t n, const uint64_t *keys) {
    for (int64_t r = 0; r < rows; r++)
        ivon_sample(param + r * n, saved + r * n, noise + r * n, sqrt_precision + r * n, n, keys[r]);
}

void ivon_update_rows(float *mean, float *hess, float *momentum, const float *grad, const float *grad_noise,
                      float *sqrt_precision, const float *s0, const float *s0m0, const float *dual_v,
                      const float *dual_big_v, int64_t rows, int64_t n, float beta1, float beta2, const float *lam,
                      const float *c, float lr, float clip, int raw_noise) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t o = r * n;
        ivon_update(mean + o, hess + o, momentum + o, grad + o, grad_noise + o, sqrt_precision + o, s0 + o,
                    s0m0 ? s0m0 + o : 0, dual_v ? dual_v + o : 0, dual_big_v ? dual_big_v + o : 0, n, beta1, beta2,
                    lam[r], c[r], lr, clip, raw_noise, 1);
    }
}
