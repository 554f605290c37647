"""Shared pytest setup: make the helper modules in tests/ importable (``from _reference import reference_conv``)."""
import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
