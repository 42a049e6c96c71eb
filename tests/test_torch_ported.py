"""PyTorch's own batch-norm tests, ported to run against cbn.torch (CPU).

Each test names the torch test it ports (``test/test_nn.py`` /
``test/nn/test_batchnorm``-style tests, the ``common_modules.py`` ModuleInfo
entries for BatchNorm1d/2d/3d as ``test_modules.py`` checks them, and the
SyncBatchNorm tests of ``torch/testing/_internal/distributed/distributed_test.py``
in one process on the CPU).  The intent of each is kept; the code is our own.
Plus cbn.torch's own contract under torch.func, double backward, low precision
and torch's exception types.
"""
import copy
import io
import pickle
import subprocess
import sys
from functools import partial

import pytest


# torch 2.13 deprecates TorchScript; these tests check it still works
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")]


@pytest.fixture
def ct(torch):
    import cbn.torch
    return cbn.torch


def pair(torch, ct, name, c, dtype=None, **options):
    """A torch module and a cbn.torch layer holding the same random state."""
    dtype = dtype or torch.float64
    ref = getattr(torch.nn, name)(c, dtype=dtype, **options)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
        if ref.bias is not None:
            ref.bias.uniform_(-0.5, 0.5)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    layer = ct.convert_sync_batchnorm(copy.deepcopy(ref))
    return ref, layer


