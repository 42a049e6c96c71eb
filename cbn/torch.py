"""PyTorch models on CPU clusters: ``SyncBatchNorm`` as a ``torch.nn.Module``, on cbn's kernels.

``torch.nn.SyncBatchNorm`` refuses CPU tensors.  ``cbn.torch.SyncBatchNorm``
takes its place on the CPU: the same constructor, parameters, buffers and
``state_dict`` keys; forward and backward on cbn's kernels; and in training
one Allreduce forward and one backward over the process group, with
``cbn.SyncBatchNorm``'s protocol (``cbn.sync_batchnorm.GlobalStats``: error
flags, uneven and empty local batches, a timeout instead of a hang).

Three ways into the same kernels, chosen per call:

* eager (the hot path): one ``torch.autograd.Function`` that calls the NumPy
  core directly -- no dispatcher round trip;
* graph capture (``torch.compile``, ``torch.export`` in training,
  ``torch.jit.trace``/``script`` in training, ``torch.fx``): the registered
  operators ``cbn::batch_norm`` and ``cbn::batch_norm_backward``
  (``torch.library.custom_op`` with fake implementations, the autograd formula
  and the mutated buffers declared), one opaque node per layer.  The process
  group travels as an integer handle into ``_GROUPS``;
* portable graphs (``torch.onnx.export``, ``torch.export``/``jit``/``fx`` of a
  layer that normalises with its running statistics): eval batch norm *is*
  ``torch.nn.functional.batch_norm`` with the running statistics, so the
  standard aten operator is emitted and the graph runs without cbn (ONNX
  ``BatchNormalization``).  Under ``torch.func`` transforms and forward-mode AD
  the layer is torch's own ``batch_norm`` too (same support, same errors).

Double backward (``create_graph=True``) differentiates a torch-ops twin of the
forward; a synchronising step refuses it on every rank.  float16 and bfloat16
tensors (input, parameters or buffers) are computed in float32 and stored back
in their own dtype.

Tensors and arrays share memory: ``tensor.numpy()`` goes in, ``torch.from_numpy``
comes out, and channels-last memory stays channels-last.

Importing this module imports torch; ``import cbn`` does not.
"""
try:
    import torch
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "cbn.torch needs PyTorch, which is not installed. Install the CPU build: "
        "pip install torch --index-url https://download.pytorch.org/whl/cpu "
        "(or `pip install cbn[torch]`)") from _exc
import secrets
import weakref
from typing import Any, Optional, Tuple

import numpy as np
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from cbn import _layout, comm as _comm
from cbn import functional as F
from cbn._config import kernel_threads
from cbn.sync_batchnorm import GlobalStats

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "allreduce_gradients", "batch_norm"]

_NUMPY_DTYPES = (torch.float32, torch.float64)
_AS_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_functorch_active = torch._C._are_functorch_transforms_active
_forward_ad = torch.autograd.forward_ad
_set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


class ChannelError(RuntimeError, ValueError):
    """A tensor whose size disagrees with the layer's channel count.

    A ``RuntimeError`` as in ``torch.nn.functional.batch_norm``, and a
    ``ValueError`` as in cbn's NumPy layers.
    """


# --------------------------------------------------------------------------- process groups

class _Group:
    """A layer's process group, resolved to a GlobalStats (or None) on first use."""

    __slots__ = ("process_group", "timeout", "num_features", "stats", "handle", "__weakref__")

    def __init__(self, process_group, timeout, num_features):
        self.process_group, self.timeout, self.num_features = process_group, timeout, num_features
        self.stats = None  # GlobalStats; False: a single process
        self.handle = 0

    def global_stats(self):
        if self.stats is None:
            group = _comm.collective(self.process_group, self.timeout)
            self.stats = False if group is None else GlobalStats(group, self.num_features)
        return self.stats or None


#: handle -> _Group.  An operator cannot take a Python object, so layers pass
#: a random integer handle (0: no synchronisation); a graph saved and loaded in
#: another process finds no entry and says so instead of syncing the wrong layer.
_GROUPS = {}


def _new_handle(group):
    handle = secrets.randbits(62) + 1
    _GROUPS[handle] = group
    return handle


def _global_stats_of(handle):
    if handle == 0:
        return None
    group = _GROUPS.get(handle)
    if group is None:
        raise RuntimeError(
            f"cbn::batch_norm: unknown process-group handle {handle}: this graph was captured "
            f"from a cbn.torch.SyncBatchNorm of another process (e.g. torch.jit.load of a model "
            f"traced in training). Training needs the live layer: rebuild the model in this "
            f"process (eval mode does not synchronise and works anywhere)")
    return group.global_stats()


# --------------------------------------------------------------------------- the NumPy core

