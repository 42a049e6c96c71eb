"""PyTorch-flavoured batch-norm layers: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``.

The base class holds the parameters, the running statistics and the modes;
the subclasses differ only in the input ranks they accept.  Semantics are
``torch.nn.BatchNorm*``'s: in training, with ``f = momentum`` (or
``1 / num_batches_tracked`` when ``momentum is None``)::

    running_mean = (1 - f) * running_mean + f * mean(x)
    running_var  = (1 - f) * running_var  + f * var_unbiased(x)
    y = (x - mean(x)) / sqrt(var_biased(x) + eps) * weight + bias

Validate, then change: a step checks its input, ``out``, the parameters and
statistics as currently assigned, ``eps`` and ``momentum`` before it writes
any state, and an error names the attribute.
"""
import math
import numbers
import threading
from typing import Any, Dict, Mapping, Optional

import numpy as np

from cbn import _layout
from cbn import functional as F
from cbn._config import kernel_threads

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_PARAMETER_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

_OVERWRITTEN = object()  # marks a forward whose input was overwritten by its output


def parse_dtype(dtype, name="dtype"):
    """A NumPy float16/32/64 dtype from a NumPy dtype, its name, or a torch/MindSpore dtype."""
    if dtype is None:
        return np.dtype(np.float32)
    text = None
    if type(dtype).__module__.startswith(("torch", "mindspore")):
        text = str(dtype).lower().rpartition(".")[2]  # torch.float16, Float16
    try:
        parsed = np.dtype(text or dtype)
    except TypeError:
        raise TypeError(f"{name} must be float16, float32 or float64, got {dtype!r}") from None
    if parsed not in _PARAMETER_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got {parsed}")
    return parsed


def check_device(device):
    """None, 'cpu' or a CPU ``torch.device``; anything else raises ValueError."""
    if device is None:
        return None
    text = str(device) if isinstance(device, str) or type(device).__module__.startswith(
        "torch") else None
    if text not in ("cpu", "cpu:0"):
        raise ValueError(f"device must be None or the CPU ('cpu'): cbn computes on the CPU "
                         f"only, got {device!r}")
    return "cpu"


def check_num_features(num_features):
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
            or num_features <= 0:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    return int(num_features)


def _state_value(layer_name, key, value, num_features):
    """A state-dict value checked for ``key``: an int count or a real (C,) array."""
    try:
        array = np.asarray(F.to_numpy(value, key))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{layer_name}: {key} must be an array of real numbers, got "
                        f"{type(value).__name__} ({exc})") from None
    if key == "num_batches_tracked":
        if array.shape not in ((), (1,)) or array.dtype.kind not in "iuf":
            raise ValueError(f"{layer_name}: num_batches_tracked must be an integer scalar, "
                             f"got shape {array.shape} and dtype {array.dtype}")
        count = array.reshape(()).item()
        if not (math.isfinite(count) and count >= 0 and count == int(count)):
            raise ValueError(f"{layer_name}: num_batches_tracked must be a finite count >= 0, "
                             f"got {count!r}")
        return int(count)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{layer_name}: {key} must hold real numbers, got dtype {array.dtype}")
    if array.shape != (num_features,):
        raise ValueError(f"{layer_name}: wrong shape for {key}: expected ({num_features},), "
                         f"got {array.shape}")
    return array


