"""Device kit: what a session lent a GPU runs, in one call that fits 9 minutes on a cold H100.

The device tool's call (from the repository root; .whl holds the pyperf and psutil wheels):

    run(command="python3 benchmarks/device_kit.py", timeout_s=560, carry=[".whl"])

then give_back at once. The .whl folder, made here once (pyperf is not on the device image):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl pyperf psutil

Phases, each a subprocess with its own wall-clock budget (a phase past its budget is stopped and
the kit goes on); everything is written as it goes under benchmarks/results/<device>/ and, when
$OUT is set, copied there after every phase, so a run cut off still returns what it finished:

1. precompile (CPU, alongside phase 2): `persistrnn tune --static` for the tuning grid on this
   device's target in parallel processes: every candidate compiled into Triton's on-disk cache
   (static_ranking.json);
2. gpu tests: `pytest -m gpu -n 8` against cuDNN (gpu_tests.log: parity, fast-math accuracy);
3. tune: `persistrnn tune` over the tuning grid, the table in tuned/<device>.json (commit it as
   autotune/configs/<device>.json);
4. bench: `persistrnn bench` at the FlashRNN shape (B = 16, T = 1024, H = 768), then a grid
   (results.json written case by case), then `persistrnn report` renders the grid's report from
   whatever results.json holds.

kit.json records each phase: command, budget, wall time, exit code, and whether it finished.

`--dry-run` runs the same phases on CPU at tiny sizes (the interpreter; GPU tests only
collected; bench says there is no GPU) into a temporary folder, never into benchmarks/results.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the layers the speed goal names (B = 16, H = 768; fp16 first: cuDNN's persistent kernel is fp16):
# each is about 60 compiles, so a cold device holds no more in the budget
TUNE_GRID = ["--cell", "lstm", "gru", "--dtype", "float16", "bfloat16", "--hidden", "768", "--batch", "16",
             "--pass", "both"]
DRY_GRID = ["--cell", "lstm", "--dtype", "float32", "--hidden", "32", "--batch", "2", "--pass", "forward"]


def phases(dry_run, results, target):
    """(name, budget seconds, command, concurrent with the next phase)."""
    cli = [sys.executable, "-m", "persistrnn"]
    if dry_run:
        return [
            ("precompile", 120, cli + ["tune", "--static", "--target", target, *DRY_GRID, "--workers", "2", "--json"],
             True),
            ("gpu_tests", 120, [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--co"],
             False),
            ("tune", 180, cli + ["tune", "--backend", "interpret", *DRY_GRID, "--seq", "4", "--repeats", "1",
                                 "--max-candidates", "2"], False),
            ("bench", 60, cli + ["bench", "--batch", "2", "--hidden", "32", "--seq", "4"], False),
        ]
    flashrnn = os.path.join(results, "flashrnn-shape")
    return [
        ("precompile", 150, cli + ["tune", "--static", "--target", target, *TUNE_GRID, "--json"], True),
        ("gpu_tests", 150, [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-n", "8",
                            "-rA"], False),
        ("tune", 170, cli + ["tune", *TUNE_GRID, "--seq", "256", "--repeats", "7", "--max-candidates", "4"], False),
        ("bench_flashrnn_shape", 50, cli + ["bench", "--cell", "lstm", "gru", "--batch", "16", "--hidden", "768",
                                            "--seq", "1024", "--dtype", "float16", "bfloat16", "--no-stacked",
                                            "--out", flashrnn],
         False),
        ("bench_grid", 70, cli + ["bench", "--batch", "1", "16", "64", "--hidden", "256", "512", "1024",
                                  "--dtype", "float16", "bfloat16", "--seq", "1024", "--repeat", "10"], False),
        # a bench stopped at its budget leaves results.json without its report: render what it measured
        ("report", 40, cli + ["report", os.path.join(results, "results.json")], False),
    ]


def _package_root():
    """A folder holding a link named persistrnn to the repository root (which is the package), so
    that the kit and its phases import it without an install; also put on this process's path."""
    pkgroot = tempfile.mkdtemp(prefix="kit-pkg-")
    os.symlink(ROOT, os.path.join(pkgroot, "persistrnn"))
    sys.path.insert(0, pkgroot)
    return pkgroot


def _env(results, pkgroot):
    env = dict(os.environ, PERSISTRNN_CACHE_DIR=os.path.join(results, "tuned"))
    wheels = os.path.join(ROOT, ".whl")
    if os.path.isdir(wheels):  # pyperf and psutil, installed aside (the device has no network)
        site = tempfile.mkdtemp(prefix="kit-site-")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                        *[os.path.join(wheels, w) for w in os.listdir(wheels)]], check=False)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkgroot, env.get("PYTHONPATH")]))
    return env


def _publish(results, out):
    if out:
        shutil.copytree(results, os.path.join(out, os.path.basename(results)), dirs_exist_ok=True)


def _finish(proc, log, started, budget):
    try:
        rc = proc.wait(timeout=max(1.0, started + budget - time.monotonic()))
        status = "done" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        proc.kill()
        rc, status = proc.wait(), "stopped at its budget"
    log.close()
    return rc, status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes, into a temporary folder")
    args = p.parse_args(argv)
    pkgroot = _package_root()
    import torch

    from persistrnn.autotune.cache import device_slug
    from persistrnn.layers.dispatch import target_of
    if args.dry_run:
        device, target = "dry-run-cpu", "sm_90"
        results = os.path.join(tempfile.mkdtemp(prefix="kit-"), device)
    else:
        if not torch.cuda.is_available():
            print("device kit: no CUDA GPU here (use --dry-run on CPU)", file=sys.stderr)
            return 2
        device, target = device_slug({"name": torch.cuda.get_device_name()}), target_of(torch.device("cuda"))
        if target is None:
            print("device kit: this GPU has no kernel tables (persistrnn runs torch.nn on it)", file=sys.stderr)
            return 2
        results = os.path.join(ROOT, "benchmarks", "results", device)
    os.makedirs(results, exist_ok=True)
    out = os.environ.get("OUT")
    env = _env(results, pkgroot)
    record = {"device": device, "dry_run": args.dry_run, "command": " ".join(["python3 benchmarks/device_kit.py",
                                                                              *(argv or sys.argv[1:])]),
              "phases": []}
    kit_start = time.monotonic()
    pending = None  # a phase running alongside the next one
    for name, budget, command, concurrent in phases(args.dry_run, results, target):
        log = open(os.path.join(results, f"{name}.log"), "w")
        print(f"[kit] {name} (budget {budget} s): {' '.join(command)}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if concurrent:
            pending = (name, budget, command, proc, log, started)
            continue
        for job in ([pending] if pending else []) + [(name, budget, command, proc, log, started)]:
            jname, jbudget, jcommand, jproc, jlog, jstarted = job
            rc, status = _finish(jproc, jlog, jstarted, jbudget)
            record["phases"].append({"name": jname, "command": " ".join(jcommand), "budget_s": jbudget,
                                     "wall_s": round(time.monotonic() - jstarted, 1), "rc": rc, "status": status})
            print(f"[kit] {jname}: {status} (rc {rc}) after {record['phases'][-1]['wall_s']} s", flush=True)
        pending = None
        record["wall_s"] = round(time.monotonic() - kit_start, 1)
        with open(os.path.join(results, "kit.json"), "w") as f:
            json.dump(record, f, indent=1)
        _publish(results, out)
    print(f"[kit] results in {results} ({record['wall_s']} s)")
    return 0 if all(ph["status"] == "done" for ph in record["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
