"""SyncBatchNorm: batch norm with the statistics of the global batch across MPI ranks.

In training, each rank reduces its shard to per-channel (count, shifted sum,
shifted sum of squares) in float64, and one ``Allreduce`` adds them over the
process group; the backward pass adds (sum dy, sum dy * (x - mean)) with one
more.  The shift is the running mean (or, without running statistics, the
last global batch mean): the same on every rank, so shifted sums add up, and
close to the data, so the variance keeps its accuracy.  With one process, or
in eval mode, it is plain batch norm, bit for bit.
"""
import types

import numpy as np

from cbn import _layout, comm as _comm
from cbn import functional as F
from cbn._config import kernel_threads
from cbn.batchnorm import _OVERWRITTEN, _BatchNorm

__all__ = ["SyncBatchNorm", "GlobalStats"]


class GlobalStats:
    """The collectives of one synchronised layer: statistics forward, gradient sums backward.

    Shared by ``cbn.SyncBatchNorm`` and ``cbn.torch.SyncBatchNorm``.  Each is
    one ``Allreduce`` of a float64 buffer that starts with the error slots of
    ``comm.Collective``: forward ``[count | sum(x - shift) | sum((x - shift)**2)]``,
    backward ``[sum(dy) | sum(dy * (x - mean))]``.  A rank whose input is bad
    joins the same collective with its error flagged (``fail_forward``,
    ``fail_backward``), so every rank raises and none waits.
    """

    def __init__(self, group, num_features):
        self.group = group                         # a comm.Collective
        self.num_features = num_features
        self.last_mean = np.zeros(num_features)    # the shift without running statistics

    def moments(self, batch, running_mean=None):
        """(count, s, q, shift) of the global batch, or (0, None, None, None) if it is empty.

        ``s`` and ``q`` are sums of ``x - shift`` and its square; the shift is
        ``running_mean`` (the same on every rank) or, without it, the mean of
        the last global batch.  Raises PyTorch's error on every rank when the
        global batch has one value per channel.
        """
        group, c = self.group, self.num_features
        shift = running_mean.astype(np.float64) if running_mean is not None else self.last_mean
        buf = group.buffer(1 + 2 * c)
        values = buf[group.size:]
        if batch.count:
            values[0] = batch.count
            values[1:1 + c], values[1 + c:] = _layout.moments(batch, shift, kernel_threads())
        values = group.sum(buf)
        count = int(round(values[0]))
        if count == 0:
            return 0, None, None, None
        F.check_count(count, batch.shape,
                      f" on this rank and {count} value(s) per channel over the process group")
        s, q = values[1:1 + c].copy(), values[1 + c:].copy()
        if running_mean is None:
            self.last_mean = shift + s / count
        return count, s, q, shift

    def reduce_grad_sums(self, sum_dy, sum_dy_xc):
        """The global (sum(dy), sum(dy * (x - mean))) from the local ones: one Allreduce."""
        group, c = self.group, self.num_features
        buf = group.buffer(2 * c)
        buf[group.size:group.size + c] = sum_dy
        buf[group.size + c:] = sum_dy_xc
        values = group.sum(buf)
        return values[:c].copy(), values[c:].copy()

    def fail_forward(self, error):
        """Join the forward collective with ``error`` flagged: raises it on every rank."""
        self.group.sum(self.group.buffer(1 + 2 * self.num_features), error=error)
        raise AssertionError("unreachable: the collective raises")  # pragma: no cover

    def fail_backward(self, error):
        """Join the backward collective with ``error`` flagged: raises it on every rank."""
        self.group.sum(self.group.buffer(2 * self.num_features), error=error)
        raise AssertionError("unreachable: the collective raises")  # pragma: no cover


