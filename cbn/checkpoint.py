"""Checkpoints that lose nothing: ``cbn.save(path, obj)`` and ``cbn.load(path)``.

A checkpoint is a standard NumPy ``.npz`` archive (readable with
``numpy.load(path, allow_pickle=False)``) holding

- the arrays: a layer's parameters and statistics under its own names
  (``running_mean``, ``moving_variance``, ...), a dict of layers' under
  ``<name>.<array>``, or a state dict's under its keys;
- ``__cbn_checkpoint__``: a 0-d unicode array with one JSON document that
  records the format version, what was saved (``layer``, ``layers`` or
  ``state``), each layer's flavour, class, hyper-parameters and mode, each
  array's dtype, shape and SHA-256, and the SHA-256 of the document itself.

Nothing is pickled, and loading never unpickles (``allow_pickle=False``): the
classes that can be rebuilt form a fixed table, every value of the document
is type-checked before it reaches a constructor, and every array is checked
against its recorded dtype, shape and digest before it is used.  A truncated,
corrupted or edited file raises ``CheckpointError`` (a ``ValueError``) that
says what is wrong.  The digests detect corruption and edits made without
recomputing them; they are not a signature, so a deliberate forger can write
a file that loads (with wrong numbers), but no file can make ``load`` run code.

Saving is atomic: the archive is written to a temporary file in the target's
directory, flushed and ``fsync``-ed, renamed over the target with
``os.replace``, and the directory is ``fsync``-ed, so a crash at any moment
leaves either the old file or the new one, never a torn one.
"""
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import zipfile
from collections.abc import Mapping

import numpy as np

from cbn import batchnorm as _torch_layers
from cbn import mindspore as _mindspore_layers
from cbn.sync_batchnorm import SyncBatchNorm

__all__ = ["save", "load", "CheckpointError"]

FORMAT = "cbn-checkpoint"
VERSION = 1
META_KEY = "__cbn_checkpoint__"

# The only classes a checkpoint can name: (flavour, class name) -> class.
# Loading looks names up here and nowhere else.
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
                 "affine": _BOOL, "track_running_stats": _BOOL, "dtype": _STR}
_CONFIG = {
    "torch": _TORCH_CONFIG,
    "torch-sync": dict(_TORCH_CONFIG, timeout=_NUMBER + (_NONE,)),
    "mindspore": {"num_features": _INT, "eps": _NUMBER, "momentum": _NUMBER, "affine": _BOOL,
                  "use_batch_statistics": (_BOOL, _NONE), "data_format": _STR, "dtype": _STR},
    "mindspore-3d": {"num_features": _INT, "eps": _NUMBER, "momentum": _NUMBER,
                     "affine": _BOOL, "use_batch_statistics": (_BOOL, _NONE), "dtype": _STR},
    "mindspore-sync": {"num_features": _INT, "eps": _NUMBER, "momentum": _NUMBER,
                       "affine": _BOOL, "use_batch_statistics": (_BOOL, _NONE), "dtype": _STR,
                       "timeout": _NUMBER + (_NONE,)},
}
_LAYER_DTYPES = ("float32", "float64")
_ARRAY_KINDS = "biuf"       # bool, integers, floats: nothing else is ever written or read
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}\Z")
_MAX_META_CHARS = 1 << 22   # the JSON document of a checkpoint with very many layers fits


class CheckpointError(ValueError):
    """A file that is not a valid cbn checkpoint, or one that does not fit the target."""


# --- saving --------------------------------------------------------------------------------

def save(path, obj):
    """Write ``obj`` to ``path`` (exactly that name) as a cbn checkpoint, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write; an existing file is replaced only once the new one
        is complete and on disk.
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
        is not of bool, integer or floating dtype.
    ValueError
        A name that is not allowed.
    """
    members, meta = _describe(obj)
    meta["arrays"] = [{"name": name, "dtype": array.dtype.str, "shape": list(array.shape),
                       "sha256": _digest(array)} for name, array in members.items()]
    meta["sha256"] = _meta_digest(meta)
    document = np.array(json.dumps(meta, sort_keys=True, separators=(",", ":"),
                                   allow_nan=False))

    def write(file):
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, array in [(META_KEY, document)] + list(members.items()):
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    _write_atomically(path, write)


