/* OpenMP calls with serial stand-ins, so one source builds with or without
 * an OpenMP compiler (the scikit-learn way). */
#ifndef CBN_OMP_H
#define CBN_OMP_H

#ifdef _OPENMP
#include <omp.h>
#define CBN_OPENMP 1
#else
#define CBN_OPENMP 0
static int omp_get_max_threads(void) { return 1; }
static int omp_get_num_procs(void) { return 1; }
static void omp_set_num_threads(int n) { (void)n; }
#endif

#endif
