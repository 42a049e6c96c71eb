"""Differential tests against torch.nn.BatchNorm1d/2d/3d and F.batch_norm (CPU).

Every test takes the ``torch`` fixture of conftest.py: skipped with a reason when
torch is missing, a failure when CBN_REQUIRE_TORCH=1.  Errors are measured as
max |cbn - torch| / max |torch|.
"""

import sys

import numpy as np
import pytest

import cbn
import cbn.functional
import conftest
from twin import make_input

REL_TOL = {np.float32: 1e-4, np.float64: 1e-9}

CASES = [
    pytest.param("BatchNorm1d", (6, 4), id="1d-NC"),
    pytest.param("BatchNorm1d", (4, 3, 7), id="1d-NCL"),
    pytest.param("BatchNorm2d", (3, 4, 5, 6), id="2d"),
    pytest.param("BatchNorm3d", (2, 3, 4, 3, 5), id="3d"),
]
MODES = [
    pytest.param(True, True, id="train-track"),
    pytest.param(True, False, id="train-notrack"),
    pytest.param(False, True, id="eval-track"),
    pytest.param(False, False, id="eval-notrack"),
]


def torch_dtype(torch, dtype):
    return {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}[dtype]


def to_torch(torch, a, channels_last=False):
    t = torch.from_numpy(np.ascontiguousarray(a))
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last if a.ndim == 4 else torch.channels_last_3d)
    return t


def assert_rel_close(actual, expected, tol, what):
    expected = expected.detach().numpy() if hasattr(expected, "detach") else np.asarray(expected)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.max(np.abs(expected.astype(np.float64)), initial=0.0)
    error = np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0)
    assert np.isfinite(error), f"{what}: non-finite values"
    assert error <= tol * max(scale, 1e-30), f"{what}: relative error {error / scale:.3g} > {tol}"


def paired_layers(torch, name, channels, rng, dtype, **kwargs):
    """A torch module and a cbn layer holding the same random parameters and stats."""
    torch_layer = getattr(torch.nn, name)(channels, dtype=torch_dtype(torch, dtype), **kwargs)
    cbn_layer = getattr(cbn, name)(channels, dtype=dtype, **kwargs)
    values = {
        "weight": rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels),
        "bias": rng.uniform(-1, 1, channels),
        "running_mean": rng.uniform(-1, 1, channels),
        "running_var": rng.uniform(0.5, 2.0, channels),
    }
    with torch.no_grad():
        for key, value in values.items():
            current = getattr(cbn_layer, key)
            if current is not None:
                current[...] = value
                getattr(torch_layer, key).copy_(torch.from_numpy(value))
    return torch_layer, cbn_layer


# --------------------------------------------------------------------------- conftest's torch gate


def test_missing_torch_skips_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    monkeypatch.delenv(conftest.REQUIRE_TORCH_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="torch is not installed"):
        conftest.import_torch_or_skip()


