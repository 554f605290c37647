"""Shared pytest setup: make the helper modules in tests/ importable (``from _reference import reference_conv``)."""
import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402


@pytest.fixture
def threads_for_any_size(monkeypatch):
    """Let even tiny test layers run on several threads (the engine runs work under ~50 MFLOP on one thread),
    so that tests about thread counts really exercise the parallel path."""
    import convcore._threads

    monkeypatch.setattr(convcore._threads, "SMALL_WORK_FLOPS", 0)
