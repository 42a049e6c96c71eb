/* Normalisation and the input gradient with streaming (non-temporal) stores, for outputs too large
 * to stay in the last-level cache next to their input.
 *
 * An ordinary store first reads the output's cache line from memory (the
 * read-for-ownership), so y = (x - m) * a + b moves three streams: x in, y in,
 * y out.  A streaming store writes whole lines without reading them: two
 * streams.  Measured here (C loop, one thread, 25.7 MB float32): 2.9 ms with
 * ordinary stores, 1.9 ms streaming.  The price: the output leaves the cache,
 * so the caller (cbn/_layout.py) streams only large outputs (per thread) in
 * long rows.
 *
 * AVX-512 only (chosen at run time); elsewhere the "stream" functions are the
 * ordinary loops of cbn_simd.h.  Both compute fma(x - m, a, b), as the
 * AVX-512 clone of the ordinary loop does.
 */
#ifndef CBN_STREAM_H
#define CBN_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include "cbn_simd.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(CBN_NO_STREAM)
#include <immintrin.h>
#define CBN_STREAM_TARGET __attribute__((target("avx512f,fma"), unused))

static int cbn_stream_available(void)
{
    static int available = -1;
    if (available < 0) {
        __builtin_cpu_init();
        available = __builtin_cpu_supports("avx512f") ? 1 : 0;
    }
    return available;
}

/* Per dtype T (vector type V, intrinsic suffix P, LANES per vector, scalar
 * fused multiply-add FMA), rows of n elements with coefficients indexed
 * i * step (step 0: one channel's; step 1: a row of channels), streamed from
 * the output's first 64-byte boundary on:
 *   cbn_stream_*:    y[i]  = fma(x[i] - m, a, b)
 *   cbn_stream_gi_*: dx[i] = fma(a, dy[i], (x[i] - m) * b) + c
 * (the ordinary AVX-512 loops' order of operations). */
#define CBN_DEFINE_STREAM_ROWS(T, SUFFIX, V, P, LANES, FMA)                    \
CBN_STREAM_TARGET static void cbn_stream_##SUFFIX(                             \
        const T *x, T *y, ptrdiff_t n, const T *m, const T *a, const T *b,     \
        int step)                                                              \
{                                                                              \
    ptrdiff_t i = 0;                                                           \
    for (; i < n && ((uintptr_t)(y + i) & 63); i++)                            \
        y[i] = FMA(x[i] - m[i * step], a[i * step], b[i * step]);              \
    for (; i + LANES <= n; i += LANES) {                                       \
        V vm = step ? _mm512_loadu_##P(m + i) : _mm512_set1_##P(*m);           \
        V va = step ? _mm512_loadu_##P(a + i) : _mm512_set1_##P(*a);           \
        V vb = step ? _mm512_loadu_##P(b + i) : _mm512_set1_##P(*b);           \
        _mm512_stream_##P(y + i, _mm512_fmadd_##P(                             \
            _mm512_sub_##P(_mm512_loadu_##P(x + i), vm), va, vb));             \
    }                                                                          \
    for (; i < n; i++)                                                         \
        y[i] = FMA(x[i] - m[i * step], a[i * step], b[i * step]);              \
}                                                                              \
                                                                               \
CBN_STREAM_TARGET static void cbn_stream_gi_##SUFFIX(                          \
        const T *dy, const T *x, T *dx, ptrdiff_t n, const T *a, const T *b,   \
        const T *m, const T *c, int step)                                      \
{                                                                              \
    ptrdiff_t i = 0;                                                           \
    for (; i < n && ((uintptr_t)(dx + i) & 63); i++)                           \
        dx[i] = FMA(a[i * step], dy[i], (x[i] - m[i * step]) * b[i * step])    \
                + c[i * step];                                                 \
    for (; i + LANES <= n; i += LANES) {                                       \
        V va = step ? _mm512_loadu_##P(a + i) : _mm512_set1_##P(*a);           \
        V vb = step ? _mm512_loadu_##P(b + i) : _mm512_set1_##P(*b);           \
        V vm = step ? _mm512_loadu_##P(m + i) : _mm512_set1_##P(*m);           \
        V vc = step ? _mm512_loadu_##P(c + i) : _mm512_set1_##P(*c);           \
        V t = _mm512_mul_##P(_mm512_sub_##P(_mm512_loadu_##P(x + i), vm), vb); \
        t = _mm512_fmadd_##P(va, _mm512_loadu_##P(dy + i), t);                 \
        _mm512_stream_##P(dx + i, _mm512_add_##P(t, vc));                      \
    }                                                                          \
    for (; i < n; i++)                                                         \
        dx[i] = FMA(a[i * step], dy[i], (x[i] - m[i * step]) * b[i * step])    \
                + c[i * step];                                                 \
}

