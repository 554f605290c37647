"""Unit tests of the load-test harness that need no server: statistics, the layer grammar, FLOPs, the report."""
import io
import json

import numpy as np
import pytest

from client.loadtest import (
    PERCENTILES,
    RunConfig,
    Samples,
    build_parser,
    expand_targets,
    format_summary,
    latency_histogram,
    layer_flops,
    layer_output_shape,
    model_flops,
    parse_args,
    parse_layer,
    parse_shape,
    percentiles,
    rate_over_time,
    status_name,
    summarize,
    to_json,
)
from client.loadtest._progress import Progress
from client.loadtest._runner import _Schedule

# ---------------------------------------------------------------------------------------------------- percentiles


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001, 20_000])
def test_percentiles_match_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.lognormal(mean=0.0, sigma=1.0, size=n)
    qs = [0, 1, 25, 50, 90, 99, 99.9, 99.99, 100]
    np.testing.assert_allclose(percentiles(values, qs), np.percentile(values, qs), rtol=1e-12, atol=0)


def test_percentiles_with_ties_and_unsorted_input():
    values = [5.0, 1.0, 1.0, 3.0, 3.0, 3.0, 9.0, 2.0]
    np.testing.assert_allclose(percentiles(values, PERCENTILES), np.percentile(values, PERCENTILES), rtol=1e-12)


def test_percentiles_of_nothing_are_nan_and_bad_q_is_refused():
    assert np.all(np.isnan(percentiles([], (50, 99))))
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentiles([1.0, 2.0], (101,))
    with pytest.raises(ValueError):
        percentiles([1.0, 2.0], (-1,))


# ---------------------------------------------------------------------------------------------------- histogram


def test_latency_histogram_counts_every_value_and_agrees_with_numpy():
    rng = np.random.default_rng(1)
    values = rng.lognormal(0.0, 1.5, size=5000)
    edges, counts = latency_histogram(values, bins=30)
    assert edges.shape == (31,) and counts.shape == (30,)
    assert counts.sum() == values.size
    assert edges[0] == values.min() and edges[-1] == values.max()
    np.testing.assert_allclose(np.diff(np.log(edges)), np.log(edges[-1] / edges[0]) / 30, rtol=1e-9)
    np.testing.assert_array_equal(counts, np.histogram(values, bins=edges)[0])


def test_latency_histogram_linear_single_value_and_empty():
    edges, counts = latency_histogram(np.arange(1, 101, dtype=float), bins=10, log=False)
    np.testing.assert_array_equal(counts, [10] * 10)
    edges, counts = latency_histogram([2.5, 2.5, 2.5], bins=5)
    assert counts.sum() == 3
    edges, counts = latency_histogram([], bins=5)
    assert edges.size == 0 and counts.size == 0


def test_rate_over_time():
    times = np.arange(0, 3, 0.01)  # 100 events per second for 3 s
    centers, rates = rate_over_time(times, window=1.0, t0=0.0, t1=3.0)
    np.testing.assert_allclose(centers, [0.5, 1.5, 2.5])
    np.testing.assert_allclose(rates, [100, 100, 100])


# ---------------------------------------------------------------------------------------------------- summary


def _samples(start, latency, status=None, lag=None):
    start = np.asarray(start, dtype=float)
    return Samples(start, np.asarray(latency, dtype=float),
                   np.zeros(start.size, np.int32) if status is None else np.asarray(status, np.int32),
                   np.zeros(start.size) if lag is None else np.asarray(lag, dtype=float))


