"""cbn.save / cbn.load: exact round trips, no pickle, clear errors, atomic writes."""
import hashlib
import io
import json
import os
import pickle
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cbn
import cbn.mindspore as ms
from cbn import convert
from cbn.checkpoint import META_KEY, CheckpointError

REPO = Path(cbn.__file__).resolve().parent.parent


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


def archive_members(path):
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def npy_bytes(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def write_archive(path, members, compression=zipfile.ZIP_STORED, compress=None):
    """Write ``members`` (name: bytes); ``compress``: the one member to compress, if any."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if name == compress else None)


def read_meta(path):
    return json.loads(str(np.load(path, allow_pickle=False)[META_KEY][()]))


def rewrite(path, edit_meta=None, edit_members=None, resign=False):
    """Rewrite a checkpoint: edit its JSON document and/or members, maybe fixing the digests."""
    members = archive_members(path)
    meta = read_meta(path)
    if edit_members:
        edit_members(members)
    if edit_meta:
        edit_meta(meta)
    if resign:  # a forger who recomputes every digest
        for entry in meta["arrays"]:
            name = entry["name"] + ".npy"
            try:
                array = np.lib.format.read_array(io.BytesIO(members[name]))
            except (KeyError, ValueError):  # absent, or pickled: keep the old digest
                continue
            entry["sha256"] = hashlib.sha256(array.tobytes()).hexdigest()
        body = {k: v for k, v in meta.items() if k != "sha256"}
        meta["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                        .encode()).hexdigest()
    members[META_KEY + ".npy"] = npy_bytes(np.array(json.dumps(meta)))
    write_archive(path, members)


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


# --- round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_a_layer_round_trips_exactly(make, tmp_path, rng):
    layer = randomised(make(), rng)
    path = tmp_path / "bn.npz"
    cbn.save(path, layer)
    loaded = cbn.load(path)
    assert loaded is not layer
    assert_same_layer(loaded, layer, rng)


def test_a_dict_of_layers_round_trips_in_order(tmp_path, rng):
    layers = {"stem.bn": randomised(cbn.BatchNorm2d(3), rng),
              "head": randomised(ms.BatchNorm1d(5), rng),
              "a": randomised(cbn.SyncBatchNorm(2).eval(), rng)}
    cbn.save(str(tmp_path / "net.npz"), layers)
    loaded = cbn.load(str(tmp_path / "net.npz"))
    assert list(loaded) == list(layers)
    for name in layers:
        assert_same_layer(loaded[name], layers[name], rng)


def test_state_dicts_round_trip_as_dicts_of_arrays(tmp_path, rng):
    layer = randomised(cbn.BatchNorm2d(3), rng)
    states = [layer.state_dict(),
              randomised(ms.BatchNorm2d(3), rng).parameters_dict(),
              convert.torch_to_mindspore({"layer1.bn." + k: v
                                          for k, v in layer.state_dict().items()}),
              {"flags": np.array([True, False]), "count": 7, "half": np.float16([1.5, -2])},
              {}]
    for i, state in enumerate(states):
        cbn.save(tmp_path / f"{i}.npz", state)
        loaded = cbn.load(tmp_path / f"{i}.npz")
        assert list(loaded) == list(state)
        for key, value in state.items():
            assert isinstance(loaded[key], np.ndarray)
            assert loaded[key].dtype == np.asarray(value).dtype
            np.testing.assert_array_equal(loaded[key], value)
    fresh = cbn.BatchNorm2d(3)
    fresh.load_state_dict(cbn.load(tmp_path / "0.npz"))
    assert description(fresh.train(layer.training)) == description(layer)


def test_a_torch_state_dict_round_trips(torch, tmp_path):
    model = torch.nn.BatchNorm2d(4)
    model(torch.randn(8, 4, 3, 3))
    cbn.save(tmp_path / "torch.npz", model.state_dict())
    loaded = cbn.load(tmp_path / "torch.npz")
    for key, tensor in model.state_dict().items():
        np.testing.assert_array_equal(loaded[key], tensor.numpy())
    layer = cbn.BatchNorm2d(4)
    layer.load_state_dict(loaded)
    assert layer.num_batches_tracked == 1


def test_the_file_is_a_plain_npz_without_pickle(tmp_path, rng):
    layer = randomised(cbn.BatchNorm2d(3), rng)
    cbn.save(tmp_path / "bn.npz", layer)
    with np.load(tmp_path / "bn.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {META_KEY, "weight", "bias", "running_mean", "running_var",
                                  "num_batches_tracked"}
        np.testing.assert_array_equal(npz["running_var"], layer.running_var)
        meta = json.loads(str(npz[META_KEY][()]))
    assert meta["format"] == "cbn-checkpoint" and meta["version"] == 1
    assert meta["layers"][0]["class"] == "BatchNorm2d"
    assert meta["layers"][0]["config"]["momentum"] == 0.1


def test_save_writes_exactly_the_given_name(tmp_path):
    cbn.save(tmp_path / "weights.bin", cbn.BatchNorm1d(2))
    assert os.listdir(tmp_path) == ["weights.bin"]
    assert isinstance(cbn.load(tmp_path / "weights.bin"), cbn.BatchNorm1d)


# --- loading into existing layers -------------------------------------------------------

def test_load_into_a_layer_keeps_its_hyper_parameters_and_mode(tmp_path, rng):
    saved = randomised(cbn.BatchNorm2d(3, momentum=0.3), rng).eval()
    cbn.save(tmp_path / "bn.npz", saved)
    target = cbn.BatchNorm2d(3, eps=1e-3)
    assert cbn.load(tmp_path / "bn.npz", into=target) is target
    assert target.training and target.eps == 1e-3 and target.momentum == 0.1
    np.testing.assert_array_equal(target.running_var, saved.running_var)
    np.testing.assert_array_equal(target.weight, saved.weight)
    assert target.num_batches_tracked == saved.num_batches_tracked


def test_load_into_a_dict_of_layers(tmp_path, rng):
    saved = {"a": randomised(ms.BatchNorm2d(2), rng), "b": randomised(cbn.BatchNorm1d(3), rng)}
    cbn.save(tmp_path / "net.npz", saved)
    target = {"b": cbn.BatchNorm1d(3), "a": ms.BatchNorm2d(2)}
    cbn.load(tmp_path / "net.npz", into=target)
    np.testing.assert_array_equal(target["a"].moving_variance, saved["a"].moving_variance)
    np.testing.assert_array_equal(target["b"].running_mean, saved["b"].running_mean)
    with pytest.raises(CheckpointError, match=r"holds layers \['a', 'b'\].*\['a'\]"):
        cbn.load(tmp_path / "net.npz", into={"a": ms.BatchNorm2d(2)})


@pytest.mark.parametrize("target,message", [
    (cbn.BatchNorm2d(5), r"has 3 channels, but the target layer has 5"),
    (cbn.BatchNorm1d(3), r"holds a cbn.BatchNorm2d, cannot load it into a cbn.BatchNorm1d"),
    (ms.BatchNorm2d(3), r"holds a cbn.BatchNorm2d, cannot load it into a "
                        r"cbn.mindspore.BatchNorm2d"),
    (cbn.BatchNorm2d(3, affine=False), r"unexpected keys \['weight', 'bias'\]"),
    ({"bn": cbn.BatchNorm2d(3)}, r"holds one layer, not a dict"),
])
def test_load_into_the_wrong_layer_says_why(target, message, tmp_path):
    cbn.save(tmp_path / "bn.npz", cbn.BatchNorm2d(3))
    before = description(target) if not isinstance(target, dict) else None
    with pytest.raises(CheckpointError, match=message):
        cbn.load(tmp_path / "bn.npz", into=target)
    if before is not None:
        assert description(target) == before


def test_load_into_requires_a_layer_checkpoint(tmp_path):
    cbn.save(tmp_path / "state.npz", cbn.BatchNorm2d(3).state_dict())
    with pytest.raises(CheckpointError, match="holds a state dict"):
        cbn.load(tmp_path / "state.npz", into=cbn.BatchNorm2d(3))
    cbn.save(tmp_path / "net.npz", {"a": cbn.BatchNorm2d(3)})
    with pytest.raises(CheckpointError, match="holds a dict of layers"):
        cbn.load(tmp_path / "net.npz", into=cbn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="into= must be a cbn batch-norm layer"):
        cbn.load(tmp_path / "net.npz", into={"a": object()})


# --- what cannot be saved ----------------------------------------------------------------

class MyBatchNorm(cbn.BatchNorm2d):
    pass


@pytest.mark.parametrize("obj,error,message", [
    ([cbn.BatchNorm2d(3)], TypeError, "expects a cbn batch-norm layer"),
    (MyBatchNorm(3), TypeError, "expects a cbn batch-norm layer"),
    ({"a": cbn.BatchNorm2d(3), "b": np.zeros(3)}, TypeError, r"only.*\['b'\] are not layers"),
    ({"x": np.array([object()])}, TypeError, "has dtype object"),
    ({"x": np.array(["text"])}, TypeError, "has dtype <U4"),
    ({"../evil": np.zeros(3)}, ValueError, "is not allowed"),
    ({"__cbn_checkpoint__": np.zeros(3)}, ValueError, "is not allowed"),
    ({1: np.zeros(3)}, ValueError, "is not allowed"),
])
def test_what_cannot_be_saved(obj, error, message, tmp_path):
    with pytest.raises(error, match=message):
        cbn.save(tmp_path / "x.npz", obj)
    assert os.listdir(tmp_path) == []


# --- hostile, truncated and tampered files --------------------------------------------------

class RunsCode:
    """Unpickling this creates a directory: the proof that a loader ran attacker code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickled_array_inside_the_archive_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "bn.npz"
    cbn.save(path, cbn.BatchNorm2d(3))
    members = archive_members(path)
    members["weight.npy"] = npy_bytes(np.array([RunsCode(marker)] * 3, dtype=object),
                                      allow_pickle=True)
    write_archive(path, members)
    with pytest.raises(CheckpointError):
        cbn.load(path)
    assert not marker.exists()
    # ... also when a forger recomputed the description (dtype claimed: object).
    rewrite(path, edit_meta=lambda m: m["arrays"][0].update(dtype="|O"), resign=True)
    with pytest.raises(CheckpointError, match="bad dtype"):
        cbn.load(path)
    assert not marker.exists()


def test_a_pickle_file_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "bn.npz"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match="pickled"):
        cbn.load(path)
    assert not marker.exists()


