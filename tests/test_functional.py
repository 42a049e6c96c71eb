"""cbn.functional.batch_norm against the float64 twin.

Same semantics as torch.nn.functional.batch_norm: batch statistics when
`training`, the given running statistics otherwise; running statistics that are
not None are updated in place when training.
"""

import numpy as np
import pytest

from cbn.functional import batch_norm
from twin import make_input, twin_batch_norm

TOL = {np.float32: 1e-5, np.float64: 1e-11}
SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 5), (2, 3, 2, 3, 4)]


def assert_close(actual, expected, tol, what):
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1.0)
    assert np.shape(actual) == np.shape(expected), what
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=tol * scale,
                               err_msg=what)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_matches_twin(rng, shape, dtype, training, affine):
    channels = shape[1]
    running_mean = rng.uniform(-1, 1, channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)
    weight = rng.uniform(0.5, 2, channels).astype(dtype) if affine else None
    bias = rng.uniform(-1, 1, channels).astype(dtype) if affine else None
    x = make_input(rng, shape, dtype)
    x_before = x.copy()
    momentum, eps = 0.25, 1e-3
    ref = twin_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    mean_object, var_object = running_mean, running_var
    old_mean, old_var = running_mean.copy(), running_var.copy()

    y = batch_norm(x, running_mean, running_var, weight, bias, training=training,
                   momentum=momentum, eps=eps)

    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == shape
    assert_close(y, ref.y, TOL[dtype], "output")
    assert np.array_equal(x, x_before), "input was written"
    assert running_mean is mean_object and running_var is var_object
    assert running_mean.dtype == dtype
    if training:
        assert not np.array_equal(running_mean, old_mean), "running_mean not updated in place"
        assert_close(running_mean, ref.running_mean, TOL[dtype], "running_mean")
        assert_close(running_var, ref.running_var, TOL[dtype], "running_var")
    else:
        assert np.array_equal(running_mean, old_mean) and np.array_equal(running_var, old_var)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_training_without_running_stats(rng, shape, dtype):
    x = make_input(rng, shape, dtype)
    weight = rng.uniform(0.5, 2, shape[1]).astype(dtype)
    ref = twin_batch_norm(x, None, None, weight, None, True, 0.1, 1e-5)
    y = batch_norm(x, None, None, weight, training=True)
    assert y.dtype == dtype
    assert_close(y, ref.y, TOL[dtype], "output")


def test_defaults_are_eval_with_momentum_and_eps_of_pytorch(rng):
    x = make_input(rng, (4, 3, 5), np.float64)
    running_mean, running_var = rng.uniform(-1, 1, 3), rng.uniform(0.5, 2, 3)
    ref = twin_batch_norm(x, running_mean, running_var, None, None, False, 0.1, 1e-5)
    y = batch_norm(x, running_mean.copy(), running_var.copy())
    assert_close(y, ref.y, TOL[np.float64], "eval output")

    ref = twin_batch_norm(x, running_mean, running_var, None, None, True, 0.1, 1e-5)
    batch_norm(x, running_mean, running_var, training=True)
    assert_close(running_mean, ref.running_mean, TOL[np.float64], "default momentum 0.1")
    assert_close(running_var, ref.running_var, TOL[np.float64], "default momentum 0.1")


def test_channels_last_input_gives_channels_last_output(rng):
    x = make_input(rng, (2, 3, 4, 5), np.float32)
    x_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    ref = twin_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    y = batch_norm(x_last, None, None, training=True)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous
    assert_close(y, ref.y, TOL[np.float32], "output")


def test_read_only_running_stats_in_eval(rng):
    x = make_input(rng, (4, 3), np.float32)
    running_mean = rng.uniform(-1, 1, 3).astype(np.float32)
    running_var = rng.uniform(0.5, 2, 3).astype(np.float32)
    ref = twin_batch_norm(x, running_mean, running_var, None, None, False, 0.1, 1e-5)
    for a in (x, running_mean, running_var):
        a.setflags(write=False)
    assert_close(batch_norm(x, running_mean, running_var), ref.y, TOL[np.float32], "output")


def test_one_value_per_channel_in_training_raises(rng):
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm(np.ones((1, 3), np.float32), running_mean, running_var, training=True)
    assert np.all(running_mean == 0) and np.all(running_var == 1)


def test_integer_input_raises_type_error():
    with pytest.raises(TypeError, match="int64"):
        batch_norm(np.ones((4, 3), np.int64), None, None, training=True)



def test_running_stats_that_cannot_be_updated_are_rejected_before_any_change():
    x = np.random.default_rng(9).standard_normal((4, 3, 5))
    mean, var = np.zeros(3), np.ones(3)
    var.setflags(write=False)
    with pytest.raises(ValueError, match="running_var is read-only"):
        batch_norm(x, mean, var, training=True)
    assert np.all(mean == 0)
    with pytest.raises(TypeError, match="running_mean must be a floating-point"):
        batch_norm(x, np.zeros(3, np.int64), np.ones(3), training=True)
    with pytest.raises(TypeError, match="running_var must be a floating-point"):
        batch_norm(x, mean.copy(), [1.0, 1.0, 1.0], training=True)
    with pytest.raises(ValueError, match="both be None or neither"):
        batch_norm(x, np.zeros(3), None, training=True)


