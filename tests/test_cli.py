"""The `persistrnn` command: demo and check run the kernels and exit non-zero on mismatch."""
import json
import subprocess
import sys

import pytest

from persistrnn.cli import main


def test_demo_runs_the_kernels_on_cpu(capsys):
    assert main(["demo", "--json", "--seq", "4", "--hidden-size", "24"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["cell"] for r in report["rows"]] == ["lstm", "gru"]
    assert all(r["path"] == "interpret" and r["ok"] for r in report["rows"])
    assert report["rows"][0]["params"] == 4 * (24 * 32 + 24 * 24 + 2 * 24)
    assert report["rows"][1]["params"] == 3 * (24 * 32 + 24 * 24 + 2 * 24)


def test_check_passes_and_fails(capsys):
    assert main(["check", "--json", "--bidirectional", "--layers", "2"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert all(r["ok"] and r["path"] == "interpret" for r in results)
    # a tolerance no real computation meets: the command must report the mismatch
    assert main(["check", "--tol", "0", "--cell", "gru"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_python_dash_m_and_help():
    for command in ([], ["demo"], ["check"], ["capacity"], ["inspect"], ["tune"], ["bench"], ["report"],
                    ["compare"]):
        out = subprocess.run([sys.executable, "-m", "persistrnn", *command, "--help"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "usage" in out.stdout.lower()


@pytest.mark.parametrize("argv", [["bench", "--json"]])
def test_bench_without_gpu_says_so_and_exits_0(argv, capsys):
    assert main(argv) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_inspect_reads_the_compiled_time_loop(tmp_path, capsys):
    """No GPU needed: the config the planner picks, resources, and a time loop with MMA in it;
    --cubin writes both kernels of the train pass."""
    assert main(["inspect", "--json", "--cell", "gru", "--hidden-size", "64", "--pass", "train",
                 "--cubin", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer"]["cell"] == "gru" and report["config"]["block_h"] >= 16
    assert set(report["kernels"]) == {"forward", "backward"}
    for kernel in report["kernels"].values():
        assert kernel["spill_bytes"] == 0 and kernel["shared_bytes"] <= kernel["shared_limit"]
        loop = kernel["time_loop"]
        assert loop["instructions"] > 0 and sum(loop["mma"].values()) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backward.cubin", "forward.cubin"]
    assert (tmp_path / "forward.cubin").read_bytes()[:4] == b"\x7fELF"


def test_inspect_names_a_layer_no_kernel_holds(capsys):
    assert main(["inspect", "--dtype", "float64", "--hidden-size", "4096"]) == 2
    assert "no kernel runs this layer" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_capacity_coverage(target, capsys):
    """The coverage grid: 2 cells x 3 dtypes x 6 hidden sizes x 7 batches x 2 directions x 2 passes;
    each fraction is that of its layers the planner runs on the kernels."""
    from persistrnn.configs import kernel_config, launch_waves
    assert main(["capacity", "--coverage", "--target", target, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == 1008 == len(report["by_layer"]) and len(report["rows"]) == 6
    assert report["total"] == round(report["kernel"] / 1008, 3)
    for row in report["rows"]:
        for hidden in ("64", "1024"):
            sel = [x["kernel"] for x in report["by_layer"] if (x["dtype"], x["pass_"], str(x["hidden"])) ==
                   (row["dtype"], row["pass"], hidden)]
            assert len(sel) == 28 and row[hidden] == round(sum(sel) / 28, 3)
    # a layer the planner runs, and one it does not, as the planner itself says
    import torch
    sms = {"sm_90": 132, "sm_80": 108}[target]
    for x in report["by_layer"][::97]:
        config, _ = kernel_config(x["cell"], getattr(torch, x["dtype"]), x["hidden"], 0, x["batch"], x["directions"],
                                  sms, target, x["pass_"])
        assert x["kernel"] == (config is not None)
        if config is not None:
            assert x["launches"] == len(launch_waves(config, x["batch"], x["hidden"], x["directions"], sms)) >= 1
    assert report["several_launches"] == sum(x["launches"] > 1 for x in report["by_layer"])
    assert main(["capacity", "--coverage", "--target", target]) == 0
    assert "total:" in capsys.readouterr().out
