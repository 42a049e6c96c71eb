"""cbn.BatchNorm1d/2d/3d against the float64 twin (tests/twin.py).

Layers are checked with non-trivial parameters and running statistics, over
several steps, in the four (training, track_running_stats) states, for every
memory layout the API promises to accept; then state handling, backward, and
bad input (each error leaves the layer's state exactly as it was).
"""

import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cbn
from twin import make_input, twin_backward, twin_batch_norm

# Tolerances against the float64 twin, relative to the largest term of the
# computation (see `output_scale`, `dx_scale`; default: the largest |expected|).
# A float32 result carries a few roundings of 6e-8 of those terms; float16 output
# is checked by `assert_rounded_once_to_float16`.
TOL = {np.float32: 4e-6, np.float64: 1e-11}

# (class, input shape) for every input rank each class accepts.
CASES = [
    pytest.param(cbn.BatchNorm1d, (6, 3), id="1d-NC"),
    pytest.param(cbn.BatchNorm1d, (5, 4, 7), id="1d-NCL"),
    pytest.param(cbn.BatchNorm2d, (3, 4, 5, 6), id="2d"),
    pytest.param(cbn.BatchNorm2d, (2, 3, 1, 7), id="2d-H1"),
    pytest.param(cbn.BatchNorm3d, (2, 3, 4, 2, 3), id="3d"),
]
CLASS_FOR_RANK = {2: cbn.BatchNorm1d, 3: cbn.BatchNorm1d, 4: cbn.BatchNorm2d, 5: cbn.BatchNorm3d}
SHAPE_FOR_CLASS = {cbn.BatchNorm1d: (2, 3), cbn.BatchNorm2d: (2, 3, 2, 2), cbn.BatchNorm3d: (2, 3, 2, 2, 2)}
MODES = [
    pytest.param(True, True, id="train-track"),
    pytest.param(True, False, id="train-notrack"),
    pytest.param(False, True, id="eval-track"),
    pytest.param(False, False, id="eval-notrack"),
]
LAYOUTS = [
    "contiguous",
    "channels_last",
    "fortran",
    "reversed",
    "last_axis_strided",
    "channel_strided",
    "read_only",
]


def with_layouts(cases, layouts):
    """(class, shape, layout) params; channels-last needs a spatial axis."""
    return [
        pytest.param(*case.values, layout, id=f"{case.id}-{layout}")
        for case in cases
        for layout in layouts
        if not (layout == "channels_last" and len(case.values[1]) < 3)
    ]


# --------------------------------------------------------------------------- helpers


def arrange(x, layout):
    """The same values as x, in the given memory layout."""
    if layout == "contiguous":
        return np.ascontiguousarray(x)
    if layout == "channels_last":
        # (N, C, ...) view of a C-contiguous (N, ..., C) array.
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "reversed":
        return np.ascontiguousarray(x[::-1])[::-1]
    if layout == "last_axis_strided":
        base = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        base[..., ::2] = x
        return base[..., ::2]
    if layout == "channel_strided":
        base = np.zeros((x.shape[0], 2 * x.shape[1]) + x.shape[2:], x.dtype)
        base[:, ::2] = x
        return base[:, ::2]
    if layout == "read_only":
        y = x.copy()
        y.setflags(write=False)
        return y
    raise AssertionError(layout)


def is_channels_last(a):
    return np.moveaxis(a, 1, -1).flags.c_contiguous


def make_layer(cls, channels, rng, dtype=np.float32, **kwargs):
    """A layer whose parameters and running statistics are not the defaults."""
    layer = cls(channels, dtype=dtype, **kwargs)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)
        layer.bias[...] = rng.uniform(-1, 1, channels)
    if layer.track_running_stats:
        layer.running_mean[...] = rng.uniform(-1, 1, channels)
        layer.running_var[...] = rng.uniform(0.5, 2.0, channels)
    return layer


def layer_dtype_for(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def copy_or_none(a):
    return None if a is None else np.array(a, copy=True)


def snapshot(layer):
    """Everything an error must leave untouched."""
    return {
        "weight": copy_or_none(layer.weight),
        "bias": copy_or_none(layer.bias),
        "running_mean": copy_or_none(layer.running_mean),
        "running_var": copy_or_none(layer.running_var),
        "num_batches_tracked": layer.num_batches_tracked,
        "training": layer.training,
        "grad_weight": copy_or_none(getattr(layer, "grad_weight", None)),
        "grad_bias": copy_or_none(getattr(layer, "grad_bias", None)),
    }


def assert_same_state(before, layer):
    after = snapshot(layer)
    for key in before:
        b, a = before[key], after[key]
        if isinstance(b, np.ndarray) or isinstance(a, np.ndarray):
            assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), key
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), f"{key} changed"
        else:
            assert a == b, f"{key} changed: {b!r} -> {a!r}"


