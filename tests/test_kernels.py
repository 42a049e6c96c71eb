"""The compiled kernels against float64 NumPy, over a seeded grid.

Each kernel is called on (N, C, S) arrays ("ncs", the last axis contiguous, the
first two possibly strided) and on channels-last (M, C) arrays ("mc", rows
possibly strided, negative strides included).  Strided views are cut from a
larger base array filled with NaN, so a kernel that reads outside the view
produces NaN and fails; output views are cut from a base filled with a sentinel,
so a kernel that writes outside the view fails as well.

Tolerances are bounds, not guesses: an element or a sum of terms t_i may be off by
``tol * sum(|t_i|)``, which is what rounding can do when terms cancel.
"""

import numpy as np
import pytest

import cbn
from cbn import _backward, _normalize, _stats, _threads

DTYPES = [np.float32, np.float64]
# Elementwise outputs carry the rounding of the input dtype; sums are float64.
ELEMENTWISE_TOL = {np.float32: 1e-5, np.float64: 1e-12}
SUM_TOL = 1e-12
SENTINEL = -12345.0

# A seeded grid of (N, C, S) shapes in N 1..7, C 1..9, S 1..50, its corners,
# and a few larger ones.
_grid_rng = np.random.default_rng(20240601)
SHAPES = sorted(
    {
        (int(_grid_rng.integers(1, 8)), int(_grid_rng.integers(1, 10)), int(_grid_rng.integers(1, 51)))
        for _ in range(14)
    }
    | {(1, 1, 1), (7, 9, 50), (1, 9, 1), (7, 1, 1), (1, 1, 50)}
    | {(3, 5, 1000), (2, 64, 33), (5, 2, 4099)}
    # channels-last blocks of 64 and 16 channels plus a remainder, over more
    # than one block of 64 rows
    | {(3, 16, 70), (2, 100, 40), (1, 131, 130), (4, 80, 3)}
    # batches of 8 or more: (N, C, S) reductions go a sample (every channel) per
    # call, elementwise kernels a range of rows per call; S = 49 as in ResNet
    | {(8, 3, 49), (9, 5, 7), (12, 70, 3)}
    # channels-last register blocks with rows prefetched ahead (C < 512), and
    # from 512 channels rows read in groups of 8 (+ remainder)
    | {(2, 300, 13), (5, 260, 9), (2, 520, 13), (3, 600, 3)}
    # streamed rows: unaligned heads and tails around whole 64-byte lines
    | {(2, 3, 77), (3, 37, 5)}
)

NCS_LAYOUTS = ["contiguous", "n_strided", "c_strided", "n_reversed"]
MC_LAYOUTS = ["contiguous", "m_strided", "m_reversed"]
FAMILY_LAYOUTS = [("ncs", layout) for layout in NCS_LAYOUTS] + [
    ("mc", layout) for layout in MC_LAYOUTS
]

GRID = [
    pytest.param(family, layout, shape, dtype, n_threads,
                 id=f"{family}-{layout}-{'x'.join(map(str, shape))}-{np.dtype(dtype).name}-t{n_threads}")
    for family, layout in FAMILY_LAYOUTS
    for shape in SHAPES
    for dtype in DTYPES
    for n_threads in (1, 2)
]


# --------------------------------------------------------------------------- helpers


def logical_shape(family, shape):
    n, c, s = shape
    return (n, c, s) if family == "ncs" else (n * s, c)


def layout_view(family, layout, shape, dtype, fill):
    """(base, view): a view of the logical shape laid out as `layout` in a filled base."""
    shape = logical_shape(family, shape)
    if layout == "contiguous":
        base_shape = shape
    elif layout in ("n_strided", "m_strided"):
        base_shape = (2 * shape[0],) + shape[1:]
    elif layout in ("n_reversed", "m_reversed"):
        base_shape = shape
    elif layout == "c_strided" and family == "ncs":
        base_shape = (shape[0], 2 * shape[1], shape[2])
    else:
        raise AssertionError((family, layout))
    base = np.full(base_shape, fill, dtype=dtype)
    return base, _same_view(base, family, layout)


