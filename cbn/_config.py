"""How many OpenMP threads the kernels use.

* The process-wide number: ``OMP_NUM_THREADS``, else the processors OpenMP
  may use (as OpenMP itself decides), changed with ``set_num_threads``.
  Either way at most ``MAX_THREADS`` (64, or 8 per processor on larger
  machines): ``set_num_threads`` above it raises ``ValueError``, and an
  ``OMP_NUM_THREADS`` above it is clamped with a warning (asking an OpenMP
  runtime for 100000 threads crashes the process).
* OpenMP's own limit for the calling thread, read at every call: when it is
  below OpenMP's default (``threadpoolctl.threadpool_limits(n)`` or
  ``omp_set_num_threads(n)`` lowered it), it caps cbn too, for as long as it
  is in effect.
* A per-thread limit: ``with cbn.threads(1): ...`` caps the kernels called by
  this Python thread, e.g. in a service whose many request threads would
  otherwise each start a full OpenMP team and oversubscribe the cores.
* Fork safety: GNU libgomp's thread pool does not survive ``fork``; a child
  whose parent had started it hangs at its first parallel region.  So a child
  forked after a multi-threaded kernel call runs its kernels on one thread.

Every kernel call receives the number explicitly (``kernel_threads``).
"""
import contextlib
import numbers
import os
import threading
import warnings
from typing import Iterator

from cbn import _threads

__all__ = ["MAX_THREADS", "get_num_threads", "set_num_threads", "threads"]

_OPENMP = _threads.openmp_enabled()
_PROCS = max(1, _threads.num_procs()) if _OPENMP else 1

#: The largest thread count cbn accepts (64, or 8 per processor when that is more).
MAX_THREADS = max(64, 8 * _PROCS)


def _default_from_environment():
    """OpenMP's default team size: ``OMP_NUM_THREADS`` (validated, clamped), else the processors.

    Computed here rather than asked of the runtime: the runtime answers for
    the calling thread, which may sit inside a ``threadpool_limits`` block.
    """
    if not _OPENMP:
        return 1
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not text:
        return _PROCS
    first = text.split(",")[0].strip()  # a list sets nested levels; the first is ours
    try:
        n = int(first)
    except ValueError:
        n = 0
    if n < 1:
        warnings.warn(f"cbn: ignoring OMP_NUM_THREADS={text!r} (not a positive integer); "
                      f"using {_PROCS} thread(s)", RuntimeWarning, stacklevel=2)
        return _PROCS
    if n > MAX_THREADS:
        warnings.warn(f"cbn: OMP_NUM_THREADS={n} is above cbn's limit of {MAX_THREADS} "
                      f"threads; using {MAX_THREADS}", RuntimeWarning, stacklevel=2)
        return MAX_THREADS
    return n


_omp_default = _default_from_environment()  # OpenMP's team size when nothing limits it
_num_threads = _omp_default   # cbn's process-wide count (set_num_threads)
_pool_started = False         # a kernel ran with more than one thread in this process
_serial_after_fork = False    # this process was forked after that: stay serial


class _Local(threading.local):
    limit = None  # a class default: reading it costs no AttributeError in a fresh thread


_local = _Local()             # per-thread limit set by `threads`
_max_threads = _threads.max_threads


def _check_count(n, what="the number of threads"):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"{what} must be an integer >= 1, got {n!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {n!r}")
    if n > MAX_THREADS:
        raise ValueError(f"{what} must be an integer >= 1 and at most cbn.MAX_THREADS = "
                         f"{MAX_THREADS}, got {n}")
    return n


def _capped(n):
    """``n`` under OpenMP's current limit for this thread, when someone lowered it."""
    omp = _max_threads()
    return omp if 0 < omp < _omp_default and omp < n else n


def get_num_threads() -> int:
    """The number of threads cbn's kernels use now (1 when built without OpenMP).

    Returns
    -------
    int
        ``set_num_threads``'s value (default ``OMP_NUM_THREADS`` or the
        processors), capped by OpenMP's limit of the calling thread when
        ``threadpoolctl.threadpool_limits`` lowered it.  ``cbn.threads``
        limits are not included.
    """
    if _serial_after_fork or not _OPENMP:
        return 1
    return _capped(_num_threads)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in every later kernel call of this process.

    Parameters
    ----------
    n : int
        1 <= n <= ``cbn.MAX_THREADS``; a build without OpenMP stays at 1.

    Raises
    ------
    ValueError
        ``n`` is not an integer in that range.
    """
    global _num_threads
    _num_threads = _check_count(n) if _OPENMP else (_check_count(n) and 1)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Limit the kernels called by the current Python thread to ``n`` threads.

    Parameters
    ----------
    n : int
        1 <= n <= ``cbn.MAX_THREADS``; nested limits never raise the cap.

    Examples
    --------
    >>> with cbn.threads(1):
    ...     y = layer(x)
    """
    n = _check_count(n)
    previous = _local.limit
    _local.limit = n if previous is None else min(n, previous)
    try:
        yield
    finally:
        _local.limit = previous


def kernel_threads():
    """The thread count for the next kernel call on this Python thread."""
    global _pool_started
    if _serial_after_fork:
        return 1
    n = _num_threads
    omp = _max_threads()  # threadpoolctl lowers this for as long as its limit holds
    if 0 < omp < n and omp < _omp_default:  # (an overflowing OMP_NUM_THREADS reads < 0)
        n = omp
    limit = _local.limit
    if limit is not None and limit < n:
        n = limit
    if n > 1:
        _pool_started = True
    return n


def _after_fork_in_child():
    global _serial_after_fork
    if _pool_started:
        _serial_after_fork = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
