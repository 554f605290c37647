"""Which micro-kernel level the engine runs: the best the CPU has, or a lower one forced with CONVCORE_ISA.

Levels are ints passed down to the kernels (0 portable, 1 avx2, 2 avx512); C code never reads the environment.
``CONVCORE_ISA`` is read each time a plan is made, so a test can force a level with ``monkeypatch.setenv``.
"""
import os

from ._cpuinfo import cpu_isa_level

__all__ = ["ISA_NAMES", "cpu_isa", "isa_level", "kernel_isa"]

#: Level number -> name, lowest first.
ISA_NAMES = ("portable", "avx2", "avx512")

_CPU_LEVEL = cpu_isa_level()


def cpu_isa():
    """The best kernel level this CPU supports, by name."""
    return ISA_NAMES[_CPU_LEVEL]


def isa_level():
    """The kernel level to use now: the CPU's best, capped by ``CONVCORE_ISA`` when it is set.

    Raises
    ------
    ValueError
        If ``CONVCORE_ISA`` is not one of ``portable``, ``avx2``, ``avx512``, or asks for a level the CPU lacks.
    """
    forced = os.environ.get("CONVCORE_ISA", "").strip().lower()
    if not forced:
        return _CPU_LEVEL
    if forced not in ISA_NAMES:
        raise ValueError(f"CONVCORE_ISA must be one of {', '.join(ISA_NAMES)}, got {forced!r}")
    level = ISA_NAMES.index(forced)
    if level > _CPU_LEVEL:
        raise ValueError(f"CONVCORE_ISA={forced} asks for a kernel level this CPU lacks (it supports up to "
                         f"{ISA_NAMES[_CPU_LEVEL]})")
    return level


def kernel_isa():
    """The name of the micro-kernel level the engine picks now (``portable``, ``avx2`` or ``avx512``)."""
    return ISA_NAMES[isa_level()]
