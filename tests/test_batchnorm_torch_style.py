"""Torch-style constructors and interop of the NumPy layers (cbn.BatchNorm*, cbn.SyncBatchNorm).

The positional order is torch 2.13's; ``device`` is the CPU; ``bias=False``
as torch; cbn and torch state dicts load into each other; CPU tensors
(requiring grad, bfloat16) are accepted as inputs and as the functional
running statistics.
"""
import inspect

import numpy as np
import pytest

import cbn
from cbn import convert
from cbn.functional import batch_norm

CLASSES = [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d]
SHAPES = {cbn.BatchNorm1d: (6, 3, 5), cbn.BatchNorm2d: (4, 3, 5, 2),
          cbn.BatchNorm3d: (2, 3, 4, 2, 3), cbn.SyncBatchNorm: (4, 3, 5, 2)}
TORCH_PARAMS = ["num_features", "eps", "momentum", "affine", "track_running_stats", "device",
                "dtype", "bias"]


def parameters(cls):
    return [(p.name, p.kind, p.default) for p in
            list(inspect.signature(cls.__init__).parameters.values())[1:]]


@pytest.mark.parametrize("cls", CLASSES)
def test_signature_is_torchs(cls):
    names = [name for name, _, _ in parameters(cls)]
    assert names == TORCH_PARAMS
    kinds = {name: kind for name, kind, _ in parameters(cls)}
    assert kinds["bias"] is inspect.Parameter.KEYWORD_ONLY
    assert kinds["device"] is inspect.Parameter.POSITIONAL_OR_KEYWORD
    defaults = {name: default for name, _, default in parameters(cls)}
    assert defaults["device"] is None and defaults["dtype"] is np.float32
    assert defaults["bias"] is True


def test_sync_batchnorm_signature():
    names = [name for name, _, _ in parameters(cbn.SyncBatchNorm)]
    assert names == TORCH_PARAMS[:5] + ["process_group", "device", "dtype", "bias", "timeout"]
    kinds = {name: kind for name, kind, _ in parameters(cbn.SyncBatchNorm)}
    assert kinds["bias"] is kinds["timeout"] is inspect.Parameter.KEYWORD_ONLY


def test_signature_matches_the_installed_torch(torch):
    for ours, theirs in [(cbn.BatchNorm2d, torch.nn.BatchNorm2d),
                         (cbn.SyncBatchNorm, torch.nn.SyncBatchNorm)]:
        mine = [(n, k) for n, k, _ in parameters(ours) if n != "timeout"]
        assert mine == [(p.name, p.kind) for p in
                        list(inspect.signature(theirs.__init__).parameters.values())[1:]]


@pytest.mark.parametrize("device", [None, "cpu", "cpu:0"])
def test_cpu_device_is_accepted(device):
    layer = cbn.BatchNorm2d(3, 1e-5, 0.1, True, True, device)
    assert layer.device == "cpu" and layer.weight.dtype == np.float32


def test_torch_cpu_device_is_accepted(torch):
    cbn.BatchNorm2d(3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        cbn.BatchNorm2d(3, device=torch.device("meta"))


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "meta", 0, "gpu", object()])
@pytest.mark.parametrize("cls", CLASSES + [cbn.SyncBatchNorm])
def test_other_devices_raise(cls, device):
    with pytest.raises(ValueError, match="device must be None or the CPU"):
        cls(3, device=device)


@pytest.mark.parametrize("dtype", [np.float64, "float64", np.dtype("float64")])
def test_dtype_is_the_seventh_argument(dtype):
    layer = cbn.BatchNorm2d(3, 1e-5, 0.1, True, True, None, dtype)
    assert layer.weight.dtype == layer.running_var.dtype == np.float64


def test_torch_dtypes_are_accepted(torch):
    assert cbn.BatchNorm2d(3, dtype=torch.float64).running_mean.dtype == np.float64
    assert cbn.BatchNorm2d(3, dtype=torch.float16).weight.dtype == np.float16
    with pytest.raises(TypeError, match="dtype"):
        cbn.BatchNorm2d(3, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, "str", object])