def test_weight_and_bias_may_be_any_array_like():
    x = np.random.default_rng(10).standard_normal((4, 3, 5))
    expected = batch_norm(x, None, None, np.array([1.0, 2.0, 3.0]),
                                         np.array([0.0, 1.0, 0.0]), training=True)
    got = batch_norm(x, None, None, [1, 2, 3], (0.0, 1.0, 0.0), training=True)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_gradient_in_the_input_layout_is_read_in_place(rng, channels_last):
    """dy laid out as x is viewed, not copied; any other layout gives the same dx."""
    from cbn import _layout, functional as F
    shape = (4, 6, 5, 3)

    def laid_out(values):
        if not channels_last:
            return np.ascontiguousarray(values)
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(values, 1, -1)), -1, 1)

    x = laid_out(rng.standard_normal(shape))
    batch = _layout.as_batch(x, 6, None, "")
    assert batch.channels_last == channels_last
    dy = laid_out(rng.standard_normal(shape))
    view = _layout.like(batch, dy)
    assert np.shares_memory(view.view, dy) and view.view.shape == batch.view.shape
    assert np.array_equal(view.view, _layout.like(batch, np.asfortranarray(dy)).view)
    mean, var = F.mean_var(*F.moments(batch))
    _, invstd = F.normalize(batch, mean, var, None, None, 1e-5)
    saved = F.Saved(batch, mean, invstd, None, True, batch.count)
    dx = F.backward(saved, dy)[0]
    other = F.backward(saved, np.asfortranarray(dy))[0]   # the general path: a copy
    np.testing.assert_allclose(dx, other, rtol=1e-12, atol=1e-12)
    xhat = (x - mean.reshape(1, -1, 1, 1)) * invstd.reshape(1, -1, 1, 1)
    axes = (0, 2, 3)
    expected = invstd.reshape(1, -1, 1, 1) * (dy - dy.mean(axes, keepdims=True)
                                              - xhat * (dy * xhat).mean(axes, keepdims=True))
    np.testing.assert_allclose(dx, expected, rtol=1e-10, atol=1e-10)


def test_cache_sizes_are_read_from_sysfs(tmp_path):
    """The streaming threshold's source: level, type and size of each cache index."""
    from cbn import _layout
    for index, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "1024K"), (3, "Unified", "32M")]):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        (entry / "level").write_text(f"{level}\n")
        (entry / "type").write_text(f"{kind}\n")
        (entry / "size").write_text(f"{size}\n")
    assert _layout._cache_bytes(2, 0, root=str(tmp_path)) == 1 << 20
    assert _layout._cache_bytes(3, 0, root=str(tmp_path)) == 32 << 20
    assert _layout._cache_bytes(1, 0, root=str(tmp_path)) == 32 << 10
    assert _layout._cache_bytes(4, 123, root=str(tmp_path)) == 123
    assert _layout._cache_bytes(2, 7, root=str(tmp_path / "missing")) == 7
    (tmp_path / "index2" / "size").write_text("garbage\n")
    assert _layout._cache_bytes(2, 9, root=str(tmp_path)) == 9


def test_outputs_large_enough_to_stream_start_on_a_line(rng):
    """Channels-last y and dx that are streamed start on a 64-byte line."""
    import cbn
    from cbn import _layout
    if _layout._STREAM_MIN_BYTES is None:
        pytest.skip("no streaming stores in this build")
    for shape in [(8, 64, 8, 8), (4, 64, 8, 8)]:
        shape = (shape[0] * -(-_layout._STREAM_MIN_BYTES // (4 * np.prod(shape))),) + shape[1:]
        x = rng.standard_normal(shape, dtype=np.float32)
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)  # channels-last
        layer = cbn.BatchNorm2d(64)
        layer.RECYCLE_BYTES = float("inf")
        with cbn.threads(1):  # (at n threads, outputs of n times that size are streamed)
            y = layer(x)
            dx = layer.backward(np.ones_like(x))
        for out in (y, dx):
            assert out.strides == x.strides
            assert out.__array_interface__["data"][0] % 64 == 0
        axes = (0, 2, 3)
        expected = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    small = cbn.BatchNorm2d(64)(rng.standard_normal((2, 64, 4, 4)))
    assert small.flags.c_contiguous  # np.empty: no alignment asked for


def test_rows_of_whole_lines_stream_and_partial_lines_do_not():
    """Channels-last rows of 64 float32 channels stream when they start on a line, not otherwise."""
    from cbn import _layout
    if _layout._STREAM_MIN_BYTES is None:
        pytest.skip("no streaming stores in this build")
    rows = _layout._STREAM_MIN_BYTES // 256 + 1
    raw = np.empty(rows * 64 + 32, np.float32)
    start = -raw.__array_interface__["data"][0] % 64 // 4
    for offset, streams in ((start, True), (start + 4, False)):
        data = raw[offset:offset + rows * 64].reshape(rows, 64)
        assert _layout._stream(_layout.Batch(data, data, True, data.dtype), 1) == streams
    small = np.empty((16, 64), np.float32)
    assert not _layout._stream(_layout.Batch(small, small, True, small.dtype), 1)
    for size, streams in ((7, False), (14, False), (28, True)):
        # (N, C, S) rows of 49 and 196 floats end in partial lines: not streamed
        # (eval (32,256,14,14) lost 20-30%); rows of 784 floats (3136 bytes) are
        n = _layout._STREAM_MIN_BYTES // (4 * 64 * size * size) + 1
        ncs = _layout.empty_like(_layout.as_batch(np.empty((n, 64, size, size), np.float32),
                                                  64, None, ""))
        assert _layout._stream(ncs, 1) == streams, size
