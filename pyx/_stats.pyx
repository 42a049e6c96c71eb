# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Per-channel reductions in float64: the statistics of the forward pass and
the gradient sums of the backward pass.

``moments_*`` return ``sum(x - k[c])`` and ``sum((x - k[c])**2)`` per channel.
With a shift ``k`` close to the data (a value of the channel, or a running
mean shared by every rank) the variance ``(q - s*s/n) / n`` keeps full float64
accuracy even for data like ``1e4 + N(0, 1)``, and the sums can still be added
across processes with one ``Allreduce``.

``grad_sums_*`` return ``sum(dy)`` and ``sum(dy * (x - k[c]))``; with ``k``
the batch mean the second is ``sum(dy * xhat) / invstd``.

Two layouts, no copies: contiguous ``(N, C, S)`` and channels-last ``(M, C)``.
Memory is read in address order.  The work is cut into units by shape alone
and unit partials are added in unit order, so results are bitwise identical
for any thread count.
"""
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from libc.math cimport isfinite
from libc.string cimport memset

from _simd cimport (cbn_row_moments_f, cbn_row_moments_d, cbn_rows_moments_f,
                    cbn_rows_moments_d, cbn_row_grad_sums_f, cbn_row_grad_sums_d,
                    cbn_rows_grad_sums_f, cbn_rows_grad_sums_d, cbn_sample_moments_f,
                    cbn_sample_moments_d, cbn_sample_grad_sums_f, cbn_sample_grad_sums_d)
from _blocks cimport (UNIT_ELEMENTS, MAX_UNITS, SMALL_BATCH, unit_count, mc_reduction_units,
                     ncs_reduction_units,
                     ceil_div, threads_for,
                     check_rows, check_extents)

ctypedef fused floating:
    float
    double

cdef enum Reduction:
    MOMENTS = 0     # sum(a - k), sum((a - k)^2)
    GRAD_SUMS = 1   # sum(a), sum(a * (b - k))


cdef inline void reduce_row(Reduction kind, const floating *a, const floating *b,
                            Py_ssize_t n, double k, double *s, double *q) noexcept nogil:
    if kind == MOMENTS:
        if floating is float:
            cbn_row_moments_f(a, n, k, s, q)
        else:
            cbn_row_moments_d(a, n, k, s, q)
    else:
        if floating is float:
            cbn_row_grad_sums_f(a, b, n, k, s, q)
        else:
            cbn_row_grad_sums_d(a, b, n, k, s, q)


cdef inline void reduce_sample(Reduction kind, const floating *a, Py_ssize_t a_sc,
                               const floating *b, Py_ssize_t b_sc, Py_ssize_t C,
                               Py_ssize_t S, const double *k, double *acc) noexcept nogil:
    """Every channel of one sample, in one call (acc: interleaved (s, q) pairs)."""
    if kind == MOMENTS:
        if floating is float:
            cbn_sample_moments_f(a, a_sc, C, S, k, acc)
        else:
            cbn_sample_moments_d(a, a_sc, C, S, k, acc)
    else:
        if floating is float:
            cbn_sample_grad_sums_f(a, a_sc, b, b_sc, C, S, k, acc)
        else:
            cbn_sample_grad_sums_d(a, a_sc, b, b_sc, C, S, k, acc)


cdef inline void _ncs_chunk(Reduction kind, const floating[:, :, :] a, Py_ssize_t a_sc,
                            const floating[:, :, :] b, Py_ssize_t b_sc, Py_ssize_t j,
                            Py_ssize_t rows_per_unit, const double *k,
                            double *partial) noexcept nogil:
    """Unit ``j`` of an (N, C, S) reduction cut into chunks of the batch: every channel."""
    cdef Py_ssize_t N = a.shape[0], C = a.shape[1], S = a.shape[2], n
    memset(&partial[2 * j * C], 0, 2 * C * sizeof(double))
    if C > 0 and S > 0:
        for n in range(j * rows_per_unit, min(N, (j + 1) * rows_per_unit)):
            reduce_sample(kind, &a[n, 0, 0], a_sc, &b[n, 0, 0], b_sc, C, S, k,
                          &partial[2 * j * C])


cdef inline void _ncs_segment(Reduction kind, const floating[:, :, :] a,
                              const floating[:, :, :] b, Py_ssize_t g, Py_ssize_t segments,
                              Py_ssize_t seg_len, const double *k,
                              double *partial) noexcept nogil:
    """Cell ``g`` of an (N, C, S) reduction cut into row segments: (n, c, segment)."""
    cdef Py_ssize_t C = a.shape[1], S = a.shape[2]
    cdef Py_ssize_t n = g // (C * segments), c = (g // segments) % C
    cdef Py_ssize_t s0 = (g % segments) * seg_len
    cdef Py_ssize_t s1 = min(S, s0 + seg_len)
    partial[2 * g] = 0.0
    partial[2 * g + 1] = 0.0
    if s1 > s0:
        reduce_row(kind, &a[n, c, s0], &b[n, c, s0], s1 - s0, k[c], &partial[2 * g],
                   &partial[2 * g + 1])


cdef inline void _mc_unit(Reduction kind, const floating[:, :] a, Py_ssize_t a_stride,
                          const floating[:, :] b, Py_ssize_t b_stride, Py_ssize_t j,
                          Py_ssize_t rows_per_unit, const double *k,
                          double *partial) noexcept nogil:
    """Unit ``j`` of a channels-last (M, C) reduction: a block of rows, every channel."""
    cdef Py_ssize_t M = a.shape[0], C = a.shape[1]
    cdef double *ps = &partial[2 * j * C]
    cdef double *pq = &partial[2 * j * C + C]
    cdef Py_ssize_t r0 = j * rows_per_unit
    cdef Py_ssize_t rows = min(M, r0 + rows_per_unit) - r0
    memset(ps, 0, 2 * C * sizeof(double))
    if rows > 0 and C > 0:
        if kind == MOMENTS:
            if floating is float:
                cbn_rows_moments_f(&a[r0, 0], rows, a_stride, C, k, ps, pq)
            else:
                cbn_rows_moments_d(&a[r0, 0], rows, a_stride, C, k, ps, pq)
        else:
            if floating is float:
                cbn_rows_grad_sums_f(&a[r0, 0], a_stride, &b[r0, 0], b_stride, rows, C, k,
                                     ps, pq)
            else:
                cbn_rows_grad_sums_d(&a[r0, 0], a_stride, &b[r0, 0], b_stride, rows, C, k,
                                     ps, pq)


cdef int reduce_ncs(Reduction kind, const floating[:, :, :] a, const floating[:, :, :] b,
                    const double[::1] k, double[::1] out_s, double[::1] out_q,
                    int n_threads) except -1:
    cdef Py_ssize_t N = a.shape[0], C = a.shape[1], S = a.shape[2]
    cdef Py_ssize_t units, rows_per_unit, segments, seg_len, cells
    cdef Py_ssize_t j, c, g, base
    cdef double *partial
    cdef int threads = threads_for(N * C * S, n_threads)
    cdef Py_ssize_t a_sc = a.strides[1] // <Py_ssize_t> sizeof(floating)
    cdef Py_ssize_t b_sc = b.strides[1] // <Py_ssize_t> sizeof(floating)
    check_rows(a.strides[2], S, sizeof(floating))
    check_rows(b.strides[2], S, sizeof(floating))
    check_extents(N, b.shape[0], "the second input")
    check_extents(S, b.shape[2], "the second input")
    check_extents(C, b.shape[1], "the second input's channel axis")
    check_extents(C, k.shape[0], "the shift")
    check_extents(C, out_s.shape[0], "the output")
    check_extents(C, out_q.shape[0], "the output")
    if N >= SMALL_BATCH:
        # Units are chunks of the batch; each covers every channel in address order.
        units = ncs_reduction_units(N, C, S)
        rows_per_unit = ceil_div(N, units)
        segments = 1
        seg_len = S
        cells = units * C
    else:
        # Units are segments of single rows; a unit covers one (n, c, segment).
        units = N
        rows_per_unit = 1
        segments = min(max(ceil_div(S, UNIT_ELEMENTS), 1), MAX_UNITS)
        seg_len = ceil_div(S, segments)
        cells = N * C * segments
    partial = <double *> malloc(2 * max(cells, 1) * sizeof(double))
    if partial == NULL:
        raise MemoryError()
    with nogil:
        # (One thread without a parallel region: a region of one thread still costs ~1 us.)
        if N >= SMALL_BATCH and threads == 1:
            for j in range(units):
                _ncs_chunk(kind, a, a_sc, b, b_sc, j, rows_per_unit, &k[0], partial)
        elif N >= SMALL_BATCH:
            for j in prange(units, num_threads=threads, schedule='static'):
                _ncs_chunk(kind, a, a_sc, b, b_sc, j, rows_per_unit, &k[0], partial)
        elif threads == 1:
            for g in range(cells):
                _ncs_segment(kind, a, b, g, segments, seg_len, &k[0], partial)
        else:
            for g in prange(cells, num_threads=threads, schedule='static'):
                _ncs_segment(kind, a, b, g, segments, seg_len, &k[0], partial)
        # Merge in unit order: (chunk or row) outer, segment inner.
        for c in range(C):
            out_s[c] = 0.0
            out_q[c] = 0.0
        for j in range(units):
            for c in range(C):
                for g in range(segments):
                    base = 2 * ((j * C + c) * segments + g)
                    out_s[c] += partial[base]
                    out_q[c] += partial[base + 1]
    free(partial)
    return 0


cdef int reduce_mc(Reduction kind, const floating[:, :] a, const floating[:, :] b,
                   const double[::1] k, double[::1] out_s, double[::1] out_q,
                   int n_threads) except -1:
    cdef Py_ssize_t M = a.shape[0], C = a.shape[1]
    cdef Py_ssize_t units = mc_reduction_units(M, C)
    cdef Py_ssize_t rows_per_unit = ceil_div(M, units)
    cdef Py_ssize_t a_stride = a.strides[0] // sizeof(floating)
    cdef Py_ssize_t b_stride = b.strides[0] // sizeof(floating)
    cdef Py_ssize_t j, c
    cdef double *partial = <double *> malloc(2 * units * max(C, 1) * sizeof(double))
    if partial == NULL:
        raise MemoryError()
    cdef int threads = threads_for(M * C, n_threads)
    check_rows(a.strides[1], C, sizeof(floating))
    check_rows(b.strides[1], C, sizeof(floating))
    check_extents(M, b.shape[0], "the second input")
    check_extents(C, b.shape[1], "the second input's channel axis")
    check_extents(C, k.shape[0], "the shift")
    check_extents(C, out_s.shape[0], "the output")
    check_extents(C, out_q.shape[0], "the output")
    with nogil:
        if threads == 1:  # a parallel region of one thread still costs ~1 us
            for j in range(units):
                _mc_unit(kind, a, a_stride, b, b_stride, j, rows_per_unit, &k[0], partial)
        else:
            for j in prange(units, num_threads=threads, schedule='static'):
                _mc_unit(kind, a, a_stride, b, b_stride, j, rows_per_unit, &k[0], partial)
        for c in range(C):
            out_s[c] = 0.0
            out_q[c] = 0.0
            for j in range(units):
                out_s[c] += partial[2 * j * C + c]
                out_q[c] += partial[2 * j * C + C + c]
    free(partial)
    return 0


def moments_ncs(const floating[:, :, :] x, const double[::1] shift,
                double[::1] out_sum, double[::1] out_sumsq, int n_threads):
    """sum(x - shift[c]) and sum((x - shift[c])**2) per channel of an (N, C, S) array."""
    reduce_ncs(MOMENTS, x, x, shift, out_sum, out_sumsq, n_threads)


def moments_mc(const floating[:, :] x, const double[::1] shift,
               double[::1] out_sum, double[::1] out_sumsq, int n_threads):
    """sum(x - shift[c]) and sum((x - shift[c])**2) per channel of an (M, C) array."""
    reduce_mc(MOMENTS, x, x, shift, out_sum, out_sumsq, n_threads)


def grad_sums_ncs(const floating[:, :, :] dy, const floating[:, :, :] x,
                  const double[::1] center, double[::1] out_sum_dy,
                  double[::1] out_sum_dy_xc, int n_threads):
    """sum(dy) and sum(dy * (x - center[c])) per channel of (N, C, S) arrays."""
    reduce_ncs(GRAD_SUMS, dy, x, center, out_sum_dy, out_sum_dy_xc, n_threads)


def grad_sums_mc(const floating[:, :] dy, const floating[:, :] x,
                 const double[::1] center, double[::1] out_sum_dy,
                 double[::1] out_sum_dy_xc, int n_threads):
    """sum(dy) and sum(dy * (x - center[c])) per channel of (M, C) arrays."""
    reduce_mc(GRAD_SUMS, dy, x, center, out_sum_dy, out_sum_dy_xc, n_threads)


def first_values_ncs(const floating[:, :, :] x, double[::1] out):
    """out[c] = x[0, c, 0] as float64 (the shift of the sums); inf and NaN become 0.

    An infinite shift would turn a channel's mean into NaN where PyTorch gives
    inf.  One compiled call: the NumPy version took three.
    """
    cdef Py_ssize_t C = x.shape[1], c
    check_extents(C, out.shape[0], "the output")
    if x.shape[0] == 0 or x.shape[2] == 0:
        out[:] = 0.0
        return
    for c in range(C):
        out[c] = x[0, c, 0] if isfinite(x[0, c, 0]) else 0.0


def first_values_mc(const floating[:, :] x, double[::1] out):
    """out[c] = x[0, c] as float64; inf and NaN become 0 (see first_values_ncs)."""
    cdef Py_ssize_t C = x.shape[1], c
    check_extents(C, out.shape[0], "the output")
    if x.shape[0] == 0:
        out[:] = 0.0
        return
    for c in range(C):
        out[c] = x[0, c] if isfinite(x[0, c]) else 0.0
