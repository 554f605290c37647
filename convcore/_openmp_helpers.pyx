"""What the OpenMP runtime says; see convcore._threads for the one function that picks a thread count."""
from ._openmp cimport CONVCORE_OPENMP, omp_get_max_threads


def openmp_enabled():
    """Return True if the extension was compiled with OpenMP support (else every kernel runs sequentially)."""
    return bool(CONVCORE_OPENMP)


def openmp_max_threads():
    """Return OpenMP's default team size (respects OMP_NUM_THREADS); 1 without OpenMP."""
    return omp_get_max_threads()
