"""What every benchmark, the tests and the fuzzer share: server child processes, machine info, BENCHMARKS.md sections.

Server processes
    :class:`ChildProcess` runs any command that writes its port to a file once it serves (``{port_file}`` in its
    argv), keeps its output in a log file, reads its CPU time and RSS from ``/proc``, and stops it (SIGTERM, then
    SIGKILL). :class:`ServerProcess` is ``python -m server`` on 127.0.0.1, a free port (``--port 0``), a free metrics
    port, a given model repository, and waits until its health service says SERVING.
Machine info
    :func:`machine_info` (CPU model, core counts, ISA flags avx2 / avx512f / amx, library versions) and
    :func:`gemm_peak` (a measured square sgemm in numpy/OpenBLAS and torch, GFLOP/s); :func:`machine_lines` formats
    both for a report header.
Sections
    :func:`write_section` replaces the part of a Markdown file between two HTML comment markers, atomically, and
    leaves every other section alone.

Nothing in ``convcore/`` imports this package; it imports convcore only inside functions that describe it.
"""
import contextlib
import ctypes
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

__all__ = [
    "ROOT",
    "ChildProcess",
    "ServerProcess",
    "cpu_seconds",
    "gemm_peak",
    "isa_flags",
    "load_average",
    "machine_info",
    "machine_lines",
    "markdown_tables",
    "pin_malloc",
    "rss_kb",
    "set_numpy_blas_threads",
    "source_env",
    "utc_now",
    "write_section",
]

#: The repository root (the folder holding convcore/, server/, benchmarks/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: CPU flags reported in every header: what decides which kernels (ours, OpenBLAS's, oneDNN's) can run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


