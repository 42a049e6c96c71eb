"""The benchmark cases: what is timed, and the NumPy twin each is compared with.

A case is one row of the table per thread count.  ``case.build(rng, torch)``
returns a ``Prepared``: one callable per implementation (``"cbn"``,
``"torch"``, ``"numpy"``; ``None`` when that implementation is unavailable or
does not apply) and the bytes one call moves under the byte model.  The three
callables of a case read the same input memory, so they see the same data in
the same layout; each returns its main result (``y``, or ``dx`` for the
forward+backward cases) so the runner can check that they agree.

Byte model (N elements of b bytes; the minimum traffic of a streaming
implementation, the same for every implementation):

    train forward  3 N b   read x for the statistics, read x again, write y
    eval forward   2 N b   read x, write y
    fwd + bwd      8 N b   the forward's 3, then read dy twice, read x, write dx

How the implementations are called:

* cbn: ``layer(x)``; forward+backward ``layer(x); layer.backward(dy)``.
* torch: the same ``torch.nn.BatchNorm*`` module on ``torch.from_numpy`` views
  of the same memory (channels-last input is a ``permute`` of an NHWC buffer,
  which torch recognises as ``torch.channels_last``).  Forward-only cases turn
  off the parameters' gradients, so torch builds no autograd graph (its
  fastest forward); forward+backward uses autograd (``y.backward(dy)``), with
  gradients reset to None before each call so nothing accumulates.
* numpy: the textbook formulas with ``mean``/``var``/``sum`` over the
  non-channel axes, single-threaded.

Adding rows (e.g. SyncBatchNorm): append a ``BatchNormCase`` to ``CASES``, or
write another class with the same attributes (``key``, ``title``, ``mode``,
``latency``, ``threads``) and a ``build(rng, torch)`` method returning a
``Prepared``; the runner, the table, the JSON and the chart need no change.
"""
import numpy as np

import cbn

# Bytes moved per element (in units of the item size) under the byte model.
BYTES_PER_ELEMENT = {"train": 3, "eval": 2, "train+bwd": 8}

EPS = 1e-5


class Prepared:
    """A case made ready to time: its callables, the bytes one call moves, a reference.

    ``reference()`` (optional, untimed) returns the expected result in float64,
    against which the runner checks every implementation once.
    """

    def __init__(self, calls, bytes_moved, reference=None):
        self.calls = calls              # {"cbn": f, "torch": f or None, "numpy": f or None}
        self.bytes_moved = bytes_moved  # under the byte model, per call
        self.reference = reference