CBN_DEFINE_STREAM_ROWS(float, f, __m512, ps, 16, __builtin_fmaf)
CBN_DEFINE_STREAM_ROWS(double, d, __m512d, pd, 8, __builtin_fma)

/* Streamed stores are weakly ordered: fence them before the threads meet. */
CBN_STREAM_TARGET static void cbn_stream_fence(void) { _mm_sfence(); }

/* The kernels of cbn_simd.h with a last argument ``stream``: nonzero writes
 * with streaming stores (when the CPU has them), zero is the ordinary loop. */
#define CBN_DEFINE_STREAM_KERNELS(T, SUFFIX)                                   \
static void cbn_ncs_scale_shift_stream_##SUFFIX(                               \
        const T *x, ptrdiff_t x_sn, ptrdiff_t x_sc, T *y, ptrdiff_t y_sn,      \
        ptrdiff_t y_sc, ptrdiff_t C, ptrdiff_t S, ptrdiff_t row0,              \
        ptrdiff_t row1, const T *m, const T *a, const T *b, int stream)        \
{                                                                              \
    if (!stream || !cbn_stream_available()) {                                  \
        cbn_ncs_scale_shift_##SUFFIX(x, x_sn, x_sc, y, y_sn, y_sc, C, S, row0, \
                                     row1, m, a, b);                           \
        return;                                                                \
    }                                                                          \
    for (ptrdiff_t row = row0; row < row1; row++) {                            \
        ptrdiff_t n = row / C, c = row % C;                                    \
        cbn_stream_##SUFFIX(x + n * x_sn + c * x_sc, y + n * y_sn + c * y_sc,  \
                            S, m + c, a + c, b + c, 0);                        \
    }                                                                          \
    cbn_stream_fence();                                                        \
}                                                                              \
                                                                               \
static void cbn_rows_scale_shift_stream_##SUFFIX(                              \
        const T *x, ptrdiff_t x_stride, T *y, ptrdiff_t y_stride,              \
        ptrdiff_t rows, ptrdiff_t C, const T *m, const T *a, const T *b,       \
        int stream)                                                            \
{                                                                              \
    if (!stream || !cbn_stream_available()) {                                  \
        cbn_rows_scale_shift_##SUFFIX(x, x_stride, y, y_stride, rows, C, m, a, \
                                      b);                                      \
        return;                                                                \
    }                                                                          \
    for (ptrdiff_t r = 0; r < rows; r++)                                       \
        cbn_stream_##SUFFIX(x + r * x_stride, y + r * y_stride, C, m, a, b, 1); \
    cbn_stream_fence();                                                        \
}                                                                              \
                                                                               \
static void cbn_ncs_grad_input_stream_##SUFFIX(                                \
        const T *dy, ptrdiff_t dy_sn, ptrdiff_t dy_sc, const T *x,             \
        ptrdiff_t x_sn, ptrdiff_t x_sc, T *dx, ptrdiff_t dx_sn,                \
        ptrdiff_t dx_sc, ptrdiff_t C, ptrdiff_t S, ptrdiff_t row0,             \
        ptrdiff_t row1, const T *a, const T *b, const T *m, const T *c,        \
        int stream)                                                            \
{                                                                              \
    if (!stream || !cbn_stream_available()) {                                  \
        cbn_ncs_grad_input_##SUFFIX(dy, dy_sn, dy_sc, x, x_sn, x_sc, dx, dx_sn,\
                                    dx_sc, C, S, row0, row1, a, b, m, c);      \
        return;                                                                \
    }                                                                          \
    for (ptrdiff_t row = row0; row < row1; row++) {                            \
        ptrdiff_t n = row / C, ch = row % C;                                   \
        cbn_stream_gi_##SUFFIX(dy + n * dy_sn + ch * dy_sc,                    \
                               x + n * x_sn + ch * x_sc,                       \
                               dx + n * dx_sn + ch * dx_sc, S, a + ch, b + ch, \
                               m + ch, c + ch, 0);                             \
    }                                                                          \
    cbn_stream_fence();                                                        \
}                                                                              \
                                                                               \
