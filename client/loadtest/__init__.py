"""Load-testing harness for a convcore server: ``python -m client.loadtest --help``.

Closed loop (``--concurrency C``) or open loop (``--rate R``, latency from each request's intended send time), over
one or several client processes, with a summary (requests, req/s, GFLOP/s, latency percentiles, errors by status
code), ``--json`` and ``--plot`` outputs. The statistics live in :mod:`client.loadtest._stats` and need no server.
"""
from ._args import LayerArg, build_parser, parse_args, parse_layer, parse_shape
from ._cli import main
from ._flops import layer_flops, layer_output_shape, model_flops
from ._report import format_summary, to_json, write_json, write_plot
from ._runner import RunConfig, make_input, run
from ._stats import PERCENTILES, Samples, latency_histogram, percentiles, rate_over_time, status_name, summarize
from ._workload import Workload, cleanup, expand_targets, prepare

__all__ = [
    "PERCENTILES",
    "LayerArg",
    "RunConfig",
    "Samples",
    "Workload",
    "build_parser",
    "cleanup",
    "expand_targets",
    "format_summary",
    "latency_histogram",
    "layer_flops",
    "layer_output_shape",
    "main",
    "make_input",
    "model_flops",
    "parse_args",
    "parse_layer",
    "parse_shape",
    "percentiles",
    "prepare",
    "rate_over_time",
    "status_name",
    "summarize",
    "to_json",
    "run",
    "write_json",
    "write_plot",
]
