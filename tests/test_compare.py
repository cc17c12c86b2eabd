"""persistrnn compare: parameter formulas against real modules, the tasks' generators and
baselines, the --quick run's files, and bad input."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from persistrnn.cli import main
from persistrnn.benchmarks.compare import cells, tasks

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@settings(max_examples=30, deadline=None)
@given(cell=st.sampled_from(["lstm", "gru"]), inputs=st.integers(1, 300), hidden=st.integers(1, 300),
       bias=st.booleans())
def test_parameter_formula_matches_the_modules(cell, inputs, hidden, bias):
    assert cells.parameter_formula(cell, inputs, hidden, bias) == cells.module_parameters(cell, inputs, hidden, bias)


@settings(max_examples=30, deadline=None)
@given(inputs=st.integers(1, 300), hidden=st.integers(1, 1024))
def test_matched_gru_hidden_is_the_nearest_count(inputs, hidden):
    target = cells.parameter_formula("lstm", inputs, hidden)
    h = cells.matched_gru_hidden(inputs, hidden)
    gap = abs(cells.parameter_formula("gru", inputs, h) - target)
    for other in (h - 1, h + 1):
        assert gap <= abs(cells.parameter_formula("gru", inputs, other) - target)
    assert h >= hidden  # 3 blocks need at least as many units as 4 for the same count


def test_gates_read_off_the_modules():
    assert cells.gates_of(torch.nn.LSTM(3, 5)) == 3 and cells.gates_of(torch.nn.GRU(3, 5)) == 2


def test_adding_answers_and_the_baseline_of_answering_one():
    gen = torch.Generator().manual_seed(0)
    x, y = tasks.adding_batch(gen, 20000, 30)
    assert x.shape == (20000, 30, 2) and y.shape == (20000,)
    markers = x[..., 1]
    assert (markers.sum(1) == 2).all()
    assert (markers[:, :15].sum(1) == 1).all() and (markers[:, 15:].sum(1) == 1).all()  # one in each half
    assert torch.allclose((x[..., 0] * markers).sum(1), y)
    mse_of_one = F.mse_loss(torch.ones_like(y), y).item()
    assert abs(mse_of_one - tasks.TASKS["adding"].baseline(30)) < 0.005
    assert abs(tasks.TASKS["adding"].baseline(30) - 0.1667) < 1e-4


def test_copy_targets_and_the_baseline_of_blanks_then_a_guess():
    gen = torch.Generator().manual_seed(1)
    T = 15
    x, targets = tasks.copy_batch(gen, 500, T)
    assert x.shape == (500, T + 20, 10) and targets.shape == (500, T + 20)
    tokens = x.argmax(-1)
    assert (targets[:, -10:] == tokens[:, :10]).all() and (targets[:, :-10] == tasks.BLANK).all()
    assert (tokens[:, T + 9] == tasks.DELIMITER).all()
    assert ((tokens[:, :10] >= 1) & (tokens[:, :10] <= 8)).all()
    # blank with certainty before the recall, a uniform guess over the 8 symbols during it
    logits = torch.full((500, T + 20, 10), -1e9)
    logits[:, :-10, tasks.BLANK] = 0.0
    logits[:, -10:, 1:9] = 0.0
    ce = tasks.loss(tasks.TASKS["copy"], logits, targets).item()
    assert math.isclose(ce, tasks.TASKS["copy"].baseline(T), rel_tol=1e-5)
    assert math.isclose(tasks.TASKS["copy"].baseline(T), 10 * math.log(8) / (T + 20))


def test_counting_strings_and_their_determined_steps():
    x, (targets, mask) = tasks.counting_strings([1, 3])
    assert x.shape == (2, 7, 4)
    assert x[1].argmax(-1).tolist() == [tasks.START, tasks.A, tasks.A, tasks.A, tasks.B, tasks.B, tasks.B]
    assert targets[1].tolist() == [tasks.A, tasks.A, tasks.A, tasks.B, tasks.B, tasks.B, tasks.END]
    assert mask[1].tolist() == [True, False, False, False, True, True, True]  # S->a, then from the first b
    assert mask[0].tolist() == [True, False, True, False, False, False, False]
    oracle = F.one_hot(targets, 4).float()
    assert tasks.recognized(oracle, (targets, mask)).all()
    early_end = oracle.clone()
    early_end[1, 5] = F.one_hot(torch.tensor(tasks.END), 4).float()  # predicts the end one b too soon
    assert tasks.recognized(early_end, (targets, mask)).tolist() == [True, False]


def test_digits_are_64_pixel_sequences_with_a_fixed_split():
    x_train, y_train, x_test, y_test = tasks.digits_data()
    assert x_train.shape == (tasks.DIGITS_TRAIN, 64, 1) and x_test.shape == (1797 - tasks.DIGITS_TRAIN, 64, 1)
    assert 0 <= x_train.min() and x_train.max() <= 1
    assert torch.equal(tasks.digits_data()[1], y_train)
    majority = torch.bincount(y_test).max().item() / len(y_test)
    assert majority < 0.13  # balanced classes: chance, the baseline, is about 0.1


def test_quick_run_writes_a_valid_report(tmp_path, capsys):
    import matplotlib.image
    out = tmp_path / "report"
    assert main(["compare", "--quick", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["config"]["seeds"] == 3 and report["config"]["quick"]
    assert report["wall_seconds"] < 120
    assert sorted(report["learning"]) == sorted(tasks.TASKS) and len(report["runs"]) == 4 * 2 * 3
    assert printed["verdict"] == report["verdict"] and len(report["verdict"]) == 5
    for run in report["runs"]:
        assert run["path"] == "torch" and run["curve"][0][0] == 0 and math.isfinite(run["final"])
    for row in report["architecture"]["parameters"]:
        assert row["formula"] == row["module"]
    assert sorted(os.listdir(out)) == sorted(report["files"])
    for name in report["files"]:
        if name.endswith(".png"):
            image = matplotlib.image.imread(out / name)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    text = (out / "report.md").read_text()
    assert all(f"![{t}]" in text for t in tasks.TASKS) and "## Verdict" in text
    assert "{config" not in text and "{report" not in text  # no f-string left unformatted
    assert "Adam, learning rate 0.005" in text and "steps per run adding 60" in text
    for row in report["speed"]:
        assert row["train_us_per_step"] > 0 and row["saved_bytes"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "adding", "parity"], "invalid choice: 'parity'"),
    (["--seeds", "0"], "must be at least 1"),
    (["--seq", "3", "--tasks", "adding"], "--seq 3 is below the adding task's minimum of 4"),
    (["--budget-minutes", "0"], "must be above 0"),
])
def test_bad_input_is_an_argparse_error_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--out", str(out), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_failed_run_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    import persistrnn.benchmarks.compare.report as report
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("before")

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_counting", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        main(["compare", "--tasks", "counting", "--seeds", "1", "--steps", "2", "--out", str(out)])
    assert os.listdir(tmp_path) == ["report"] and os.listdir(out) == ["report.md"]
    assert (out / "report.md").read_text() == "before"
