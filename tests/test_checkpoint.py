"""cbn.save / cbn.load: exact round trips as safetensors, no pickle, bounded, atomic writes."""
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import cbn
import cbn.mindspore as ms
from cbn import _files, checkpoint
from cbn.checkpoint import CheckpointError

REPO = Path(cbn.__file__).resolve().parent.parent
SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(REPO), os.environ.get("PYTHONPATH", "")]))


# --- helpers -------------------------------------------------------------------------

def randomised(layer, rng, steps=2):
    """``layer`` with parameters and statistics far from the defaults, after training steps."""
    c = layer.num_features
    if isinstance(layer, ms._BatchNorm):
        layer.gamma = rng.uniform(0.5, 2.0, c)
        layer.beta = rng.uniform(-1, 1, c)
        layer.moving_mean = rng.uniform(-1, 1, c)
        layer.moving_variance = rng.uniform(0.5, 2.0, c)
        was_training = layer.training
        layer.set_train()
        for _ in range(steps):
            layer(make_input(layer, rng))
        return layer.set_train(was_training)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2.0, c)
        layer.bias[...] = rng.uniform(-1, 1, c)
    was_training = layer.training
    layer.train()
    for _ in range(steps):
        layer(make_input(layer, rng))
    return layer.train(was_training)


def make_input(layer, rng):
    c = layer.num_features
    shape = {"BatchNorm1d": (4, c, 3), "BatchNorm2d": (3, c, 4, 2), "BatchNorm3d": (2, c, 3, 2, 2),
             "SyncBatchNorm": (3, c, 4, 2)}[type(layer).__name__]
    if getattr(layer, "data_format", "NCHW") == "NHWC":
        shape = (shape[0],) + shape[2:] + (c,)
    return (rng.standard_normal(shape) * 2 + 1).astype(layer.dtype)


