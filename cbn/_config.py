"""How many OpenMP threads the kernels use.

Resolved once from the environment (OMP_NUM_THREADS, else the core count, as
OpenMP itself does) and changed with ``set_num_threads``; every kernel call
receives the number explicitly, so nothing depends on OpenMP's global state.
"""
from cbn import _threads

_num_threads = None


def get_num_threads():
    """The number of threads cbn's kernels use (1 when built without OpenMP)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = max(1, _threads.max_threads()) if _threads.openmp_enabled() else 1
    return _num_threads


def set_num_threads(n):
    """Use ``n`` threads in every later kernel call (n >= 1)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be an integer >= 1, got {n!r}")
    _num_threads = n if _threads.openmp_enabled() else 1