def test_missing_torch_fails_when_required(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setenv(conftest.REQUIRE_TORCH_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match="CBN_REQUIRE_TORCH=1"):
        conftest.import_torch_or_skip()


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("training, track", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "name, shape, channels_last",
    [pytest.param(*case.values, False, id=f"{case.id}-contiguous") for case in CASES]
    + [pytest.param(*case.values, True, id=f"{case.id}-channels_last")
       for case in CASES if len(case.values[1]) >= 4],  # torch's channels_last is 4-D/5-D
)
def test_module_matches_torch(torch, rng, name, shape, dtype, channels_last, training, track, momentum):
    tol = REL_TOL[dtype]
    torch_layer, cbn_layer = paired_layers(torch, name, shape[1], rng, dtype,
                                         momentum=momentum, track_running_stats=track)
    torch_layer.train(training)
    cbn_layer.train(training)

    for step in range(3):
        x_torch = to_torch(torch, make_input(rng, shape, dtype), channels_last).requires_grad_()
        x = x_torch.detach().numpy()  # same memory layout as the torch tensor
        y_torch = torch_layer(x_torch)
        y = cbn_layer(x)
        assert_rel_close(y, y_torch, tol, f"output, step {step}")
        if channels_last:
            assert np.moveaxis(y, 1, -1).flags.c_contiguous
            assert y_torch.is_contiguous(memory_format=torch.channels_last if len(shape) == 4
                                         else torch.channels_last_3d)

        if track:
            assert_rel_close(cbn_layer.running_mean, torch_layer.running_mean, tol, "running_mean")
            assert_rel_close(cbn_layer.running_var, torch_layer.running_var, tol, "running_var")
            assert cbn_layer.num_batches_tracked == int(torch_layer.num_batches_tracked)
        else:
            assert cbn_layer.running_mean is None and torch_layer.running_mean is None

        dy_torch = to_torch(torch, make_input(rng, shape, dtype), channels_last)
        torch_layer.zero_grad(set_to_none=True)
        y_torch.backward(dy_torch)
        dx = cbn_layer.backward(dy_torch.numpy())
        assert_rel_close(dx, x_torch.grad, tol, f"dx, step {step}")
        assert_rel_close(cbn_layer.grad_weight, torch_layer.weight.grad, tol, "grad_weight")
        assert_rel_close(cbn_layer.grad_bias, torch_layer.bias.grad, tol, "grad_bias")


@pytest.mark.parametrize("name, shape", CASES)
def test_module_without_affine_matches_torch(torch, rng, name, shape):
    torch_layer, cbn_layer = paired_layers(torch, name, shape[1], rng, np.float64, affine=False)
    x_torch = to_torch(torch, make_input(rng, shape, np.float64)).requires_grad_()
    y_torch = torch_layer(x_torch)
    assert_rel_close(cbn_layer(x_torch.detach().numpy()), y_torch, REL_TOL[np.float64], "output")
    dy = make_input(rng, shape, np.float64)
    y_torch.backward(torch.from_numpy(dy))
    assert_rel_close(cbn_layer.backward(dy), x_torch.grad, REL_TOL[np.float64], "dx")
    assert cbn_layer.grad_weight is None and cbn_layer.grad_bias is None


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_float16_input_matches_torch(torch, rng, channels_last):
    torch_layer, cbn_layer = paired_layers(torch, "BatchNorm2d", 3, rng, np.float32)
    x_torch = to_torch(torch, make_input(rng, (2, 3, 4, 5), np.float16), channels_last)
    y_torch = torch_layer(x_torch)
    y = cbn_layer(x_torch.numpy())
    assert y.dtype == np.float16 and y_torch.dtype == torch.float16
    assert_rel_close(y, y_torch, 2e-3, "float16 output")  # one float16 rounding each
    assert_rel_close(cbn_layer.running_var, torch_layer.running_var, 1e-4, "running_var")


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_matches_torch(torch, rng, training):
    torch_layer, cbn_layer = paired_layers(torch, "BatchNorm2d", 3, rng, np.float32)
    torch_layer.train(training)
    cbn_layer.train(training)
    y_torch = torch_layer(torch.zeros(0, 3, 4, 4))
    y = cbn_layer(np.zeros((0, 3, 4, 4), np.float32))
    assert y.shape == tuple(y_torch.shape)
    assert cbn_layer.num_batches_tracked == int(torch_layer.num_batches_tracked)
    assert_rel_close(cbn_layer.running_mean, torch_layer.running_mean, 0, "running_mean")
    assert_rel_close(cbn_layer.running_var, torch_layer.running_var, 0, "running_var")


def test_one_value_per_channel_message_matches_torch(torch):
    with pytest.raises(ValueError) as torch_error:
        torch.nn.BatchNorm2d(3)(torch.zeros(1, 3, 1, 1))
    with pytest.raises(ValueError) as cbn_error:
        cbn.BatchNorm2d(3)(np.zeros((1, 3, 1, 1), np.float32))
    prefix = "Expected more than 1 value per channel when training"
    assert str(torch_error.value).startswith(prefix)
    assert str(cbn_error.value).startswith(prefix)


# --------------------------------------------------------------------------- functional


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training, with_stats", [(True, True), (True, False), (False, True)],
                         ids=["train-stats", "train-nostats", "eval-stats"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 7), (3, 4, 5, 6), (2, 3, 4, 3, 5)])
def test_functional_matches_torch(torch, rng, shape, dtype, training, with_stats, affine):
    F = torch.nn.functional
    channels, tol = shape[1], REL_TOL[dtype]
    x = make_input(rng, shape, dtype)
    mean = rng.uniform(-1, 1, channels).astype(dtype) if with_stats else None
    var = rng.uniform(0.5, 2, channels).astype(dtype) if with_stats else None
    weight = rng.uniform(0.5, 2, channels).astype(dtype) if affine else None
    bias = rng.uniform(-1, 1, channels).astype(dtype) if affine else None

    def tensor(a):
        return None if a is None else torch.from_numpy(a.copy())

    mean_torch, var_torch = tensor(mean), tensor(var)
    y_torch = F.batch_norm(torch.from_numpy(x), mean_torch, var_torch, tensor(weight), tensor(bias),
                           training=training, momentum=0.2, eps=1e-4)
    y = cbn.functional.batch_norm(x, mean, var, weight, bias, training=training, momentum=0.2, eps=1e-4)
    assert_rel_close(y, y_torch, tol, "output")
    if with_stats:
        assert_rel_close(mean, mean_torch, tol, "running_mean")
        assert_rel_close(var, var_torch, tol, "running_var")


# --------------------------------------------------------------------------- state dicts


def torch_state_to_numpy(state):
    return {key: value.numpy().copy() for key, value in state.items()}


