/* Inner loops of cbn's kernels: one row (or one block of channels-last rows)
 * at a time, called from Cython's prange bodies.
 *
 * They live in C because Cython cannot emit `#pragma omp simd`: without it
 * GCC keeps a floating-point reduction in a scalar dependent-add chain, which
 * runs at a fifth of the memory bandwidth.  The pragma needs only
 * -fopenmp-simd (no OpenMP runtime), so the serial build vectorises too.
 *
 * CBN_CLONES compiles each function for AVX-512, AVX2 and baseline x86-64 and
 * picks one at load time (GNU ifunc), so a wheel built anywhere runs
 * everywhere at full width.  The choice is fixed per machine, so results do
 * not depend on the thread count.
 */
#ifndef CBN_SIMD_H
#define CBN_SIMD_H

#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && !defined(CBN_NO_CLONES)
#define CBN_CLONES __attribute__((unused, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CBN_CLONES __attribute__((unused))
#endif

/* Channels-last reductions keep the sums of LANES channels in registers
 * (64 channels: 16 AVX-512 accumulators; then 16 at a time) over a block of
 * CBN_ROW_BLOCK rows, which stays in L1 for the next channels. */
#define CBN_ROW_BLOCK 64

/* From CBN_WIDE_ROWS channels on, rows are 2 KB and more apart and those
 * strided strips starved the prefetchers (5-10 GB/s on tensors beyond L3):
 * instead rows are read in address order, CBN_ROW_GROUP at a time, their
 * sums added to s and q (which stay in L1/L2) once per group.  1.3-2x for
 * C = 1024 and 2048 in C microbenchmarks; about equal at 512; slower below,
 * where the register blocks win. */
#define CBN_WIDE_ROWS 512

/* Below CBN_WIDE_ROWS the register blocks read a row's channels in strips
 * (64 then 16 at a time) across a block of rows; the hardware prefetchers
 * follow the first strip only and the other strips came from DRAM at
 * 7-9 GB/s (C = 128-256, data not in cache; 20 GB/s at C = 64, one strip).
 * So the first strip's pass prefetches whole rows CBN_PREFETCH_ROWS ahead,
 * in address order: 1.3-1.6x on data not in cache, equal on cached data
 * (C microbenchmark, this machine). */
#define CBN_PREFETCH_ROWS 8

static inline void cbn_prefetch_row(const void *row, ptrdiff_t bytes)
{
    const char *p = (const char *)row;
    for (ptrdiff_t i = 0; i < bytes; i += 64)
        __builtin_prefetch(p + i, 0, 3);
}
#define CBN_ROW_GROUP 8

#define CBN_MOMENTS_BLOCK(T, LANES)                                            \
        for (; c0 + LANES <= C; c0 += LANES) {                                 \
            double a[LANES] = {0}, b[LANES] = {0}, kk[LANES];                  \
            for (int j = 0; j < LANES; j++) kk[j] = k[c0 + j];                 \
            for (ptrdiff_t r = r0; r < r1; r++) {                              \
                const T *xr = x + r * row_stride + c0;                         \
                if (c0 == 0 && r + CBN_PREFETCH_ROWS < rows)                   \
                    cbn_prefetch_row(x + (r + CBN_PREFETCH_ROWS) * row_stride, \
                                     C * (ptrdiff_t)sizeof(T));                \
                _Pragma("omp simd")                                            \
                for (int j = 0; j < LANES; j++) {                              \
                    double d = (double)xr[j] - kk[j];                          \
                    a[j] += d;                                                 \
                    b[j] += d * d;                                             \
                }                                                              \
            }                                                                  \
            for (int j = 0; j < LANES; j++) {                                  \
                s[c0 + j] += a[j];                                             \
                q[c0 + j] += b[j];                                             \
            }                                                                  \
        }