# ---------------------------------------------------------------------------------------------------- processes
def source_env(extra=None):
    """``os.environ`` with this source tree first on ``PYTHONPATH`` (and `extra` on top).

    A child ``python -m server`` must import the tree the caller runs from, not whatever copy is installed.
    """
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def cpu_seconds(pid):
    """User + system CPU seconds process `pid` has used so far (``/proc/PID/stat``), or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def rss_kb(pid):
    """Resident set size of process `pid` in kB (``VmRSS`` of ``/proc/PID/status``); 0 if it has none.

    Raises
    ------
    OSError
        If the process does not exist (any more).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class ChildProcess:
    """A server-like child process that writes its port to a file once it serves.

    Parameters
    ----------
    argv : list of str
        The command; ``{port_file}`` in any argument is replaced by the port file's path.
    name : str
        For messages and the default log file name.
    workdir : str, optional
        Where the port file and (by default) the log are kept; a new temporary folder if omitted (removed by
        :meth:`cleanup`).
    cwd : str, optional
        The child's working directory (default: the repository root).
    env : dict, optional
        Extra environment variables; the source tree always comes first on ``PYTHONPATH``.
    log_path : str, optional
        Where the child's stdout and stderr go (appended to).
    """

    def __init__(self, argv, name="child", workdir=None, cwd=None, env=None, log_path=None):
        self.name = name
        self._own_workdir = workdir is None
        self.workdir = tempfile.mkdtemp(prefix=f"{name}-") if workdir is None else str(workdir)
        self.port_file = os.path.join(self.workdir, f"{name}-{id(self)}.port")
        self.log_path = log_path or os.path.join(self.workdir, f"{name}-{id(self)}.log")
        self.argv = [a.replace("{port_file}", self.port_file) for a in argv]
        self.cwd = cwd or ROOT
        self.env = dict(env or {})
        self.proc = None
        self.port = None
        self._log = None

    @property
    def target(self):
        """``127.0.0.1:PORT`` once started."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self):
        return None if self.proc is None else self.proc.pid

    def start(self, timeout=60.0):
        """Start the process and wait (at most `timeout` s) until it serves; return self.

        Raises
        ------
        RuntimeError
            If it exits first or does not serve in time (it is killed then); the message holds its log.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.port_file)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=source_env(self.env), stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self.port is None:
            if self.proc.poll() is not None:
                self._close_log()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before serving:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not start within {timeout:g} s:\n{self.log()}")
            try:
                with open(self.port_file) as f:
                    self.port = int(f.read())
            except (FileNotFoundError, ValueError):  # not written yet (writers replace it atomically)
                time.sleep(0.05)
        self._wait_ready(deadline)
        return self

    def _wait_ready(self, deadline):
        """Hook: wait until the process answers (the port file alone says it is bound)."""

    def log(self):
        """Everything the process has written so far."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def cpu_seconds(self):
        """User + system CPU seconds the process has used so far, or None."""
        return None if self.proc is None else cpu_seconds(self.proc.pid)

    def rss_kb(self):
        """Its resident set size in kB (see :func:`rss_kb`)."""
        return rss_kb(self.proc.pid)

    def stop(self, timeout=20.0):
        """SIGTERM and wait for the exit; SIGKILL after `timeout` s (then re-raise). Return the exit code.

        Raises
        ------
        subprocess.TimeoutExpired
            If it had to be killed: a graceful stop that hangs is a finding, not something to hide.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self._close_log()
        return self.proc.returncode

    def kill(self):
        """SIGKILL (like ``kill -9``): no chance to clean up. Return the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()
        return None if self.proc is None else self.proc.returncode

    def cleanup(self):
        """Remove the temporary work folder if this object created it."""
        if self._own_workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            self.cleanup()


class ServerProcess(ChildProcess):
    """``python -m server`` on 127.0.0.1 with a free port and a free metrics port, as a child process.

    Parameters
    ----------
    repository : path
        The model repository folder.
    *args : str
        Extra command-line flags (``"--max-message-mb", "1"``); a later flag overrides ours (``--metrics-port``).
    env : dict, optional
        Extra environment variables.
    cwd : str, optional
        The server's working directory (default: the repository root).
    log_path : str, optional
        Default: ``server-<repository name>-<id>.log`` beside the repository folder.
    """

    def __init__(self, repository, *args, env=None, cwd=None, log_path=None):
        self.repository = str(repository)
        self.args = list(args)
        parent = os.path.dirname(self.repository.rstrip("/")) or "."
        log_path = log_path or os.path.join(parent, f"server-{os.path.basename(self.repository)}-{id(self)}.log")
        super().__init__([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0",
                          "--port-file", "{port_file}", "--metrics-port", "0",
                          "--model-repository", self.repository, *self.args],
                         name="server", workdir=os.path.dirname(log_path), cwd=cwd, env=env, log_path=log_path)

    @classmethod
    def temporary(cls, *args, prefix="server-", env=None):
        """A server whose repository (``models/``), working directory (``work/``) and log (``server.log``) live in a
        new temporary folder (``.base``), which :meth:`cleanup` removes.

        Parameters
        ----------
        *args : str
            Extra command-line flags.
        prefix : str
            Of the temporary folder's name.
        env : dict, optional
            Extra environment variables.
        """
        base = tempfile.mkdtemp(prefix=prefix)
        work = os.path.join(base, "work")
        os.makedirs(work)
        proc = cls(os.path.join(base, "models"), *args, env=env, cwd=work, log_path=os.path.join(base, "server.log"))
        proc.base = base
        proc._own_workdir = True  # the work folder is `base`: cleanup() removes it
        return proc

    def _wait_ready(self, deadline):
        """Ask ``grpc.health.v1`` until it says SERVING (a TLS server is taken as ready once its port is written)."""
        if "--tls-cert" in self.args:
            return
        from server.healthcheck import check

        status = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before serving:\n{self.log()}")
            ok, status = check(self.target, timeout=max(0.1, min(3.0, deadline - time.monotonic())))
            if ok:
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server at {self.target} not SERVING in time ({status}):\n{self.log()}")

    def metrics_port(self, timeout=10.0):
        """The Prometheus port the server logged at start-up (``--metrics-port 0`` picks a free one), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"metrics: http://[^:]+:(\d+)/metrics", self.log())
            if m:
                return int(m.group(1))
            time.sleep(0.05)
        return None

    def threads_line(self):
        """The server's own account of its threads ("8 RPC workers, 1 compute slot(s) x 2 OpenMP thread(s)")."""
        m = re.search(r"threads: (.*?) \(OpenMP", self.log())
        return m.group(1) if m else None


