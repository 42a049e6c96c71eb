"""PyTorch-flavoured batch-norm layers: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``.

The base class holds the parameters, the running statistics and the modes;
the subclasses differ only in the input ranks they accept.  Semantics are
``torch.nn.BatchNorm*``'s: in training, with ``f = momentum`` (or
``1 / num_batches_tracked`` when ``momentum is None``)::

    running_mean = (1 - f) * running_mean + f * mean(x)
    running_var  = (1 - f) * running_var  + f * var_unbiased(x)
    y = (x - mean(x)) / sqrt(var_biased(x) + eps) * weight + bias
"""
import sys
import threading

import numpy as np

from cbn import _layout
from cbn import functional as F
from cbn._config import kernel_threads

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


_OVERWRITTEN = object()  # marks a forward whose input was overwritten by its output


class _EvalCoefficients:
    """Eval-mode constants of a layer: y = (x - center) * scale + shift; mean and invstd for backward."""

    __slots__ = ("key", "mean", "invstd", "center", "scale", "shift")

    def __init__(self, key, running_mean, running_var, weight, bias, eps, dtype):
        self.key = key
        self.mean = running_mean.astype(np.float64)
        # y = (x - center) * scale + shift, exact at any offset of the data.
        self.invstd, self.center, self.scale, self.shift = _layout.normalization_coefficients(
            self.mean, running_var, weight, bias, eps, dtype)


