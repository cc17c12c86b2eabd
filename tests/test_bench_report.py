"""The benchmark report code (benchmarks/report.py, bench_layer's grid and cuDNN rules), on CPU from
a fixture results.json of made-up numbers (tests/fixtures/bench_results_FIXTURE.json)."""
import copy
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
    # one table row per case and mode, with median [IQR] of both and a speedup
    rows = re.findall(r"^\| (lstm|gru) \| \w+ \| \d+ \| \d+ \| 1024 \| \d( bidir)? \| [\d.]+ \[[\d.]+, [\d.]+\] \| "
                      r"[\d.]+ \[[\d.]+, [\d.]+\] \| [\d.]+x \|", text, flags=re.M)
    assert len(rows) == len(fixture["cases"])
    # the geometric mean is the one of the raw times' medians
    forward = [report.summarize(c)["speedup"] for c in fixture["cases"] if c["mode"] == "forward"]
    assert f"**{report.geomean(forward):.2f}x** over {len(forward)} cases" in text
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
