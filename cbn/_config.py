"""How many OpenMP threads the kernels use.

* The process-wide number: ``OMP_NUM_THREADS``, else the core count (as
  OpenMP itself decides), changed with ``set_num_threads``.
* A per-thread limit: ``with cbn.threads(1): ...`` caps the kernels called by
  this Python thread, e.g. in a service whose many request threads would
  otherwise each start a full OpenMP team and oversubscribe the cores.
* Fork safety: GNU libgomp's thread pool does not survive ``fork``; a child
  whose parent had started it hangs at its first parallel region.  So a child
  forked after a multi-threaded kernel call runs its kernels on one thread.

Every kernel call receives the number explicitly (``kernel_threads``), so
nothing depends on OpenMP's global state.
"""
import contextlib
import os
import threading

from cbn import _threads

_num_threads = None
_pool_started = False       # a kernel ran with more than one thread in this process
_serial_after_fork = False  # this process was forked after that: stay serial
_local = threading.local()  # per-thread limit set by `threads`


def get_num_threads():
    """The number of threads cbn's kernels use (1 when built without OpenMP)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = max(1, _threads.max_threads()) if _threads.openmp_enabled() else 1
    return 1 if _serial_after_fork else _num_threads


def set_num_threads(n):
    """Use ``n`` threads in every later kernel call of this process (n >= 1)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be an integer >= 1, got {n!r}")
    _num_threads = n if _threads.openmp_enabled() else 1


@contextlib.contextmanager
def threads(n):
    """Limit the kernels called by the current Python thread to ``n`` threads.

    >>> with cbn.threads(1):
    ...     y = layer(x)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be an integer >= 1, got {n!r}")
    previous = getattr(_local, "limit", None)
    _local.limit = n if previous is None else min(n, previous)
    try:
        yield
    finally:
        _local.limit = previous


def kernel_threads():
    """The thread count for the next kernel call on this Python thread."""
    global _pool_started
    n = _num_threads if _num_threads is not None and not _serial_after_fork else get_num_threads()
    limit = getattr(_local, "limit", None)
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
