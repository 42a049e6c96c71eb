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

Whole layers convert with ``cbn.mindspore.BatchNorm2d.from_torch(layer)`` and
``layer.to_torch()`` (see ``cbn.mindspore``).
"""
import numbers

import numpy as np

__all__ = ["torch_to_mindspore", "mindspore_to_torch",
           "momentum_torch_to_mindspore", "momentum_mindspore_to_torch"]

TORCH_TO_MINDSPORE = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
MINDSPORE_TO_TORCH = {ms: pt for pt, ms in TORCH_TO_MINDSPORE.items()}
NUM_BATCHES_TRACKED = "num_batches_tracked"


def _split(key):
    """('layer1.bn.', 'weight') for 'layer1.bn.weight'; ('', 'weight') for 'weight'."""
    prefix, dot, name = key.rpartition(".")
    return prefix + dot, name


def _rename(state, names, markers, drop=(), add=None):
    """A copy of ``state`` with the batch-norm keys renamed by ``names``.

    A prefix belongs to a batch-norm layer when one of its keys ends in one of
    ``markers``.  Keys ending in ``drop`` are left out of those layers; ``add``
    is a (name, value) pair put after each such layer's last key.
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
        if name in names:
            put(prefix + names[name], np.asarray(state[key]).copy(), key)
        elif name not in drop:
            put(key, state[key], key)
        if add is not None and last_key[prefix] == key and prefix + add[0] not in state:
            put(prefix + add[0], np.array(add[1]), key)
    return out


def torch_to_mindspore(state_dict):
    """A PyTorch-keyed state dict renamed for MindSpore.

    ``weight``, ``bias``, ``running_mean``, ``running_var`` of every batch-norm
    layer become ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``
    (prefixes kept: ``layer1.bn.weight`` -> ``layer1.bn.gamma``), their values
    copied into NumPy arrays; ``num_batches_tracked``, which MindSpore does not
    have, is dropped.  Other keys pass through unchanged.

    A PyTorch layer built with ``track_running_stats=False`` saves only
    ``weight`` and ``bias``, which cannot be told apart from another layer's:
    such keys are not renamed.
    """
    markers = ("running_mean", "running_var", NUM_BATCHES_TRACKED)
    return _rename(state_dict, TORCH_TO_MINDSPORE, markers, drop=(NUM_BATCHES_TRACKED,))


def mindspore_to_torch(params):
    """A MindSpore parameter dict renamed for PyTorch.

    ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` of every
    batch-norm layer become ``weight``, ``bias``, ``running_mean``,
    ``running_var`` (prefixes kept), their values copied into NumPy arrays, and
    each such layer gains ``num_batches_tracked = 0`` (an int64 scalar array),
    the value a new PyTorch layer starts with.  Other keys (a LayerNorm's
    ``gamma``, say, which has no moving statistics) pass through unchanged.
    """
    markers = ("moving_mean", "moving_variance")
    return _rename(params, MINDSPORE_TO_TORCH, markers,
                   add=(NUM_BATCHES_TRACKED, np.int64(0)))


def _check_momentum(momentum):
    if momentum is None:
        raise ValueError("momentum=None (PyTorch's cumulative moving average) has no "
                         "MindSpore equivalent: MindSpore's momentum is a fixed number")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    return float(momentum)


def momentum_torch_to_mindspore(momentum):
    """MindSpore's momentum for PyTorch's ``momentum``: ``1 - momentum``.

    PyTorch blends ``running = (1 - m) * running + m * batch``; MindSpore
    ``moving = m' * moving + (1 - m') * batch``, so ``m' = 1 - m``.
    """
    return 1.0 - _check_momentum(momentum)


def momentum_mindspore_to_torch(momentum):
    """PyTorch's momentum for MindSpore's ``momentum``: ``1 - momentum``."""
    return 1.0 - _check_momentum(momentum)
