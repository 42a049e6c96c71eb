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
from typing import Any, Optional

import numpy as np

from cbn import _layout, comm as _comm
from cbn import functional as F
from cbn._config import kernel_threads
from cbn.batchnorm import _OVERWRITTEN, _BatchNorm

__all__ = ["SyncBatchNorm", "GlobalStats"]


class GlobalStats:
    """The collectives of one synchronised layer: statistics forward, gradient sums backward.

    Shared by ``cbn.SyncBatchNorm`` and ``cbn.torch.SyncBatchNorm``.  Each is
    one Allreduce of a float64 buffer that starts with the self-checking
    header of ``comm.Collective``: forward ``[count | sum(x - shift) |
    sum((x - shift)**2)]``, backward ``[sum(dy) | sum(dy * (x - mean)) | 0]``
    (the same length, so that a rank one call out of step is named, not
    mixed in).  The layer's first collective is a header-only handshake that
    checks ``num_features`` on every rank.  A rank whose input is bad joins
    the same collective with its error flagged (``fail_forward``,
    ``fail_backward``), so every rank raises and none waits.

    ``dtype``: the layer's dtype, checked across ranks (None: the dtype of
    each forward's input).
    """

    def __init__(self, group, num_features, dtype=None):
        self.group = group                         # a comm.Collective
        self.num_features = num_features
        self.dtype = dtype
        self._dtype = dtype                        # checked in this layer's collectives
        self._length = 1 + 2 * num_features        # payload of both collectives
        self._shaken = False                       # did the handshake succeed?
        self._describe = f"num_features={num_features}"
        self.last_mean = np.zeros(num_features)    # the shift without running statistics

    def _handshake(self, kind, error=None):
        """Before the first payload: every rank's num_features agree (else raise everywhere)."""
        if not self._shaken:
            self.group.check(_comm.HANDSHAKE, length=self._length, tag=self.num_features,
                             error=error, describe=f"num_features={self.num_features} "
                             f"({_comm.KIND_NAMES[kind]})")
            self._shaken = True

    def moments(self, batch, running_mean=None):
        """(count, s, q, shift) of the global batch, or (0, None, None, None) if it is empty.

        ``s`` and ``q`` are sums of ``x - shift`` and its square; the shift is
        ``running_mean`` (the same on every rank) or, without it, the mean of
        the last global batch.  Raises PyTorch's error on every rank when the
        global batch has one value per channel.
        """
        self._handshake(_comm.FORWARD)
        group, c = self.group, self.num_features
        if self.dtype is None:
            self._dtype = getattr(batch, "result_dtype", batch.dtype)
        try:
            shift = np.asarray(running_mean if running_mean is not None else self.last_mean,
                               dtype=np.float64)
            if shift.shape != (c,):
                raise ValueError(f"running_mean must have shape ({c},), got {shift.shape}")
            buf = group.buffer(self._length)
            values = buf[_comm.HEADER:]
            if batch.count:
                values[0] = batch.count
                values[1:1 + c], values[1 + c:] = _layout.moments(batch, shift, kernel_threads())
        except Exception as exc:  # noqa: BLE001 - the others are entering the collective
            self._fail(_comm.FORWARD, exc)
        values = group.sum(buf, _comm.FORWARD, tag=c, dtype=self._dtype,
                           describe=self._describe)
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
        self._handshake(_comm.BACKWARD)
        group, c = self.group, self.num_features
        buf = group.buffer(self._length)
        values = buf[_comm.HEADER:]
        try:
            values[:c] = sum_dy
            values[c:2 * c] = sum_dy_xc
        except Exception as exc:  # noqa: BLE001 - the others are entering the collective
            self._fail(_comm.BACKWARD, exc)
        values = group.sum(buf, _comm.BACKWARD, tag=c, dtype=self._dtype,
                           describe=self._describe)
        return values[:c].copy(), values[c:2 * c].copy()

    def fail_forward(self, error):
        """Join the forward collective with ``error`` flagged: raises it on every rank."""
        self._fail(_comm.FORWARD, error)

    def fail_backward(self, error):
        """Join the backward collective with ``error`` flagged: raises it on every rank."""
        self._fail(_comm.BACKWARD, error)

    def _fail(self, kind, error):
        self._handshake(kind, error)  # the first call's error travels in the handshake
        self.group.sum(self.group.buffer(self._length), kind, tag=self.num_features,
                       dtype=self._dtype, error=error)
        raise AssertionError("unreachable: the collective raises")  # pragma: no cover


