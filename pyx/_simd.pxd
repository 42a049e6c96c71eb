# Declarations of the vectorised inner loops in cbn_simd.h, shared by the
# kernel modules.  Each exists for float (suffix _f) and double (suffix _d).

cdef extern from "cbn_simd.h" nogil:
    void cbn_row_moments_f(const float *x, Py_ssize_t n, double k, double *s, double *q)
    void cbn_row_moments_d(const double *x, Py_ssize_t n, double k, double *s, double *q)
    void cbn_rows_moments_f(const float *x, Py_ssize_t rows, Py_ssize_t row_stride,
                            Py_ssize_t C, const double *k, double *s, double *q)
    void cbn_rows_moments_d(const double *x, Py_ssize_t rows, Py_ssize_t row_stride,
                            Py_ssize_t C, const double *k, double *s, double *q)

    void cbn_rows_scale_shift_f(const float *x, Py_ssize_t x_stride, float *y,
                                Py_ssize_t y_stride, Py_ssize_t rows, Py_ssize_t C,
                                const float *m, const float *a, const float *b)
    void cbn_rows_scale_shift_d(const double *x, Py_ssize_t x_stride, double *y,
                                Py_ssize_t y_stride, Py_ssize_t rows, Py_ssize_t C,
                                const double *m, const double *a, const double *b)

    void cbn_row_grad_sums_f(const float *dy, const float *x, Py_ssize_t n, double k,
                             double *s, double *t)
    void cbn_row_grad_sums_d(const double *dy, const double *x, Py_ssize_t n, double k,
                             double *s, double *t)
    void cbn_rows_grad_sums_f(const float *dy, Py_ssize_t dy_stride, const float *x,
                              Py_ssize_t x_stride, Py_ssize_t rows, Py_ssize_t C,
                              const double *k, double *s, double *t)
    void cbn_rows_grad_sums_d(const double *dy, Py_ssize_t dy_stride, const double *x,
                              Py_ssize_t x_stride, Py_ssize_t rows, Py_ssize_t C,
                              const double *k, double *s, double *t)

    void cbn_rows_grad_input_f(const float *dy, Py_ssize_t dy_stride, const float *x,
                               Py_ssize_t x_stride, float *dx, Py_ssize_t dx_stride,
                               Py_ssize_t rows, Py_ssize_t C, const float *a,
                               const float *b, const float *m, const float *c)
    void cbn_rows_grad_input_d(const double *dy, Py_ssize_t dy_stride, const double *x,
                               Py_ssize_t x_stride, double *dx, Py_ssize_t dx_stride,
                               Py_ssize_t rows, Py_ssize_t C, const double *a,
                               const double *b, const double *m, const double *c)

    void cbn_sample_moments_f(const float *x, Py_ssize_t x_sc, Py_ssize_t C, Py_ssize_t S,
                              const double *k, double *acc)
    void cbn_sample_moments_d(const double *x, Py_ssize_t x_sc, Py_ssize_t C, Py_ssize_t S,
                              const double *k, double *acc)
    void cbn_sample_grad_sums_f(const float *dy, Py_ssize_t dy_sc, const float *x,
                                Py_ssize_t x_sc, Py_ssize_t C, Py_ssize_t S,
                                const double *k, double *acc)
    void cbn_sample_grad_sums_d(const double *dy, Py_ssize_t dy_sc, const double *x,
                                Py_ssize_t x_sc, Py_ssize_t C, Py_ssize_t S,
                                const double *k, double *acc)
    void cbn_ncs_scale_shift_f(const float *x, Py_ssize_t x_sn, Py_ssize_t x_sc, float *y,
                               Py_ssize_t y_sn, Py_ssize_t y_sc, Py_ssize_t C, Py_ssize_t S,
                               Py_ssize_t row0, Py_ssize_t row1, const float *m,
                               const float *a, const float *b)
    void cbn_ncs_scale_shift_d(const double *x, Py_ssize_t x_sn, Py_ssize_t x_sc, double *y,
                               Py_ssize_t y_sn, Py_ssize_t y_sc, Py_ssize_t C, Py_ssize_t S,
                               Py_ssize_t row0, Py_ssize_t row1, const double *m,
                               const double *a, const double *b)
    void cbn_ncs_grad_input_f(const float *dy, Py_ssize_t dy_sn, Py_ssize_t dy_sc,
                              const float *x, Py_ssize_t x_sn, Py_ssize_t x_sc, float *dx,
                              Py_ssize_t dx_sn, Py_ssize_t dx_sc, Py_ssize_t C, Py_ssize_t S,
                              Py_ssize_t row0, Py_ssize_t row1, const float *a,
                              const float *b, const float *m, const float *c)
    void cbn_ncs_grad_input_d(const double *dy, Py_ssize_t dy_sn, Py_ssize_t dy_sc,
                              const double *x, Py_ssize_t x_sn, Py_ssize_t x_sc, double *dx,
                              Py_ssize_t dx_sn, Py_ssize_t dx_sc, Py_ssize_t C, Py_ssize_t S,
                              Py_ssize_t row0, Py_ssize_t row1, const double *a,
                              const double *b, const double *m, const double *c)
