"""Row-major GEMM over scipy's BLAS (sgemm/dgemm), callable without the GIL."""
from scipy.linalg.cython_blas cimport dgemm, sgemm


cdef void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
                  const floating* a, int lda, const floating* b, int ldb,
                  floating beta, floating* c, int ldc) noexcept nogil:
    """C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C, all row-major with leading dimensions lda/ldb/ldc.

    BLAS is column-major. A row-major matrix with leading dimension ld is the column-major transpose with the same ld,
    so we compute Cᵀ = op(B)ᵀ op(A)ᵀ: swap the operands (and m with n) and keep each operand's own transpose flag.
    This is the only place that knows about the swap.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*> b, &ldb, <float*> a, &lda, &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*> b, &ldb, <double*> a, &lda, &beta, c, &ldc)


def gemm(floating[:, ::1] a, floating[:, ::1] b, floating[:, ::1] c, bint trans_a=False, bint trans_b=False):
    """Test twin of `gemm_rm`: c = op(a) @ op(b) on C-contiguous 2-D arrays (shapes checked here)."""
    cdef int m = a.shape[1] if trans_a else a.shape[0]
    cdef int k = a.shape[0] if trans_a else a.shape[1]
    cdef int kb = b.shape[1] if trans_b else b.shape[0]
    cdef int n = b.shape[0] if trans_b else b.shape[1]
    if k != kb or c.shape[0] != m or c.shape[1] != n:
        raise ValueError(f"gemm shapes do not agree: op(a) is {m}x{k}, op(b) is {kb}x{n}, c is {c.shape[0]}x{c.shape[1]}")
    with nogil:
        gemm_rm(trans_a, trans_b, m, n, k, <floating> 1, &a[0, 0], a.shape[1], &b[0, 0], b.shape[1],
                <floating> 0, &c[0, 0], c.shape[1])
