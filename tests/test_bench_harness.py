"""`fasthg bench`'s harness on small shapes: every row it reports, and its files. (Timings
themselves are benchmarks, never tested.)"""
import json

import pytest
import torch

from fasthg import bench


@pytest.mark.slow  # every op and a model through the whole harness: 10-15 s on 2 cores
def test_rows_tables_and_files(tmp_path):
    result = bench.run(device="cpu", levels=[8], channels=[6], repeats=2, models=["hg1"], model_repeats=1,
                       image_size=64, out_dir=str(tmp_path), progress=False, dtypes=[torch.float32])
    assert result["copy_gb_s"] > 0 and result["allocator"] == "malloc, default"
    ops = [r for r in result["rows"] if "gb_s" in r]
    assert {(r["op"], r["mode"]) for r in ops} == set(bench.TRAFFIC)
    for r in ops:
        n, c, h, w = r["shape"]
        assert (c, h) == (6, 8) and r["bytes"] == bench.TRAFFIC[r["op"], r["mode"]] * n * c * h * w * 4
        assert r["gb_s"] > 0 and r["of_copy"] > 0 and r["median_ms"] > 0 and r["peak_mb"] >= 0
        if r["backend"] == "eager":
            assert r["speedup"] == 1.0
    # Eager's fused-in-nothing BN-ReLU allocates more than the output the native op writes.
    out_mb = 4 * 6 * 8 * 8 * 4 / 2**20
    native = [r for r in ops if r["backend"] == "native" and r["mode"] == "eval forward"]
    assert all(r["peak_mb"] == pytest.approx(out_mb, rel=0.05) for r in native)
    steps = [r for r in result["rows"] if r["op"] == "hg1 train step"]
    assert {r["backend"] for r in steps} >= {"eager", "auto"}
    assert {(r["layout"], r["dtype"]) for r in steps} == {("nchw", "float32"), ("nhwc", "float32")}
    for r in steps:
        assert r["images_per_s"] > 0 and r["peak_mb"] > r["saved_mb"] > 1
    inference = [r for r in result["rows"] if r["op"] == "hg1 inference"]
    assert {r["backend"] for r in inference} == {r["backend"] for r in steps}
    assert all(r["images_per_s"] > 0 and r["mode"] == "forward" and "saved_mb" not in r for r in inference)
    table = (tmp_path / "bench.md").read_text()
    rows_part, traffic_part = table.split("\n\n", 1)  # the rows, then the traffic table (fasthg.bench.traffic)
    assert rows_part.count("\n") == len(result["rows"]) + 2 + bool(bench.spread_warning(result))
    assert traffic_part.startswith("BN-ReLU-conv1x1 unit, compulsory bytes (fasthg.bench.traffic), batch 4;")
    assert all(r["spread"] >= 0 and r["varied"] == (r["spread"] > bench.SPREAD_LIMIT) for r in result["rows"])
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.slow
def test_compile_rows_come_from_compiled_code(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    result = bench.run(device="cpu", levels=[8, 4], channels=[6], repeats=1, models=[], compile=True,
                       progress=False, dtypes=[torch.float32])
    assert sum(r["backend"] == "compile" for r in result["rows"]) == 2 * 2 * len(bench.TRAFFIC)  # levels x layouts x op modes
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 4  # both ops' compositions were compiled, not run eagerly


def test_bars_are_checked_against_the_native_rows_of_the_run():
    row = lambda op, mode, level, backend, speedup: {  # noqa: E731
        "op": op, "mode": mode, "level": level, "shape": [4, 256, level, level], "layout": "nhwc",
        "dtype": "float32", "backend": backend, "median_ms": 1.0, "speedup": speedup, "peak_mb": 1.0}
    rows = [row("bn_relu", "train forward+backward", 64, "native", 1.7),
            row("bn_relu", "train forward+backward", 32, "native", 1.07),
            row("bn_relu", "train forward+backward", 32, "eager", 1.0),
            row("bn_relu", "train forward+backward", 16, "native", 0.9),  # no bar below 32x32
            row("bn_relu", "eval forward", 64, "native", 1.2),  # no bar for eval
            row("upsample_add", "forward+backward", 32, "native", 2.0)]
    checks = bench.bar_checks(rows)
    assert [(c["op"], c["level"], c["bar"], c["met"]) for c in checks] == [
        ("bn_relu", 64, 1.6, True), ("bn_relu", 32, 1.6, False), ("upsample_add", 32, 2.0, True)]
    text = bench.table({"device": "CPU", "torch": "x", "allocator": "malloc", "copy_gb_s": 1.0, "rows": rows,
                        "bars": checks})
    assert "Bars (native vs eager, same run): 2 of 3 met" in text
    assert "- bn_relu train forward+backward 256x32x32 nhwc float32: 1.07x, bar 1.6x: NOT met" in text
    # A case measured twice (the same native row again) is one bar, not two.
    assert len(bench.bar_checks(rows + rows)) == len(checks)


def test_op_inputs_rotate_through_twice_the_last_level_cache():
    import torch

    def make():
        return torch.zeros(1024), 3  # 4 KiB of tensors (and a value that is not one)

    rotation = bench.Rotation(make, cache_bytes=10 << 10)
    assert len(rotation.sets) == 5  # 20 KiB / 4 KiB
    seen = [id(rotation.next()[0]) for _ in range(10)]
    assert len(set(seen)) == 5 and seen[:5] == seen[5:]  # every set, in turn, before any comes back
    assert len(bench.Rotation(make, cache_bytes=1 << 30, limit=3).sets) == 3
    assert len(bench.Rotation(make, cache_bytes=0).sets) == 1
    assert bench.last_level_cache_bytes(torch.device("cpu")) >= 1 << 20


def test_spread_is_the_interquartile_range_over_the_median():
    assert bench.spread([2.0] * 5) == 0.0
    assert bench.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.0 - 2.0) / 3.0)
    assert bench.spread([1.0, 1.0, 1.0, 1.0, 50.0]) == 0.0  # one stray slow call is not a busy machine
    assert bench.spread([1.0, 9.0]) == 0.0  # too few repeats to tell