def _same_view(base, family, layout):
    if layout == "contiguous":
        return base
    if layout in ("n_strided", "m_strided"):
        return base[::2]
    if layout in ("n_reversed", "m_reversed"):
        return base[::-1]  # a negative stride along N (rows for mc)
    return base[:, ::2]


def input_array(rng, family, layout, shape, dtype, offset=None):
    """Data with per-channel offsets and spreads, in the given layout.

    Returns (base, view); everything of base outside view is NaN.
    """
    base, view = layout_view(family, layout, shape, dtype, np.nan)
    channels = view.shape[1]
    if offset is None:
        offset = rng.uniform(-5, 5, channels)
    spread = rng.uniform(0.1, 3, channels)
    bshape = (1, channels, 1) if family == "ncs" else (1, channels)
    values = offset.reshape(bshape) + spread.reshape(bshape) * rng.standard_normal(view.shape)
    view[...] = values.astype(dtype)
    assert view.strides[-1] == np.dtype(dtype).itemsize
    return base, view


def output_array(family, layout, shape, dtype):
    return layout_view(family, layout, shape, dtype, SENTINEL)


def channel_vector(rng, channels, dtype, low=-2.0, high=2.0):
    return rng.uniform(low, high, channels).astype(dtype)


def reduce_axes(family):
    return (0, 2) if family == "ncs" else (0,)


def broadcast(v, family):
    v = np.asarray(v, dtype=np.float64)
    return v.reshape(1, -1, 1) if family == "ncs" else v.reshape(1, -1)


def assert_sums_close(actual, terms, family, what):
    """actual[c] == sum of terms over the reduced axes, to float64 accuracy."""
    axes = reduce_axes(family)
    expected = terms.sum(axis=axes)
    bound = SUM_TOL * np.abs(terms).sum(axis=axes) + 1e-300
    error = np.abs(actual - expected)
    assert actual.dtype == np.float64
    assert np.all(error <= bound), (
        f"{what}: max error/bound {np.max(error / bound):.3g}\n"
        f"actual={actual}\nexpected={expected}"
    )


def assert_elementwise_close(actual, expected, magnitude, dtype, what):
    """|actual - expected| <= tol * magnitude elementwise (magnitude: sum of |terms|)."""
    tol = ELEMENTWISE_TOL[dtype]
    bound = tol * magnitude + np.finfo(dtype).tiny
    error = np.abs(actual.astype(np.float64) - expected)
    assert actual.dtype == dtype
    assert np.all(error <= bound), f"{what}: max error/bound {np.max(error / bound):.3g}"


def assert_unchanged(before, after, what):
    assert np.array_equal(before, after, equal_nan=True), f"{what} was modified"


def kernel(module, name, family):
    return getattr(module, f"{name}_{family}")


# --------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("family, layout, shape, dtype, n_threads", GRID)
def test_moments(rng, family, layout, shape, dtype, n_threads):
    base, x = input_array(rng, family, layout, shape, dtype)
    channels = x.shape[1]
    shift = rng.uniform(-5, 5, channels)
    out_sum = np.full(channels, np.nan)  # "writes": must not accumulate into it
    out_sumsq = np.full(channels, np.nan)
    base_before, shift_before = base.copy(), shift.copy()

    kernel(_stats, "moments", family)(x, shift, out_sum, out_sumsq, n_threads)

    centred = x.astype(np.float64) - broadcast(shift, family)
    assert_sums_close(out_sum, centred, family, "sum")
    assert_sums_close(out_sumsq, centred * centred, family, "sum of squares")
    assert_unchanged(base_before, base, "x")
    assert_unchanged(shift_before, shift, "shift")