class SyncBatchNorm(_BatchNorm):
    """Batch norm over (N, C, ...) input whose statistics span every rank of ``process_group``.

    ``mean = sum_r sum(x_r) / sum_r n_r`` (likewise the variance), then
    ``running = (1 - momentum) * running + momentum * batch`` on every rank.

    Parameters are those of ``cbn.BatchNorm2d`` plus ``process_group`` (an
    mpi4py communicator or a torch.distributed ProcessGroup; None:
    torch.distributed's WORLD when initialised, else ``MPI.COMM_WORLD`` when
    mpi4py is installed, else a single process; ``"local"``
    (``cbn.comm.LOCAL``): this process alone, on purpose) and ``timeout``
    (seconds a collective waits for the slowest rank before raising
    ``TimeoutError``; default 300, or the ``CBN_SYNC_TIMEOUT`` environment
    variable).  When the launcher says this process is one of several but
    the group resolved has one process, the first training forward raises.

    Every rank must call every SyncBatchNorm layer the same number of times
    in training (forward, and backward if any rank calls it), in the same
    order, and start with the same running statistics.  Ranks may hold
    different batch sizes, including zero.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, device: Any = None, dtype: Any = np.float32,
                 *, bias: bool = True, timeout: Optional[float] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        if timeout is not None:
            _comm.check_timeout(timeout)
        self.process_group = _comm.check_process_group(process_group)
        self.timeout = timeout
        self._global = None       # GlobalStats, or False for a single process
        self._synced = False      # did the last forward synchronise?
        self._joined = False      # did this step's collective start (errors after it stay local)?

    # --- the process group -----------------------------------------------

    def _global_stats(self):
        """The GlobalStats of this layer's process group, or None for a single process."""
        if self._global is None:
            group = _comm.collective(self.process_group, self.timeout)
            self._global = False if group is None else \
                GlobalStats(group, self.num_features, dtype=self.dtype)
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
        except Exception as exc:  # noqa: BLE001 - any error travels to every rank
            self._global_stats().fail_forward(exc)
        self._synced = True
        self._joined = False
        try:
            return self._forward(batch, out)
        except Exception as exc:  # noqa: BLE001
            if not self._joined:  # failed before the collective: the others are waiting in it
                self._global_stats().fail_forward(exc)
            raise

    def _batch_moments(self, batch):
        if not self._synced:
            return super()._batch_moments(batch)
        self._joined = True
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
        except Exception as exc:  # noqa: BLE001 - any error travels to every rank
            self._global_stats().fail_backward(exc)
        self._joined = False
        try:
            return super().backward(dy, out)
        except Exception as exc:  # noqa: BLE001
            if not self._joined:  # failed before the collective: the others are waiting in it
                self._global_stats().fail_backward(exc)
            raise

    def _reduce_grad_sums(self):
        if not self._synced:
            return None
        reduce = self._global_stats().reduce_grad_sums

        def joined(sum_dy, sum_dy_xc):
            self._joined = True
            return reduce(sum_dy, sum_dy_xc)
        return joined

    # --- conversion ------------------------------------------------------

    @classmethod
    def convert_sync_batchnorm(cls, obj, process_group=None):
        """``obj`` with every BatchNorm1d/2d/3d replaced by an equivalent SyncBatchNorm.

        ``obj`` may be a layer, or a list, tuple, dict or object whose
        attributes hold layers (walked recursively).  Parameters and running
        statistics are shared with the replaced layer, as PyTorch does.
        """
        return _convert(obj, cls, process_group, {})

    def __getstate__(self):
        state = super().__getstate__()
        state["_global"] = None  # the communicator handle is rebuilt on first use
        return state

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