def _busy_machine(monkeypatch):
    """Timings as a busy machine gives them: steady eager calls, native ones anywhere from 1x to 30x."""
    from fasthg.bench import report

    def samples(fns, device, warmup=3, repeats=20):
        return {k: [1e-3] * 5 if k == "eager" else [1e-3, 8e-3, 2e-3, 30e-3, 16e-3] for k in fns}

    monkeypatch.setattr(report, "interleaved_samples", samples)


def test_rows_whose_repeats_vary_are_flagged_in_the_rows_table_and_file(monkeypatch, tmp_path):
    _busy_machine(monkeypatch)
    result = bench.run(device="cpu", levels=[8], channels=[6], repeats=5, models=[], out_dir=str(tmp_path),
                       progress=False, dtypes=[torch.float32])
    rows = result["rows"]
    native = [r for r in rows if r["backend"] == "native"]
    assert native and all(r["varied"] and r["spread"] == pytest.approx(1.75) and r["median_ms"] == pytest.approx(8.0)
                          for r in native)
    assert not any(r["varied"] for r in rows if r["backend"] == "eager")
    warning = (f"WARNING: {len(native)} of {len(rows)} rows varied by more than 50% between repeats "
               "(spread = interquartile range / median; marked !): the machine was busy; their medians mean little")
    assert bench.spread_warning(result) == warning
    md = (tmp_path / "bench.md").read_text()
    assert warning in md and md.count("| 8.000 | 175% ! |") == len(native)
    assert md.count("| 1.000 | 0% |") == len(rows) - len(native)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["spread"] == rows[0]["spread"]


