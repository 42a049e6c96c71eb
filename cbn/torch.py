"""PyTorch models on CPU clusters: ``SyncBatchNorm`` over MPI as a ``torch.nn.Module``.

``torch.nn.SyncBatchNorm`` refuses CPU tensors.  ``cbn.torch.SyncBatchNorm``
takes its place on the CPU: the same constructor, parameters, buffers and
``state_dict`` keys; forward and backward on cbn's kernels through one
``torch.autograd.Function``; and in training one Allreduce forward and one
backward over an mpi4py communicator, with ``cbn.SyncBatchNorm``'s protocol
(``cbn.sync_batchnorm.GlobalStats``: error flags, uneven and empty local
batches, a timeout instead of a hang).

Tensors and arrays share memory: ``tensor.numpy()`` goes in, ``torch.from_numpy``
comes out, and channels-last memory stays channels-last.

``convert_sync_batchnorm`` swaps the layer into a model; ``allreduce_gradients``
sums or averages the parameter gradients over MPI in one fused Allreduce, so
that data-parallel training needs no second distributed engine.

Importing this module imports torch; ``import cbn`` does not.
"""
import numpy as np
import torch
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from cbn import _layout, comm as _comm
from cbn import functional as F
from cbn.sync_batchnorm import GlobalStats

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "allreduce_gradients", "batch_norm"]


def _numpy(tensor):
    """The ndarray sharing ``tensor``'s memory (None stays None)."""
    return None if tensor is None else tensor.detach().numpy()


def _input_batch(input, num_features):
    """Validate a CPU tensor and return its Batch, a view of its memory where possible."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(input).__name__}")
    if input.device.type != "cpu":
        raise ValueError(f"cbn.torch runs on CPU tensors, got a tensor on {input.device}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    return _layout.as_batch(_numpy(input), num_features, None, "(N, C, ...)")


class _BatchNormFunction(torch.autograd.Function):
    """(input, weight, bias) -> output of batch norm, on cbn's functional core.

    ``batch`` is the validated NumPy view of ``input``.  With batch statistics
    and running statistics given (training), the running statistics and the
    counter (NumPy views of the module's buffers) are updated in place once the
    statistics are known, as ``torch.nn.functional.batch_norm`` does.
    ``global_stats`` (a GlobalStats, or None) makes the statistics and the
    gradient sums those of the global batch.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, batch, running_mean, running_var, counter,
                use_batch_stats, momentum, eps, global_stats):
        weight_np, bias_np = _numpy(weight), _numpy(bias)
        update = use_batch_stats and running_mean is not None
        if use_batch_stats:
            if global_stats is None:
                count, s, q, shift = F.batch_moments(batch)
            else:
                count, s, q, shift = global_stats.moments(batch, running_mean)
            if count == 0:  # an empty (global) batch: empty output, statistics untouched
                if update and counter is not None:
                    counter += 1  # torch counts it all the same
                zeros = np.zeros(batch.shape[1])
                state = F.Saved(batch, zeros, zeros, weight_np, False, 0)
                return _BatchNormFunction._keep(ctx, input, weight, bias, state, None,
                                                _layout.empty_like(batch))
            mean, var = F.mean_var(count, s, q, shift)
        else:
            count = batch.count
            mean = running_mean.astype(np.float64)
            var = running_var.astype(np.float64)
        if update:
            factor = momentum
            if counter is not None:
                counter += 1
                if momentum is None:  # cumulative moving average
                    factor = 1.0 / int(counter)
            F.update_running(running_mean, running_var, mean, var, count, factor)
        y, invstd = F.normalize(batch, mean, var, weight_np, bias_np, eps)
        state = F.Saved(batch, mean, invstd, weight_np, use_batch_stats, count)
        return _BatchNormFunction._keep(ctx, input, weight, bias, state,
                                        global_stats if use_batch_stats else None, y)

    @staticmethod
    def _keep(ctx, input, weight, bias, state, global_stats, output):
        """Record what backward needs; return the output Batch as a tensor."""
        ctx.state, ctx.global_stats = state, global_stats
        ctx.dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
        ctx.save_for_backward(input)  # autograd then refuses an input modified in place
        return torch.from_numpy(_layout.finish(output))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        ctx.saved_tensors  # noqa: B018 -- raises if the input changed since forward
        state, global_stats = ctx.state, ctx.global_stats
        try:
            dy = _layout.like(state.x, _numpy(grad_output))
        except (TypeError, ValueError) as exc:
            if global_stats is not None:
                global_stats.fail_backward(exc)
            raise
        reduce = None if global_stats is None else global_stats.reduce_grad_sums
        dx, grad_weight, grad_bias = F.backward(state, dy, reduce)
        needs = ctx.needs_input_grad
        dx = torch.from_numpy(dx) if needs[0] else None
        dw = torch.from_numpy(grad_weight).to(ctx.dtypes[0]) if needs[1] else None
        db = torch.from_numpy(grad_bias).to(ctx.dtypes[1]) if needs[2] else None
        return (dx, dw, db) + (None,) * 8


