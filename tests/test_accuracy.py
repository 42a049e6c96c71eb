"""Output accuracy far from zero: every output against the float64 twin, in ulps.

Data ``offset + std * N(0, 1)`` per channel with ``offset / std`` up to 1e4.
An output ``y = xhat * w + b`` is a sum of terms; an implementation that
rounds each term once in the data's dtype is off by a few units in the last
place (ulps) of the largest term, ``|xhat * w| + |b|``, however large the
offset.  ``x * scale + (b - mean * scale)`` is not: it loses
``|mean * scale| * 2**-24``, about 600 ulps at ``offset / std = 1e4``.

The error unit is the dtype's ulp of that magnitude (``eps * magnitude``,
eps = 2**-23 for float32), per element; the bound is ``ULPS`` of them.

float64 data: eval outputs meet the same bound in float64 ulps.  In training
the float64 batch mean itself is rounded, by up to ``|mean| * 2**-53``, which
is about 1e4 float64 ulps of ``xhat`` at ``offset / std = 1e4`` (a billionth
of a float32 ulp); those are bounded by ``ULPS_F64_TRAIN`` ulps of the
channel's largest output.
Outputs checked: train forward, eval forward and the input gradient in
training and in eval, NCHW and channels-last, float32 and float64, through
the NumPy layers, the functional API and (when installed) cbn.torch.

``python tests/test_accuracy.py`` prints the errors over the grid.
"""

import numpy as np
import pytest

import cbn
from cbn import functional as cbn_functional
from twin import twin_backward, twin_batch_norm

OFFSETS = [0.0, 1.0, 1e2, 1e3, 1e4]   # offset / std
ULPS = 4.0                             # bound, in ulps of the largest term
ULPS_F64_TRAIN = 2.0 ** 16             # float64 training, see the docstring
SHAPE = (8, 6, 9, 10)
EPS = 1e-5


def offset_data(rng, shape, dtype, offset_over_std, channels_last):
    """Per channel: ``sign * offset_over_std * std + std * N(0, 1)``, std in [0.5, 2]."""
    channels = shape[1]
    std = rng.uniform(0.5, 2.0, channels)
    sign = rng.choice([-1.0, 1.0], channels)
    bshape = (1, channels) + (1,) * (len(shape) - 2)
    x = (sign * offset_over_std * std).reshape(bshape) + std.reshape(bshape) * \
        rng.standard_normal(shape)
    return in_layout(x.astype(dtype), channels_last)


def in_layout(a, channels_last):
    if not channels_last or a.ndim < 3:
        return np.ascontiguousarray(a)
    stored = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    return np.moveaxis(stored, -1, 1)


def ulp_error(actual, expected, magnitude, dtype, per_channel=False):
    """max |actual - expected| in ulps of ``magnitude`` (elementwise, or its channel's max)."""
    if per_channel:
        magnitude = np.max(magnitude, axis=(0,) + tuple(range(2, magnitude.ndim)),
                           keepdims=True)
    unit = np.finfo(dtype).eps * np.maximum(magnitude, np.finfo(dtype).tiny)
    return float(np.max(np.abs(actual.astype(np.float64) - expected) / unit))


def parameters(rng, channels, dtype):
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype)
    bias = rng.uniform(-1.0, 1.0, channels).astype(dtype)
    return weight, bias


def forward_magnitude(x, mean, var, weight, bias):
    """|xhat * w| + |b| from the float64 twin's statistics."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    xhat = (x.astype(np.float64) - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS)
    return np.abs(xhat * weight.astype(np.float64).reshape(shape)) + \
        np.abs(bias.astype(np.float64).reshape(shape))


def backward_magnitude(x, dy, mean, var, weight, training):
    """The terms of dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), in absolute value."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    dy = dy.astype(np.float64)
    invstd = 1.0 / np.sqrt(var.reshape(shape) + EPS)
    xhat = (x.astype(np.float64) - mean.reshape(shape)) * invstd
    a = np.abs(weight.astype(np.float64).reshape(shape) * invstd)
    if not training:
        return a * np.abs(dy)
    return a * (np.abs(dy) + np.abs(dy.mean(axis=axes, keepdims=True))
                + np.abs(xhat * (dy * xhat).mean(axis=axes, keepdims=True)))