def _describe(obj):
    """(arrays to write by member name, the JSON document without digests) for ``obj``."""
    meta = {"format": FORMAT, "version": VERSION}
    if type(obj) in _FLAVOUR_OF:
        layer_meta, arrays = _layer_record(obj)
        meta.update(kind="layer", layers=[dict(layer_meta, name=None, arrays=list(arrays))])
        return arrays, meta
    if not isinstance(obj, Mapping):
        raise TypeError(f"cbn.save expects a cbn batch-norm layer, a dict of them or a state "
                        f"dict of arrays, got {type(obj).__name__}")
    for key in obj:
        _check_name(key)
    layers = {key: value for key, value in obj.items() if type(value) in _FLAVOUR_OF}
    if layers and len(layers) != len(obj):
        others = [key for key in obj if key not in layers]
        raise TypeError(f"cbn.save: a dict must hold only cbn batch-norm layers or only "
                        f"arrays; {others} are not layers but {list(layers)} are")
    members = {}
    if not layers:
        for key, value in obj.items():
            members[key] = _array_to_save(key, value)
        meta.update(kind="state", layers=[])
        return members, meta
    records = []
    for name, layer in layers.items():
        layer_meta, arrays = _layer_record(layer)
        names = {}
        for array_name, array in arrays.items():
            member = f"{name}.{array_name}"
            if member in members:
                raise ValueError(f"cbn.save: layer names {name!r} and another both give the "
                                 f"array name {member!r}")
            members[member] = array
            names[array_name] = member
        records.append(dict(layer_meta, name=name, arrays=names))
    meta.update(kind="layers", layers=records)
    return members, meta


def _layer_record(layer):
    """(its JSON record: flavour, class, config, mode; its arrays by their own names)."""
    flavour, class_name = _FLAVOUR_OF[type(layer)]
    config = {"num_features": layer.num_features, "eps": layer.eps,
              "affine": layer.affine, "dtype": np.dtype(layer.dtype).name}
    extra = {}
    if flavour == "torch":
        config.update(momentum=layer.momentum, track_running_stats=layer.track_running_stats)
        if isinstance(layer, SyncBatchNorm):
            config["timeout"] = layer.timeout
        arrays = layer.state_dict()
        if "num_batches_tracked" in arrays:
            arrays["num_batches_tracked"] = np.array(arrays["num_batches_tracked"], np.int64)
    else:
        config.update(momentum=layer.momentum, use_batch_statistics=layer.use_batch_statistics)
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
            {key: np.asarray(value) for key, value in arrays.items()})


def _array_to_save(key, value):
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"cbn.save: {key!r} is neither a cbn layer nor an array: {exc}") from exc
    if array.dtype.kind not in _ARRAY_KINDS:
        raise TypeError(f"cbn.save: {key!r} has dtype {array.dtype}; a checkpoint holds only "
                        f"bool, integer and floating-point arrays")
    return array


def _check_name(name):
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("__cbn"):
        raise ValueError(f"cbn.save: name {name!r} is not allowed: use 1 to 200 letters, digits, "
                         f"'_', '.' or '-', not starting with '.', '-' or '__cbn'")


