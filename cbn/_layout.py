"""Input validation and the two memory layouts the kernels understand.

Every array the kernels see is a view of the caller's memory:

* ``ncs``: ``(N, C, S)`` whose last axis is contiguous (S = product of the
  spatial sizes; N and C may have any strides, negative included);
* ``mc``: ``(M, C)`` channels-last, the channel axis contiguous (M = N times
  the spatial sizes).

An input that fits neither is copied once into C order.  Validation happens
here, in Python; the kernels assume valid input and never raise.
"""
import os
import sys

import numpy as np

from cbn import _normalize, _stats, _backward

NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what the kernels take


class Batch:
    """A validated input: its compute array, the kernel view and the layout.

    ``shape``, ``dtype`` and ``count`` are plain attributes (computed once):
    inside a network the caches are cold and every property call costs.
    """

    __slots__ = ("data", "view", "channels_last", "result_dtype", "shape", "dtype", "count")

    def __init__(self, data, view, channels_last, result_dtype):
        self.data = data                  # ndarray in float32/float64, caller's shape
        self.view = view                  # (N, C, S) or (M, C) view of data
        self.channels_last = channels_last
        self.result_dtype = result_dtype  # dtype handed back to the caller
        self.shape = data.shape
        self.dtype = data.dtype
        shape = view.shape                # values per channel: N times the spatial size
        self.count = shape[0] * shape[2] if len(shape) == 3 else shape[0]


def compute_dtype(dtype):
    """The dtype the kernels run in for an input of ``dtype`` (TypeError if not floating)."""
    dtype = np.dtype(dtype)
    if dtype in NATIVE_DTYPES:
        return dtype
    if dtype.kind != "f":
        raise TypeError(
            f"batch norm expects a floating-point input (float16, float32 or float64), "
            f"got dtype {dtype}")
    return np.dtype(np.float32) if dtype.itemsize <= 4 else np.dtype(np.float64)


def _reshaped_view(a, shape):
    """``a`` viewed with ``shape`` without copying, or None when that needs a copy."""
    view = a.view()
    try:
        view.shape = shape
    except AttributeError:
        return None
    return view


def _ncs_view(a):
    n, c = a.shape[:2]
    spatial = int(np.prod(a.shape[2:], dtype=np.int64))
    view = _reshaped_view(a, (n, c, spatial))
    if view is None or (spatial > 1 and view.strides[2] != a.itemsize):
        return None
    return view