def layer_errors(rng, dtype, offset_over_std, channels_last, training, shape=SHAPE):
    """(forward ulps, backward ulps) of a cbn.BatchNorm2d against the twin."""
    x = offset_data(rng, shape, dtype, offset_over_std, channels_last)
    dy = in_layout(rng.standard_normal(shape).astype(dtype), channels_last)
    channels = shape[1]
    weight, bias = parameters(rng, channels, dtype)
    layer = cbn.BatchNorm2d(channels, eps=EPS, dtype=dtype)
    layer.weight[...] = weight
    layer.bias[...] = bias
    x64 = x.astype(np.float64)
    if not training:
        # Running statistics close to the data's own, as after training on it.
        axes = (0, 2, 3)
        layer.running_mean[...] = x64.mean(axis=axes) + 0.1 * x64.std(axis=axes)
        layer.running_var[...] = x64.var(axis=axes) * 1.2
        layer.eval()
    # Far from zero the twin runs on data moved near zero by a value of each
    # channel (batch norm does not change under that shift; the subtraction is
    # exact there): its own float64 rounding at offset 1e4 would otherwise
    # swamp the ulps of a float64 output.
    centre = x64[0, :, 0, 0].copy() if offset_over_std >= 100 else np.zeros(channels)
    x_ref = x64 - centre.reshape(1, -1, 1, 1)
    ref = twin_batch_norm(x_ref, layer.running_mean - centre, layer.running_var, weight, bias,
                          training, 0.1, EPS)
    y = layer(x)
    dx = layer.backward(dy)
    ref_dx = twin_backward(x_ref, dy, weight, EPS, training, ref.mean, ref.var).dx
    coarse = training and dtype == np.float64
    forward = ulp_error(y, ref.y, forward_magnitude(x_ref, ref.mean, ref.var, weight, bias),
                        dtype, coarse)
    backward = ulp_error(dx, ref_dx,
                         backward_magnitude(x_ref, dy, ref.mean, ref.var, weight, training),
                         dtype, coarse)
    return forward, backward


def bound(dtype, training):
    return ULPS_F64_TRAIN if training and dtype == np.float64 else ULPS


GRID = [
    pytest.param(dtype, offset, channels_last, training,
                 id=f"{np.dtype(dtype).name}-{offset:g}-{'cl' if channels_last else 'nchw'}-"
                    f"{'train' if training else 'eval'}")
    for dtype in (np.float32, np.float64)
    for offset in OFFSETS
    for channels_last in (False, True)
    for training in (True, False)
]


