"""Checkpoint names and momentum between PyTorch and MindSpore.

Batch norm stores the same four arrays under different names::

    PyTorch                  MindSpore
    weight                   gamma
    bias                     beta
    running_mean             moving_mean
    running_var              moving_variance
    num_batches_tracked      (none)

and the two momenta are complements: ``momentum_torch = 1 - momentum_mindspore``.

A checkpoint of a whole network holds other layers too (a convolution's
``conv1.weight``), so only the keys of a batch-norm layer are renamed: the keys
whose prefix (everything before the last ``.``) also holds running statistics
(``running_mean``, ``running_var`` or ``num_batches_tracked`` on the PyTorch
side, ``moving_mean`` or ``moving_variance`` on the MindSpore side).  Every
other key, and its value, passes through unchanged.

MindSpore's ``BatchNorm3d`` wraps a ``BatchNorm2d`` named ``bn2d``, so its
checkpoint names carry that infix (``layer.bn2d.gamma``) where PyTorch's
``BatchNorm3d`` has none (``layer.weight``).  ``mindspore_to_torch`` drops a
batch-norm layer's trailing ``bn2d.``; ``torch_to_mindspore`` adds it to the
layers it is told are 3d (``batchnorm3d=``: their names, or the torch model).

``to_torch_state_dict`` turns a cbn state dict (NumPy arrays, an int count)
into the tensors ``torch.nn.BatchNorm*.load_state_dict`` requires; cbn layers
load torch state dicts as they are.

Whole layers convert with ``cbn.mindspore.BatchNorm2d.from_torch(layer)`` and
``layer.to_torch()`` (see ``cbn.mindspore``).
"""
import numbers
from collections.abc import Mapping
from typing import Any, Dict, Iterable

import numpy as np

__all__ = ["torch_to_mindspore", "mindspore_to_torch", "to_torch_state_dict",
           "momentum_torch_to_mindspore", "momentum_mindspore_to_torch"]

TORCH_TO_MINDSPORE = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
MINDSPORE_TO_TORCH = {ms: pt for pt, ms in TORCH_TO_MINDSPORE.items()}
NUM_BATCHES_TRACKED = "num_batches_tracked"
#: The name of the BatchNorm2d inside MindSpore's BatchNorm3d.
BN2D = "bn2d."


