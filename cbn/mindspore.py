"""MindSpore-flavoured batch-norm layers: ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``.

A thin facade over the PyTorch-flavoured layers (``cbn.batchnorm``, and
``cbn.sync_batchnorm`` for ``SyncBatchNorm``): each layer wraps one of them
and converts MindSpore's conventions at the boundary, so the statistics, the
normalisation, the gradients and the MPI communication are the same code.

=========================  =======================================================
MindSpore                  PyTorch-flavoured layer inside
=========================  =======================================================
``momentum``               ``momentum = 1 - momentum`` (``cbn.convert``)
``use_batch_statistics``   ``training = use_batch_statistics`` (None: the
                           ``training`` flag); running statistics always tracked
``affine=False``           ``affine=True``, but gamma and beta get no gradients
``gamma``, ``beta``,       ``weight``, ``bias``, ``running_mean``,
``moving_mean``,           ``running_var``
``moving_variance``
``data_format='NHWC'``     ``np.moveaxis(x, -1, 1)``: a channels-last view, no copy
=========================  =======================================================

Where MindSpore 2.10 silently misbehaves these layers follow PyTorch instead:
a batch with one value per channel raises ``ValueError`` when batch
statistics are used (MindSpore outputs zeros and a NaN moving variance), and
an empty batch returns an empty output and leaves the moving statistics alone
(MindSpore corrupts them).  ``data_format='NHWC'`` works on the CPU here;
MindSpore supports it only on GPU.
"""
import numbers
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from cbn import batchnorm as _torch_layers, comm as _comm, functional as _functional
from cbn.convert import momentum_mindspore_to_torch, momentum_torch_to_mindspore
from cbn.sync_batchnorm import SyncBatchNorm as _TorchSyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]

# MindSpore's named initialisers, for a vector of C values.  'normal' and
# 'uniform' are MindSpore's Normal(sigma=0.01) and Uniform(scale=0.07), drawn
# from NumPy's global generator (``np.random.seed`` plays ``mindspore.set_seed``).
_INITIALISERS = {
    "ones": np.ones,
    "zeros": np.zeros,
    "normal": lambda c: np.random.normal(0.0, 0.01, c),
    "uniform": lambda c: np.random.uniform(-0.07, 0.07, c),
}

# MindSpore's parameter names (in MindSpore's order) and the wrapped layer's.
_NAMES = {"moving_mean": "running_mean", "moving_variance": "running_var",
          "gamma": "weight", "beta": "bias"}
_FORMATS = ("NCHW", "NHWC")


def _real_vector(name, value, num_features):
    """``value`` as an array of shape (num_features,) of real numbers, or ValueError."""
    try:
        array = np.asarray(_functional.to_numpy(value, name))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be an array of {num_features} real numbers, got "
                         f"{type(value).__name__} ({exc})") from None
    if array.shape != (num_features,):
        raise ValueError(f"{name} must have shape ({num_features},), got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _initial_values(name, init, num_features):
    """The (num_features,) values of MindSpore initialiser ``init`` for parameter ``name``."""
    if isinstance(init, str):
        make = _INITIALISERS.get(init.lower())
        if make is None:
            raise ValueError(f"{name}: unknown initialiser {init!r}; expected one of "
                             f"{', '.join(map(repr, _INITIALISERS))}, a number or an array "
                             f"of shape ({num_features},)")
        return make(num_features)
    if isinstance(init, numbers.Real) and not isinstance(init, bool):
        return np.full(num_features, float(init))
    return _real_vector(name, init, num_features)


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
    return float(eps)


def _check_use_batch_statistics(value):
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"use_batch_statistics must be None, True or False, got {value!r}")
    return None if value is None else bool(value)


