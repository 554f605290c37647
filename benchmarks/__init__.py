"""Benchmarks and the harness they share with the tests and the fuzzer (not part of the engine: convcore never
imports this package).

``python -m benchmarks.engine``
    convcore against PyTorch, ONNX Runtime and the GEMM limit on a layer suite.
``python -m benchmarks.service``
    The gRPC service: its overhead over the engine, its throughput, and a hand-written grpcio + torch server and a
    gRPC echo beside it in the same run.
``python -m benchmarks.soak``
    Load at concurrency 16 for a while: zero errors and flat server RSS.
``python -m benchmarks``
    This machine's CPU, ISA flags and measured GEMM peak, as JSON.

Each writes its own marked section of BENCHMARKS.md (:func:`benchmarks._harness.write_section`).
"""
from ._harness import (
    ROOT,
    ChildProcess,
    ServerProcess,
    gemm_peak,
    machine_info,
    machine_lines,
    write_section,
)

__all__ = ["ROOT", "ChildProcess", "ServerProcess", "gemm_peak", "machine_info", "machine_lines", "write_section"]
