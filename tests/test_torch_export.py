"""cbn.torch under graph capture: torch.compile, torch.export, ONNX, TorchScript, torch.fx.

A ResNet-18-shaped model in plain torch is converted with
``cbn.torch.convert_sync_batchnorm``; every capture must give the numbers of
eager cbn (running statistics and num_batches_tracked included) on *new*
inputs, and the portable graphs (ONNX, eval export) must hold the standard
batch-norm operator only.  Compilation is slow on a shared 2-core machine:
the whole-model suites are ``slow``; one small layer per mode runs always.
"""
import copy
import subprocess
import sys

import pytest

from conftest import import_torch_or_skip

import_torch_or_skip(module_level=True)  # torch_models builds torch modules on import
from torch_models import ResNet18, randomise_statistics  # noqa: E402


# torch 2.13 deprecates TorchScript; these tests check it still works
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based "
                                         "ONNX export:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]


@pytest.fixture
def ct(torch):
    import cbn.torch
    return cbn.torch


def converted(torch, ct, dtype=None, seed=0):
    torch.manual_seed(seed)
    model = ct.convert_sync_batchnorm(randomise_statistics(ResNet18(), seed))
    return model if dtype is None else model.to(dtype)


def small(torch, ct):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(1),
                                torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5))
    return ct.convert_sync_batchnorm(randomise_statistics(model))


def buffers_equal(a, b):
    return all(x.dtype == y.dtype and bool((x == y).all())
               for x, y in zip(a.buffers(), b.buffers()))


def rel_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def cbn_nodes(graph):
    return [n for n in graph.nodes if n.op == "call_function" and "cbn" in str(n.target)]


# --------------------------------------------------------------------------- torch.compile

def compile_and_compare(torch, model, x, training, backend):
    eager, compiled_model = model, copy.deepcopy(model)
    eager.train(training), compiled_model.train(training)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    for step in range(2):  # the second call runs the cached graph
        xs = x + step
        xe, xc = xs.clone().requires_grad_(), xs.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        assert torch.equal(ye, yc), f"step {step}: output differs by {rel_error(yc, ye):.3g}"
        assert buffers_equal(eager, compiled_model), f"step {step}: buffers differ"
        if training:
            g = torch.randn_like(ye)
            ye.backward(g), yc.backward(g)
            assert torch.equal(xe.grad, xc.grad)
            for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
                assert torch.equal(p.grad, q.grad), name
    return compiled


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_small_model_equals_eager(torch, ct, training):
    model = small(torch, ct).double()
    compile_and_compare(torch, model, torch.randn(6, 3, 8, 8, dtype=torch.float64), training,
                        "aot_eager")
    if training:
        assert int(model[1].num_batches_tracked) == 2


def test_compile_resnet18_has_one_graph_in_training(torch, ct):
    import torch._dynamo
    model = converted(torch, ct).train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 3, 16, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_resnet18_equals_eager(torch, ct, training):
    model = converted(torch, ct, torch.float64)
    compile_and_compare(torch, model, torch.randn(4, 3, 16, 16, dtype=torch.float64), training,
                        "aot_eager")


@pytest.mark.slow
def test_compile_inductor_resnet18_training(torch, ct):
    # inductor fuses the convolutions' neighbours, so compare within float32 rounding
    torch._dynamo.reset()
    model = converted(torch, ct)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 16, 16)
    ye, yc = model(x), compiled(x)
    assert rel_error(yc, ye) < 1e-4
    yc.sum().backward()
    for a, b in zip(model.buffers(), compiled_model.buffers()):
        assert rel_error(b, a) < 1e-5 if b.is_floating_point() else torch.equal(a, b)
    model.eval(), compiled_model.eval()
    assert rel_error(compiled(x), model(x)) < 1e-4


# --------------------------------------------------------------------------- torch.export

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_small_model(torch, ct, training):
    model = small(torch, ct).double().train(training)
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    nodes = cbn_nodes(program.graph)
    if training:
        assert {str(n.target) for n in nodes} >= {"cbn.batch_norm_apply.default"}
    else:  # eval: torch's own operator, so the program runs without cbn
        assert not nodes
    module = program.module()
    x2 = torch.randn(6, 3, 8, 8, dtype=torch.float64) * 2 + 1  # a new input
    y, expected = module(x2), reference.train(training)(x2)
    assert rel_error(y, expected) < 1e-12
    if training:  # the exported module updated its (own) running statistics
        for name, value in reference.state_dict().items():
            assert rel_error(module.state_dict()[name], value) < 1e-12, name


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_resnet18(torch, ct, training):
    model = converted(torch, ct).train(training)
    reference = copy.deepcopy(model)
    program = torch.export.export(model, (torch.randn(4, 3, 16, 16),))
    x2 = torch.randn(4, 3, 16, 16)
    assert rel_error(program.module()(x2), reference(x2)) < 1e-5