def description(layer):
    """Everything a layer is: class, hyper-parameters, mode, and its arrays bit for bit."""
    fields = ["num_features", "eps", "momentum", "affine", "training", "dtype"]
    if isinstance(layer, ms._BatchNorm):
        fields += ["use_batch_statistics", "data_format"]
        arrays = layer.parameters_dict()
        fields_values = {}
        if hasattr(layer, "to_torch"):
            torch_view = layer.to_torch()
            fields_values = {"to_torch.num_batches_tracked": torch_view.num_batches_tracked,
                             "to_torch.momentum": torch_view.momentum}
        else:  # SyncBatchNorm: its timeout lives in the wrapped layer
            fields_values = {"timeout": layer._bn.timeout}
    else:
        fields += ["track_running_stats", "num_batches_tracked"]
        if isinstance(layer, cbn.SyncBatchNorm):
            fields += ["timeout"]
        arrays = {k: v for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
        fields_values = {}
    fields_values.update({f: getattr(layer, f) for f in fields})
    fields_values["class"] = type(layer)
    return fields_values, {k: (v.dtype, v.tobytes()) for k, v in arrays.items()}


def assert_same_layer(loaded, original, rng):
    assert description(loaded) == description(original)
    # ... and they go on computing the same, in their mode (training steps update statistics).
    x = make_input(original, rng)
    np.testing.assert_array_equal(loaded(x), original(x))
    assert description(loaded) == description(original)


LAYERS = {
    "torch-1d": lambda: cbn.BatchNorm1d(3),
    "torch-2d-eval-float64": lambda: cbn.BatchNorm2d(4, eps=1e-3, momentum=0.25,
                                                     dtype=np.float64).eval(),
    "torch-3d-cumulative": lambda: cbn.BatchNorm3d(2, momentum=None),
    "torch-no-affine": lambda: cbn.BatchNorm2d(3, affine=False),
    "torch-no-running-stats": lambda: cbn.BatchNorm1d(3, track_running_stats=False),
    "torch-bare": lambda: cbn.BatchNorm2d(2, affine=False, track_running_stats=False).eval(),
    "sync": lambda: cbn.SyncBatchNorm(3, momentum=0.3, timeout=12.5).eval(),
    "ms-1d": lambda: ms.BatchNorm1d(3, momentum=0.8),
    "ms-2d-nhwc-training": lambda: ms.BatchNorm2d(4, eps=1e-4, data_format="NHWC").set_train(),
    "ms-2d-batch-statistics": lambda: ms.BatchNorm2d(3, use_batch_statistics=True),
    "ms-3d-float64-fixed": lambda: ms.BatchNorm3d(2, affine=False, use_batch_statistics=False,
                                                  dtype=np.float64),
    "ms-from-torch": lambda: ms.BatchNorm2d.from_torch(cbn.BatchNorm2d(3, momentum=0.1)),
    "ms-sync": lambda: ms.SyncBatchNorm(3, momentum=0.7, timeout=30.0),
}



def read_parts(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_parts(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + data)


def document_of(path):
    return json.loads(read_parts(path)[0]["__metadata__"]["cbn"])


def rewrite(path, edit=None, edit_header=None, resign=False):
    """Edit a checkpoint's cbn document (and/or header), maybe recomputing its digest."""
    header, data = read_parts(path)
    document = json.loads(header["__metadata__"]["cbn"])
    if edit:
        edit(document)
    if edit_header:
        edit_header(header)
    if resign:  # a forger who recomputes the digest, as cbn does
        arrays = {}
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                arrays[name] = np.frombuffer(data[begin:end], checkpoint._DTYPES[
                    entry["dtype"]]).reshape(entry["shape"])
        try:
            document["sha256"] = checkpoint._digest(document, arrays)
        except (KeyError, TypeError, ValueError):  # names not in the file: keep the old one
            pass
    header["__metadata__"]["cbn"] = json.dumps(document)
    write_parts(path, header, data)


def peak_allocation(function):
    """(result or exception, peak bytes Python allocated while it ran)."""
    tracemalloc.start()
    try:
        try:
            result = function()
        except Exception as exc:  # noqa: BLE001 - returned for the caller to check
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_a_layer_round_trips_exactly(make, tmp_path, rng):
    layer = randomised(make(), rng)
    path = tmp_path / "bn.safetensors"
    cbn.save(path, layer)
    loaded = cbn.load(path)
    assert loaded is not layer
    assert_same_layer(loaded, layer, rng)


def test_a_dict_of_layers_round_trips_in_order(tmp_path, rng):
    layers = {"stem.bn": randomised(cbn.BatchNorm2d(3), rng),
              "head": randomised(ms.BatchNorm1d(5), rng),
              "a": randomised(cbn.SyncBatchNorm(2).eval(), rng)}
    cbn.save(str(tmp_path / "net.safetensors"), layers)
    loaded = cbn.load(str(tmp_path / "net.safetensors"))
    assert list(loaded) == list(layers)
    for name in layers:
        assert_same_layer(loaded[name], layers[name], rng)


def test_state_dicts_round_trip_as_dicts_of_arrays_in_order(tmp_path, rng):
    layer = randomised(cbn.BatchNorm2d(3), rng)
    states = [layer.state_dict(),
              randomised(ms.BatchNorm2d(3), rng).parameters_dict(),
              cbn.convert.torch_to_mindspore({"layer1.bn." + k: v
                                              for k, v in layer.state_dict().items()}),
              {"flags": np.array([True, False]), "count": 7, "half": np.float16([1.5, -2]),
               "big-endian": np.arange(3, dtype=">i4"), "strided": np.arange(12.0)[::3],
               "empty": np.zeros((0, 4)), "z": np.uint16(9), "a": np.int8([-1])},
              {}]
    for i, state in enumerate(states):
        cbn.save(tmp_path / f"{i}.safetensors", state)
        loaded = cbn.load(tmp_path / f"{i}.safetensors")
        assert list(loaded) == list(state)
        for key, value in state.items():
            assert isinstance(loaded[key], np.ndarray) and loaded[key].flags.writeable
            assert loaded[key].dtype == np.asarray(value).dtype.newbyteorder("=")
            np.testing.assert_array_equal(loaded[key], value)
    fresh = cbn.BatchNorm2d(3)
    fresh.load_state_dict(cbn.load(tmp_path / "0.safetensors"))
    assert description(fresh.train(layer.training)) == description(layer)


def test_the_file_is_plain_safetensors_with_pytorch_names(tmp_path, rng):
    layer = randomised(cbn.BatchNorm2d(3), rng)
    cbn.save(tmp_path / "bn.safetensors", layer)
    arrays = safetensors.numpy.load_file(tmp_path / "bn.safetensors")
    assert set(arrays) == {"weight", "bias", "running_mean", "running_var",
                           "num_batches_tracked"}
    np.testing.assert_array_equal(arrays["running_var"], layer.running_var)
    assert arrays["num_batches_tracked"].dtype == np.int64
    assert arrays["num_batches_tracked"].shape == () and arrays["num_batches_tracked"] == 2
    with safetensors.safe_open(tmp_path / "bn.safetensors", "numpy") as file:
        assert set(file.metadata()) == {"cbn"}
    document = document_of(tmp_path / "bn.safetensors")
    assert document["format"] == "cbn-checkpoint" and document["version"] == 2
    assert document["layers"][0]["class"] == "BatchNorm2d"
    assert document["layers"][0]["config"]["momentum"] == 0.1


def test_save_writes_exactly_the_given_name(tmp_path):
    cbn.save(tmp_path / "weights.bin", cbn.BatchNorm1d(2))
    assert os.listdir(tmp_path) == ["weights.bin"]
    assert isinstance(cbn.load(tmp_path / "weights.bin"), cbn.BatchNorm1d)


# --- PyTorch interop, both ways ----------------------------------------------------------

def test_a_cbn_checkpoint_loads_into_torch_batch_norm_by_key(torch, tmp_path, rng):
    from safetensors.torch import load_file
    layers = {"bn1": randomised(cbn.BatchNorm2d(4), rng).eval(),
              "bn2": randomised(cbn.BatchNorm1d(3, momentum=None), rng).eval()}
    cbn.save(tmp_path / "net.safetensors", layers)
    model = torch.nn.ModuleDict({"bn1": torch.nn.BatchNorm2d(4), "bn2": torch.nn.BatchNorm1d(3)})
    model.load_state_dict(load_file(tmp_path / "net.safetensors"), strict=True)
    model.eval()
    for name, layer in layers.items():
        state = model[name].state_dict()
        assert state["num_batches_tracked"].dtype == torch.int64
        for key, value in layer.state_dict().items():
            np.testing.assert_array_equal(state[key].numpy(), value)
    x = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(model["bn1"](torch.from_numpy(x)).numpy(), layers["bn1"](x),
                                   rtol=1e-6, atol=1e-6)


def test_a_torch_state_dict_in_safetensors_loads_into_cbn(torch, tmp_path):
    from safetensors.torch import save_file
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(3))
    model[0](torch.randn(8, 4, 3, 3))
    model[0].weight.data.uniform_(0.5, 2)
    model[1](torch.randn(8, 3))
    save_file(model.state_dict(), tmp_path / "torch.safetensors")
    arrays = cbn.load(tmp_path / "torch.safetensors")
    assert sorted(arrays) == sorted(model.state_dict())  # in the file's (alignment) order
    for key, tensor in model.state_dict().items():
        np.testing.assert_array_equal(arrays[key], tensor.numpy())
    target = {"0": cbn.BatchNorm2d(4), "1": ms.BatchNorm1d(3)}
    assert cbn.load(tmp_path / "torch.safetensors", into=target) is target
    np.testing.assert_array_equal(target["0"].weight, model[0].weight.detach().numpy())
    np.testing.assert_array_equal(target["0"].running_var, model[0].running_var.numpy())
    assert target["0"].num_batches_tracked == 1
    np.testing.assert_array_equal(target["1"].moving_variance, model[1].running_var.numpy())
    save_file(model[0].state_dict(), tmp_path / "one.safetensors")
    one = cbn.load(tmp_path / "one.safetensors", into=cbn.BatchNorm2d(4))
    np.testing.assert_array_equal(one.running_mean, model[0].running_mean.numpy())


# --- loading into existing layers -------------------------------------------------------

def test_load_into_a_layer_keeps_its_hyper_parameters_and_mode(tmp_path, rng):
    saved = randomised(cbn.BatchNorm2d(3, momentum=0.3), rng).eval()
    cbn.save(tmp_path / "bn.st", saved)
    target = cbn.BatchNorm2d(3, eps=1e-3)
    assert cbn.load(tmp_path / "bn.st", into=target) is target
    assert target.training and target.eps == 1e-3 and target.momentum == 0.1
    np.testing.assert_array_equal(target.running_var, saved.running_var)
    np.testing.assert_array_equal(target.weight, saved.weight)
    assert target.num_batches_tracked == saved.num_batches_tracked


def test_load_into_a_dict_of_layers(tmp_path, rng):
    saved = {"a": randomised(ms.BatchNorm2d(2), rng), "b": randomised(cbn.BatchNorm1d(3), rng)}
    cbn.save(tmp_path / "net.st", saved)
    target = {"b": cbn.BatchNorm1d(3), "a": ms.BatchNorm2d(2)}
    cbn.load(tmp_path / "net.st", into=target)
    np.testing.assert_array_equal(target["a"].moving_variance, saved["a"].moving_variance)
    np.testing.assert_array_equal(target["b"].running_mean, saved["b"].running_mean)
    with pytest.raises(CheckpointError, match=r"holds layers \['a', 'b'\].*\['a'\]"):
        cbn.load(tmp_path / "net.st", into={"a": ms.BatchNorm2d(2)})


@pytest.mark.parametrize("target,message", [
    (cbn.BatchNorm2d(5), r"has 3 channels, but the target layer has 5"),
    (cbn.BatchNorm1d(3), r"holds a cbn.BatchNorm2d, cannot load it into a cbn.BatchNorm1d"),
    (ms.BatchNorm2d(3), r"holds a cbn.BatchNorm2d, cannot load it into a "
                        r"cbn.mindspore.BatchNorm2d"),
    (cbn.BatchNorm2d(3, affine=False), r"BatchNorm2d: missing keys.*unexpected keys "
                                       r"\['bias', 'weight'\]"),
    ({"bn": cbn.BatchNorm2d(3)}, r"holds one layer, not a dict"),
])
def test_load_into_the_wrong_layer_says_why(target, message, tmp_path):
    cbn.save(tmp_path / "bn.st", cbn.BatchNorm2d(3))
    before = description(target) if not isinstance(target, dict) else None
    with pytest.raises(CheckpointError, match=message):
        cbn.load(tmp_path / "bn.st", into=target)
    if before is not None:
        assert description(target) == before


def test_load_into_checks_every_layer_before_writing_any(tmp_path, rng):
    """A bad target anywhere in the dict: an error, and no target has changed."""
    saved = {"a": randomised(cbn.BatchNorm2d(3), rng), "b": randomised(ms.BatchNorm2d(3), rng),
             "c": randomised(cbn.BatchNorm1d(2), rng)}
    cbn.save(tmp_path / "net.st", saved)
    cbn.save(tmp_path / "state.st", {f"{name}.{key}": value for name, layer in saved.items()
                                     for key, value in (layer.state_dict().items()
                                                        if name != "b" else
                                                        layer.parameters_dict().items())})
    for bad in [ms.BatchNorm2d(4), cbn.BatchNorm2d(3), ms.BatchNorm2d(3, affine=False)]:
        for path in ["net.st", "state.st"]:
            target = {"a": cbn.BatchNorm2d(3), "b": ms.BatchNorm2d(3), "c": cbn.BatchNorm1d(2)}
            target["c" if isinstance(bad, ms._BatchNorm) else "b"] = bad
            before = {name: description(layer) for name, layer in target.items()}
            try:
                cbn.load(tmp_path / path, into=target)
            except CheckpointError:
                pass
            else:  # the MindSpore layer without affine takes the same arrays: not a bad target
                assert path == "state.st" or not bad.affine
                continue
            assert {name: description(layer) for name, layer in target.items()} == before
    target = {"a": cbn.BatchNorm2d(3), "b": ms.BatchNorm2d(3), "c": cbn.BatchNorm1d(2)}
    for path in ["net.st", "state.st"]:
        cbn.load(tmp_path / path, into=target)
        for name in saved:
            assert description(target[name])[1] == description(saved[name])[1]


def test_load_into_from_a_state_file_names_what_does_not_fit(tmp_path):
    cbn.save(tmp_path / "state.st", {"bn1.weight": np.ones(3, np.float32), "conv.weight":
                                     np.ones((3, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"arrays \['conv.weight'\] that belong to none"):
        cbn.load(tmp_path / "state.st", into={"bn1": cbn.BatchNorm2d(3)})
    with pytest.raises(CheckpointError, match=r"missing keys \['weight', 'bias'"):
        cbn.load(tmp_path / "state.st", into=cbn.BatchNorm2d(3))
    with pytest.raises(CheckpointError, match="holds a dict of layers"):
        cbn.save(tmp_path / "net.st", {"a": cbn.BatchNorm2d(3)})
        cbn.load(tmp_path / "net.st", into=cbn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="into= must be a cbn batch-norm layer"):
        cbn.load(tmp_path / "net.st", into={"a": object()})


# --- what cannot be saved ----------------------------------------------------------------

class MyBatchNorm(cbn.BatchNorm2d):
    pass


@pytest.mark.parametrize("obj,error,message", [
    ([cbn.BatchNorm2d(3)], TypeError, "expects a cbn batch-norm layer"),
    (MyBatchNorm(3), TypeError, "expects a cbn batch-norm layer"),
    ({"a": cbn.BatchNorm2d(3), "b": np.zeros(3)}, TypeError, r"only.*\['b'\] are not layers"),
    ({"x": np.array([object()])}, TypeError, "has dtype object"),
    ({"x": np.array(["text"])}, TypeError, "has dtype <U4"),
    ({"x": np.zeros(2, complex)}, TypeError, "has dtype complex128"),
    ({"x": np.zeros(2, np.longdouble)}, TypeError, "at most 64 bits"),
    ({"../evil": np.zeros(3)}, ValueError, "is not allowed"),
    ({"__metadata__": np.zeros(3)}, ValueError, "is not allowed"),
    ({1: np.zeros(3)}, ValueError, "is not allowed"),
])
def test_what_cannot_be_saved(obj, error, message, tmp_path):
    with pytest.raises(error, match=message):
        cbn.save(tmp_path / "x.st", obj)
    assert os.listdir(tmp_path) == []


# --- hostile, truncated and tampered files --------------------------------------------------

class RunsCode:
    """Unpickling this creates a directory: the proof that a loader ran attacker code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_no_pickle_anywhere(tmp_path, monkeypatch, rng):
    """Loading never unpickles: pickle's loaders raise, and every kind of file still loads."""
    marker = tmp_path / "pwned"
    (tmp_path / "pickle.st").write_bytes(pickle.dumps(RunsCode(marker)))
    cbn.save(tmp_path / "layer.st", randomised(ms.BatchNorm2d(3), rng))
    cbn.save(tmp_path / "net.st", {"a": cbn.BatchNorm2d(2), "b": cbn.SyncBatchNorm(2)})
    cbn.save(tmp_path / "state.st", cbn.BatchNorm2d(2).state_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")
    for name in ["load", "loads", "Unpickler"]:
        monkeypatch.setattr(pickle, name, refuse)
    with pytest.raises(CheckpointError):
        cbn.load(tmp_path / "pickle.st")
    assert not marker.exists()
    for name in ["layer.st", "net.st", "state.st"]:
        cbn.load(tmp_path / name)
    source = Path(checkpoint.__file__).read_text()
    assert "import pickle" not in source and "allow_pickle" not in source and "eval(" not in source


def test_a_class_outside_the_fixed_table_is_refused(tmp_path):
    path = tmp_path / "bn.st"
    cbn.save(path, cbn.BatchNorm2d(3))
    for flavour, name in [("torch", "os.system"), ("torch", "_BatchNorm"),
                          ("builtins", "eval"), ("mindspore", "SyncBatchNorm2d")]:
        rewrite(path, lambda d: d["layers"][0].update(flavour=flavour, **{"class": name}),
                resign=True)
        with pytest.raises(CheckpointError, match=f"unknown layer class '{name}'"):
            cbn.load(path)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["layers"][0]["config"].update(num_features=True), "num_features=True"),
    (lambda d: d["layers"][0]["config"].update(eps="1e-5"), "eps='1e-5'"),
    (lambda d: d["layers"][0]["config"].update(dtype="object"), "layer dtype 'object'"),
    (lambda d: d["layers"][0]["config"].update(process_group="x"), "hyper-parameters"),
    (lambda d: d["layers"][0]["config"].update(eps=-1.0), "eps must be > 0"),
    (lambda d: d["layers"][0]["config"].update(num_features=4),
     r"(weight|bias) is float32 \(3,\), expected float32 \(4,\)"),
    (lambda d: d["layers"][0]["config"].update(affine=False), r"must hold the arrays"),
    (lambda d: d["layers"][0]["arrays"].pop("bias"), r"must hold the arrays"),
    (lambda d: d["layers"][0]["arrays"].update(bias="weight"), "each tensor exactly once"),
    (lambda d: d["layers"][0]["arrays"].update(bias="nowhere"), r"not in the file"),
    (lambda d: d["layers"][0].update(training="yes"), "training is not a bool"),
    (lambda d: d["layers"][0].update(extra={"code": "os.system"}), "bad extra state"),
    (lambda d: d.update(kind="layers"), "bad layer name"),
    (lambda d: d.update(version=3), "newer cbn"),
    (lambda d: d.update(version=1), "not a safetensors one"),
    (lambda d: d.update(format="other"), "not a cbn-checkpoint document"),
    (lambda d: d["arrays"].append("ghost"), r"do not match the description"),
    (lambda d: d["layers"].append(dict(d["layers"][0])), "2 layer records"),
])
def test_an_edited_description_is_refused_even_with_a_recomputed_digest(edit, message,
                                                                        tmp_path):
    path = tmp_path / "bn.st"
    cbn.save(path, cbn.BatchNorm2d(3))
    rewrite(path, edit, resign=True)
    with pytest.raises(CheckpointError, match=message):
        cbn.load(path)


def test_edits_without_a_recomputed_digest_are_detected(tmp_path):
    path = tmp_path / "bn.st"
    cbn.save(path, cbn.BatchNorm2d(3))
    rewrite(path, lambda d: d["layers"][0]["config"].update(eps=0.5))
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        cbn.load(path)
    cbn.save(path, cbn.BatchNorm2d(3))
    header, data = read_parts(path)
    begin, end = header["running_var"]["data_offsets"]
    write_parts(path, header, data[:begin] + np.full(3, 2, np.float32).tobytes() + data[end:])
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        cbn.load(path)


def forged(tmp_path, make_layer, keep_arrays=()):
    """A checkpoint of ``make_layer()`` whose tensors are all dropped but ``keep_arrays``,
    the description edited to match and its digest recomputed: a forger's file."""
    path = tmp_path / "forged.st"
    cbn.save(path, make_layer())
    header, data = read_parts(path)
    document = json.loads(header["__metadata__"]["cbn"])
    kept = {name: entry for name, entry in header.items() if name in keep_arrays}
    offset, new_header, new_data = 0, {"__metadata__": header["__metadata__"]}, b""
    for name, entry in kept.items():
        begin, end = entry["data_offsets"]
        new_header[name] = dict(entry, data_offsets=[offset, offset + end - begin])
        new_data += data[begin:end]
        offset += end - begin
    document["arrays"] = list(kept)
    document["layers"][0]["arrays"] = {name: name for name in kept}
    write_parts(path, new_header, new_data)
    return path, document


@pytest.mark.parametrize("num_features", [3 * 10 ** 8, 10 ** 13, 2 ** 62])
@pytest.mark.parametrize("make", [lambda: cbn.BatchNorm2d(3), lambda: ms.BatchNorm2d(3),
                                  lambda: cbn.SyncBatchNorm(3)], ids=["torch", "ms", "sync"])
def test_a_forged_channel_count_is_refused_before_allocating(make, num_features, tmp_path):
    path, document = forged(tmp_path, make)
    document["layers"][0]["config"]["num_features"] = num_features

    def edit(d):
        d.clear()
        d.update(document)
    rewrite(path, edit, resign=True)
    assert path.stat().st_size < 2000
    error, peak = peak_allocation(lambda: cbn.load(path))
    assert isinstance(error, CheckpointError), error
    assert "must hold the arrays" in str(error)
    assert peak < 1 << 20, peak


def test_a_bare_layer_of_forged_size_allocates_nothing(tmp_path):
    """Without affine and running statistics a layer has no arrays: any channel count is cheap."""
    path, document = forged(tmp_path, lambda: cbn.BatchNorm2d(3, affine=False,
                                                              track_running_stats=False))
    rewrite(path, lambda d: d["layers"][0]["config"].update(num_features=10 ** 13), resign=True)
    layer, peak = peak_allocation(lambda: cbn.load(path))
    assert layer.num_features == 10 ** 13 and peak < 1 << 20


def size_bombs(tmp_path):
    """(name, bytes) of files whose header declares far more than they hold."""
    cbn.save(tmp_path / "ok.st", cbn.BatchNorm2d(3))
    raw = (tmp_path / "ok.st").read_bytes()
    header, data = read_parts(tmp_path / "ok.st")

    def with_header(edit):
        h = json.loads(json.dumps(header))
        edit(h)
        text = json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text + data

    def entry(**fields):
        return lambda h: h["weight"].update(fields)
    return [
        ("header length 2**63", (2 ** 63).to_bytes(8, "little") + raw[8:]),
        ("header length 2**64-1", b"\xff" * 8 + raw[8:]),
        ("header length just past the end", (len(raw) - 7).to_bytes(8, "little") + raw[8:]),
        ("shape 10**12", with_header(entry(shape=[10 ** 12]))),
        ("shape overflowing int64", with_header(entry(shape=[2 ** 62, 4]))),
        ("shape 2**70", with_header(entry(shape=[2 ** 70]))),
        ("offsets past the end", with_header(entry(data_offsets=[0, 10 ** 12],
                                                   shape=[25 * 10 ** 10]))),
        ("offsets reversed", with_header(entry(data_offsets=[12, 0]))),
        ("overlapping", with_header(lambda h: h["bias"].update(h["weight"]))),
        ("dtype bfloat16", with_header(entry(dtype="BF16"))),
        ("dtype object", with_header(entry(dtype="O"))),
        ("nested JSON", len(b"[" * 100000).to_bytes(8, "little") + b"[" * 100000),
        ("a 4000-digit number", with_header(entry(shape=[int("9" * 4000)]))),
        ("JSON NaN", with_header(lambda h: h.update(x=float("nan")))),
        ("duplicate key", raw[:8 + 1] + raw[8 + 1:8 + int.from_bytes(raw[:8], "little")]
         .replace(b'"weight"', b'"bias"') + raw[8 + int.from_bytes(raw[:8], "little"):]),
        ("not UTF-8", raw[:9] + b"\xff" + raw[10:]),
        ("an .npz archive", b"PK\x03\x04" + b"\x00" * 100),
    ]


def test_size_bombs_are_refused_before_allocating(tmp_path):
    for name, content in size_bombs(tmp_path):
        path = tmp_path / "bomb.st"
        path.write_bytes(content)
        error, peak = peak_allocation(lambda: cbn.load(path))
        assert isinstance(error, CheckpointError), (name, error)
        assert str(path) in str(error), (name, error)
        assert peak < 16 * len(content) + (1 << 20), (name, peak)


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "x.st"
    np.save(path, np.zeros(3))
    os.replace(str(path) + ".npy", path)
    with pytest.raises(CheckpointError, match="not a safetensors file|not a valid safetensors"):
        cbn.load(path)
    np.savez(path, weight=np.zeros(3))
    os.replace(str(path) + ".npz", path)
    with pytest.raises(CheckpointError, match="zip archive"):
        cbn.load(path)
    for content in [b"", b"1234567", b"just some text\n", b"\x00" * 64]:
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=str(path)):
            cbn.load(path)
    with pytest.raises(FileNotFoundError):
        cbn.load(tmp_path / "absent.st")


def test_a_plain_safetensors_file_with_other_metadata_loads_as_arrays(tmp_path):
    safetensors.numpy.save_file({"w": np.arange(3.0)}, tmp_path / "x.st",
                                metadata={"format": "pt"})
    np.testing.assert_array_equal(cbn.load(tmp_path / "x.st")["w"], np.arange(3.0))
    safetensors.numpy.save_file({"w": np.arange(3.0)}, tmp_path / "x.st",
                                metadata={"cbn": "{not json"})
    with pytest.raises(CheckpointError, match="cbn metadata is not valid JSON"):
        cbn.load(tmp_path / "x.st")
    cbn.save(tmp_path / "bn.st", cbn.BatchNorm2d(3))  # one flipped bit: 'cbn' -> 'cbo'
    raw = (tmp_path / "bn.st").read_bytes().replace(b'"cbn":', b'"cbo":', 1)
    (tmp_path / "bn.st").write_bytes(raw)
    with pytest.raises(CheckpointError, match="description under the key"):
        cbn.load(tmp_path / "bn.st")


def test_a_few_truncations_and_flips_are_refused(tmp_path, rng):
    """The quick version of tests/test_checkpoint_fuzz.py."""
    layer = randomised(ms.BatchNorm2d(3), rng)
    path, bad = tmp_path / "bn.st", tmp_path / "bad.st"
    cbn.save(path, layer)
    data = path.read_bytes()
    for length in range(0, len(data), 37):
        bad.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match=str(bad)):
            cbn.load(bad)
    refused = 0
    for position in range(0, len(data), 41):
        bad.write_bytes(data[:position] + bytes([data[position] ^ 0x5A]) + data[position + 1:])
        try:
            loaded = cbn.load(bad)
        except CheckpointError:
            refused += 1
        else:
            assert description(loaded) == description(layer), position
    assert refused > 0


