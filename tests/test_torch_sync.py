"""cbn.torch: SyncBatchNorm as a torch.nn.Module, on one process and under mpiexec.

Every test takes the ``torch`` fixture of conftest.py: skipped with a reason when
torch is missing, a failure when CBN_REQUIRE_TORCH=1.  The MPI checks live in
mpi_torch_checks.py and run under ``mpiexec -n 2`` and ``-n 3``.
"""
import copy
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from launch import run_ranks_script

HERE = Path(__file__).parent
CHECKS = HERE / "mpi_torch_checks.py"
MPI_CHECKS = ["model_equality", "local_batchnorm_differs", "bad_input_on_one_rank",
              "process_groups", "allreduce_gradients_average", "double_backward_refused",
              "modified_input_on_one_rank"]
REL_TOL = {"float32": 2e-5, "float64": 1e-12}


@pytest.fixture
def ct(torch):
    import cbn.torch
    return cbn.torch


def assert_rel_close(actual, expected, tol, what):
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert error <= tol * max(scale, 1e-30), f"{what}: relative error {error / scale:.3g} > {tol}"


# --- MPI -----------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [2, 3])
def test_converted_model_on_shards_equals_torch_model_on_the_global_batch(torch, ranks):
    out = run_ranks_script(ranks, CHECKS, *MPI_CHECKS)
    for check in MPI_CHECKS:
        assert f"OK {check} on {ranks} ranks" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_compiled_model_on_shards_equals_torch_model_on_the_global_batch(torch, ranks):
    # torch.compile(fullgraph=True): the collectives run inside cbn's registered operators
    out = run_ranks_script(ranks, CHECKS, "compiled_model_equality", timeout=600)
    assert f"OK compiled_model_equality on {ranks} ranks" in out, out


# --- gradcheck -------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, channels_last", [((5, 3), False), ((4, 3, 5), False),
                                                  ((3, 2, 3, 4), True)])
def test_gradcheck_float64(torch, ct, training, shape, channels_last):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(c, dtype=torch.float64).requires_grad_()
    running_mean = torch.randn(c, dtype=torch.float64)
    running_var = torch.rand(c, dtype=torch.float64) + 0.5

    def f(x, weight, bias):
        # copies: in training the running statistics are updated on every call
        return ct.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                             training=training, momentum=0.1, eps=1e-3)
    assert torch.autograd.gradcheck(f, (x, weight, bias))
    def without_weight(x, bias):
        return ct.batch_norm(x, None if training else running_mean,
                             None if training else running_var, None, bias, training=training)
    assert torch.autograd.gradcheck(without_weight, (x, bias))
    layer = ct.SyncBatchNorm(c, dtype=torch.float64).train(training)
    with torch.no_grad():
        layer.weight.copy_(weight), layer.running_var.copy_(running_var)
    assert torch.autograd.gradcheck(layer, (x,))


# --- one process: torch.nn.BatchNorm*d ------------------------------------------

LAYERS = [pytest.param("BatchNorm1d", (6, 4), id="1d-NC"),
          pytest.param("BatchNorm1d", (4, 3, 7), id="1d-NCL"),
          pytest.param("BatchNorm2d", (3, 4, 5, 6), id="2d"),
          pytest.param("BatchNorm2d", (3, 4, 5, 6), id="2d-channels_last"),
          pytest.param("BatchNorm3d", (2, 3, 4, 3, 5), id="3d"),
          pytest.param("BatchNorm3d", (2, 3, 4, 3, 5), id="3d-channels_last")]