def _numpy(tensor):
    """The ndarray sharing ``tensor``'s memory (None stays None; a negated view: a copy)."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    try:
        return tensor.numpy()
    except RuntimeError:  # a lazily negated view (torch._neg_view): NumPy cannot see the bit
        if not tensor.is_neg():
            raise
        return tensor.resolve_neg().numpy()


def _numpy_f32(tensor):
    """``tensor`` as an ndarray, float16/bfloat16 widened to float32 (a copy)."""
    if tensor is None:
        return None
    if tensor.dtype not in _NUMPY_DTYPES:
        tensor = tensor.detach().float()
    return tensor.detach().numpy()


def _check_input(input, num_features):
    """torch's checks of an input tensor, with cbn's messages."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.device.type != "cpu":
        raise ValueError(f"cbn.torch runs on CPU tensors, got a tensor on {input.device}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if not input.is_floating_point():
        raise TypeError(f"batch norm expects a floating-point input (float16, bfloat16, "
                        f"float32 or float64), got dtype {input.dtype}")
    if input.shape[1] != num_features:
        raise ChannelError(f"expected {num_features} channels (input.shape[1]), got "
                           f"{input.shape[1]} in an input of shape {tuple(input.shape)}")


def _plain_array(input, num_features):
    """The ndarray of a plain CPU float32/float64 tensor with the right channels, else None.

    The common case in as few tensor calls as possible: inside a network
    every call here runs with cold caches, and each tensor method then costs
    microseconds.  ``numpy()`` itself refuses what the kernels cannot view
    (another device, bfloat16); NumPy's attributes check the rest.
    """
    if type(input) is not torch.Tensor:
        return None
    try:
        array = input.detach().numpy() if input.requires_grad else input.numpy()
    except (TypeError, RuntimeError):  # not on the CPU, or no NumPy dtype: the checks below
        return None
    if array.dtype in _layout.NATIVE_DTYPES and array.ndim > 1 and array.shape[1] == num_features:
        return array
    return None


def _input_batch(input, num_features):
    """Validate a CPU tensor and return its Batch, a view of its memory where possible."""
    array = _plain_array(input, num_features)
    if array is not None:
        return _layout.as_batch(array, num_features, None, "(N, C, ...)")
    _check_input(input, num_features)
    if input.dtype == torch.bfloat16:  # NumPy has no bfloat16: computed in float32
        input = input.detach().float()
    return _layout.as_batch(_numpy(input), num_features, None, "(N, C, ...)")


def _check_eps(eps, use_batch_stats):
    # torch 2.13's checks, word for word
    if use_batch_stats and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _validate(input, weight, bias, running_mean, counter, use_batch_stats, momentum, eps,
              global_stats, num_features):
    """(batch, weight, bias) as NumPy; a bad input raises on every rank (``fail_forward``)."""
    try:
        batch = _input_batch(input, num_features)
        _check_eps(eps, use_batch_stats)
        if use_batch_stats and running_mean is not None and momentum is None \
                and counter is None:
            raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
        return batch, _numpy_f32(weight), _numpy_f32(bias)
    except BaseException as exc:
        if global_stats is not None:  # the other ranks are waiting in the collective
            global_stats.fail_forward(exc)
        raise


def _statistics(batch, running_mean, running_var, counter, use_batch_stats, momentum,
                global_stats):
    """(mean, var, count) that normalise ``batch``, float64; count 0 for an empty batch.

    With batch statistics and running statistics given, the running
    statistics and the counter are updated in place once the statistics are
    known (every rank succeeded), as ``torch.nn.functional.batch_norm`` does.
    """
    update = use_batch_stats and running_mean is not None
    # float16/bfloat16 buffers: updated in float32 copies, stored back below
    mean_np, var_np = _numpy_f32(running_mean), _numpy_f32(running_var)
    if not use_batch_stats:
        return mean_np.astype(np.float64), var_np.astype(np.float64), batch.count
    if global_stats is None:
        count, s, q, shift = F.batch_moments(batch)
    else:
        count, s, q, shift = global_stats.moments(batch, mean_np)
    if count == 0:  # an empty (global) batch: empty output, statistics untouched
        if update and counter is not None:
            counter += 1  # torch counts it all the same
        return None, None, 0
    mean, var = F.mean_var(count, s, q, shift)
    if update:
        factor = momentum
        if counter is not None:
            counter += 1
            if momentum is None:  # cumulative moving average
                factor = 1.0 / int(counter)
        F.update_running(mean_np, var_np, mean, var, count, factor)
        for tensor, array in ((running_mean, mean_np), (running_var, var_np)):
            if tensor is None:
                continue
            if tensor.dtype not in _NUMPY_DTYPES:
                tensor.copy_(torch.from_numpy(array))
            elif _set_versions is not None:  # written through NumPy: tell autograd and caches
                _set_versions((tensor,), (tensor._version + 1,))
    return mean, var, count


def _normalize(input, batch, mean, var, count, weight_np, bias_np, eps, use_batch_stats):
    """(output tensor, F.Saved) from the statistics."""
    if count == 0:
        zeros = np.zeros(batch.shape[1])
        return (_output(input, _layout.empty_like(batch)),
                F.Saved(batch, zeros, zeros, weight_np, False, 0))
    y, invstd = F.normalize(batch, mean, var, weight_np, bias_np, eps)
    return _output(input, y), F.Saved(batch, mean, invstd, weight_np, use_batch_stats, count)


def _forward(input, weight, bias, running_mean, running_var, counter, use_batch_stats,
             momentum, eps, global_stats, num_features):
    """(output tensor, F.Saved): batch norm of ``input`` on the NumPy core."""
    batch, weight_np, bias_np = _validate(input, weight, bias, running_mean, counter,
                                          use_batch_stats, momentum, eps, global_stats,
                                          num_features)
    mean, var, count = _statistics(batch, running_mean, running_var, counter, use_batch_stats,
                                   momentum, global_stats)
    return _normalize(input, batch, mean, var, count, weight_np, bias_np, eps, use_batch_stats)


def _output(input, batch):
    out = torch.from_numpy(_layout.finish(batch))
    return out.to(input.dtype) if out.dtype != input.dtype else out


def _backward(saved, grad_output, global_stats, needs, dtypes):
    """(dx, grad_weight, grad_bias) tensors (None where not needed) on the NumPy core."""
    try:
        if grad_output.dtype == torch.bfloat16:
            grad_output = grad_output.float()
        dy = _layout.like(saved.x, _numpy(grad_output))
    except BaseException as exc:
        if global_stats is not None:
            global_stats.fail_backward(exc)
        raise
    reduce = None if global_stats is None else global_stats.reduce_grad_sums
    dx, grad_weight, grad_bias = F.backward(saved, dy, reduce)
    return (_tensor(dx, dtypes[0]) if needs[0] else None,
            _tensor(grad_weight, dtypes[1]) if needs[1] else None,
            _tensor(grad_bias, dtypes[2]) if needs[2] else None)


def _tensor(array, dtype):
    """``array`` as a tensor of ``dtype`` (sharing its memory when the dtype is already right)."""
    target = _AS_NUMPY.get(dtype)
    if target is not None:  # cast in NumPy: a torch .to() costs 10-30 us per call
        return torch.from_numpy(array if array.dtype == target else array.astype(target))
    return torch.from_numpy(array).to(dtype)


def _twin_grads(grad_output, input, weight, bias, mean, invstd, use_batch_stats, eps, needs):
    """The gradients as a differentiable graph of torch ops (double backward).

    Recomputes the forward in torch ops -- from the input when batch
    statistics normalised, with the saved running statistics otherwise -- and
    differentiates it with ``create_graph=True``.
    """
    inputs = [t for t, need in zip((input, weight, bias), needs) if need]
    with torch.enable_grad():
        x = input if input.dtype in _NUMPY_DTYPES else input.float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if use_batch_stats:
            dims = [0] + list(range(2, x.dim()))
            mu = x.mean(dims, keepdim=True)
            var = (x - mu).square().mean(dims, keepdim=True)
            y = (x - mu) * torch.rsqrt(var + eps)
        else:
            y = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
        if weight is not None:
            y = y * weight.to(x.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(x.dtype).view(shape)
        grads = iter(torch.autograd.grad(y, inputs, grad_output.to(y.dtype), create_graph=True,
                                         allow_unused=True))
    out = []
    for t, need in zip((input, weight, bias), needs):
        g = next(grads) if need else None
        if need and g is None:
            g = torch.zeros_like(t)
        out.append(None if g is None else g.to(t.dtype))
    return tuple(out)


def _refuse_double_backward(global_stats):
    exc = RuntimeError(
        "cbn.torch.SyncBatchNorm: double backward (create_graph=True) through a synchronising "
        "training step is not supported (the global reduction is not differentiable); every "
        "rank raises. Use one process, eval mode, or torch.nn.BatchNorm for this step")
    global_stats.fail_backward(exc)
    raise exc  # pragma: no cover - fail_backward raises


# --------------------------------------------------------------------------- eager autograd

def _dtypes(input, weight, bias):
    """The dtypes the gradients go back in: the input's, the weight's, the bias's (or None)."""
    return (input.dtype, None if weight is None else weight.dtype,
            None if bias is None else bias.dtype)


class _BatchNormFunction(torch.autograd.Function):
    """(input, weight, bias) -> output, calling the NumPy core directly (the eager path).

    ``global_stats`` (a GlobalStats, or None) makes the statistics and the
    gradient sums those of the global batch.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, options):
        # The buffers travel inside ``options`` (a tuple): autograd then does not
        # set up, per call, the bookkeeping of five more tensor arguments.
        (running_mean, running_var, counter, use_batch_stats, momentum, eps, global_stats,
         num_features) = options
        y, saved = _forward(input, weight, bias, running_mean, running_var, counter,
                            use_batch_stats, momentum, eps, global_stats, num_features)
        ctx.state = saved
        ctx.global_stats = global_stats if use_batch_stats else None
        ctx.use_batch_stats, ctx.eps = use_batch_stats, eps
        ctx.dtypes = _dtypes(input, weight, bias)
        ctx.save_for_backward(input, weight, bias)  # autograd refuses an input modified in place
        return y

    @staticmethod
    def backward(ctx, grad_output):
        state, global_stats = ctx.state, ctx.global_stats
        try:
            input, weight, bias = ctx.saved_tensors  # raises if the input changed since forward
        except BaseException as exc:
            if global_stats is not None:  # the other ranks are waiting in the collective
                global_stats.fail_backward(exc)
            raise
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            if global_stats is not None:
                _refuse_double_backward(global_stats)
            mean, invstd = torch.from_numpy(state.mean), torch.from_numpy(state.invstd)
            grads = _twin_grads(grad_output, input, weight, bias, mean, invstd,
                                ctx.use_batch_stats, ctx.eps, needs)
        else:
            grads = _backward(state, grad_output, global_stats, needs, ctx.dtypes)
        return grads + (None,)


def _raw_apply(function):
    """``function.apply`` without torch's Python wrapper around it.

    The wrapper only reroutes functorch transforms (``_torch_semantics``
    already sends those to torch's batch norm) and unwraps dead functorch
    wrappers (the callers do, with the same C call); with cold caches inside
    a network it cost 30-45 us per call.
    """
    return super(torch.autograd.Function, function).apply


class _EvalFunction(_BatchNormFunction):
    """Eval with the running statistics already in float64 (``SyncBatchNorm``'s cache)."""

    @staticmethod
    def forward(ctx, input, weight, bias, options):
        mean, var, weight_np, bias_np, eps, num_features = options
        batch = _input_batch(input, num_features)
        y, invstd = F.normalize(batch, mean, var, weight_np, bias_np, eps)
        ctx.state = F.Saved(batch, mean, invstd, weight_np, False, batch.count)
        ctx.global_stats, ctx.use_batch_stats, ctx.eps = None, False, eps
        ctx.dtypes = _dtypes(input, weight, bias)
        ctx.save_for_backward(input, weight, bias)
        return _output(input, y)


_APPLY_TRAIN, _APPLY_EVAL = _raw_apply(_BatchNormFunction), _raw_apply(_EvalFunction)


def _apply(apply, input, weight, bias, options):
    """``apply(input, weight, bias, options)`` with dead functorch wrappers unwrapped."""
    return apply(_unwrap_if_dead(input), None if weight is None else _unwrap_if_dead(weight),
                 None if bias is None else _unwrap_if_dead(bias), options)


# --------------------------------------------------------------------------- registered operators

def _num_features(input, *per_channel):
    """The channel count the per-channel tensors say (the input's without any)."""
    for t in per_channel:
        if t is not None:
            return t.shape[0]
    return input.shape[1]


# The operators come in three because torch.library gives autograd formulas to
# functional operators only: ``batch_norm_stats`` mutates the running statistics
# (and holds the forward collective), ``batch_norm_apply`` normalises with the
# statistics it is given and is differentiable (its backward, including the
# path through batch statistics, is ``batch_norm_backward``).

@torch.library.custom_op("cbn::batch_norm_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _stats_op(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
              num_batches_tracked: Optional[Tensor], use_batch_stats: bool,
              momentum: Optional[float], eps: float, group: int
              ) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, var, count): float64 (C,) statistics that normalise ``input``.

    ``count`` is the number of values per channel behind them over the process
    group (0: an empty batch), or -1 when the running statistics are used.
    ``group`` is a handle into ``_GROUPS`` (0: this process alone).
    """
    global_stats = _global_stats_of(group) if use_batch_stats else None
    num_features = _num_features(input, running_mean, running_var)
    if global_stats is not None:
        num_features = global_stats.num_features
    counter = None if num_batches_tracked is None else _numpy(num_batches_tracked)
    batch, _, _ = _validate(input, None, None, running_mean, counter, use_batch_stats, momentum,
                            eps, global_stats, num_features)
    mean, var, count = _statistics(batch, running_mean, running_var, counter, use_batch_stats,
                                   momentum, global_stats)
    if count == 0:
        mean = var = np.zeros(batch.shape[1])
    return (torch.from_numpy(np.array(mean, np.float64)),
            torch.from_numpy(np.array(var, np.float64)),
            torch.tensor(float(count if use_batch_stats else -1), dtype=torch.float64))


@_stats_op.register_fake
def _(input, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps,
      group):
    _check_input(input, _num_features(input, running_mean, running_var))
    c = input.shape[1]
    return (input.new_empty((c,), dtype=torch.float64),
            input.new_empty((c,), dtype=torch.float64),
            input.new_empty((), dtype=torch.float64))


@torch.library.custom_op("cbn::batch_norm_apply", mutates_args=())
def _apply_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
              var: Tensor, count: Tensor, eps: float, group: int) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` with the statistics of
    ``batch_norm_stats``; differentiable in input (through the batch statistics
    when ``count`` >= 0), weight and bias."""
    batch = _input_batch(input, mean.shape[0])
    y, _ = _normalize(input, batch, mean.numpy(), var.numpy(), int(count), _numpy_f32(weight),
                      _numpy_f32(bias), eps, int(count) >= 0)
    like = torch.empty_like(input)
    if y.stride() != like.stride():  # the strides the fake implementation promised
        y = like.copy_(y)
    return y


@_apply_op.register_fake
def _(input, weight, bias, mean, var, count, eps, group):
    return torch.empty_like(input)


@torch.library.custom_op("cbn::batch_norm_backward", mutates_args=())
def _backward_op(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                 var: Tensor, count: Tensor, eps: float, group: int, input_grad: bool,
                 weight_grad: bool, bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of ``batch_norm_apply`` (empty when not asked for).

    With ``count`` >= 0 (batch statistics) the input gradient includes the path
    through the statistics, over the process group ``group``.
    """
    n = int(count)
    global_stats = _global_stats_of(group) if n >= 0 else None
    batch = _input_batch(input, mean.shape[0])
    invstd = 1.0 / np.sqrt(var.numpy() + eps)  # as F.normalize computed it
    saved = F.Saved(batch, mean.numpy(), invstd, _numpy_f32(weight), n > 0, max(n, 0))
    wdtype = input.dtype if weight is None else weight.dtype
    grads = _backward(saved, grad_output, global_stats, (input_grad, weight_grad, bias_grad),
                      (input.dtype, wdtype, wdtype))
    empty = input.new_empty((0,))
    return tuple(empty if g is None else g for g in grads)


@_backward_op.register_fake
def _(grad_output, input, weight, mean, var, count, eps, group, input_grad, weight_grad,
      bias_grad):
    c = input.shape[1]
    wdtype = input.dtype if weight is None else weight.dtype
    return (torch.empty_like(input) if input_grad else input.new_empty((0,)),
            input.new_empty((c,) if weight_grad else (0,), dtype=wdtype),
            input.new_empty((c,) if bias_grad else (0,), dtype=wdtype))


def _apply_setup_context(ctx, inputs, output):
    input, weight, bias, mean, var, count, eps, group = inputs
    ctx.save_for_backward(input, weight, bias, mean, var, count)
    ctx.eps, ctx.group = eps, group


def _apply_backward(ctx, grad_output):
    input, weight, bias, mean, var, count = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
        use_batch_stats = int(count) >= 0
        global_stats = _global_stats_of(ctx.group) if use_batch_stats else None
        if global_stats is not None:
            _refuse_double_backward(global_stats)
        grads = _twin_grads(grad_output, input, weight, bias, mean, torch.rsqrt(var + ctx.eps),
                            use_batch_stats, ctx.eps, needs)
    else:
        grads = torch.ops.cbn.batch_norm_backward(grad_output, input, weight, mean, var, count,
                                                  ctx.eps, ctx.group, *needs)
        grads = tuple(g if need else None for g, need in zip(grads, needs))
    return grads + (None,) * 5


_apply_op.register_autograd(_apply_backward, setup_context=_apply_setup_context)


def _captured_batch_norm(input, weight, bias, running_mean, running_var, counter,
                         use_batch_stats, momentum, eps, handle):
    """Batch norm as two registered operators (what graph capture records)."""
    mean, var, count = torch.ops.cbn.batch_norm_stats(input.detach(), running_mean, running_var,
                                                      counter, use_batch_stats, momentum, eps,
                                                      handle)
    return torch.ops.cbn.batch_norm_apply(input, weight, bias, mean, var, count, eps, handle)


# --------------------------------------------------------------------------- dispatch

def _portable(input):
    """True when the graph being captured must hold standard operators only.

    (The TorchScript ONNX exporter traces; the dynamo one exports.)
    """
    return (torch._C._get_tracing_state() is not None or torch.compiler.is_exporting()
            or isinstance(input, torch.fx.Proxy))


def _torch_semantics(input, weight, bias):
    """True under torch.func transforms or forward-mode AD: torch's own batch_norm decides."""
    if _functorch_active():
        return True
    if _forward_ad._current_level >= 0:
        return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None
                   for t in (input, weight, bias))
    return False


def _torch_batch_norm(input, weight, bias, running_mean, running_var, counter, use_batch_stats,
                      momentum, eps):
    """torch.nn.BatchNorm's forward (``_BatchNorm.forward``), on torch's operator."""
    factor = 0.0 if momentum is None else momentum
    if use_batch_stats and counter is not None:
        with torch.no_grad():
            counter.add_(1)
        if momentum is None:
            factor = 1.0 / float(counter)
    return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                          use_batch_stats, factor, eps)


def _captured(input, weight, bias, running_mean, running_var, counter, use_batch_stats,
              momentum, eps, group):
    """The graph of one batch norm for torch.compile, export, jit.trace and fx."""
    if not use_batch_stats and not torch.compiler.is_dynamo_compiling() \
            or not use_batch_stats and torch.compiler.is_exporting():
        # eval: exactly torch's batch norm with the running statistics (runs anywhere)
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                              False, 0.0, eps)
    handle = 0 if group is None else group.handle
    if torch.onnx.is_in_onnx_export():
        if handle and group.global_stats() is not None:
            raise RuntimeError("torch.onnx.export of a synchronising SyncBatchNorm in training "
                               "mode is not supported: export the model in eval mode")
        return _torch_batch_norm(input, weight, bias, running_mean, running_var, counter,
                                 use_batch_stats, momentum, eps)
    if handle and torch.jit.is_tracing() and group.global_stats() is None:
        handle = 0  # one process: the traced graph runs in any process
    return _captured_batch_norm(input, weight, bias, running_mean, running_var, counter,
                                use_batch_stats, momentum, eps, handle)


def _batch_norm(input, weight, bias, running_mean, running_var, counter, use_batch_stats,
                momentum, eps, group, num_features):
    """Batch norm through whichever of the three paths the caller's context needs.

    ``group`` is a _Group (or None: no synchronisation; eval never
    synchronises); the counter is a tensor (or None).
    """
    if torch.compiler.is_compiling() or _portable(input):
        return _captured(input, weight, bias, running_mean, running_var, counter,
                         use_batch_stats, momentum, eps, group if use_batch_stats else None)
    global_stats = group.global_stats() if use_batch_stats and group is not None else None
    if _torch_semantics(input, weight, bias):
        if global_stats is not None:
            exc = RuntimeError("cbn.torch.SyncBatchNorm: torch.func transforms and forward-mode "
                               "AD are not supported in a synchronising training step")
            global_stats.fail_forward(exc)
        return _torch_batch_norm(input, weight, bias, running_mean, running_var, counter,
                                 use_batch_stats, momentum, eps)
    if not isinstance(input, torch.Tensor):  # raises TypeError (on every rank)
        return _forward(input, weight, bias, running_mean, running_var, None,
                        use_batch_stats, momentum, eps, global_stats, num_features)[0]
    if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and
                                    weight.requires_grad) or (bias is not None and
                                                              bias.requires_grad)):
        return _apply(_APPLY_TRAIN, input, weight, bias, (
            running_mean, running_var, _numpy(counter), use_batch_stats, momentum, eps,
            global_stats, num_features))
    return _forward(input, weight, bias, running_mean, running_var, _numpy(counter),
                    use_batch_stats, momentum, eps, global_stats, num_features)[0]