class SyncBatchNorm(_BatchNorm):
    """Batch norm over (N, C, ...) input whose statistics span every rank of ``process_group``.

    ``mean = sum_r sum(x_r) / sum_r n_r`` (likewise the variance), then
    ``running = (1 - momentum) * running + momentum * batch`` on every rank.

    Parameters are those of ``cbn.BatchNorm2d`` plus ``process_group`` (an
    mpi4py communicator; None: ``MPI.COMM_WORLD`` when mpi4py is installed,
    else a single process) and ``timeout`` (seconds a collective waits for the
    slowest rank before raising ``TimeoutError``; default 300, or the
    ``CBN_SYNC_TIMEOUT`` environment variable).

    Every rank must call every SyncBatchNorm layer the same number of times
    in training (forward, and backward if any rank calls it), in the same
    order, and start with the same running statistics.  Ranks may hold
    different batch sizes, including zero.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=np.float32,
                 *, bias=True, timeout=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.process_group = process_group
        self.timeout = timeout
        self._global = None       # GlobalStats, or False for a single process
        self._synced = False      # did the last forward synchronise?

    # --- the process group -----------------------------------------------

    def _global_stats(self):
        """The GlobalStats of this layer's process group, or None for a single process."""
        if self._global is None:
            group = _comm.collective(self.process_group, self.timeout)
            self._global = False if group is None else GlobalStats(group, self.num_features)
        return self._global or None

    def _syncs(self):
        return self.training and self._global_stats() is not None

    # --- forward ---------------------------------------------------------

    def forward(self, x, out=None):
        if not self._syncs():
            self._synced = False
            return super().forward(x, out)
        try:
            batch = self._batch(x)
            if out is not None:
                _layout.check_out(batch, out)
            self._validate()  # the attributes as assigned, before any rank changes state
        except (TypeError, ValueError) as exc:
            self._global_stats().fail_forward(exc)
        self._synced = True
        return self._forward(batch, out)

    def _batch_moments(self, batch):
        if not self._synced:
            return super()._batch_moments(batch)
        return self._global_stats().moments(
            batch, self.running_mean if self.track_running_stats else None)

    # --- backward --------------------------------------------------------

    def backward(self, grad_output, out=None):
        saved = self._saved
        if self._synced and saved is _OVERWRITTEN:
            self._global_stats().fail_backward(self._overwritten_error())
        if not (self._synced and isinstance(saved, F.Saved) and saved.batch_stats):
            return super().backward(grad_output, out)
        try:
            dy = _layout.like(saved.x, grad_output)
            if out is not None:
                _layout.check_out(saved.x, out)
        except (TypeError, ValueError) as exc:
            self._global_stats().fail_backward(exc)
        return super().backward(dy, out)

    def _reduce_grad_sums(self):
        return self._global_stats().reduce_grad_sums if self._synced else None

    # --- conversion ------------------------------------------------------

    @classmethod
    def convert_sync_batchnorm(cls, obj, process_group=None):
        """``obj`` with every BatchNorm1d/2d/3d replaced by an equivalent SyncBatchNorm.

        ``obj`` may be a layer, or a list, tuple, dict or object whose
        attributes hold layers (walked recursively).  Parameters and running
        statistics are shared with the replaced layer, as PyTorch does.
        """
        return _convert(obj, cls, process_group, {})

    def __repr__(self):
        return super().__repr__()[:-1] + f", process_group={self.process_group!r})"


# Objects whose attributes are never searched for layers.
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.MethodType, np.ndarray)


def _convert(obj, cls, process_group, seen):
    if isinstance(obj, _BatchNorm) and not isinstance(obj, SyncBatchNorm):
        layer = cls(obj.num_features, obj.eps, obj.momentum, obj.affine,
                    obj.track_running_stats, process_group, dtype=obj.dtype,
                    bias=obj.bias is not None or not obj.affine)
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                    "training"):
            setattr(layer, key, getattr(obj, key))
        return layer
    if id(obj) in seen:
        return seen[id(obj)]
    seen[id(obj)] = obj
    if isinstance(obj, list):
        obj[:] = [_convert(item, cls, process_group, seen) for item in obj]
    elif isinstance(obj, tuple):
        converted = tuple(_convert(item, cls, process_group, seen) for item in obj)
        obj = type(obj)(*converted) if hasattr(obj, "_fields") else converted
        seen[id(obj)] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _convert(value, cls, process_group, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, _OPAQUE):
        for key, value in vars(obj).items():
            new = _convert(value, cls, process_group, seen)
            if new is not value:
                setattr(obj, key, new)
    return obj
