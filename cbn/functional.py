"""Batch normalisation as functions: the core that every layer calls.

``batch_norm`` is the public function (``torch.nn.functional.batch_norm``'s
semantics).  The other functions are the steps the layers compose:

* ``moments``/``mean_var``: per-channel statistics, in float64;
* ``update_running``: ``running = (1 - f) * running + f * batch``;
* ``normalize``: ``y = (x - m) * scale + shift`` with
  ``scale = weight / sqrt(var + eps)``, ``m`` the mean rounded to the data's
  dtype and ``shift = bias - (mean - m) * scale`` (exact at any offset);
* ``backward``: the input gradient and the per-channel parameter gradients.
"""
import math
import numbers
from typing import Any, Optional

import numpy as np

from cbn import _layout
from cbn._config import kernel_threads

__all__ = ["batch_norm"]


# --- checks shared by every front end ----------------------------------------

def check_eps(eps, name="eps"):
    """``eps`` as a float: a finite real number > 0 (TypeError/ValueError naming ``name``)."""
    if type(eps) is float and 0.0 < eps < math.inf:  # the common case
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name} must be a real number > 0, got {type(eps).__name__} {eps!r}")
    value = float(eps)
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be > 0 and finite, got {eps!r}")
    return value


def check_momentum(momentum, name="momentum", allow_none=True):
    """``momentum`` as a float in [0, 1] (or None when allowed), else TypeError/ValueError."""
    if momentum is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number in [0, 1], got None")
    if type(momentum) is float and 0.0 <= momentum <= 1.0:  # the common case
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1]{' or None' if allow_none else ''}, "
                        f"got {type(momentum).__name__} {momentum!r}")
    value = float(momentum)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1]{' or None' if allow_none else ''}, "
                         f"got {momentum!r}")
    return value


def is_tensor(value):
    """Whether ``value`` is a torch tensor (without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_numpy(value, name="input"):
    """A CPU torch tensor as a NumPy array (detached, sharing memory; bfloat16 as a
    float32 copy); anything else is returned as given."""
    if type(value) is np.ndarray or not is_tensor(value):
        return value
    device = getattr(value, "device", None)
    if device is not None and device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got one on {device}")
    tensor = value.detach()
    if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
        tensor = tensor.float()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    return tensor.numpy()


class Saved:
    """What a forward pass keeps for its backward pass."""

    __slots__ = ("x", "mean", "invstd", "weight", "batch_stats", "count")

    def __init__(self, x, mean, invstd, weight, batch_stats, count):
        self.x = x                      # the input Batch
        self.mean = mean                # float64 (C,) mean used to normalise
        self.invstd = invstd            # float64 (C,) 1 / sqrt(var + eps)
        self.weight = weight            # (C,) or None
        self.batch_stats = batch_stats  # True when mean/var came from the batch
        self.count = count              # values per channel behind mean/var (global)


# One value of each channel as float64: the shift that keeps sums exact (a
# non-finite first value, inf or NaN, becomes 0: an infinite shift would turn
# the channel's mean into NaN where PyTorch gives inf).  The helpers below are
# the compiled ones themselves, not wrappers: with cold caches inside a
# network every Python call level costs microseconds.
first_values = _layout.first_values


def moments(batch, shift=None):
    """(count, sum(x - shift), sum((x - shift)**2), shift) of a non-empty batch."""
    if shift is None:
        shift = first_values(batch)
    s, q = _layout.moments(batch, shift, kernel_threads())
    return batch.count, s, q, shift


def batch_moments(batch):
    """(count, s, q, shift) of a training batch; count 0 (and Nones) for an empty one.

    Raises PyTorch's error when a channel holds a single value.
    """
    count = batch.count
    if count <= 1:
        if count == 0:
            return 0, None, None, None
        check_count(count, batch.shape)
    return moments(batch)


# float64 per-channel mean and biased variance from shifted sums: mean_var(count, s, q, shift).
mean_var = _layout.mean_var


def check_count(count, shape, where=""):
    """PyTorch's error for a training batch with at most one value per channel."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {tuple(shape)}{where}")