def _mc_view(a):
    if a.strides[1] != a.itemsize and a.shape[1] > 1:
        return None
    moved = np.moveaxis(a, 1, -1)
    c = a.shape[1]
    return _reshaped_view(moved, (a.size // c, c))


def layout_views(a, channels_last=None):
    """(view, channels_last) of a float32/float64 array, or (None, None) if no layout fits.

    ``channels_last`` None picks the layout that fits (channels-last first for
    2-D input or a spatial size of 1); True or False asks for that layout only.
    """
    n, c = a.shape[:2]
    spatial = a.size // (n * c) if a.size else int(np.prod(a.shape[2:], dtype=np.int64))
    if a.size == 0:  # nothing is read or written: any buffer of the right shape will do
        cl = bool(channels_last)
        return (np.zeros((n * spatial, c), a.dtype) if cl else np.zeros((n, c, spatial), a.dtype)), cl
    if channels_last is None:
        prefer_mc = a.ndim == 2 or spatial == 1
        makers = (_mc_view, _ncs_view) if prefer_mc else (_ncs_view, _mc_view)
    else:
        makers = (_mc_view,) if channels_last else (_ncs_view,)
    for make in makers:
        view = make(a)
        if view is not None:
            return view, make is _mc_view
    return None, None


def as_batch(x, num_features, valid_ndims, what):
    """Validate ``x`` and return a Batch.

    ``valid_ndims`` is a tuple of accepted ranks (None: any rank >= 2) and
    ``what`` names the expected shapes in the error message.
    """
    a = x if type(x) is np.ndarray else np.asarray(x)
    shape = a.shape
    ndim = len(shape)
    if valid_ndims is None:
        if ndim < 2:
            raise ValueError(f"expected an input of rank >= 2 {what}, got shape {shape}")
    elif ndim not in valid_ndims:
        raise ValueError(f"expected {what} input, got a {ndim}D input of shape {shape}")
    if shape[1] != num_features:
        raise ValueError(
            f"expected {num_features} channels (input.shape[1]), got {shape[1]} "
            f"in an input of shape {shape}")
    dtype = a.dtype
    if dtype in NATIVE_DTYPES and a.size:
        # The common cases, without the general layout search (inside a network
        # the caches are cold, and each failed view attempt costs tens of us).
        if a.flags.c_contiguous:
            if ndim == 2:  # (N, C): the array is its own kernel view
                return Batch(a, a, True, dtype)
            if a.size == shape[0] * shape[1]:
                return Batch(a, a.reshape(shape[0], shape[1]), True, dtype)
            return Batch(a, a.reshape(shape[0], shape[1], -1), False, dtype)
        if ndim > 2 and a.strides[1] == a.itemsize:
            moved = a.transpose(_CHANNELS_LAST_ORDER[ndim])
            if moved.flags.c_contiguous:  # channels-last memory, (N, spatial..., C)
                return Batch(a, moved.reshape(-1, shape[1]), True, dtype)
    compute = compute_dtype(dtype)
    if dtype != compute or not dtype.isnative:
        a = a.astype(compute)
    view, channels_last = layout_views(a)
    if view is None:
        a = np.ascontiguousarray(a)
        view, channels_last = layout_views(a)
    return Batch(a, view, channels_last, dtype)


def check_out(batch, out):
    """``out`` as an output Batch for ``batch``, or None when it needs a staging buffer."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != batch.shape or out.dtype != batch.result_dtype:
        raise ValueError(f"out must have shape {batch.shape} and dtype {batch.result_dtype}, "
                         f"got shape {out.shape} and dtype {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if out.dtype != batch.dtype or not out.size:
        return None
    data = batch.data
    if np.may_share_memory(out, data) and (
            out.__array_interface__["data"][0] != data.__array_interface__["data"][0]
            or out.strides != data.strides):
        return None  # overlaps the input without being it: stage, or reads see new values
    if out.flags.c_contiguous and data.flags.c_contiguous:  # the common case
        return Batch(out, out.reshape(batch.view.shape), batch.channels_last, out.dtype)
    view, _ = layout_views(out, batch.channels_last)
    return None if view is None else Batch(out, view, batch.channels_last, out.dtype)


def like(batch, y, name="grad_output"):
    """``y`` (e.g. a gradient) as a Batch with the same shape and layout as ``batch``."""
    if isinstance(y, Batch):
        return y
    a = y if type(y) is np.ndarray else np.asarray(y)
    data = batch.data
    if a.shape == data.shape and a.dtype == data.dtype and a.dtype.isnative:
        # The input's own layout (the common case), without the general search.
        if a.flags.c_contiguous and data.flags.c_contiguous:
            return Batch(a, a.reshape(batch.view.shape), batch.channels_last, batch.result_dtype)
        if batch.channels_last and a.ndim > 2 and a.strides == data.strides:
            view = _reshaped_view(a.transpose(_CHANNELS_LAST_ORDER[a.ndim]), batch.view.shape)
            if view is not None:
                return Batch(a, view, True, batch.result_dtype)
    if a.shape != batch.shape:
        raise ValueError(f"{name} must have the shape of the last input {batch.shape}, "
                         f"got {a.shape}")
    compute_dtype(a.dtype)
    if a.dtype != batch.dtype or not a.dtype.isnative:
        a = a.astype(batch.dtype)
    view, _ = layout_views(a, batch.channels_last)
    if view is None:
        a = _copy_in_layout(a, batch.channels_last)
        view, _ = layout_views(a, batch.channels_last)
    return Batch(a, view, batch.channels_last, batch.result_dtype)


# Axis order moving the channel axis last: (0, 2, ..., ndim - 1, 1).
_CHANNELS_LAST_ORDER = {ndim: (0,) + tuple(range(2, ndim)) + (1,) for ndim in range(3, 33)}


def _copy_in_layout(a, channels_last):
    out, _ = _empty(a.shape, a.dtype, channels_last)
    np.copyto(out, a)
    return out


def _empty(shape, dtype, channels_last, threads=0):
    """(array, kernel view) of a new array of ``shape`` in the given layout.

    ``threads``: the kernel that writes it will run on that many threads
    (0: not a streamed output); a channels-last output that will be streamed
    starts on a cache line (``_new``).
    """
    if channels_last and len(shape) == 2:  # (N, C): the array is its own kernel view
        data = np.empty(shape, dtype)
        return data, data
    n, c = shape[0], shape[1]
    spatial = 1
    for size in shape[2:]:
        spatial *= size
    if not channels_last:
        data = np.empty(shape, dtype)
        return data, data.reshape(n, c, spatial)
    base = _new((n,) + tuple(shape[2:]) + (c,), dtype, n * c * spatial, threads)  # NHWC
    order = (0, base.ndim - 1) + tuple(range(1, base.ndim - 1))
    return base.transpose(order), base.reshape(n * spatial, c)


def _new(shape, dtype, size, threads):
    """np.empty(shape, dtype); starting on a 64-byte line when it will be streamed.

    malloc aligns to 16 bytes only; an aligned channels-last output whose rows
    are whole lines (64 float32 channels, say) is streamed without the partial
    lines that made streaming lose on such rows (``_stream``).  (N, C, S)
    outputs stay as malloc gives them: aligned, eval of (32,256,14,14) at one
    thread was 5-20% slower in interleaved runs, for no reason found.
    """
    itemsize = dtype.itemsize
    if not threads or not _streamable(size * itemsize, threads):
        return np.empty(shape, dtype)  # (aligning costs three more NumPy calls)
    raw = np.empty(size + _LINE // itemsize, dtype)
    offset = -raw.__array_interface__["data"][0] % _LINE // itemsize
    return raw[offset:offset + size].reshape(shape)


def reusable(spare, batch):
    """``spare`` (an output Batch handed out earlier) when ``batch``'s output may go into it.

    Fresh memory for a large output costs a page fault per page on every
    call, because the allocator returns large blocks to the system.  Once
    the caller has dropped the previous output (no reference, no view, no
    tensor sharing its memory left), writing the new one into it is invisible
    to anyone.  None when shape, dtype or layout differ or anyone holds it.
    """
    if (spare is None or spare.shape != batch.shape or spare.dtype != batch.dtype
            or spare.channels_last != batch.channels_last):
        return None
    # Nobody else may hold the array we returned, nor the array owning its
    # memory (every NumPy view refers to the owner; a tensor from
    # torch.from_numpy holds the array it was made from).  The references
    # that are ours: the Batch's slots, the views' bases, the local name and
    # getrefcount's argument.
    data, view = spare.data, spare.view
    base = data.base
    if sys.getrefcount(data) != 3 + 2 * (view is data) + (view.base is data):
        return None
    if base is not None and sys.getrefcount(base) != 3 + (view.base is base):
        return None
    return spare


def empty_like(batch, dtype=None, threads=0):
    """An uninitialised Batch with ``batch``'s shape, dtype and layout (``threads``: _empty)."""
    dtype = batch.dtype if dtype is None else np.dtype(dtype)
    data, view = _empty(batch.shape, dtype, batch.channels_last, threads)
    return Batch(data, view, batch.channels_last, batch.result_dtype)


def deliver(batch, out):
    """The caller's result: ``out`` itself when given (filled from a staging Batch if needed)."""
    if out is None:
        return finish(batch)
    if batch.data is not out:
        np.copyto(out, finish(batch))
    return out


def finish(batch):
    """The caller-facing array of an output Batch (cast back to the input's dtype)."""
    if batch.result_dtype != batch.dtype:
        return batch.data.astype(batch.result_dtype)
    return batch.data


# --- kernel dispatch -------------------------------------------------------

def _parallel_min_elements(policy):
    """Below this many elements a kernel runs on one thread.

    The kernels themselves go parallel from 32768 elements, right when idle
    OpenMP threads spin (libgomp's default).  Under OMP_WAIT_POLICY=PASSIVE
    idle threads sleep, and waking one costs 10-50 us: measured here, a second
    thread only pays off from about 2**19 elements (2 MiB of float32), so
    smaller calls (batch-1 inference, say) stay on the calling thread.
    """
    return 1 << 19 if policy.strip().upper() == "PASSIVE" else 0


_PARALLEL_MIN = _parallel_min_elements(os.environ.get("OMP_WAIT_POLICY", ""))


def _cache_bytes(level, default, root="/sys/devices/system/cpu/cpu0/cache"):
    """Size in bytes of CPU 0's data or unified cache of ``level`` (sysfs), else ``default``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        entries = os.listdir(root)
    except OSError:
        return default
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(root, entry, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
            return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (OSError, ValueError, IndexError, KeyError):
            continue
    return default


# Large outputs are written with streaming stores (cbn_stream.h), skipping the
# read-for-ownership of each output line: a third less traffic, but the output
# leaves the cache.  Measured here (L3 32 MiB, eval of ResNet-50's shapes at
# batch 32 against torch, interleaved), streaming won from 3-6 MB of output per
# thread (1 thread: 6.4 MB 0.39 -> 0.30 ms, 25.7 MB 2.3-2.6 -> 1.7-2.0 ms) and
# lost below that at 2 threads (6.4 MB: 0.29 -> 0.35 ms), where the two cores
# write to L3 faster than to memory; and it lost on short rows, which leave a
# partial line at every row end: (N, C, S) rows of 49 elements (0.15 -> 0.27
# ms), channels-last rows of 64 channels (2.0-2.3 -> 2.7 ms at (32,64,56,56)).
# So: at least an eighth of the last-level cache per thread, in rows of at
# least 2 KiB (rows of 196 floats, 784 bytes, with a partial line at each end,
# lost too: eval (32,256,14,14) 1 thread 0.435 -> 0.585 ms, (32,1024,14,14)
# 2.81 -> 2.96-3.05 ms; rows of 3136 bytes won: (32,128,28,28) 1.23 -> 0.73
# ms) -- or in rows of whole lines: outputs that large start on a
# line (``_new``), and then channels-last rows of 64 float32 channels stream
# with no partial line (scale_shift at (32,64,56,56), 1 thread, inputs from
# torch, interleaved: 2.45-2.90 -> 1.69-1.96 ms; grad_input, NumPy inputs,
# 3.1-4.3 -> 2.9-3.4 ms; (32,128,28,28) 0.73-0.96 -> 0.62-0.94 ms).
# Streaming every output from 1 MiB on cost a ResNet-50 nothing where the next
# layer reads it (train step batch 16 at 112x112: 1433 vs 1489 ms; batch-1 eval
# at 224x224: 123 vs 122 ms).
_STREAM_MIN_BYTES = _cache_bytes(3, 32 << 20) // 8 if _normalize.STREAMING_STORES else None
_STREAM_MIN_ROW_BYTES = 2048
_LINE = 64


def _streamable(nbytes, threads):
    """Whether an output of ``nbytes`` written by ``threads`` threads is large enough to stream."""
    return _STREAM_MIN_BYTES is not None and nbytes >= _STREAM_MIN_BYTES * threads


def _stream(out, threads):
    """Whether the kernel writing ``out`` on ``threads`` threads should stream it."""
    if not _streamable(out.data.nbytes, threads):
        return False
    view = out.view
    row = view.shape[-1] * view.itemsize  # S, or C channels-last
    return row >= _STREAM_MIN_ROW_BYTES or _whole_lines(view, row)


def _whole_lines(view, row):
    """Whether every row of ``view`` is a run of whole 64-byte lines."""
    return (row % _LINE == 0 and view.__array_interface__["data"][0] % _LINE == 0
            and all(stride % _LINE == 0 for stride in view.strides[:-1]))


def _threads(array, n_threads):
    return n_threads if n_threads == 1 or array.size >= _PARALLEL_MIN else 1


def _specialisations(ncs, mc):
    """{(dtype, channels_last): kernel}, resolved once: Cython's fused-type
    dispatch by signature costs more than a small call's whole kernel."""
    return {(np.dtype(dtype), channels_last): kernel[name]
            for dtype, name in ((np.float32, "float"), (np.float64, "double"))
            for channels_last, kernel in ((False, ncs), (True, mc))}


_MOMENTS = _specialisations(_stats.moments_ncs, _stats.moments_mc)
_GRAD_SUMS = _specialisations(_stats.grad_sums_ncs, _stats.grad_sums_mc)
_SCALE_SHIFT = _specialisations(_normalize.scale_shift_ncs, _normalize.scale_shift_mc)
_GRAD_INPUT = _specialisations(_backward.grad_input_ncs, _backward.grad_input_mc)
_COEFFICIENTS = {np.dtype(np.float32): _normalize.coefficients["float"],
                 np.dtype(np.float64): _normalize.coefficients["double"]}
_GRAD_COEFFICIENTS = {np.dtype(np.float32): _backward.coefficients["float"],
                      np.dtype(np.float64): _backward.coefficients["double"]}
_FIRST_VALUES = _specialisations(_stats.first_values_ncs, _stats.first_values_mc)


# Inside a network every batch norm runs right after a convolution that has
# evicted the caches, and each NumPy call on the (C,) statistics then costs
# 5-50 us instead of 1: the per-channel arithmetic goes through one compiled
# call per step (first_values, mean_var, normalization_coefficients,
# grad_coefficients), with the NumPy formulas as the fallback for unusual
# dtypes or layouts of the statistics.

def first_values(batch):
    """One value of each channel of a non-empty batch as float64 (inf and NaN as 0)."""
    out = np.empty(batch.shape[1])
    _FIRST_VALUES[batch.dtype, batch.channels_last](batch.view, out)
    return out


def mean_var(count, s, q, shift):
    """float64 per-channel mean and biased variance from shifted sums over ``count`` values."""
    c = len(s)
    mean, var = np.empty(c), np.empty(c)
    try:
        _normalize.mean_var(count, s, q, shift, mean, var)
    except (TypeError, ValueError):  # not contiguous float64 (C,) arrays: the same in NumPy
        with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN stay in their channel
            mean = shift + s / count
            var = (q - s * (s / count)) / count
            np.maximum(var, 0.0, out=var)
    return mean, var


def moments(batch, shift, n_threads):
    """float64 (sum(x - shift), sum((x - shift)**2)) per channel."""
    c = batch.shape[1]
    s, q = np.empty(c), np.empty(c)
    view = batch.view
    _MOMENTS[batch.dtype, batch.channels_last](view, shift, s, q, _threads(view, n_threads))
    return s, q


def grad_sums(dy, x, center, n_threads):
    """float64 (sum(dy), sum(dy * (x - center))) per channel."""
    c = x.shape[1]
    s, t = np.empty(c), np.empty(c)
    view = x.view
    _GRAD_SUMS[x.dtype, x.channels_last](dy.view, view, center, s, t, _threads(view, n_threads))
    return s, t


def normalization_coefficients(mean, var, weight, bias, eps, dtype):
    """(invstd, center, scale, shift): ``invstd = 1 / sqrt(var + eps)`` in float64
    and, in ``dtype``, ``(x - center) * scale + shift == (x - mean) * invstd * weight + bias``.

    ``center`` is the float64 ``mean`` rounded to ``dtype`` and ``shift``
    carries the rounding's remainder: then ``x - center`` is exact for data
    near the mean, and the output is as accurate as ``dtype`` allows at any
    offset of the data from zero.  One compiled call (a dozen NumPy calls
    cost 10-20 us, as much as a small tensor's kernel).
    """
    mean = np.ascontiguousarray(mean, np.float64)
    var = np.ascontiguousarray(var, np.float64)
    c = len(mean)
    invstd = np.empty(c)
    center, scale, shift = np.empty(c, dtype), np.empty(c, dtype), np.empty(c, dtype)
    if not _COEFFICIENTS[dtype](mean, var, weight, bias, float(eps), invstd, center, scale,
                                shift):
        # weights of another dtype or layout: the same formulas in NumPy
        invstd = 1.0 / np.sqrt(var + eps)
        full_scale = invstd if weight is None else weight * invstd
        center = mean.astype(dtype)
        shift = -(mean - center) * full_scale
        if bias is not None:
            shift += bias
        scale, shift = full_scale.astype(dtype), shift.astype(dtype)
    return invstd, center, scale, shift


_UPDATE_RUNNING = {np.dtype(np.float32): _normalize.update_running["float"],
                   np.dtype(np.float64): _normalize.update_running["double"]}


def update_running(running_mean, running_var, mean, var, count, factor):
    """Blend the batch statistics into the running ones, in place (see F.update_running)."""
    if (type(factor) is float and running_mean is not None and running_var is not None
            and running_mean.dtype == running_var.dtype):
        update = _UPDATE_RUNNING.get(running_mean.dtype)
        if update is not None:
            try:
                update(running_mean, running_var, mean, var, count, factor)
                return
            except (TypeError, ValueError):  # not contiguous, or not float64 statistics
                pass
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN stay in their channel
        if running_mean is not None:
            running_mean[...] = (1.0 - factor) * running_mean + factor * mean
        if running_var is not None:
            unbiased = var * (count / (count - 1.0))
            running_var[...] = (1.0 - factor) * running_var + factor * unbiased


def grad_coefficients(sum_dy, sum_dy_xc, invstd, mean, weight, count, dtype):
    """(a, b, m, c) in ``dtype`` with ``a * dy + b * (x - m) + c`` the training-mode dx.

    ``a = weight * invstd``, ``b = -a * sum_dy_xc * invstd**2 / count``,
    ``m`` the mean rounded to ``dtype`` (``x - m`` exact near the mean) and
    ``c = -a * sum_dy / count - b * (mean - m)``, in float64, rounded once.
    """
    n = len(sum_dy)
    a, b, m, c = np.empty(n, dtype), np.empty(n, dtype), np.empty(n, dtype), np.empty(n, dtype)
    try:
        if _GRAD_COEFFICIENTS[dtype](sum_dy, sum_dy_xc, invstd, mean, weight, float(count),
                                     a, b, m, c):
            return a, b, m, c
    except (TypeError, ValueError):  # statistics that are not contiguous float64
        pass
    a64 = invstd if weight is None else weight * invstd
    b64 = -a64 * (sum_dy_xc * invstd * invstd / count)
    m = np.asarray(mean).astype(dtype)
    c64 = -a64 * sum_dy / count - b64 * (mean - m)
    return a64.astype(dtype), b64.astype(dtype), m, c64.astype(dtype)


def scale_shift(x, scale, shift, n_threads, out=None, center=None):
    """(x - center[c]) * scale[c] + shift[c] (center None: 0) into a new (or the given) Batch."""
    view = x.view
    threads = _threads(view, n_threads)
    out = empty_like(x, threads=threads) if out is None else out
    if center is None:
        center = np.zeros(len(scale), scale.dtype)
    _SCALE_SHIFT[x.dtype, x.channels_last](view, center, scale, shift, out.view, threads,
                                           _stream(out, threads))
    return out


def grad_input(dy, x, a, b, m, c, n_threads, out=None):
    """a[c] * dy + b[c] * (x - m[c]) + c[c] into a new (or the given) Batch."""
    view = x.view
    threads = _threads(view, n_threads)
    out = empty_like(x, threads=threads) if out is None else out
    _GRAD_INPUT[x.dtype, x.channels_last](dy.view, view, a, b, m, c, out.view, threads,
                                          _stream(out, threads))
    return out
