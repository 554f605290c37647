"""Smoke test of the engine benchmark (``python -m benchmarks.engine``): it runs, writes its section, and the table
holds positive numbers; ``python -m convcore.bench`` still runs it, and importing convcore never imports benchmarks.

No timing is asserted: the machine is shared and speeds swing 3-30x with other users' load.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks._harness import markdown_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- convcore-bench:start -->", "<!-- convcore-bench:end -->"
# Columns that must hold a measured number whatever is installed; torch/ORT columns may be "—" without them.
ALWAYS_MEASURED = ("cc NCHW", "cc NHWC", "GEMM limit")
OPTIONAL = ("cc conv()", "torch NCHW", "torch CL", "ORT", "NCHW ratio", "NHWC ratio")


@pytest.mark.slow
def test_quick_benchmark_writes_a_parsable_table(tmp_path):
    out = tmp_path / "B.md"
    # Another team's section must survive a rewrite of ours.
    out.write_text(f"# Benchmarks\n\n## Service overhead\nkeep me\n\n{START}\nold table\n{END}\n\n## After\nme too\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.engine", "--quick", "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "keep me" in text and "me too" in text and "old table" not in text
    assert text.count(START) == 1 and text.count(END) == 1
    section = text[text.index(START):text.index(END)]
    assert "python -m benchmarks.engine --quick" in section
    # The header every benchmark shares (benchmarks/_harness.py): ISA flags and a measured GEMM peak.
    assert re.search(r"- ISA: avx2 (yes|no), .*avx512f (yes|no), .*amx_tile (yes|no)", section), section[:2000]
    assert re.search(r"- GEMM peak: 1024³ sgemm, 2 thread\(s\), best of 3: numpy/OpenBLAS [1-9]\d* ", section)
    (head, rows), *_ = markdown_tables(section)
    assert rows, section
    for name in ALWAYS_MEASURED + OPTIONAL:
        assert name in head, f"column {name!r} missing from {head}"
    for row in rows:
        cells = dict(zip(head, row))
        for name in ALWAYS_MEASURED:
            assert float(cells[name]) > 0, (name, row)
        for name in OPTIONAL:
            assert cells[name] == "—" or float(cells[name]) > 0, (name, row)
    assert "geomean ≥ 0.8× torch" in section or "cannot be evaluated" in section


def test_rows_pattern_without_match_fails_cleanly(tmp_path):
    # Through the old command, which must keep working as an entry point of benchmarks/engine.py.
    proc = subprocess.run([sys.executable, "-m", "convcore.bench", "--rows", "no-such-row", "--output",
                           str(tmp_path / "B.md")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no row matches" in proc.stderr
    assert not (tmp_path / "B.md").exists()


def test_importing_convcore_does_not_import_benchmarks():
    # The engine package must stay free of the benchmarks (which import torch, grpc, the server): import every
    # convcore module, the old entry point included, and look for any benchmarks module in the process.
    code = ("import pkgutil, importlib, sys, convcore\n"
            "for m in pkgutil.iter_modules(convcore.__path__):\n"
            "    importlib.import_module('convcore.' + m.name)\n"
            "assert 'convcore.bench' in sys.modules\n"
            "print(sorted(n for n in sys.modules if n == 'benchmarks' or n.startswith('benchmarks.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_float64_option_needs_its_own_output_and_builds_float64_rows(capsys):
    from benchmarks import engine

    with pytest.raises(SystemExit):
        engine.parse_args(["--dtype", "float64"])
    assert "--dtype float64 needs --output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        engine.parse_args(["--dtype", "float16", "--output", "x.md"])
    args = engine.parse_args(["--dtype", "float64", "--output", "x.md"])
    assert args.dtype == "float64" and args.mem == "none"
    assert engine.parse_args([]).dtype == "float32"
    layer = engine.SUITE[3]
    d = engine.RowData(layer, 1, dtype=np.float64)
    assert {a.dtype for a in (d.x_cf, d.x_cl, d.w_oi, d.w_io, d.out_cf, d.out_cl)} == {np.dtype(np.float64)}
    assert engine.gemm_contender(d).fn().dtype == np.float64
    assert engine.ort_contenders(d, 1) == []