def close(torch, a, b, tol=1e-10, floor=1e-6):
    """max |a - b| <= tol * max(max |b|, floor): relative, with a floor for values near 0."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and float((a - b).abs().max() if b.numel() else 0) <= tol * max(
        scale, floor)


# ============================================================ test_nn.py

def test_batchnorm_raises_error_if_less_than_one_value_per_channel(torch, ct):
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        ct.SyncBatchNorm(10)(x)


@pytest.mark.parametrize("argument", ["running_mean", "running_var", "weight", "bias"])
def test_batchnorm_raises_error_if_argument_is_not_same_size_as_input(torch, ct, argument):
    # test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}
    # _is_not_same_size_as_input
    x = torch.rand(2, 10)
    for size in (9, 11):
        args = {"running_mean": torch.rand(10), "running_var": torch.rand(10)}
        args[argument] = torch.nn.Parameter(torch.rand(size)) if argument in ("weight", "bias") \
            else torch.rand(size)
        with pytest.raises(RuntimeError):
            torch.nn.functional.batch_norm(x, **args)
        with pytest.raises(RuntimeError, match=argument):
            ct.batch_norm(x, **args)


def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad(torch, ct):
    import torch.autograd.forward_ad as fwAD
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 0.5)  # a valid variance
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = tuple(torch.rand_like(a) for a in args)
        for fn in (partial(torch.nn.functional.batch_norm, training=False, momentum=-1.2),
                   partial(ct.batch_norm, training=False, momentum=-1.2)):
            with fwAD.dual_level():
                duals = [fwAD.make_dual(p, t) if i in dual_indices else p
                         for i, (p, t) in enumerate(zip(args, tangents))]
                if 0 in dual_indices and (1 in dual_indices or 2 in dual_indices):
                    with pytest.raises(RuntimeError, match="not differentiable wrt running_mean"):
                        fn(*duals)
                else:
                    fn(*duals)


def test_batchnorm_buffer_update_when_stats_are_not_tracked(torch, ct):
    layer = ct.SyncBatchNorm(4, track_running_stats=True)
    layer.track_running_stats = False  # use the buffers' existence, but never update them
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.rand(32, 4))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("dtype, mixed", [("float32", False), ("bfloat16", False),
                                          ("bfloat16", True)],
                         ids=["float32", "bfloat16", "bfloat16-float32-params"])
@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)])
def test_batchnorm_nhwc_cpu(torch, ct, shape, dtype, mixed):
    dtype = getattr(torch, dtype)
    c = shape[1]
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.BatchNorm2d(c).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(), ref.bias.uniform_()
    layer = ct.convert_sync_batchnorm(copy.deepcopy(ref))
    if mixed:
        ref.float(), layer.float()
    xr = x.detach().clone().contiguous().requires_grad_()
    xc = x.detach().clone().requires_grad_()
    yr, yc = ref(xr), layer(xc)
    yr.backward(g.contiguous()), yc.backward(g)
    assert yc.is_contiguous(memory_format=torch.channels_last) and yc.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert close(torch, yc, yr, tol)
    assert close(torch, xc.grad, xr.grad, 10 * tol)
    assert close(torch, layer.weight.grad, ref.weight.grad, 10 * tol)
    assert close(torch, layer.bias.grad, ref.bias.grad, 10 * tol)


def test_batchnorm_non_contig_cpu(torch, ct):
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    ref, layer = pair(torch, ct, "BatchNorm2d", 2, torch.float32)
    ref.eval(), layer.eval()
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert close(torch, y, ref(x.contiguous()), 1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_nonaffine_half_input(torch, ct, training):
    # test_batchnorm_nonaffine_cuda_half_input, on the CPU: float32 statistics, half input
    x = torch.randn(16, 3, 24, 24, dtype=torch.half)
    layer = ct.SyncBatchNorm(3, affine=False).float().train(training)
    ref = torch.nn.BatchNorm2d(3, affine=False).float().train(training)
    y = layer(x)
    assert y.dtype == torch.half and layer.running_mean.dtype == torch.float32
    assert close(torch, y, ref(x), 2e-3)


def test_batchnorm_half_module_like_cudnn_half(torch, ct):
    # test_batchnorm_cudnn_half: a half module on half input, then the float module on it
    x = torch.randint(1, 10, (2, 3, 2, 2), dtype=torch.half).requires_grad_()
    layer = ct.SyncBatchNorm(3).half()
    out = layer(x)
    out.sum().backward()
    grad = x.grad.clone()
    assert out.dtype == torch.half and grad.dtype == torch.half
    x.grad = None
    layer = layer.float()
    out32 = layer(x)
    out32.sum().backward()
    assert out32.dtype == torch.half
    assert close(torch, out32, out, 2e-3)
    assert float((x.grad.double() - grad.double()).abs().max()) <= 1e-3


def test_batchnorm_nhwc_eval_equals_contiguous(torch, ct):
    # test_batchnorm_nhwc_cuda on the CPU: channels-last and contiguous give equal outputs
    for dtype in (torch.half, torch.float):
        layer = ct.SyncBatchNorm(64).eval().to(dtype)
        x = torch.randn(2, 64, 50, 50, dtype=dtype)
        assert torch.equal(layer(x), layer(x.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("name, shape", [("BatchNorm1d", (5, 3)), ("BatchNorm1d", (4, 3, 6)),
                                         ("BatchNorm2d", (3, 3, 4, 5)),
                                         ("BatchNorm3d", (2, 3, 3, 2, 4))])
def test_batchnorm_update_stats_and_eval(torch, ct, name, shape):
    # test_nn's _test_batchnorm_update_stats / _test_batchnorm_eval: running statistics
    # follow torch's update rule, num_batches_tracked counts, eval uses running stats
    for momentum in (0.1, None):  # test_batchnorm_simple_average: None is a cumulative mean
        ref, layer = pair(torch, ct, name, shape[1], momentum=momentum)
        for step in range(3):
            x = torch.randn(shape, dtype=torch.float64) * (step + 1) + step
            assert close(torch, layer(x), ref(x))
            for (key, a), b in zip(layer.state_dict().items(), ref.state_dict().values()):
                assert close(torch, a, b), key
        ref.eval(), layer.eval()
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        assert close(torch, y, ref(x))
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert close(torch, gx, torch.autograd.grad(ref(x).sum(), x)[0])
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer(x)
        assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_affine_and_non_affine(torch, ct, affine):
    ref, layer = pair(torch, ct, "BatchNorm2d", 4, affine=affine)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    assert close(torch, layer(x), ref(x))
    assert (layer.weight is None) == (not affine)


def test_batchnorm_load_state_dict(torch, ct):
    # test_nn's test_batchnorm_load_state_dict: num_batches_tracked is saved and loaded,
    # and an old checkpoint without it loads as into torch's module
    ref, layer = torch.nn.BatchNorm2d(3), ct.SyncBatchNorm(3)
    for module in (ref, layer):
        assert int(module.state_dict()["num_batches_tracked"]) == 0
        module.num_batches_tracked = torch.tensor(10)
        assert int(module.state_dict()["num_batches_tracked"]) == 10
    fresh_ref, fresh = torch.nn.BatchNorm2d(3), ct.SyncBatchNorm(3)
    fresh_ref.load_state_dict(ref.state_dict()), fresh.load_state_dict(layer.state_dict())
    assert int(fresh.num_batches_tracked) == int(fresh_ref.num_batches_tracked) == 10
    for module, target in ((ref, fresh_ref), (layer, fresh)):
        state = module.state_dict()
        del state["num_batches_tracked"]
        state._metadata = {"": {"version": 1}}
        target.num_batches_tracked = torch.tensor(3)
        target.load_state_dict(state)
    assert int(fresh.num_batches_tracked) == int(fresh_ref.num_batches_tracked)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_grad(torch, ct, training):
    # test_nn's test_batchnorm_grad: gradcheck and gradgradcheck in float64
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = torch.randn(2, dtype=torch.float64), \
        torch.rand(2, dtype=torch.float64) + 0.5

    def f(x, weight, bias):
        return ct.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                             training=training)
    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


# ============================================================ common_modules.py / test_modules.py

MODULE_INPUTS = [
    ("BatchNorm1d", (4, 10), {}), ("BatchNorm1d", (4, 10, 3), {}),
    ("BatchNorm1d", (4, 10), {"affine": False}), ("BatchNorm1d", (4, 10), {"momentum": None}),
    ("BatchNorm1d", (4, 10), {"track_running_stats": False}),
    ("BatchNorm1d", (0, 10), {}),  # an empty batch
    ("BatchNorm2d", (2, 3, 6, 6), {}), ("BatchNorm2d", (2, 3, 6, 6), {"momentum": 0.9}),
    ("BatchNorm2d", (2, 3, 6, 6), {"affine": False, "track_running_stats": False}),
    ("BatchNorm2d", (0, 3, 2, 2), {}),
    ("BatchNorm3d", (2, 3, 4, 4, 4), {}), ("BatchNorm3d", (2, 3, 4, 4, 4), {"eps": 1e-3}),
    ("BatchNorm3d", (2, 3, 4, 4, 4), {"momentum": None}),
]
MODULE_IDS = [f"{n}-{'x'.join(map(str, s))}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
              for n, s, o in MODULE_INPUTS]


@pytest.mark.parametrize("name, shape, options", MODULE_INPUTS, ids=MODULE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_modules_forward_and_grad(torch, ct, name, shape, options, training):
    # test_modules.py test_forward + test_grad/test_gradgrad over the ModuleInfo inputs
    ref, layer = pair(torch, ct, name, shape[1], **options)
    ref.train(training), layer.train(training)
    x = torch.randn(shape, dtype=torch.float64)
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yc = ref(xr), layer(xc)
    assert close(torch, yc, yr)
    for (key, a), b in zip(layer.state_dict().items(), ref.state_dict().values()):
        assert close(torch, a, b), key
    if x.numel():
        params = tuple(layer.parameters())

        def f(x, *p):  # the output does not depend on the buffers' updates
            return layer(x)
        assert torch.autograd.gradcheck(f, (xc,) + params)
        assert torch.autograd.gradgradcheck(f, (xc,) + params)


@pytest.mark.parametrize("name, shape, options", MODULE_INPUTS[:7], ids=MODULE_IDS[:7])
def test_modules_pickle_repr_and_factory_kwargs(torch, ct, name, shape, options):
    # test_modules.py test_pickle, test_repr, test_factory_kwargs
    layer = ct.SyncBatchNorm(shape[1], dtype=torch.float64, **options)
    assert all(t.dtype == torch.float64 for t in layer.parameters())
    if layer.running_mean is not None:
        assert layer.running_mean.dtype == torch.float64
        assert layer.num_batches_tracked.dtype == torch.long
    x = torch.randn(shape, dtype=torch.float64)
    layer(x)
    restored = pickle.loads(pickle.dumps(layer))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    layer.eval(), restored.eval(), loaded.eval()
    assert torch.equal(restored(x), layer(x)) and torch.equal(loaded(x), layer(x))
    assert repr(layer).startswith("SyncBatchNorm(")


NON_EMPTY = [(i, m) for i, m in zip(MODULE_IDS, MODULE_INPUTS) if m[1][0]]


@pytest.mark.parametrize("name, shape, options", [m for _, m in NON_EMPTY],
                         ids=[i for i, _ in NON_EMPTY])
def test_modules_non_contiguous_tensors(torch, ct, name, shape, options):
    # test_modules.py test_non_contiguous_tensors: a strided input and gradient give the
    # same results as their contiguous copies
    ref, layer = pair(torch, ct, name, shape[1], **options)
    big = torch.randn((shape[0] * 2,) + shape[1:], dtype=torch.float64)
    x = big[::2]
    assert not x.is_contiguous()
    g = torch.randn((shape[0] * 2,) + shape[1:], dtype=torch.float64)[::2]
    for xx, gg in ((x, g), (x.contiguous(), g.contiguous())):
        layer_copy, ref_copy = copy.deepcopy(layer), copy.deepcopy(ref)
        xc, xr = xx.clone().requires_grad_(), xx.clone().requires_grad_()
        yc, yr = layer_copy(xc), ref_copy(xr)
        yc.backward(gg), yr.backward(gg)
        assert close(torch, yc, yr) and close(torch, xc.grad, xr.grad)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 2, 4, 5)])
def test_modules_memory_format(torch, ct, shape):
    # test_modules.py test_memory_format: channels-last in, channels-last out (and grad)
    memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    name = "BatchNorm2d" if len(shape) == 4 else "BatchNorm3d"
    ref, layer = pair(torch, ct, name, 3)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    x.requires_grad_()
    y = layer(x)
    assert y.is_contiguous(memory_format=memory_format)
    y.backward(torch.randn(shape, dtype=torch.float64).contiguous(memory_format=memory_format))
    assert x.grad.is_contiguous(memory_format=memory_format)
    assert close(torch, y, ref(x))


# ============================================================ distributed_test.py (one process)

def test_SyncBatchNorm_single_input_per_process_equals_BatchNorm(torch, ct):
    # _test_DistributedDataParallel_SyncBatchNorm with one process: a converted model
    # trains as the torch model does (outputs, gradients, buffers), step after step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Linear(5, 3), torch.nn.BatchNorm2d(4)).double()
    converted = ct.convert_sync_batchnorm(copy.deepcopy(model))
    opt_ref = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(4, 2, 3, 5, dtype=torch.float64)
        for m, o in ((model, opt_ref), (converted, opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        for a, b in zip(converted.state_dict().values(), model.state_dict().values()):
            assert close(torch, a, b, 1e-9)


@pytest.mark.parametrize("shape", [(0, 3, 4), (1, 3, 1), (2, 3, 1), (5, 3)])
def test_SyncBatchNorm_diff_input_sizes_and_edge_batches(torch, ct, shape):
    # _test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes / test_SyncBatchNorm
    # with empty and single-value batches: torch's results or torch's error
    ref, layer = pair(torch, ct, "BatchNorm1d", 3)
    x = torch.randn(shape, dtype=torch.float64)
    try:
        expected = ref(x)
    except ValueError as exc:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            layer(x)
        assert "Expected more than 1 value per channel" in str(exc)
        return
    assert close(torch, layer(x), expected)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)


def test_SyncBatchNorm_process_group_and_convert(torch, ct):
    # test_SyncBatchNorm_process_group: convert_sync_batchnorm passes the group to every layer
    mpi = pytest.importorskip("mpi4py.MPI")
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2),
                                torch.nn.Sequential(torch.nn.BatchNorm2d(2)))
    converted = ct.convert_sync_batchnorm(model, process_group=mpi.COMM_SELF)
    layers = [m for m in converted.modules() if isinstance(m, ct.SyncBatchNorm)]
    assert len(layers) == 2 and all(m.process_group is mpi.COMM_SELF for m in layers)


def test_SyncBatchNorm_no_channel_mismatch_silently(torch, ct):
    # distributed_test checks a wrong channel count raises; torch raises RuntimeError
    with pytest.raises(RuntimeError, match="expected 3 channels"):
        ct.SyncBatchNorm(3)(torch.randn(4, 5, 2))
    with pytest.raises(RuntimeError):
        torch.nn.BatchNorm1d(3)(torch.randn(4, 5, 2))


# ============================================================ cbn.torch's own torch contract

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_parameters_and_buffers(torch, ct, dtype, training):
    # model.half() / model.bfloat16(): computed in float32, stored in the parameter dtype
    dtype = getattr(torch, dtype)
    ref, layer = pair(torch, ct, "BatchNorm2d", 3, torch.float32)
    ref, layer = ref.to(dtype).train(training), layer.to(dtype).train(training)
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).to(dtype)
    g = torch.randn(4, 3, 5, 5).to(dtype)
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yc = ref(xr), layer(xc)
    yr.backward(g), yc.backward(g)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10  # a few units of that precision
    assert yc.dtype == dtype and xc.grad.dtype == dtype
    assert close(torch, yc, yr, 4 * tol)
    assert close(torch, xc.grad, xr.grad, 8 * tol)
    for key in ("weight", "bias"):
        p, q = getattr(layer, key), getattr(ref, key)
        assert p.dtype == p.grad.dtype == dtype
        assert close(torch, p.grad, q.grad, 8 * tol), key
    for key in ("running_mean", "running_var"):
        assert getattr(layer, key).dtype == dtype
        assert close(torch, getattr(layer, key), getattr(ref, key), 2 * tol), key


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps_is_checked_as_torch_does(torch, ct, training):
    for eps in (0.0, -1.0):
        ref = torch.nn.BatchNorm1d(3, eps=eps).train(training)
        layer = ct.SyncBatchNorm(3, eps=eps).train(training)
        x = torch.randn(4, 3)
        try:
            ref(x)
        except ValueError as exc:
            with pytest.raises(ValueError, match="eps must be") as info:
                layer(x)
            assert str(info.value) == str(exc)
            with pytest.raises(ValueError):
                ct.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)
        else:
            assert close(torch, layer(x), ref(x), 1e-5)


def test_functional_errors_are_torch_types(torch, ct):
    np = pytest.importorskip("numpy")
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="input"):
        ct.batch_norm(np.zeros((4, 3)), torch.zeros(3), torch.ones(3))
    with pytest.raises(TypeError, match="running_mean"):
        ct.batch_norm(x, [0.0, 0.0, 0.0], torch.ones(3))
    with pytest.raises(TypeError, match="weight"):
        ct.batch_norm(x, torch.zeros(3), torch.ones(3), weight=[1.0] * 3)
    with pytest.raises(TypeError, match="momentum"):
        ct.batch_norm(x, None, None, training=True, momentum=None)
    with pytest.raises(TypeError):
        torch.nn.functional.batch_norm(x, None, None, training=True, momentum=None)
    with pytest.raises(TypeError, match="module"):
        ct.convert_sync_batchnorm([torch.nn.BatchNorm1d(3)])


def test_torch_func_grad_and_vmap_follow_torch(torch, ct):
    from torch.func import functional_call, grad, jvp, vmap
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    for options in ({"track_running_stats": False}, {}):
        ref, layer = pair(torch, ct, "BatchNorm1d", 3, **options)
        results = []
        for module in (ref, layer):
            params = {k: v.detach() for k, v in module.named_parameters()}
            buffers = dict(module.named_buffers())

            def loss(p, x, module=module, buffers=buffers):
                return functional_call(module, (p, buffers), (x,)).square().sum()
            try:
                results.append(grad(loss)(params, x))
            except RuntimeError as exc:  # torch refuses to update captured buffers
                results.append(type(exc))
        if isinstance(results[0], dict):
            assert all(close(torch, results[1][k], results[0][k]) for k in results[0])
        else:
            assert results[1] is results[0]
    # vmap where torch supports it: eval, or no running statistics
    xs = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    for options, training in (({}, False), ({"track_running_stats": False}, True)):
        ref, layer = pair(torch, ct, "BatchNorm1d", 3, **options)
        ref.train(training), layer.train(training)
        assert close(torch, vmap(layer)(xs), vmap(ref)(xs))
    ref, layer = pair(torch, ct, "BatchNorm1d", 3)
    with pytest.raises(RuntimeError) as torch_error:
        vmap(ref)(xs)
    with pytest.raises(type(torch_error.value)):
        vmap(layer)(xs)
    # forward-mode AD
    t = torch.randn_like(x)
    for training in (True, False):
        ref, layer = pair(torch, ct, "BatchNorm1d", 3)
        ref.train(training), layer.train(training)
        outcomes = []
        for module in (ref, layer):
            try:
                outcomes.append(jvp(module, (x,), (t,)))
            except RuntimeError as exc:  # training: torch refuses to update captured buffers
                outcomes.append(type(exc))
        if isinstance(outcomes[0], tuple):
            assert close(torch, outcomes[1][1], outcomes[0][1])
            assert close(torch, outcomes[1][0], outcomes[0][0])
        else:
            assert outcomes[1] is outcomes[0]
    for options in ({"track_running_stats": False},):
        ref, layer = pair(torch, ct, "BatchNorm1d", 3, **options)
        expected, actual = jvp(ref, (x,), (t,)), jvp(layer, (x,), (t,))
        assert close(torch, actual[1], expected[1]) and close(torch, actual[0], expected[0])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_equals_torch(torch, ct, training):
    # a gradient penalty: d/dp |d loss / dx|^2
    ref, layer = pair(torch, ct, "BatchNorm2d", 3)
    ref.train(training), layer.train(training)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    results = []
    for module in (ref, layer):
        xx = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(module(xx).pow(3).sum(), xx, create_graph=True)
        gx.square().sum().backward()
        results.append((gx, xx.grad, module.weight.grad, module.bias.grad))
    scale = float(results[0][0].detach().abs().max())
    for a, b in zip(results[1], results[0]):
        assert close(torch, a, b, 1e-9, floor=scale)


def test_import_without_torch_says_what_to_install(torch, tmp_path):
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('No module named torch')\n")
    code = "import cbn.torch"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "pip install torch" in done.stderr, done.stderr
    assert "download.pytorch.org/whl/cpu" in done.stderr


@pytest.mark.parametrize("kind", ["cbn.torch", "torch.nn"])
def test_fuse_reads_layers_whose_parameters_require_grad(torch, ct, kind):
    import cbn.fuse
    ref, layer = pair(torch, ct, "BatchNorm2d", 3, torch.float32)
    bn = (layer if kind == "cbn.torch" else ref).eval()
    assert bn.weight.requires_grad
    conv = torch.nn.Conv2d(2, 3, 3)
    weight, bias = cbn.fuse.fuse_conv_bn(conv.weight, conv.bias, bn)
    fused = torch.nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        fused.weight.copy_(torch.from_numpy(weight)), fused.bias.copy_(torch.from_numpy(bias))
    x = torch.randn(2, 2, 6, 6)
    assert close(torch, fused(x), bn(conv(x)), 1e-5)
    assert bn.weight.requires_grad and bn.weight.grad is None  # read, not touched


def test_eval_latency_path_sees_every_change_of_the_state(torch, ct):
    # the eval path keeps NumPy views between calls: any change must show
    ref, layer = pair(torch, ct, "BatchNorm2d", 3)
    ref.eval(), layer.eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        assert close(torch, layer(x), ref(x))
        for module in (ref, layer):
            module.weight.mul_(2)                 # an optimiser step, in place
        assert close(torch, layer(x), ref(x))
        for module in (ref, layer):
            module.running_var.fill_(3.0)
        assert close(torch, layer(x), ref(x))
        for module in (ref, layer):
            module.bias = torch.nn.Parameter(torch.full((3,), 0.25, dtype=torch.float64))
        assert close(torch, layer(x), ref(x))
        state = {k: v * 1.5 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
        ref.load_state_dict(state), layer.load_state_dict(state)
        assert close(torch, layer(x), ref(x))
        for module in (ref, layer):  # a training step updates the running statistics
            module.train()(x * 3 + 1)
            module.eval()
        assert close(torch, layer(x), ref(x))
        layer.eps = ref.eps = 0.5
        assert close(torch, layer(x), ref(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_refuses_a_numpy_input_with_a_type_error(torch, ct, training):
    np = pytest.importorskip("numpy")
    layer = ct.SyncBatchNorm(3).train(training)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        layer(np.zeros((4, 3), np.float32))
    assert int(layer.num_batches_tracked) == 0