class BatchNormCase:
    """One BatchNorm1d/2d/3d configuration, timed for cbn, PyTorch and NumPy.

    Parameters
    ----------
    key : str
        Short identifier, used by ``--cases`` and by the targets.
    title : str
        The row label in the table.
    shape : tuple
        Logical (N, C, ...) shape of the input.
    mode : {"train", "eval", "train+bwd"}
        Training forward, evaluation forward, or training forward + backward.
    channels_last : bool
        Input (and gradient) stored channels-last (NHWC / NDHWC memory).
    dtype : str
        "float32" or "float64".
    latency : bool
        A small-input row about per-call overhead: left out of the chart,
        where bytes per second mean little.
    threads : tuple or None
        Thread counts this case runs at (None: every count asked for).
    """

    def __init__(self, key, title, shape, mode, channels_last=False, dtype="float32",
                 latency=False, threads=None):
        if mode not in BYTES_PER_ELEMENT:
            raise ValueError(f"unknown mode {mode!r}")
        self.key = key
        self.title = title
        self.shape = tuple(shape)
        self.mode = mode
        self.channels_last = channels_last
        self.dtype = np.dtype(dtype)
        self.latency = latency
        self.threads = threads

    @property
    def num_features(self):
        return self.shape[1]

    @property
    def reduce_axes(self):
        """The axes the statistics run over: all but the channel axis."""
        return (0,) + tuple(range(2, len(self.shape)))

    def bytes_moved(self):
        return BYTES_PER_ELEMENT[self.mode] * int(np.prod(self.shape)) * self.dtype.itemsize

    def _array(self, rng):
        """A random input of the case's shape, dtype and memory layout."""
        if not self.channels_last:
            return rng.standard_normal(self.shape, dtype=self.dtype) * 2 + 0.5
        # Store (N, spatial..., C) contiguously and view it as (N, C, spatial...).
        stored = (self.shape[0],) + self.shape[2:] + (self.shape[1],)
        a = rng.standard_normal(stored, dtype=self.dtype) * 2 + 0.5
        return np.moveaxis(a, -1, 1)

    def build(self, rng, torch=None):
        """The callables of this case; ``torch`` is the module, or None."""
        c = self.num_features
        x = self._array(rng)
        dy = self._array(rng) if self.mode == "train+bwd" else None
        weight = (1 + 0.1 * rng.standard_normal(c)).astype(self.dtype)
        bias = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        running_mean = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        running_var = (1 + 0.1 * rng.random(c)).astype(self.dtype)
        params = (weight, bias, running_mean, running_var)
        calls = {
            "cbn": self._cbn_call(x, dy, params),
            "torch": self._torch_call(torch, x, dy, params) if torch is not None else None,
            "numpy": self._numpy_call(x, dy, params),
        }

        def reference():
            as64 = (lambda a: None if a is None else a.astype(np.float64))
            return self._numpy_call(as64(x), as64(dy), [as64(p) for p in params])()
        return Prepared(calls, self.bytes_moved(), reference)

    # --- cbn ----------------------------------------------------------------

    def _cbn_call(self, x, dy, params):
        layer_class = {2: cbn.BatchNorm1d, 3: cbn.BatchNorm1d,
                       4: cbn.BatchNorm2d, 5: cbn.BatchNorm3d}[len(self.shape)]
        layer = layer_class(self.num_features, eps=EPS, dtype=self.dtype)
        for array, value in zip((layer.weight, layer.bias, layer.running_mean,
                                 layer.running_var), params):
            array[...] = value
        if self.mode == "eval":
            layer.eval()
        if self.mode == "train+bwd":
            def call():
                layer(x)
                return layer.backward(dy)
            return call
        return lambda: layer(x)

    # --- PyTorch --------------------------------------------------------------

    def _torch_call(self, torch, x, dy, params):
        module_class = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                        4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(self.shape)]
        module = module_class(self.num_features, eps=EPS,
                              dtype=getattr(torch, self.dtype.name))
        with torch.no_grad():
            for tensor, value in zip((module.weight, module.bias, module.running_mean,
                                      module.running_var), params):
                tensor.copy_(torch.from_numpy(value))
        xt = _as_tensor(torch, x)
        if self.mode == "eval":
            module.eval()
        if self.mode != "train+bwd":
            module.requires_grad_(False)
            return lambda: module(xt)
        xt.requires_grad_(True)
        dyt = _as_tensor(torch, dy)

        def call():
            xt.grad = None
            module.weight.grad = None
            module.bias.grad = None
            module(xt).backward(dyt)
            return xt.grad
        return call

    # --- NumPy ------------------------------------------------------------------

    def _numpy_call(self, x, dy, params):
        axes = self.reduce_axes
        # Per-channel values broadcast against (N, C, ...): shape (1, C, 1, ...).
        per_channel = (1, self.num_features) + (1,) * (len(self.shape) - 2)
        weight, bias, running_mean, running_var = (p.reshape(per_channel) for p in params)
        if self.mode == "eval":
            return lambda: numpy_eval_forward(x, weight, bias, running_mean, running_var)
        if self.mode == "train":
            return lambda: numpy_train_forward(x, weight, bias, axes)[0]

        def call():
            y, mean, invstd = numpy_train_forward(x, weight, bias, axes)
            return numpy_backward(dy, x, mean, invstd, weight, axes)[0]
        return call


