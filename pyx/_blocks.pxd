# How reductions are cut into work units.  The cut depends only on the shape,
# never on the thread count, and partial results are merged in unit order:
# so every result is bitwise identical for any number of threads.

# Elements per work unit (about 128 KiB of float32: a unit's rows stay in L2).
cdef enum:
    UNIT_ELEMENTS = 32768
    # At most this many partial results per channel: extra memory stays O(C).
    MAX_UNITS = 64
    # Below this many elements, one thread: a parallel region costs more.
    PARALLEL_MIN = 32768
    # Below this batch size an (N, C, S) reduction cuts single rows into
    # segments instead of cutting the batch into chunks, so that small
    # batches still spread over the threads.
    SMALL_BATCH = 8
    # A channels-last reduction unit spans at least this many rows: each unit
    # keeps 2 * C partial sums, and with C = 2048 and 25-row units those
    # partials were 2 MB of extra traffic next to a 12.8 MB input.
    MC_UNIT_MIN_ROWS = 128


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t unit_count(Py_ssize_t rows, Py_ssize_t row_length) noexcept nogil:
    """Work units for `rows` rows of `row_length` elements (1 <= units <= MAX_UNITS)."""
    cdef Py_ssize_t units = ceil_div(rows * row_length, UNIT_ELEMENTS)
    if units > MAX_UNITS:
        units = MAX_UNITS
    if units > rows:
        units = rows
    if units < 1:
        units = 1
    return units


cdef inline Py_ssize_t mc_reduction_units(Py_ssize_t rows, Py_ssize_t C) noexcept nogil:
    """Work units of a channels-last (rows, C) reduction (by shape alone)."""
    cdef Py_ssize_t units = unit_count(rows, C)
    cdef Py_ssize_t cap = rows // MC_UNIT_MIN_ROWS
    if units > cap:
        units = cap if cap > 1 else 1
    return units


cdef inline Py_ssize_t ncs_reduction_units(Py_ssize_t N, Py_ssize_t C,
                                           Py_ssize_t S) noexcept nogil:
    """Work units (chunks of the batch) of an (N, C, S) reduction, N >= SMALL_BATCH:
    like channels-last, each unit covers at least MC_UNIT_MIN_ROWS values per channel."""
    cdef Py_ssize_t units = unit_count(N, C * S)
    cdef Py_ssize_t cap = N * S // MC_UNIT_MIN_ROWS
    if units > cap:
        units = cap if cap > 1 else 1
    return units


cdef inline int threads_for(Py_ssize_t elements, int n_threads) noexcept nogil:
    return 1 if elements < PARALLEL_MIN else n_threads


cdef inline int check_rows(Py_ssize_t last_stride, Py_ssize_t last_extent,
                           Py_ssize_t itemsize) except -1:
    """The vectorised loops walk the last axis with unit stride: enforce it."""
    if last_extent > 1 and last_stride != itemsize:
        raise ValueError("cbn kernels need arrays whose last axis is contiguous")
    return 0


cdef inline int check_extents(Py_ssize_t expected, Py_ssize_t got, str what) except -1:
    if got != expected:
        raise ValueError(f"cbn kernel: {what} has extent {got}, expected {expected}")
    return 0


cdef inline bint per_channel(value, Py_ssize_t C, str name, double absent,
                             double *out) except -1:
    """An optional (C,) array such as the weight, as float64 into ``out``.

    None fills ``out`` with ``absent`` (1.0 for a weight; -0.0 for a bias,
    since ``v + -0.0 == v`` bitwise); a contiguous float32/float64 array is
    copied.  False for anything else (``out`` untouched: the caller computes
    in NumPy); a wrong length raises ValueError naming it.
    """
    cdef const double[::1] v64
    cdef const float[::1] v32
    cdef Py_ssize_t c
    if value is None:
        for c in range(C):
            out[c] = absent
        return True
    if value.dtype.char not in "fd" or not value.flags.c_contiguous or value.ndim != 1:
        return False
    if value.shape[0] != C:
        raise ValueError(f"cbn kernel: {name} has extent {value.shape[0]}, expected {C}")
    if value.dtype.char == "d":
        v64 = value
        for c in range(C):
            out[c] = v64[c]
    else:
        v32 = value
        for c in range(C):
            out[c] = v32[c]
    return True