# --- paths that are not regular files ---------------------------------------------------------

def in_thread(function, timeout=10):
    """``function()``'s result or exception; fails the test if it blocks."""
    outcome = []

    def run():
        try:
            outcome.append(function())
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"{function} blocked for {timeout} s"
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_a_directory_or_a_device_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [(fifo, "is a FIFO"), (tmp_path, "is a directory")]
    if os.path.exists("/dev/null"):
        cases.append((Path("/dev/null"), "is a device"))
    for path, message in cases:
        error = in_thread(lambda: cbn.load(path))
        assert isinstance(error, CheckpointError) and message in str(error), error
        error = in_thread(lambda: cbn.save(path, cbn.BatchNorm1d(2)))
        assert isinstance(error, CheckpointError) and message in str(error), error
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(os.listdir(tmp_path)) == ["fifo"]
    link = tmp_path / "link"
    link.symlink_to(fifo)
    error = in_thread(lambda: cbn.load(link))
    assert isinstance(error, CheckpointError) and "is a FIFO" in str(error)


def test_saving_onto_a_symlink_writes_the_file_it_points_to(tmp_path):
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "bn.st"
    cbn.save(real, cbn.BatchNorm1d(2, eps=0.5))
    link = tmp_path / "latest.st"
    link.symlink_to(real)
    cbn.save(link, cbn.BatchNorm1d(2, eps=0.25))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert cbn.load(real).eps == 0.25 and cbn.load(link).eps == 0.25
    assert os.listdir(tmp_path / "runs") == ["bn.st"]
    dangling = tmp_path / "dangling.st"
    dangling.symlink_to(tmp_path / "runs" / "new.st")
    cbn.save(dangling, cbn.BatchNorm1d(2))
    assert dangling.is_symlink() and (tmp_path / "runs" / "new.st").is_file()
    loop = tmp_path / "loop.st"
    loop.symlink_to(loop)
    with pytest.raises((CheckpointError, OSError)):
        cbn.save(loop, cbn.BatchNorm1d(2))
    assert loop.is_symlink()


