"""The outputs of a run: the text summary, the JSON document and the PNG plot."""
import json
import math

import numpy as np

from ._stats import PERCENTILES, STATUS_OK, latency_histogram, percentiles, rate_over_time

__all__ = ["JSON_SCHEMA_VERSION", "format_summary", "to_json", "write_json", "write_plot"]

#: Bumped when a key of the JSON document changes meaning or disappears (new keys do not bump it).
JSON_SCHEMA_VERSION = 1


def _fmt(value, spec=".2f"):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _gflops(value):
    # Three significant digits for tiny layers, where "0.00" would say nothing.
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def format_summary(summary, params):
    """The human-readable summary of a run.

    Parameters
    ----------
    summary : dict
        From :func:`~client.loadtest._stats.summarize`.
    params : dict
        The run's parameters (``target``, ``model``, ``layer``, ``input``, ``dtype``, ``mode``, ``concurrency``,
        ``rate``, ``processes``, ``duration_s``, ``warmup_s``, ``flops_per_request``).

    Returns
    -------
    str
        Several lines, no trailing newline.
    """
    what = f"model {params['model']}"
    if params.get("layer"):
        what += f" ({params['layer']})"
    flops = params.get("flops_per_request")
    if flops:
        what += f", {flops / 1e9:.3f} GFLOP/request"
    loop = (f"open loop at {params['rate']:g} req/s (up to {params['concurrency']} in flight)"
            if params.get("rate") else f"closed loop, concurrency {params['concurrency']}")
    lat = summary["latency_ms"]
    lines = [
        f"target     {params['target']}",
        f"workload   {what}; input {params['input']} {params['dtype']}",
        f"load       {loop}, {params['processes']} process(es), {params['duration_s']:g} s measured after "
        f"{params['warmup_s']:g} s warm-up",
        "",
        f"requests   {summary['requests']}  ({summary['ok']} ok, {summary['errors']} errors) in "
        f"{summary['elapsed_s']:.2f} s",
        f"throughput {summary['req_per_s']:.1f} req/s"
        + (f"   {_gflops(summary['gflops'])} GFLOP/s" if summary.get("gflops") is not None else ""),
        "latency ms " + "  ".join(f"{k} {_fmt(lat[k])}" for k in ["min", "p50", "p90", "p99", "p99.9", "max"]),
    ]
    if params.get("rate"):
        lag = summary["send_lag_ms"]
        lines.append(f"send lag   p50 {_fmt(lag['p50'])} ms  p99 {_fmt(lag['p99'])} ms  max {_fmt(lag['max'])} ms "
                     f"(how late requests left after their scheduled time)")
    if summary["errors_by_code"]:
        lines.append("errors     " + ", ".join(f"{k} {v}" for k, v in summary["errors_by_code"].items()))
        if "NOT_SENT" in summary["errors_by_code"]:
            lines.append(f"note       NOT_SENT requests were due before any of the {params['concurrency']} "
                         f"workers was free: the server (or this client) did not keep up with {params['rate']:g} "
                         f"req/s. Their latency counts the wait until the end of the run. Raise --concurrency / "
                         f"--processes, or lower --rate.")
    else:
        lines.append("errors     none")
    return "\n".join(lines)


def to_json(summary, params, samples=None, *, warmup=0.0):
    """The JSON document of a run: every number of the summary, the parameters, and a latency histogram.

    Parameters
    ----------
    summary, params : dict
        As for :func:`format_summary`.
    samples : Samples, optional
        For the histogram (log-spaced bins, milliseconds) of the measured requests.
    warmup : float
        Seconds: samples due earlier are not measured.

    Returns
    -------
    dict
        ``{"schema_version", "parameters", "summary", "histogram_ms"}``; JSON-serializable.
    """
    doc = {"schema_version": JSON_SCHEMA_VERSION, "parameters": params, "summary": summary}
    if samples is not None:
        lat = samples.latency[samples.start >= warmup] * 1e3
        edges, counts = latency_histogram(lat, bins=40)
        doc["histogram_ms"] = {"edges": edges.tolist(), "counts": counts.tolist()}
    return doc