# --------------------------------------------------------------------------- ONNX

def onnx_roundtrip(torch, model, x, path, **options):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.onnx.export(model, (x,), str(path), **options)
    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operators: {domains}"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(x.shape) * 2 + 1  # a new input
    out = session.run(None, {session.get_inputs()[0].name: x2.numpy()})[0]
    expected = model(x2)
    return {node.op_type for node in graph.node}, rel_error(torch.from_numpy(out), expected)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_runs_in_onnxruntime_with_batch_normalization(torch, ct, tmp_path, dynamo):
    model = small(torch, ct).eval()
    ops, error = onnx_roundtrip(torch, model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx",
                                dynamo=dynamo, **({"optimize": False} if dynamo else {}))
    assert "BatchNormalization" in ops, ops
    assert error <= 1e-5, error


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_resnet18(torch, ct, tmp_path, dynamo):
    model = converted(torch, ct).eval()
    ops, error = onnx_roundtrip(torch, model, torch.randn(2, 3, 16, 16), tmp_path / "r.onnx",
                                dynamo=dynamo)
    assert error <= 1e-5, error


# --------------------------------------------------------------------------- TorchScript and fx

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_is_right_on_a_new_input_and_saves(torch, ct, tmp_path, training):
    model = small(torch, ct).double().train(training)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    traced = torch.jit.trace(copy.deepcopy(model), (x,))  # with torch's check_trace
    x2 = torch.randn(6, 3, 8, 8, dtype=torch.float64) * 3 - 1
    reference = copy.deepcopy(model)
    reference.load_state_dict(traced.state_dict())  # tracing ran the model (and its checks)
    assert rel_error(traced(x2), reference(x2)) < 1e-12
    if training:
        assert rel_error(traced.state_dict()["1.running_var"], reference[1].running_var) < 1e-12
        assert int(traced.state_dict()["1.num_batches_tracked"]) == \
            int(reference[1].num_batches_tracked)
    path = tmp_path / "traced.pt"
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path))
    assert rel_error(loaded(x2), copy.deepcopy(reference)(x2)) < 1e-12
    if not training:  # an eval graph holds torch's operator only: it loads without cbn
        code = (f"import sys, torch; m = torch.jit.load({str(path)!r}); "
                f"m(torch.randn(2, 3, 8, 8, dtype=torch.float64)); "
                f"assert 'cbn' not in sys.modules")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_script_and_save(torch, ct, tmp_path, training):
    model = small(torch, ct).double().train(training)
    scripted = torch.jit.script(copy.deepcopy(model))
    reference = copy.deepcopy(model)
    for step in range(2):
        x = torch.randn(6, 3, 8, 8, dtype=torch.float64) + step
        assert rel_error(scripted(x), reference(x)) < 1e-12
    assert rel_error(scripted[1].running_mean, reference[1].running_mean) < 1e-12
    path = tmp_path / "scripted.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    assert rel_error(loaded(x), reference(x)) < 1e-12


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace(torch, ct, training):
    model = small(torch, ct).double().train(training)
    graph_module = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert bool(cbn_nodes(graph_module.graph)) == training
    reference = copy.deepcopy(model)
    for step in range(2):
        x = torch.randn(6, 3, 8, 8, dtype=torch.float64) * 2 + step
        assert rel_error(graph_module(x), reference(x)) < 1e-12
    if training:
        assert torch.equal(graph_module.get_buffer("1.num_batches_tracked"),
                           reference[1].num_batches_tracked)


def test_graph_loaded_in_another_process_refuses_to_train(torch, ct):
    # the handle of a layer that no longer exists
    with pytest.raises(RuntimeError, match="another process"):
        torch.ops.cbn.batch_norm_stats(torch.randn(4, 3), torch.zeros(3), torch.ones(3),
                                       None, True, 0.1, 1e-5, 12345)
