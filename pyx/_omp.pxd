# OpenMP runtime calls; cbn_omp.h gives serial stand-ins when the compiler
# has no OpenMP, so every kernel module builds either way.

cdef extern from "cbn_omp.h" nogil:
    int CBN_OPENMP
    int omp_get_max_threads()
    int omp_get_num_procs()
    void omp_set_num_threads(int n)