class _BatchNorm:
    """Base of the MindSpore-flavoured layers.

    In a step that uses batch statistics (``use_batch_statistics``, or the
    ``training`` flag when that is None)::

        moving = momentum * moving + (1 - momentum) * batch   (variance: unbiased)
        y = (x - mean(x)) / sqrt(var_biased(x) + eps) * gamma + beta

    otherwise ``y = (x - moving_mean) / sqrt(moving_variance + eps) * gamma + beta``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance; must lie in (0, 1].
    momentum : float, default 0.9
        Weight of the old moving statistics, in [0, 1] (PyTorch's is ``1 - momentum``).
    affine : bool, default True
        Whether gamma and beta are trained.  False keeps them fixed (no
        gradients) but still applies them, as MindSpore does.
    gamma_init, beta_init, moving_mean_init, moving_var_init : str, number or array
        ``'ones'``, ``'zeros'``, ``'normal'`` (N(0, 0.01)), ``'uniform'``
        (U(-0.07, 0.07)), a number, or an array of shape (C,).
    use_batch_statistics : None, True or False
        None: batch statistics (and moving-average updates) when training,
        moving statistics otherwise.  True: always batch statistics and updates,
        even when not training.  False: always moving statistics, never updated.
    data_format : {'NCHW', 'NHWC'}
        'NHWC': channels come last in the input and output.
    dtype : dtype, default float32
        dtype of the parameters, as MindSpore's ``dtype=mstype.float32``:
        float16 or float32 (float64 too), given as a NumPy dtype, its name, or
        ``mindspore.float16``/``mindspore.float32``.  Inputs of any floating
        dtype are accepted; float16 is computed in float32.

    Attributes
    ----------
    gamma, beta, moving_mean, moving_variance : ndarray (C,)
    grad_gamma, grad_beta : ndarray (C,) or None
        Written by ``backward``; None when ``affine`` is False.
    training : bool
        False after construction: call ``set_train()`` to train.
    """

    _torch_class = None  # the PyTorch-flavoured layer wrapped
    _nhwc_shapes = None  # the expected NHWC shapes, for error messages

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9,
                 affine: bool = True, gamma_init: Any = "ones", beta_init: Any = "zeros",
                 moving_mean_init: Any = "zeros", moving_var_init: Any = "ones",
                 use_batch_statistics: Optional[bool] = None, data_format: str = "NCHW",
                 dtype: Any = np.float32) -> None:
        eps = _check_eps(eps)
        torch_momentum = momentum_mindspore_to_torch(momentum)
        use_batch_statistics = _check_use_batch_statistics(use_batch_statistics)
        if data_format not in _FORMATS:
            raise ValueError(f"data_format must be 'NCHW' or 'NHWC', got {data_format!r}")
        self._bn = self._make_core(num_features, eps, torch_momentum, dtype)
        inits = (("moving_mean", "moving_mean_init", moving_mean_init),
                 ("moving_variance", "moving_var_init", moving_var_init),
                 ("gamma", "gamma_init", gamma_init), ("beta", "beta_init", beta_init))
        for name, init_name, init in inits:
            self._array(name)[...] = _initial_values(init_name, init, self.num_features)
        self._momentum = float(momentum)
        self._use_batch_statistics = use_batch_statistics
        self._data_format = data_format
        self.affine = bool(affine)
        self.training = False
        self.grad_gamma = None
        self.grad_beta = None
        self._input_shape = None  # shape of the last forward's input, for backward

    def _make_core(self, num_features, eps, momentum, dtype):
        """The wrapped layer: gamma and beta always applied, statistics always tracked."""
        return self._torch_class(num_features, eps, momentum, affine=True,
                                 track_running_stats=True, dtype=dtype)

    # --- hyper-parameters, converted at the boundary -----------------------

    @property
    def num_features(self) -> int:
        """C, the number of channels."""
        return self._bn.num_features

    @property
    def dtype(self) -> np.dtype:
        """The parameters' dtype."""
        return self._bn.dtype

    @property
    def data_format(self) -> str:
        """'NCHW' or 'NHWC'."""
        return self._data_format

    @property
    def eps(self) -> float:
        """Added to the variance, in (0, 1]; checked when assigned (ValueError)."""
        return self._bn.eps

    @eps.setter
    def eps(self, value):
        self._bn.eps = _check_eps(value)

    @property
    def momentum(self) -> float:
        """MindSpore's momentum in [0, 1] (the old statistics' weight); checked when assigned."""
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        self._bn.momentum = momentum_mindspore_to_torch(value)
        self._momentum = float(value)

    @property
    def use_batch_statistics(self) -> Optional[bool]:
        """None, True or False (see the class docstring); checked when assigned."""
        return self._use_batch_statistics

    @use_batch_statistics.setter
    def use_batch_statistics(self, value):
        self._use_batch_statistics = _check_use_batch_statistics(value)

    def _uses_batch_statistics(self):
        if self._use_batch_statistics is None:
            return self.training
        return self._use_batch_statistics

    # --- parameters under MindSpore's names --------------------------------

    def _array(self, name):
        return getattr(self._bn, _NAMES[name])

    def _set_array(self, name, value):
        self._array(name)[...] = _real_vector(name, value, self.num_features)

    gamma = property(lambda self: self._array("gamma"),
                     lambda self, value: self._set_array("gamma", value),
                     doc="The live (C,) scale array; assigning copies checked values into it.")
    beta = property(lambda self: self._array("beta"),
                    lambda self, value: self._set_array("beta", value),
                    doc="The live (C,) shift array; assigning copies checked values into it.")
    moving_mean = property(lambda self: self._array("moving_mean"),
                           lambda self, value: self._set_array("moving_mean", value),
                           doc="The live (C,) moving mean; assigning copies checked values.")
    moving_variance = property(lambda self: self._array("moving_variance"),
                               lambda self, value: self._set_array("moving_variance", value),
                               doc="The live (C,) moving variance; assigning copies checked "
                                   "values.")

    #: Prefix of the parameter names in MindSpore's checkpoints ("bn2d." for BatchNorm3d,
    #: which wraps a BatchNorm2d named bn2d).
    _param_prefix = ""

    def parameters_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters under MindSpore's names (MindSpore's order).

        Returns
        -------
        dict
            ``moving_mean``, ``moving_variance``, ``gamma``, ``beta`` -- for
            ``BatchNorm3d`` ``bn2d.moving_mean``, ... as in MindSpore's checkpoints.
        """
        prefix = self._param_prefix
        return {prefix + name: self._array(name).copy() for name in _NAMES}

    def load_parameters(self, params: Mapping[str, Any],
                        strict: bool = True) -> Tuple[List[str], List[str]]:
        """Load MindSpore-named arrays (a ``parameters_dict()`` or a checkpoint's).

        ``BatchNorm3d`` takes MindSpore's real names (``bn2d.gamma``, ...) or
        the short ones (``gamma``, ...).  Every value is checked (real numbers,
        shape (C,)) before any is assigned: nothing is loaded on error.

        Parameters
        ----------
        params : mapping
            Name -> array (or CPU tensor).
        strict : bool, default True
            A missing or unexpected key raises ``ValueError`` naming it.

        Returns
        -------
        (missing, unexpected) : lists of keys

        Raises
        ------
        TypeError
            ``params`` is not a mapping.
        ValueError
            Missing/unexpected keys (strict), a key given twice (long and
            short name), a wrong shape or a non-real dtype.
        """
        layer = type(self).__name__
        if not isinstance(params, Mapping):
            raise TypeError(f"load_parameters for {layer}: params must be a mapping (a dict), "
                            f"got {type(params).__name__}")
        prefix = self._param_prefix
        keys = {}  # MindSpore name -> key of params holding it
        for name in _NAMES:
            given = [key for key in dict.fromkeys((prefix + name, name)) if key in params]
            if len(given) > 1:
                raise ValueError(f"load_parameters for {layer}: {given[0]!r} and {given[1]!r} "
                                 f"both given (the same parameter)")
            if given:
                keys[name] = given[0]
        missing = [prefix + name for name in _NAMES if name not in keys]
        used = set(keys.values())
        unexpected = [key for key in params if key not in used]
        if strict and (missing or unexpected):
            raise ValueError(f"load_parameters for {layer}: missing keys "
                             f"{missing}, unexpected keys {unexpected}")
        values = {name: _real_vector(key, params[key], self.num_features)
                  for name, key in keys.items()}
        for name, value in values.items():
            self._array(name)[...] = value
        return missing, unexpected

    # --- modes ---------------------------------------------------------------

    def set_train(self, mode: bool = True) -> "_BatchNorm":
        """Training mode on (or off with ``mode=False``).

        Parameters
        ----------
        mode : bool, default True

        Returns
        -------
        self

        Raises
        ------
        TypeError
            ``mode`` is not a bool.
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"set_train: mode must be True or False, got {mode!r}")
        self.training = bool(mode)
        return self

    # --- computation -----------------------------------------------------------

    def _channels_first(self, x):
        """``x`` as the wrapped layer's (N, C, ...) input: NHWC moves its axis, as a view."""
        if self._data_format == "NCHW":
            return x
        if type(x) is not np.ndarray:
            x = _torch_layers._as_input_array(x)
        if x.ndim not in self._torch_class._ndims:
            raise ValueError(f"expected {self._nhwc_shapes} input (data_format='NHWC'), "
                             f"got a {x.ndim}D input of shape {x.shape}")
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (input.shape[-1], "
                             f"data_format='NHWC'), got {x.shape[-1]} in an input of "
                             f"shape {x.shape}")
        return np.moveaxis(x, -1, 1)

    def _channels_as_given(self, y):
        return y if self._data_format == "NCHW" else np.moveaxis(y, 1, -1)

    def __call__(self, x: Any) -> np.ndarray:
        """Same as ``construct(x)``."""
        return self.construct(x)

    def construct(self, x: Any) -> np.ndarray:
        """The normalised ``x``; moving statistics updated when batch statistics are used.

        Parameters
        ----------
        x : array_like or CPU torch.Tensor
            (N, C, ...) or, with ``data_format='NHWC'``, channels last.

        Returns
        -------
        ndarray
            Of ``x``'s shape and dtype (float32 for a bfloat16 tensor).

        Raises
        ------
        ValueError, TypeError
            A wrong rank, channel count or dtype; one value per channel with
            batch statistics.  On error no state has changed.
        """
        if type(x) is not np.ndarray:
            x = _torch_layers._as_input_array(x)
        shape = x.shape
        self._bn.training = self._uses_batch_statistics()
        y = self._bn(self._channels_first(x))
        self._input_shape = shape
        return self._channels_as_given(y)

    def backward(self, dy: Any) -> np.ndarray:
        """dL/dx for the last forward; sets ``grad_gamma``, ``grad_beta`` (None without affine).

        Parameters
        ----------
        dy : array_like or CPU torch.Tensor
            dL/dy, of the last input's shape (and layout).

        Returns
        -------
        ndarray

        Raises
        ------
        RuntimeError
            No forward yet.
        ValueError, TypeError
            ``dy`` of the wrong shape or dtype.
        """
        if type(dy) is not np.ndarray:
            dy = _torch_layers._as_input_array(dy, "dy")
        if self._data_format == "NHWC":
            # Checked here, in the caller's shapes; NCHW errors come from the wrapped
            # layer, which SyncBatchNorm needs to raise them on every rank.
            if self._input_shape is None:
                raise RuntimeError(f"{type(self).__name__}.backward called before any forward")
            if dy.shape != self._input_shape:
                raise ValueError(f"dy must have the shape of the last input {self._input_shape},"
                                 f" got {dy.shape}")
        dx = self._bn.backward(self._channels_first(dy))
        if self.affine:
            self.grad_gamma, self.grad_beta = self._bn.grad_weight, self._bn.grad_bias
        return self._channels_as_given(dx)

    def __repr__(self):
        return (f"{type(self).__name__}<num_features={self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"use_batch_statistics={self.use_batch_statistics}, {self._repr_extra()}>")

    def _repr_extra(self):
        return f"data_format={self.data_format}"


class _LocalBatchNorm(_BatchNorm):
    """A MindSpore-flavoured layer of one process, convertible to and from a ``cbn.BatchNorm*``."""

    # --- the PyTorch-flavoured layer with the same behaviour ------------------

    @classmethod
    def from_torch(cls, layer: Any, **kwargs: Any) -> "_LocalBatchNorm":
        """The MindSpore-flavoured layer that computes what ``layer`` (a ``cbn.BatchNorm*``) does.

        Parameters and statistics are copied; ``momentum`` becomes ``1 - momentum``;
        ``training`` carries over.  A layer without running statistics becomes
        ``use_batch_statistics=True`` (always batch statistics; the moving
        statistics it gains are updated but never used).  ``momentum=None`` has
        no MindSpore equivalent and raises ``ValueError``.  ``kwargs`` go to the
        constructor (``data_format='NHWC'``, say).
        """
        if not isinstance(layer, cls._torch_class):
            raise TypeError(f"{cls.__name__}.from_torch expects a cbn.{cls._torch_class.__name__},"
                            f" got {type(layer).__name__}")
        ms = cls(layer.num_features, eps=layer.eps,
                 momentum=momentum_torch_to_mindspore(layer.momentum), affine=layer.affine,
                 use_batch_statistics=None if layer.track_running_stats else True,
                 dtype=layer.dtype, **kwargs)
        # Keep PyTorch's factor as given: 1 - (1 - m) may differ from m in the last bit.
        ms._bn.momentum = layer.momentum
        ms.load_parameters(_parameters_of(layer), strict=False)
        ms._bn.num_batches_tracked = layer.num_batches_tracked or 0
        return ms.set_train(layer.training)

    def to_torch(self) -> Any:
        """The ``cbn.BatchNorm*`` that computes what this layer does now.

        ``momentum`` becomes ``1 - momentum``.  The modes map as they stand:
        a layer using batch statistics becomes a training layer, one using the
        moving statistics an eval layer.  ``affine=False`` maps to
        ``affine=False`` when gamma and beta are ones and zeros, else to
        ``affine=True`` carrying them (PyTorch cannot apply fixed values).
        """
        gamma, beta = self.gamma, self.beta
        affine = self.affine or not (np.all(gamma == 1) and np.all(beta == 0))
        layer = self._torch_class(self.num_features, self.eps, self._bn.momentum,
                                  affine=affine, dtype=self.dtype)
        state = {"running_mean": self.moving_mean, "running_var": self.moving_variance,
                 "num_batches_tracked": self._bn.num_batches_tracked}
        if affine:
            state.update(weight=gamma, bias=beta)
        layer.load_state_dict(state)
        return layer.train(self._uses_batch_statistics())


def _parameters_of(layer):
    """A ``cbn.BatchNorm*``'s parameters and statistics under MindSpore's names, if present."""
    return {name: getattr(layer, torch_name).copy() for name, torch_name in _NAMES.items()
            if getattr(layer, torch_name) is not None}


class BatchNorm1d(_LocalBatchNorm):
    """Batch norm over (N, C) or (N, C, L) input, as ``mindspore.nn.BatchNorm1d``.

    With ``data_format='NHWC'`` the input is (N, C) or (N, L, C).  See
    ``cbn.mindspore._BatchNorm`` for the parameters; in a training step
    ``moving = momentum * moving + (1 - momentum) * batch``.
    """
    _torch_class = _torch_layers.BatchNorm1d
    _nhwc_shapes = "2D (N, C) or 3D (N, L, C)"


class BatchNorm2d(_LocalBatchNorm):
    """Batch norm over (N, C, H, W) input, as ``mindspore.nn.BatchNorm2d``.

    With ``data_format='NHWC'`` the input is (N, H, W, C).  See
    ``cbn.mindspore._BatchNorm`` for the parameters; in a training step
    ``moving = momentum * moving + (1 - momentum) * batch``.
    """
    _torch_class = _torch_layers.BatchNorm2d
    _nhwc_shapes = "4D (N, H, W, C)"


class BatchNorm3d(_LocalBatchNorm):
    """Batch norm over (N, C, D, H, W) input, as ``mindspore.nn.BatchNorm3d`` (no ``data_format``).

    See ``cbn.mindspore._BatchNorm`` for the parameters; in a training step
    ``moving = momentum * moving + (1 - momentum) * batch``.

    MindSpore's BatchNorm3d wraps a BatchNorm2d named ``bn2d``, so its
    checkpoints name the parameters ``bn2d.gamma``, ``bn2d.beta``,
    ``bn2d.moving_mean``, ``bn2d.moving_variance``: ``parameters_dict()``
    returns those names and ``load_parameters`` takes them (or the short ones).
    """
    _torch_class = _torch_layers.BatchNorm3d
    _param_prefix = "bn2d."

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9,
                 affine: bool = True, gamma_init: Any = "ones", beta_init: Any = "zeros",
                 moving_mean_init: Any = "zeros", moving_var_init: Any = "ones",
                 use_batch_statistics: Optional[bool] = None, dtype: Any = np.float32) -> None:
        super().__init__(num_features, eps, momentum, affine, gamma_init, beta_init,
                         moving_mean_init, moving_var_init, use_batch_statistics,
                         "NCHW", dtype)