def output_scale(x, ref, weight, bias, eps=1e-5):
    """Largest term of y = x * scale + shift, which sets the rounding y can carry.

    With a small batch variance |x * scale| can be far larger than |y| itself.
    """
    x = np.abs(np.asarray(x, np.float64))
    if x.size == 0:
        return 1.0
    w = np.ones(x.shape[1]) if weight is None else np.abs(np.asarray(weight, np.float64))
    b = np.zeros(x.shape[1]) if bias is None else np.abs(np.asarray(bias, np.float64))
    scale = w / np.sqrt(ref.var + eps)
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    terms = (x + np.abs(ref.mean).reshape(bshape)) * scale.reshape(bshape) + b.reshape(bshape)
    return max(float(np.nanmax(terms)), 1.0)


def dx_scale(x, dy, weight, ref, use_batch_stats, eps=1e-5):
    """Largest term of dx = a * dy + b * (x - mean) + c, as `output_scale`.

    In training b = -a * invstd * mean(dy * xhat), and the rounding of x itself
    (|x| * ulp) is multiplied by b: with a small variance that dominates.
    """
    x64 = np.asarray(x, np.float64)
    dy64 = np.asarray(dy, np.float64)
    w = np.ones(x64.shape[1]) if weight is None else np.abs(np.asarray(weight, np.float64))
    bshape = (1, -1) + (1,) * (x64.ndim - 2)
    invstd = (1 / np.sqrt(ref.var + eps)).reshape(bshape)
    a = w.reshape(bshape) * invstd
    if not use_batch_stats:
        return max(float(np.max(a * np.abs(dy64))), 1.0)
    axes = (0,) + tuple(range(2, x64.ndim))
    mean = ref.mean.reshape(bshape)
    xhat = (x64 - mean) * invstd
    mean_dy = np.abs(dy64.mean(axis=axes, keepdims=True))
    mean_dy_xhat = np.abs((dy64 * xhat).mean(axis=axes, keepdims=True))
    terms = a * (np.abs(dy64) + mean_dy + np.abs(xhat) * mean_dy_xhat
                 + invstd * mean_dy_xhat * (np.abs(x64) + np.abs(mean)))
    return max(float(np.max(terms)), 1.0)


def assert_close(actual, expected, tol, what, scale=None):
    """|actual - expected| <= tol * scale, scale defaulting to max(|expected|, 1)."""
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == np.shape(expected), f"{what}: shape {actual.shape} != {np.shape(expected)}"
    if scale is None:
        scale = max(float(np.max(np.abs(expected), initial=0.0)), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale, err_msg=what)


def assert_rounded_once_to_float16(actual, expected, what, scale):
    """actual is a float32-accurate result rounded once to float16.

    Half a float16 ulp of the exact value, plus float32-level error: arithmetic
    done in float16 itself rounds every intermediate and lands several ulps off.
    """
    half_ulp = 0.5 * np.spacing(np.abs(expected).astype(np.float16)).astype(np.float64)
    bound = half_ulp + TOL[np.float32] * scale
    error = np.abs(actual.astype(np.float64) - expected)
    assert np.all(error <= bound), f"{what}: max error / bound {np.max(error / bound):.3g}"


def number_in(text, number):
    return re.search(rf"(?<!\d){number}(?!\d)", text) is not None


