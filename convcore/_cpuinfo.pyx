"""What the CPU supports, read with the compiler's cpuid builtins (see _isa.h)."""

cdef extern from "_isa.h" nogil:
    int cc_cpu_isa()


def cpu_isa_level():
    """The best kernel level this CPU runs: 0 portable, 1 AVX2+FMA, 2 AVX-512 (F/DQ/BW/VL)."""
    return cc_cpu_isa()