def numpy_state_to_torch(torch, state):
    return {
        key: torch.from_numpy(value) if isinstance(value, np.ndarray)
        else torch.tensor(value, dtype=torch.int64)
        for key, value in state.items()
    }


@pytest.mark.parametrize("affine, track", [(True, True), (True, False), (False, True), (False, False)])
def test_state_dict_keys_match_torch(torch, affine, track):
    torch_keys = set(torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track).state_dict())
    assert set(cbn.BatchNorm2d(3, affine=affine, track_running_stats=track).state_dict()) == torch_keys


def test_torch_state_dict_loads_into_cbn(torch, rng):
    torch_layer = torch.nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        torch_layer.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 3).astype(np.float32)))
        torch_layer.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, 3).astype(np.float32)))
    for _ in range(2):
        torch_layer(torch.from_numpy(make_input(rng, (4, 3, 5, 5), np.float32)))

    cbn_layer = cbn.BatchNorm2d(3)
    cbn_layer.load_state_dict(torch_state_to_numpy(torch_layer.state_dict()))

    for key in ("weight", "bias", "running_mean", "running_var"):
        assert np.array_equal(getattr(cbn_layer, key), getattr(torch_layer, key).detach().numpy()), key
    assert isinstance(cbn_layer.num_batches_tracked, int) and cbn_layer.num_batches_tracked == 2
    x = make_input(rng, (2, 3, 5, 5), np.float32)
    y_torch = torch_layer.eval()(torch.from_numpy(x))
    assert_rel_close(cbn_layer.eval()(x), y_torch, REL_TOL[np.float32], "eval output after loading")


def test_torch_state_dict_tensors_load_directly(torch, rng):
    """load_state_dict's docstring promises that a torch state dict's tensors work."""
    torch_layer, _ = paired_layers(torch, "BatchNorm2d", 3, rng, np.float32)
    torch_layer(torch.from_numpy(make_input(rng, (4, 3, 2, 2), np.float32)))
    cbn_layer = cbn.BatchNorm2d(3)
    cbn_layer.load_state_dict(torch_layer.state_dict())
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert np.array_equal(getattr(cbn_layer, key), getattr(torch_layer, key).detach().numpy()), key
    assert cbn_layer.num_batches_tracked == 1 and isinstance(cbn_layer.num_batches_tracked, int)


def test_cbn_state_dict_loads_into_torch(torch, rng):
    cbn_layer = cbn.BatchNorm3d(3, momentum=0.3)
    cbn_layer.weight[...] = rng.uniform(0.5, 2, 3)
    cbn_layer.bias[...] = rng.uniform(-1, 1, 3)
    for _ in range(3):
        cbn_layer(make_input(rng, (2, 3, 2, 3, 4), np.float32))

    torch_layer = torch.nn.BatchNorm3d(3)
    torch_layer.load_state_dict(numpy_state_to_torch(torch, cbn_layer.state_dict()), strict=True)

    for key in ("weight", "bias", "running_mean", "running_var"):
        assert np.array_equal(getattr(torch_layer, key).detach().numpy(), getattr(cbn_layer, key)), key
    assert torch_layer.num_batches_tracked.dtype == torch.int64
    assert torch_layer.num_batches_tracked.dim() == 0
    assert int(torch_layer.num_batches_tracked) == 3


def test_state_without_num_batches_tracked_loads_like_torch(torch, rng):
    torch_layer, cbn_layer = paired_layers(torch, "BatchNorm1d", 3, rng, np.float32)
    for _ in range(2):
        x = make_input(rng, (5, 3), np.float32)
        torch_layer(torch.from_numpy(x))
        cbn_layer(x)
    state = torch_state_to_numpy(torch.nn.BatchNorm1d(3).state_dict())
    del state["num_batches_tracked"]
    torch_layer.load_state_dict(numpy_state_to_torch(torch, state))
    cbn_layer.load_state_dict(state)
    assert cbn_layer.num_batches_tracked == int(torch_layer.num_batches_tracked)
    assert np.array_equal(cbn_layer.running_var, torch_layer.running_var.numpy())


# --------------------------------------------------------------------------- torch tensors as input


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_torch_tensor_is_accepted_as_input(torch, rng, channels_last):
    x_torch = to_torch(torch, make_input(rng, (2, 3, 4, 5), np.float32), channels_last)
    before = x_torch.clone()
    from_tensor = cbn.BatchNorm2d(3)(x_torch)
    from_array = cbn.BatchNorm2d(3)(x_torch.numpy())
    assert isinstance(from_tensor, np.ndarray)
    assert np.array_equal(from_tensor, from_array)
    assert torch.equal(x_torch, before)
    y_torch = torch.nn.BatchNorm2d(3)(x_torch)
    assert_rel_close(from_tensor, y_torch, REL_TOL[np.float32], "output")