#define CBN_GRAD_SUMS_BLOCK(T, LANES)                                          \
        for (; c0 + LANES <= C; c0 += LANES) {                                 \
            double a[LANES] = {0}, b[LANES] = {0}, kk[LANES];                  \
            for (int j = 0; j < LANES; j++) kk[j] = k[c0 + j];                 \
            for (ptrdiff_t r = r0; r < r1; r++) {                              \
                const T *gr = dy + r * dy_stride + c0;                         \
                const T *xr = x + r * x_stride + c0;                           \
                if (c0 == 0 && r + CBN_PREFETCH_ROWS < rows) {                 \
                    cbn_prefetch_row(dy + (r + CBN_PREFETCH_ROWS) * dy_stride, \
                                     C * (ptrdiff_t)sizeof(T));                \
                    cbn_prefetch_row(x + (r + CBN_PREFETCH_ROWS) * x_stride,   \
                                     C * (ptrdiff_t)sizeof(T));                \
                }                                                              \
                _Pragma("omp simd")                                            \
                for (int j = 0; j < LANES; j++) {                              \
                    double g = (double)gr[j];                                  \
                    a[j] += g;                                                 \
                    b[j] += g * ((double)xr[j] - kk[j]);                       \
                }                                                              \
            }                                                                  \
            for (int j = 0; j < LANES; j++) {                                  \
                s[c0 + j] += a[j];                                             \
                t[c0 + j] += b[j];                                             \
            }                                                                  \
        }

#define CBN_DEFINE_KERNELS(T, SUFFIX)                                          \
                                                                               \
/* s += sum(x - k), q += sum((x - k)^2) over one contiguous row. */            \
CBN_CLONES static void cbn_row_moments_##SUFFIX(                               \
        const T *x, ptrdiff_t n, double k, double *s, double *q)               \
{                                                                              \
    double a = 0.0, b = 0.0;                                                   \
    _Pragma("omp simd reduction(+:a,b)")                                       \
    for (ptrdiff_t i = 0; i < n; i++) {                                        \
        double d = (double)x[i] - k;                                           \
        a += d;                                                                \
        b += d * d;                                                            \
    }                                                                          \
    *s += a;                                                                   \
    *q += b;                                                                   \
}                                                                              \
                                                                               \
/* Per channel: s[c] += sum_r (x[r, c] - k[c]), q[c] += its square.            \
 * Channels go CBN_LANES at a time with their sums held in registers, over     \
 * CBN_ROW_BLOCK rows at a time (re-read from L1 for the next channels):       \
 * accumulating into s and q in memory row after row was 3-5x slower. */       \
/* rows_moments for C >= CBN_WIDE_ROWS: rows in address order, in groups. */   \
CBN_CLONES static void cbn_rows_moments_wide_##SUFFIX(                         \
        const T *x, ptrdiff_t rows, ptrdiff_t row_stride, ptrdiff_t C,         \
        const double *k, double *s, double *q)                                 \
{                                                                              \
    ptrdiff_t r = 0;                                                           \
    for (; r + CBN_ROW_GROUP <= rows; r += CBN_ROW_GROUP) {                    \
        const T *xr = x + r * row_stride;                                      \
        _Pragma("omp simd")                                                    \
        for (ptrdiff_t c = 0; c < C; c++) {                                    \
            double kc = k[c], a = 0.0, b = 0.0;                                \
            for (int i = 0; i < CBN_ROW_GROUP; i++) {                          \
                double d = (double)xr[i * row_stride + c] - kc;                \
                a += d;                                                        \
                b += d * d;                                                    \
            }                                                                  \
            s[c] += a;                                                         \
            q[c] += b;                                                         \
        }                                                                      \
    }                                                                          \
    for (; r < rows; r++) {                                                    \
        const T *xr = x + r * row_stride;                                      \
        _Pragma("omp simd")                                                    \
        for (ptrdiff_t c = 0; c < C; c++) {                                    \
            double d = (double)xr[c] - k[c];                                   \
            s[c] += d;                                                         \
            q[c] += d * d;                                                     \
        }                                                                      \
    }                                                                          \
}                                                                              \
                                                                               \
