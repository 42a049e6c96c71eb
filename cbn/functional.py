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
import numpy as np

from cbn import _layout
from cbn._config import kernel_threads

__all__ = ["batch_norm"]


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


def first_values(batch):
    """One value of each channel as float64: the shift that keeps sums exact."""
    view = batch.view
    first = view[0, :, 0] if view.ndim == 3 else view[0]
    return np.ascontiguousarray(first, dtype=np.float64)


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
    if batch.count == 0:
        return 0, None, None, None
    check_count(batch.count, batch.shape)
    return moments(batch)


def mean_var(count, s, q, shift):
    """float64 per-channel mean and biased variance from shifted sums."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN stay in their channel
        mean = shift + s / count
        var = (q - s * (s / count)) / count
        np.maximum(var, 0.0, out=var)
    return mean, var


def check_count(count, shape, where=""):
    """PyTorch's error for a training batch with at most one value per channel."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {tuple(shape)}{where}")


def update_running(running_mean, running_var, mean, var, count, factor):
    """Blend the batch statistics into the running ones, in place.

    running_mean = (1 - factor) * running_mean + factor * mean
    running_var  = (1 - factor) * running_var  + factor * var * count / (count - 1)
    """
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN stay in their channel
        if running_mean is not None:
            running_mean[...] = (1.0 - factor) * running_mean + factor * mean
        if running_var is not None:
            unbiased = var * (count / (count - 1.0))
            running_var[...] = (1.0 - factor) * running_var + factor * unbiased


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
    sum_dy, sum_dy_xc = _layout.grad_sums(dy, saved.x, saved.mean, kernel_threads())
    invstd = saved.invstd
    grad_weight = sum_dy_xc * invstd
    grad_bias = sum_dy
    a = invstd if saved.weight is None else saved.weight * invstd
    dtype = saved.x.dtype
    if saved.batch_stats:
        if reduce is not None:
            sum_dy, sum_dy_xc = reduce(sum_dy, sum_dy_xc)
        n = saved.count
        # dx = a * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))
        k = sum_dy_xc * invstd * invstd / n
        # x - m is formed in the data's dtype with m the mean rounded to it
        # (exact near the mean); the constant term carries the remainder.
        b = -a * k
        m = saved.mean.astype(dtype)
        c = -a * sum_dy / n - b * (saved.mean - m)
        dx = _layout.grad_input(dy, saved.x, a.astype(dtype), b.astype(dtype), m,
                                c.astype(dtype), kernel_threads(), target)
    else:
        dx = _layout.scale_shift(dy, a.astype(dtype), np.zeros(len(a), dtype),
                                 kernel_threads(), target)
    return _layout.deliver(dx, out), grad_weight, grad_bias


def _per_channel(name, value, num_features):
    """``value`` as a float array of shape (C,) (TypeError/ValueError naming it otherwise)."""
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.shape != (num_features,):
        raise ValueError(f"{name} must have shape ({num_features},), got {array.shape}")
    return array.astype(np.float64) if array.dtype.kind != "f" else array


def batch_norm(input, running_mean, running_var, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5):
    """Batch normalisation of ``input`` of shape (N, C, ...), as ``torch.nn.functional.batch_norm``.

    In training the batch statistics normalise and, when given, the running
    statistics are updated in place:
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance).
    Otherwise the running statistics normalise.
    """
    a = np.asarray(input)
    if a.ndim < 2:
        raise ValueError(f"expected an input of rank >= 2 (N, C, ...), got shape {a.shape}")
    num_features = a.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training is False")
    weight = None if weight is None else _per_channel("weight", weight, num_features)
    bias = None if bias is None else _per_channel("bias", bias, num_features)
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if value is None:
            continue
        if training:  # updated in place: must be a writable float array of its own
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise TypeError(f"{name} must be a floating-point NumPy array (it is updated "
                                f"in place), got {type(value).__name__} "
                                f"{getattr(value, 'dtype', '')}".rstrip())
            if not value.flags.writeable:
                raise ValueError(f"{name} is read-only, but training updates it in place")
        _per_channel(name, value, num_features)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    batch = _layout.as_batch(a, num_features, None, "(N, C, ...)")
    if batch.count == 0:
        return _layout.finish(_layout.empty_like(batch))
    if training:
        if momentum is None:
            raise ValueError("momentum must be a number in functional batch_norm")
        check_count(batch.count, batch.shape)
        mean, var = mean_var(*moments(batch))
        update_running(running_mean, running_var, mean, var, batch.count, momentum)
    else:
        mean = _per_channel("running_mean", running_mean, num_features)
        var = _per_channel("running_var", running_var, num_features)
    y, _ = normalize(batch, mean, var, weight, bias, eps)
    return _layout.finish(y)