def test_summarize_drops_warmup_counts_errors_and_matches_numpy():
    rng = np.random.default_rng(7)
    n = 4000
    start = np.sort(rng.uniform(0.0, 5.0, size=n))
    latency = rng.lognormal(np.log(2e-3), 0.5, size=n)
    status = np.zeros(n, np.int32)
    status[::100] = 14  # UNAVAILABLE
    status[::250] = 4   # DEADLINE_EXCEEDED (overwrites some)
    s = summarize(_samples(start, latency, status), warmup=1.0, duration=4.0, flops_per_request=2_000_000)
    measured = start >= 1.0
    n_meas = int(measured.sum())
    assert s["requests"] == n_meas
    errs = status[measured]
    assert s["errors"] == int(np.count_nonzero(errs)) and s["ok"] == n_meas - s["errors"]
    assert s["errors_by_code"] == {"UNAVAILABLE": int(np.sum(errs == 14)), "DEADLINE_EXCEEDED": int(np.sum(errs == 4))}
    assert list(s["errors_by_code"]) == ["UNAVAILABLE", "DEADLINE_EXCEEDED"]  # most frequent first
    lat_ms = latency[measured] * 1e3
    for q in PERCENTILES:
        assert s["latency_ms"][f"p{q:g}"] == pytest.approx(np.percentile(lat_ms, q), rel=1e-12)
    assert s["latency_ms"]["min"] == pytest.approx(lat_ms.min())
    assert s["latency_ms"]["max"] == pytest.approx(lat_ms.max())
    assert s["latency_ms"]["mean"] == pytest.approx(lat_ms.mean())
    elapsed = max(4.0, float(np.max(start[measured] + latency[measured])) - 1.0)
    assert s["elapsed_s"] == pytest.approx(elapsed)
    assert s["req_per_s"] == pytest.approx(n_meas / elapsed)
    assert s["gflops"] == pytest.approx(s["ok"] * 2e6 / elapsed / 1e9)
    json.dumps(s)  # plain numbers only


def test_summarize_of_a_run_with_no_request():
    s = summarize(Samples(), warmup=1.0, duration=2.0)
    assert s["requests"] == 0 and s["req_per_s"] == 0 and s["gflops"] is None
    assert s["latency_ms"]["p50"] is None and s["latency_ms"]["min"] is None
    json.dumps(s)