@pytest.mark.parametrize("stream", [False, True], ids=["stores", "streamed"])
@pytest.mark.parametrize("family, layout, shape, dtype, n_threads", GRID)
def test_scale_shift(rng, family, layout, shape, dtype, n_threads, stream):
    """Ordinary and streaming stores (cbn_stream.h; the ordinary loop where
    the CPU has no AVX-512) against the float64 twin, writing nothing else."""
    base, x = input_array(rng, family, layout, shape, dtype)
    channels = x.shape[1]
    center = channel_vector(rng, channels, dtype, -5, 5)
    scale = channel_vector(rng, channels, dtype)
    shift = channel_vector(rng, channels, dtype, -10, 10)
    out_base, out = output_array(family, layout, shape, dtype)
    before = [a.copy() for a in (base, center, scale, shift)]

    kernel(_normalize, "scale_shift", family)(x, center, scale, shift, out, n_threads, stream)

    x64 = x.astype(np.float64)
    centred = x64 - broadcast(center, family)
    product = centred * broadcast(scale, family)
    expected = product + broadcast(shift, family)
    magnitude = np.abs(product) + np.abs(broadcast(shift, family))
    assert_elementwise_close(out, expected, magnitude, dtype, "out")
    outside = np.ones(out_base.shape, bool)
    _same_view(outside, family, layout)[...] = False
    assert np.all(out_base[outside] == SENTINEL), "wrote outside the output view"
    for b, a, name in zip(before, (base, center, scale, shift),
                          ("x", "center", "scale", "shift")):
        assert_unchanged(b, a, name)


@pytest.mark.parametrize("family, layout, shape, dtype, n_threads", GRID)
def test_grad_sums(rng, family, layout, shape, dtype, n_threads):
    base, x = input_array(rng, family, layout, shape, dtype)
    dy_base, dy = input_array(rng, family, layout, shape, dtype, offset=np.zeros(x.shape[1]))
    channels = x.shape[1]
    center = rng.uniform(-5, 5, channels)
    out_sum_dy = np.full(channels, np.nan)
    out_sum_dy_xc = np.full(channels, np.nan)
    before = [a.copy() for a in (base, dy_base, center)]

    kernel(_stats, "grad_sums", family)(dy, x, center, out_sum_dy, out_sum_dy_xc, n_threads)

    dy64 = dy.astype(np.float64)
    xc = x.astype(np.float64) - broadcast(center, family)
    assert_sums_close(out_sum_dy, dy64, family, "sum of dy")
    assert_sums_close(out_sum_dy_xc, dy64 * xc, family, "sum of dy * (x - center)")
    for b, a, name in zip(before, (base, dy_base, center), ("x", "dy", "center")):
        assert_unchanged(b, a, name)


@pytest.mark.parametrize("stream", [False, True], ids=["stores", "streamed"])
@pytest.mark.parametrize("family, layout, shape, dtype, n_threads", GRID)
def test_grad_input(rng, family, layout, shape, dtype, n_threads, stream):
    base, x = input_array(rng, family, layout, shape, dtype)
    dy_base, dy = input_array(rng, family, layout, shape, dtype, offset=np.zeros(x.shape[1]))
    channels = x.shape[1]
    a = channel_vector(rng, channels, dtype)
    b = channel_vector(rng, channels, dtype)
    m = channel_vector(rng, channels, dtype, -5, 5)
    c = channel_vector(rng, channels, dtype)
    out_base, out = output_array(family, layout, shape, dtype)
    inputs = (base, dy_base, a, b, m, c)
    before = [v.copy() for v in inputs]

    kernel(_backward, "grad_input", family)(dy, x, a, b, m, c, out, n_threads, stream)

    a64, b64, m64, c64 = (broadcast(v, family) for v in (a, b, m, c))
    dy64, x64 = dy.astype(np.float64), x.astype(np.float64)
    expected = a64 * dy64 + b64 * (x64 - m64) + c64
    magnitude = np.abs(a64 * dy64) + np.abs(b64) * (np.abs(x64) + np.abs(m64)) + np.abs(c64)
    assert_elementwise_close(out, expected, magnitude, dtype, "out")
    outside = np.ones(out_base.shape, bool)
    _same_view(outside, family, layout)[...] = False
    assert np.all(out_base[outside] == SENTINEL), "wrote outside the output view"
    for bef, aft, name in zip(before, inputs, ("x", "dy", "a", "b", "m", "c")):
        assert_unchanged(bef, aft, name)


# --------------------------------------------------------------------------- call helpers