def test_bench_command_warns_last_when_repeats_vary(monkeypatch, capsys):
    from fasthg import cli

    _busy_machine(monkeypatch)
    assert cli.main(["bench", "--device", "cpu", "--levels", "8", "--channels", "6", "--model", "none",
                     "--dtypes", "float32", "--out", ""]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("WARNING: ") and "rows varied by more than 50% between repeats" in out[-1]


def test_steady_repeats_give_no_warning():
    rows = [{"op": "bn_relu", "spread": 0.1}, {"op": "bn_relu"}]  # (rows of older runs carry no spread)
    assert bench.spread_warning({"rows": rows}) == ""


@pytest.mark.parametrize("argv,message", [
    (["--model", "hg3"], "unknown model hg3: expected hg1, hg2, hg4, hg8"),
    (["--levels", "64,x"], "expected comma-separated positive integers, got '64,x'"),
    (["--channels", "0"], "expected comma-separated positive integers, got '0'"),
    (["--dtypes", "float32,int8"], "unknown dtype int8: expected float32, bfloat16, float16"),
    (["--model-layouts", "nchw,nwhc"], "unknown layout nwhc: expected nchw, nhwc"),
])
def test_bench_command_refuses_bad_arguments(argv, message, capsys):
    from fasthg import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--out", ""] + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_hourglass_shapes_are_the_models_own():
    shapes = bench.hourglass_shapes("hg2", 256)
    # the skip merges at every level of the depth-4 hourglass, largest first
    assert shapes["upsample_add"] == [(256, 64, 64), (256, 32, 32), (256, 16, 16), (256, 8, 8)]
    # stem: 64 channels at 128x128; residuals: their input and half their output channels
    bn = shapes["bn_relu"]
    assert bn[0] == (64, 128, 128) and (64, 64, 64) in bn
    assert all((c, s, s) in bn for c in (128, 256) for s in (64, 32, 16, 8, 4))
    assert len(bn) == 12 and bench.hourglass_shapes("hg1", 128)["upsample_add"][0] == (256, 32, 32)


def test_dtypes_choose_the_op_rows_dtypes():
    import torch

    result = bench.run(device="cpu", levels=[4], channels=[8], repeats=1, models=[], out_dir=None, progress=False,
                       dtypes=[torch.bfloat16, torch.float16])
    rows = [r for r in result["rows"] if "gb_s" in r]
    assert {r["dtype"] for r in rows} == {"bfloat16", "float16"}
    assert all(r["bytes"] == bench.TRAFFIC[r["op"], r["mode"]] * 4 * 8 * 4 * 4 * 2 for r in rows)


@pytest.mark.parametrize("bf16_instructions", [False, True])
def test_default_dtypes_add_bfloat16_where_the_device_computes_it(monkeypatch, bf16_instructions):
    monkeypatch.setattr(bench.device_info, "cpu_computes_bf16", lambda: bf16_instructions)
    assert bench.default_dtypes(torch.device("cpu")) == [torch.float32] + [torch.bfloat16] * bf16_instructions
    assert bench.default_dtypes(torch.device("cuda")) == [torch.float32, torch.bfloat16]
    result = bench.run(device="cpu", levels=[4], channels=[8], repeats=1, models=[], out_dir=None, progress=False)
    assert {r["dtype"] for r in result["rows"]} == ({"float32", "bfloat16"} if bf16_instructions else {"float32"})


def test_cpu_bf16_probe_answers_a_bool():
    from fasthg.device import cpu_computes_bf16

    assert cpu_computes_bf16() in (True, False)


@pytest.mark.slow  # a model's step and inference in every layout and dtype
def test_models_run_in_each_layout_and_autocast_dtype():
    import torch

    result = bench.run(device="cpu", levels=[], channels=[8], repeats=1, models=["hg1"], model_repeats=1,
                       image_size=64, out_dir=None, progress=False, dtypes=[torch.float32, torch.bfloat16],
                       model_layouts=["nhwc"])
    steps = {(r["dtype"], r["backend"]): r for r in result["rows"] if r["op"] == "hg1 train step"}
    assert {r["layout"] for r in result["rows"]} == {"nhwc"} and {d for d, _ in steps} == {"float32", "bfloat16"}
    # under autocast the activations saved for backward are bfloat16: about half the bytes, plus
    # the bfloat16 copies of the weights that autocast (and the fused 1x1 unit) cast and save,
    # which at this small image are most of it
    from fasthg.models import PRESETS

    weights_mb = sum(p.numel() for p in PRESETS["hg1"]().parameters()) * 2 / 2 ** 20
    for (dtype, backend), r in steps.items():
        if dtype == "bfloat16":
            assert r["saved_mb"] < 0.6 * steps["float32", backend]["saved_mb"] + weights_mb, (backend, r["saved_mb"])


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    from fasthg.bench import cases

    monkeypatch.setitem(cases.CALLS, "bn_relu", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run(device="cpu", levels=[4], channels=[8], repeats=1, models=[], out_dir=str(tmp_path), progress=False)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["complete"] is False and saved["rows"]
    assert {r["op"] for r in saved["rows"]} == {"upsample_add"}
    table = (tmp_path / "bench.md").read_text()
    assert table.startswith("(incomplete") and table.count("| upsample_add |") == len(saved["rows"])
    assert not list(tmp_path.glob("*.tmp"))


def test_chart_has_a_panel_per_op_and_mode_and_one_for_the_models(tmp_path):
    """bench.png: eager rows are the baseline, not bars; each fused op and mode gets a panel,
    all model rows share one, and a run with nothing to compare draws nothing."""
    pytest.importorskip("matplotlib")
    import matplotlib.image

    from fasthg.bench.chart import speedup_chart

    def row(op, mode, level, backend, speedup, layout="nchw", **extra):
        return dict(op=op, mode=mode, level=level, shape=[4, 256, level, level], dtype="float32", layout=layout,
                    backend=backend, speedup=speedup, **extra)

    rows = [row(op, mode, level, b, s, layout) for op, mode in (("bn_relu", "train forward+backward"),
                                                                ("upsample_add", "forward"))
            for level in (64, 32) for layout in ("nchw", "nhwc") for b, s in (("eager", 1.0), ("native", 1.7))]
    rows += [dict(row(f"hg2 {what}", mode, 256, b, s, layout), shape=[4, 3, 256, 256], images_per_s=3.0)
             for what, mode in (("train step", "forward+backward"), ("inference", "forward"))
             for layout in ("nchw", "nhwc") for b, s in (("eager", 1.0), ("native", 1.2), ("auto", 1.2))]
    path = str(tmp_path / "bench.png")
    assert speedup_chart({"device": "CPU", "rows": rows}, path, bench.BARS, bench.BAR_LEVELS) == 3
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 2 * height > 0  # three panels side by side
    assert speedup_chart({"device": "CPU", "rows": [r for r in rows if r["backend"] == "eager"]},
                         str(tmp_path / "none.png"), bench.BARS) == 0
    assert not (tmp_path / "none.png").exists() and not list(tmp_path.glob("*.tmp"))
