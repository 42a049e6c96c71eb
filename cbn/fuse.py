"""Folding an inference-mode batch norm into the linear or convolution before it.

In inference a batch-norm layer is a per-channel affine map, so it can be
merged into the weights of the layer that feeds it.  With
``scale = gamma / sqrt(var + eps)`` (the running statistics)::

    weight' = weight * scale          (along the output channels)
    bias'   = (bias - mean) * scale + beta

and ``bn(layer(x)) == layer'(x)``: one pass over the data instead of two.

Both flavours are accepted: ``cbn.BatchNorm1d/2d/3d`` and ``cbn.SyncBatchNorm``
(and ``cbn.torch.SyncBatchNorm``, ``torch.nn.BatchNorm1d/2d/3d``)
in eval mode (``weight``, ``bias``, ``running_mean``, ``running_var``, ``eps``;
``affine=False`` means gamma 1 and beta 0) and ``cbn.mindspore.BatchNorm1d/2d/3d``
using their moving statistics (``gamma``, ``beta``, ``moving_mean``,
``moving_variance``, ``eps``).  A layer that would normalise with batch
statistics cannot be folded and raises ``ValueError``.

The arithmetic is done in float64 and the results are returned in the dtype
of the given weight; the given arrays are never written to.  Torch tensors
(parameters that require grad included) are read detached.
"""
import numpy as np

from cbn.functional import real_array

__all__ = ["fuse_conv_bn", "fuse_linear_bn", "inference_scale_shift"]


def _statistics(bn):
    """(gamma, beta, mean, var, eps) of ``bn`` in float64; an error if it uses batch statistics."""
    name = type(bn).__name__
    if hasattr(bn, "moving_variance"):  # cbn.mindspore
        uses_batch = bn.use_batch_statistics
        if uses_batch is None:
            uses_batch = bn.training
        if uses_batch:
            raise ValueError(
                f"cannot fold {name}: it normalises with batch statistics "
                f"(training={bn.training}, use_batch_statistics={bn.use_batch_statistics}); "
                f"folding is for inference: call set_train(False) and keep "
                f"use_batch_statistics None or False")
        gamma, beta = bn.gamma, bn.beta
        mean, var = bn.moving_mean, bn.moving_variance
        names = ("gamma", "beta", "moving_mean", "moving_variance")
    elif hasattr(bn, "running_var") and hasattr(bn, "track_running_stats"):  # cbn.BatchNorm*
        if not bn.track_running_stats:
            raise ValueError(f"cannot fold {name} built with track_running_stats=False: it "
                             f"always normalises with batch statistics")
        if bn.training:
            raise ValueError(f"cannot fold {name} in training mode: it normalises with batch "
                             f"statistics; folding is for inference: call eval() first")
        c = _num_features(bn, name)
        gamma = bn.weight if bn.weight is not None else np.ones(c)
        beta = bn.bias if bn.bias is not None else np.zeros(c)
        mean, var = bn.running_mean, bn.running_var
        names = ("weight", "bias", "running_mean", "running_var")
    else:
        raise TypeError(f"expected a cbn batch-norm layer (cbn.BatchNorm1d/2d/3d, "
                        f"cbn.SyncBatchNorm or cbn.mindspore.BatchNorm1d/2d/3d), got {name}")
    c = _num_features(bn, name)
    arrays = tuple(_real_vector(f"{name}.{key}", value, c) for key, value in
                   zip(names, (gamma, beta, mean, var)))
    return arrays + (_check_eps(bn.eps, f"{name}.eps"),)


def _num_features(bn, name):
    c = getattr(bn, "num_features", None)
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c <= 0:
        raise TypeError(f"{name}.num_features must be a positive integer, got {c!r}")
    return int(c)


def _real_vector(name, value, length):
    """``value`` as a float64 array of shape (length,) of real numbers, else TypeError/ValueError."""
    array = real_array(name, value)
    if array.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got shape {array.shape}")
    return array.astype(np.float64)


def _check_eps(eps, name):
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number > 0, got {type(eps).__name__} {eps!r}")
    if not 0.0 < float(eps) < np.inf:
        raise ValueError(f"{name} must be > 0 and finite, got {eps!r}")
    return float(eps)