OPTIONS = [pytest.param({}, id="default"),
           pytest.param({"momentum": None}, id="cumulative"),
           pytest.param({"affine": False}, id="no-affine"),
           pytest.param({"track_running_stats": False}, id="no-track"),
           pytest.param({"bias": False}, id="no-bias")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("name, shape", LAYERS)
def test_single_process_equals_torch_batchnorm(torch, ct, request, name, shape, options, dtype):
    dtype = getattr(torch, dtype)
    tol = REL_TOL[str(dtype).split(".")[1]]
    memory_format = torch.contiguous_format
    if "channels_last" in request.node.callspec.id:
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    ref = getattr(torch.nn, name)(shape[1], dtype=dtype, **options)
    layer = ct.SyncBatchNorm(shape[1], dtype=dtype, **options)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-1, 1)
    layer.load_state_dict(ref.state_dict())
    for step in range(3):
        x = (torch.randn(shape, dtype=dtype) * 3 + 2).contiguous(memory_format=memory_format)
        dy = torch.randn(shape, dtype=dtype)
        x_ref, x_cbn = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_cbn = ref(x_ref), layer(x_cbn)
        assert_rel_close(y_cbn, y_ref, tol, f"output, step {step}")
        assert y_cbn.dtype == dtype and y_cbn.is_contiguous(memory_format=memory_format)
        y_ref.backward(dy), y_cbn.backward(dy)
        assert_rel_close(x_cbn.grad, x_ref.grad, 10 * tol, f"input gradient, step {step}")
        assert x_cbn.grad.is_contiguous(memory_format=memory_format)
        for key, value in ref.named_parameters():
            assert_rel_close(getattr(layer, key).grad, value.grad, 10 * tol, f"{key}.grad")
        for key, value in ref.state_dict().items():
            if key == "num_batches_tracked":
                assert int(layer.num_batches_tracked) == int(value) == step + 1
            else:
                assert_rel_close(layer.state_dict()[key], value, tol, f"{key}, step {step}")
    ref.eval(), layer.eval()
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format)
    x_ref, x_cbn = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_cbn = ref(x_ref), layer(x_cbn)
    assert_rel_close(y_cbn, y_ref, tol, "eval output")
    dy = torch.randn((shape[0], 1) + shape[2:], dtype=dtype).expand(shape)  # stride 0
    y_ref.backward(dy), y_cbn.backward(dy)
    assert_rel_close(x_cbn.grad, x_ref.grad, 10 * tol, "eval input gradient")


def test_empty_batch_and_one_value_per_channel_as_torch(torch, ct):
    ref, layer = torch.nn.BatchNorm2d(3), ct.SyncBatchNorm(3)
    x = torch.zeros(0, 3, 2, 2, requires_grad=True)
    y_ref, y = ref(x), layer(x)
    assert y.shape == y_ref.shape == x.shape
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert torch.equal(layer.running_mean, ref.running_mean)
    assert torch.equal(layer.running_var, ref.running_var)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(layer.weight.grad, torch.zeros(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.ones(1, 3, 1, 1))
    assert int(layer.num_batches_tracked) == 1  # a rejected batch leaves the state alone


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_input_is_computed_in_float32(torch, ct, dtype):
    dtype = getattr(torch, dtype)
    x = torch.randn(8, 3, 4).to(dtype)
    x_ref, x_cbn = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = torch.nn.functional.batch_norm(x_ref.float(), None, None, training=True)
    y_cbn = ct.SyncBatchNorm(3)(x_cbn)
    assert y_cbn.dtype == dtype
    assert_rel_close(y_cbn.float(), y_ref.to(dtype).float(), 1e-2, "output")
    y_cbn.float().sum().backward()
    assert x_cbn.grad.dtype == dtype


# --- memory ----------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_negated_views_as_input_and_gradient_as_torch(torch, ct, training):
    """torch._neg_view tensors (NumPy cannot read their negation bit) give torch's results."""
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    layer, reference = ct.SyncBatchNorm(6).double(), torch.nn.BatchNorm1d(6).double()
    layer.train(training), reference.train(training)
    outputs = []
    for module in (layer, reference):
        xi = torch._neg_view(x).requires_grad_()
        y = module(xi)
        y.backward(torch._neg_view(torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)))
        outputs.append((y.detach(), xi.grad))
        with torch.no_grad():
            outputs.append(module.eval()(torch._neg_view(x)))
        module.train(training)
    (y, dx), eval_y, (y_ref, dx_ref), eval_ref = outputs
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(eval_y, eval_ref)


def test_zero_copy_between_torch_and_numpy(torch, ct):
    layer = ct.SyncBatchNorm(4)
    x = torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    kept = y.grad_fn.state.x.data  # the forward's view of the input
    assert np.shares_memory(kept, x.detach().numpy()), "the input was copied"
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == x.stride()
    running = layer.running_mean.numpy()
    layer(x)
    assert np.shares_memory(running, layer.running_mean.numpy()), "the buffer was replaced"


def test_input_modified_after_forward_is_refused_in_backward(torch, ct):
    x = torch.randn(4, 3, requires_grad=True)
    h = x * 1
    y = ct.SyncBatchNorm(3)(h)
    with torch.no_grad():
        h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --- the module ------------------------------------------------------------------