# ---------------------------------------------------------------------------------------------------- machine
def isa_flags(cpuinfo_text=None):
    """{flag: bool} for :data:`ISA_FLAGS`, read from ``/proc/cpuinfo`` (all False where it cannot be read)."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ""
    m = re.search(r"^flags\s*:(.*)$", cpuinfo_text, re.M)
    have = set(m.group(1).split()) if m else set()
    return {flag: flag in have for flag in ISA_FLAGS}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions():
    """Versions of what the benchmarks measure; optional libraries only when this process imported them."""
    import numpy as np

    parts = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for name in ("scipy", "grpc", "torch", "onnxruntime", "onnx"):
        mod = sys.modules.get(name)
        if mod is not None:
            parts.append(f"{'grpcio' if name == 'grpc' else name} {getattr(mod, '__version__', '?')}")
    try:
        import convcore

        parts.append(f"convcore {getattr(convcore, '__version__', '?')} (openmp_enabled={convcore.openmp_enabled()})")
    except ImportError:
        parts.append("convcore not importable")
    return ", ".join(parts)


def machine_info():
    """Describe this machine for a report header.

    Returns
    -------
    dict
        ``model`` (CPU model name), ``cpus`` (os.cpu_count), ``usable`` (CPUs this process may use: affinity and
        cgroup quota, as ``convcore.usable_cpus``), ``isa`` ({flag: bool}), ``kernel_isa`` (the micro-kernel level
        convcore picks, when it says), ``versions`` (str).
    """
    try:
        import convcore

        usable = convcore.usable_cpus()
    except (ImportError, AttributeError):
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from convcore._isa import kernel_isa

        level = kernel_isa()
    except (ImportError, ValueError):
        level = None
    return {"model": _cpu_model(), "cpus": os.cpu_count(), "usable": usable, "isa": isa_flags(),
            "kernel_isa": level, "versions": _versions()}


def set_numpy_blas_threads(threads):
    """Limit numpy's own OpenBLAS to `threads` (numpy ships its own copy; convcore pins only scipy's, to one)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return
    for ctl in ThreadpoolController().lib_controllers:
        if ctl.user_api == "blas" and "numpy" in ctl.filepath:
            ctl.set_num_threads(threads)


def gemm_peak(threads=None, size=None, repeats=3, max_call_s=4.0, torch=True):
    """Measure square float32 GEMM speed: the practical compute ceiling of this machine, now.

    Parameters
    ----------
    threads : int, optional
        Threads for numpy's OpenBLAS and torch (default: the usable CPUs).
    size : int, optional
        The matrices' side. Default: 4096, or the largest of 2048 / 1024 whose one call is estimated (from a 1024³
        probe) to take under `max_call_s` seconds, so the measurement takes a few seconds on any machine.
    repeats : int
        Timed calls per library, after one untimed call; the best is reported (a peak), the median beside it.
    torch : bool
        Also measure ``torch.mm`` when torch can be imported.

    Returns
    -------
    dict
        ``size``, ``threads``, ``repeats`` and, per library (``numpy``, ``torch``), ``{"best": GFLOP/s,
        "median": GFLOP/s}``; ``text``: one line for a report.
    """
    import numpy as np

    if threads is None:
        threads = machine_info()["usable"]
    set_numpy_blas_threads(threads)
    rng = np.random.default_rng(1)

    def timed(fn, n):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return ts

    if size is None:
        a = rng.standard_normal((1024, 1024), dtype=np.float32)
        c = np.empty_like(a)
        # Best of 3 after a warm-up call: one slow probe (OpenBLAS's threads starting, another user's burst) once
        # picked 2048³ on a machine that does 4096³ in 0.75 s; that run read 133 GFLOP/s where 4096³ read 182 a few
        # minutes later, and every row's % of peak was inflated by it.
        probe = min(timed(lambda: np.matmul(a, a, out=c), 3))
        size = next((s for s in (4096, 2048) if probe * (s / 1024) ** 3 <= max_call_s), 1024)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    c = np.empty_like(a)
    flop = 2.0 * size ** 3
    res = {"size": size, "threads": threads, "repeats": repeats}

    def summary(ts):
        return {"best": flop / min(ts) / 1e9, "median": flop / float(np.median(ts)) / 1e9}

    res["numpy"] = summary(timed(lambda: np.matmul(a, b, out=c), repeats))
    th = None
    if torch:
        try:
            import torch as th
        except ImportError:
            th = None
    if th is not None:
        time.sleep(0.2)  # OpenBLAS's workers spin for ~0.1 s after a call: do not let torch's team fight them
        before = th.get_num_threads()
        th.set_num_threads(threads)
        try:
            at, bt, ct = th.from_numpy(a), th.from_numpy(b), th.from_numpy(c)
            res["torch"] = summary(timed(lambda: th.mm(at, bt, out=ct), repeats))
        finally:
            th.set_num_threads(before)
    time.sleep(0.2)
    libs = [f"{'numpy/OpenBLAS' if k == 'numpy' else 'torch'} {res[k]['best']:.0f} (median {res[k]['median']:.0f})"
            for k in ("numpy", "torch") if k in res]
    res["text"] = f"{size}³ sgemm, {threads} thread(s), best of {repeats}: " + ", ".join(libs) + " GFLOP/s"
    return res