def _check_state(state, what):
    """``state`` as a mapping with str keys (TypeError naming the offender otherwise)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{what} must be a mapping (a dict) of names to arrays, got "
                        f"{type(state).__name__}")
    for key in state:
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be str (parameter names), got "
                            f"{type(key).__name__} {key!r}")


def _copy_value(key, value):
    """A NumPy copy of a batch-norm value (a CPU tensor too), of real numbers."""
    from cbn.functional import real_array
    return real_array(repr(key), value, kinds="biuf", copy=True)


def _split(key):
    """('layer1.bn.', 'weight') for 'layer1.bn.weight'; ('', 'weight') for 'weight'."""
    prefix, dot, name = key.rpartition(".")
    return prefix + dot, name


def _rename(state, names, markers, drop=(), add=None, new_prefix=None):
    """A copy of ``state`` with the batch-norm keys renamed by ``names``.

    A prefix belongs to a batch-norm layer when one of its keys ends in one of
    ``markers``.  Keys ending in ``drop`` are left out of those layers; ``add``
    is a (name, value) pair put after each such layer's last key;
    ``new_prefix(prefix)`` gives a layer's prefix on the other side.
    """
    split = {key: _split(key) for key in state}
    bn_prefixes = {prefix for prefix, name in split.values() if name in markers}
    last_key = {prefix: key for key, (prefix, _) in split.items() if prefix in bn_prefixes}
    out, source = {}, {}

    def put(new_key, value, old_key):
        if new_key in out:
            raise ValueError(f"keys {source[new_key]!r} and {old_key!r} both map to {new_key!r}")
        out[new_key], source[new_key] = value, old_key

    for key, (prefix, name) in split.items():
        if prefix not in bn_prefixes:
            put(key, state[key], key)
            continue
        target = prefix if new_prefix is None else new_prefix(prefix)
        if name in names:
            put(target + names[name], _copy_value(key, state[key]), key)
        elif name not in drop:
            put(target + name, state[key], key)
        if add is not None and last_key[prefix] == key and prefix + add[0] not in state:
            put(target + add[0], np.array(add[1]), key)
    return out


def _layer_names_3d(batchnorm3d):
    """The set of layer names (prefixes without the dot, '' for a bare layer) that are 3d."""
    if batchnorm3d is None:
        return set()
    if hasattr(batchnorm3d, "named_modules"):  # a torch.nn.Module
        return {name for name, module in batchnorm3d.named_modules()
                if type(module).__name__ in ("BatchNorm3d", "LazyBatchNorm3d")}
    if isinstance(batchnorm3d, str) or not isinstance(batchnorm3d, Iterable):
        raise TypeError(f"batchnorm3d must be None, a torch.nn.Module or an iterable of layer "
                        f"names (e.g. ['layer1.bn'], '' for a bare layer), got "
                        f"{batchnorm3d!r}")
    names = set()
    for name in batchnorm3d:
        if not isinstance(name, str):
            raise TypeError(f"batchnorm3d layer names must be str, got {name!r}")
        names.add(name.rstrip("."))
    return names


def torch_to_mindspore(state_dict: Mapping, batchnorm3d: Any = None) -> Dict[str, Any]:
    """A PyTorch-keyed state dict renamed for MindSpore.

    ``weight``, ``bias``, ``running_mean``, ``running_var`` of every batch-norm
    layer become ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``
    (prefixes kept: ``layer1.bn.weight`` -> ``layer1.bn.gamma``), their values
    copied into NumPy arrays; ``num_batches_tracked``, which MindSpore does not
    have, is dropped.  Other keys pass through unchanged.

    A PyTorch layer built with ``track_running_stats=False`` saves only
    ``weight`` and ``bias``, which cannot be told apart from another layer's:
    such keys are not renamed.

    Parameters
    ----------
    state_dict : mapping of str to array or tensor
    batchnorm3d : torch.nn.Module or iterable of str, optional
        Which layers are ``BatchNorm3d``: a model (its ``BatchNorm3d``
        submodules are found) or layer names (``'layer1.bn'``; ``''`` for a
        state dict of one layer).  Their keys gain MindSpore's ``bn2d.``
        infix: ``layer1.bn.weight`` -> ``layer1.bn.bn2d.gamma``.

    Raises
    ------
    TypeError
        ``state_dict`` is not a mapping with str keys; a batch-norm value is
        not an array of real numbers; a bad ``batchnorm3d``.
    ValueError
        Two keys map to the same name.
    """
    _check_state(state_dict, "torch_to_mindspore: state_dict")
    three_d = _layer_names_3d(batchnorm3d)
    markers = ("running_mean", "running_var", NUM_BATCHES_TRACKED)
    return _rename(state_dict, TORCH_TO_MINDSPORE, markers, drop=(NUM_BATCHES_TRACKED,),
                   new_prefix=lambda prefix: prefix + BN2D if prefix[:-1] in three_d
                   else prefix)


def mindspore_to_torch(params: Mapping, batchnorm3d: bool = True) -> Dict[str, Any]:
    """A MindSpore parameter dict renamed for PyTorch.

    ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` of every
    batch-norm layer become ``weight``, ``bias``, ``running_mean``,
    ``running_var`` (prefixes kept), their values copied into NumPy arrays, and
    each such layer gains ``num_batches_tracked = 0`` (an int64 scalar array),
    the value a new PyTorch layer starts with.  Other keys (a LayerNorm's
    ``gamma``, say, which has no moving statistics) pass through unchanged.

    Parameters
    ----------
    params : mapping of str to array
    batchnorm3d : bool, default True
        A batch-norm layer whose name ends in ``bn2d`` is MindSpore's
        ``BatchNorm3d`` wrapper: the infix is dropped, so ``layer.bn2d.gamma``
        becomes ``layer.weight`` (torch's ``BatchNorm3d``).  False keeps it
        (for a network whose own BatchNorm2d is called ``bn2d``).

    Raises
    ------
    TypeError
        ``params`` is not a mapping with str keys, or a batch-norm value is not
        an array of real numbers.
    ValueError
        Two keys map to the same name.
    """
    _check_state(params, "mindspore_to_torch: params")
    if not isinstance(batchnorm3d, (bool, np.bool_)):
        raise TypeError(f"batchnorm3d must be True or False, got {batchnorm3d!r}")
    markers = ("moving_mean", "moving_variance")

    def torch_prefix(prefix):
        if batchnorm3d and (prefix == BN2D or prefix.endswith("." + BN2D)):
            return prefix[:-len(BN2D)]
        return prefix

    return _rename(params, MINDSPORE_TO_TORCH, markers,
                   add=(NUM_BATCHES_TRACKED, np.int64(0)), new_prefix=torch_prefix)


def to_torch_state_dict(state_dict: Mapping) -> Dict[str, Any]:
    """A state dict whose values are torch tensors, for ``torch.nn.Module.load_state_dict``.

    Arrays become tensors (copies, same dtype); an int ``num_batches_tracked``
    (as cbn layers keep it) becomes an int64 scalar tensor; tensors pass
    through.  Needs torch.

    >>> torch_layer.load_state_dict(cbn.convert.to_torch_state_dict(layer.state_dict()))
    >>> layer.load_state_dict(torch_layer.state_dict())   # the other way needs nothing
    """
    _check_state(state_dict, "to_torch_state_dict: state_dict")
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("cbn.convert.to_torch_state_dict needs torch: install the CPU build "
                          "(pip install torch --index-url https://download.pytorch.org/whl/cpu)"
                          ) from exc
    out = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif key.rpartition(".")[2] == NUM_BATCHES_TRACKED:
            count = np.asarray(value)
            if count.shape not in ((), (1,)) or count.dtype.kind not in "iu":
                raise TypeError(f"{key!r} must be an integer count, got {value!r}")
            out[key] = torch.tensor(int(count.reshape(())), dtype=torch.long)
        else:
            array = np.asarray(value)
            if array.dtype.kind not in "biuf":
                raise TypeError(f"{key!r} must hold real numbers, got dtype {array.dtype}")
            out[key] = torch.from_numpy(np.array(array))
    return out


def _check_momentum(momentum):
    if momentum is None:
        raise ValueError("momentum=None (PyTorch's cumulative moving average) has no "
                         "MindSpore equivalent: MindSpore's momentum is a fixed number")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    return float(momentum)


def momentum_torch_to_mindspore(momentum: float) -> float:
    """MindSpore's momentum for PyTorch's ``momentum``: ``1 - momentum``.

    PyTorch blends ``running = (1 - m) * running + m * batch``; MindSpore
    ``moving = m' * moving + (1 - m') * batch``, so ``m' = 1 - m``.

    Raises
    ------
    ValueError
        ``momentum`` is None (no MindSpore equivalent) or not a number in [0, 1].
    """
    return 1.0 - _check_momentum(momentum)


def momentum_mindspore_to_torch(momentum: float) -> float:
    """PyTorch's momentum for MindSpore's ``momentum``: ``1 - momentum``.

    Raises
    ------
    ValueError
        ``momentum`` is not a number in [0, 1].
    """
    return 1.0 - _check_momentum(momentum)