CBN_CLONES static void cbn_rows_moments_##SUFFIX(                              \
        const T *x, ptrdiff_t rows, ptrdiff_t row_stride, ptrdiff_t C,         \
        const double *k, double *s, double *q)                                 \
{                                                                              \
    if (C >= CBN_WIDE_ROWS) {                                                  \
        cbn_rows_moments_wide_##SUFFIX(x, rows, row_stride, C, k, s, q);       \
        return;                                                                \
    }                                                                          \
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += CBN_ROW_BLOCK) {                   \
        ptrdiff_t r1 = r0 + CBN_ROW_BLOCK < rows ? r0 + CBN_ROW_BLOCK : rows;  \
        ptrdiff_t c0 = 0;                                                      \
        CBN_MOMENTS_BLOCK(T, 64)                                               \
        CBN_MOMENTS_BLOCK(T, 16)                                               \
        for (ptrdiff_t r = r0; r < r1 && c0 < C; r++) {                        \
            const T *xr = x + r * row_stride;                                  \
            for (ptrdiff_t c = c0; c < C; c++) {                               \
                double d = (double)xr[c] - k[c];                               \
                s[c] += d;                                                     \
                q[c] += d * d;                                                 \
            }                                                                  \
        }                                                                      \
    }                                                                          \
}                                                                              \
                                                                               \
/* y[r, c] = (x[r, c] - m[c]) * a[c] + b[c] over a block of channels-last rows. */ \
CBN_CLONES static void cbn_rows_scale_shift_##SUFFIX(                          \
        const T *x, ptrdiff_t x_stride, T *y, ptrdiff_t y_stride,              \
        ptrdiff_t rows, ptrdiff_t C, const T *m, const T *a, const T *b)       \
{                                                                              \
    for (ptrdiff_t r = 0; r < rows; r++) {                                     \
        const T *xr = x + r * x_stride;                                        \
        T *yr = y + r * y_stride;                                              \
        _Pragma("omp simd")                                                    \
        for (ptrdiff_t c = 0; c < C; c++)                                      \
            yr[c] = (xr[c] - m[c]) * a[c] + b[c];                              \
    }                                                                          \
}                                                                              \
                                                                               \
/* s += sum(dy), t += sum(dy * (x - k)) over one contiguous row. */            \
CBN_CLONES static void cbn_row_grad_sums_##SUFFIX(                             \
        const T *dy, const T *x, ptrdiff_t n, double k, double *s, double *t)  \
{                                                                              \
    double a = 0.0, b = 0.0;                                                   \
    _Pragma("omp simd reduction(+:a,b)")                                       \
    for (ptrdiff_t i = 0; i < n; i++) {                                        \
        double g = (double)dy[i];                                              \
        a += g;                                                                \
        b += g * ((double)x[i] - k);                                           \
    }                                                                          \
    *s += a;                                                                   \
    *t += b;                                                                   \
}                                                                              \
                                                                               \
/* Per channel over a block of channels-last rows (blocked as rows_moments). */ \
/* rows_grad_sums for C >= CBN_WIDE_ROWS: rows in address order, in groups. */ \
CBN_CLONES static void cbn_rows_grad_sums_wide_##SUFFIX(                       \
        const T *dy, ptrdiff_t dy_stride, const T *x, ptrdiff_t x_stride,      \
        ptrdiff_t rows, ptrdiff_t C, const double *k, double *s, double *t)    \
{                                                                              \
    ptrdiff_t r = 0;                                                           \
    for (; r + CBN_ROW_GROUP <= rows; r += CBN_ROW_GROUP) {                    \
        const T *gr = dy + r * dy_stride;                                      \
        const T *xr = x + r * x_stride;                                        \
        _Pragma("omp simd")                                                    \
        for (ptrdiff_t c = 0; c < C; c++) {                                    \
            double kc = k[c], a = 0.0, b = 0.0;                                \
            for (int i = 0; i < CBN_ROW_GROUP; i++) {                          \
                double g = (double)gr[i * dy_stride + c];                      \
                a += g;                                                        \
                b += g * ((double)xr[i * x_stride + c] - kc);                  \
            }                                                                  \
            s[c] += a;                                                         \
            t[c] += b;                                                         \
        }                                                                      \
    }                                                                          \
    for (; r < rows; r++) {                                                    \
        const T *gr = dy + r * dy_stride;                                      \
        const T *xr = x + r * x_stride;                                        \
        _Pragma("omp simd")                                                    \
        for (ptrdiff_t c = 0; c < C; c++) {                                    \
            double g = (double)gr[c];                                          \
            s[c] += g;                                                         \
            t[c] += g * ((double)xr[c] - k[c]);                                \
        }                                                                      \
    }                                                                          \
}                                                                              \
                                                                               \
