# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Normalisation as one subtract and one multiply-add per element:
``y = (x - center[c]) * scale[c] + shift[c]``.

The caller computes per channel ``scale = weight / sqrt(var + eps)``, the
mean rounded to the data's dtype as ``center = m_hi`` and
``shift = bias - (mean - m_hi) * scale``.  Subtracting the rounded mean first
is exact for values near the mean, so the output keeps the dtype's accuracy
for data far from zero (``1e4 + N(0, 1)`` in float32), where
``x * scale + (bias - mean * scale)`` would lose ``|mean * scale| * 2**-24``.
The same kernel serves training, evaluation and the evaluation-mode backward
(``dx = dy * scale``: zero center and shift).
"""
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free

from _blocks cimport (unit_count, ceil_div, threads_for, check_rows, check_extents,
                     per_channel)

# The elementwise loops of cbn_simd.h, with streaming stores on request.
cdef extern from "cbn_stream.h" nogil:
    int cbn_stream_available()
    void cbn_ncs_scale_shift_stream_f(const float *x, Py_ssize_t x_sn, Py_ssize_t x_sc,
                                      float *y, Py_ssize_t y_sn, Py_ssize_t y_sc, Py_ssize_t C,
                                      Py_ssize_t S, Py_ssize_t row0, Py_ssize_t row1,
                                      const float *m, const float *a, const float *b, int stream)
    void cbn_ncs_scale_shift_stream_d(const double *x, Py_ssize_t x_sn, Py_ssize_t x_sc,
                                      double *y, Py_ssize_t y_sn, Py_ssize_t y_sc, Py_ssize_t C,
                                      Py_ssize_t S, Py_ssize_t row0, Py_ssize_t row1,
                                      const double *m, const double *a, const double *b, int stream)
    void cbn_rows_scale_shift_stream_f(const float *x, Py_ssize_t x_stride, float *y,
                                       Py_ssize_t y_stride, Py_ssize_t rows, Py_ssize_t C,
                                       const float *m, const float *a, const float *b, int stream)
    void cbn_rows_scale_shift_stream_d(const double *x, Py_ssize_t x_stride, double *y,
                                       Py_ssize_t y_stride, Py_ssize_t rows, Py_ssize_t C,
                                       const double *m, const double *a, const double *b, int stream)

#: Whether ``stream=True`` writes with streaming stores here (AVX-512 CPUs).
STREAMING_STORES = bool(cbn_stream_available())

ctypedef fused floating:
    float
    double


def scale_shift_ncs(const floating[:, :, :] x, const floating[::1] center,
                    const floating[::1] scale, const floating[::1] shift,
                    floating[:, :, :] out, int n_threads, bint stream=False):
    """out[n, c, :] = (x[n, c, :] - center[c]) * scale[c] + shift[c] for an (N, C, S) array.

    ``stream``: write ``out`` with streaming stores (see cbn_stream.h).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t item = sizeof(floating)
    cdef Py_ssize_t x_sn = x.strides[0] // item, x_sc = x.strides[1] // item
    cdef Py_ssize_t y_sn = out.strides[0] // item, y_sc = out.strides[1] // item
    cdef Py_ssize_t rows = N * C, piece, pieces
    cdef int threads = threads_for(N * C * S, n_threads)
    check_rows(x.strides[2], S, sizeof(floating))
    check_rows(out.strides[2], S, sizeof(floating))
    check_extents(N, out.shape[0], "the output")
    check_extents(C, out.shape[1], "the output")
    check_extents(S, out.shape[2], "the output")
    check_extents(C, center.shape[0], "center")
    check_extents(C, scale.shape[0], "scale")
    check_extents(C, shift.shape[0], "shift")
    if rows == 0 or S == 0:
        return
    # One contiguous range of rows per thread, each done in one call.
    pieces = min(rows, threads)
    with nogil:
        if pieces == 1:  # a parallel region of one thread still costs ~1 us
            _ncs_rows(&x[0, 0, 0], x_sn, x_sc, &out[0, 0, 0], y_sn, y_sc, C, S, 0, rows,
                      &center[0], &scale[0], &shift[0], stream)
        else:
            for piece in prange(pieces, num_threads=threads, schedule='static'):
                _ncs_rows(&x[0, 0, 0], x_sn, x_sc, &out[0, 0, 0], y_sn, y_sc, C, S,
                          piece * rows // pieces, (piece + 1) * rows // pieces,
                          &center[0], &scale[0], &shift[0], stream)


cdef inline void _ncs_rows(const floating *x, Py_ssize_t x_sn, Py_ssize_t x_sc, floating *y,
                           Py_ssize_t y_sn, Py_ssize_t y_sc, Py_ssize_t C, Py_ssize_t S,
                           Py_ssize_t r0, Py_ssize_t r1, const floating *center,
                           const floating *scale, const floating *shift,
                           bint stream) noexcept nogil:
    if floating is float:
        cbn_ncs_scale_shift_stream_f(x, x_sn, x_sc, y, y_sn, y_sc, C, S, r0, r1, center,
                                     scale, shift, stream)
    else:
        cbn_ncs_scale_shift_stream_d(x, x_sn, x_sc, y, y_sn, y_sc, C, S, r0, r1, center,
                                     scale, shift, stream)