def used_layer(cls, shape, rng, **kwargs):
    """A layer after one training step and one backward: nothing in it is default."""
    layer = make_layer(cls, shape[1], rng, **kwargs)
    x = make_input(rng, shape, np.float32)
    layer(x)
    layer.backward(rng.standard_normal(shape).astype(np.float32))
    return layer


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("cls", [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
def test_constructor_defaults(cls):
    layer = cls(5)
    assert layer.num_features == 5
    assert layer.eps == 1e-5 and layer.momentum == 0.1
    assert layer.affine is True and layer.track_running_stats is True
    assert layer.training is True
    for name, value in [("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)]:
        array = getattr(layer, name)
        assert isinstance(array, np.ndarray), name
        assert array.shape == (5,) and array.dtype == np.float32, name
        assert np.all(array == value), name
    assert isinstance(layer.num_batches_tracked, int) and layer.num_batches_tracked == 0


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_absent_attributes_are_none(affine, track):
    layer = cbn.BatchNorm2d(3, affine=affine, track_running_stats=track, dtype=np.float64)
    assert (layer.weight is None) == (not affine)
    assert (layer.bias is None) == (not affine)
    assert (layer.running_mean is None) == (not track)
    assert (layer.running_var is None) == (not track)
    assert (layer.num_batches_tracked is None) == (not track)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(layer, name)
        assert value is None or value.dtype == np.float64


def test_train_and_eval_return_the_layer():
    layer = cbn.BatchNorm2d(3)
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False
    assert layer.train(True) is layer and layer.training is True


# --------------------------------------------------------------------------- forward vs twin


@pytest.mark.parametrize("training, track", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, shape, layout", with_layouts(CASES, LAYOUTS))
def test_forward_matches_twin(rng, cls, shape, dtype, layout, training, track):
    momentum = 0.3
    layer = make_layer(cls, shape[1], rng, dtype=layer_dtype_for(dtype), momentum=momentum,
                       track_running_stats=track).train(training)
    state = [copy_or_none(layer.running_mean), copy_or_none(layer.running_var), layer.num_batches_tracked]
    weight, bias = layer.weight.copy(), layer.bias.copy()

    for step in range(3):
        x = make_input(rng, shape, dtype)
        x_in = arrange(x, layout)
        x_before = x_in.copy()
        y = layer(x_in)
        ref = twin_batch_norm(x, *state[:2], weight, bias, training or not track, momentum,
                              layer.eps, state[2])
        state = [ref.running_mean, ref.running_var, ref.num_batches_tracked]

        assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == shape
        assert_close(y, ref.y, TOL[dtype], f"output, step {step}", output_scale(x, ref, weight, bias))
        assert np.array_equal(x_in, x_before), "input was written"
        if layout == "channels_last" and len(shape) >= 4:
            assert is_channels_last(y), f"channels-last input gave strides {y.strides}"
        if layout == "contiguous":
            assert y.flags.c_contiguous
        if track:
            assert_close(layer.running_mean, ref.running_mean, TOL[dtype], "running_mean")
            assert_close(layer.running_var, ref.running_var, TOL[dtype], "running_var")
            assert layer.running_mean.dtype == layer_dtype_for(dtype)
            assert isinstance(layer.num_batches_tracked, int)
            assert layer.num_batches_tracked == ref.num_batches_tracked == (step + 1 if training else 0)
        else:
            assert layer.running_mean is None and layer.running_var is None
            assert layer.num_batches_tracked is None
    assert np.array_equal(layer.weight, weight) and np.array_equal(layer.bias, bias)


@pytest.mark.parametrize("cls, shape, layout", with_layouts(CASES, ["contiguous", "channels_last"]))
def test_float16_is_computed_in_float32_and_returned_as_float16(rng, cls, shape, layout):
    layer = make_layer(cls, shape[1], rng)
    x = make_input(rng, shape, np.float16)
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                          True, 0.1, 1e-5, 0)
    y = layer(arrange(x, layout))
    assert y.dtype == np.float16 and y.shape == shape
    assert_rounded_once_to_float16(y, ref.y, "float16 output",
                                   output_scale(x, ref, layer.weight, layer.bias))
    assert layer.running_mean.dtype == np.float32
    assert_close(layer.running_mean, ref.running_mean, TOL[np.float32], "running_mean")
    assert_close(layer.running_var, ref.running_var, TOL[np.float32], "running_var")

    layer.eval()
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                          False, 0.1, 1e-5, 1)
    y = layer(arrange(x, layout))
    assert y.dtype == np.float16
    assert_rounded_once_to_float16(y, ref.y, "float16 eval output",
                                   output_scale(x, ref, layer.weight, layer.bias))


@pytest.mark.parametrize("cls, shape", CASES)
def test_momentum_none_is_a_cumulative_average(rng, cls, shape):
    layer = make_layer(cls, shape[1], rng, dtype=np.float64, momentum=None)
    batches = [make_input(rng, shape, np.float64) for _ in range(4)]
    for x in batches:
        layer(x)
    axes = (0,) + tuple(range(2, len(shape)))
    count = int(np.prod(shape)) // shape[1]
    means = [x.mean(axis=axes) for x in batches]
    unbiased = [x.var(axis=axes) * count / (count - 1) for x in batches]
    # With factor 1/k at step k the running statistic is the plain average of
    # every batch statistic, whatever the initial values were.
    assert_close(layer.running_mean, np.mean(means, axis=0), 1e-12, "running_mean")
    assert_close(layer.running_var, np.mean(unbiased, axis=0), 1e-12, "running_var")
    assert layer.num_batches_tracked == 4


def test_momentum_none_continues_from_num_batches_tracked(rng):
    layer = make_layer(cbn.BatchNorm1d, 3, rng, dtype=np.float64, momentum=None)
    layer.num_batches_tracked = 9
    x = make_input(rng, (8, 3), np.float64)
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                          True, None, 1e-5, 9)
    layer(x)
    assert layer.num_batches_tracked == 10
    assert_close(layer.running_mean, ref.running_mean, 1e-12, "running_mean (factor 1/10)")
    assert_close(layer.running_var, ref.running_var, 1e-12, "running_var (factor 1/10)")


@pytest.mark.parametrize("cls, shape", CASES)
def test_eval_with_one_value_per_channel_uses_running_stats(rng, cls, shape):
    shape = (1, shape[1]) + (1,) * (len(shape) - 2)
    layer = make_layer(cls, shape[1], rng).eval()
    x = make_input(rng, shape, np.float32)
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                          False, 0.1, 1e-5, 0)
    assert_close(layer(x), ref.y, TOL[np.float32], "output")


@pytest.mark.parametrize(
    "cls, shape",
    [(cbn.BatchNorm1d, (1, 3, 5)), (cbn.BatchNorm2d, (1, 3, 2, 1)), (cbn.BatchNorm3d, (1, 3, 1, 1, 2))],
)
def test_one_sample_with_spatial_values_trains(rng, cls, shape):
    layer = make_layer(cls, shape[1], rng, dtype=np.float64)
    x = make_input(rng, shape, np.float64)
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                          True, 0.1, 1e-5, 0)
    assert_close(layer(x), ref.y, TOL[np.float64], "output")
    assert_close(layer.running_var, ref.running_var, TOL[np.float64], "running_var")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 32, 64, 64), (2, 16, 16, 32, 32)])
