/*
 * Winograd F(4x4, 3x3) tile transforms for improved_diffusion/winograd.py [Lavin & Gray 2016,
 * Eq. 10], each one pass over memory: channels-last images in, the (36, T, C) tile matrices of
 * the batched products out, and back. Compiled with the system C compiler on first use
 * (improved_diffusion/native.py) and called through ctypes on float32 buffers.
 *
 * Layouts (the same as the torch-ops path of winograd.py):
 *   image:  (N, H, W, C) contiguous, i.e. a channels-last (N, C, H, W) tensor;
 *   tiles:  (36, T, C) contiguous, T = N * rows * cols tiles of 4x4 outputs in (n, row, col)
 *           order; tile position 6 * a + b holds column index a and row index b of the 6x6
 *           transformed tile ("[column, row]").
 * Tile (n, r, q) reads image pixels (4r - 1 + i, 4q - 1 + j), i, j = 0..5 (zero outside: the
 * convolution's padding), and produces outputs (4r + i, 4q + j), i, j = 0..3.
 *
 * Threads: each call splits its work into contiguous ranges over nthreads threads (OpenMP where
 * compiled with it, else POSIX threads); every output element is computed by one thread in a
 * fixed order, so results do not depend on the thread count.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define CB 64 /* channels per block: the working set of a tile stays in L1 */

typedef struct job job_t;
typedef void (*work_fn)(const job_t *);

struct job {
    work_fn fn;
    const float *in;
    float *out;
    const float *bias;
    int64_t n, h, w, c, rows, cols;
    int64_t begin, end; /* work units of this thread */
};

#ifdef _OPENMP
#include <omp.h>

/* OpenMP: the process's OpenMP runtime is torch's own (same soname), so these regions run on
   torch's intra-op threads instead of competing with them for the cores. */
static void run_parallel(work_fn fn, job_t base, int64_t units, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (units < nthreads) nthreads = (int)(units > 0 ? units : 1);
#pragma omp parallel num_threads(nthreads)
    {
        job_t job = base;
        const int64_t k = omp_get_thread_num(), count = omp_get_num_threads();
        job.begin = units * k / count;
        job.end = units * (k + 1) / count;
        fn(&job);
    }
}
#else
static void *thread_main(void *arg) {
    const job_t *job = arg;
    job->fn(job);
    return NULL;
}

static void run_parallel(work_fn fn, job_t base, int64_t units, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (units < nthreads) nthreads = (int)(units > 0 ? units : 1);
    pthread_t threads[64];
    job_t jobs[64];
    int started[64];
    for (int k = 0; k < nthreads; k++) {
        jobs[k] = base;
        jobs[k].fn = fn;
        jobs[k].begin = units * k / nthreads;
        jobs[k].end = units * (k + 1) / nthreads;
        started[k] = 0;
    }
    for (int k = 1; k < nthreads; k++) started[k] = pthread_create(&threads[k], NULL, thread_main, &jobs[k]) == 0;
    fn(&jobs[0]);
    for (int k = 1; k < nthreads; k++) {
        if (started[k])
            pthread_join(threads[k], NULL);
        else
            fn(&jobs[k]); /* no thread could be made: do its share here */
    }
}
#endif

