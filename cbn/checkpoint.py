"""Checkpoints that lose nothing: ``cbn.save(path, obj)`` and ``cbn.load(path)``.

A checkpoint is a safetensors file written by the ``safetensors`` library: the
arrays under their names (PyTorch's ``weight`` ... ``num_batches_tracked`` or
MindSpore's ``gamma`` ... ``moving_variance``, ``<name>.`` before them for a dict
of layers, a state dict's keys), and in the header metadata ``{"cbn": <JSON>}``
each layer's flavour, class, hyper-parameters and mode, with a SHA-256 of the
document and every array.  ``load`` reads the file through one descriptor (so a
concurrent ``save`` cannot mix two files), lets the library check every byte
range, and checks every layer's arrays against its class and channel count
before building it, so no file makes it allocate much more than its own size;
the classes it can build form a fixed table, nothing is unpickled or evaluated,
and every bad file raises ``CheckpointError``.  ``save`` writes a temporary
next to the target, fsyncs, renames and fsyncs the directory.
See docs/checkpoints.md.
"""
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Union

import numpy as np

from cbn import _files
from cbn import batchnorm as _torch_layers
from cbn import mindspore as _mindspore_layers
from cbn.convert import TORCH_TO_MINDSPORE
from cbn.sync_batchnorm import SyncBatchNorm

__all__ = ["save", "load", "CheckpointError"]

FORMAT = "cbn-checkpoint"
VERSION = 2              # 1 was an .npz archive (cbn 0.1)

# The only classes a checkpoint can name: (flavour, class name) -> class.
CLASSES = {
    ("torch", "BatchNorm1d"): _torch_layers.BatchNorm1d,
    ("torch", "BatchNorm2d"): _torch_layers.BatchNorm2d,
    ("torch", "BatchNorm3d"): _torch_layers.BatchNorm3d,
    ("torch", "SyncBatchNorm"): SyncBatchNorm,
    ("mindspore", "BatchNorm1d"): _mindspore_layers.BatchNorm1d,
    ("mindspore", "BatchNorm2d"): _mindspore_layers.BatchNorm2d,
    ("mindspore", "BatchNorm3d"): _mindspore_layers.BatchNorm3d,
    ("mindspore", "SyncBatchNorm"): _mindspore_layers.SyncBatchNorm,
}
_FLAVOUR_OF = {cls: key for key, cls in CLASSES.items()}
_PUBLIC_NAME = {"torch": "cbn.{}", "mindspore": "cbn.mindspore.{}"}

# Hyper-parameters each flavour records, with the JSON types they may take.
_NUMBER, _INT, _BOOL, _NONE, _STR = (int, float), int, bool, type(None), str
_TORCH_CONFIG = {"num_features": _INT, "eps": _NUMBER, "momentum": _NUMBER + (_NONE,),
                 "affine": _BOOL, "track_running_stats": _BOOL, "bias": _BOOL, "dtype": _STR}
_MS_CONFIG = {"num_features": _INT, "eps": _NUMBER, "momentum": _NUMBER, "affine": _BOOL,
              "use_batch_statistics": (_BOOL, _NONE), "dtype": _STR}
_CONFIG = {
    "torch": _TORCH_CONFIG,
    "torch-sync": dict(_TORCH_CONFIG, timeout=_NUMBER + (_NONE,)),
    "mindspore": dict(_MS_CONFIG, data_format=_STR),
    "mindspore-3d": _MS_CONFIG,
    "mindspore-sync": dict(_MS_CONFIG, timeout=_NUMBER + (_NONE,)),
}
_LAYER_DTYPES = ("float32", "float64")
# safetensors dtype codes with a NumPy equivalent: nothing else is written or read.
_DTYPES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "F16": "<f2",
           "U32": "<u4", "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}
_CODE_OF = {np.dtype(numpy_dtype): code for code, numpy_dtype in _DTYPES.items()}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}\Z")
_MAX_HEADER = 100 << 20      # as the safetensors library: far above any batch-norm model


class CheckpointError(ValueError):
    """A file that is not a valid cbn checkpoint, or one that does not fit the target."""


# --- saving --------------------------------------------------------------------------------

