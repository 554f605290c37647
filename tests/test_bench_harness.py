"""The shared benchmark harness (benchmarks/_harness.py): section writer, ISA flags, GEMM peak, child processes.

No timing is asserted (speeds are the machine's), only that what is measured is a positive number and reported.
"""
import os
import sys

import pytest

from benchmarks import _harness as h

START, END = "<!-- t:start -->", "<!-- t:end -->"


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "B.md"
    path.write_text(f"# Benchmarks\n\nbefore\n\n{START}\nold\n{END}\n\n<!-- o:start -->\nother\n<!-- o:end -->\nafter\n")
    h.write_section(str(path), "## New\nrows", START, END)
    text = path.read_text()
    assert text == (f"# Benchmarks\n\nbefore\n\n{START}\n## New\nrows\n{END}\n\n<!-- o:start -->\nother\n"
                    f"<!-- o:end -->\nafter\n")
    # Written again with the markers already in the section: the same file, not a second copy.
    h.write_section(str(path), f"{START}\n## New\nrows\n{END}\n", START, END)
    assert path.read_text() == text
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_write_section_appends_or_creates(tmp_path):
    path = tmp_path / "B.md"
    h.write_section(str(path), "first", START, END)
    assert path.read_text() == f"# Benchmarks\n\n{START}\nfirst\n{END}\n"
    path.write_text("# Title\n\nsome text\n")
    h.write_section(str(path), "second", START, END)
    assert path.read_text() == f"# Title\n\nsome text\n\n{START}\nsecond\n{END}\n"
    # An end marker before the start marker does not delimit a section: append, keep the stray marker.
    path.write_text(f"{END}\n{START}\n")
    h.write_section(str(path), "third", START, END)
    assert path.read_text() == f"{END}\n{START}\n\n{START}\nthird\n{END}\n"


def test_isa_flags_parse_cpuinfo():
    text = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 fma avx512f amx_tile amx_bf16\n"
    flags = h.isa_flags(text)
    assert flags["avx2"] and flags["fma"] and flags["avx512f"] and flags["amx_tile"] and flags["amx_bf16"]
    assert not flags["amx_int8"] and not flags["avx512_bf16"]
    assert not any(h.isa_flags("no flags line here").values())


def test_machine_lines_name_the_isa_and_the_peak():
    info = h.machine_info()
    assert info["cpus"] >= 1 and 1 <= info["usable"] <= info["cpus"]
    assert set(info["isa"]) == set(h.ISA_FLAGS)
    peak = h.gemm_peak(threads=1, size=256, repeats=2, torch=False)
    assert peak["size"] == 256 and peak["numpy"]["best"] >= peak["numpy"]["median"] > 0
    lines = h.machine_lines(info, peak)
    assert any(line.startswith("- ISA: avx2 ") and "avx512f" in line and "amx_tile" in line for line in lines)
    assert any(line.startswith("- GEMM peak: 256³ sgemm, 1 thread(s), best of 2: numpy/OpenBLAS ") for line in lines)


def test_gemm_peak_picks_a_size_that_fits_the_budget():
    # With a budget no machine meets, the probe must fall back to the smallest size rather than run 4096³.
    peak = h.gemm_peak(threads=1, max_call_s=1e-9, repeats=1, torch=False)
    assert peak["size"] == 1024 and peak["numpy"]["best"] > 0


def test_child_that_exits_before_serving_reports_its_log(tmp_path):
    child = h.ChildProcess([sys.executable, "-c", "print('boom: no port today'); raise SystemExit(3)"],
                           name="dud", workdir=tmp_path)
    with pytest.raises(RuntimeError, match=r"dud exited with 3 before serving:\n.*boom: no port today"):
        child.start(timeout=30)


def test_child_that_never_serves_is_killed_after_the_timeout(tmp_path):
    child = h.ChildProcess([sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(60)"],
                           name="sleeper", workdir=tmp_path)
    with pytest.raises(RuntimeError, match=r"sleeper did not start within 1 s:\n.*waiting"):
        child.start(timeout=1)
    assert child.proc.poll() is not None  # killed, not left behind


def test_child_reads_its_port_and_is_stopped(tmp_path):
    code = ("import os, signal, sys, time\n"
            "path = sys.argv[1]\n"
            "open(path + '.t', 'w').write('4242')\n"
            "os.replace(path + '.t', path)\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
            "while True: sum(range(10000))\n")
    with h.ChildProcess([sys.executable, "-c", code, "{port_file}"], name="fake", workdir=tmp_path) as child:
        assert child.port == 4242 and child.target == "127.0.0.1:4242"
        assert child.rss_kb() > 0
        cpu = child.cpu_seconds()
        assert cpu is not None and cpu >= 0
    assert child.proc.returncode == 0
    assert h.cpu_seconds(child.proc.pid) is None  # reaped: nothing left to read


def test_markdown_tables_reads_every_table_back():
    text = "intro\n\n| a | b |\n|---|---:|\n| 1 | x y |\n| 2 | |\n\nbetween\n| c |\n|---|\n"
    assert h.markdown_tables(text) == [(["a", "b"], [["1", "x y"], ["2", ""]]), (["c"], [])]
    assert h.markdown_tables("no tables") == []