def test_a_class_outside_the_fixed_table_is_refused(tmp_path):
    path = tmp_path / "bn.npz"
    cbn.save(path, cbn.BatchNorm2d(3))
    for flavour, name in [("torch", "os.system"), ("torch", "_BatchNorm"),
                          ("builtins", "eval"), ("mindspore", "SyncBatchNorm2d")]:
        rewrite(path, edit_meta=lambda m: m["layers"][0].update(flavour=flavour, **{"class": name}),
                resign=True)
        with pytest.raises(CheckpointError, match=f"unknown layer class '{name}'"):
            cbn.load(path)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["layers"][0]["config"].update(num_features=True), "num_features=True"),
    (lambda m: m["layers"][0]["config"].update(eps="1e-5"), "eps='1e-5'"),
    (lambda m: m["layers"][0]["config"].update(dtype="object"), "layer dtype 'object'"),
    (lambda m: m["layers"][0]["config"].update(process_group="x"), "hyper-parameters"),
    (lambda m: m["layers"][0]["config"].update(eps=-1.0), "eps must be > 0"),
    (lambda m: m["layers"][0]["config"].update(num_features=4),
     r"weight is float32 \(3,\), expected float32 \(4,\)"),
    (lambda m: m["layers"][0].update(training="yes"), "training is not a bool"),
    (lambda m: m.update(kind="layers"), "bad layer name"),
    (lambda m: m.update(version=2), "newer cbn"),
    (lambda m: m.update(format="other"), "not a cbn-checkpoint document"),
    (lambda m: m["arrays"][0].update(shape=[10 ** 12]), "larger than the file"),
    (lambda m: m["arrays"][0].update(shape=[2 ** 62, 4]), "larger than the file"),  # int64 wraps
    (lambda m: m["arrays"][0].update(shape=[2 ** 70]), "larger than the file"),
    (lambda m: m["arrays"][0].update(shape=[4]), r"stored as float32 \(3,\)"),
])
def test_an_edited_description_is_refused_even_with_recomputed_digests(edit, message, tmp_path):
    path = tmp_path / "bn.npz"
    cbn.save(path, cbn.BatchNorm2d(3))
    rewrite(path, edit_meta=edit, resign=True)
    with pytest.raises(CheckpointError, match=message):
        cbn.load(path)


