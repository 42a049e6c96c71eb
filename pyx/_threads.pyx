# cython: language_level=3
"""The OpenMP thread pool as cbn sees it: compiled in or not, and its size."""
from _omp cimport CBN_OPENMP, omp_get_max_threads, omp_get_num_procs, omp_set_num_threads


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(CBN_OPENMP)


def max_threads():
    """OpenMP's team size for this thread now (OMP_NUM_THREADS, omp_set_num_threads, cores)."""
    return omp_get_max_threads()


def num_procs():
    """The processors OpenMP may use (the affinity mask's size; 1 without OpenMP)."""
    return omp_get_num_procs()