@pytest.mark.parametrize("dtype, offset, channels_last, training", GRID)
def test_layer_outputs_are_exact_to_a_few_ulps(rng, dtype, offset, channels_last, training):
    forward, backward = layer_errors(rng, dtype, offset, channels_last, training)
    assert forward <= bound(dtype, training), f"forward off by {forward:.1f} ulps"
    assert backward <= bound(dtype, training), f"input gradient off by {backward:.1f} ulps"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_functional_output_is_exact_at_offset_1e4(rng, channels_last, training):
    x = offset_data(rng, SHAPE, np.float32, 1e4, channels_last)
    x64 = x.astype(np.float64)
    weight, bias = parameters(rng, SHAPE[1], np.float32)
    running_mean = x64.mean(axis=(0, 2, 3)).astype(np.float32)
    running_var = x64.var(axis=(0, 2, 3)).astype(np.float32)
    ref = twin_batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, EPS)
    y = cbn_functional.batch_norm(x, running_mean.copy(), running_var.copy(), weight, bias,
                                  training=training, eps=EPS)
    error = ulp_error(y, ref.y, forward_magnitude(x, ref.mean, ref.var, weight, bias),
                      np.float32)
    assert error <= ULPS, f"off by {error:.1f} ulps"


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_outputs_are_exact_at_offset_1e4(rng, torch, channels_last):
    import cbn.torch as cbn_torch
    x = offset_data(rng, SHAPE, np.float32, 1e4, channels_last)
    dy = in_layout(rng.standard_normal(SHAPE).astype(np.float32), channels_last)
    weight, bias = parameters(rng, SHAPE[1], np.float32)
    layer = cbn_torch.SyncBatchNorm(SHAPE[1], eps=EPS)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x) if not channels_last else \
        torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=torch.channels_last)
    xt.requires_grad_(True)
    y = layer(xt)
    y.backward(torch.from_numpy(np.ascontiguousarray(dy)))
    ref = twin_batch_norm(x, None, None, weight, bias, True, 0.1, EPS)
    ref_dx = twin_backward(x, dy, weight, EPS, True, ref.mean, ref.var).dx
    forward = ulp_error(y.detach().numpy(), ref.y,
                        forward_magnitude(x, ref.mean, ref.var, weight, bias), np.float32)
    backward = ulp_error(xt.grad.numpy(), ref_dx,
                         backward_magnitude(x, dy, ref.mean, ref.var, weight, True), np.float32)
    assert forward <= ULPS, f"forward off by {forward:.1f} ulps"
    assert backward <= ULPS, f"input gradient off by {backward:.1f} ulps"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("value", [1e4, -3e5, 0.1])
def test_a_constant_channel_gives_the_bias(channels_last, value):
    """x == value everywhere: xhat is 0, so y is exactly the bias (and dx exactly 0 for dy=1)."""
    x = in_layout(np.full((4, 3, 5, 5), value, np.float32), channels_last)
    layer = cbn.BatchNorm2d(3)
    layer.bias[...] = [0.0, 0.5, -2.0]
    y = layer(x)
    assert np.array_equal(y, np.broadcast_to(layer.bias.reshape(1, 3, 1, 1), y.shape))
    dx = layer.backward(np.ones_like(x))
    assert np.array_equal(dx, np.zeros_like(dx))


def test_variance_stays_accurate_at_offset_1e4(rng):
    """The running variance of 1e4 + N(0, 1) float32 data: float64 accuracy (anchors.md)."""
    x = in_layout((1e4 + rng.standard_normal((16, 4, 32, 32))).astype(np.float32), True)
    layer = cbn.BatchNorm2d(4, momentum=1.0, dtype=np.float64)
    layer(x)
    x64 = x.astype(np.float64)
    unbiased = x64.var(axis=(0, 2, 3), ddof=1)
    assert np.all(np.abs(layer.running_var - unbiased) / unbiased <= 1e-9)


def main():
    rng = np.random.default_rng(0)
    print(f"{'dtype':8s} {'offset/std':>10s} {'layout':6s} {'mode':5s} "
          f"{'fwd ulps':>9s} {'dx ulps':>9s}  (float64 train: ulps of the channel's max)")
    for dtype in (np.float32, np.float64):
        for offset in OFFSETS:
            for channels_last in (False, True):
                for training in (True, False):
                    fwd, bwd = layer_errors(rng, dtype, offset, channels_last, training,
                                            shape=(32, 8, 14, 14))
                    print(f"{np.dtype(dtype).name:8s} {offset:10g} "
                          f"{'CL' if channels_last else 'NCHW':6s} "
                          f"{'train' if training else 'eval':5s} {fwd:9.2f} {bwd:9.2f}")
    for channels_last in (False, True):
        x = in_layout(np.full((4, 3, 5, 5), 1e4, np.float32), channels_last)
        y = cbn.BatchNorm2d(3)(x)
        print(f"constant channel 1e4 ({'CL' if channels_last else 'NCHW'}): "
              f"max |y| = {np.max(np.abs(y)):.3g} (exact: 0)")


if __name__ == "__main__":
    main()