def test_edits_without_recomputed_digests_are_detected(tmp_path):
    path = tmp_path / "bn.npz"
    cbn.save(path, cbn.BatchNorm2d(3))
    rewrite(path, edit_meta=lambda m: m["layers"][0]["config"].update(eps=0.5))
    with pytest.raises(CheckpointError, match="description does not match its SHA-256"):
        cbn.load(path)
    cbn.save(path, cbn.BatchNorm2d(3))

    def double_the_variance(members):
        members["running_var.npy"] = npy_bytes(np.full(3, 2, np.float32))
    rewrite(path, edit_members=double_the_variance)
    with pytest.raises(CheckpointError, match="'running_var' does not match its SHA-256"):
        cbn.load(path)


def test_missing_extra_and_compressed_members_are_refused(tmp_path):
    path = tmp_path / "bn.npz"
    cbn.save(path, cbn.BatchNorm2d(3))
    original = archive_members(path)
    cases = [
        ({k: v for k, v in original.items() if k != "bias.npy"}, zipfile.ZIP_STORED,
         r"arrays missing \['bias'\]"),
        (dict(original, **{"extra.npy": npy_bytes(np.zeros(3))}), zipfile.ZIP_STORED,
         r"unexpected \['extra'\]"),
        (dict(original, **{"notes.txt": b"hello"}), zipfile.ZIP_STORED, "unexpected entry"),
        (original, zipfile.ZIP_DEFLATED, "is compressed"),
        ({k: v for k, v in original.items() if k != META_KEY + ".npy"}, zipfile.ZIP_STORED,
         "no __cbn_checkpoint__ entry"),
    ]
    for members, compression, message in cases:
        write_archive(path, members, compression)
        with pytest.raises(CheckpointError, match=message):
            cbn.load(path)
    write_archive(path, original, compress="bias.npy")
    with pytest.raises(CheckpointError, match="'bias.npy' is compressed"):
        cbn.load(path)


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.save(path, np.zeros(3))
    os.replace(str(path) + ".npy", path)
    with pytest.raises(CheckpointError, match="single .npy array"):
        cbn.load(path)
    np.savez(path, weight=np.zeros(3))
    os.replace(str(path) + ".npz", path) if os.path.exists(str(path) + ".npz") else None
    with pytest.raises(CheckpointError, match="numpy.savez rather than cbn.save"):
        cbn.load(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable cbn checkpoint"):
        cbn.load(path)
    path.write_text("just some text\n")
    with pytest.raises(CheckpointError):
        cbn.load(path)
    with pytest.raises(FileNotFoundError):
        cbn.load(tmp_path / "absent.npz")


def test_every_truncation_is_refused(tmp_path, rng):
    path = tmp_path / "bn.npz"
    cbn.save(path, randomised(cbn.BatchNorm2d(3), rng))
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    for length in sorted(set(range(0, len(data), 29)) | {len(data) - 1, len(data) - 22}):
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match=str(cut)):
            cbn.load(cut)