# Blend the batch statistics into the running ones, in place:
#   running_mean = (1 - factor) * running_mean + factor * mean
#   running_var  = (1 - factor) * running_var  + factor * var * count / (count - 1)
# update_running(running_mean, running_var, mean, var, count, factor)
update_running = _layout.update_running


def normalize(batch, mean, var, weight, bias, eps, out=None):
    """(y Batch, invstd): y = x * weight / sqrt(var + eps) + (bias - mean * ...)."""
    invstd, center, scale, shift = _layout.normalization_coefficients(
        mean, var, weight, bias, eps, batch.dtype)
    y = _layout.scale_shift(batch, scale, shift, kernel_threads(), out, center)
    return y, invstd


def backward(saved, dy, reduce=None, out=None):
    """Gradients of the forward pass recorded in ``saved``.

    Returns ``(dx, grad_weight, grad_bias)``, the parameter gradients in
    float64.  ``reduce`` (SyncBatchNorm) turns the local (sum_dy, sum_dy_xc)
    into the global ones; the parameter gradients stay local contributions.
    ``out``: an array of the input's shape and dtype to write dx into.
    """
    dy = _layout.like(saved.x, dy)
    target = None if out is None else _layout.check_out(saved.x, out)
    if target is not None and _overlaps_partly(out, dy.data):
        target = None  # staged, as the forward does: reads of dy must not see dx
    threads = kernel_threads()
    sum_dy, sum_dy_xc = _layout.grad_sums(dy, saved.x, saved.mean, threads)
    invstd = saved.invstd
    grad_weight = sum_dy_xc * invstd
    grad_bias = sum_dy
    dtype = saved.x.dtype
    if saved.batch_stats:
        if reduce is not None:
            sum_dy, sum_dy_xc = reduce(sum_dy, sum_dy_xc)
        # dx = a * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))),
        # with x - m formed in the data's dtype, m the mean rounded to it (exact
        # near the mean); the constant term carries the remainder.
        a, b, m, c = _layout.grad_coefficients(sum_dy, sum_dy_xc, invstd, saved.mean,
                                               saved.weight, saved.count, dtype)
        dx = _layout.grad_input(dy, saved.x, a, b, m, c, threads, target)
    else:
        a = invstd if saved.weight is None else saved.weight * invstd
        dx = _layout.scale_shift(dy, a.astype(dtype), np.zeros(len(a), dtype), threads, target)
    return _layout.deliver(dx, out), grad_weight, grad_bias


def _overlaps_partly(out, data):
    """Whether ``out`` shares memory with ``data`` without being exactly it (same start, strides)."""
    return np.may_share_memory(out, data) and (
        out.__array_interface__["data"][0] != data.__array_interface__["data"][0]
        or out.strides != data.strides or out.dtype != data.dtype)


def real_array(name, value, kinds="fiu", copy=False):
    """``value`` (array-like, or a CPU tensor read detached) as an ndarray of real numbers.

    ``kinds`` are the accepted NumPy dtype kinds; anything else, or a value that
    is no array at all, is a TypeError naming ``name``.  ``copy``: always a copy.
    """
    numbers = "floating-point numbers" if kinds == "f" else "real numbers"
    try:
        array = (np.array if copy else np.asarray)(to_numpy(value, name))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be an array of {numbers}, got "
                        f"{type(value).__name__} ({exc})") from None
    if array.dtype.kind not in kinds:
        raise TypeError(f"{name} must hold {numbers}, got dtype {array.dtype}")
    return array


def _per_channel(name, value, num_features):
    """``value`` as a float array of shape (C,) (TypeError/ValueError naming it otherwise)."""
    array = real_array(name, value)
    if array.shape != (num_features,):
        raise ValueError(f"{name} must have shape ({num_features},), got {array.shape}")
    return array.astype(np.float64) if array.dtype.kind != "f" else array


def _copier(tensor, array):
    """A function writing ``array`` back into ``tensor`` (a bfloat16 copy's way home)."""
    def write_back():
        import torch
        tensor.detach().copy_(torch.from_numpy(array))
    return write_back