static void cbn_rows_grad_input_stream_##SUFFIX(                               \
        const T *dy, ptrdiff_t dy_stride, const T *x, ptrdiff_t x_stride,      \
        T *dx, ptrdiff_t dx_stride, ptrdiff_t rows, ptrdiff_t C,               \
        const T *a, const T *b, const T *m, const T *c, int stream)            \
{                                                                              \
    if (!stream || !cbn_stream_available()) {                                  \
        cbn_rows_grad_input_##SUFFIX(dy, dy_stride, x, x_stride, dx, dx_stride,\
                                     rows, C, a, b, m, c);                     \
        return;                                                                \
    }                                                                          \
    for (ptrdiff_t r = 0; r < rows; r++)                                       \
        cbn_stream_gi_##SUFFIX(dy + r * dy_stride, x + r * x_stride,           \
                               dx + r * dx_stride, C, a, b, m, c, 1);          \
    cbn_stream_fence();                                                        \
}

CBN_DEFINE_STREAM_KERNELS(float, f)
CBN_DEFINE_STREAM_KERNELS(double, d)

#else  /* no streaming stores: the ordinary loops, ``stream`` ignored */

static int cbn_stream_available(void) { return 0; }

#define cbn_ncs_scale_shift_stream_f(x, x_sn, x_sc, y, y_sn, y_sc, C, S, r0, r1, m, a, b, s) \
    cbn_ncs_scale_shift_f(x, x_sn, x_sc, y, y_sn, y_sc, C, S, r0, r1, m, a, b)
#define cbn_ncs_scale_shift_stream_d(x, x_sn, x_sc, y, y_sn, y_sc, C, S, r0, r1, m, a, b, s) \
    cbn_ncs_scale_shift_d(x, x_sn, x_sc, y, y_sn, y_sc, C, S, r0, r1, m, a, b)
#define cbn_rows_scale_shift_stream_f(x, x_st, y, y_st, rows, C, m, a, b, s) \
    cbn_rows_scale_shift_f(x, x_st, y, y_st, rows, C, m, a, b)
#define cbn_rows_scale_shift_stream_d(x, x_st, y, y_st, rows, C, m, a, b, s) \
    cbn_rows_scale_shift_d(x, x_st, y, y_st, rows, C, m, a, b)
#define cbn_ncs_grad_input_stream_f(g, g_sn, g_sc, x, x_sn, x_sc, o, o_sn, o_sc, C, S, r0, r1, a, b, m, c, s) \
    cbn_ncs_grad_input_f(g, g_sn, g_sc, x, x_sn, x_sc, o, o_sn, o_sc, C, S, r0, r1, a, b, m, c)
#define cbn_ncs_grad_input_stream_d(g, g_sn, g_sc, x, x_sn, x_sc, o, o_sn, o_sc, C, S, r0, r1, a, b, m, c, s) \
    cbn_ncs_grad_input_d(g, g_sn, g_sc, x, x_sn, x_sc, o, o_sn, o_sc, C, S, r0, r1, a, b, m, c)
#define cbn_rows_grad_input_stream_f(g, g_st, x, x_st, o, o_st, rows, C, a, b, m, c, s) \
    cbn_rows_grad_input_f(g, g_st, x, x_st, o, o_st, rows, C, a, b, m, c)
#define cbn_rows_grad_input_stream_d(g, g_st, x, x_st, o, o_st, rows, C, a, b, m, c, s) \
    cbn_rows_grad_input_d(g, g_st, x, x_st, o, o_st, rows, C, a, b, m, c)

#endif

#endif