def test_forward_does_not_copy_the_input(rng, shape, layout, training):
    """The API: contiguous and channels-last input are processed without a copy.

    NumPy reports its allocations to tracemalloc: the forward pass may allocate
    its output and O(C) statistics, not a second array of the input's size.
    """
    layer = CLASS_FOR_RANK[len(shape)](shape[1]).train(training)
    x = arrange(rng.standard_normal(shape, dtype=np.float32), layout)
    layer(x)  # warm up: first-call allocations are not the point
    tracemalloc.start()
    try:
        y = layer(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert y.nbytes == x.nbytes
    assert peak < 1.5 * x.nbytes, f"peak {peak / x.nbytes:.2f} input sizes: the input was copied"


def test_memoryview_input_is_accepted(rng):
    layer = make_layer(cbn.BatchNorm2d, 3, rng).eval()
    x = make_input(rng, (2, 3, 4, 5), np.float32)
    assert np.array_equal(layer(memoryview(x)), layer(x))


def test_eps_is_used(rng):
    x = make_input(rng, (4, 3, 2, 2), np.float64)
    layer = cbn.BatchNorm2d(3, eps=0.5, dtype=np.float64)
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, None, None, True, 0.1, 0.5, 0)
    assert_close(layer(x), ref.y, TOL[np.float64], "output with eps=0.5")


@st.composite
def forward_cases(draw):
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    layout = draw(st.sampled_from(LAYOUTS if rank >= 3 else [l for l in LAYOUTS if l != "channels_last"]))
    training = draw(st.booleans())
    track = draw(st.booleans())
    if (training or not track) and np.prod(shape) // shape[1] < 2:
        shape = (2,) + shape[1:]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return shape, layout, training, track, dtype


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(forward_cases())
def test_forward_and_backward_on_generated_shapes(case):
    shape, layout, training, track, dtype = case
    rng = np.random.default_rng(sum(shape) + len(shape))
    layer = make_layer(CLASS_FOR_RANK[len(shape)], shape[1], rng, dtype=layer_dtype_for(dtype),
                       track_running_stats=track).train(training)
    x = make_input(rng, shape, dtype)
    dy = make_input(rng, shape, dtype)
    use_batch_stats = training or not track
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                          use_batch_stats, 0.1, 1e-5, layer.num_batches_tracked)
    grads = twin_backward(x, dy, layer.weight, 1e-5, use_batch_stats, ref.mean, ref.var)
    y = layer(arrange(x, layout))
    assert y.dtype == dtype
    assert_close(y, ref.y, TOL[dtype], f"output {shape} {layout}",
                 output_scale(x, ref, layer.weight, layer.bias))
    if track:
        assert_close(layer.running_var, ref.running_var, TOL[dtype], "running_var")
    assert_close(layer.backward(arrange(dy, layout)), grads.dx, TOL[dtype], "dx",
                 dx_scale(x, dy, layer.weight, ref, use_batch_stats))
    if layout == "channels_last" and len(shape) >= 4:
        assert is_channels_last(y)