def test_non_float_dtypes_raise(dtype):
    with pytest.raises(TypeError, match="dtype must be float16, float32 or float64"):
        cbn.BatchNorm2d(3, dtype=dtype)


@pytest.mark.parametrize("cls", CLASSES)
def test_bias_false_has_weight_without_bias(rng, cls):
    layer = cls(3, bias=False)
    assert layer.weight is not None and layer.bias is None and layer.affine
    assert list(layer.state_dict()) == ["weight", "running_mean", "running_var",
                                        "num_batches_tracked"]
    assert "bias=False" in repr(layer)
    layer.weight[...] = [0.5, 2.0, -1.0]
    x = rng.standard_normal(SHAPES[cls]).astype(np.float32)
    y = layer(x)
    with_bias = cls(3)
    with_bias.weight[...] = layer.weight
    np.testing.assert_array_equal(y, with_bias(x))
    dx = layer.backward(np.ones_like(x))
    assert layer.grad_bias is None and layer.grad_weight.shape == (3,)
    np.testing.assert_array_equal(dx, with_bias.backward(np.ones_like(x)))
    layer.reset_parameters()
    assert layer.bias is None and np.all(layer.weight == 1)
    with pytest.raises(ValueError, match="unexpected keys \\['bias'\\]"):
        layer.load_state_dict(with_bias.state_dict())


def test_bias_false_matches_torch(torch, rng):
    ours = cbn.BatchNorm2d(3, bias=False)
    theirs = torch.nn.BatchNorm2d(3, bias=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_()
    ty = theirs(tx)
    ty.backward(torch.ones_like(ty))
    np.testing.assert_allclose(ours(x), ty.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.backward(np.ones_like(x)), tx.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), atol=1e-6)


def test_convert_sync_batchnorm_keeps_bias_false_and_dtype():
    layer = cbn.BatchNorm2d(3, bias=False, dtype=np.float64)
    sync = cbn.SyncBatchNorm.convert_sync_batchnorm(layer)
    assert sync.bias is None and sync.weight is layer.weight and sync.dtype == np.float64


# --- state dicts between cbn and torch ------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cls_name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_cbn_state_dict_loads_into_torch_and_back(torch, rng, cls_name, bias):
    ours = getattr(cbn, cls_name)(3, momentum=0.3, bias=bias)
    shape = SHAPES[type(ours)]
    for _ in range(3):
        ours(rng.standard_normal(shape).astype(np.float32) * 2 + 1)
    ours.weight[...] = rng.uniform(0.5, 2, 3)
    theirs = getattr(torch.nn, cls_name)(3, momentum=0.3, bias=bias)
    theirs.load_state_dict(convert.to_torch_state_dict(ours.state_dict()))
    assert int(theirs.num_batches_tracked) == 3
    theirs.eval(), ours.eval()
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(theirs(torch.from_numpy(x)).detach().numpy(), ours(x),
                               rtol=0, atol=2e-6)
    # ... and back: a torch state dict (or its parameters, which require grad) loads as is.
    again = getattr(cbn, cls_name)(3, bias=bias).eval()
    again.load_state_dict(theirs.state_dict())
    np.testing.assert_array_equal(again(x), ours(x))
    assert again.num_batches_tracked == 3
    again.load_state_dict(dict(theirs.named_parameters()), strict=False)


def test_to_torch_state_dict_values(torch):
    state = convert.to_torch_state_dict(cbn.BatchNorm2d(2, dtype=np.float64).state_dict())
    assert state["num_batches_tracked"].dtype == torch.long
    assert state["num_batches_tracked"].shape == ()
    assert state["weight"].dtype == torch.float64
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        convert.to_torch_state_dict([1, 2])
    with pytest.raises(TypeError, match="'running_mean' must hold real numbers"):
        convert.to_torch_state_dict({"running_mean": np.array(["a"])})