CBN_CLONES static void cbn_rows_grad_sums_##SUFFIX(                            \
        const T *dy, ptrdiff_t dy_stride, const T *x, ptrdiff_t x_stride,      \
        ptrdiff_t rows, ptrdiff_t C, const double *k, double *s, double *t)    \
{                                                                              \
    if (C >= CBN_WIDE_ROWS) {                                                  \
        cbn_rows_grad_sums_wide_##SUFFIX(dy, dy_stride, x, x_stride, rows, C,  \
                                         k, s, t);                             \
        return;                                                                \
    }                                                                          \
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += CBN_ROW_BLOCK) {                   \
        ptrdiff_t r1 = r0 + CBN_ROW_BLOCK < rows ? r0 + CBN_ROW_BLOCK : rows;  \
        ptrdiff_t c0 = 0;                                                      \
        CBN_GRAD_SUMS_BLOCK(T, 64)                                             \
        CBN_GRAD_SUMS_BLOCK(T, 16)                                             \
        for (ptrdiff_t r = r0; r < r1 && c0 < C; r++) {                        \
            const T *gr = dy + r * dy_stride;                                  \
            const T *xr = x + r * x_stride;                                    \
            for (ptrdiff_t c = c0; c < C; c++) {                               \
                double g = (double)gr[c];                                      \
                s[c] += g;                                                     \
                t[c] += g * ((double)xr[c] - k[c]);                            \
            }                                                                  \
        }                                                                      \
    }                                                                          \
}                                                                              \
                                                                               \
/* dx = a * dy + b * (x - m) + c over a block of channels-last rows, per channel. */ \
CBN_CLONES static void cbn_rows_grad_input_##SUFFIX(                           \
        const T *dy, ptrdiff_t dy_stride, const T *x, ptrdiff_t x_stride,      \
        T *dx, ptrdiff_t dx_stride, ptrdiff_t rows, ptrdiff_t C,               \
        const T *a, const T *b, const T *m, const T *c)                        \
{                                                                              \
    for (ptrdiff_t r = 0; r < rows; r++) {                                     \
        const T *gr = dy + r * dy_stride;                                      \
        const T *xr = x + r * x_stride;                                        \
        T *dr = dx + r * dx_stride;                                            \
        _Pragma("omp simd")                                                    \
        for (ptrdiff_t j = 0; j < C; j++)                                      \
            dr[j] = a[j] * gr[j] + b[j] * (xr[j] - m[j]) + c[j];               \
    }                                                                          \
}

/* (N, C, S) loops over many rows in one call: with S = 49 or 196 (ResNet's    \
 * late layers) a call per row through the ifunc costs as much as the row. */  \
#define CBN_DEFINE_NCS_KERNELS(T, SUFFIX)                                      \
                                                                               \
/* Per channel c < C of one sample: acc[2c] += sum(x[c] - k[c]),               \
 * acc[2c + 1] += sum((x[c] - k[c])^2); channel rows x_sc apart. */            \
CBN_CLONES static void cbn_sample_moments_##SUFFIX(                            \
        const T *x, ptrdiff_t x_sc, ptrdiff_t C, ptrdiff_t S,                  \
        const double *k, double *acc)                                          \
{                                                                              \
    for (ptrdiff_t c = 0; c < C; c++) {                                        \
        const T *xr = x + c * x_sc;                                            \
        double kc = k[c], a = 0.0, b = 0.0;                                    \
        _Pragma("omp simd reduction(+:a,b)")                                   \
        for (ptrdiff_t i = 0; i < S; i++) {                                    \
            double d = (double)xr[i] - kc;                                     \
            a += d;                                                            \
            b += d * d;                                                        \
        }                                                                      \
        acc[2 * c] += a;                                                       \
        acc[2 * c + 1] += b;                                                   \
    }                                                                          \
}                                                                              \
                                                                               \
