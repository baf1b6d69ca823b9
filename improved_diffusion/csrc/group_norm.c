/*
 * GroupNorm of channels-last float32 images, forward and backward, two memory passes each
 * [Wu & He 2018, Eq. 1-4], for improved_diffusion/native.py. torch's channels-last GroupNorm
 * backward takes 2-3x its NCHW time on CPUs; this is the layout the Winograd path produces.
 *
 * x, y, dy, dx: (N, P, C) contiguous (P = H * W positions); gamma, beta: (C,); mean, rstd:
 * (N, G). Statistics are accumulated in double. Work is split over images; each image is
 * computed by one thread in a fixed order, so results do not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
#else
#define PARALLEL_FOR
#endif

/* Per-channel sums over positions: s1[c] = sum_p a[p, c], s2[c] = sum_p a[p, c] * b[p, c]. */
static void channel_sums(const float *restrict a, const float *restrict b, int64_t p, int64_t c,
                         double *restrict s1, double *restrict s2) {
    for (int64_t k = 0; k < c; k++) s1[k] = s2[k] = 0.0;
    for (int64_t i = 0; i < p; i++) {
        const float *ra = a + i * c, *rb = b + i * c;
        for (int64_t k = 0; k < c; k++) {
            s1[k] += ra[k];
            s2[k] += (double)ra[k] * rb[k];
        }
    }
}

/* y = (x - mean) * rstd * gamma + beta per group; mean, rstd out. Returns 0, or -1 without memory. */
int gn_forward(const float *x, const float *gamma, const float *beta, float *y, float *mean, float *rstd, int64_t n,
               int64_t p, int64_t c, int64_t g, double eps, int nthreads) {
    int failed = 0;
    const int64_t cg = c / g;
    PARALLEL_FOR
    for (int64_t i = 0; i < n; i++) {
        double *s = malloc(sizeof(double) * 2 * c);
        float *scale = malloc(sizeof(float) * 2 * c);
        if (!s || !scale) {
            failed = 1;
        } else {
            const float *xi = x + i * p * c;
            channel_sums(xi, xi, p, c, s, s + c);
            for (int64_t j = 0; j < g; j++) {
                double s1 = 0.0, s2 = 0.0;
                for (int64_t k = j * cg; k < (j + 1) * cg; k++) s1 += s[k], s2 += s[c + k];
                const double m = s1 / (double)(p * cg), var = s2 / (double)(p * cg) - m * m;
                const double r = 1.0 / sqrt((var > 0.0 ? var : 0.0) + eps);
                mean[i * g + j] = (float)m;
                rstd[i * g + j] = (float)r;
                for (int64_t k = j * cg; k < (j + 1) * cg; k++) {
                    const double a = r * (gamma ? gamma[k] : 1.0f);
                    scale[k] = (float)a;
                    scale[c + k] = (float)((beta ? beta[k] : 0.0f) - m * a);
                }
            }
            float *yi = y + i * p * c;
            for (int64_t q = 0; q < p; q++)
                for (int64_t k = 0; k < c; k++) yi[q * c + k] = xi[q * c + k] * scale[k] + scale[c + k];
        }
        free(s);
        free(scale);
    }
    return failed ? -1 : 0;
}

/*
 * dx = rstd * (gamma dy - mean_g(gamma dy) - xhat mean_g(gamma dy xhat)), xhat = (x - mean) rstd;
 * per image, dgamma_i[c] = sum_p dy xhat and dbeta_i[c] = sum_p dy (the caller sums over images).
 */
int gn_backward(const float *dy, const float *x, const float *mean, const float *rstd, const float *gamma, float *dx,
                float *dgamma, float *dbeta, int64_t n, int64_t p, int64_t c, int64_t g, int nthreads) {
    int failed = 0;
    const int64_t cg = c / g;
    PARALLEL_FOR
    for (int64_t i = 0; i < n; i++) {
        double *s = malloc(sizeof(double) * 2 * c);
        float *coef = malloc(sizeof(float) * 3 * c); /* dx = dy coef + x a + b, per channel */
        if (!s || !coef) {
            failed = 1;
        } else {
            const float *dyi = dy + i * p * c, *xi = x + i * p * c;
            channel_sums(dyi, xi, p, c, s, s + c); /* sum dy, sum dy x */
            float *a = coef + c, *b = coef + 2 * c;
            for (int64_t j = 0; j < g; j++) {
                const double m = mean[i * g + j], r = rstd[i * g + j];
                double m1 = 0.0, m2 = 0.0; /* sums of gamma dy and gamma dy xhat over the group */
                for (int64_t k = j * cg; k < (j + 1) * cg; k++) {
                    const double gk = gamma ? gamma[k] : 1.0, dxhat = (s[c + k] - m * s[k]) * r;
                    m1 += gk * s[k];
                    m2 += gk * dxhat;
                    coef[k] = (float)(r * gk);
                    if (dgamma) dgamma[i * c + k] = (float)dxhat;
                    if (dbeta) dbeta[i * c + k] = (float)s[k];
                }
                m1 /= (double)(p * cg);
                m2 /= (double)(p * cg);
                for (int64_t k = j * cg; k < (j + 1) * cg; k++) {
                    a[k] = (float)(-r * r * m2);
                    b[k] = (float)(-r * m1 + r * r * m2 * m);
                }
            }
            float *dxi = dx + i * p * c;
            for (int64_t q = 0; q < p; q++)
                for (int64_t k = 0; k < c; k++) dxi[q * c + k] = dyi[q * c + k] * coef[k] + xi[q * c + k] * a[k] + b[k];
        }
        free(s);
        free(coef);
    }
    return failed ? -1 : 0;
}