# --------------------------------------------------------------------------- edge values


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (0, 3, 2, 2, 2)])
def test_empty_batch_returns_empty_output_and_keeps_statistics(rng, shape, training):
    layer = make_layer(CLASS_FOR_RANK[len(shape)], 3, rng).train(training)
    mean, var = layer.running_mean.copy(), layer.running_var.copy()
    y = layer(np.zeros(shape, np.float32))
    assert y.shape == shape and y.dtype == np.float32
    assert np.array_equal(layer.running_mean, mean) and np.array_equal(layer.running_var, var)
    # PyTorch 2.13 counts an empty training batch.
    assert layer.num_batches_tracked == (1 if training else 0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape, layout",
    [(shape, layout)
     for shape in [(6, 3), (4, 3, 5), (3, 3, 4, 5), (2, 3, 2, 3, 4)]
     for layout in ["contiguous", "channels_last", "fortran"]
     if not (layout == "channels_last" and len(shape) < 3)],
)
def test_nan_stays_in_its_channel(rng, shape, layout, training):
    layer = make_layer(CLASS_FOR_RANK[len(shape)], 3, rng, dtype=np.float64).train(training)
    x = make_input(rng, shape, np.float64)
    where = (1, 1) + (0,) * (len(shape) - 2)
    x[where] = np.nan
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                          training, 0.1, 1e-5, 0)
    y = layer(arrange(x, layout))
    others = [0, 2]
    assert np.all(np.isfinite(y[:, others]))
    assert_close(y[:, others], ref.y[:, others], TOL[np.float64], "other channels")
    if training:
        assert np.all(np.isnan(y[:, 1])), "a NaN in a channel's batch makes its statistics NaN"
        assert np.isnan(layer.running_mean[1]) and np.isnan(layer.running_var[1])
        assert np.all(np.isfinite(layer.running_mean[others]))
        assert np.all(np.isfinite(layer.running_var[others]))
    else:
        assert np.array_equal(np.isnan(y), np.isnan(x)), "eval: only the NaN element is NaN"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inf_stays_in_its_channel(rng, layout):
    layer = make_layer(cbn.BatchNorm2d, 3, rng, dtype=np.float64)
    x = make_input(rng, (3, 3, 4, 5), np.float64)
    x[2, 1, 3, 1] = np.inf
    with np.errstate(invalid="ignore"):  # inf - inf in the twin (and perhaps in cbn)
        ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                              layer.bias, True, 0.1, 1e-5, 0)
        y = layer(arrange(x, layout))
    assert np.all(np.isnan(y[:, 1])), "inf - inf: the channel's output is NaN, as in PyTorch"
    assert_close(y[:, [0, 2]], ref.y[:, [0, 2]], TOL[np.float64], "other channels")
    assert np.all(np.isfinite(layer.running_var[[0, 2]]))


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_non_finite_first_value_gives_torchs_statistics(rng, layout, value):
    # The statistics are sums shifted by a per-channel value: a non-finite shift
    # (the channel's first value) would turn an infinite mean into NaN.
    layer = cbn.BatchNorm2d(3, dtype=np.float64)
    x = make_input(rng, (3, 3, 4, 5), np.float64)
    x[0, 1, 0, 0] = value
    with np.errstate(invalid="ignore"):
        layer(arrange(x, layout))
    expected = value if np.isinf(value) else np.nan
    np.testing.assert_array_equal(layer.running_mean[1], expected)  # torch: inf, -inf, nan
    assert np.isnan(layer.running_var[1])
    assert np.all(np.isfinite(layer.running_mean[[0, 2]]))


def test_a_non_finite_first_value_matches_torch(torch, rng):
    x = make_input(rng, (3, 3, 4, 5), np.float32)
    x[0, 1, 0, 0] = np.inf
    x[0, 2, 0, 0] = -np.inf
    ours, theirs = cbn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with np.errstate(invalid="ignore"):
        y = ours(x)
    expected = theirs(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_array_equal(ours.running_mean[1:], theirs.running_mean.numpy()[1:])
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_allclose(y[:, 0], expected[:, 0], atol=2e-6)


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training, track", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, shape, layout", with_layouts(CASES, LAYOUTS))
def test_backward_matches_twin(rng, cls, shape, dtype, layout, training, track, affine):
    layer = make_layer(cls, shape[1], rng, dtype=layer_dtype_for(dtype), affine=affine,
                       track_running_stats=track).train(training)
    weight = copy_or_none(layer.weight)
    bias = copy_or_none(layer.bias)
    rm, rv = copy_or_none(layer.running_mean), copy_or_none(layer.running_var)
    x = make_input(rng, shape, dtype)
    dy = make_input(rng, shape, dtype, offsets=np.full(shape[1], 0.5))
    use_batch_stats = training or not track
    ref = twin_batch_norm(x, rm, rv, weight, bias, use_batch_stats, 0.1, 1e-5, 0)
    grads = twin_backward(x, dy, weight, 1e-5, use_batch_stats, ref.mean, ref.var)

    layer(arrange(x, layout))
    dy_in = arrange(dy, layout)
    dy_before = dy_in.copy()
    dx = layer.backward(dy_in)

    assert isinstance(dx, np.ndarray) and dx.dtype == dtype and dx.shape == shape
    assert_close(dx, grads.dx, TOL[dtype], "dx", dx_scale(x, dy, weight, ref, use_batch_stats))
    assert np.array_equal(dy_in, dy_before), "dy was written"
    if affine:
        axes = (0,) + tuple(range(2, len(shape)))
        xhat = (x - ref.mean.reshape((1, -1) + (1,) * (len(shape) - 2))) / np.sqrt(
            ref.var.reshape((1, -1) + (1,) * (len(shape) - 2)) + 1e-5)
        dweight_scale = np.abs(dy.astype(np.float64) * xhat).sum(axis=axes).max()
        dbias_scale = np.abs(dy.astype(np.float64)).sum(axis=axes).max()
        assert_close(layer.grad_weight, grads.dweight, TOL[dtype], "grad_weight", dweight_scale)
        assert_close(layer.grad_bias, grads.dbias, TOL[dtype], "grad_bias", dbias_scale)
    else:
        assert layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize(
    "x_layout, dy_layout",
    [("channels_last", "contiguous"), ("contiguous", "channels_last"), ("fortran", "reversed")],
)
@pytest.mark.parametrize("training", [True, False])
def test_backward_with_a_gradient_in_another_layout(rng, x_layout, dy_layout, training):
    shape = (3, 4, 5, 6)
    layer = make_layer(cbn.BatchNorm2d, 4, rng, dtype=np.float64).train(training)
    x = make_input(rng, shape, np.float64)
    dy = make_input(rng, shape, np.float64)
    ref = twin_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                          training, 0.1, 1e-5, 0)
    grads = twin_backward(x, dy, layer.weight, 1e-5, training, ref.mean, ref.var)
    layer(arrange(x, x_layout))
    dx = layer.backward(arrange(dy, dy_layout))
    assert_close(dx, grads.dx, TOL[np.float64], "dx")
    assert_close(layer.grad_weight, grads.dweight, TOL[np.float64], "grad_weight",
                 np.abs(grads.dweight).max() + np.abs(dy).sum())
    assert_close(layer.grad_bias, grads.dbias, TOL[np.float64], "grad_bias", np.abs(dy).sum())