/* The same for sum(dy) and sum(dy * (x - k)). */                              \
CBN_CLONES static void cbn_sample_grad_sums_##SUFFIX(                          \
        const T *dy, ptrdiff_t dy_sc, const T *x, ptrdiff_t x_sc, ptrdiff_t C, \
        ptrdiff_t S, const double *k, double *acc)                             \
{                                                                              \
    for (ptrdiff_t c = 0; c < C; c++) {                                        \
        const T *gr = dy + c * dy_sc;                                          \
        const T *xr = x + c * x_sc;                                            \
        double kc = k[c], a = 0.0, b = 0.0;                                    \
        _Pragma("omp simd reduction(+:a,b)")                                   \
        for (ptrdiff_t i = 0; i < S; i++) {                                    \
            double g = (double)gr[i];                                          \
            a += g;                                                            \
            b += g * ((double)xr[i] - kc);                                     \
        }                                                                      \
        acc[2 * c] += a;                                                       \
        acc[2 * c + 1] += b;                                                   \
    }                                                                          \
}                                                                              \
                                                                               \
/* y = (x - m[c]) * a[c] + b[c] over rows row0 <= row < row1 (row = n*C + c)   \
 * of (N, C, S) arrays; strides in elements, rows contiguous.  With m the      \
 * mean rounded to T, x - m is exact near the mean (Sterbenz), so y keeps T's  \
 * accuracy however far the data sit from zero; b carries the rest. */         \
CBN_CLONES static void cbn_ncs_scale_shift_##SUFFIX(                           \
        const T *x, ptrdiff_t x_sn, ptrdiff_t x_sc, T *y, ptrdiff_t y_sn,      \
        ptrdiff_t y_sc, ptrdiff_t C, ptrdiff_t S, ptrdiff_t row0,              \
        ptrdiff_t row1, const T *m, const T *a, const T *b)                    \
{                                                                              \
    ptrdiff_t n = row0 / C, c = row0 % C;                                      \
    for (ptrdiff_t row = row0; row < row1; row++) {                            \
        const T *xr = x + n * x_sn + c * x_sc;                                 \
        T *yr = y + n * y_sn + c * y_sc;                                       \
        T mc = m[c], ac = a[c], bc = b[c];                                     \
        _Pragma("omp simd")                                                    \
        for (ptrdiff_t i = 0; i < S; i++)                                      \
            yr[i] = (xr[i] - mc) * ac + bc;                                    \
        if (++c == C) {                                                        \
            c = 0;                                                             \
            n++;                                                               \
        }                                                                      \
    }                                                                          \
}                                                                              \
                                                                               \
/* dx = a[c] * dy + b[c] * (x - m[c]) + c[c] over rows row0..row1-1. */        \
CBN_CLONES static void cbn_ncs_grad_input_##SUFFIX(                            \
        const T *dy, ptrdiff_t dy_sn, ptrdiff_t dy_sc, const T *x,             \
        ptrdiff_t x_sn, ptrdiff_t x_sc, T *dx, ptrdiff_t dx_sn,                \
        ptrdiff_t dx_sc, ptrdiff_t C, ptrdiff_t S, ptrdiff_t row0,             \
        ptrdiff_t row1, const T *a, const T *b, const T *m, const T *c)        \
{                                                                              \
    ptrdiff_t n = row0 / C, ch = row0 % C;                                     \
    for (ptrdiff_t row = row0; row < row1; row++) {                            \
        const T *gr = dy + n * dy_sn + ch * dy_sc;                             \
        const T *xr = x + n * x_sn + ch * x_sc;                                \
        T *dr = dx + n * dx_sn + ch * dx_sc;                                   \
        T ac = a[ch], bc = b[ch], mc = m[ch], cc = c[ch];                      \
        _Pragma("omp simd")                                                    \
        for (ptrdiff_t i = 0; i < S; i++)                                      \
            dr[i] = ac * gr[i] + bc * (xr[i] - mc) + cc;                       \
        if (++ch == C) {                                                       \
            ch = 0;                                                            \
            n++;                                                               \
        }                                                                      \
    }                                                                          \
}

CBN_DEFINE_KERNELS(float, f)
CBN_DEFINE_KERNELS(double, d)
CBN_DEFINE_NCS_KERNELS(float, f)
CBN_DEFINE_NCS_KERNELS(double, d)

#endif
