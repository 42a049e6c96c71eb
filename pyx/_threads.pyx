# cython: language_level=3
"""The OpenMP thread pool as cbn sees it: compiled in or not, and its size."""
from _omp cimport CBN_OPENMP, omp_get_max_threads, omp_set_num_threads


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(CBN_OPENMP)


def max_threads():
    """OpenMP's default team size (OMP_NUM_THREADS, else the core count)."""
    return omp_get_max_threads()