def save(path: Union[str, "os.PathLike[str]"], obj: Any) -> None:
    """Write ``obj`` to ``path`` (exactly that name) as a safetensors checkpoint, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write; an existing file is replaced only once the new one
        is complete and on disk.  A symlink is followed (the file it points to
        is replaced); a directory, FIFO or device raises ``CheckpointError``.
    obj : layer, dict of layers, or state dict
        A ``cbn.BatchNorm1d/2d/3d``, ``cbn.SyncBatchNorm``,
        ``cbn.mindspore.BatchNorm1d/2d/3d`` or ``cbn.mindspore.SyncBatchNorm``
        (hyper-parameters, parameters, statistics and mode are saved; a
        SyncBatchNorm's process group(s) are not: it loads with the default,
        the whole world, or use ``load(path, into=layer)``); a dict mapping
        names to such layers; or a dict mapping names to arrays (a
        ``state_dict()``, ``parameters_dict()``, a torch state dict).
        Names are made of letters, digits, ``_``, ``.`` and ``-``.

    Raises
    ------
    TypeError
        ``obj`` is none of these, a dict mixes layers and arrays, or an array
        is not of bool, integer or floating dtype of at most 64 bits.
    ValueError
        A name that is not allowed.
    """
    tensors, document = _describe(obj)
    document["arrays"] = list(tensors)
    document["sha256"] = _digest(document, tensors)
    try:
        from safetensors.numpy import save as serialize
    except ImportError as exc:  # pragma: no cover - a dependency of cbn
        raise ImportError("cbn.save needs the safetensors package: pip install safetensors"
                          ) from exc
    try:
        _files.write_atomically(path, serialize(tensors, metadata={"cbn": _canonical(document)}))
    except _files.FileProblem as exc:
        _fail(path, exc)


def _describe(obj):
    """(arrays to write by tensor name, the JSON document without digest) for ``obj``."""
    if type(obj) in _FLAVOUR_OF:
        kind, layers = "layer", {None: obj}
    elif not isinstance(obj, Mapping):
        raise TypeError(f"cbn.save expects a cbn batch-norm layer, a dict of them or a state "
                        f"dict of arrays, got {type(obj).__name__}")
    else:
        for key in obj:
            if not isinstance(key, str) or not _NAME.match(key) or key.startswith("__"):
                raise ValueError(f"cbn.save: name {key!r} is not allowed: use 1 to 200 letters, "
                                 f"digits, '_', '.' or '-', not starting with '.', '-' or '__'")
        layers = {key: value for key, value in obj.items() if type(value) in _FLAVOUR_OF}
        if layers and len(layers) != len(obj):
            others = [key for key in obj if key not in layers]
            raise TypeError(f"cbn.save: a dict must hold only cbn batch-norm layers or only "
                            f"arrays; {others} are not layers but {list(layers)} are")
        kind = "layers" if layers else "state"
    document = {"format": FORMAT, "version": VERSION, "kind": kind, "layers": []}
    if kind == "state":
        return {key: _array_to_save(key, value) for key, value in obj.items()}, document
    tensors = {}
    for name, layer in layers.items():
        record, arrays = _layer_record(layer)
        record.update(name=name, arrays={})
        for array_name, array in arrays.items():
            tensor = array_name if name is None else f"{name}.{array_name}"
            if tensor in tensors:
                raise ValueError(f"cbn.save: layer names {name!r} and another both give the "
                                 f"array name {tensor!r}")
            tensors[tensor], record["arrays"][array_name] = array, tensor
        document["layers"].append(record)
    return tensors, document


def _layer_record(layer):
    """(its JSON record: flavour, class, config, mode; its arrays by their own names)."""
    flavour, class_name = _FLAVOUR_OF[type(layer)]
    config = {"num_features": layer.num_features, "eps": layer.eps, "momentum": layer.momentum,
              "affine": layer.affine, "dtype": np.dtype(layer.dtype).name}
    extra = {}
    if flavour == "torch":
        config["track_running_stats"] = layer.track_running_stats
        config["bias"] = layer.bias is not None or not layer.affine  # bias=False: weight only
        if isinstance(layer, SyncBatchNorm):
            config["timeout"] = layer.timeout
        arrays = layer.state_dict()
        if "num_batches_tracked" in arrays:  # PyTorch's buffer is int64
            arrays["num_batches_tracked"] = np.array(arrays["num_batches_tracked"], np.int64)
    else:
        config["use_batch_statistics"] = layer.use_batch_statistics
        inner = getattr(layer, "_bn", None)  # the PyTorch-flavoured layer it wraps
        fields = _CONFIG[_config_kind(flavour, class_name)]
        if "data_format" in fields:
            config["data_format"] = layer.data_format
        if "timeout" in fields:
            config["timeout"] = getattr(inner, "timeout", None)
        arrays = layer.parameters_dict()
        # MindSpore has no batch counter, but the wrapped layer (what to_torch()
        # returns) does: keep it so nothing is lost.
        if isinstance(getattr(inner, "num_batches_tracked", None), (int, np.integer)):
            extra["num_batches_tracked"] = int(inner.num_batches_tracked)
        # from_torch keeps PyTorch's momentum m, which 1 - (1 - m) may miss by a bit.
        if isinstance(getattr(inner, "momentum", None), float) \
                and inner.momentum != 1.0 - layer.momentum:
            extra["torch_momentum"] = inner.momentum
    if isinstance(config["momentum"], np.floating):
        config["momentum"] = float(config["momentum"])
    return ({"flavour": flavour, "class": class_name, "config": config,
             "training": bool(layer.training), "extra": extra},
            {key: _array_to_save(key, value) for key, value in arrays.items()})