# --- CPU tensors in --------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_a_tensor_that_requires_grad_is_accepted(torch, rng, training):
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    tensor = torch.from_numpy(x.copy()).requires_grad_()
    a, b = cbn.BatchNorm2d(3).train(training), cbn.BatchNorm2d(3).train(training)
    y = a(tensor)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_array_equal(y, b(x))
    dy = torch.ones(4, 3, 2, 2, requires_grad=True)
    np.testing.assert_array_equal(a.backward(dy), b.backward(np.ones_like(x)))
    assert tensor.grad is None  # nothing goes through autograd


def test_bfloat16_tensors_are_computed_in_float32(torch, rng):
    x = torch.from_numpy(rng.standard_normal((4, 3, 5)).astype(np.float32)).bfloat16()
    layer, reference = cbn.BatchNorm1d(3), cbn.BatchNorm1d(3)
    y = layer(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32  # NumPy has no bfloat16
    np.testing.assert_array_equal(y, reference(x.float().numpy()))
    np.testing.assert_array_equal(layer.running_mean, reference.running_mean)
    dx = layer.backward(torch.ones(4, 3, 5, dtype=torch.bfloat16))
    assert dx.dtype == np.float32


def test_a_non_cpu_tensor_raises(torch):
    x = torch.ones(2, 3, device="meta")
    with pytest.raises(ValueError, match="input must be a CPU tensor"):
        cbn.BatchNorm1d(3)(x)


def test_functional_updates_tensor_running_statistics_in_place(torch, rng):
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    mean, var = torch.zeros(3), torch.ones(3)
    their_mean, their_var = torch.zeros(3), torch.ones(3)
    y = batch_norm(torch.from_numpy(x), mean, var, training=True, momentum=0.3)
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), their_mean, their_var,
                                              training=True, momentum=0.3)
    np.testing.assert_allclose(y, expected.numpy(), atol=2e-6)
    np.testing.assert_allclose(mean.numpy(), their_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(var.numpy(), their_var.numpy(), atol=1e-6)
    assert float(mean.abs().sum()) > 0  # really updated
    # In eval the tensors normalise.
    np.testing.assert_allclose(batch_norm(x, mean, var), torch.nn.functional.batch_norm(
        torch.from_numpy(x), their_mean, their_var).numpy(), atol=2e-6)


def test_functional_bfloat16_running_statistics_are_written_back(torch, rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    mean, var = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    reference_mean, reference_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    batch_norm(x, mean, var, training=True, momentum=0.5)
    batch_norm(x, reference_mean, reference_var, training=True, momentum=0.5)
    np.testing.assert_array_equal(mean.float().numpy(),
                                  torch.from_numpy(reference_mean).bfloat16().float().numpy())
    np.testing.assert_array_equal(var.float().numpy(),
                                  torch.from_numpy(reference_var).bfloat16().float().numpy())


def test_functional_bad_tensor_statistics_change_nothing(torch):
    x = np.ones((4, 3))
    mean, var = torch.zeros(3), torch.ones(2)
    with pytest.raises(ValueError, match="running_var must have shape"):
        batch_norm(x, mean, var, training=True)
    assert float(mean.abs().sum()) == 0
    with pytest.raises(TypeError, match="running_mean must be a floating-point"):
        batch_norm(x, torch.zeros(3, dtype=torch.int64), torch.ones(3), training=True)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_mindspore_layers_accept_tensors_that_require_grad(torch, rng, data_format):
    import cbn.mindspore as ms
    shape = (4, 3, 2, 2) if data_format == "NCHW" else (4, 2, 2, 3)
    x = rng.standard_normal(shape).astype(np.float32)
    a = ms.BatchNorm2d(3, data_format=data_format).set_train()
    b = ms.BatchNorm2d(3, data_format=data_format).set_train()
    y = a(torch.from_numpy(x).requires_grad_())
    np.testing.assert_array_equal(y, b(x))
    dy = torch.ones(*shape, requires_grad=True)
    np.testing.assert_array_equal(a.backward(dy), b.backward(np.ones_like(x)))