def run_all_kernels(family, x, dy, n_threads, rng_seed=7):
    """Call every kernel of a family on (x, dy); return all outputs by name."""
    rng = np.random.default_rng(rng_seed)
    dtype = x.dtype.type
    channels = x.shape[1]
    shift64 = rng.uniform(-1, 1, channels)
    scale, shift = channel_vector(rng, channels, dtype), channel_vector(rng, channels, dtype)
    a, b, m, c = (channel_vector(rng, channels, dtype) for _ in range(4))
    for v in (shift64, scale, shift, a, b, m, c):
        v.setflags(write=False)

    results = {}
    out_sum, out_sumsq = np.empty(channels), np.empty(channels)
    kernel(_stats, "moments", family)(x, shift64, out_sum, out_sumsq, n_threads)
    results["moments"] = (out_sum, out_sumsq)

    out = np.empty(x.shape, dtype)
    kernel(_normalize, "scale_shift", family)(x, m, scale, shift, out, n_threads)
    results["scale_shift"] = out

    sum_dy, sum_dy_xc = np.empty(channels), np.empty(channels)
    kernel(_stats, "grad_sums", family)(dy, x, shift64, sum_dy, sum_dy_xc, n_threads)
    results["grad_sums"] = (sum_dy, sum_dy_xc)

    grad = np.empty(x.shape, dtype)
    kernel(_backward, "grad_input", family)(dy, x, a, b, m, c, grad, n_threads)
    results["grad_input"] = grad
    return results


def assert_results_identical(first, second):
    for name in first:
        for u, v in zip(_flatten(first[name]), _flatten(second[name])):
            assert u.dtype == v.dtype and u.shape == v.shape, name
            assert u.tobytes() == v.tobytes(), f"{name} differs bitwise"


def _flatten(result):
    return result if isinstance(result, tuple) else (result,)


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "family, shape",
    [("ncs", (8, 16, 5000)), ("mc", (20000, 16)),
     # one channel or one sample: the work can only be split along the reduction
     ("ncs", (64, 1, 5000)), ("ncs", (1, 3, 200000)), ("mc", (100000, 1)), ("mc", (7, 4096)),
     ("mc", (601, 300))],
)
@pytest.mark.parametrize("n_threads", [2, 3])
def test_results_are_bitwise_identical_for_any_thread_count(family, shape, dtype, n_threads, rng):
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    serial = run_all_kernels(family, x, dy, n_threads=1)
    parallel = run_all_kernels(family, x, dy, n_threads=n_threads)
    assert_results_identical(serial, parallel)


@pytest.mark.parametrize("family, shape", [("ncs", (1, 1, 1)), ("ncs", (2, 3, 5)), ("ncs", (1, 9, 50)),
                                           ("mc", (1, 1)), ("mc", (3, 7)), ("mc", (50, 2))])
def test_more_threads_than_work(rng, family, shape):
    x = (1.0 + rng.standard_normal(shape)).astype(np.float64)
    dy = rng.standard_normal(shape)
    assert_results_identical(run_all_kernels(family, x, dy, n_threads=1),
                             run_all_kernels(family, x, dy, n_threads=16))


def test_openmp_enabled_is_a_bool():
    assert isinstance(_threads.openmp_enabled(), bool)


def test_set_num_threads_round_trips():
    original = cbn.get_num_threads()
    assert isinstance(original, int) and original >= 1
    try:
        for n in (1, 2, 3):
            cbn.set_num_threads(n)
            # A build without OpenMP runs every kernel on one thread.
            assert cbn.get_num_threads() == (n if _threads.openmp_enabled() else 1)
    finally:
        cbn.set_num_threads(original)
    assert cbn.get_num_threads() == original


# --------------------------------------------------------------------------- read-only inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family, layout", FAMILY_LAYOUTS)
def test_read_only_inputs_are_accepted(rng, family, layout, dtype):
    shape = (3, 5, 17)
    _, x = input_array(rng, family, layout, shape, dtype)
    _, dy = input_array(rng, family, layout, shape, dtype, offset=np.zeros(5))
    writable = run_all_kernels(family, x, dy, n_threads=2)
    x.setflags(write=False)
    dy.setflags(write=False)
    read_only = run_all_kernels(family, x, dy, n_threads=2)
    assert_results_identical(writable, read_only)