def _array_to_save(key, value):
    """``value`` as a C-contiguous little-endian array of a safetensors dtype."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"cbn.save: {key!r} is neither a cbn layer nor an array: {exc}") from exc
    if array.dtype.newbyteorder("<") not in _CODE_OF:  # bool, integers, floats up to 64 bits
        raise TypeError(f"cbn.save: {key!r} has dtype {array.dtype}; a checkpoint holds only "
                        f"bool, integer and floating-point arrays of at most 64 bits")
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")  # 0-d stays 0-d


def _canonical(document):
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _digest(document, arrays):
    """SHA-256 of the document (without its digest) and of every array, in the document's order."""
    body = {key: value for key, value in document.items() if key != "sha256"}
    digest = hashlib.sha256(_canonical(body).encode())
    for name in document["arrays"]:
        array = arrays[name]
        digest.update(json.dumps([name, _CODE_OF[array.dtype], list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# --- reading the file ----------------------------------------------------------------------

def _fail(path, message):
    raise CheckpointError(f"{os.fspath(path)}: {message}")


def _read(path):
    """(header metadata or None, arrays by name in file order) of the safetensors file at ``path``.

    One file descriptor serves every check and read, so a concurrent ``save``
    (which renames a new file over the path) cannot mix two files; the
    library then parses the bytes, checking every range against them.
    """
    try:
        data = _files.read_regular(path)
    except _files.FileProblem as exc:
        _fail(path, exc)
    size = len(data)
    if data[:4] == b"PK\x03\x04":
        _fail(path, "is a zip archive (an .npz checkpoint of cbn 0.1?), not a safetensors "
                    "file: load it with that cbn version and save it again")
    length = int.from_bytes(data[:8], "little") if size >= 8 else -1
    if not 0 < length <= min(size - 8, _MAX_HEADER):
        _fail(path, f"{size} bytes with a header of {length} bytes: truncated, or not a "
                    f"safetensors file")

    def unique(pairs):  # the library keeps the last of duplicate keys; cbn refuses the file
        if len({key for key, _ in pairs}) != len(pairs):
            raise ValueError(f"duplicate keys in {[key for key, _ in pairs]}"[:200])
        return dict(pairs)
    header = _json(path, data[8:8 + length], "safetensors header", object_pairs_hook=unique)
    from safetensors import deserialize
    try:
        tensors = deserialize(data)  # checks the header and every range; copies each tensor
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError, and whatever hostile bytes cause
        _fail(path, f"not a valid safetensors file: {exc}")
    del data
    metadata = header.pop("__metadata__", None)
    offsets = {name: header[name]["data_offsets"] for name, _ in tensors}
    del header
    tensors.sort(key=lambda item: offsets[item[0]], reverse=True)
    arrays = {}
    while tensors:  # in file order, releasing the library's objects as we go
        name, view = tensors.pop()
        if view["dtype"] not in _DTYPES:
            _fail(path, f"tensor {name!r} has dtype {view['dtype']}; cbn reads "
                        f"{', '.join(_DTYPES)}")
        try:
            array = np.frombuffer(view["data"], _DTYPES[view["dtype"]]).reshape(view["shape"])
        except (ValueError, OverflowError) as exc:  # an empty tensor with a 2**64 axis
            _fail(path, f"tensor {name!r} of shape {view['shape']}: {exc}")
        arrays[name] = array if array.flags.writeable else array.copy()  # bytes: older versions
    return metadata, arrays


def _json(path, raw, what, **hooks):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, parse_constant=no_constants, **hooks)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        _fail(path, f"the {what} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}")


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- the cbn document ------------------------------------------------------------------------

def _expect(path, condition, what):
    if not condition:
        _fail(path, f"invalid checkpoint description: {what}")


def _parse_document(path, text, arrays):
    """The cbn document, every field type-checked against ``arrays`` and its digest."""
    document = _json(path, text, "cbn metadata")
    _expect(path, isinstance(document, dict) and document.get("format") == FORMAT,
            f"not a {FORMAT} document")
    version = document.get("version")
    _expect(path, _is_count(version), "no version")
    if version > VERSION:
        _fail(path, f"written by a newer cbn (checkpoint format version {version}; this cbn "
                    f"reads version {VERSION}): upgrade cbn")
    _expect(path, version == VERSION, f"format version {version} is not a safetensors one")
    _expect(path, document.get("kind") in ("layer", "layers", "state"), "unknown kind")
    names, layers = document.get("arrays"), document.get("layers")
    _expect(path, isinstance(names, list) and isinstance(layers, list)
            and all(isinstance(name, str) for name in names), "no array list")
    if sorted(names) != sorted(arrays):
        _fail(path, f"the tensors {sorted(arrays)} do not match the description's "
                    f"{sorted(set(names))}")
    try:
        digest = _digest(document, arrays)
    except ValueError as exc:  # a number JSON reads as inf (1e999), which it cannot write
        _fail(path, f"invalid checkpoint description: {exc}")
    if document.get("sha256") != digest:
        _fail(path, "the contents do not match the SHA-256 in the metadata: the file was "
                    "corrupted or edited")
    kind = document["kind"]
    low, high = {"layer": (1, 1), "layers": (1, None), "state": (0, 0)}[kind]
    _expect(path, low <= len(layers) and (high is None or len(layers) <= high),
            f"{len(layers)} layer records for kind {kind!r}")
    seen, used = set(), []
    for record in layers:
        _check_layer_record(path, record, arrays, kind)
        _expect(path, record["name"] not in seen, f"layer {record['name']!r} appears twice")
        seen.add(record["name"])
        used += record["arrays"].values()
    _expect(path, kind == "state" or sorted(used) == sorted(arrays),
            "the layers do not use each tensor exactly once")
    return document


def _config_kind(flavour, class_name):
    if flavour == "torch":
        return "torch-sync" if class_name == "SyncBatchNorm" else "torch"
    return {"BatchNorm3d": "mindspore-3d", "SyncBatchNorm": "mindspore-sync"}.get(class_name,
                                                                                 "mindspore")


def _check_layer_record(path, record, arrays, kind):
    """Type-check one layer record; its arrays must be the class's, of its channel count.

    Checking the arrays before the layer is built means a forged
    ``num_features`` cannot make the constructor allocate more than the file holds.
    """
    _expect(path, isinstance(record, dict), "a layer record is not an object")
    name = record.get("name")
    _expect(path, name is None if kind == "layer" else isinstance(name, str),
            f"bad layer name {name!r}")
    key = (record.get("flavour"), record.get("class"))
    if key not in CLASSES:
        _fail(path, f"unknown layer class {key[1]!r} of flavour {key[0]!r}; a checkpoint can "
                    f"hold only {', '.join(_public(*k) for k in CLASSES)}")
    config = record.get("config")
    types = _CONFIG[_config_kind(*key)]
    _expect(path, isinstance(config, dict) and set(config) == set(types),
            f"the hyper-parameters of {_public(*key)} must be {sorted(types)}")
    for field, allowed in types.items():
        value = config[field]
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        _expect(path, isinstance(value, allowed) and not (isinstance(value, bool)
                                                          and bool not in allowed),
                f"{field}={value!r} is not a {allowed}")
    _expect(path, config["dtype"] in _LAYER_DTYPES, f"layer dtype {config['dtype']!r}")
    _expect(path, isinstance(record.get("training"), bool), "training is not a bool")
    extra = record.get("extra")
    _expect(path, isinstance(extra, dict) and set(extra) <= {"num_batches_tracked",
                                                            "torch_momentum"}
            and _is_count(extra.get("num_batches_tracked", 0))
            and isinstance(extra.get("torch_momentum", 0.0), float)
            and 0.0 <= extra.get("torch_momentum", 0.0) <= 1.0, f"bad extra state {extra!r}")
    own = record.get("arrays")
    _expect(path, isinstance(own, dict) and all(isinstance(v, str) and v in arrays
                                                for v in own.values()),
            f"the arrays of layer {name!r} are not in the file")
    if key[0] == "torch":
        expected = (["weight"] + (["bias"] if config["bias"] else []) if config["affine"]
                    else []) + (
            ["running_mean", "running_var", "num_batches_tracked"]
            if config["track_running_stats"] else [])
    else:
        prefix = CLASSES[key]._param_prefix  # "bn2d." for MindSpore's BatchNorm3d
        expected = [prefix + name for name in ("gamma", "beta", "moving_mean", "moving_variance")]
    if sorted(own) != sorted(expected):
        _fail(path, f"{_describe_layer(record)} must hold the arrays {expected}, the file has "
                    f"{sorted(own)}")
    c, dtype = config["num_features"], np.dtype(config["dtype"])
    for array_name, tensor in own.items():
        array = arrays[tensor]
        if array_name == "num_batches_tracked":
            if array.shape != () or array.dtype.kind not in "iu":
                _fail(path, f"num_batches_tracked must be an integer scalar, got {array.dtype} "
                            f"{array.shape}")
        elif array.shape != (c,) or array.dtype != dtype:
            _fail(path, f"{_describe_layer(record)}: {array_name} is {array.dtype} "
                        f"{array.shape}, expected {dtype} ({c},)")


def _public(flavour, class_name):
    return _PUBLIC_NAME[flavour].format(class_name)


def _describe_layer(record):
    name = "" if record["name"] is None else f"layer {record['name']!r} "
    layer = _public(record["flavour"], record["class"])
    return f"{name}{layer}({record['config']['num_features']})"


# --- loading ---------------------------------------------------------------------------------

def load(path: Union[str, "os.PathLike[str]"], into: Any = None) -> Any:
    """Read a checkpoint written by ``cbn.save``, or any safetensors file of arrays.

    Parameters
    ----------
    path : str or os.PathLike
    into : layer or dict of layers, optional
        Load the parameters and statistics into this layer (or these layers,
        by name) instead of building new ones.  A cbn checkpoint must hold the
        same class with the same channel count (each name, for a dict); a file
        of arrays (a state dict, e.g. a torch model's written by
        ``safetensors.torch.save_file``) must hold exactly the layer's keys
        (``<name>.<key>`` for a dict; PyTorch's names also load into
        MindSpore-flavoured layers).  The target's hyper-parameters and mode
        are kept, as ``load_state_dict`` does.  Every target is checked before
        any is written: on error none has changed.

    Returns
    -------
    A new layer (its class, hyper-parameters, parameters, statistics and mode
    as saved), a dict of new layers, or a dict of arrays, matching what was
    saved; with ``into``, ``into`` itself.

    Raises
    ------
    CheckpointError (a ValueError)
        The file is not a cbn checkpoint or safetensors file, is truncated,
        corrupted or edited, is a directory, FIFO or device, was written by a
        newer format version, or does not fit ``into``.
    FileNotFoundError, PermissionError
        The file cannot be opened.
    """
    try:
        metadata, arrays = _read(path)
        text = (metadata or {}).get("cbn")
        if text is None and any(FORMAT in value for value in (metadata or {}).values()):
            _fail(path, f"holds cbn's description under the key {sorted(metadata)}, not 'cbn': "
                        f"corrupted or edited")
        document = {"kind": "state", "layers": [], "arrays": list(arrays)} if text is None \
            else _parse_document(path, text, arrays)
    except MemoryError:
        _fail(path, "not enough memory to hold its arrays")
    if into is not None:
        return _load_into(path, document, arrays, into)
    if document["kind"] == "state":
        return {name: arrays[name] for name in document["arrays"]}
    layers = {record["name"]: _build(path, record, arrays) for record in document["layers"]}
    return layers[None] if document["kind"] == "layer" else layers


def _own_arrays(record, arrays):
    return {array_name: arrays[tensor] for array_name, tensor in record["arrays"].items()}


def _build(path, record, arrays):
    """A new layer as the (checked) record describes it."""
    cls = CLASSES[(record["flavour"], record["class"])]
    config = dict(record["config"], dtype=np.dtype(record["config"]["dtype"]))
    try:
        layer = cls(**config)
    except (TypeError, ValueError) as exc:
        _fail(path, f"{_describe_layer(record)}: invalid hyper-parameters: {exc}")
    _set_arrays(path, layer, _own_arrays(record, arrays), record)
    if record["flavour"] == "torch":
        layer.train(record["training"])
    else:
        layer.set_train(record["training"])
    return layer


def _set_arrays(path, layer, own, record=None):
    torch_flavour = _FLAVOUR_OF[type(layer)][0] == "torch"
    what = f"{_describe_layer(record)}: " if record else ""
    try:
        if torch_flavour:
            layer.load_state_dict(own, strict=True)
        else:
            layer.load_parameters(own, strict=True)
    except (TypeError, ValueError) as exc:
        _fail(path, f"{what}{exc}")
    # The MindSpore-flavoured layer's inner PyTorch-flavoured one (see _layer_record).
    inner = getattr(layer, "_bn", None)
    for name in ("num_batches_tracked", "torch_momentum") if record else ():
        attribute = "momentum" if name == "torch_momentum" else name
        if name in record["extra"] and hasattr(inner, attribute):
            setattr(inner, attribute, record["extra"][name])


def _twin(layer):
    """A fresh layer that accepts exactly the arrays ``layer`` does (to check before writing)."""
    if _FLAVOUR_OF[type(layer)][0] == "torch":
        return type(layer)(layer.num_features, affine=layer.affine,
                           track_running_stats=layer.track_running_stats, dtype=layer.dtype,
                           bias=layer.bias is not None or not layer.affine)
    return type(layer)(layer.num_features, dtype=layer.dtype)


def _load_into(path, document, arrays, into):
    """Fit every target, try each on a twin, and only then write them all."""
    plan = []  # (target layer, its arrays, its record or None)
    targets = into.items() if isinstance(into, Mapping) else [(None, into)]
    for _, layer in targets:
        if type(layer) not in _FLAVOUR_OF:
            raise TypeError(f"cbn.load: into= must be a cbn batch-norm layer or a dict of them, "
                            f"got {type(layer).__name__}")
    kind = document["kind"]
    if kind == "state":
        groups = {name: {} for name, _ in targets}
        unexpected = []
        for key in document["arrays"]:
            prefix, _, leaf = key.rpartition(".") if isinstance(into, Mapping) else (None, "", key)
            if prefix not in groups and prefix.endswith(".bn2d"):  # MindSpore's BatchNorm3d
                prefix, leaf = prefix[:-len(".bn2d")], "bn2d." + leaf
            if prefix in groups:
                groups[prefix][leaf] = arrays[key]
            else:
                unexpected.append(key)
        if unexpected:
            _fail(path, f"holds arrays {unexpected} that belong to none of the target layers")
        for name, layer in targets:
            own = groups[name]
            if _FLAVOUR_OF[type(layer)][0] == "mindspore" and own and set(own) <= set(
                    TORCH_TO_MINDSPORE) | {"num_batches_tracked"}:
                own = {TORCH_TO_MINDSPORE[k]: v for k, v in own.items() if k in TORCH_TO_MINDSPORE}
            plan.append((layer, own, None))
    else:
        if isinstance(into, Mapping) != (kind == "layers"):
            _fail(path, "holds one layer, not a dict of layers" if kind == "layer" else
                  f"holds a dict of layers {[r['name'] for r in document['layers']]}: pass a "
                  f"dict as into=, or load without into=")
        records = {record["name"]: record for record in document["layers"]}
        if set(records) != {name for name, _ in targets}:
            _fail(path, f"holds layers {sorted(records)}, but the target has "
                        f"{sorted(map(str, into))}")
        for name, layer in targets:
            record = records[name]
            key, saved = _FLAVOUR_OF[type(layer)], (record["flavour"], record["class"])
            if key != saved:
                _fail(path, f"holds a {_public(*saved)}, cannot load it into a {_public(*key)}")
            c = record["config"]["num_features"]
            if c != layer.num_features:
                _fail(path, f"{_describe_layer(record)} has {c} channels, but the target layer "
                            f"has {layer.num_features}")
            plan.append((layer, _own_arrays(record, arrays), record))
    for layer, own, record in plan:
        _set_arrays(path, _twin(layer), own, record)
    for layer, own, record in plan:
        _set_arrays(path, layer, own, record)
    return into
