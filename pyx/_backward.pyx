# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The input gradient of the training-mode backward pass.

From the per-channel gradient sums of ``cbn._stats.grad_sums_*`` the caller
precomputes four coefficients per channel; these kernels then write
``dx = a[c] * dy + b[c] * (x - m[c]) + c[c]`` in one pass.
"""
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free

from _blocks cimport (unit_count, ceil_div, threads_for, check_rows, check_extents,
                     per_channel)

# The elementwise loops of cbn_simd.h, with streaming stores on request.
cdef extern from "cbn_stream.h" nogil:
    void cbn_ncs_grad_input_stream_f(const float *dy, Py_ssize_t dy_sn, Py_ssize_t dy_sc,
                                     const float *x, Py_ssize_t x_sn, Py_ssize_t x_sc,
                                     float *dx, Py_ssize_t dx_sn, Py_ssize_t dx_sc, Py_ssize_t C,
                                     Py_ssize_t S, Py_ssize_t row0, Py_ssize_t row1,
                                     const float *a, const float *b, const float *m,
                                     const float *c, int stream)
    void cbn_ncs_grad_input_stream_d(const double *dy, Py_ssize_t dy_sn, Py_ssize_t dy_sc,
                                     const double *x, Py_ssize_t x_sn, Py_ssize_t x_sc,
                                     double *dx, Py_ssize_t dx_sn, Py_ssize_t dx_sc,
                                     Py_ssize_t C, Py_ssize_t S, Py_ssize_t row0,
                                     Py_ssize_t row1, const double *a, const double *b,
                                     const double *m, const double *c, int stream)
    void cbn_rows_grad_input_stream_f(const float *dy, Py_ssize_t dy_stride, const float *x,
                                      Py_ssize_t x_stride, float *dx, Py_ssize_t dx_stride,
                                      Py_ssize_t rows, Py_ssize_t C, const float *a,
                                      const float *b, const float *m, const float *c, int stream)
    void cbn_rows_grad_input_stream_d(const double *dy, Py_ssize_t dy_stride,
                                      const double *x, Py_ssize_t x_stride, double *dx,
                                      Py_ssize_t dx_stride, Py_ssize_t rows, Py_ssize_t C,
                                      const double *a, const double *b, const double *m,
                                      const double *c, int stream)

ctypedef fused floating:
    float
    double


def grad_input_ncs(const floating[:, :, :] dy, const floating[:, :, :] x,
                   const floating[::1] a, const floating[::1] b, const floating[::1] m,
                   const floating[::1] c, floating[:, :, :] out, int n_threads,
                   bint stream=False):
    """out = a * dy + b * (x - m) + c per channel, for (N, C, S) arrays.

    ``stream``: write ``out`` with streaming stores (see cbn_stream.h).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t item = sizeof(floating)
    cdef Py_ssize_t g_sn = dy.strides[0] // item, g_sc = dy.strides[1] // item
    cdef Py_ssize_t x_sn = x.strides[0] // item, x_sc = x.strides[1] // item
    cdef Py_ssize_t o_sn = out.strides[0] // item, o_sc = out.strides[1] // item
    cdef Py_ssize_t rows = N * C, piece, pieces
    cdef int threads = threads_for(N * C * S, n_threads)
    cdef Py_ssize_t axis
    for axis in range(3):
        check_extents(x.shape[axis], dy.shape[axis], "dy")
        check_extents(x.shape[axis], out.shape[axis], "the output")
    check_rows(dy.strides[2], S, sizeof(floating))
    check_rows(x.strides[2], S, sizeof(floating))
    check_rows(out.strides[2], S, sizeof(floating))
    for axis in range(4):
        check_extents(C, (a, b, m, c)[axis].shape[0], "a coefficient")
    if rows == 0 or S == 0:
        return
    # One contiguous range of rows per thread, each done in one call.
    pieces = min(rows, threads)
    with nogil:
        if pieces == 1:  # a parallel region of one thread still costs ~1 us
            _ncs_rows(&dy[0, 0, 0], g_sn, g_sc, &x[0, 0, 0], x_sn, x_sc, &out[0, 0, 0], o_sn,
                      o_sc, C, S, 0, rows, &a[0], &b[0], &m[0], &c[0], stream)
        else:
            for piece in prange(pieces, num_threads=threads, schedule='static'):
                _ncs_rows(&dy[0, 0, 0], g_sn, g_sc, &x[0, 0, 0], x_sn, x_sc, &out[0, 0, 0],
                          o_sn, o_sc, C, S, piece * rows // pieces,
                          (piece + 1) * rows // pieces, &a[0], &b[0], &m[0], &c[0], stream)


cdef inline void _ncs_rows(const floating *dy, Py_ssize_t g_sn, Py_ssize_t g_sc,
                           const floating *x, Py_ssize_t x_sn, Py_ssize_t x_sc, floating *dx,
                           Py_ssize_t o_sn, Py_ssize_t o_sc, Py_ssize_t C, Py_ssize_t S,
                           Py_ssize_t r0, Py_ssize_t r1, const floating *a, const floating *b,
                           const floating *m, const floating *c, bint stream) noexcept nogil:
    if floating is float:
        cbn_ncs_grad_input_stream_f(dy, g_sn, g_sc, x, x_sn, x_sc, dx, o_sn, o_sc, C, S, r0,
                                    r1, a, b, m, c, stream)
    else:
        cbn_ncs_grad_input_stream_d(dy, g_sn, g_sc, x, x_sn, x_sc, dx, o_sn, o_sc, C, S, r0,
                                    r1, a, b, m, c, stream)


def grad_input_mc(const floating[:, :] dy, const floating[:, :] x,
                  const floating[::1] a, const floating[::1] b, const floating[::1] m,
                  const floating[::1] c, floating[:, :] out, int n_threads,
                  bint stream=False):
    """out = a * dy + b * (x - m) + c per channel, for channels-last (M, C) arrays.

    ``stream``: write ``out`` with streaming stores (see cbn_stream.h).
    """
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t units = unit_count(M, C)
    cdef Py_ssize_t rows_per_unit = ceil_div(M, units)
    cdef Py_ssize_t dy_stride = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t out_stride = out.strides[0] // sizeof(floating)
    cdef Py_ssize_t j
    cdef int threads = threads_for(M * C, n_threads)
    cdef Py_ssize_t axis
    for axis in range(2):
        check_extents(x.shape[axis], dy.shape[axis], "dy")
        check_extents(x.shape[axis], out.shape[axis], "the output")
    check_rows(dy.strides[1], C, sizeof(floating))
    check_rows(x.strides[1], C, sizeof(floating))
    check_rows(out.strides[1], C, sizeof(floating))
    for axis in range(4):
        check_extents(C, (a, b, m, c)[axis].shape[0], "a coefficient")
    if M == 0 or C == 0:
        return
    with nogil:
        if threads == 1:  # a parallel region of one thread still costs ~1 us
            for j in range(units):
                _mc_unit(&dy[0, 0], dy_stride, &x[0, 0], x_stride, &out[0, 0], out_stride, M,
                         C, j, rows_per_unit, &a[0], &b[0], &m[0], &c[0], stream)
        else:
            for j in prange(units, num_threads=threads, schedule='static'):
                _mc_unit(&dy[0, 0], dy_stride, &x[0, 0], x_stride, &out[0, 0], out_stride, M,
                         C, j, rows_per_unit, &a[0], &b[0], &m[0], &c[0], stream)


cdef inline void _mc_unit(const floating *dy, Py_ssize_t dy_stride, const floating *x,
                          Py_ssize_t x_stride, floating *dx, Py_ssize_t dx_stride, Py_ssize_t M,
                          Py_ssize_t C, Py_ssize_t j, Py_ssize_t rows_per_unit,
                          const floating *a, const floating *b, const floating *m,
                          const floating *c, bint stream) noexcept nogil:
    cdef Py_ssize_t r0 = j * rows_per_unit
    cdef Py_ssize_t rows = min(M, r0 + rows_per_unit) - r0
    if rows > 0:
        if floating is float:
            cbn_rows_grad_input_stream_f(dy + r0 * dy_stride, dy_stride, x + r0 * x_stride,
                                         x_stride, dx + r0 * dx_stride, dx_stride, rows, C,
                                         a, b, m, c, stream)
        else:
            cbn_rows_grad_input_stream_d(dy + r0 * dy_stride, dy_stride, x + r0 * x_stride,
                                         x_stride, dx + r0 * dx_stride, dx_stride, rows, C,
                                         a, b, m, c, stream)


def coefficients(const double[::1] sum_dy, const double[::1] sum_dy_xc,
                 const double[::1] invstd, const double[::1] mean, weight, double count,
                 floating[::1] a, floating[::1] b, floating[::1] m, floating[::1] c):
    """The four per-channel coefficients of ``grad_input_*`` in one call::

        a = weight * invstd                      (invstd without a weight)
        b = -a * (sum_dy_xc * invstd * invstd / count)
        m = mean rounded to the dtype
        c = -a * sum_dy / count - b * (mean - m)

    computed in float64 and rounded once.  ``weight``: None or a contiguous
    float32/float64 (C,) array; anything else returns False (the caller
    computes in NumPy).
    """
    cdef Py_ssize_t C = sum_dy.shape[0], ch
    cdef double ac, bc
    check_extents(C, sum_dy_xc.shape[0], "sum_dy_xc")
    check_extents(C, invstd.shape[0], "invstd")
    check_extents(C, mean.shape[0], "mean")
    for ch in range(4):
        check_extents(C, (a, b, m, c)[ch].shape[0], "a coefficient")
    cdef double *w = <double *> malloc(max(C, 1) * sizeof(double))
    if w == NULL:
        raise MemoryError()
    try:
        if not per_channel(weight, C, "weight", 1.0, w):
            return False
        with nogil:
            for ch in range(C):
                ac = w[ch] * invstd[ch]
                bc = -ac * (sum_dy_xc[ch] * invstd[ch] * invstd[ch] / count)
                m[ch] = <floating> mean[ch]
                a[ch] = <floating> ac
                b[ch] = <floating> bc
                c[ch] = <floating> (-ac * sum_dy[ch] / count - bc * (mean[ch] - <double> m[ch]))
    finally:
        free(w)
    return True