class _SyncCore(_TorchSyncBatchNorm):
    """``cbn.SyncBatchNorm`` taking the inputs of MindSpore's SyncBatchNorm only."""
    _ndims = (2, 4)
    _shapes = "2D (N, C) or 4D (N, C, H, W)"


class SyncBatchNorm(_BatchNorm):
    """Batch norm over (N, C) or (N, C, H, W) input whose statistics span a process group.

    As ``mindspore.nn.SyncBatchNorm``, on ``cbn.SyncBatchNorm`` (MPI) instead of
    Ascend: in a step that uses batch statistics, mean and variance are those of
    the union of the group's shards, and on every rank
    ``moving = momentum * moving + (1 - momentum) * batch``.

    Parameters are those of ``BatchNorm2d`` (see ``cbn.mindspore._BatchNorm``)
    without ``data_format``, plus:

    process_groups : list of lists of int, optional
        World ranks that partition ``MPI.COMM_WORLD``; each group synchronises
        on its own.  None: the whole world (a single process without mpi4py).
        With groups, construction is collective over the world: every rank
        builds the layer, with the same groups.
    timeout : float, optional
        Seconds a collective waits for the slowest rank (see ``cbn.SyncBatchNorm``).

    Every rank of a group must call the layer the same number of times while
    it uses batch statistics (forward, and backward if any rank calls it).
    ``backward`` returns the local shard of the input gradient; ``grad_gamma``
    and ``grad_beta`` are the local contributions, whose sum over the group is
    the gradient of the group's batch.  There is no ``from_torch``/``to_torch``:
    move parameters with ``parameters_dict`` and ``cbn.convert``.
    """
    _torch_class = _SyncCore

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9,
                 affine: bool = True, gamma_init: Any = "ones", beta_init: Any = "zeros",
                 moving_mean_init: Any = "zeros", moving_var_init: Any = "ones",
                 use_batch_statistics: Optional[bool] = None,
                 process_groups: Optional[List[List[int]]] = None, dtype: Any = np.float32,
                 timeout: Optional[float] = None) -> None:
        self.process_groups = process_groups
        self._timeout = timeout
        super().__init__(num_features, eps, momentum, affine, gamma_init, beta_init,
                         moving_mean_init, moving_var_init, use_batch_statistics,
                         "NCHW", dtype)

    def _make_core(self, num_features, eps, momentum, dtype):
        group = None if self.process_groups is None else _comm.split_world(self.process_groups)
        return _SyncCore(num_features, eps, momentum, affine=True, track_running_stats=True,
                         process_group=group, dtype=dtype, timeout=self._timeout)

    def _repr_extra(self):
        return f"process_groups={self.process_groups}"