def _as_tensor(torch, a):
    """A torch view of ``a`` (NumPy) keeping its memory layout, channels-last included."""
    if a.flags.c_contiguous:
        return torch.from_numpy(a)
    # A channels-last array is np.moveaxis(stored, -1, 1) of a C-contiguous
    # (N, spatial..., C) array: undo the view and redo it as a torch permute.
    stored = np.moveaxis(a, 1, -1)
    assert stored.flags.c_contiguous, "expected a channels-last view"
    order = (0, a.ndim - 1) + tuple(range(1, a.ndim - 1))
    return torch.from_numpy(stored).permute(*order)


# --- the NumPy twin: the textbook formulas -----------------------------------

def numpy_train_forward(x, weight, bias, axes, eps=EPS):
    """(y, mean, invstd) with the batch statistics over ``axes``."""
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean) * (invstd * weight) + bias
    return y, mean, invstd


def numpy_eval_forward(x, weight, bias, running_mean, running_var, eps=EPS):
    return (x - running_mean) * (weight / np.sqrt(running_var + eps)) + bias


def numpy_backward(dy, x, mean, invstd, weight, axes):
    """(dx, grad_weight, grad_bias) of the training forward."""
    n = x.size // x.shape[1]
    xhat = (x - mean) * invstd
    grad_bias = dy.sum(axis=axes, keepdims=True)
    grad_weight = (dy * xhat).sum(axis=axes, keepdims=True)
    dx = (weight * invstd) * (dy - grad_bias / n - xhat * (grad_weight / n))
    return dx, grad_weight, grad_bias


# --- the rows -------------------------------------------------------------------

S32 = (32, 64, 56, 56)
S128 = (128, 64, 56, 56)

CASES = [
    BatchNormCase("2d-train-nchw-32", "2d train fwd NCHW (32,64,56,56)", S32, "train"),
    BatchNormCase("2d-train-nchw-128", "2d train fwd NCHW (128,64,56,56)", S128, "train"),
    BatchNormCase("2d-train-cl-32", "2d train fwd CL (32,64,56,56)", S32, "train",
                  channels_last=True),
    BatchNormCase("2d-train-cl-128", "2d train fwd CL (128,64,56,56)", S128, "train",
                  channels_last=True),
    BatchNormCase("2d-fwdbwd-nchw-32", "2d train fwd+bwd NCHW (32,64,56,56)", S32, "train+bwd"),
    BatchNormCase("2d-fwdbwd-cl-32", "2d train fwd+bwd CL (32,64,56,56)", S32, "train+bwd",
                  channels_last=True),
    BatchNormCase("2d-eval-nchw-32", "2d eval fwd NCHW (32,64,56,56)", S32, "eval"),
    BatchNormCase("2d-eval-cl-32", "2d eval fwd CL (32,64,56,56)", S32, "eval",
                  channels_last=True),
    BatchNormCase("2d-train-f64-32", "2d train fwd f64 NCHW (32,64,56,56)", S32, "train",
                  dtype="float64"),
    BatchNormCase("1d-train-64x256x128", "1d train fwd (64,256,128)", (64, 256, 128), "train"),
    BatchNormCase("1d-train-4096x512", "1d train fwd (4096,512)", (4096, 512), "train"),
    BatchNormCase("3d-train-8x32x16x32x32", "3d train fwd (8,32,16,32,32)",
                  (8, 32, 16, 32, 32), "train"),
    BatchNormCase("latency-1d-eval-1x512", "latency 1d eval (1,512)", (1, 512), "eval",
                  latency=True),
    BatchNormCase("latency-2d-eval-1x64x56x56", "latency 2d eval (1,64,56,56)",
                  (1, 64, 56, 56), "eval", latency=True),
]