# --- atomic writes and their debris ------------------------------------------------------------

def test_a_failure_mid_save_leaves_the_old_file_and_no_debris(tmp_path, rng, monkeypatch):
    path = tmp_path / "bn.st"
    old = randomised(cbn.BatchNorm2d(3), rng)
    cbn.save(path, old)
    before = path.read_bytes()

    def fail(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        cbn.save(path, randomised(cbn.BatchNorm2d(3), rng))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["bn.st"]
    assert description(cbn.load(path)) == description(old)


def temporaries(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def test_a_save_killed_mid_write_leaves_the_old_file_and_the_next_save_cleans_up(tmp_path):
    """SIGKILL after the temporary is written, before the rename: the old checkpoint stays,
    the torn temporary is recognised (its process is gone) and removed by the next save."""
    path = tmp_path / "bn.st"
    cbn.save(path, cbn.BatchNorm2d(3, eps=0.5))
    script = f"""
import os, signal, cbn
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
cbn.save({str(path)!r}, cbn.BatchNorm2d(3, eps=0.25))
"""
    result = subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, timeout=60,
                            capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert cbn.load(path).eps == 0.5
    (torn,) = temporaries(tmp_path)
    assert torn.startswith(".bn.st.cbn-")
    (tmp_path / "other.st").write_bytes(b"")  # files of other names are never touched
    cbn.save(path, cbn.BatchNorm2d(3, eps=0.25))
    assert cbn.load(path).eps == 0.25
    assert sorted(os.listdir(tmp_path)) == ["bn.st", "other.st"]


def test_temporaries_of_live_saves_are_kept(tmp_path):
    """A temporary whose process lives (another save in progress) stays; a dead one's goes,
    another host's goes only once it is an hour old."""
    path = tmp_path / "bn.st"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
        host, other = _files._HOST, "0" * 8 if _files._HOST != "0" * 8 else "1" * 8
        names = {f".bn.st.cbn-{host}-{os.getpid()}-{'a' * 16}.tmp": True,
                 f".bn.st.cbn-{host}-{sleeper.pid}-{'b' * 16}.tmp": True,
                 f".bn.st.cbn-{host}-{dead}-{'c' * 16}.tmp": False,
                 f".bn.st.cbn-{other}-{dead}-{'d' * 16}.tmp": True,
                 f".bn.st.cbn-{other}-{dead}-{'e' * 16}.tmp.old": True,
                 f".bn.st.cbn-{other}-1-{'f' * 16}.tmp": False,
                 f".other.st.cbn-{host}-{dead}-{'0' * 16}.tmp": True}
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
        hour_ago = time.time() - 3700
        os.utime(tmp_path / f".bn.st.cbn-{other}-1-{'f' * 16}.tmp", (hour_ago, hour_ago))
        cbn.save(path, cbn.BatchNorm1d(2))
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["bn.st"] + [name for name, kept in names.items() if kept])
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)


