"""The benchmark report code (benchmarks/report.py, bench_layer's grid and cuDNN rules), on CPU from
a fixture results.json of made-up numbers (tests/fixtures/bench_results_FIXTURE.json)."""
import copy
import dataclasses
import json
import os
import re
import struct
import subprocess
import sys

import pytest

from persistrnn.benchmarks import bench_layer, report
from persistrnn.cli import main

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bench_results_FIXTURE.json")
SECTIONS = ["# persistrnn benchmark:", "## Environment", "## Method", "## Forward (inference)",
            "Geometric mean of the speedups", "## Training step (forward + backward)",
            "## Microseconds per step against the floor", "## Memory"]


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def fixture():
    return report.load(FIXTURE)


@pytest.fixture(scope="module")
def rendered(fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", FIXTURE, "--out", str(out)]) == 0
    return out


def test_the_fixture_is_marked_as_one(fixture):
    assert "FIXTURE" in os.path.basename(FIXTURE)
    assert fixture["fixture"] is True and "FIXTURE" in fixture["environment"]["gpu"]


def test_the_markdown_has_every_section_and_says_fixture(rendered, fixture):
    text = (rendered / "report.md").read_text()
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert "FIXTURE: made-up numbers" in text
    for key in ("gpu", "capability", "sms", "clocks", "driver", "cuda", "cudnn", "torch", "triton", "persistrnn",
                "git_commit", "command"):
        assert f"| {key} |" in text
    assert "Source: DESIGN.md" in text  # the floor and where it comes from
    # one table row per case and mode, with median [IQR] of both and a speedup, none where torch.nn ran on
    # both sides (the torch path)
    rows = re.findall(r"^\| (lstm|gru) \| \w+ \| \d+ \| \d+ \| 1024 \| \d( bidir)? \| [\d.]+ \[[\d.]+, [\d.]+\] \| "
                      r"[\d.]+ \[[\d.]+, [\d.]+\] \| ([\d.]+x|- \(torch.nn both sides\)) \| (torch.nn on both sides)?",
                      text, flags=re.M)
    assert len(rows) == len(fixture["cases"])
    torch_path = [c for c in fixture["cases"] if c["path"] == "torch"]
    assert torch_path and sum(r[2].startswith("-") for r in rows) == sum(bool(r[3]) for r in rows) == len(torch_path)
    # the geometric mean is the one of the raw times' medians, over the cases that ran the kernels
    forward = [report.summarize(c)["speedup"] for c in fixture["cases"]
               if c["mode"] == "forward" and c["path"] != "torch"]
    both = sum(c["mode"] == "forward" for c in torch_path)
    assert (f"**{report.geomean(forward):.2f}x** over {len(forward)} cases run by persistrnn's kernels; {both} ran "
            "torch.nn on both sides") in text
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (rendered / image).is_file(), image


def test_the_statistics_are_medians_and_quartiles_of_the_raw_times():
    st = report.stats([4.0, 1.0, 3.0, 2.0, 100.0])
    assert st["median"] == pytest.approx(3.0)
    assert st["q25"] <= 2.0 <= st["median"] <= 4.0 <= st["q75"] < 100.0


def test_the_plots_are_pngs_of_a_sane_size(rendered):
    pngs = sorted(p for p in os.listdir(rendered) if p.endswith(".png"))
    assert {"time_vs_hidden_forward.png", "time_vs_hidden_train.png", "speedup_lstm_forward.png",
            "speedup_gru_train.png", "us_per_step.png"} <= set(pngs)
    for name in pngs:
        width, height = _png_size(rendered / name)
        assert 300 <= width <= 3000 and 200 <= height <= 3000, (name, width, height)
        assert os.path.getsize(rendered / name) > 10_000  # something was drawn


def test_results_json_round_trips_and_rerenders_the_same_report(rendered, fixture, tmp_path):
    again = report.load(rendered / "results.json")
    assert again == fixture
    assert main(["report", str(rendered / "results.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == (rendered / "report.md").read_text()


def _b_from(a, slower_shape):
    """A second result set: the same shapes, one of them twice as slow in persistrnn."""
    b = copy.deepcopy(a)
    for case in b["cases"]:
        if report.case_name(case) == slower_shape:
            case["times_ms"]["persistrnn"] = [2 * t for t in case["times_ms"]["persistrnn"]]
    return b


def test_compare_two_fixtures(fixture, tmp_path):
    shape = report.case_name(fixture["cases"][3])
    a, b = tmp_path / "a_FIXTURE.json", tmp_path / "b_FIXTURE.json"
    a.write_text(json.dumps(fixture))
    b.write_text(json.dumps(_b_from(fixture, shape)))
    out = tmp_path / "diff"
    assert main(["report", "--compare", str(a), str(b), "--out", str(out)]) == 0
    diff = json.loads((out / "compare.json").read_text())
    assert len(diff["rows"]) == len(fixture["cases"]) and diff["unmatched"] == []
    for row in diff["rows"]:
        if row["shape"] == shape:
            assert row["persistrnn"]["ratio"] == pytest.approx(2.0)
            assert row["persistrnn"]["iqr_overlap"] is False
        else:
            assert row["persistrnn"]["ratio"] == pytest.approx(1.0)
            assert row["persistrnn"]["iqr_overlap"] is True
        assert row["torch.nn"]["ratio"] == pytest.approx(1.0)
    text = (out / "compare.md").read_text()
    assert "FIXTURE" in text and f"| {shape} |" in text


def test_pyperf_compare_to_reads_two_suites(fixture, tmp_path):
    shape = report.case_name(fixture["cases"][0])
    for name, results in (("a", fixture), ("b", _b_from(fixture, shape))):
        report.pyperf_suite(results, "forward", str(tmp_path / f"{name}.json"))
    proc = subprocess.run([sys.executable, "-m", "pyperf", "compare_to", str(tmp_path / "a.json"),
                           str(tmp_path / "b.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{shape}-persistrnn" in proc.stdout and "2.00x slower" in proc.stdout


def test_a_fixture_report_is_never_written_under_benchmarks_results(fixture):
    target = os.path.join(report.RESULTS_DIR, "fixture-must-not-exist")
    with pytest.raises(ValueError, match="never written"):
        report.render(fixture, target)
    assert not os.path.exists(target)
    assert main(["report", FIXTURE, "--out", target]) == 2
    assert not os.path.exists(target)


def test_report_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report"])
    assert exc.value.code == 2
    bogus = tmp_path / "other.json"
    bogus.write_text(json.dumps({"rows": []}))
    assert main(["report", str(bogus), "--out", str(tmp_path / "x")]) == 2
    assert "not a persistrnn bench results file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_grid_always_holds_the_flashrnn_shape_and_the_stacked_case():
    full = bench_layer.cases(bench_layer.parse_args([]))
    assert len(full) == 2 * 2 * 3 * (4 * 4 + 1)  # modes x cells x dtypes x (B x H, + the stacked case)
    for args in ([], ["--quick"], ["--batch", "2", "--hidden", "32", "--no-stacked"]):
        cases = bench_layer.cases(bench_layer.parse_args(args))
        flash = [c for c in cases if (c["batch"], c["hidden"], c["seq"], c["layers"]) == (16, 768, 1024, 1)]
        assert len(flash) == len({(c["mode"], c["cell"], c["dtype"]) for c in cases}) > 0
        stacked = [c for c in cases if c["layers"] == 2 and c["bidirectional"]]
        assert bool(stacked) == ("--no-stacked" not in args)
    quick = bench_layer.cases(bench_layer.parse_args(["--quick"]))
    assert len(quick) < len(full) / 5


@pytest.mark.parametrize("kwargs, forward, algo", [
    # H100/H200 (sm_90, 132 SMs): persistent only for fp16 LSTMs of B % 8 == 0, B <= 128, H % 128 == 0
    (dict(cell="lstm", dtype="float16", batch=16, hidden=768), True, "PERSIST_STATIC"),
    (dict(cell="gru", dtype="float16", batch=16, hidden=768), True, "STANDARD"),
    (dict(cell="lstm", dtype="bfloat16", batch=16, hidden=768), True, "STANDARD"),
    (dict(cell="lstm", dtype="float16", batch=1, hidden=768), True, "STANDARD"),
    (dict(cell="lstm", dtype="float16", batch=16, hidden=768, layers=2), True, "STANDARD"),
    (dict(cell="lstm", dtype="float16", batch=16, hidden=768, bidirectional=True), True, "STANDARD"),
    (dict(cell="lstm", dtype="float16", batch=256, hidden=768), True, "STANDARD"),
    (dict(cell="gru", dtype="bfloat16", batch=16, hidden=192), True, "PERSIST_STATIC_SMALL_H"),
    (dict(cell="gru", dtype="bfloat16", batch=16, hidden=192), False, "STANDARD"),
    (dict(cell="lstm", dtype="float32", batch=4, hidden=128), False, "PERSIST_STATIC_SMALL_H"),
    (dict(cell="lstm", dtype="float16", batch=16, hidden=768, capability=(8, 6), sms=84), True, "STANDARD"),
    (dict(cell="gru", dtype="float16", batch=8, hidden=768, capability=(7, 0), sms=80), True, "PERSIST_STATIC"),
    (dict(cell="gru", dtype="float16", batch=8, hidden=768, capability=(7, 5), sms=40), True, "STANDARD"),
])
def test_the_cudnn_algorithm_pytorch_picks(kwargs, forward, algo):
    args = dict(seq=1024, layers=1, bidirectional=False, capability=(9, 0), sms=132, cudnn_version=91000)
    args.update(kwargs)
    args["input_size"] = args["hidden"]
    assert bench_layer.cudnn_algo(forward=forward, **args) == algo


# --- without pyperf -------------------------------------------------------------------------

def test_the_statistics_are_pyperfs():
    pyperf = pytest.importorskip("pyperf")
    import random
    rng = random.Random()
    for n in (1, 2, 5, 8, 20):
        times = [rng.uniform(0.5, 3.0) for _ in range(n)]
        bench = pyperf.Benchmark([pyperf.Run(times, metadata={"name": "x", "unit": "second"}, collect_metadata=False)])
        st = report.stats(times)
        assert st["median"] == pytest.approx(bench.median())
        assert (st["q25"], st["q75"]) == pytest.approx((bench.percentile(25), bench.percentile(75)))


def test_the_report_renders_without_pyperf_and_says_the_suites_were_skipped(monkeypatch, fixture, rendered, tmp_path):
    monkeypatch.setitem(sys.modules, "pyperf", None)  # import pyperf raises ImportError
    assert not report.have_pyperf()
    assert main(["report", FIXTURE, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "pyperf suites: skipped: pyperf is not installed" in text
    assert not list(tmp_path.glob("*.pyperf.json")) and (tmp_path / "results.json").is_file()
    # the same figures as with pyperf: only the line about the suites differs
    with_pyperf = (rendered / "report.md").read_text()
    assert "pyperf suites: forward.pyperf.json, train.pyperf.json" in with_pyperf
    strip = lambda t: [line for line in t.splitlines() if "pyperf suites" not in line]  # noqa: E731
    assert strip(text) == strip(with_pyperf)


def _fake_bench(monkeypatch, fixture, clock=None, cost_s=0.0):
    """bench_layer.main on CPU: CUDA said present, the environment and each case's measurement taken
    from the fixture (made-up numbers); `clock` a list [now] that every case advances by cost_s."""
    measured = []
    by_name = {report.case_name(c): c for c in fixture["cases"]}

    def bench_case(case, warmup, repeat, tuned=False):
        measured.append(report.case_name(case))
        if clock is not None:
            clock[0] += cost_s
        return by_name[report.case_name(case)]
    monkeypatch.setattr(bench_layer.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_layer, "environment", lambda command: dict(fixture["environment"], command=command))
    monkeypatch.setattr(bench_layer, "bench_case", bench_case)
    if clock is not None:
        monkeypatch.setattr(bench_layer, "CLOCK", lambda: clock[0])
    return measured


FIXTURE_GRID = ["--batch", "1", "16", "64", "--hidden", "256", "768", "1024", "--dtype", "float16", "bfloat16",
                "--repeat", "8"]


def test_bench_measures_and_reports_without_pyperf(monkeypatch, fixture, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pyperf", None)
    measured = _fake_bench(monkeypatch, fixture)
    out = tmp_path / "FIXTURE-run"
    assert bench_layer.main([*FIXTURE_GRID, "--out", str(out)]) == 0
    assert "pyperf is not installed: measuring anyway" in capsys.readouterr().err
    results = report.load(out / "results.json")
    assert len(results["cases"]) == len(measured) == len(fixture["cases"])
    assert results["run"]["skipped_for_budget"] == [] and results["method"]["tuned"] is False
    text = (out / "report.md").read_text()
    assert "pyperf suites: skipped" in text and "## Training step (forward + backward)" in text
    assert not list(out.glob("*.pyperf.json"))


# --- the order of the cases and the budget ---------------------------------------------------

def test_cases_start_with_the_flashrnn_shape_and_interleave_modes_and_cells():
    planned = bench_layer.cases(bench_layer.parse_args([]))
    head = [(c["dtype"], c["mode"], c["cell"], c["batch"], c["hidden"], c["seq"]) for c in planned[:8]]
    assert head == [(dtype, mode, cell, 16, 768, 1024) for dtype in ("float16", "bfloat16")
                    for mode in ("forward", "train") for cell in ("lstm", "gru")]
    # every shape: forward then train, lstm and gru alternating
    for i in range(0, len(planned), 4):
        quad = planned[i:i + 4]
        assert [(c["mode"], c["cell"]) for c in quad] == [("forward", "lstm"), ("forward", "gru"), ("train", "lstm"),
                                                          ("train", "gru")]
        assert len({(c["dtype"], c["batch"], c["hidden"], c["layers"]) for c in quad}) == 1


@pytest.mark.parametrize("argv", [[], ["--quick"], ["--batch", "16", "--hidden", "768", "--seq", "1024"],
                                  ["--batch", "16", "--hidden", "768", "--seq", "512"],
                                  ["--hidden", "512", "--batch", "16", "--dtype", "float32", "--mode", "train"],
                                  ["--cell", "gru", "--input-size", "128"]])
def test_no_shape_is_measured_twice(argv):
    names = [report.case_name(c) for c in bench_layer.cases(bench_layer.parse_args(argv))]
    assert len(names) == len(set(names))
    assert any("-B16-H768-T1024" in n for n in names)  # the FlashRNN shape, always


def test_the_budget_stops_new_cases_and_the_report_says_how_many_were_skipped(monkeypatch, fixture, tmp_path):
    clock = [1000.0]
    measured = _fake_bench(monkeypatch, fixture, clock, cost_s=10.0)
    writes = []
    real = bench_layer.write_json

    def counting(results, path):
        writes.append(len(results["cases"]))
        real(results, path)
    monkeypatch.setattr(bench_layer, "write_json", counting)
    out = tmp_path / "FIXTURE-budget"
    assert bench_layer.main([*FIXTURE_GRID, "--budget", "35", "--out", str(out)]) == 0
    planned = bench_layer.cases(bench_layer.parse_args(FIXTURE_GRID))
    assert len(measured) == 4  # started at 0, 10, 20 and 30 s; at 40 s the 35 s are spent
    assert measured == [report.case_name(c) for c in planned[:4]]
    assert {(c["mode"], c["cell"]) for c in planned[:4]} == {(m, c) for m in ("forward", "train")
                                                             for c in ("lstm", "gru")}
    assert writes[:5] == [0, 1, 2, 3, 4]  # results.json rewritten after every case
    results = report.load(out / "results.json")
    assert [report.case_name(c) for c in results["cases"]] == measured
    assert results["run"]["skipped_for_budget"] == [report.case_name(c) for c in planned[4:]]
    text = (out / "report.md").read_text()
    assert f"- 4 of {len(planned)} planned cases measured" in text
    assert f"- {len(planned) - 4} cases skipped for the budget (35 s" in text


def test_a_failing_case_is_recorded_and_the_run_goes_on(monkeypatch, fixture, tmp_path):
    measured = _fake_bench(monkeypatch, fixture)
    fake = bench_layer.bench_case

    def fails_once(case, *args, **kwargs):
        if not measured:
            measured.append("failed")
            raise RuntimeError("simulated")
        return fake(case, *args, **kwargs)
    monkeypatch.setattr(bench_layer, "bench_case", fails_once)
    out = tmp_path / "FIXTURE-failed"
    assert bench_layer.main([*FIXTURE_GRID, "--out", str(out)]) == 1
    results = report.load(out / "results.json")
    first = report.case_name(bench_layer.cases(bench_layer.parse_args(FIXTURE_GRID))[0])
    assert results["run"]["failed"] == [{"case": first, "error": "RuntimeError: simulated"}]
    assert len(results["cases"]) == len(fixture["cases"]) - 1
    assert f"- failed: {first}: RuntimeError: simulated" in (out / "report.md").read_text()


# --- which config the bench runs -------------------------------------------------------------

def _case(**kwargs):
    case = dict(mode="forward", cell="gru", dtype="float32", batch=3, hidden=32, seq=4, layers=1, bidirectional=False)
    case.update(kwargs)
    case["input_size"] = case["hidden"]
    return case


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_the_bench_pins_the_static_config_unless_tuned(mode):
    """A tuned table holds another config for the layer: by default the bench runs the static
    tables' (pinned), with --tuned the tuned one; results record which."""
    import torch

    import persistrnn
    from persistrnn import configs
    from persistrnn.autotune import cache
    from persistrnn.kernels.config import KernelConfig
    case, cpu = _case(mode=mode), torch.device("cpu")
    static, why = bench_layer.static_config(case, cpu)
    assert why is None and static is not None
    tuned = KernelConfig(16, 16, 8, backward_warps=4 if mode == "train" else None)
    assert tuned != static
    key = cache.device_key(cpu, configs.DEFAULT_SMS)
    layer_key = cache.layer_key("gru", torch.float32, mode, 32, 0, 1, 3)
    cache.write_entries(key, {layer_key: {"choice": "kernel", "config": dataclasses.asdict(tuned), "ms": 1.0,
                                          "torch_ms": 2.0, "seq": 4}})
    layer = persistrnn.GRU(32, 32).train(mode == "train")
    x = torch.randn(4, 3, 32, requires_grad=mode == "train")
    for use_tuned, want in ((False, static), (True, tuned)):
        side, pinned, source = bench_layer.persistrnn_side(case, cpu, use_tuned, backend="interpret")
        with side(), torch.set_grad_enabled(mode == "train"):
            layer(x)
        assert layer.last_dispatch.config == want, (use_tuned, layer.last_dispatch)
        record = bench_layer.dispatch_record(layer.last_dispatch, source)
        assert record["path"] == "interpret" and record["config"] == bench_layer.describe(want)
        assert record["config_source"].startswith("the planner (--tuned): the tuned table") == use_tuned
        assert record["config_source"].startswith("the static tables' config, pinned") == (not use_tuned)
        assert pinned == (None if use_tuned else static)


def test_without_a_static_config_torch_runs_on_both_sides():
    import torch

    from persistrnn.layers.dispatch import Dispatch
    case = _case(hidden=1 << 16)  # no table holds it
    static, why = bench_layer.static_config(case, torch.device("cpu"))
    assert static is None and "does not fit" in why
    side, pinned, source = bench_layer.persistrnn_side(case, torch.device("cpu"), False, backend="interpret")
    import persistrnn
    with side():
        assert persistrnn.current_backend() == "torch"
    record = bench_layer.dispatch_record(Dispatch("torch", "backend 'torch' selected"), source)
    assert record["path"] == "torch" and record["config"] is None
    assert record["reason"].startswith("torch.nn on both sides: the static tables hold no kernel config")
    row = dict(fixture_case := report.load(FIXTURE)["cases"][0], **record)
    assert not report.compared(row) and report.compared(fixture_case)