class _BatchNorm:
    """Base of the PyTorch-flavoured layers: parameters, buffers, modes, forward and backward."""

    _ndims = None          # accepted input ranks (None: any rank >= 2)
    _shapes = "(N, C, ...)"  # the expected shapes, for error messages

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features <= 0:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dtype
        self.training = True
        self.weight = np.ones(num_features, dtype) if affine else None
        self.bias = np.zeros(num_features, dtype) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features, dtype)
            self.running_var = np.ones(num_features, dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None          # what the last forward keeps for backward
        self._eval_cache = None     # eval-mode coefficients, see _eval_coefficients
        self._lock = threading.Lock()  # guards running-statistics updates across threads

    # --- modes and state -------------------------------------------------

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys."""
        state = {}
        for key in _STATE_KEYS:
            value = getattr(self, key)
            if value is not None:
                state[key] = value if key == "num_batches_tracked" else value.copy()
        return state

    def load_state_dict(self, state, strict=True):
        """Load PyTorch-keyed arrays (a torch state dict's tensors work too)."""
        expected = [k for k in _STATE_KEYS if getattr(self, k) is not None]
        missing = [k for k in expected if k not in state and k != "num_batches_tracked"]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict for {type(self).__name__}: missing keys "
                             f"{missing}, unexpected keys {unexpected}")
        arrays = {}
        for key in expected:
            if key not in state:
                continue
            value = np.asarray(state[key])
            if key == "num_batches_tracked":
                if value.shape != () or value.dtype.kind not in "iu":
                    raise ValueError(f"num_batches_tracked must be an integer scalar, "
                                     f"got shape {value.shape} and dtype {value.dtype}")
                arrays[key] = int(value)
            elif value.shape != (self.num_features,):
                raise ValueError(f"wrong shape for {key}: expected ({self.num_features},), "
                                 f"got {value.shape}")
            else:
                arrays[key] = value
        for key, value in arrays.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value

    # --- computation -----------------------------------------------------

    def _batch(self, x):
        return _layout.as_batch(x, self.num_features, self._ndims, self._shapes)

    def _factor(self):
        """The blend factor of this training step (num_batches_tracked already counted)."""
        if self.momentum is None:
            return 1.0 / self.num_batches_tracked
        return self.momentum

    def _batch_moments(self, batch):
        """(count, s, q, shift) of the batch (count 0: empty); SyncBatchNorm makes them global."""
        return F.batch_moments(batch)

    def _reduce_grad_sums(self):
        """None, or a function turning local gradient sums into global ones."""
        return None

    def __call__(self, x, out=None):
        return self.forward(x, out)

    def forward(self, x, out=None):
        """Normalise ``x`` (N, C, ...); ``out``: an array to write the result into."""
        return self._forward(self._batch(x), out)

    def _forward(self, batch, out=None):
        if out is not None:
            target = _layout.check_out(batch, out)
        elif batch.data.nbytes >= self.RECYCLE_BYTES:
            target = self._recycled_output(batch)
        else:
            target = None
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            update = self.training and self.track_running_stats
            count, s, q, shift = self._batch_moments(batch)
            if count == 0:
                # Nothing to normalise with: torch still counts the batch.
                if update:
                    with self._lock:
                        self.num_batches_tracked += 1
                zeros = np.zeros(self.num_features)
                self._save(batch, out, zeros, zeros, False, 0)
                return _layout.deliver(_layout.empty_like(batch), out)
            mean, var = F.mean_var(count, s, q, shift)
            if update:
                with self._lock:
                    self.num_batches_tracked += 1
                    F.update_running(self.running_mean, self.running_var, mean, var, count,
                                     self._factor())
            y, invstd = F.normalize(batch, mean, var, self.weight, self.bias, self.eps, target)
        else:
            cached = self._eval_coefficients(batch.dtype)
            y = _layout.scale_shift(batch, cached.scale, cached.shift, kernel_threads(), target,
                                    cached.center)
            mean, invstd, count = cached.mean, cached.invstd, batch.count
        self._save(batch, out, mean, invstd, use_batch_stats, count)
        result = _layout.deliver(y, out)  # a reference of the caller's before y is offered
        if out is None and y.data.nbytes >= self.RECYCLE_BYTES:
            self._spare = y
        return result

    #: Outputs of at least this many bytes are recycled once the caller has
    #: dropped them (see ``_recycled_output``); set to ``float('inf')`` to never.
    RECYCLE_BYTES = 1 << 20

    def _recycled_output(self, batch):
        """The last output's memory for this call's output, when nobody holds it any more.

        Fresh memory for a large output costs a page fault per page on every
        call, because the allocator returns large blocks to the system.  Once
        the caller has dropped the previous output (no reference, no view
        left), writing the new one into it is invisible to anyone.
        """
        spare = self.__dict__.pop("_spare", None)   # a dict pop: one thread gets it
        if (spare is None or spare.shape != batch.shape or spare.dtype != batch.dtype
                or spare.channels_last != batch.channels_last):
            return None
        # Nobody else may hold the array we returned, nor the array owning its
        # memory (every NumPy view refers to the owner).  Count the references
        # that are ours: the Batch's two arrays, the local name, getrefcount's.
        for array in {id(a): a for a in (spare.data, spare.data.base) if a is not None}.values():
            ours = 2 + sum(array is a for a in (spare.data, spare.data.base,
                                                 spare.view, spare.view.base))
            if sys.getrefcount(array) != ours:
                return None
        return spare

    def _eval_coefficients(self, dtype):
        """Per-channel (mean, invstd, scale, shift) from the running statistics, cached.

        The cache key holds the bytes of every array it depends on, so any
        change (assignment, an in-place write, load_state_dict, a training
        step) is seen at the next call: a stale cache is never used.
        """
        weight, bias = self.weight, self.bias
        key = (self.eps, dtype, self.running_mean.tobytes(), self.running_var.tobytes(),
               None if weight is None else weight.tobytes(),
               None if bias is None else bias.tobytes())
        cached = self._eval_cache
        if cached is None or cached.key != key:
            cached = _EvalCoefficients(key, self.running_mean, self.running_var, weight,
                                       bias, self.eps, dtype)
            self._eval_cache = cached
        return cached

    def _save(self, batch, out, mean, invstd, batch_stats, count):
        if out is not None and np.may_share_memory(out, batch.data):
            self._saved = _OVERWRITTEN  # forward(x, out=x): the input backward needs is gone
        else:
            self._saved = F.Saved(batch, mean, invstd, self.weight, batch_stats, count)

    def backward(self, grad_output, out=None):
        """dL/dx for the last forward; sets ``grad_weight`` and ``grad_bias``.

        ``out``: an array of the input's shape and dtype to write dL/dx into.
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before any forward")
        if saved is _OVERWRITTEN:
            raise self._overwritten_error()
        dx, grad_weight, grad_bias = F.backward(saved, grad_output, self._reduce_grad_sums(),
                                                out)
        if self.affine:
            self.grad_weight = grad_weight.astype(self.dtype)
            self.grad_bias = grad_bias.astype(self.dtype)
        return dx

    def _overwritten_error(self):
        return RuntimeError(f"{type(self).__name__}.backward: the last forward wrote its "
                            f"output over its input (out=x), which backward needs")

    # Locks and caches do not travel with copies or pickles.
    _TRANSIENT = ("_lock", "_eval_cache", "_saved", "_spare")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._eval_cache = None
        self._saved = None

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats})")


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``."""
    _ndims = (2, 3)
    _shapes = "2D (N, C) or 3D (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input, as ``torch.nn.BatchNorm2d``."""
    _ndims = (4,)
    _shapes = "4D (N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``."""
    _ndims = (5,)
    _shapes = "5D (N, C, D, H, W)"