def _as_input_array(x, name="input"):
    """A non-ndarray input as an array: a CPU tensor through a view, else ``numpy.asarray``."""
    if F.is_tensor(x):
        return F.to_numpy(x, name)
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be an array of floating-point numbers, got "
                        f"{type(x).__name__} ({exc})") from None


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
    r"""Base of the PyTorch-flavoured layers: parameters, buffers, modes, forward and backward.

    In training, with :math:`f` = ``momentum`` (or ``1 / num_batches_tracked``
    when ``momentum`` is None),

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta,
        \qquad
        \hat\mu \leftarrow (1 - f)\,\hat\mu + f\,\mathrm{E}[x],
        \qquad
        \hat\sigma^2 \leftarrow (1 - f)\,\hat\sigma^2 + f\,\mathrm{Var}_{\text{unbiased}}[x]

    per channel over N and the spatial axes (the output uses the biased
    variance); in eval the running statistics :math:`\hat\mu, \hat\sigma^2`
    normalise and nothing is updated.  Without running statistics
    (``track_running_stats=False``) batch statistics are used in both modes.

    Parameters
    ----------
    num_features : int
        C, the number of channels (``input.shape[1]``).
    eps : float, default 1e-5
        Added to the variance; finite and > 0.
    momentum : float or None, default 0.1
        In [0, 1]; None means a cumulative moving average.
    affine : bool, default True
        Learnable ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    device : None, 'cpu' or a CPU ``torch.device``
        cbn computes on the CPU only; anything else raises ``ValueError``.
    dtype : dtype, default numpy.float32
        Of the parameters and statistics: float16, float32 or float64 (a NumPy
        dtype, its name, or a torch dtype such as ``torch.float64``).
    bias : bool, default True (keyword only)
        False: ``weight`` without ``bias``, as in torch.

    Attributes
    ----------
    weight, bias : ndarray (C,) or None
    running_mean, running_var : ndarray (C,) or None
    num_batches_tracked : int or None
    grad_weight, grad_bias : ndarray (C,) or None
        Written (not accumulated) by ``backward``.
    training : bool
        True after construction.

    Notes
    -----
    Inputs are NumPy arrays or anything ``numpy.asarray`` takes, and CPU torch
    tensors (read without copying through a detached view, so one that
    requires grad works; bfloat16 is computed in float32).  Outputs are NumPy
    arrays of the input's dtype (float32 for bfloat16, which NumPy lacks); for
    tensors end to end use ``cbn.torch``.
    """

    _ndims = None          # accepted input ranks (None: any rank >= 2)
    _shapes = "(N, C, ...)"  # the expected shapes, for error messages

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = np.float32, *, bias: bool = True) -> None:
        num_features = check_num_features(num_features)
        eps = F.check_eps(eps)
        momentum = F.check_momentum(momentum)
        check_device(device)
        dtype = parse_dtype(dtype)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dtype
        self.training = True
        self.weight = np.ones(num_features, dtype) if affine else None
        self.bias = np.zeros(num_features, dtype) if affine and bias else None
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

    @property
    def device(self) -> str:
        """Always ``'cpu'``."""
        return "cpu"

    # --- modes and state -------------------------------------------------

    def train(self, mode: bool = True) -> "_BatchNorm":
        """Set training mode (``mode=True``) or eval mode (``mode=False``).

        Parameters
        ----------
        mode : bool, default True

        Returns
        -------
        self
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")  # torch's
        self.training = bool(mode)
        return self

    def eval(self) -> "_BatchNorm":
        """Set eval mode: normalise with the running statistics, never update them.

        Returns
        -------
        self
        """
        return self.train(False)

    def reset_running_stats(self) -> None:
        """``running_mean`` to 0, ``running_var`` to 1, ``num_batches_tracked`` to 0 (in place)."""
        if self.track_running_stats:
            self._fresh_or_in_place("running_mean", 0)
            self._fresh_or_in_place("running_var", 1)
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """``reset_running_stats()``, then ``weight`` to 1 and ``bias`` to 0 (in place)."""
        self.reset_running_stats()
        if self.affine:
            self._fresh_or_in_place("weight", 1)
            if self.bias is not None:
                self._fresh_or_in_place("bias", 0)

    def _fresh_or_in_place(self, key, value):
        """Write ``value`` into the attribute ``key``, or replace it when it is not a valid (C,) array."""
        current = getattr(self, key)
        if (isinstance(current, np.ndarray) and current.shape == (self.num_features,)
                and current.dtype.kind == "f" and current.flags.writeable):
            current[...] = value
        else:
            setattr(self, key, np.full(self.num_features, value, self.dtype))

    def state_dict(self) -> Dict[str, Any]:
        """Copies of the parameters and buffers under PyTorch's keys.

        Returns
        -------
        dict
            ``weight``, ``bias``, ``running_mean``, ``running_var`` (ndarray
            copies) and ``num_batches_tracked`` (int); absent ones omitted.
            ``cbn.convert.to_torch_state_dict`` turns it into tensors for
            ``torch.nn.BatchNorm*.load_state_dict``.
        """
        state = {}
        for key in _STATE_KEYS:
            value = getattr(self, key)
            if value is not None:
                state[key] = value if key == "num_batches_tracked" else np.array(value)
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load PyTorch-keyed values: NumPy arrays, or a torch state dict's tensors.

        Every value is checked (real dtype, shape ``(C,)``, a finite count for
        ``num_batches_tracked``) before any is assigned: on error nothing changes.

        Parameters
        ----------
        state : mapping
            Keys among ``weight``, ``bias``, ``running_mean``, ``running_var``,
            ``num_batches_tracked`` (which may be absent, as in old checkpoints).
        strict : bool, default True
            Missing or unexpected keys raise ``ValueError`` naming them.

        Raises
        ------
        TypeError
            ``state`` is not a mapping; a value holds strings, objects or complex numbers.
        ValueError
            Missing/unexpected keys (strict), a wrong shape, a bad count.
        """
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict for {name}: state must be a mapping (a dict), "
                            f"got {type(state).__name__}")
        expected = [k for k in _STATE_KEYS if getattr(self, k) is not None]
        missing = [k for k in expected if k not in state and k != "num_batches_tracked"]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict for {name}: missing keys "
                             f"{missing}, unexpected keys {unexpected}")
        values = {key: _state_value(f"load_state_dict for {name}", key, state[key],
                                    self.num_features)
                  for key in expected if key in state}
        for key, value in values.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
                continue
            current = getattr(self, key)
            if (isinstance(current, np.ndarray) and current.shape == value.shape
                    and current.dtype.kind == "f" and current.flags.writeable):
                current[...] = value   # in place: arrays shared with other layers see it
            else:
                setattr(self, key, value.astype(self.dtype))

    # --- validation --------------------------------------------------------

    def _validate(self) -> None:
        """Check every attribute the next step of this mode uses; raise naming it.

        Called by ``_forward`` before any state changes, and by
        ``SyncBatchNorm.forward`` inside its collective error handling, so a
        bad attribute on one rank raises on every rank.  The fast checks are
        conservative; anything they doubt goes to ``_check_array``.
        """
        eps = self.eps
        if type(eps) is not float or not 0.0 < eps < math.inf:
            F.check_eps(eps, f"{type(self).__name__}.eps")
        shape = (self.num_features,)
        value = self.weight
        if value is not None and (type(value) is not np.ndarray or value.shape != shape
                                  or value.dtype not in _PARAMETER_DTYPES):
            self._check_array("weight", value, False)
        value = self.bias
        if value is not None and (type(value) is not np.ndarray or value.shape != shape
                                  or value.dtype not in _PARAMETER_DTYPES):
            self._check_array("bias", value, False)
        if not self.track_running_stats:
            return
        update = self.training
        value = self.running_mean
        if (type(value) is not np.ndarray or value.shape != shape
                or value.dtype not in _PARAMETER_DTYPES or (update and not value.flags.writeable)):
            self._check_array("running_mean", value, update)
        value = self.running_var
        if (type(value) is not np.ndarray or value.shape != shape
                or value.dtype not in _PARAMETER_DTYPES or (update and not value.flags.writeable)):
            self._check_array("running_var", value, update)
        if update:
            momentum = self.momentum
            if momentum is not None and (type(momentum) is not float
                                         or not 0.0 <= momentum <= 1.0):
                F.check_momentum(momentum, f"{type(self).__name__}.momentum")
            count = self.num_batches_tracked
            if type(count) is not int or count < 0:
                if isinstance(count, bool) or not isinstance(count, numbers.Integral):
                    raise TypeError(f"{type(self).__name__}.num_batches_tracked must be an "
                                    f"int, got {type(count).__name__} {count!r}")
                if count < 0:
                    raise ValueError(f"{type(self).__name__}.num_batches_tracked must be >= 0, "
                                     f"got {count}")

    def _check_array(self, key, value, written):
        """Raise naming ``key`` unless ``value`` is a usable (C,) float array (written: writable)."""
        if value is None and key in ("weight", "bias"):
            return
        if (isinstance(value, np.ndarray) and value.shape == (self.num_features,)
                and value.dtype.kind == "f" and (value.flags.writeable or not written)):
            return  # a subclass or a non-native byte order: fine
        self._bad_array(key, value, written)

    def _bad_array(self, key, value, written):
        name = f"{type(self).__name__}.{key}"
        if value is None:
            raise TypeError(f"{name} is None, but the layer uses it (affine="
                            f"{self.affine}, track_running_stats={self.track_running_stats})")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array of shape ({self.num_features},), "
                            f"got {type(value).__name__}")
        if value.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {value.dtype}")
        if value.shape != (self.num_features,):
            raise ValueError(f"{name} must have shape ({self.num_features},) (num_features), "
                             f"got shape {value.shape}")
        raise ValueError(f"{name} is read-only, but a training step updates it in place")

    # --- computation -----------------------------------------------------

    def _batch(self, x):
        if type(x) is not np.ndarray:
            x = _as_input_array(x)
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

    def __call__(self, x: Any, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Same as ``forward(x, out)``."""
        return self.forward(x, out)

    def forward(self, x: Any, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Normalise ``x``; in training, update the running statistics.

        Parameters
        ----------
        x : array_like or CPU torch.Tensor, shape (N, C, ...)
            Floating point; never written to (unless it is ``out``).
        out : ndarray, optional
            Of ``x``'s shape and dtype, written with the result (it may be ``x``;
            then ``backward`` raises, since its input is gone).

        Returns
        -------
        ndarray
            ``out``, or a new array of ``x``'s shape, dtype and memory layout.

        Raises
        ------
        ValueError
            Wrong rank or channel count; one value per channel in training;
            a bad ``out``, attribute shape, ``eps`` or ``momentum`` value.
        TypeError
            A non-floating input; an attribute of the wrong type.
            On error no state has changed.
        """
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
            self._validate()
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
        """The last output's memory for this call's output, when nobody holds it any more."""
        # a dict pop: one thread gets it
        return _layout.reusable(self.__dict__.pop("_spare", None), batch)

    def _eval_coefficients(self, dtype):
        """Per-channel (mean, invstd, scale, shift) from the running statistics, cached.

        The cache key holds the bytes of every array it depends on, so any
        change (assignment, an in-place write, load_state_dict, a training
        step) is seen at the next call: a stale cache is never used.
        """
        weight, bias = self.weight, self.bias
        try:
            key = (self.eps, dtype, self.running_mean.tobytes(), self.running_var.tobytes(),
                   None if weight is None else weight.tobytes(),
                   None if bias is None else bias.tobytes())
        except AttributeError:  # an attribute that is no array: say which
            key = None
        cached = self._eval_cache
        if cached is None or cached.key != key:
            self._validate()  # on a change only: the bytes in the key differ then
            cached = _EvalCoefficients(key, self.running_mean, self.running_var, weight,
                                       bias, self.eps, dtype)
            self._eval_cache = cached
        return cached

    def _save(self, batch, out, mean, invstd, batch_stats, count):
        if out is not None and np.may_share_memory(out, batch.data):
            self._saved = _OVERWRITTEN  # forward(x, out=x): the input backward needs is gone
        else:
            self._saved = F.Saved(batch, mean, invstd, self.weight, batch_stats, count)

    def backward(self, grad_output: Any, out: Optional[np.ndarray] = None) -> np.ndarray:
        r"""The gradient with respect to the input of the last ``forward``, in its mode.

        With batch statistics, per channel over the :math:`n` values,
        :math:`\hat x = (x - \mu)\,\sigma^{-1}` and :math:`g = \gamma\,\partial L/\partial y`:

        .. math:: \frac{\partial L}{\partial x} = \sigma^{-1}\Big(g - \overline{g}
                  - \hat x\,\overline{g\,\hat x}\Big);

        with running statistics :math:`\partial L/\partial x = \gamma\,\sigma^{-1}\,\partial L/\partial y`.
        Sets ``grad_weight`` :math:`= \sum \hat x\,\partial L/\partial y` and
        ``grad_bias`` :math:`= \sum \partial L/\partial y` (overwritten, not accumulated;
        None without ``affine``/``bias``).

        Parameters
        ----------
        grad_output : array_like or CPU torch.Tensor
            dL/dy, of the last input's shape.
        out : ndarray, optional
            Of the input's shape and dtype, written with dL/dx (it may overlap
            ``grad_output``: the result is staged then).

        Returns
        -------
        ndarray

        Raises
        ------
        RuntimeError
            No forward yet, or the last forward wrote over its input.
        ValueError, TypeError
            A gradient of the wrong shape or dtype, a bad ``out``.
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before any forward")
        if saved is _OVERWRITTEN:
            raise self._overwritten_error()
        if type(grad_output) is not np.ndarray and not isinstance(grad_output, _layout.Batch):
            grad_output = _as_input_array(grad_output, "grad_output")  # (SyncBatchNorm: a Batch)
        dx, grad_weight, grad_bias = F.backward(saved, grad_output, self._reduce_grad_sums(),
                                                out)
        if self.affine:
            self.grad_weight = None if saved.weight is None else grad_weight.astype(self.dtype)
            self.grad_bias = None if self.bias is None else grad_bias.astype(self.dtype)
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
        no_bias = ", bias=False" if self.affine and self.bias is None else ""
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}{no_bias})")


def _layer_doc(shapes, torch_name, example_shape):
    """A subclass's docstring: its shapes, then the base's (so ``help()`` shows it all)."""
    body = _BatchNorm.__doc__.split("\n", 1)[1]
    c = example_shape[1]
    return (f"Batch norm over {shapes} input, as ``{torch_name}``.\n{body}\n"
            f"    Examples\n    --------\n"
            f"    >>> layer = cbn.{torch_name.rpartition('.')[2]}({c})\n"
            f"    >>> x = np.random.rand{example_shape}.astype(np.float32)\n"
            f"    >>> y = layer(x)                   # training: batch statistics, running ones updated\n"
            f"    >>> dx = layer.backward(np.ones_like(y))   # sets grad_weight, grad_bias\n"
            f"    >>> y = layer.eval()(x)            # running statistics\n")


class BatchNorm1d(_BatchNorm):
    __doc__ = _layer_doc("(N, C) or (N, C, L)", "torch.nn.BatchNorm1d", (8, 4, 16))
    _ndims = (2, 3)
    _shapes = "2D (N, C) or 3D (N, C, L)"


class BatchNorm2d(_BatchNorm):
    __doc__ = _layer_doc("(N, C, H, W)", "torch.nn.BatchNorm2d", (8, 4, 5, 5))
    _ndims = (4,)
    _shapes = "4D (N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    __doc__ = _layer_doc("(N, C, D, H, W)", "torch.nn.BatchNorm3d", (8, 4, 3, 5, 5))
    _ndims = (5,)
    _shapes = "5D (N, C, D, H, W)"