def test_returned_arrays_are_not_reused_between_calls(rng):
    """Each call returns a fresh array: an earlier result never changes."""
    layer = make_layer(cbn.BatchNorm2d, 3, rng)
    x1, x2 = make_input(rng, (2, 3, 4, 4), np.float32), make_input(rng, (2, 3, 4, 4), np.float32)
    y1 = layer(x1)
    kept_y1 = y1.copy()
    dx1 = layer.backward(np.ones_like(x1))
    kept_dx1, kept_grad_weight = dx1.copy(), layer.grad_weight.copy()
    grad_weight = layer.grad_weight
    y2 = layer(x2)
    layer.backward(make_input(rng, (2, 3, 4, 4), np.float32))
    assert np.array_equal(y1, kept_y1), "the first output changed after a second forward"
    assert np.array_equal(dx1, kept_dx1), "the first dx changed after a second backward"
    assert np.array_equal(grad_weight, kept_grad_weight), "an earlier grad_weight array was overwritten"
    assert not np.shares_memory(y1, y2)
    layer.eval()
    assert not np.shares_memory(layer(x1), layer(x1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layer_results_do_not_depend_on_the_thread_count(rng, layout, dtype):
    shape = (8, 16, 40, 40)
    x = arrange(make_input(rng, shape, dtype), layout)
    dy = arrange(make_input(rng, shape, dtype), layout)
    results = []
    original = cbn.get_num_threads()
    try:
        for n_threads in (1, 2):
            cbn.set_num_threads(n_threads)
            layer = cbn.BatchNorm2d(16, dtype=layer_dtype_for(dtype))
            y = layer(x)
            dx = layer.backward(dy)
            results.append((y, dx, layer.running_mean, layer.running_var,
                            layer.grad_weight, layer.grad_bias))
    finally:
        cbn.set_num_threads(original)
    for serial, parallel in zip(*results):
        assert serial.tobytes() == parallel.tobytes()


def test_backward_overwrites_gradients(rng):
    layer = make_layer(cbn.BatchNorm2d, 3, rng, dtype=np.float64)
    x = make_input(rng, (2, 3, 4, 4), np.float64)
    dy = make_input(rng, (2, 3, 4, 4), np.float64)
    layer(x)
    dx1 = layer.backward(dy)
    gw, gb = layer.grad_weight.copy(), layer.grad_bias.copy()
    dx2 = layer.backward(dy)
    assert np.array_equal(dx1, dx2)
    assert np.array_equal(layer.grad_weight, gw) and np.array_equal(layer.grad_bias, gb)


def test_backward_uses_the_last_forward(rng):
    layer = make_layer(cbn.BatchNorm1d, 3, rng, dtype=np.float64)
    first, second = make_input(rng, (5, 3), np.float64), make_input(rng, (5, 3), np.float64)
    layer.eval()
    layer(first)
    layer.train()
    ref = twin_batch_norm(second, layer.running_mean, layer.running_var, layer.weight,
                          layer.bias, True, 0.1, 1e-5, 0)
    layer(second)
    layer.eval()  # backward follows the mode the forward ran in, not the current one
    dy = make_input(rng, (5, 3), np.float64)
    grads = twin_backward(second, dy, layer.weight, 1e-5, True, ref.mean, ref.var)
    assert_close(layer.backward(dy), grads.dx, TOL[np.float64], "dx")


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("cls, shape", CASES)
def test_reset_running_stats(rng, cls, shape):
    layer = make_layer(cls, shape[1], rng)
    weight, bias = layer.weight.copy(), layer.bias.copy()
    layer(make_input(rng, shape, np.float32))
    layer.reset_running_stats()
    assert np.all(layer.running_mean == 0) and np.all(layer.running_var == 1)
    assert layer.num_batches_tracked == 0 and isinstance(layer.num_batches_tracked, int)
    assert np.array_equal(layer.weight, weight) and np.array_equal(layer.bias, bias)


def test_reset_parameters_resets_everything(rng):
    layer = make_layer(cbn.BatchNorm2d, 3, rng)
    layer(make_input(rng, (2, 3, 4, 4), np.float32))
    layer.reset_parameters()
    assert np.all(layer.weight == 1) and np.all(layer.bias == 0)
    assert np.all(layer.running_mean == 0) and np.all(layer.running_var == 1)
    assert layer.num_batches_tracked == 0
    assert layer.weight.dtype == np.float32


def test_resets_without_running_stats_or_parameters():
    layer = cbn.BatchNorm2d(3, affine=False, track_running_stats=False)
    layer.reset_running_stats()
    layer.reset_parameters()
    assert layer.weight is None and layer.running_mean is None


STATE_KEYS = {
    (True, True): {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
    (True, False): {"weight", "bias"},
    (False, True): {"running_mean", "running_var", "num_batches_tracked"},
    (False, False): set(),
}


@pytest.mark.parametrize("affine, track", list(STATE_KEYS))
def test_state_dict_has_pytorch_keys_and_copies(rng, affine, track):
    layer = used_layer(cbn.BatchNorm2d, (2, 3, 4, 4), rng, affine=affine, track_running_stats=track)
    state = layer.state_dict()
    assert set(state) == STATE_KEYS[affine, track]
    for key, value in state.items():
        if key == "num_batches_tracked":
            assert int(value) == layer.num_batches_tracked == 1
            continue
        current = getattr(layer, key)
        assert np.array_equal(value, current) and value.dtype == current.dtype, key
        assert not np.shares_memory(value, current), f"{key} is not a copy"
        value[...] = 42.0
        assert not np.any(current == 42.0), f"{key}: changing the state changed the layer"


def test_load_state_dict_round_trip(rng):
    source = used_layer(cbn.BatchNorm3d, (2, 3, 2, 2, 2), rng)
    source(make_input(rng, (2, 3, 2, 2, 2), np.float32))
    target = cbn.BatchNorm3d(3)
    state = source.state_dict()
    target.load_state_dict(state)
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert np.array_equal(getattr(target, key), getattr(source, key)), key
        assert getattr(target, key).dtype == np.float32
    assert target.num_batches_tracked == 2 and isinstance(target.num_batches_tracked, int)
    state["weight"][...] = 42.0  # the layer holds copies, not the caller's arrays
    assert not np.any(target.weight == 42.0)
    x = make_input(rng, (2, 3, 2, 2, 2), np.float32)
    assert np.array_equal(source.eval()(x), target.eval()(x))


def test_load_state_dict_converts_to_the_layer_dtype(rng):
    layer = cbn.BatchNorm1d(3)
    state = {
        "weight": rng.uniform(size=3), "bias": rng.uniform(size=3),
        "running_mean": rng.uniform(size=3), "running_var": rng.uniform(1, 2, size=3),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    }
    layer.load_state_dict(state)
    for key in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(layer, key)
        assert value.dtype == np.float32 and np.array_equal(value, state[key].astype(np.float32))
    assert layer.num_batches_tracked == 7 and isinstance(layer.num_batches_tracked, int)


def test_load_state_dict_without_num_batches_tracked(rng):
    layer = cbn.BatchNorm2d(3)
    state = used_layer(cbn.BatchNorm2d, (2, 3, 2, 2), rng).state_dict()
    del state["num_batches_tracked"]
    layer.load_state_dict(state)
    assert np.array_equal(layer.running_var, state["running_var"])
    assert layer.num_batches_tracked == 0 and isinstance(layer.num_batches_tracked, int)


def _full_state(layer):
    return {key: np.array(value, copy=True) for key, value in layer.state_dict().items()}


@pytest.mark.parametrize("missing", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_missing_key_raises(rng, missing):
    layer = used_layer(cbn.BatchNorm2d, (2, 3, 2, 2), rng)
    state = _full_state(cbn.BatchNorm2d(3))
    del state[missing]
    before = snapshot(layer)
    with pytest.raises(ValueError, match=missing):
        layer.load_state_dict(state)
    assert_same_state(before, layer)


def test_load_state_dict_unexpected_key_raises(rng):
    layer = used_layer(cbn.BatchNorm2d, (2, 3, 2, 2), rng)
    state = _full_state(cbn.BatchNorm2d(3))
    state["running_std"] = np.ones(3)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="running_std"):
        layer.load_state_dict(state)
    assert_same_state(before, layer)


def test_load_state_dict_unexpected_key_of_an_absent_buffer_raises(rng):
    layer = used_layer(cbn.BatchNorm2d, (2, 3, 2, 2), rng, track_running_stats=False)
    state = _full_state(cbn.BatchNorm2d(3))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="running_mean|running_var|num_batches_tracked"):
        layer.load_state_dict(state)
    assert_same_state(before, layer)


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_wrong_shape_raises(rng, key):
    layer = used_layer(cbn.BatchNorm2d, (2, 3, 2, 2), rng)
    state = _full_state(cbn.BatchNorm2d(3))
    state[key] = np.ones(4, np.float32)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=key):
        layer.load_state_dict(state)
    assert_same_state(before, layer)


def test_load_state_dict_not_strict_ignores_missing_and_unexpected(rng):
    layer = cbn.BatchNorm2d(3)
    weight = rng.uniform(size=3).astype(np.float32)
    layer.load_state_dict({"weight": weight, "something_else": np.ones(2)}, strict=False)
    assert np.array_equal(layer.weight, weight)
    assert np.all(layer.bias == 0) and np.all(layer.running_var == 1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "cls, shape, expected_ranks",
    [
        (cbn.BatchNorm1d, (4,), (2, 3)),
        (cbn.BatchNorm1d, (4, 3, 2, 2), (2, 3)),
        (cbn.BatchNorm2d, (4, 3, 2), (4,)),
        (cbn.BatchNorm2d, (4, 3, 2, 2, 2), (4,)),
        (cbn.BatchNorm3d, (4, 3, 2, 2), (5,)),
        (cbn.BatchNorm3d, (4, 3, 2, 2, 2, 2), (5,)),
    ],
)
def test_wrong_rank_raises_value_error(rng, cls, shape, expected_ranks):
    layer = used_layer(cls, (4, 3) + (2,) * (expected_ranks[-1] - 2), rng)
    before = snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer(np.ones(shape, np.float32))
    message = str(info.value)
    assert number_in(message, len(shape)), f"message does not name the rank given: {message}"
    for rank in expected_ranks:
        assert number_in(message, rank), f"message does not name the expected rank {rank}: {message}"
    assert_same_state(before, layer)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 2), (4, 5, 2, 2), (4, 5, 2, 2, 2)])
