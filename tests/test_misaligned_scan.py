"""The server computes on misaligned inputs in place on x86-64 (`server._codec.INPUT_MISALIGNED`): that is safe only
while no alignment-demanding instruction of the compiled kernels can touch an input. The compiler decides which
instructions it emits (it may differ with another CPU's -march=native or another gcc), so the built extension is
scanned here, on every machine the suite runs on, with scripts/check_misaligned_reads.py."""
import glob
import os
import platform
import shutil
import sys

import pytest

import convcore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_misaligned_reads  # noqa: E402


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the scan reads x86-64 code")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_the_built_kernels_have_no_unexplained_alignment_demanding_access():
    paths = glob.glob(os.path.join(os.path.dirname(convcore.__file__), "_kernels*.so"))
    assert paths, "convcore/_kernels*.so not found"
    unexplained = {}
    for path in paths:
        for function, ops in check_misaligned_reads.findings(path).items():
            for op in ops:
                if not check_misaligned_reads.explained(function, op):
                    unexplained.setdefault(function, []).append(op)
    assert not unexplained, unexplained