def _batch_norm(input, weight, bias, running_mean, running_var, counter, use_batch_stats,
                momentum, eps, global_stats, num_features):
    if isinstance(input, torch.Tensor) and input.dtype == torch.bfloat16:
        # NumPy has no bfloat16: compute in float32, hand back bfloat16 (autograd follows).
        return _batch_norm(input.float(), weight, bias, running_mean, running_var, counter,
                           use_batch_stats, momentum, eps, global_stats,
                           num_features).to(torch.bfloat16)
    try:
        batch = _input_batch(input, num_features)
    except (TypeError, ValueError) as exc:
        if global_stats is not None:  # the other ranks are waiting in the collective
            global_stats.fail_forward(exc)
        raise
    return _BatchNormFunction.apply(input, weight, bias, batch, _numpy(running_mean),
                                    _numpy(running_var), _numpy(counter), use_batch_stats,
                                    momentum, eps, global_stats)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on cbn's kernels (CPU tensors, one process).

    In training the batch statistics normalise and the running statistics,
    when given, are updated in place:
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance).
    Otherwise the running statistics normalise.  Differentiable in ``input``,
    ``weight`` and ``bias``.
    """
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training is False")
    if momentum is None:
        raise ValueError("momentum must be a number in batch_norm")
    num_features = input.shape[1] if input.dim() >= 2 else None
    for name, value in (("running_mean", running_mean), ("running_var", running_var),
                        ("weight", weight), ("bias", bias)):
        if value is not None and tuple(value.shape) != (num_features,):
            raise ValueError(f"{name} must have shape ({num_features},), "
                             f"got {tuple(value.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return _batch_norm(input, weight, bias, running_mean, running_var, None, bool(training),
                       momentum, eps, None, num_features)


class SyncBatchNorm(_TorchBatchNorm):
    r"""Batch norm whose training statistics span every rank of an MPI process group.

    A CPU ``torch.nn.SyncBatchNorm``: same constructor, parameters, buffers
    and ``state_dict`` keys (a state dict moves between the two, and into
    ``torch.nn.BatchNorm1d/2d/3d``), for inputs ``(N, C, ...)`` of any rank
    >= 2, float32 or float64 (float16 and bfloat16 are computed in float32),
    contiguous or channels-last (the output keeps the memory format).

    In training, with ``f = momentum`` (``1 / num_batches_tracked`` when
    ``momentum is None``) and the global batch ``X`` (every rank's ``x``)::

        y = (x - mean(X)) / sqrt(var(X) + eps) * weight + bias
        running = (1 - f) * running + f * batch_statistic(X)   (unbiased variance)

    computed with one Allreduce forward and one backward; the input gradient
    is the local shard of the global one, the parameter gradients are local
    contributions whose sum over the ranks is the global gradient (as in
    PyTorch).  In eval mode nothing is communicated.  With one process it is
    ``torch.nn.BatchNorm*d``.

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
        self._global = None  # GlobalStats on first synchronising forward; False: one process

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _global_stats(self):
        """The GlobalStats of the process group, or None for a single process."""
        if self._global is None:
            group = _comm.collective(self.process_group, self.timeout)
            self._global = False if group is None else GlobalStats(group, self.num_features)
        return self._global or None

    def forward(self, input):
        # torch's _BatchNorm.forward, with the counter advanced inside the
        # function once the statistics (and every rank) succeeded.
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        keep = not self.training or self.track_running_stats
        counter = self.num_batches_tracked if self.training and self.track_running_stats else None
        return _batch_norm(input, self.weight, self.bias,
                           self.running_mean if keep else None,
                           self.running_var if keep else None, counter, use_batch_stats,
                           self.momentum, self.eps,
                           self._global_stats() if self.training else None, self.num_features)

    def __getstate__(self):
        # The communicator handle is rebuilt on first use (copies, pickles).
        state = self.__dict__.copy()
        state["_global"] = None
        return state

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Same as ``cbn.torch.convert_sync_batchnorm``."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module, process_group=None):
    """``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` replaced.

    The new ``cbn.torch.SyncBatchNorm`` layers hold the very same parameters
    (so ``requires_grad`` and optimiser references carry over), buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``) and training
    mode.  Returns ``module`` itself, or the new layer when ``module`` is a
    batch-norm layer, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.
    """
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


def allreduce_gradients(model, comm=None, average=True, timeout=None):
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