def test_samples_concatenate_sorts_by_start():
    a = _samples([0.3, 0.1], [1, 2], [0, 14])
    b = _samples([0.2], [3], [4])
    merged = Samples.concatenate([a, Samples(), b])
    np.testing.assert_array_equal(merged.start, [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(merged.latency, [2, 3, 1])
    np.testing.assert_array_equal(merged.status, [14, 4, 0])


def test_status_names():
    assert status_name(0) == "OK" and status_name(14) == "UNAVAILABLE" and status_name(-1) == "CLIENT_ERROR"
    assert status_name(99) == "STATUS_99"


# ---------------------------------------------------------------------------------------------------- schedule


def test_open_loop_schedule_splits_indices_across_processes():
    cfg = RunConfig(target="x:1", model="m", input_shape=(1, 1, 4, 4), dtype="float32", concurrency=4,
                    duration=1.0, warmup=0.5, rate=10.0, processes=3)
    scheds = [_Schedule(cfg, p, origin=100.0) for p in range(3)]
    assert sum(s.scheduled for s in scheds) == 15  # 1.5 s at 10 req/s
    dues = sorted(s.due(k) for s in scheds for k in range(s.scheduled))
    np.testing.assert_allclose(dues, 100.0 + np.arange(15) / 10.0)
    assert [cfg.threads_of(i) for i in range(3)] == [2, 1, 1]


# ---------------------------------------------------------------------------------------------------- arguments


def test_parse_layer_examples():
    layer = parse_layer("3x3,64->64,same,relu")
    assert layer.kernel_size == (3, 3) and (layer.in_channels, layer.out_channels) == (64, 64)
    assert layer.padding == "same" and layer.activation == "relu" and layer.bias
    assert layer.kernel_shape == (64, 64, 3, 3)
    layer = parse_layer("7x7, 3->64, s2, p3, relu6, nobias")
    assert (layer.strides, layer.padding, layer.activation, layer.bias) == (2, 3, "relu6", False)
    layer = parse_layer("3x3,144->144,same,g144")
    assert layer.groups == 144 and layer.kernel_shape == (144, 1, 3, 3)
    layer = parse_layer("3,64->32,causal,d2")
    assert layer.kernel_size == (3,) and layer.dilation == 2
    assert parse_layer("3x3x3,8->16,valid").kernel_shape == (16, 8, 3, 3, 3)
    assert parse_layer(layer.describe()) == layer  # describe() round-trips


@pytest.mark.parametrize("text, match", [
    ("3x3", "KERNEL,CIN->COUT"),
    ("3x3,64-64", "CIN->COUT"),
    ("3x0,64->64", "positive integer"),
    ("3x3x3x3,4->4", "1 to 3"),
    ("3x3,64->64,bogus", "unknown layer option 'bogus'"),
    ("3x3,64->64,same,valid", "padding twice"),
    ("3x3,64->60,g8", "must divide"),
    ("3x3,4->4,causal", "1-D"),
    ("3x3,4->4,s0", ">= 1"),
])
def test_parse_layer_refuses_with_a_clear_message(text, match):
    with pytest.raises(ValueError, match=match):
        parse_layer(text)


def test_parse_shape():
    assert parse_shape("1x64x56x56") == (1, 64, 56, 56)
    with pytest.raises(ValueError, match="rank 3 to 5"):
        parse_shape("64x56")
    with pytest.raises(ValueError, match="positive integer"):
        parse_shape("1x-3x4")


def test_parse_args_defaults_and_cross_checks(capsys, monkeypatch):
    args = parse_args(["--target", "127.0.0.1:1234", "--layer", "3x3,64->64,same,relu", "--input", "1x64x56x56"])
    assert args.dtype == "float32" and args.concurrency == 1 and args.rate is None and args.processes == 1
    args = parse_args(["--target", "a:1,b:2", "--model", "m", "--input", "2x3x8x8", "--rate", "50",
                       "--concurrency", "8", "--processes", "2", "--duration", "2.5", "--warmup", "0"])
    assert args.target == "a:1,b:2" and args.rate == 50.0 and args.warmup == 0.0 and args.dtype is None
    assert parse_args(["--target", "dns:///server:50051", "--model", "m", "--input", "1x3x8x8"]).target

    bad = [
        (["--layer", "3x3,64->64", "--input", "1x32x8x8"], "CIN=64"),
        (["--layer", "3x3,64->64", "--input", "1x64x8"], "rank"),
        (["--layer", "9x9,4->4", "--input", "1x4x4x4"], "larger than the padded input"),
        (["--model", "m", "--input", "1x4x4x4", "--concurrency", "2", "--processes", "3"], "--processes 3"),
        (["--model", "m", "--input", "1x4x4x4", "--target", "nohost"], "HOST:PORT"),
        (["--model", "m", "--input", "1x4x4x4", "--duration", "0"], "positive"),
        (["--model", "m", "--layer", "1x1,4->4", "--input", "1x4x4x4"], "not allowed with"),
        (["--model", "m"], "--input"),
    ]
    for argv, match in bad:
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        assert match in capsys.readouterr().err, argv

    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--input", "1x4x4x4", "--plot", "x.png"])
    assert "needs matplotlib" in capsys.readouterr().err


def test_help_documents_the_layer_grammar():
    text = build_parser().format_help()
    for flag in ("--target", "--model", "--layer", "--input", "--dtype", "--concurrency", "--duration", "--warmup",
                 "--rate", "--processes", "--json", "--plot", "--timeout"):
        assert flag in text
    assert "CIN->COUT" in text


def test_expand_targets_resolves_dns_names():
    assert expand_targets("h1:1,h2:2,h1:1") == ["h1:1", "h2:2"]
    addrs = expand_targets("dns:///localhost:50051")
    assert addrs and all(a.endswith(":50051") for a in addrs)
    assert "127.0.0.1:50051" in addrs or "[::1]:50051" in addrs


# ---------------------------------------------------------------------------------------------------- FLOPs


_LAYERS = [
    ((1, 64, 56, 56), (64, 64, 3, 3), dict(padding="same")),
    ((8, 3, 224, 224), (64, 3, 7, 7), dict(strides=2, padding=3)),
    ((2, 16, 15, 17), (32, 16, 3, 3), dict(strides=2, padding="same")),
    ((1, 144, 56, 56), (144, 1, 3, 3), dict(padding="same", groups=144)),
    ((1, 1024, 14, 14), (2048, 1024, 1, 1), dict(strides=2)),
    ((1, 64, 1000), (64, 64, 3), dict(padding="causal", dilation=2)),
    ((1, 8, 6, 10, 12), (16, 8, 3, 3, 3), dict(padding="same", strides=(1, 2, 2))),
    ((1, 10, 12, 4), (3, 3, 4, 8), dict(data_format="channels_last", padding=((1, 0), (2, 1)))),
    ((1, 4, 10, 12), (3, 3, 2, 8), dict(kernel_layout="HWIO", groups=2, dilation=(2, 1))),
]


@pytest.mark.parametrize("x_shape, k_shape, opts", _LAYERS)
def test_layer_shapes_and_flops_agree_with_convcore(x_shape, k_shape, opts):
    convcore = pytest.importorskip("convcore")
    from convcore._spec import normalize

    assert layer_output_shape(x_shape, k_shape, **opts) == tuple(convcore.output_shape(x_shape, k_shape, **opts))
    flops, shape = layer_flops(x_shape, k_shape, activation="relu", **opts)
    assert flops == normalize(x_shape, k_shape, **opts).flops(x_shape[0])
    assert shape == tuple(convcore.output_shape(x_shape, k_shape, **opts))


def test_model_flops_chains_the_layers():
    layers = [{"kernel_shape": (16, 3, 3, 3), "padding": "same", "strides": 2},
              {"kernel_shape": (32, 16, 1, 1)}]
    flops, shape = model_flops((2, 3, 32, 32), layers)
    assert shape == (2, 32, 16, 16)
    assert flops == 2 * 2 * 16 * 16 * 16 * 3 * 9 + 2 * 2 * 32 * 16 * 16 * 16
    # The formula of the issue, on the ResNet 3x3 64->64 layer: 2·N·Cout·prod(out)·Cin/g·prod(k)
    assert layer_flops((1, 64, 56, 56), (64, 64, 3, 3), padding="same")[0] == 2 * 64 * 56 * 56 * 64 * 9


# ---------------------------------------------------------------------------------------------------- report


def _params(**kw):
    p = {"target": "127.0.0.1:1", "model": "m", "layer": "3x3,4->4,same", "input": "1x4x8x8", "output": "1x4x8x8",
         "dtype": "float32", "mode": "closed", "concurrency": 2, "rate": None, "processes": 1, "duration_s": 2.0,
         "warmup_s": 0.5, "flops_per_request": 2 * 4 * 64 * 4 * 9}
    p.update(kw)
    return p


def test_format_summary_and_json():
    rng = np.random.default_rng(3)
    samples = _samples(np.linspace(0, 2.5, 500), rng.uniform(1e-3, 3e-3, 500), [0] * 499 + [14])
    summary = summarize(samples, warmup=0.5, duration=2.0, flops_per_request=_params()["flops_per_request"])
    text = format_summary(summary, _params())
    for word in ("requests", "req/s", "GFLOP/s", "p50", "p90", "p99", "p99.9", "max", "UNAVAILABLE 1"):
        assert word in text
    text = format_summary(summary, _params(rate=100.0, mode="open"))
    assert "open loop at 100 req/s" in text and "send lag" in text
    doc = json.loads(json.dumps(to_json(summary, _params(), samples, warmup=0.5)))
    assert doc["summary"]["requests"] == summary["requests"]
    assert doc["parameters"]["concurrency"] == 2
    assert sum(doc["histogram_ms"]["counts"]) == summary["requests"]


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from client.loadtest import write_plot

    rng = np.random.default_rng(4)
    samples = _samples(np.linspace(0, 3, 300), rng.lognormal(np.log(2e-3), 0.4, 300), [0] * 298 + [4, 14])
    summary = summarize(samples, warmup=1.0, duration=2.0)
    path = tmp_path / "plot.png"
    write_plot(str(path), samples, summary, _params(), warmup=1.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_line_on_a_pipe_prints_every_few_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("client.loadtest._progress.time.monotonic", lambda: now[0])
    out = io.StringIO()
    p = Progress(out, warmup=1.0, duration=10.0, tty=False, log_every=5.0)
    for i in range(60):  # 12 s of ticks, 0.2 s apart, 100 requests per tick
        now[0] = i * 0.2
        p(now[0], i * 100, i // 10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at 0, 5 and 10 s
    assert "warm-up" in lines[0] and "measure" in lines[1] and "errors" in lines[1]
    assert "500.0 req/s" in lines[2]  # 100 requests per 0.2 s tick
    tty = io.StringIO()
    p = Progress(tty, warmup=0.0, duration=1.0, tty=True)
    p(0.1, 5, 0)
    p.close()
    assert tty.getvalue().startswith("\r[") and tty.getvalue().endswith("\n")