def _running_buffer(name, value, num_features):
    """(array updated in place, write-back or None) for a running statistic in training.

    A NumPy array or a CPU tensor is updated in place (a tensor through a
    NumPy view of its memory; a bfloat16 one through a float32 copy written back).
    """
    array, write_back = value, None
    if is_tensor(value):
        array = to_numpy(value, name)
        if str(value.dtype) == "torch.bfloat16":
            write_back = _copier(value, array)
        elif not array.flags.writeable:  # pragma: no cover - tensors are writable
            raise ValueError(f"{name} is read-only, but training updates it in place")
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point NumPy array or CPU tensor (it is "
                        f"updated in place), got {type(value).__name__} "
                        f"{getattr(value, 'dtype', '')}".rstrip())
    if not array.flags.writeable:
        raise ValueError(f"{name} is read-only, but training updates it in place")
    _per_channel(name, array, num_features)
    return array, write_back


def batch_norm(input: Any, running_mean: Any, running_var: Any, weight: Any = None,
               bias: Any = None, training: bool = False, momentum: Optional[float] = 0.1,
               eps: float = 1e-5) -> np.ndarray:
    r"""Batch normalisation of ``input`` of shape (N, C, ...), as ``torch.nn.functional.batch_norm``.

    In training the batch statistics normalise and, when given, the running
    statistics are updated in place (unbiased variance),

    .. math:: \hat{x}_{\text{running}} \leftarrow (1 - m)\,\hat{x}_{\text{running}}
              + m\,\hat{x}_{\text{batch}},

    otherwise the running statistics normalise:
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Parameters
    ----------
    input : array_like or CPU torch.Tensor, shape (N, C, ...)
        Floating point (float16 and bfloat16 are computed in float32).
    running_mean, running_var : ndarray, CPU torch.Tensor or None
        Shape (C,).  Updated in place when ``training``: a NumPy array or a
        tensor (a bfloat16 tensor through a float32 copy written back).
        Required when not training.
    weight, bias : array_like or None
        Shape (C,); None means 1 and 0.
    training : bool
        Batch statistics (True) or running statistics (False).
    momentum : float
        ``m`` in [0, 1].
    eps : float
        Finite, > 0.

    Returns
    -------
    ndarray
        Of ``input``'s shape; its dtype, or float32 for a bfloat16 tensor.

    Raises
    ------
    TypeError
        A non-floating input, a non-number ``eps``/``momentum``, a running
        statistic that cannot be updated in place.
    ValueError
        Wrong shapes, ``eps <= 0`` or NaN, ``momentum`` outside [0, 1], one value
        per channel in training.  Nothing is updated when an error is raised.
    """
    try:
        a = np.asarray(to_numpy(input, "input"))
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"input must be an array of floating-point numbers, got "
                        f"{type(input).__name__} ({exc})") from None
    if a.ndim < 2:
        raise ValueError(f"expected an input of rank >= 2 (N, C, ...), got shape {a.shape}")
    num_features = a.shape[1]
    training = bool(training)
    eps = check_eps(eps)
    if training:
        momentum = check_momentum(momentum, allow_none=False)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training is False")
    weight = None if weight is None else _per_channel("weight", weight, num_features)
    bias = None if bias is None else _per_channel("bias", bias, num_features)
    write_backs = []
    if training and running_mean is not None:
        running_mean, back_mean = _running_buffer("running_mean", running_mean, num_features)
        running_var, back_var = _running_buffer("running_var", running_var, num_features)
        write_backs = [f for f in (back_mean, back_var) if f is not None]
    elif running_mean is not None:
        running_mean = _per_channel("running_mean", running_mean, num_features)
        running_var = _per_channel("running_var", running_var, num_features)
    batch = _layout.as_batch(a, num_features, None, "(N, C, ...)")
    if batch.count == 0:
        return _layout.finish(_layout.empty_like(batch))
    if training:
        check_count(batch.count, batch.shape)
        mean, var = mean_var(*moments(batch))
        update_running(running_mean, running_var, mean, var, batch.count, momentum)
        for write_back in write_backs:
            write_back()
    else:
        mean, var = running_mean, running_var
    y, _ = normalize(batch, mean, var, weight, bias, eps)
    return _layout.finish(y)
