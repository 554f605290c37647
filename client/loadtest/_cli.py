"""The command: parse, prepare the model, run, summarize, write the outputs, clean up."""
import datetime
import os
import sys

from client import ConvError

from ._args import parse_args
from ._progress import Progress
from ._report import format_summary, to_json, write_json, write_plot
from ._runner import RunConfig, run
from ._stats import summarize
from ._workload import cleanup, prepare

__all__ = ["main"]


def main(argv=None):
    """Run ``python -m client.loadtest`` with ``argv`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when the run completed with at least one successful request; 1 when the model could not be prepared, a
        client process failed, or every request failed; argparse exits with 2 on a bad command line.
    """
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        workload = prepare(args)
    except ConvError as exc:
        print(f"loadtest: could not prepare the model: {exc}", file=sys.stderr)
        return 1
    cfg = RunConfig(target=args.target, model=workload.model, input_shape=workload.input_shape,
                    dtype=workload.dtype, concurrency=args.concurrency, duration=args.duration,
                    warmup=args.warmup, rate=args.rate, timeout=args.timeout, seed=args.seed,
                    processes=args.processes)
    progress = None if args.quiet else Progress(sys.stderr, warmup=args.warmup, duration=args.duration)
    try:
        samples = run(cfg, progress=progress)
    except RuntimeError as exc:
        print(f"\nloadtest: {exc}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
        if not args.keep_model:
            cleanup(workload)

    summary = summarize(samples, warmup=args.warmup, duration=args.duration, flops_per_request=workload.flops)
    params = {
        "target": args.target,
        "model": workload.model,
        "layer": args.layer.describe() if args.layer is not None else None,
        "input": "x".join(map(str, workload.input_shape)),
        "output": "x".join(map(str, workload.output_shape)),
        "dtype": workload.dtype,
        "mode": "open" if args.rate else "closed",
        "concurrency": args.concurrency,
        "rate": args.rate,
        "processes": args.processes,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "timeout_s": args.timeout,
        "seed": args.seed,
        "flops_per_request": workload.flops,
        "layers": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in layer.items()}
                   for layer in workload.layers],
        "started_at": started.isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    print(format_summary(summary, params))
    if args.json:
        write_json(args.json, to_json(summary, params, samples, warmup=args.warmup))
        print(f"json       {os.path.abspath(args.json)}")
    if args.plot:
        write_plot(args.plot, samples, summary, params, warmup=args.warmup)
        print(f"plot       {os.path.abspath(args.plot)}")
    return 0 if summary["ok"] > 0 else 1
