"""The device kit's dry run: every phase on CPU at tiny sizes, results recorded as it goes."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_runs_every_phase():
    before = sorted(os.listdir(os.path.join(ROOT, "benchmarks"))) + sorted(
        os.listdir(os.path.join(ROOT, "benchmarks", "results")))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_kit.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = re.search(r"\[kit\] results in (\S+)", proc.stdout).group(1)
    record = json.load(open(os.path.join(results, "kit.json")))
    assert [p["name"] for p in record["phases"]] == ["precompile", "gpu_tests", "tune", "bench"]
    assert all(p["status"] == "done" and p["wall_s"] <= p["budget_s"] for p in record["phases"])
    lines = open(os.path.join(results, "precompile.log")).read().splitlines()
    static = json.loads(next(line for line in lines if line.startswith("[")))  # the --json line
    assert static[0]["survivors"] > 0
    (table,) = [f for f in os.listdir(os.path.join(results, "tuned")) if f.endswith(".json")]
    entries = json.load(open(os.path.join(results, "tuned", table)))["entries"]
    assert len(entries) == 1 and next(iter(entries.values()))["choice"] == "kernel"
    assert "not GPU speed" in open(os.path.join(results, "tune.log")).read()
    assert "no CUDA GPU" in open(os.path.join(results, "bench.log")).read()
    # a dry run never writes into the committed results
    after = sorted(os.listdir(os.path.join(ROOT, "benchmarks"))) + sorted(
        os.listdir(os.path.join(ROOT, "benchmarks", "results")))
    assert after == before