def scale_shift_mc(const floating[:, :] x, const floating[::1] center,
                   const floating[::1] scale, const floating[::1] shift,
                   floating[:, :] out, int n_threads, bint stream=False):
    """out[m, :] = (x[m, :] - center) * scale + shift for a channels-last (M, C) array.

    ``stream``: write ``out`` with streaming stores (see cbn_stream.h).
    """
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t units = unit_count(M, C)
    cdef Py_ssize_t rows_per_unit = ceil_div(M, units)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t out_stride = out.strides[0] // sizeof(floating)
    cdef Py_ssize_t j
    cdef int threads = threads_for(M * C, n_threads)
    check_rows(x.strides[1], C, sizeof(floating))
    check_rows(out.strides[1], C, sizeof(floating))
    check_extents(M, out.shape[0], "the output")
    check_extents(C, out.shape[1], "the output")
    check_extents(C, center.shape[0], "center")
    check_extents(C, scale.shape[0], "scale")
    check_extents(C, shift.shape[0], "shift")
    if M == 0 or C == 0:
        return
    with nogil:
        if threads == 1:  # a parallel region of one thread still costs ~1 us
            for j in range(units):
                _mc_unit(&x[0, 0], x_stride, &out[0, 0], out_stride, M, C, j, rows_per_unit,
                         &center[0], &scale[0], &shift[0], stream)
        else:
            for j in prange(units, num_threads=threads, schedule='static'):
                _mc_unit(&x[0, 0], x_stride, &out[0, 0], out_stride, M, C, j, rows_per_unit,
                         &center[0], &scale[0], &shift[0], stream)


cdef inline void _mc_unit(const floating *x, Py_ssize_t x_stride, floating *out,
                          Py_ssize_t out_stride, Py_ssize_t M, Py_ssize_t C, Py_ssize_t j,
                          Py_ssize_t rows_per_unit, const floating *center,
                          const floating *scale, const floating *shift,
                          bint stream) noexcept nogil:
    cdef Py_ssize_t r0 = j * rows_per_unit
    cdef Py_ssize_t rows = min(M, r0 + rows_per_unit) - r0
    if rows > 0:
        if floating is float:
            cbn_rows_scale_shift_stream_f(x + r0 * x_stride, x_stride, out + r0 * out_stride,
                                          out_stride, rows, C, center, scale, shift, stream)
        else:
            cbn_rows_scale_shift_stream_d(x + r0 * x_stride, x_stride, out + r0 * out_stride,
                                          out_stride, rows, C, center, scale, shift, stream)


def coefficients(const double[::1] mean, const double[::1] var, weight, bias, double eps,
                 double[::1] invstd, floating[::1] center, floating[::1] scale,
                 floating[::1] shift):
    """Per channel, in one call (NumPy would take a dozen)::

        invstd = 1 / sqrt(var + eps)
        center = mean rounded to the dtype
        scale  = weight * invstd
        shift  = bias - (mean - center) * scale

    ``weight`` and ``bias``: None or contiguous float32/float64 (C,) arrays;
    anything else returns False (the caller computes in NumPy).
    """
    cdef Py_ssize_t C = mean.shape[0], c
    check_extents(C, var.shape[0], "var")
    check_extents(C, invstd.shape[0], "invstd")
    check_extents(C, center.shape[0], "center")
    check_extents(C, scale.shape[0], "scale")
    check_extents(C, shift.shape[0], "shift")
    # Loops without branches inside, so that they vectorise (sqrt and divide
    # are the slow part); weight, bias, scale and shift go through float64 scratch.
    cdef double *full = <double *> malloc(4 * max(C, 1) * sizeof(double))
    cdef double *rest = full + C
    cdef double *w = rest + C
    cdef double *b = w + C
    if full == NULL:
        raise MemoryError()
    try:
        if not (per_channel(weight, C, "weight", 1.0, w)
                and per_channel(bias, C, "bias", -0.0, b)):
            return False
        with nogil:
            for c in range(C):
                invstd[c] = 1.0 / sqrt(var[c] + eps)
            for c in range(C):
                full[c] = w[c] * invstd[c]
            for c in range(C):
                center[c] = <floating> mean[c]
                scale[c] = <floating> full[c]
                rest[c] = -(mean[c] - <double> center[c]) * full[c]
            for c in range(C):
                shift[c] = <floating> (rest[c] + b[c])
    finally:
        free(full)
    return True


def mean_var(double count, const double[::1] s, const double[::1] q, const double[::1] shift,
             double[::1] mean, double[::1] var):
    """Per channel, from shifted sums over ``count`` values (one call, not six)::

        mean = shift + s / count
        var  = max((q - s * (s / count)) / count, 0)     (NaN stays NaN)
    """
    cdef Py_ssize_t C = s.shape[0], c
    cdef double v
    check_extents(C, q.shape[0], "q")
    check_extents(C, shift.shape[0], "shift")
    check_extents(C, mean.shape[0], "mean")
    check_extents(C, var.shape[0], "var")
    with nogil:
        for c in range(C):
            mean[c] = shift[c] + s[c] / count
            v = (q[c] - s[c] * (s[c] / count)) / count
            var[c] = 0.0 if v < 0.0 else v


def update_running(floating[::1] running_mean, floating[::1] running_var,
                   const double[::1] mean, const double[::1] var, double count, double factor):
    """The running statistics blended with the batch's, in place, in one call::

        running_mean = (1 - factor) * running_mean + factor * mean
        running_var  = (1 - factor) * running_var  + factor * (var * (count / (count - 1)))

    rounded exactly as NumPy computes those lines for ``float`` factors (the
    product with ``1 - factor`` in the buffers' dtype, the sum in float64).
    """
    cdef Py_ssize_t C = running_mean.shape[0], c
    cdef floating keep = <floating> (1.0 - factor)
    cdef double ratio = count / (count - 1.0)
    check_extents(C, running_var.shape[0], "running_var")
    check_extents(C, mean.shape[0], "mean")
    check_extents(C, var.shape[0], "var")
    with nogil:
        for c in range(C):
            running_mean[c] = <floating> (<double> (keep * running_mean[c]) + factor * mean[c])
            running_var[c] = <floating> (<double> (keep * running_var[c])
                                         + factor * (var[c] * ratio))