def write_json(path, doc):
    """Write ``doc`` to ``path`` as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")


def write_plot(path, samples, summary, params, *, warmup=0.0):
    """Write a PNG: latency over time (every request, with p50/p99 per second) above a latency histogram.

    Parameters
    ----------
    path : str
    samples : Samples
        The whole run; the warm-up is shaded.
    summary, params : dict
    warmup : float

    Raises
    ------
    ImportError
        If matplotlib is not installed (the parser refuses ``--plot`` before the run in that case).
    """
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_h = fig.subplots(2, 1, height_ratios=(3, 2))
    lat_ms = samples.latency * 1e3
    ok = samples.status == STATUS_OK
    max_points = 50_000  # a scatter of millions of points draws slowly and shows nothing more
    step = max(1, len(samples) // max_points)
    ax_t.scatter(samples.start[ok][::step], lat_ms[ok][::step], s=2, alpha=0.35, color="tab:blue",
                 label="request" + (f" (1 in {step})" if step > 1 else ""), rasterized=True)
    if np.any(~ok):
        ax_t.scatter(samples.start[~ok], lat_ms[~ok], s=8, marker="x", color="tab:red", label="error")
    if len(samples):
        t_end = float(np.max(samples.start + samples.latency))
        # About 40 windows over the run, so the p50/p99 lines follow changes without being mostly noise.
        window = float(np.clip(t_end / 40, 0.1, 5.0))
        edges = np.arange(0.0, t_end + window, window)
        idx = np.digitize(samples.start, edges) - 1
        centers, p50, p99 = [], [], []
        for i in range(len(edges) - 1):
            sel = lat_ms[idx == i]
            if sel.size:
                a, b = percentiles(sel, (50, 99))
                centers.append(edges[i] + window / 2)
                p50.append(a)
                p99.append(b)
        ax_t.plot(centers, p50, color="black", lw=1.5, label=f"p50 per {window:.2g} s")
        ax_t.plot(centers, p99, color="tab:orange", lw=1.5, label=f"p99 per {window:.2g} s")
        ax_r = ax_t.twinx()
        c, r = rate_over_time(samples.start + samples.latency, window, 0.0, t_end)
        ax_r.step(c, r, where="mid", color="tab:green", alpha=0.6, lw=1)
        ax_r.set_ylabel("responses / s", color="tab:green")
        ax_r.set_ylim(bottom=0)
    if warmup > 0:
        ax_t.axvspan(0, warmup, color="0.9", zorder=0, label="warm-up (not measured)")
    ax_t.set_yscale("log")
    ax_t.set_xlabel("time since start (s)" + (" - intended send time" if params.get("rate") else ""))
    ax_t.set_ylabel("latency (ms)")
    ax_t.legend(loc="upper left", fontsize="small")
    loop = f"open loop {params['rate']:g} req/s" if params.get("rate") else f"concurrency {params['concurrency']}"
    ax_t.set_title(f"{params['model']} {params['input']} {params['dtype']}, {loop}: "
                   f"{summary['req_per_s']:.0f} req/s, {summary['errors']} errors")

    measured = lat_ms[samples.start >= warmup]
    edges, counts = latency_histogram(measured, bins=60)
    if counts.size:
        ax_h.stairs(counts, edges, fill=True, alpha=0.7)
        ax_h.set_xscale("log")
        for q, color in zip(PERCENTILES, ("black", "tab:orange", "tab:red", "tab:purple")):
            value = summary["latency_ms"].get(f"p{q:g}")
            if value is not None:
                ax_h.axvline(value, color=color, ls="--", lw=1, label=f"p{q:g} {value:.2f} ms")
        ax_h.legend(fontsize="small")
    ax_h.set_xlabel("latency (ms)")
    ax_h.set_ylabel("requests")
    fig.savefig(path, dpi=100)