def _per_channel(name, value, num_features):
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"batch_norm(): argument '{name}' must be a torch.Tensor or None, "
                        f"not {type(value).__name__}")
    if value.numel() != num_features:
        raise ChannelError(f"{name} should contain {num_features} elements not {value.numel()}")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on cbn's kernels (CPU tensors, one process).

    In training the batch statistics normalise and the running statistics,
    when given, are updated in place:
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance).
    Otherwise the running statistics normalise.  Differentiable (twice) in
    ``input``, ``weight`` and ``bias``.  The errors are torch's: ``TypeError``
    for a non-tensor argument, ``RuntimeError`` for a wrong size, ``ValueError``
    for ``eps``.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be a torch.Tensor, "
                        f"not {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    num_features = input.shape[1]
    for name, value in (("running_mean", running_mean), ("running_var", running_var),
                        ("weight", weight), ("bias", bias)):
        _per_channel(name, value, num_features)
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"batch_norm(): argument 'momentum' must be a float, "
                        f"not {type(momentum).__name__}")
    return _batch_norm(input, weight, bias, running_mean, running_var, None, bool(training),
                       float(momentum), eps, None, num_features)


class SyncBatchNorm(_TorchBatchNorm):
    r"""Batch norm whose training statistics span every rank of a process group.

    A CPU ``torch.nn.SyncBatchNorm``: same constructor, parameters, buffers
    and ``state_dict`` keys (a state dict moves between the two, and into
    ``torch.nn.BatchNorm1d/2d/3d``), for inputs ``(N, C, ...)`` of any rank
    >= 2, float32 or float64 (float16 and bfloat16 inputs, parameters and
    buffers are computed in float32 and kept in their dtype), contiguous or
    channels-last (the output keeps the memory format).

    In training, with ``f = momentum`` (``1 / num_batches_tracked`` when
    ``momentum is None``) and the global batch ``X`` (every rank's ``x``)::

        y = (x - mean(X)) / sqrt(var(X) + eps) * weight + bias
        running = (1 - f) * running + f * batch_statistic(X)   (unbiased variance)

    computed with one Allreduce forward and one backward; the input gradient
    is the local shard of the global one, the parameter gradients are local
    contributions whose sum over the ranks is the global gradient (as in
    PyTorch).  In eval mode nothing is communicated.  With one process it is
    ``torch.nn.BatchNorm*d``.

    Works under ``torch.compile`` (``fullgraph=True``), ``torch.export``,
    ``torch.onnx.export`` (eval: the standard ``BatchNormalization``),
    ``torch.jit.trace``/``script``, ``torch.fx`` and ``torch.func``; see
    ``docs/pytorch.md``.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        As ``torch.nn.SyncBatchNorm`` (``device`` must be the CPU).
    process_group : mpi4py communicator, optional
        The ranks that share statistics.  None: ``MPI.COMM_WORLD`` when
        mpi4py is installed, else a single process.
    timeout : float, optional
        Seconds a collective waits for the slowest rank before raising
        ``TimeoutError`` (default 300, or ``CBN_SYNC_TIMEOUT``).

    Every rank must call every layer the same number of times in training,
    forward and backward, in the same order, starting from the same running
    statistics.  Local batches may differ in size, including zero; a bad
    input on one rank raises on every rank.
    """

    __jit_unused_properties__ = ["_global"]

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True, timeout=None):
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"cbn.torch.SyncBatchNorm runs on the CPU, got device={device!r}")
        _comm.check_process_group(process_group)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.process_group = process_group
        self.timeout = timeout
        self._attach_group()

    def _attach_group(self):
        # The process group, resolved on the first synchronising forward, and
        # the handle by which the registered operator finds it.
        group = _Group(self.process_group, self.timeout, self.num_features)
        self._group_handle = _new_handle(group)
        group.handle = self._group_handle
        weakref.finalize(self, _GROUPS.pop, self._group_handle, None)

    @property
    def _global(self):
        """The resolved GlobalStats (False: one process; None: not resolved yet)."""
        return _GROUPS[self._group_handle].stats

    @_global.setter
    def _global(self, stats):
        _GROUPS[self._group_handle].stats = stats

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        # The tensors straight from the module's dicts: nn.Module.__getattr__
        # costs about a microsecond per name, on a path that must stay short.
        params, buffers = self._parameters, self._buffers
        weight, bias = params.get("weight"), params.get("bias")
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        training = self.training
        if not training and running_var is not None and not (
                torch.compiler.is_compiling() or _portable(input)
                or _torch_semantics(input, weight, bias)):
            return self._inference_forward(input, weight, bias, running_mean, running_var)
        if training:
            self.__dict__["_eval_cache"] = None  # training writes the buffers through NumPy
        # torch's _BatchNorm.forward, with the counter advanced inside the
        # function once the statistics (and every rank) succeeded.
        use_batch_stats = training or (running_mean is None and running_var is None)
        keep = not training or self.track_running_stats
        counter = buffers.get("num_batches_tracked") if training and self.track_running_stats \
            else None
        return _batch_norm(input, weight, bias, running_mean if keep else None,
                           running_var if keep else None, counter, use_batch_stats,
                           self.momentum, self.eps,
                           _GROUPS[self._group_handle] if training else None,
                           self.num_features)

    @torch.jit.unused
    def _inference_forward(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           mean: Tensor, var: Tensor) -> Tensor:
        # Eval, the latency path: the NumPy views of the parameters and the
        # float64 running statistics are kept between calls while the tensors
        # (and their version counters) stay the same.
        versions = (-1 if weight is None else weight._version,
                    -1 if bias is None else bias._version, mean._version, var._version,
                    self.eps)
        cache = self.__dict__.get("_eval_cache")
        if cache is None or cache[0] is not weight or cache[1] is not bias \
                or cache[2] is not mean or cache[3] is not var or cache[4] != versions:
            _check_eps(self.eps, False)
            cache = (weight, bias, mean, var, versions, _numpy_f32(weight), _numpy_f32(bias),
                     _numpy_f32(mean).astype(np.float64), _numpy_f32(var).astype(np.float64),
                     {})  # input dtype -> (center, scale, shift), as F.normalize computes them
            self.__dict__["_eval_cache"] = cache
        if not isinstance(input, torch.Tensor):
            _check_input(input, self.num_features)  # torch's TypeError, naming the input
        if torch.is_grad_enabled() and (input.requires_grad
                                        or weight is not None and weight.requires_grad
                                        or bias is not None and bias.requires_grad):
            return _apply(_APPLY_EVAL, input, weight, bias,
                          (cache[7], cache[8], cache[5], cache[6], self.eps, self.num_features))
        batch = _input_batch(input, self.num_features)
        coefficients = cache[9].get(batch.dtype)
        if coefficients is None:
            coefficients = cache[9][batch.dtype] = _layout.normalization_coefficients(
                cache[7], cache[8], cache[5], cache[6], self.eps, batch.dtype)[1:]
        center, scale, shift = coefficients
        y = _layout.scale_shift(batch, scale, shift, kernel_threads(), None, center)
        return _output(input, y)

    def _scripted_forward(self, input: Tensor) -> Tensor:
        # TorchScript: eval is torch's batch norm (portable); training runs the
        # registered operator (load cbn.torch before torch.jit.load to train).
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        keep = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        if not use_batch_stats:
            return torch.nn.functional.batch_norm(input, running_mean, running_var, self.weight,
                                                  self.bias, False, 0.0, self.eps)
        counter = self.num_batches_tracked if self.training and self.track_running_stats else None
        handle = self._group_handle if self.training else 0
        mean, var, count = torch.ops.cbn.batch_norm_stats(input.detach(), running_mean,
                                                          running_var, counter, True,
                                                          self.momentum, self.eps, handle)
        return torch.ops.cbn.batch_norm_apply(input, self.weight, self.bias, mean, var, count,
                                              self.eps, handle)

    def __getstate__(self):
        # The process group is resolved again after a copy or a pickle.
        state = self.__dict__.copy()
        state.pop("_group_handle", None)
        state.pop("_eval_cache", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._attach_group()

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Same as ``cbn.torch.convert_sync_batchnorm``."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: "torch.nn.Module",
                           process_group: Any = None) -> "torch.nn.Module":
    """``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` replaced.

    The new ``cbn.torch.SyncBatchNorm`` layers hold the very same parameters
    (so ``requires_grad`` and optimiser references carry over), buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``) and training
    mode.  Returns ``module`` itself, or the new layer when ``module`` is a
    batch-norm layer, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert_sync_batchnorm(): argument 'module' must be a "
                        f"torch.nn.Module, got {type(module).__name__}")
    output = module
    if isinstance(module, _TorchBatchNorm) and not isinstance(module, SyncBatchNorm):
        if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) \
                and module.has_uninitialized_params():
            raise ValueError(f"{type(module).__name__} is not initialised yet: run one "
                             f"forward pass before convert_sync_batchnorm")
        output = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group,
                               bias=module.bias is not None)
        if module.affine:
            output.weight = module.weight
            output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.training = module.training
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    for name, child in module.named_children():
        output.add_module(name, convert_sync_batchnorm(child, process_group))
    return output


def allreduce_gradients(model: "torch.nn.Module", comm: Any = None, average: bool = True,
                        timeout: Optional[float] = None) -> "torch.nn.Module":
    """Sum the parameter gradients of ``model`` over ``comm`` in one fused Allreduce.

    ``grad = sum_r grad_r / size`` (``average=True``, as DistributedDataParallel)
    or ``sum_r grad_r`` (``average=False``: the gradient of the sum of the
    ranks' losses, e.g. when each rank's loss is its share of the global
    batch's mean).  ``comm`` is an mpi4py communicator or a torch.distributed
    ProcessGroup (None: as ``SyncBatchNorm``'s process_group; a single process
    changes nothing).  Every rank must call it with the same model structure:
    a header-only collective checks that first (the number of parameters and
    values), then the gradients travel in one float64 buffer with the
    self-checking header of ``cbn.comm``; a parameter without a gradient
    counts as zeros, and stays without one when no rank has one.  An error on
    one rank raises on every rank.  Returns ``model``.
    """
    group = _comm.collective(comm, timeout)
    if group is None:
        return model
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    k = len(params)
    length = k + sum(sizes)
    error = None
    buf = group.buffer(length)
    has_grad, values = buf[_comm.HEADER:_comm.HEADER + k], buf[_comm.HEADER + k:]
    try:
        offset = 0
        for i, (p, n) in enumerate(zip(params, sizes)):
            if p.grad is not None:
                if p.grad.layout != torch.strided or p.grad.device.type != "cpu":
                    raise TypeError(f"allreduce_gradients handles dense CPU gradients, got "
                                    f"{p.grad.layout} on {p.grad.device}")
                has_grad[i] = 1
                values[offset:offset + n].reshape(p.shape)[...] = _numpy(p.grad)
            offset += n
    except Exception as exc:  # noqa: BLE001 - any error travels to every rank
        error = exc
    # Models may differ between ranks: agree on the layout (a header-only
    # collective) before buffers of possibly different lengths travel.
    group.check(_comm.GRADIENTS, length=length, tag=k, error=error,
                describe=f"{k} parameters with {sum(sizes)} values")
    total = group.sum(buf, _comm.GRADIENTS, tag=k)
    has_grad, values = total[:k], total[k:]
    if average:
        values /= group.size
    offset = 0
    for i, (p, n) in enumerate(zip(params, sizes)):
        if has_grad[i]:
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(torch.from_numpy(values[offset:offset + n].reshape(p.shape)))
        offset += n
    return model