def test_the_file_and_then_its_directory_are_synced_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source, target):
        events.append(f"replace {Path(source).parent == tmp_path} {Path(target).name}")
        real_replace(source, target)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cbn.save(tmp_path / "bn.st", cbn.BatchNorm1d(2))
    assert events == ["fsync file", "replace True bn.st", "fsync directory"]


def test_the_new_file_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        cbn.save(tmp_path / "bn.st", cbn.BatchNorm1d(2))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "bn.st").st_mode) == 0o644


def test_a_loader_racing_a_saver_sees_one_file_or_the_other(tmp_path, monkeypatch):
    """The rename lands between the loader's checks and its reads: it still reads one file.

    (Loading by path twice, as np.load did, mixed the old file's size with the new one.)
    """
    path = tmp_path / "bn.st"
    small, big = cbn.BatchNorm1d(2), {f"l{i}": cbn.BatchNorm1d(64) for i in range(20)}
    cbn.save(path, small)
    real_fstat = os.fstat

    def fstat_then_replace(fd):
        info = real_fstat(fd)
        if stat.S_ISREG(info.st_mode):
            monkeypatch.setattr(os, "fstat", real_fstat)
            cbn.save(path, big)  # renamed over the path while the loader holds the old file
        return info
    monkeypatch.setattr(os, "fstat", fstat_then_replace)
    assert isinstance(cbn.load(path), cbn.BatchNorm1d)
    assert isinstance(cbn.load(path), dict)


@pytest.mark.parametrize("cls", [cbn.BatchNorm2d, cbn.SyncBatchNorm])
def test_a_layer_without_bias_round_trips(tmp_path, cls):
    layer = cls(3, bias=False)
    layer.weight[...] = [1.5, 2.0, 0.5]
    cbn.save(tmp_path / "bn.st", layer)
    loaded = cbn.load(tmp_path / "bn.st")
    assert loaded.bias is None and np.array_equal(loaded.weight, layer.weight)
    target = cls(3, bias=False)
    cbn.load(tmp_path / "bn.st", into=target)
    assert np.array_equal(target.weight, layer.weight)


def test_mindspore_batchnorm3d_arrays_from_a_plain_file_load_into_a_dict(tmp_path):
    """MindSpore's real BatchNorm3d names (``layer.bn2d.gamma``) find their layer by name."""
    from safetensors.numpy import save_file
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    save_file({f"layer.bn2d.{n}": np.full(2, i + 2.0, np.float32) for i, n in enumerate(names)},
              str(tmp_path / "ms.st"))
    target = {"layer": ms.BatchNorm3d(2)}
    cbn.load(tmp_path / "ms.st", into=target)
    assert np.array_equal(target["layer"].moving_variance, [5.0, 5.0])