def machine_lines(info=None, peak=None):
    """Markdown bullet lines for a report header: CPU, ISA flags, GEMM peak, versions.

    Parameters
    ----------
    info : dict, optional
        From :func:`machine_info` (measured now if omitted).
    peak : dict, optional
        From :func:`gemm_peak` (the line is left out if omitted).
    """
    info = info or machine_info()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["isa"].items())
    amx = any(v for k, v in info["isa"].items() if k.startswith("amx"))
    lines = [f"- Machine: {info['model']}, {info['cpus']} CPUs ({info['usable']} usable)",
             f"- ISA: {flags} (AMX {'present' if amx else 'absent'})"
             + (f"; convcore kernels: {info['kernel_isa']}" if info.get("kernel_isa") else "")]
    if peak:
        lines.append(f"- GEMM peak: {peak['text']}")
    lines.append(f"- Versions: {info['versions']}")
    return lines


def load_average():
    """The 1/5/15-minute load averages as a string ("0.57 1.08 1.51"), or "unknown"."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def utc_now():
    """The time now, as reports print it ("2026-12-01 21:30 UTC")."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


#: glibc's largest allowed M_MMAP_THRESHOLD on 64-bit systems (4 MiB * sizeof(long)).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def pin_malloc():
    """Pin glibc's mmap and trim thresholds so that large buffers are recycled from the heap, for every contender.

    Without this, an output above glibc's dynamic mmap threshold comes back as a fresh mapping on every call and is
    page-faulted in full each time; whether that happens depends on what the process allocated before, so the same
    torch layer measured 99 or 298 GFLOP/s (PERF-NOTES). convcore's plans reuse their buffers anyway; torch allocates
    its output per call, so this is what keeps a comparison about the kernels.

    Returns
    -------
    str
        What was done, for the report.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok_mmap = libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD_MAX)
        ok_trim = libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        return "not pinned (no glibc mallopt)"
    if ok_mmap != 1 or ok_trim != 1:
        return f"mallopt refused (mmap: {ok_mmap}, trim: {ok_trim})"
    return "mallopt M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=1 GiB"


# ---------------------------------------------------------------------------------------------------- sections
def write_section(path, section, start, end):
    """Put `section` between the markers `start` and `end` of the Markdown file `path`, atomically.

    The text between the markers is replaced (the markers are added around `section` if it lacks them); a file
    without the markers gets the section appended; a missing file is created with a ``# Benchmarks`` title.
    Everything outside the markers is kept byte for byte.

    Parameters
    ----------
    path : str
    section : str
        The new section, with or without the markers.
    start, end : str
        The markers, e.g. ``"<!-- service-bench:start -->"``.
    """
    body = section.strip("\n")
    if not body.startswith(start):
        body = start + "\n" + body
    if not body.endswith(end):
        body = body + "\n" + end
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = None
    if text is None:
        new = "# Benchmarks\n\n" + body + "\n"
    elif start in text and end in text[text.index(start):]:
        i = text.index(start)
        j = text.index(end, i) + len(end)
        new = text[:i] + body + text[j:]
    else:
        new = text.rstrip("\n") + "\n\n" + body + "\n"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)


def markdown_tables(text):
    """Every Markdown table in `text` as (header cells, data rows of cells): how tests read a written section back."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append((current[0], current[2:]))  # current[1] is the |---| separator
            current = []
    return tables


def main(argv=None):
    """``python -m benchmarks``: print this machine's info (and its GEMM peak) as JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks", description="Print this machine's CPU, ISA flags and "
                                "measured GEMM peak as JSON.")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM measurement")
    p.add_argument("--threads", type=int, default=None, help="GEMM threads (default: the usable CPUs)")
    args = p.parse_args(argv)
    info = machine_info()
    if not args.no_gemm:
        info["gemm_peak"] = gemm_peak(args.threads)
        info["versions"] = _versions()  # torch is imported now
    print(json.dumps(info, indent=2))
    return 0