def _write_atomically(path, write):
    """Call ``write(file)`` on a temporary file next to ``path``, sync it, rename it to ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
        try:
            # 0o666 and O_EXCL: the umask applies as for any new file, and no existing
            # file (or symlink planted under the name) is ever opened.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - 64 random bits collided
            continue
    try:
        with open(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    """Make the rename durable; platforms that cannot open a directory (Windows) skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _meta_digest(meta):
    body = {key: value for key, value in meta.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


# --- loading -------------------------------------------------------------------------------

def load(path, into=None):
    """Read a checkpoint written by ``cbn.save``.

    Parameters
    ----------
    path : str or os.PathLike
    into : layer or dict of layers, optional
        Load the parameters and statistics into this layer (or these layers,
        by name) instead of building new ones.  The checkpoint must hold the
        same class with the same channel count (each name, for a dict); the
        target's hyper-parameters and mode are kept, as ``load_state_dict`` does.

    Returns
    -------
    A new layer (its class, hyper-parameters, parameters, statistics and mode
    as saved), a dict of new layers, or a dict of arrays, matching what was
    saved; with ``into``, ``into`` itself.

    Raises
    ------
    CheckpointError (a ValueError)
        The file is not a cbn checkpoint, is truncated, corrupted or edited,
        was written by a newer format version, or does not fit ``into``.
    FileNotFoundError
        There is no such file.
    """
    meta, arrays = _read(path)
    kind = meta["kind"]
    if into is not None:
        return _load_into(path, meta, arrays, into)
    if kind == "state":
        return arrays
    layers = {}
    for record in meta["layers"]:
        layers[record["name"]] = _build(path, record, arrays)
    return layers[None] if kind == "layer" else layers


def _fail(path, message):
    raise CheckpointError(f"{os.fspath(path)}: {message}")


def _read(path):
    """(the checked JSON document, the checked arrays by member name) of the file at ``path``."""
    size = os.path.getsize(path)  # FileNotFoundError as is
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            _fail(path, "not a cbn checkpoint (a single .npy array, not an .npz archive)")
        with loaded as npz:
            members = _members(path, npz.zip, size)
            if META_KEY not in members:
                _fail(path, f"not a cbn checkpoint (no {META_KEY} entry): was it written by "
                            f"numpy.savez rather than cbn.save?")
            document = _read_member(path, npz, members[META_KEY], "U", ())
            if document.dtype.itemsize // 4 > _MAX_META_CHARS:
                _fail(path, "the checkpoint's JSON document is implausibly large")
            meta = _parse_meta(path, str(document[()]))
            declared = {entry["name"]: entry for entry in meta["arrays"]}
            unknown = sorted(set(members) - set(declared) - {META_KEY})
            absent = sorted(set(declared) - set(members))
            if unknown or absent:
                _fail(path, f"the archive does not match its description: arrays missing "
                            f"{absent}, unexpected {unknown}")
            if sum(_nbytes(entry) for entry in declared.values()) > size:
                _fail(path, "the described arrays are larger than the file: truncated?")
            arrays = {}
            for name, entry in declared.items():
                array = _read_member(path, npz, members[name], np.dtype(entry["dtype"]),
                                     tuple(entry["shape"]))
                if _digest(array) != entry["sha256"]:
                    _fail(path, f"array {name!r} does not match its SHA-256: the file was "
                                f"corrupted or edited")
                arrays[name] = array
            return meta, arrays
    except (CheckpointError, FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile and NumPy raise a dozen kinds on bad bytes
        _fail(path, f"not a readable cbn checkpoint (truncated or corrupted?): "
                    f"{type(exc).__name__}: {exc}")


def _members(path, archive, size):
    """{entry name: ZipInfo} of an archive cbn could have written (stored, .npy, unique)."""
    members = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            _fail(path, f"unexpected entry {info.filename!r} in the archive")
        name = info.filename[:-4]
        if name in members:
            _fail(path, f"entry {info.filename!r} appears twice in the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            _fail(path, f"entry {info.filename!r} is compressed; cbn writes uncompressed "
                        f"archives (and so never inflates an archive bomb)")
        if info.file_size > size:
            _fail(path, f"entry {info.filename!r} claims {info.file_size} bytes, more than the "
                        f"file holds")
        members[name] = info
    return members


def _read_member(path, npz, info, dtype, shape):
    """The array of entry ``info``, after its header was checked against ``dtype`` and ``shape``.

    ``dtype`` may be a kind letter ('U'): then only the kind is checked.  The
    header is read first so that a hostile header cannot make NumPy allocate
    more than the entry holds.
    """
    name = info.filename[:-4]
    with npz.zip.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(member)
        else:
            _fail(path, f"array {name!r} has unsupported .npy version {version}")
        stored_shape, _, stored_dtype = header
    kind_only = isinstance(dtype, str)
    if (stored_dtype.kind != dtype if kind_only else stored_dtype != dtype) \
            or stored_shape != shape:
        _fail(path, f"array {name!r} is stored as {stored_dtype} {stored_shape}, but its "
                    f"description says {dtype} {shape}")
    if stored_dtype.itemsize * math.prod(shape) > info.file_size:
        _fail(path, f"array {name!r} is truncated")
    array = npz[name]
    if not isinstance(array, np.ndarray):  # pragma: no cover - the header was checked
        _fail(path, f"entry {name!r} is not a NumPy array")
    return array


def _nbytes(entry):
    return np.dtype(entry["dtype"]).itemsize * math.prod(entry["shape"])


def _expect(path, condition, what):
    if not condition:
        _fail(path, f"invalid checkpoint description: {what}")


def _parse_meta(path, text):
    """The JSON document, with every field the loader uses type-checked."""
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    try:
        meta = json.loads(text, parse_constant=no_constants)
    except ValueError as exc:
        _fail(path, f"the checkpoint's JSON document is invalid: {exc}")
    _expect(path, isinstance(meta, dict) and meta.get("format") == FORMAT,
            f"not a {FORMAT} document")
    version = meta.get("version")
    _expect(path, isinstance(version, int) and not isinstance(version, bool), "no version")
    if version > VERSION:
        _fail(path, f"written by a newer cbn (checkpoint format version {version}; this cbn "
                    f"reads version {VERSION} and older): upgrade cbn")
    if meta.get("sha256") != _meta_digest(meta):
        _fail(path, "the checkpoint's description does not match its SHA-256: the file was "
                    "corrupted or edited")
    _expect(path, meta.get("kind") in ("layer", "layers", "state"), "unknown kind")
    arrays, layers = meta.get("arrays"), meta.get("layers")
    _expect(path, isinstance(arrays, list) and isinstance(layers, list), "no array list")
    names = set()
    for entry in arrays:
        _expect(path, isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and _NAME.match(entry["name"]) and entry["name"] not in names,
                f"bad array entry {entry!r}")
        names.add(entry["name"])
        dtype = None
        if isinstance(entry.get("dtype"), str):
            with contextlib.suppress(TypeError, ValueError):
                dtype = np.dtype(entry["dtype"])
        _expect(path, dtype is not None and dtype.kind in _ARRAY_KINDS,
                f"bad dtype in {entry!r}")
        shape = entry.get("shape")
        _expect(path, isinstance(shape, list) and len(shape) <= 32 and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape),
            f"bad shape in {entry!r}")
        _expect(path, isinstance(entry.get("sha256"), str), f"no digest in {entry!r}")
    expected_layers = {"layer": (1, 1), "layers": (1, None), "state": (0, 0)}[meta["kind"]]
    _expect(path, expected_layers[0] <= len(layers)
            and (expected_layers[1] is None or len(layers) <= expected_layers[1]),
            f"{len(layers)} layer records for kind {meta['kind']!r}")
    seen = set()
    for record in layers:
        _check_layer_record(path, record, names, meta["kind"])
        _expect(path, record["name"] not in seen, f"layer {record['name']!r} appears twice")
        seen.add(record["name"])
    return meta


def _config_kind(flavour, class_name):
    if flavour == "torch":
        return "torch-sync" if class_name == "SyncBatchNorm" else "torch"
    return {"BatchNorm3d": "mindspore-3d", "SyncBatchNorm": "mindspore-sync"}.get(class_name,
                                                                                 "mindspore")


def _check_layer_record(path, record, array_names, kind):
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
        _expect(path, isinstance(value, allowed) and not (isinstance(value, bool)
                                                          and bool not in _as_tuple(allowed)),
                f"{field}={value!r} is not a {allowed}")
    _expect(path, config["dtype"] in _LAYER_DTYPES, f"layer dtype {config['dtype']!r}")
    _expect(path, isinstance(record.get("training"), bool), "training is not a bool")
    extra = record.get("extra")
    _expect(path, isinstance(extra, dict) and set(extra) <= {"num_batches_tracked",
                                                            "torch_momentum"}
            and _is_count(extra.get("num_batches_tracked", 0))
            and isinstance(extra.get("torch_momentum", 0.0), float)
            and 0.0 <= extra.get("torch_momentum", 0.0) <= 1.0, f"bad extra state {extra!r}")
    arrays = record.get("arrays")
    if kind == "layer":
        _expect(path, isinstance(arrays, list) and all(a in array_names for a in arrays),
                "the layer's arrays are not in the archive")
        record["arrays"] = {a: a for a in arrays}
    else:
        _expect(path, isinstance(arrays, dict) and all(
            isinstance(k, str) and v in array_names for k, v in arrays.items()),
            f"the arrays of layer {name!r} are not in the archive")


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _public(flavour, class_name):
    return _PUBLIC_NAME[flavour].format(class_name)


def _layer_arrays(path, record, arrays):
    """The record's arrays under the layer's own names, checked against its channel count."""
    config = record["config"]
    c, dtype = config["num_features"], np.dtype(config["dtype"])
    own = {}
    for array_name, member in record["arrays"].items():
        array = arrays[member]
        if array_name == "num_batches_tracked":
            if array.shape != () or array.dtype.kind not in "iu":
                _fail(path, f"num_batches_tracked must be an integer scalar, got {array.dtype} "
                            f"{array.shape}")
            own[array_name] = array
            continue
        if array.shape != (c,) or array.dtype != dtype:
            _fail(path, f"{_describe_layer(record)}: {array_name} is {array.dtype} "
                        f"{array.shape}, expected {dtype} ({c},)")
        own[array_name] = array
    return own


def _describe_layer(record):
    name = "" if record["name"] is None else f"layer {record['name']!r} "
    layer = _public(record["flavour"], record["class"])
    return f"{name}{layer}({record['config']['num_features']})"


def _build(path, record, arrays):
    """A new layer as the record describes it."""
    cls = CLASSES[(record["flavour"], record["class"])]
    own = _layer_arrays(path, record, arrays)
    config = dict(record["config"], dtype=np.dtype(record["config"]["dtype"]))
    try:
        layer = cls(**config)
    except (TypeError, ValueError) as exc:
        _fail(path, f"{_describe_layer(record)}: invalid hyper-parameters: {exc}")
    _set_arrays(path, record, layer, own)
    if record["flavour"] == "torch":
        layer.train(record["training"])
    else:
        layer.set_train(record["training"])
    return layer


def _set_arrays(path, record, layer, own):
    try:
        if record["flavour"] == "torch":
            layer.load_state_dict(own, strict=True)
        else:
            layer.load_parameters(own, strict=True)
    except (TypeError, ValueError) as exc:
        _fail(path, f"{_describe_layer(record)}: {exc}")
    # The MindSpore-flavoured layer's inner PyTorch-flavoured one (see _layer_record).
    inner = getattr(layer, "_bn", None)
    for name in ("num_batches_tracked", "torch_momentum"):
        attribute = "momentum" if name == "torch_momentum" else name
        if name in record["extra"] and hasattr(inner, attribute):
            setattr(inner, attribute, record["extra"][name])


def _load_into(path, meta, arrays, into):
    if meta["kind"] == "state":
        _fail(path, "holds a state dict, not layers: use layer.load_state_dict(cbn.load(path)) "
                    "or layer.load_parameters(cbn.load(path))")
    if isinstance(into, Mapping):
        if meta["kind"] != "layers":
            _fail(path, "holds one layer, not a dict of layers")
        records = {record["name"]: record for record in meta["layers"]}
        if set(records) != set(into):
            _fail(path, f"holds layers {sorted(records)}, but the target has "
                        f"{sorted(map(str, into))}")
        for name, layer in into.items():
            _load_layer_into(path, records[name], arrays, layer)
        return into
    if meta["kind"] != "layer":
        _fail(path, f"holds a dict of layers {[r['name'] for r in meta['layers']]}: pass a "
                    f"dict as into=, or load without into=")
    _load_layer_into(path, meta["layers"][0], arrays, into)
    return into


def _load_layer_into(path, record, arrays, layer):
    key = _FLAVOUR_OF.get(type(layer))
    if key is None:
        raise TypeError(f"cbn.load: into= must be a cbn batch-norm layer or a dict of them, "
                        f"got {type(layer).__name__}")
    saved = (record["flavour"], record["class"])
    if key != saved:
        _fail(path, f"holds a {_public(*saved)}, cannot load it into a {_public(*key)}")
    c = record["config"]["num_features"]
    if c != layer.num_features:
        _fail(path, f"{_describe_layer(record)} has {c} channels, but the target layer has "
                    f"{layer.num_features}")
    own = _layer_arrays(path, record, arrays)
    _set_arrays(path, record, layer, own)