def test_state_dict_moves_between_cbn_and_torch(torch, ct):
    layer = ct.SyncBatchNorm(3, momentum=None)
    layer(torch.randn(5, 3, 2))
    state = layer.state_dict()
    reference = torch.nn.SyncBatchNorm(3)
    assert list(state) == list(reference.state_dict())
    assert [(k, v.shape) for k, v in layer.named_parameters()] == \
        [(k, v.shape) for k, v in reference.named_parameters()]
    assert state["num_batches_tracked"].dtype == torch.int64
    assert state["num_batches_tracked"].shape == ()
    reference.load_state_dict(state)
    plain = torch.nn.BatchNorm2d(3)
    plain.load_state_dict(state)
    back = ct.SyncBatchNorm(3)
    back.load_state_dict(plain.state_dict())
    for key, value in state.items():
        assert torch.equal(back.state_dict()[key], value)
    old = OrderedDict((k, v) for k, v in state.items() if k != "num_batches_tracked")
    old._metadata = {"": {"version": 1}}  # a checkpoint from before num_batches_tracked
    back.load_state_dict(old)
    assert torch.equal(back.running_var, state["running_var"])


def test_constructor_checks(torch, ct):
    with pytest.raises(ValueError, match="CPU"):
        ct.SyncBatchNorm(3, device="meta")
    with pytest.raises(TypeError, match="mpi4py communicator"):
        ct.SyncBatchNorm(3, process_group=object())
    with pytest.raises(ValueError, match="timeout"):
        ct.SyncBatchNorm(3, timeout=0)
    layer = ct.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2D"):
        layer(torch.ones(3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(torch.ones(4, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.int64))
    assert int(layer.num_batches_tracked) == 0


def test_copies_and_pickles_after_training(torch, ct):
    layer = ct.SyncBatchNorm(3, track_running_stats=False)
    layer(torch.randn(4, 3))
    mpi = pytest.importorskip("mpi4py.MPI")
    from cbn.comm import Collective
    from cbn.sync_batchnorm import GlobalStats
    layer._global = GlobalStats(Collective(mpi.COMM_SELF), 3)  # as after a synchronised step
    twin = copy.deepcopy(layer)
    assert twin._global is None, "the communicator handle is rebuilt, not copied"
    assert twin._group_handle != layer._group_handle, "two layers never share a handle"
    again = pickle.loads(pickle.dumps(layer))
    layer._global = None
    x = torch.randn(4, 3)
    assert torch.equal(again(x), layer(x)) and torch.equal(twin(x), layer(x))


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_modes(torch, ct):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, momentum=None, eps=1e-3),
        torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Sequential(torch.nn.Linear(16, 5), torch.nn.BatchNorm1d(5, affine=False)),
        torch.nn.SyncBatchNorm(5, track_running_stats=False), torch.nn.Linear(5, 2),
        torch.nn.BatchNorm1d(2, bias=False))
    model.double()
    bn = model[1]
    bn.weight.requires_grad_(False)
    with torch.no_grad():
        bn.running_mean.fill_(0.25)
    bn.num_batches_tracked.fill_(7)
    model[4][1].eval()
    weight, running_mean, counter = bn.weight, bn.running_mean, bn.num_batches_tracked
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    expected = copy.deepcopy(model)(x)

    out = ct.convert_sync_batchnorm(model)
    assert out is model
    new = out[1]
    assert isinstance(new, ct.SyncBatchNorm)
    assert new.weight is weight and not new.weight.requires_grad
    assert new.running_mean is running_mean and new.num_batches_tracked is counter
    assert new.momentum is None and new.eps == 1e-3
    assert isinstance(out[4][1], ct.SyncBatchNorm) and not out[4][1].training
    assert out[4][1].weight is None
    assert isinstance(out[5], ct.SyncBatchNorm) and out[5].running_mean is None
    assert isinstance(out[7], ct.SyncBatchNorm) and out[7].bias is None
    assert out[2].__class__ is torch.nn.ReLU
    assert_rel_close(out(x), expected, 1e-12, "converted model output")
    assert int(new.num_batches_tracked) == 8

    single = ct.convert_sync_batchnorm(torch.nn.BatchNorm3d(2))
    assert isinstance(single, ct.SyncBatchNorm)
    assert ct.convert_sync_batchnorm(single) is single
    assert ct.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(2)).num_features == 2
    with pytest.raises(ValueError, match="not initialised"):
        ct.convert_sync_batchnorm(torch.nn.LazyBatchNorm2d())


def test_allreduce_gradients_with_one_process_changes_nothing(torch, ct):
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert ct.allreduce_gradients(model) is model
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    pytest.importorskip("mpi4py")
    from mpi4py import MPI
    ct.allreduce_gradients(model, MPI.COMM_SELF)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_import_cbn_does_not_import_torch(torch):
    code = ("import sys, numpy as np, cbn; cbn.BatchNorm2d(3)(np.ones((2, 3, 2, 2)));"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
