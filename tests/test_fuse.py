"""cbn.fuse: a folded layer computes what the layer followed by batch norm computes.

The references are plain NumPy: a direct (cross-correlation) convolution, a
transposed convolution that scatters each input value through the kernel, both
with groups, and the cbn batch-norm layers themselves in inference mode.
"""
import itertools

import numpy as np
import pytest

import cbn
import cbn.mindspore as ms
from cbn.fuse import fuse_conv_bn, fuse_linear_bn, inference_scale_shift

TORCH_BN = {1: cbn.BatchNorm1d, 2: cbn.BatchNorm2d, 3: cbn.BatchNorm3d}
MS_BN = {1: ms.BatchNorm1d, 2: ms.BatchNorm2d, 3: ms.BatchNorm3d}
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


# --- NumPy references -----------------------------------------------------------

def conv(x, weight, bias, groups=1):
    """Cross-correlation, stride 1, no padding: x (N, C_in, *S), weight (C_out, C_in/g, *K)."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    kernel = weight.shape[2:]
    d = len(kernel)
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=tuple(range(2, 2 + d)))
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    windows = windows.reshape((n, groups, c_in // groups) + windows.shape[2:])
    w = weight.reshape((groups, c_out // groups) + weight.shape[1:])
    s, k = "stu"[:d], "xyz"[:d]
    y = np.einsum(f"ngi{s}{k},goi{k}->ngo{s}", windows, w)
    y = y.reshape((n, c_out) + y.shape[3:])
    return y if bias is None else y + np.reshape(bias, (-1,) + (1,) * d)


def conv_transpose(x, weight, bias, groups=1):
    """Transposed convolution, stride 1, no padding: x (N, C_in, *S), weight (C_in, C_out/g, *K)."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    kernel, spatial = weight.shape[2:], x.shape[2:]
    d = len(kernel)
    n, c_in = x.shape[:2]
    per_group = weight.shape[1]
    xg = x.reshape((n, groups, c_in // groups) + spatial)
    wg = weight.reshape((groups, c_in // groups, per_group) + kernel)
    y = np.zeros((n, groups, per_group) + tuple(s + k - 1 for s, k in zip(spatial, kernel)))
    s = "stu"[:d]
    for offset in itertools.product(*(range(k) for k in kernel)):
        target = tuple(slice(o, o + size) for o, size in zip(offset, spatial))
        y[(Ellipsis,) + target] += np.einsum(f"ngi{s},gio->ngo{s}", xg,
                                             wg[(Ellipsis,) + offset])
    y = y.reshape((n, groups * per_group) + y.shape[3:])
    return y if bias is None else y + np.reshape(bias, (-1,) + (1,) * d)


def make_bn(flavour, d, channels, dtype, rng, **kwargs):
    """An inference-mode batch-norm layer with parameters and statistics far from the defaults."""
    if flavour == "torch":
        bn = TORCH_BN[d](channels, eps=1e-3, dtype=dtype, **kwargs).eval()
        if bn.affine:
            bn.weight[...] = rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)
            bn.bias[...] = rng.uniform(-1, 1, channels)
        bn.running_mean[...] = rng.uniform(-2, 2, channels)
        bn.running_var[...] = rng.uniform(0.2, 3.0, channels)
        return bn
    bn = MS_BN[d](channels, eps=1e-3, dtype=dtype, **kwargs)
    bn.gamma = rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)
    bn.beta = rng.uniform(-1, 1, channels)
    bn.moving_mean = rng.uniform(-2, 2, channels)
    bn.moving_variance = rng.uniform(0.2, 3.0, channels)
    return bn


def assert_folds(layer, x, weight, bias, bn, fused_weight, fused_bias, dtype, **conv_kwargs):
    """bn(layer(x)) in the layer's dtype equals layer'(x), within the dtype's tolerance."""
    reference = bn(layer(x, weight, bias, **conv_kwargs).astype(dtype))
    folded = layer(x, fused_weight, fused_bias, **conv_kwargs)
    assert fused_weight.dtype == dtype and fused_bias.dtype == dtype
    assert fused_weight.shape == np.shape(weight) and fused_bias.shape == (reference.shape[1],)
    np.testing.assert_allclose(folded, reference, **TOL[dtype])


# --- folding ----------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["torch", "mindspore"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear(flavour, dtype, with_bias, rng):
    weight = rng.standard_normal((6, 5)).astype(dtype)
    bias = rng.standard_normal(6).astype(dtype) if with_bias else None
    bn = make_bn(flavour, 1, 6, dtype, rng)
    x = rng.standard_normal((7, 5)).astype(dtype)
    fused_weight, fused_bias = fuse_linear_bn(weight, bias, bn)

    def linear(x, w, b):
        y = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
        return y if b is None else y + b
    assert_folds(linear, x, weight, bias, bn, fused_weight, fused_bias, dtype)


CONV_CASES = [  # (d, c_in, c_out, groups)
    (1, 4, 6, 1), (1, 4, 6, 2), (2, 3, 5, 1), (2, 4, 6, 2), (2, 4, 8, 4),
    (3, 2, 3, 1), (3, 4, 4, 4),
]


@pytest.mark.parametrize("flavour", ["torch", "mindspore"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("d,c_in,c_out,groups", CONV_CASES)
def test_convolution(flavour, dtype, with_bias, transposed, d, c_in, c_out, groups, rng):
    kernel = (3, 2, 2)[:d]
    if transposed:
        weight = rng.standard_normal((c_in, c_out // groups) + kernel).astype(dtype)
    else:
        weight = rng.standard_normal((c_out, c_in // groups) + kernel).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype) if with_bias else None
    bn = make_bn(flavour, d, c_out, dtype, rng)
    x = rng.standard_normal((2, c_in) + (5, 4, 3)[:d]).astype(dtype)
    fused_weight, fused_bias = fuse_conv_bn(weight, bias, bn, transposed=transposed,
                                            groups=groups)
    layer = conv_transpose if transposed else conv
    assert_folds(layer, x, weight, bias, bn, fused_weight, fused_bias, dtype, groups=groups)


def test_the_numpy_references_agree_with_torch(torch, rng):
    """The references above compute what torch's convolutions do (so the folding tests mean it)."""
    functional = torch.nn.functional
    for d, c_in, c_out, groups in CONV_CASES:
        x = rng.standard_normal((2, c_in) + (5, 4, 3)[:d])
        kernel = (3, 2, 2)[:d]
        bias = rng.standard_normal(c_out)
        weight = rng.standard_normal((c_out, c_in // groups) + kernel)
        expected = getattr(functional, f"conv{d}d")(
            torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), groups=groups)
        np.testing.assert_allclose(conv(x, weight, bias, groups), expected.numpy(), rtol=1e-12,
                                   atol=1e-12)
        weight = rng.standard_normal((c_in, c_out // groups) + kernel)
        expected = getattr(functional, f"conv_transpose{d}d")(
            torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), groups=groups)
        np.testing.assert_allclose(conv_transpose(x, weight, bias, groups), expected.numpy(),
                                   rtol=1e-12, atol=1e-12)


def test_grouped_transposed_convolution_scales_axis_1_within_each_group(rng):
    # Output channel o = g * (C_out / groups) + j lives in weight[group g's inputs, j].
    bn = make_bn("torch", 1, 4, np.float64, rng)
    weight = rng.standard_normal((6, 2, 3))
    scale, _ = inference_scale_shift(bn)
    fused, _ = fuse_conv_bn(weight, None, bn, transposed=True, groups=2)
    np.testing.assert_allclose(fused[:3], weight[:3] * scale[:2, None], rtol=1e-15)
    np.testing.assert_allclose(fused[3:], weight[3:] * scale[2:, None], rtol=1e-15)


def test_affine_false_means_gamma_one_beta_zero(rng):
    bn = make_bn("torch", 2, 3, np.float64, rng, affine=False)
    weight, bias = rng.standard_normal((3, 2, 1, 1)), rng.standard_normal(3)
    fused_weight, fused_bias = fuse_conv_bn(weight, bias, bn)
    invstd = 1 / np.sqrt(bn.running_var + bn.eps)
    np.testing.assert_allclose(fused_weight, weight * invstd[:, None, None, None], rtol=1e-14)
    np.testing.assert_allclose(fused_bias, (bias - bn.running_mean) * invstd, rtol=1e-14)


def test_formula_written_out(rng):
    """w' = w * gamma / sqrt(var + eps) and b' = (b - mean) * gamma / sqrt(var + eps) + beta."""
    for flavour in ("torch", "mindspore"):
        bn = make_bn(flavour, 1, 3, np.float64, rng)
        gamma, beta, mean, var = ((bn.weight, bn.bias, bn.running_mean, bn.running_var)
                                  if flavour == "torch" else
                                  (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
        weight, bias = rng.standard_normal((3, 4)), rng.standard_normal(3)
        fused_weight, fused_bias = fuse_linear_bn(weight, bias, bn)
        factor = gamma / np.sqrt(var + bn.eps)
        np.testing.assert_allclose(fused_weight, weight * factor[:, None], rtol=1e-14)
        np.testing.assert_allclose(fused_bias, (bias - mean) * factor + beta, rtol=1e-14)


def test_sync_batchnorm_in_eval_mode_folds(rng):
    bn = cbn.SyncBatchNorm(3).eval()
    bn.running_var[...] = [0.5, 2.0, 4.0]
    weight = np.ones((3, 2, 1), np.float32)
    fused_weight, fused_bias = fuse_conv_bn(weight, None, bn)
    np.testing.assert_allclose(fused_weight[:, 0, 0], 1 / np.sqrt(bn.running_var + bn.eps),
                               rtol=1e-6)
    np.testing.assert_array_equal(fused_bias, 0)


def test_mindspore_sync_batchnorm_folds(rng):
    bn = ms.SyncBatchNorm(3, moving_var_init=4.0, gamma_init=2.0, beta_init=0.5)
    fused_weight, fused_bias = fuse_linear_bn(np.ones((3, 2)), np.ones(3), bn)
    np.testing.assert_allclose(fused_weight, 2 / np.sqrt(4 + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(fused_bias, 2 / np.sqrt(4 + 1e-5) + 0.5, rtol=1e-12)


def test_inputs_are_not_written_to_and_may_be_read_only(rng):
    bn = make_bn("mindspore", 2, 4, np.float32, rng)
    weight = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    copies = [a.copy() for a in (weight, bias, bn.gamma, bn.beta, bn.moving_mean,
                                 bn.moving_variance)]
    weight.flags.writeable = bias.flags.writeable = False
    fused_weight, fused_bias = fuse_conv_bn(weight, bias, bn)
    for before, after in zip(copies, (weight, bias, bn.gamma, bn.beta, bn.moving_mean,
                                      bn.moving_variance)):
        np.testing.assert_array_equal(before, after)
    assert not np.shares_memory(fused_weight, weight) and not np.shares_memory(fused_bias, bias)


def test_float16_weight_is_computed_in_float64_and_returned_as_float16(rng):
    bn = make_bn("torch", 1, 3, np.float64, rng)
    weight = rng.standard_normal((3, 2)).astype(np.float16)
    fused_weight, fused_bias = fuse_linear_bn(weight, None, bn)
    scale, shift = inference_scale_shift(bn)
    assert fused_weight.dtype == fused_bias.dtype == np.float16
    np.testing.assert_array_equal(fused_weight,
                                  (weight.astype(np.float64) * scale[:, None]).astype(np.float16))
    np.testing.assert_array_equal(fused_bias, shift.astype(np.float16))


def test_a_torch_tensor_weight_is_accepted(torch, rng):
    bn = make_bn("torch", 2, 4, np.float32, rng)
    weight = torch.randn(4, 3, 3, 3)
    fused_weight, _ = fuse_conv_bn(weight, torch.zeros(4), bn)
    expected, _ = fuse_conv_bn(weight.numpy().copy(), np.zeros(4, np.float32), bn)
    np.testing.assert_array_equal(fused_weight, expected)


# --- errors -------------------------------------------------------------------------

def test_channel_mismatch_names_both_counts(rng):
    bn = make_bn("torch", 2, 5, np.float32, rng)
    with pytest.raises(ValueError, match=r"6 output channels.*5 features"):
        fuse_conv_bn(np.ones((6, 3, 3, 3), np.float32), None, bn)
    with pytest.raises(ValueError, match=r"6 output channels.*5 features"):
        fuse_conv_bn(np.ones((4, 3, 3, 3), np.float32), None, bn, transposed=True, groups=2)
    with pytest.raises(ValueError, match=r"6 output channels.*5 features"):
        fuse_linear_bn(np.ones((6, 3), np.float32), None, bn)


def test_bias_of_the_wrong_shape(rng):
    bn = make_bn("torch", 2, 4, np.float32, rng)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\).*\(3,\)"):
        fuse_conv_bn(np.ones((4, 3, 3, 3), np.float32), np.zeros(3), bn)


def test_groups_must_divide_the_channels(rng):
    bn = make_bn("torch", 2, 6, np.float32, rng)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        fuse_conv_bn(np.ones((6, 1, 3, 3), np.float32), None, bn, groups=4)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        fuse_conv_bn(np.ones((6, 2, 3, 3), np.float32), None, bn, transposed=True, groups=4)
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        fuse_conv_bn(np.ones((6, 1, 3, 3), np.float32), None, bn, groups=0)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: cbn.BatchNorm2d(3), id="torch-training"),
    pytest.param(lambda: cbn.BatchNorm2d(3, track_running_stats=False).eval(),
                 id="torch-no-running-stats"),
    pytest.param(lambda: ms.BatchNorm2d(3).set_train(), id="mindspore-training"),
    pytest.param(lambda: ms.BatchNorm2d(3, use_batch_statistics=True),
                 id="mindspore-use-batch-statistics"),
])
def test_a_layer_using_batch_statistics_cannot_be_folded(make):
    with pytest.raises(ValueError, match="batch statistics"):
        fuse_conv_bn(np.ones((3, 3, 1, 1), np.float32), None, make())


def test_mindspore_training_with_moving_statistics_folds():
    bn = ms.BatchNorm2d(3, use_batch_statistics=False).set_train()
    fused_weight, _ = fuse_conv_bn(np.ones((3, 3, 1, 1), np.float32), None, bn)
    np.testing.assert_allclose(fused_weight, 1 / np.sqrt(1 + 1e-5), rtol=1e-7)


def test_wrong_types():
    bn = cbn.BatchNorm1d(3).eval()
    with pytest.raises(TypeError, match="floating-point"):
        fuse_linear_bn(np.ones((3, 2), np.int64), None, bn)
    with pytest.raises(TypeError, match="cbn batch-norm layer"):
        fuse_linear_bn(np.ones((3, 2)), None, object())
    with pytest.raises(ValueError, match=r"\(C_out, C_in\)"):
        fuse_linear_bn(np.ones((3, 2, 1)), None, bn)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fuse_conv_bn(np.ones(3), None, bn)