# --------------------------------------------------------------------------- accuracy


def test_variance_of_offset_data_is_accurate():
    """float32 data 1e4 + N(0, 1): naive float32 sums lose every digit here."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((4, 3, 25088))).astype(np.float32)
    layer = cbn.BatchNorm1d(3, momentum=1.0)  # running stats = this batch's stats
    layer(x)

    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    unbiased_var = ((x64 - mean[None, :, None]) ** 2).sum(axis=(0, 2)) / (x64[:, 0].size - 1)
    relative_error = np.abs(layer.running_var.astype(np.float64) - unbiased_var) / unbiased_var
    assert np.all(relative_error <= 1e-5), relative_error
    assert np.allclose(layer.running_mean, mean, rtol=1e-7, atol=0)


# --------------------------------------------------------------------------- coefficients


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [None, np.float32, np.float64])
@pytest.mark.parametrize("bias_dtype", [None, np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 7, 64, 513])
def test_coefficients(rng, dtype, weight_dtype, bias_dtype, channels):
    """invstd, center, scale, shift against the float64 formulas (NumPy, one op at a time)."""
    mean = rng.uniform(-1e4, 1e4, channels)
    var = rng.uniform(0.0, 4.0, channels)
    weight = None if weight_dtype is None else rng.uniform(-2, 2, channels).astype(weight_dtype)
    bias = None if bias_dtype is None else rng.uniform(-2, 2, channels).astype(bias_dtype)
    eps = 1e-5
    invstd = np.full(channels, np.nan)
    center, scale, shift = (np.full(channels, np.nan, dtype) for _ in range(3))
    name = "float" if dtype == np.float32 else "double"
    assert _normalize.coefficients[name](mean, var, weight, bias, eps, invstd, center, scale,
                                         shift)

    expected_invstd = 1.0 / np.sqrt(var + eps)
    full_scale = expected_invstd * (1.0 if weight is None else weight.astype(np.float64))
    expected_center = mean.astype(dtype)
    rest = -(mean - expected_center.astype(np.float64)) * full_scale
    expected_shift = rest + (0.0 if bias is None else bias.astype(np.float64))
    assert np.array_equal(invstd, expected_invstd)  # both correctly rounded
    assert np.array_equal(center, expected_center)
    assert np.array_equal(scale, full_scale.astype(dtype))
    # one rounding to dtype, after at most an FMA's worth of float64 rounding
    eps_t = np.finfo(dtype).eps
    bound = eps_t * np.abs(expected_shift) + 4 * np.finfo(np.float64).eps * (
        np.abs(rest) + (0.0 if bias is None else np.abs(bias)))
    assert np.all(np.abs(shift - expected_shift) <= bound + np.finfo(dtype).tiny)


def test_coefficients_decline_other_weight_dtypes():
    c = 4
    out = [np.empty(c), np.empty(c, np.float32), np.empty(c, np.float32), np.empty(c, np.float32)]
    assert not _normalize.coefficients["float"](np.zeros(c), np.ones(c), np.ones(c, np.float16),
                                                None, 1e-5, *out)
    with pytest.raises(ValueError, match="weight"):
        _normalize.coefficients["float"](np.zeros(c), np.ones(c), np.ones(c + 1), None, 1e-5, *out)


# --------------------------------------------------------------------------- small calls


def test_small_calls_stay_on_one_thread_only_when_idle_threads_sleep():
    from cbn import _layout
    assert _layout._parallel_min_elements("PASSIVE") == 1 << 19
    assert _layout._parallel_min_elements(" passive") == 1 << 19
    for policy in ("", "ACTIVE", "active"):
        assert _layout._parallel_min_elements(policy) == 0


def test_small_calls_give_the_same_result_on_one_thread(rng, monkeypatch):
    from cbn import _layout
    x = rng.standard_normal((4, 8, 300)).astype(np.float32)
    layer = cbn.BatchNorm1d(8)
    original = cbn.get_num_threads()
    cbn.set_num_threads(2)
    try:
        monkeypatch.setattr(_layout, "_PARALLEL_MIN", 0)
        parallel = layer(x).copy()
        monkeypatch.setattr(_layout, "_PARALLEL_MIN", 1 << 30)
        assert _layout._threads(x, 2) == 1
        assert np.array_equal(layer(x), parallel)
    finally:
        cbn.set_num_threads(original)


# --------------------------------------------------------------------------- per-channel helpers


@pytest.mark.parametrize("family", ["ncs", "mc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_first_values(rng, family, dtype):
    """The shift of the sums: x[0, c(, 0)] as float64, inf and NaN as 0."""
    _, view = input_array(rng, family, "n_strided" if family == "ncs" else "m_strided",
                          (3, 6, 5), dtype)
    first = view[0, :, 0] if family == "ncs" else view[0]
    first[1], first[3], first[4] = np.inf, -np.inf, np.nan
    out = np.full(6, SENTINEL)
    kernel(_stats, "first_values", family)(view, out)
    expected = np.where(np.isfinite(first), first.astype(np.float64), 0.0)
    assert np.array_equal(out, expected)
    assert out[0] == float(first[0]) and out[1] == 0.0


def _numpy_mean_var(count, s, q, shift):
    with np.errstate(invalid="ignore", over="ignore"):
        mean = shift + s / count
        var = np.maximum((q - s * (s / count)) / count, 0.0)
    return mean, var


def test_mean_var_matches_the_numpy_formulas(rng):
    c = 37
    count = 1234
    shift = rng.uniform(-1e4, 1e4, c)
    s = rng.standard_normal(c) * 100
    q = s * s / count + rng.uniform(0, 50, c)
    q[3] = 0.0           # a negative variance from rounding clips to 0
    s[5], q[6] = np.nan, np.inf
    s[7] = np.inf
    mean, var = np.empty(c), np.empty(c)
    _normalize.mean_var(count, s, q, shift, mean, var)
    expected_mean, expected_var = _numpy_mean_var(count, s, q, shift)
    assert np.array_equal(mean, expected_mean, equal_nan=True)
    assert np.array_equal(var, expected_var, equal_nan=True)
    assert var[3] == 0.0 and np.isnan(var[5]) and var[6] == np.inf


def test_mean_var_falls_back_to_numpy_for_other_arrays(rng):
    from cbn import _layout
    s, q = rng.standard_normal(5), rng.uniform(1, 2, 5)
    shift32 = rng.standard_normal(5).astype(np.float32)        # not float64
    mean, var = _layout.mean_var(10, s[::1], q, shift32)
    expected = _numpy_mean_var(10, s, q, shift32.astype(np.float64))
    assert np.array_equal(mean, expected[0]) and np.array_equal(var, expected[1])
    strided = np.repeat(s, 2)[::2]                              # not contiguous
    assert np.array_equal(_layout.mean_var(10, strided, q, shift32)[0], expected[0])


def _numpy_grad_coefficients(sum_dy, sum_dy_xc, invstd, mean, weight, count, dtype):
    a = invstd if weight is None else weight * invstd
    b = -a * (sum_dy_xc * invstd * invstd / count)
    m = mean.astype(dtype)
    c = -a * sum_dy / count - b * (mean - m)
    return a.astype(dtype), b.astype(dtype), m, c.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [None, np.float32, np.float64, np.float16])
def test_grad_coefficients_match_the_numpy_formulas(rng, dtype, weight_dtype):
    """a, b, m, c of dx = a * dy + b * (x - m) + c: compiled (or NumPy for float16 weights)."""
    from cbn import _layout
    ch, count = 19, 4096
    sum_dy, sum_dy_xc = rng.standard_normal(ch) * 50, rng.standard_normal(ch) * 50
    invstd, mean = rng.uniform(0.1, 3, ch), rng.uniform(-1e4, 1e4, ch)
    weight = None if weight_dtype is None else rng.uniform(-2, 2, ch).astype(weight_dtype)
    got = _layout.grad_coefficients(sum_dy, sum_dy_xc, invstd, mean, weight, count,
                                    np.dtype(dtype))
    expected = _numpy_grad_coefficients(sum_dy, sum_dy_xc, invstd, mean, weight, count, dtype)
    for name, g, e in zip("abmc", got, expected):
        assert g.dtype == dtype, name
        assert np.array_equal(g, e), name
    if weight_dtype is not None and weight_dtype != np.float16:
        name = "float" if dtype == np.float32 else "double"
        assert _backward.coefficients[name](sum_dy, sum_dy_xc, invstd, mean, weight,
                                            float(count), *(np.empty(ch, dtype) for _ in "abmc"))


@pytest.mark.skipif(not _normalize.STREAMING_STORES, reason="no streaming stores on this CPU")
@pytest.mark.parametrize("family", ["ncs", "mc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_output_is_bitwise_the_ordinary_one(rng, family, dtype):
    """Streaming is chosen by output size: it must not change a single bit
    (y of scale_shift, dx of grad_input)."""
    shape = (4, 33, 201) if family == "ncs" else (3, 67, 101)
    _, x = input_array(rng, family, "contiguous", shape, dtype)
    coefficients = [channel_vector(rng, x.shape[1], dtype) for _ in range(3)]
    outs = [np.full(x.shape, SENTINEL, dtype) for _ in range(2)]
    for out, stream in zip(outs, (False, True)):
        kernel(_normalize, "scale_shift", family)(x, *coefficients, out, 2, stream)
    assert np.array_equal(outs[0], outs[1])
    _, dy = input_array(rng, family, "contiguous", shape, dtype)
    coefficients.append(channel_vector(rng, x.shape[1], dtype))
    for out, stream in zip(outs, (False, True)):
        kernel(_backward, "grad_input", family)(dy, x, *coefficients, out, 2, stream)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_running_rounds_as_numpy(rng, dtype):
    """The compiled blend of the running statistics, bitwise NumPy's two lines."""
    from cbn import _layout
    c, count, factor = 41, 77, 0.1
    mean, var = rng.uniform(-1e4, 1e4, c), rng.uniform(0, 10, c)
    mean[3], var[4] = np.nan, np.inf
    start_mean, start_var = (rng.uniform(-5, 5, c).astype(dtype) for _ in range(2))
    expected_mean, expected_var = start_mean.copy(), start_var.copy()
    with np.errstate(invalid="ignore", over="ignore"):
        expected_mean[...] = (1.0 - factor) * expected_mean + factor * mean
        expected_var[...] = (1.0 - factor) * expected_var + factor * (var * (count / (count - 1.0)))
    running_mean, running_var = start_mean.copy(), start_var.copy()
    name = "float" if dtype == np.float32 else "double"
    _normalize.update_running[name](running_mean, running_var, mean, var, count, factor)
    assert np.array_equal(running_mean, expected_mean, equal_nan=True)
    assert np.array_equal(running_var, expected_var, equal_nan=True)
    # the dispatcher: compiled, or NumPy for what the kernel does not take
    for rm, rv, f in ((start_mean.copy(), start_var.copy(), factor),
                      (start_mean.copy(), start_var.copy(), np.float64(factor)),
                      (np.repeat(start_mean, 2)[::2], np.repeat(start_var, 2)[::2], factor)):
        _layout.update_running(rm, rv, mean, var, count, f)
        with np.errstate(invalid="ignore", over="ignore"):
            em = (1.0 - f) * start_mean + f * mean
            ev = (1.0 - f) * start_var + f * (var * (count / (count - 1.0)))
        assert np.array_equal(rm, em.astype(dtype), equal_nan=True)
        assert np.array_equal(rv, ev.astype(dtype), equal_nan=True)


def test_grad_coefficients_decline_other_weight_dtypes():
    c = 4
    sums = [np.ones(c) for _ in range(4)]
    out = [np.empty(c, np.float32) for _ in range(4)]
    assert not _backward.coefficients["float"](*sums, np.ones(c, np.float16), 10.0, *out)
    assert not _backward.coefficients["float"](*sums, np.ones((c, 1)), 10.0, *out)
    with pytest.raises(ValueError, match="weight"):
        _backward.coefficients["float"](*sums, np.ones(c + 1), 10.0, *out)