def test_wrong_channel_count_raises_value_error(rng, shape, training):
    cls = CLASS_FOR_RANK[len(shape)]
    layer = used_layer(cls, (4, 3) + shape[2:], rng).train(training)
    before = snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer(np.ones(shape, np.float32))
    message = str(info.value)
    assert number_in(message, 3) and number_in(message, 5), f"counts not both named: {message}"
    assert_same_state(before, layer)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object])
def test_non_floating_dtype_raises_type_error(rng, dtype, training):
    layer = used_layer(cbn.BatchNorm2d, (2, 3, 2, 2), rng).train(training)
    before = snapshot(layer)
    x = np.ones((2, 3, 2, 2)).astype(dtype)
    with pytest.raises(TypeError) as info:
        layer(x)
    assert np.dtype(dtype).name in str(info.value), f"dtype not named: {info.value}"
    assert_same_state(before, layer)


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_one_value_per_channel_in_training_raises(rng, shape, track):
    cls = CLASS_FOR_RANK[len(shape)]
    layer = used_layer(cls, (4, 3) + (2,) * (len(shape) - 2), rng, track_running_stats=track)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(np.ones(shape, np.float32))
    assert_same_state(before, layer)


def test_one_value_per_channel_in_eval_without_running_stats_raises(rng):
    # eval without running statistics still normalises with the batch's.
    layer = used_layer(cbn.BatchNorm2d, (4, 3, 2, 2), rng, track_running_stats=False).eval()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(np.ones((1, 3, 1, 1), np.float32))
    assert_same_state(before, layer)


