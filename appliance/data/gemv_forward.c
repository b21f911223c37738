/* Preloaded in front of an optimized BLAS: matrix products with one row or one column go to the
 * BLAS's cblas_sgemv, every other product to its own cblas_sgemm.
 *
 * MLX's CPU backend computes every float32 matmul with cblas_sgemm, and a decode step of one
 * sequence is all one-row products (x @ W.T). OpenBLAS's sgemm packs the whole weight matrix
 * before multiplying; its sgemv streams it once: for SmolLM2's 49152 x 576 output layer on two
 * x86 cores, 16-20 ms a call against 9-10. The appliance compiles this file once with the system C
 * compiler (appliance/engine/cpu.py) and preloads it before the BLAS it found. Row-major only:
 * a column-major call (MLX makes none) goes to sgemm unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;

static void resolve(void) {
    /* The next definitions after this library: the preloaded BLAS's. */
    sgemv_fn v = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
    sgemm_fn m = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    __atomic_store_n(&next_sgemv, v, __ATOMIC_RELEASE);
    __atomic_store_n(&next_sgemm, m, __ATOMIC_RELEASE);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    sgemm_fn gemm = __atomic_load_n(&next_sgemm, __ATOMIC_ACQUIRE);
    if (gemm == NULL) {
        resolve();
        gemm = __atomic_load_n(&next_sgemm, __ATOMIC_ACQUIRE);
        if (gemm == NULL) { /* preloaded without a BLAS after it: say so rather than crash */
            fputs("gemv_forward: no cblas_sgemm after this library in LD_PRELOAD\n", stderr);
            abort();
        }
    }
    sgemv_fn gemv = __atomic_load_n(&next_sgemv, __ATOMIC_ACQUIRE);
    if (order == ROW_MAJOR && gemv != NULL && k > 0) {
        if (m == 1) {
            /* c[0, :] = alpha * a[0, :] op(b) + beta * c[0, :], that is y = op(b)^T x. */
            int incx = trans_a == NO_TRANS ? 1 : lda;
            if (trans_b == NO_TRANS) {
                gemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
            } else {
                gemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
            }
            return;
        }
        if (n == 1) {
            /* c[:, 0] = alpha * op(a) b[:, 0] + beta * c[:, 0]. */
            int incx = trans_b == NO_TRANS ? ldb : 1;
            if (trans_a == NO_TRANS) {
                gemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, incx, beta, c, ldc);
            } else {
                gemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, incx, beta, c, ldc);
            }
            return;
        }
    }
    gemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