def test_a_flipped_byte_is_refused_or_harmless(tmp_path, rng):
    """Any one corrupted byte: a CheckpointError, or (zip timestamps, padding) the same layer."""
    layer = randomised(ms.BatchNorm2d(3), rng)
    path = tmp_path / "bn.npz"
    cbn.save(path, layer)
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    refused = 0
    positions = range(0, len(data), 13)
    for position in positions:
        corrupted = bytearray(data)
        corrupted[position] ^= 0x5A
        bad.write_bytes(bytes(corrupted))
        try:
            loaded = cbn.load(bad)
        except CheckpointError:
            refused += 1
        else:
            assert description(loaded) == description(layer), position
    assert refused > len(positions) // 2


# --- atomic writes -------------------------------------------------------------------------

def test_a_failure_mid_save_leaves_the_old_file_and_no_debris(tmp_path, rng, monkeypatch):
    path = tmp_path / "bn.npz"
    old = randomised(cbn.BatchNorm2d(3), rng)
    cbn.save(path, old)
    before = path.read_bytes()
    real_write_array = np.lib.format.write_array
    calls = []

    def write_then_fail(file, array, **kwargs):
        calls.append(array)
        real_write_array(file, array, **kwargs)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(np.lib.format, "write_array", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        cbn.save(path, randomised(cbn.BatchNorm2d(3), rng))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["bn.npz"]
    assert description(cbn.load(path)) == description(old)


def test_a_crash_mid_save_leaves_the_old_file(tmp_path):
    """A process killed while writing (os._exit: no cleanup at all) leaves the old checkpoint."""
    path = tmp_path / "bn.npz"
    cbn.save(path, cbn.BatchNorm2d(3, eps=0.5))
    script = f"""
import os, numpy as np, cbn
real = np.lib.format.write_array
count = []
def write_then_die(file, array, **kwargs):
    real(file, array, **kwargs)
    count.append(1)
    if len(count) == 3:
        file.flush()
        os._exit(9)
np.lib.format.write_array = write_then_die
cbn.save({str(path)!r}, cbn.BatchNorm2d(3, eps=0.25))
"""
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, timeout=60,
                            capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert cbn.load(path).eps == 0.5
    leftovers = [name for name in os.listdir(tmp_path) if name != "bn.npz"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".bn.npz.")  # the torn temporary
    cbn.save(path, cbn.BatchNorm2d(3, eps=0.25))
    assert cbn.load(path).eps == 0.25


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
    cbn.save(tmp_path / "bn.npz", cbn.BatchNorm1d(2))
    assert events == ["fsync file", "replace True bn.npz", "fsync directory"]


def test_the_new_file_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        cbn.save(tmp_path / "bn.npz", cbn.BatchNorm1d(2))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "bn.npz").st_mode) == 0o644
