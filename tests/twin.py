"""A slow, obviously-correct float64 NumPy twin of batch normalisation.

Every test compares cbn with these two functions.  They follow
``torch.nn.BatchNorm*`` / ``torch.nn.functional.batch_norm`` and are written for
the reader, not for speed: statistics are two-pass, everything is float64, and
nothing the caller passes in is modified (new running statistics are returned).

Update rule of the running statistics (PyTorch)::

    running = (1 - factor) * running + factor * batch_statistic
    factor  = momentum, or 1 / num_batches_tracked when momentum is None

where the running variance receives the *unbiased* batch variance while the
output is normalised with the *biased* one.
"""

from collections import namedtuple

import numpy as np

TwinForward = namedtuple(
    "TwinForward",
    "y running_mean running_var num_batches_tracked mean var",
)
TwinForward.__doc__ = """Result of `twin_batch_norm`.

y                    the output, float64
running_mean/var     the running statistics after the call (float64 copies, or None)
num_batches_tracked  the counter after the call (int, or None)
mean, var            the per-channel statistics the output was normalised with
                     (batch mean and biased batch variance, or the running ones)
"""

TwinBackward = namedtuple("TwinBackward", "dx dweight dbias")


def reduction_axes(x):
    """All axes but the channel axis 1: (0, 2, 3, ...)."""
    return (0,) + tuple(range(2, x.ndim))


def per_channel(v, ndim):
    """Reshape a (C,) vector so it broadcasts against an (N, C, ...) array."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def twin_batch_norm(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    num_batches_tracked=None,
):
    """Batch normalisation in float64 with PyTorch's semantics.

    ``training`` means "normalise with the batch statistics" (PyTorch's
    ``training or not track_running_stats``).  The running statistics are updated
    when ``training`` is true and they are not None; ``num_batches_tracked`` is
    incremented under the same condition, before the update, as the PyTorch
    module does (also for an empty batch, whose statistics are not used).
    """
    x = np.asarray(x, dtype=np.float64)
    axes = reduction_axes(x)
    count = x.size // x.shape[1] if x.shape[1] else 0

    new_mean = None if running_mean is None else np.array(running_mean, dtype=np.float64)
    new_var = None if running_var is None else np.array(running_var, dtype=np.float64)
    new_count = num_batches_tracked

    if training:
        if num_batches_tracked is not None:
            new_count = int(num_batches_tracked) + 1
        if count == 0:
            # PyTorch: an empty batch gives an empty output, statistics untouched.
            return TwinForward(x.copy(), new_mean, new_var, new_count, None, None)
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training")

        mean = x.mean(axis=axes)
        centred = x - per_channel(mean, x.ndim)
        var = (centred * centred).mean(axis=axes)  # biased: used for the output

        if momentum is None:
            factor = 1.0 / new_count
        else:
            factor = momentum
        if new_mean is not None:
            unbiased_var = var * count / (count - 1)
            new_mean = (1.0 - factor) * new_mean + factor * mean
            new_var = (1.0 - factor) * new_var + factor * unbiased_var
    else:
        mean = np.array(running_mean, dtype=np.float64)
        var = np.array(running_var, dtype=np.float64)

    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - per_channel(mean, x.ndim)) * per_channel(invstd, x.ndim)
    if weight is not None:
        y = y * per_channel(weight, x.ndim)
    if bias is not None:
        y = y + per_channel(bias, x.ndim)
    return TwinForward(y, new_mean, new_var, new_count, mean, var)


def twin_backward(x, dy, weight, eps, training, mean, var):
    """Gradients of `twin_batch_norm` with respect to x, weight and bias.

    ``mean`` and ``var`` are the statistics the forward pass normalised with
    (``TwinForward.mean``/``.var``); ``training`` says whether they were the
    batch statistics (which then depend on x) or constants (running ones)::

        training: dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
        eval:     dx = w * invstd * dy
        dweight = sum(dy * xhat),  dbias = sum(dy)

    with the means and sums taken over every axis but the channel axis.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes = reduction_axes(x)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)

    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    xhat = (x - per_channel(mean, x.ndim)) * per_channel(invstd, x.ndim)

    if training:
        mean_dy = dy.mean(axis=axes, keepdims=True)
        mean_dy_xhat = (dy * xhat).mean(axis=axes, keepdims=True)
        dx = per_channel(w * invstd, x.ndim) * (dy - mean_dy - xhat * mean_dy_xhat)
    else:
        dx = per_channel(w * invstd, x.ndim) * dy

    dweight = (dy * xhat).sum(axis=axes)
    dbias = dy.sum(axis=axes)
    return TwinBackward(dx, dweight, dbias)


def make_input(rng, shape, dtype, offsets=None):
    """Per-channel offsets and spreads, so every channel's statistics differ."""
    channels = shape[1]
    if offsets is None:
        offsets = rng.uniform(-3, 3, channels)
    spreads = rng.uniform(0.5, 2.0, channels)
    bshape = (1, channels) + (1,) * (len(shape) - 2)
    x = offsets.reshape(bshape) + spreads.reshape(bshape) * rng.standard_normal(shape)
    return x.astype(dtype)
