"""The device kit: its dry run (every phase on CPU at tiny sizes, a few files in the output folder),
the process-group kill at a phase's budget, and the sanitize phase with and without compute-sanitizer."""
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time

from persistrnn.benchmarks import device_kit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = os.path.join(ROOT, "benchmarks", "device_kit.py")
PHASES = ["sanitize", "long_sequence", "precompile", "gpu_tests", "tune", "bench", "report"]


def _results_listing():
    results = os.path.join(ROOT, "benchmarks", "results")
    return sorted(os.listdir(os.path.join(ROOT, "benchmarks"))) + sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(results) for name in names)


def _path_without_sanitizer():
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not os.path.exists(os.path.join(d, "compute-sanitizer")))


def test_list_prints_every_phase_with_its_budget():
    proc = subprocess.run([sys.executable, KIT, "--dry-run", "--list", "--budget", "tune=7"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"(\w+) (\d+)", proc.stdout.split("\n", 1)[1])
    assert [name for name, _ in listed] == PHASES and dict(listed)["tune"] == "7"
    bad = subprocess.run([sys.executable, KIT, "--list", "--budget", "nothing=3"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "PHASE=SECONDS" in bad.stderr


def test_dry_run_runs_every_phase(tmp_path):
    before = _results_listing()
    out = tmp_path / "out"
    env = dict(os.environ, PATH=_path_without_sanitizer())
    proc = subprocess.run([sys.executable, KIT, "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = re.search(r"\[kit\] results in (\S+)", proc.stdout).group(1)
    record = json.load(open(os.path.join(results, "kit.json")))
    assert [p["name"] for p in record["phases"]] == PHASES
    assert all(p["status"] == "done" and p["wall_s"] <= p["budget_s"] for p in record["phases"]), record["phases"]
    phases = {p["name"]: p for p in record["phases"]}
    # the output folder: a few files, the archive holding the logs and kit.json
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and {"kit.tar.gz", "kit.json", "summary.md"} <= set(files)
    assert json.load(open(out / "kit.json")) == record
    with tarfile.open(out / "kit.tar.gz") as tar:
        names = {os.path.relpath(n, "dry-run-cpu") for n in tar.getnames()}
    assert {"kit.json", "long_sequence.json"} | {f"{p}.log" for p in PHASES} <= names
    # the summary: one line per phase, printed last
    summary = (out / "summary.md").read_text()
    assert all(re.search(rf"^\| {p} \| [\d.]+ \| [\d.]+ \| done \|", summary, re.M) for p in PHASES)
    assert proc.stdout.endswith(summary)
    if device_kit.find_sanitizer() is None:
        assert record["compute_sanitizer"] is None and "compute-sanitizer: not found" in summary
    # what each phase did
    headline = phases["sanitize"]["headline"]
    assert headline.startswith("2 of 2 cases ok") and "no sanitizer" in headline
    assert "lstm_proj: ok" in open(os.path.join(results, "sanitize.log")).read()
    assert len(phases["long_sequence"]["table"]["cases"]) == 4
    static = json.loads(next(line for line in open(os.path.join(results, "precompile.log")) if line.startswith("[")))
    assert static[0]["survivors"] > 0
    assert re.match(r"\d+ tests collected", phases["gpu_tests"]["headline"])
    (table,) = [f for f in os.listdir(os.path.join(results, "tuned")) if f.endswith(".json")]
    entries = json.load(open(os.path.join(results, "tuned", table)))["entries"]
    assert len(entries) == 1 and next(iter(entries.values()))["choice"] == "kernel"
    assert "no CUDA GPU" in phases["bench"]["headline"]
    assert os.path.exists(os.path.join(results, "report-fixture", "report.md"))
    # a dry run never writes into the committed results
    assert _results_listing() == before


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_phase_past_its_budget_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    started = time.monotonic()
    rc = device_kit.run([sys.executable, "-c", parent], str(tmp_path / "phase.log"), started + 3, dict(os.environ))
    assert rc is None and time.monotonic() - started < 10
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    assert device_kit.status_of(rc) == "stopped at its budget"


def test_a_child_left_behind_by_a_finished_phase_is_killed(tmp_path):
    pidfile = tmp_path / "child.pid"
    parent = (f"import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(120)']); open({str(pidfile)!r}, 'w').write(str(child.pid))")
    rc = device_kit.run([sys.executable, "-c", parent], str(tmp_path / "phase.log"), time.monotonic() + 30,
                        dict(os.environ))
    assert rc == 0
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _kit(tmp_path, sanitizer):
    kit = device_kit.Kit(False, "sm_90", str(tmp_path), dict(os.environ), sanitizer)
    kit.sanitize_workload = [sys.executable, "-c", "print('lstm: ok')"]
    return kit, dict(name="sanitize", commands=[])


def test_find_sanitizer(tmp_path):
    assert device_kit.find_sanitizer(path=str(tmp_path), roots=[]) is None
    fake = tmp_path / "cuda" / "bin" / "compute-sanitizer"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert device_kit.find_sanitizer(path=str(tmp_path), roots=[str(tmp_path / "cuda")]) == str(fake)
    assert device_kit.find_sanitizer(path=str(fake.parent), roots=[]) == str(fake)


def test_sanitize_without_compute_sanitizer_runs_the_workload_and_says_so(tmp_path):
    kit, record = _kit(tmp_path, None)
    fields = kit.sanitize(record, time.monotonic() + 60)
    assert fields["status"] == "done" and "compute-sanitizer not found" in fields["headline"]
    assert len(record["commands"]) == 1 and "lstm: ok" in (tmp_path / "sanitize.log").read_text()


def test_sanitize_counts_what_compute_sanitizer_reports(tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        tool=$2
        shift 6
        "$@"
        if [ "$tool" = memcheck ]; then
            echo "========= ERROR SUMMARY: 2 errors"; exit 1
        fi
        echo "========= RACECHECK SUMMARY: 1 hazard displayed (0 errors, 1 warning)"
    """))
    fake.chmod(0o755)
    kit, record = _kit(tmp_path, str(fake))
    fields = kit.sanitize(record, time.monotonic() + 60)
    assert record["sanitizer"]["memcheck"]["errors"] == 2 and record["sanitizer"]["racecheck"]["warnings"] == 1
    assert fields["status"] == "failed"
    assert fields["headline"] == "1 of 1 cases ok; memcheck 2 errors; racecheck 0 errors (1 warnings)"
    assert "--print-limit" in record["commands"][1] and "lstm: ok" in (tmp_path / "sanitize_memcheck.log").read_text()