/* B^T applied to six vectors of length len: out_k = sum_i BT[k][i] in_i. */
static inline void bt6(float *restrict o0, float *restrict o1, float *restrict o2, float *restrict o3,
                       float *restrict o4, float *restrict o5, const float *restrict d, size_t is,
                       int len) {
    for (int c = 0; c < len; c++) {
        float d0 = d[c], d1 = d[is + c], d2 = d[2 * is + c], d3 = d[3 * is + c], d4 = d[4 * is + c],
              d5 = d[5 * is + c];
        /* Differences of neighbours first and only power-of-two constants: smooth inputs
           (activations) lose less to rounding than with the rows of B^T taken literally. */
        float d42 = d4 - d2, d13 = d1 - d3;
        o0[c] = 4.0f * (d0 - d2) + d42;
        o1[c] = (d3 + d4) - 4.0f * (d1 + d2);
        o2[c] = 4.0f * (d1 - d2) + (d4 - d3);
        o3[c] = d42 - 2.0f * d13;
        o4[c] = d42 + 2.0f * d13;
        o5[c] = 4.0f * d13 + (d5 - d3);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Forward input transform: image (N, H, W, C) -> V (36, T, C), V[6a+b] = (B^T d B)[b][a].     */

static void input_work(const job_t *job) {
    const int64_t h = job->h, w = job->w, c = job->c, rows = job->rows, cols = job->cols;
    const int64_t tiles = job->n * rows * cols;
    float d[36 * CB], t[36 * CB]; /* d[i][j][c]: tile rows i, columns j; t[b][j][c] */
    for (int64_t tile = job->begin; tile < job->end; tile++) {
        const int64_t n = tile / (rows * cols), r = (tile / cols) % rows, q = tile % cols;
        for (int64_t c0 = 0; c0 < c; c0 += CB) {
            const int len = (int)(c - c0 < CB ? c - c0 : CB);
            for (int i = 0; i < 6; i++) {
                const int64_t y = 4 * r - 1 + i;
                for (int j = 0; j < 6; j++) {
                    const int64_t x = 4 * q - 1 + j;
                    float *dst = d + (i * 6 + j) * CB;
                    if (y < 0 || y >= h || x < 0 || x >= w)
                        memset(dst, 0, sizeof(float) * len);
                    else
                        memcpy(dst, job->in + ((n * h + y) * w + x) * c + c0, sizeof(float) * len);
                }
            }
            /* rows: t[b][j] = sum_i BT[b][i] d[i][j] */
            for (int j = 0; j < 6; j++)
                bt6(t + (0 * 6 + j) * CB, t + (1 * 6 + j) * CB, t + (2 * 6 + j) * CB, t + (3 * 6 + j) * CB,
                    t + (4 * 6 + j) * CB, t + (5 * 6 + j) * CB, d + j * CB, 6 * CB, len);
            /* columns: V[6a+b] = sum_j BT[a][j] t[b][j] */
            for (int b = 0; b < 6; b++) {
                float *base = job->out + (b * tiles + tile) * c + c0;
                const size_t s = (size_t)(6 * tiles * c);
                bt6(base, base + s, base + 2 * s, base + 3 * s, base + 4 * s, base + 5 * s, t + b * 6 * CB, CB, len);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Forward output transform: M (36, T, C) -> image (N, H, W, C) (+ bias),                       */
/* y[j][i] = sum_{a,b} AT[j][b] M[6a+b] AT[i][a], outputs beyond H, W dropped.                 */

static inline void at6(float *restrict o, size_t os, const float *restrict m, size_t is, int len) {
    for (int c = 0; c < len; c++) {
        float m0 = m[c], m1 = m[is + c], m2 = m[2 * is + c], m3 = m[3 * is + c], m4 = m[4 * is + c],
              m5 = m[5 * is + c];
        float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
        o[c] = m0 + s12 + s34;
        o[os + c] = d12 + 2.0f * d34;
        o[2 * os + c] = s12 + 4.0f * s34;
        o[3 * os + c] = d12 + 8.0f * d34 + m5;
    }
}

static void output_work(const job_t *job) {
    const int64_t h = job->h, w = job->w, c = job->c, rows = job->rows, cols = job->cols;
    const int64_t tiles = job->n * rows * cols;
    float t[24 * CB], y[16 * CB]; /* t[a][j][c] (a = column index), y[j][i][c] */
    for (int64_t tile = job->begin; tile < job->end; tile++) {
        const int64_t n = tile / (rows * cols), r = (tile / cols) % rows, q = tile % cols;
        for (int64_t c0 = 0; c0 < c; c0 += CB) {
            const int len = (int)(c - c0 < CB ? c - c0 : CB);
            /* rows: for each column index a, over b = 6a..6a+5 (stride tiles * c) */
            for (int a = 0; a < 6; a++)
                at6(t + a * 4 * CB, CB, job->in + (6 * a * tiles + tile) * c + c0, (size_t)(tiles * c), len);
            /* columns: y[j][i] = sum_a AT[i][a] t[a][j] */
            for (int j = 0; j < 4; j++) at6(y + j * 4 * CB, CB, t + j * CB, 4 * CB, len);
            for (int j = 0; j < 4; j++) {
                const int64_t yy = 4 * r + j;
                if (yy >= h) break;
                for (int i = 0; i < 4; i++) {
                    const int64_t xx = 4 * q + i;
                    if (xx >= w) break;
                    float *dst = job->out + ((n * h + yy) * w + xx) * c + c0;
                    const float *src = y + (j * 4 + i) * CB;
                    if (job->bias)
                        for (int k = 0; k < len; k++) dst[k] = src[k] + job->bias[c0 + k];
                    else
                        memcpy(dst, src, sizeof(float) * len);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Backward of the output transform: dY image (N, H, W, C) -> dM (36, T, C),                    */
/* dM[6a+b] = sum_{k,l} AT[k][b] AT[l][a] g[k][l] (g zero beyond H, W).                        */

static inline void a4(float *restrict o, size_t os, const float *restrict g, size_t is, int len) {
    for (int c = 0; c < len; c++) {
        float g0 = g[c], g1 = g[is + c], g2 = g[2 * is + c], g3 = g[3 * is + c];
        float s02 = g0 + g2, s13 = g1 + g3, e = g0 + 4.0f * g2, f = 2.0f * g1 + 8.0f * g3;
        o[c] = g0;
        o[os + c] = s02 + s13;
        o[2 * os + c] = s02 - s13;
        o[3 * os + c] = e + f;
        o[4 * os + c] = e - f;
        o[5 * os + c] = g3;
    }
}

static void grad_output_work(const job_t *job) {
    const int64_t h = job->h, w = job->w, c = job->c, rows = job->rows, cols = job->cols;
    const int64_t tiles = job->n * rows * cols;
    float g[16 * CB], t[24 * CB], u[36 * CB]; /* g[k][l], t[b][l], u[a][b] */
    for (int64_t tile = job->begin; tile < job->end; tile++) {
        const int64_t n = tile / (rows * cols), r = (tile / cols) % rows, q = tile % cols;
        for (int64_t c0 = 0; c0 < c; c0 += CB) {
            const int len = (int)(c - c0 < CB ? c - c0 : CB);
            for (int k = 0; k < 4; k++) {
                const int64_t yy = 4 * r + k;
                for (int l = 0; l < 4; l++) {
                    const int64_t xx = 4 * q + l;
                    float *dst = g + (k * 4 + l) * CB;
                    if (yy >= h || xx >= w)
                        memset(dst, 0, sizeof(float) * len);
                    else
                        memcpy(dst, job->in + ((n * h + yy) * w + xx) * c + c0, sizeof(float) * len);
                }
            }
            /* rows: t[b][l] = sum_k AT[k][b] g[k][l] */
            for (int l = 0; l < 4; l++) a4(t + l * CB, 4 * CB, g + l * CB, 4 * CB, len);
            /* columns: dM[6a+b] = sum_l AT[l][a] t[b][l] */
            for (int b = 0; b < 6; b++) a4(u + b * CB, 6 * CB, t + b * 4 * CB, CB, len);
            for (int p = 0; p < 36; p++)
                memcpy(job->out + (p * tiles + tile) * c + c0, u + p * CB, sizeof(float) * len);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Backward of the input transform: dV (36, T, C) -> dX image (N, H, W, C),                     */
/* dd[k][l] = sum_{a,b} BT[b][k] BT[a][l] dV[6a+b], scatter-added onto the overlapping tiles.  */
/* Work units are (image, channel block) pairs, so no two threads add to one element.          */

static inline void b6(float *restrict o, size_t os, const float *restrict v, size_t is, int len) {
    for (int c = 0; c < len; c++) {
        float v0 = v[c], v1 = v[is + c], v2 = v[2 * is + c], v3 = v[3 * is + c], v4 = v[4 * is + c],
              v5 = v[5 * is + c];
        o[c] = 4.0f * v0;
        o[os + c] = -4.0f * v1 + 4.0f * v2 - 2.0f * v3 + 2.0f * v4 + 4.0f * v5;
        o[2 * os + c] = -5.0f * v0 - 4.0f * v1 - 4.0f * v2 - v3 - v4;
        o[3 * os + c] = v1 - v2 + 2.0f * v3 - 2.0f * v4 - 5.0f * v5;
        o[4 * os + c] = v0 + v1 + v2 + v3 + v4;
        o[5 * os + c] = v5;
    }
}

static void grad_input_work(const job_t *job) {
    const int64_t h = job->h, w = job->w, c = job->c, rows = job->rows, cols = job->cols;
    const int64_t tiles = job->n * rows * cols, blocks = (c + CB - 1) / CB;
    float t[36 * CB], dd[36 * CB]; /* t[a][k], dd[k][l] */
    for (int64_t unit = job->begin; unit < job->end; unit++) {
        const int64_t n = unit / blocks, c0 = (unit % blocks) * CB;
        const int len = (int)(c - c0 < CB ? c - c0 : CB);
        for (int64_t p = 0; p < h * w; p++) memset(job->out + (n * h * w + p) * c + c0, 0, sizeof(float) * len);
        for (int64_t r = 0; r < rows; r++) {
            for (int64_t q = 0; q < cols; q++) {
                const int64_t tile = (n * rows + r) * cols + q;
                /* rows: t[a][k] = sum_b BT[b][k] dV[6a+b] */
                for (int a = 0; a < 6; a++) b6(t + a * 6 * CB, CB, job->in + (6 * a * tiles + tile) * c + c0,
                                               (size_t)(tiles * c), len);
                /* columns: dd[k][l] = sum_a BT[a][l] t[a][k] */
                for (int k = 0; k < 6; k++) b6(dd + k * 6 * CB, CB, t + k * CB, 6 * CB, len);
                for (int k = 0; k < 6; k++) {
                    const int64_t yy = 4 * r - 1 + k;
                    if (yy < 0 || yy >= h) continue;
                    for (int l = 0; l < 6; l++) {
                        const int64_t xx = 4 * q - 1 + l;
                        if (xx < 0 || xx >= w) continue;
                        float *dst = job->out + ((n * h + yy) * w + xx) * c + c0;
                        const float *src = dd + (k * 6 + l) * CB;
                        for (int e = 0; e < len; e++) dst[e] += src[e];
                    }
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Entry points. */

static job_t make_job(const float *in, float *out, const float *bias, int64_t n, int64_t h, int64_t w,
                      int64_t c) {
    job_t job = {NULL, in, out, bias, n, h, w, c, (h + 3) / 4, (w + 3) / 4, 0, 0};
    return job;
}

void wg_input_transform(const float *x, float *v, int64_t n, int64_t h, int64_t w, int64_t c, int nthreads) {
    job_t job = make_job(x, v, NULL, n, h, w, c);
    run_parallel(input_work, job, n * job.rows * job.cols, nthreads);
}

void wg_output_transform(const float *m, const float *bias, float *y, int64_t n, int64_t h, int64_t w, int64_t c,
                         int nthreads) {
    job_t job = make_job(m, y, bias, n, h, w, c);
    run_parallel(output_work, job, n * job.rows * job.cols, nthreads);
}

void wg_grad_output_transform(const float *g, float *dm, int64_t n, int64_t h, int64_t w, int64_t c,
                              int nthreads) {
    job_t job = make_job(g, dm, NULL, n, h, w, c);
    run_parallel(grad_output_work, job, n * job.rows * job.cols, nthreads);
}

void wg_grad_input_transform(const float *dv, float *dx, int64_t n, int64_t h, int64_t w, int64_t c,
                             int nthreads) {
    job_t job = make_job(dv, dx, NULL, n, h, w, c);
    run_parallel(grad_input_work, job, n * ((c + CB - 1) / CB), nthreads);
}