def inference_scale_shift(bn):
    """``(scale, shift)``: float64 (C,) arrays with ``bn(x) == x * scale + shift`` per channel.

    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``,
    from the running (moving) statistics.  Raises ``ValueError`` for a layer
    that normalises with batch statistics.
    """
    gamma, beta, mean, var, eps = _statistics(bn)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _check_weight(weight):
    return real_array("weight", weight, kinds="f")


def _fused_bias(bias, out_channels, mean_shift, scale, dtype):
    """``(bias - mean) * scale + beta`` (written as ``bias * scale + shift``) in ``dtype``."""
    if bias is None:
        bias64 = np.zeros(out_channels)
    else:
        array = real_array("bias", bias)
        if array.shape != (out_channels,):
            raise ValueError(f"bias must have shape ({out_channels},) (one value per output "
                             f"channel), got shape {array.shape}")
        bias64 = array.astype(np.float64)
    return (bias64 * scale + mean_shift).astype(dtype)


def fuse_conv_bn(weight, bias, bn, transposed=False, groups=1):
    """The weight and bias of a convolution followed by ``bn``, as one convolution.

    ``weight' = weight * scale`` along the output channels and
    ``bias' = (bias - mean) * scale + beta``, with ``scale = gamma / sqrt(var + eps)``.

    Parameters
    ----------
    weight : array
        The convolution's weight: ``(C_out, C_in / groups, *kernel)``, or for a
        transposed convolution ``(C_in, C_out / groups, *kernel)`` (PyTorch's
        layouts for 1d, 2d and 3d).  A linear layer's ``(C_out, C_in)`` works too
        (see ``fuse_linear_bn``).
    bias : array of shape (C_out,) or None
        None means no bias (zeros); the fused layer always has one.
    bn : cbn batch-norm layer
        PyTorch-flavoured in eval mode, or MindSpore-flavoured using its moving
        statistics, with ``num_features == C_out``.
    transposed : bool
        Whether the convolution is transposed.
    groups : int
        The convolution's groups; the output channels of a transposed
        convolution lie along axis 1 within each group.

    Returns
    -------
    (weight', bias') : arrays in ``weight``'s dtype, new (the inputs are not written to).

    Raises
    ------
    ValueError
        The channel counts disagree, ``groups`` does not divide them, or ``bn``
        normalises with batch statistics.
    TypeError
        ``weight`` is not floating point, or ``bn`` is not a cbn batch-norm layer.
    """
    weight = _check_weight(weight)
    if weight.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions (out, in, *kernel), "
                         f"got shape {weight.shape}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if not isinstance(transposed, (bool, np.bool_)):
        raise TypeError(f"transposed must be True or False, got {transposed!r}")
    scale, shift = inference_scale_shift(bn)
    if transposed:
        in_channels, per_group = weight.shape[0], weight.shape[1]
        out_channels = per_group * groups
        layout = f"(C_in, C_out / groups, *kernel) = {weight.shape} with groups={groups}"
    else:
        out_channels, in_channels = weight.shape[0], weight.shape[1] * groups
        layout = f"(C_out, C_in / groups, *kernel) = {weight.shape}"
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide the input and output channels of a "
                         f"weight of shape {weight.shape}")
    if out_channels != scale.shape[0]:
        raise ValueError(f"the convolution has {out_channels} output channels (weight "
                         f"{layout}) but {type(bn).__name__} has {scale.shape[0]} features")
    kernel = weight.shape[2:]
    weight64 = weight.astype(np.float64)
    if transposed:
        # Output channel g * per_group + j is weight[group g's inputs, j].
        by_group = weight64.reshape((groups, in_channels // groups, per_group) + kernel)
        by_group = by_group * scale.reshape((groups, 1, per_group) + (1,) * len(kernel))
        fused = by_group.reshape(weight.shape)
    else:
        fused = weight64 * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return fused.astype(weight.dtype), _fused_bias(bias, out_channels, shift, scale, weight.dtype)


def fuse_linear_bn(weight, bias, bn):
    """The weight and bias of a linear layer ``x @ weight.T + bias`` followed by ``bn``.

    ``weight`` has shape ``(C_out, C_in)`` (PyTorch's ``nn.Linear`` layout) and
    ``bn`` ``C_out`` features; see ``fuse_conv_bn`` for the rule, the returns and
    the errors.
    """
    weight = _check_weight(weight)
    if weight.ndim != 2:
        raise ValueError(f"a linear weight has shape (C_out, C_in), got shape {weight.shape}")
    return fuse_conv_bn(weight, bias, bn)