@pytest.mark.parametrize("cls", [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
def test_backward_before_forward_raises_runtime_error(cls):
    layer = cls(3)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones(SHAPE_FOR_CLASS[cls], np.float32))
    assert_same_state(before, layer)


@pytest.mark.parametrize("dy_shape", [(4, 3, 2, 3), (4, 3, 3, 2), (3, 3, 2, 2), (4, 3, 4), (4, 6, 2, 2)])
def test_backward_with_mismatched_gradient_shape_raises(rng, dy_shape):
    layer = used_layer(cbn.BatchNorm2d, (4, 3, 2, 2), rng)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="(?i)shape"):
        layer.backward(np.ones(dy_shape, np.float32))
    assert_same_state(before, layer)
    # The layer still remembers its forward pass.
    assert layer.backward(np.ones((4, 3, 2, 2), np.float32)).shape == (4, 3, 2, 2)


@pytest.mark.parametrize("cls", [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
@pytest.mark.parametrize("num_features", [0, -1])
def test_non_positive_num_features_raises(cls, num_features):
    with pytest.raises(ValueError, match="num_features"):
        cls(num_features)


@pytest.mark.parametrize("cls", [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_non_positive_eps_raises(cls, eps):
    with pytest.raises(ValueError, match="eps"):
        cls(3, eps=eps)
