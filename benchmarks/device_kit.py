"""Device kit: validate and measure persistrnn on a GPU machine in one command, in phases with budgets.

    python benchmarks/device_kit.py --out DIR [--budget PHASE=SECONDS ...] [--total SECONDS]
    python benchmarks/device_kit.py --dry-run [--out DIR] [--list]

Each phase runs its commands in a process group of their own, under a wall-clock budget: past it the
whole group is killed (children included) and the kit goes on; no phase runs past the total budget.
Phases on one line run at the same time; the defaults (540 s in all) are sized for a cold H100:

  sanitize, long_sequence     85 s each
  precompile, gpu_tests      130 s each
  tune                       120 s
  bench                      130 s
  report                      30 s

- sanitize: benchmarks/sanitize_cases.py (every kernel of the split tier at tiny sizes) once plainly,
  each case in its own process (this compiles the kernels into Triton's cache), then in one process
  under `compute-sanitizer --tool memcheck` and, if the budget allows, `--tool racecheck`; the
  errors each reports. Without compute-sanitizer (looked for on PATH, under /usr/local/cuda*/ and
  next to ncu) the workload runs without it, and the kit says so.
- long_sequence: benchmarks/long_sequence.py, T = 1024 with a memory-gate bias of +4: persistrnn
  and cuDNN in fp16/bf16 against float64 (long_sequence.json; the table goes into kit.json).
- precompile: `persistrnn tune --static` for the tuning grid on this device's target, in parallel
  processes: every candidate compiled into Triton's on-disk cache for the tune phase.
- gpu_tests: `pytest tests/test_gpu.py -m gpu -n 8` against cuDNN, with a per-test timeout
  (PERSISTRNN_GPU_TEST_TIMEOUT) that fits the phase.
- tune: `persistrnn tune` over the tuning grid; the table in tuned/<device>.json (commit it as
  autotune/configs/<device>.json).
- bench: `persistrnn bench --budget N` over a grid (results.json written case by case).
- report: `persistrnn report` renders whatever results.json holds (a bench stopped at its budget
  leaves it without its report).

Before the phases the kit checks for pyperf (importable, or installed aside from the wheels in the
repository's .whl/ folder); the bench runs without it and only skips its pyperf suites.

Everything is written as it goes under benchmarks/results/<device>/: each phase's logs, kit.json
(per phase: commands, budget, wall time, status, headline and details), summary.md,
long_sequence.json, the bench's results.json and report, the tuned table. With --out DIR, DIR
receives three files, rewritten after every phase: kit.tar.gz (all of the above), kit.json and
summary.md (one line per phase: budget, wall time, status, headline). The summary is printed last.

--dry-run runs the same phases on CPU at tiny sizes into a temporary folder, never into
benchmarks/results: the sanitize workload and the long-sequence check under the Triton interpreter
(no sanitizer), the GPU tests only collected, tune through the interpreter, bench saying there is
no GPU, report rendering the test fixture. --list prints the phases and their budgets.
"""
import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
# the layers the speed goal names (B = 16, H = 768; fp16 first: cuDNN's persistent kernel is fp16):
# each is about 60 compiles, so a cold device holds no more in the budget
TUNE_GRID = ["--cell", "lstm", "gru", "--dtype", "float16", "bfloat16", "--hidden", "768", "--batch", "16",
             "--pass", "both"]
DRY_GRID = ["--cell", "lstm", "--dtype", "float32", "--hidden", "32", "--batch", "2", "--pass", "forward"]
# (name, budget on a GPU, budget in a dry run); phases of one stage run at the same time
STAGES = [[("sanitize", 85, 100), ("long_sequence", 85, 100)],
          [("precompile", 130, 150), ("gpu_tests", 130, 150)],
          [("tune", 120, 100)],
          [("bench", 130, 60)],
          [("report", 30, 80)]]
TOTAL = {False: 540, True: 480}
RACECHECK_LEAST = 15  # seconds left in the sanitize phase for racecheck to start
_groups = set()  # process groups running now


# a process group of its own (on Python 3.10, a session of its own)
OWN_GROUP = dict(process_group=0) if sys.version_info >= (3, 11) else dict(start_new_session=True)


def run(cmd, log_path, deadline, env):
    """Run cmd in a process group of its own, output appended to log_path, until it exits or the
    deadline passes; then the whole group is killed, so no child outlives the step. Returns the exit
    code, or None if the deadline stopped it."""
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, **OWN_GROUP)
        _groups.add(proc.pid)
        try:
            return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None
        finally:
            _kill_group(proc.pid)
            proc.wait()
            _groups.discard(proc.pid)


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def status_of(rc):
    return "stopped at its budget" if rc is None else "done" if rc == 0 else f"failed (exit {rc})"


def find_sanitizer(path=None, roots=None):
    """compute-sanitizer on PATH (or `path`), else under a CUDA root (/usr/local/cuda*), else next
    to ncu; None if there is none."""
    found = shutil.which("compute-sanitizer", path=path)
    if found:
        return found
    ncu = shutil.which("ncu", path=path)
    near_ncu = [os.path.dirname(p) for p in {ncu, os.path.realpath(ncu)}] if ncu else []
    roots = sorted(glob.glob("/usr/local/cuda*"), reverse=True) if roots is None else roots
    for candidate in ([os.path.join(r, "bin", "compute-sanitizer") for r in roots]
                      + [os.path.join(r, "compute-sanitizer", "compute-sanitizer")
                         for r in roots + [os.path.dirname(d) for d in near_ncu]]
                      + [os.path.join(d, "compute-sanitizer") for d in near_ncu]):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def sanitizer_counts(text):
    """The errors (and racecheck's warnings) a compute-sanitizer log reports, from its summary line."""
    counts = {}
    for found in re.findall(r"ERROR SUMMARY: (\d+) errors?", text)[-1:]:
        counts["errors"] = int(found)
    for errors, warnings in re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) "
                                       r"warnings?\)", text)[-1:]:
        counts.setdefault("errors", int(errors))
        counts["warnings"] = int(warnings)
    return counts


class Kit:
    sanitize_workload = [sys.executable, os.path.join(BENCH, "sanitize_cases.py")]

    def __init__(self, dry_run, target, results, env, sanitizer):
        self.dry_run, self.target, self.results, self.env, self.sanitizer = dry_run, target, results, env, sanitizer
        self.cli = [sys.executable, "-m", "persistrnn"]

    def log(self, name):
        return os.path.join(self.results, f"{name}.log")

    def text(self, name):
        with open(self.log(name), errors="replace") as f:
            return f.read()

    def last_line(self, name):
        lines = self.text(name).split("\n") if os.path.exists(self.log(name)) else []
        return next((line.strip()[:200] for line in reversed(lines) if line.strip()), None)

    def step(self, record, cmd, deadline, log=None, **env):
        record["commands"].append(shlex.join(cmd))
        return run(cmd, self.log(log or record["name"]), deadline, dict(self.env, **env))

    # ---- the phases: each returns the fields of its record (status, headline, details) ----

    def sanitize(self, record, deadline):
        workload = self.sanitize_workload
        if self.dry_run:
            rc = self.step(record, workload + ["--backend", "interpret", "--case", "lstm_proj", "gru_lengths"],
                           deadline)
            return dict(status=status_of(rc), headline=f"{self._cases(record)} under the interpreter (dry run: "
                                                       "no sanitizer)")
        rc = self.step(record, workload + ["--jobs", "8"], deadline)  # compiles the kernels, in parallel
        cases = self._cases(record)
        if rc is None:
            return dict(status=status_of(rc), headline=f"{cases}; stopped before the sanitizer ran")
        if self.sanitizer is None:
            return dict(status=status_of(rc), headline=f"{cases}; compute-sanitizer not found: ran without it")
        tools, failed = {}, rc != 0
        for tool in ("memcheck", "racecheck"):
            if tool == "racecheck" and deadline - time.monotonic() < RACECHECK_LEAST:
                tools[tool] = dict(status="not run: budget spent")
                break
            name = f"sanitize_{tool}"
            # every tensor its own allocation, so that a read past one is outside any
            trc = self.step(record, [self.sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "20",
                                     *workload], deadline, log=name, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
            tools[tool] = dict(status=status_of(trc), rc=trc, **sanitizer_counts(self.text(name)))
            if trc is None:
                break
            failed |= trc != 0
        record["sanitizer"] = tools
        headline = "; ".join([cases] + [f"{tool} " + (f"{t['errors']} errors" if "errors" in t else t["status"])
                                        + (f" ({t['warnings']} warnings)" if t.get("warnings") else "")
                                        for tool, t in tools.items()])
        stopped = tools["memcheck"]["rc"] is None
        return dict(status=status_of(None) if stopped else "failed" if failed else "done", headline=headline)

    def _cases(self, record):
        """'N of M cases ok' from the workload's lines ('case: ok' or 'case: what went wrong')."""
        record["cases"] = dict(re.findall(r"^((?:lstm|gru)\w*): (.+)$", self.text(record["name"]), re.M))
        return f"{list(record['cases'].values()).count('ok')} of {len(record['cases'])} cases ok"

    def long_sequence(self, record, deadline):
        out = os.path.join(self.results, "long_sequence.json")
        cmd = [sys.executable, os.path.join(BENCH, "long_sequence.py"), "--out", out,
               # no new case once a case could no longer finish: the compile of one takes seconds
               "--budget", str(max(1, int(deadline - time.monotonic()) - 20))]
        if self.dry_run:
            cmd += ["--backend", "interpret", "--seq", "32", "--batch", "2", "--hidden", "16"]
        rc = self.step(record, cmd, deadline)
        fields = dict(status=status_of(rc), headline=None)
        if os.path.exists(out):
            with open(out) as f:
                record["table"] = table = json.load(f)
            rows = [(e["ratio"], c, name) for c in table["cases"] if "errors" in c for name, e in c["errors"].items()]
            if rows:
                ratio, c, name = max(rows, key=lambda r: r[0])
                fields["headline"] = (f"worst error ratio persistrnn/torch.nn {ratio:.2f} ({c['cell']} {c['dtype']} "
                                      f"H={c['hidden']} {name}; {c['errors'][name]['ours']:.1e} against float64), "
                                      f"{len(table['cases'])} cases")
        return fields

    def precompile(self, record, deadline):
        grid, workers = (DRY_GRID, "2") if self.dry_run else (TUNE_GRID, "8")  # gpu_tests uses the other 8 cores
        rc = self.step(record, self.cli + ["tune", "--static", "--target", self.target, *grid, "--workers", workers,
                                           "--json"], deadline)
        lines = [line for line in self.text(record["name"]).splitlines() if line.startswith("[")]
        fields = dict(status=status_of(rc), headline=None)
        if lines:
            report = json.loads(lines[-1])
            fields["headline"] = (f"{sum(r['survivors'] for r in report)} configs compiled for {len(report)} "
                                  f"layers ({self.target})")
        return fields

    def gpu_tests(self, record, deadline):
        cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-p", "no:cacheprovider"]
        cmd += ["-q", "--co"] if self.dry_run else ["-v", "-n", "8"]
        # a test stuck in one worker gives the others time to finish
        timeout = str(max(30, int(deadline - time.monotonic()) // 2))
        rc = self.step(record, cmd, deadline, PERSISTRNN_GPU_TEST_TIMEOUT=timeout)
        record["test_timeout_s"] = int(timeout)
        text = self.text(record["name"])
        found = re.findall(r"^[=\s]*(\d+(?:/\d+)? (?:passed|failed|errors?|skipped|tests? collected).*?)[=\s]*$",
                           text, re.M)
        counts = {word: len(re.findall(rf"\b{word.upper()}\b", text)) for word in ("passed", "failed")}
        stopped = f"{counts['passed']} passed, {counts['failed']} failed before the stop" if rc is None else None
        return dict(status=status_of(rc), headline=found[-1] if found else stopped)

    def tune(self, record, deadline):
        if self.dry_run:
            cmd = ["tune", "--backend", "interpret", *DRY_GRID, "--seq", "4", "--repeats", "1", "--max-candidates",
                   "2"]
        else:
            cmd = ["tune", *TUNE_GRID, "--seq", "256", "--repeats", "7", "--max-candidates", "4"]
        rc = self.step(record, self.cli + cmd, deadline)
        fields = dict(status=status_of(rc), headline=None)
        tables = glob.glob(os.path.join(self.results, "tuned", "*.json"))
        if tables:
            with open(tables[0]) as f:
                choices = [e["choice"] for e in json.load(f).get("entries", {}).values()]
            fields["headline"] = (f"{len(choices)} layers in tuned/{os.path.basename(tables[0])}: "
                                  f"{choices.count('kernel')} kernel, {choices.count('torch')} torch")
        return fields

    def bench(self, record, deadline):
        sizes = (["--batch", "2", "--hidden", "32", "--seq", "4"] if self.dry_run else
                 ["--batch", "1", "16", "64", "--hidden", "256", "512", "1024", "--dtype", "float16", "bfloat16",
                  "--seq", "1024", "--repeat", "10"])
        # the bench renders its report after its last case: leave it the time
        budget = max(1, int(deadline - time.monotonic()) - 25)
        rc = self.step(record, self.cli + ["bench", *sizes, "--out", self.results, "--budget", str(budget)],
                       deadline)
        lines = re.findall(r"^(.*(?:geometric mean|skipped for the budget|cases failed|no CUDA GPU).*)$",
                           self.text(record["name"]), re.M)
        return dict(status=status_of(rc), headline="; ".join(lines) or None)

    def report(self, record, deadline):
        results_json, rendered = (os.path.join(self.results, name) for name in ("results.json", "report.md"))
        if self.dry_run:  # the bench measured nothing on CPU: render the test fixture (made-up numbers)
            cmd = ["report", os.path.join(ROOT, "tests", "fixtures", "bench_results_FIXTURE.json"), "--out",
                   os.path.join(self.results, "report-fixture")]
        elif not os.path.exists(results_json):
            return dict(status="skipped", headline="no results.json: the bench measured nothing")
        elif os.path.exists(rendered) and os.path.getmtime(rendered) >= os.path.getmtime(results_json):
            return dict(status="skipped", headline="report.md is up to date (the bench rendered it)")
        else:
            cmd = ["report", results_json]
        return dict(status=status_of(self.step(record, self.cli + cmd, deadline)), headline=None)


def _package_root():
    """A folder holding a link named persistrnn to the repository root (which is the package), so
    that the kit and its phases import it without an install; also put on this process's path."""
    pkgroot = tempfile.mkdtemp(prefix="kit-pkg-")
    os.symlink(ROOT, os.path.join(pkgroot, "persistrnn"))
    sys.path.insert(0, pkgroot)
    return pkgroot


def _with_pyperf(env):
    """Whether the phases can import pyperf; if not, install the wheels in .whl/ (pyperf, psutil)
    into a folder of their own and put it on the phases' path."""
    def importable():
        return subprocess.run([sys.executable, "-c", "import pyperf"], env=env, capture_output=True).returncode == 0

    if importable():
        return "importable"
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if wheels:
        site = tempfile.mkdtemp(prefix="kit-site-")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                        *wheels], check=False)
        env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
        if importable():
            return "installed from .whl/"
    return "missing (the bench skips its pyperf suites)"


def parse_budgets(items, defaults):
    budgets = dict(defaults)
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in budgets or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            raise ValueError(f"--budget wants PHASE=SECONDS with PHASE one of {', '.join(budgets)}; "
                             f"got {item!r}")
        budgets[name] = float(seconds)
    return budgets


def plan_text(budgets, total):
    lines = [f"phases and budgets (s), total {total:g}; phases on one line run at the same time:"]
    lines += ["  " + ", ".join(f"{name} {budgets[name]:g}" for name, *_ in stage) for stage in STAGES]
    return "\n".join(lines)


def summary(record):
    lines = [f"# persistrnn device kit: {record['device']}" + (" (dry run)" if record["dry_run"] else ""), "",
             f"pyperf: {record['pyperf']}. compute-sanitizer: {record['compute_sanitizer'] or 'not found'}. "
             f"Wall {record['wall_s']:g} s of {record['total_budget_s']:g}.", "",
             "| phase | budget (s) | wall (s) | status | headline |", "|---|---:|---:|---|---|"]
    lines += [f"| {p['name']} | {p['budget_s']:g} | {p.get('wall_s', '')} | {p['status']} | "
              f"{(p.get('headline') or '').replace('|', '/')} |" for p in record["phases"]]
    return "\n".join(lines) + "\n"


def publish(record, results, out):
    """kit.json and summary.md into the results; with out, those two and an archive of the results."""
    for folder in [results] + ([out] if out else []):
        with open(os.path.join(folder, "kit.json"), "w") as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(folder, "summary.md"), "w") as f:
            f.write(summary(record))
    if out:
        partial = os.path.join(out, "kit.tar.gz.partial")
        try:
            with tarfile.open(partial, "w:gz") as tar:
                tar.add(results, arcname=os.path.basename(results))
            os.replace(partial, os.path.join(out, "kit.tar.gz"))
        except OSError as exc:  # a file rewritten while it was read: the next phase's archive has it
            print(f"[kit] archive not rewritten this time: {exc}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder that receives kit.tar.gz, kit.json and summary.md")
    p.add_argument("--budget", action="append", default=[], metavar="PHASE=SECONDS",
                   help="a phase's wall-clock budget (repeatable)")
    p.add_argument("--total", type=float, default=None, help="no phase starts, or runs, past this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes, into a temporary folder")
    p.add_argument("--list", action="store_true", help="print the phases and their budgets, and exit")
    args = p.parse_args(argv)
    try:
        budgets = parse_budgets(args.budget, {name: dry if args.dry_run else gpu
                                              for stage in STAGES for name, gpu, dry in stage})
    except ValueError as exc:
        p.error(str(exc))
    total = args.total or TOTAL[args.dry_run]
    print(plan_text(budgets, total), flush=True)
    if args.list:
        return 0
    kit_start = time.monotonic()
    pkgroot = _package_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkgroot, env.get("PYTHONPATH")]))
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU, also on a machine with a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from persistrnn.autotune.cache import device_slug
    from persistrnn.configs import target_of
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
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    env["PERSISTRNN_CACHE_DIR"] = os.path.join(results, "tuned")
    record = dict(device=device, dry_run=args.dry_run, results=results, total_budget_s=total,
                  command=shlex.join(["python", "benchmarks/device_kit.py", *(sys.argv[1:] if argv is None else argv)]),
                  pyperf=_with_pyperf(env), compute_sanitizer=find_sanitizer(), wall_s=0,
                  phases=[dict(name=name, budget_s=budgets[name], status="not started", headline=None, commands=[])
                          for stage in STAGES for name, *_ in stage])
    print(f"[kit] pyperf: {record['pyperf']}; compute-sanitizer: {record['compute_sanitizer'] or 'not found'}",
          flush=True)
    kit = Kit(args.dry_run, target, results, env, record["compute_sanitizer"])
    phases = {ph["name"]: ph for ph in record["phases"]}
    lock = threading.Lock()

    def run_phase(ph):
        started = time.monotonic()
        deadline = min(started + ph["budget_s"], kit_start + total)
        if deadline - started < 1:
            fields = dict(status="skipped: total budget spent")
        else:
            print(f"[kit] {ph['name']} (budget {deadline - started:.0f} s)", flush=True)
            ph["status"] = "running"
            try:
                fields = getattr(kit, ph["name"])(ph, deadline)
            except Exception as exc:  # noqa: BLE001 (a phase's own failure is its record; the kit goes on)
                fields = dict(status=f"failed: {type(exc).__name__}: {exc}")
            if fields["status"].startswith("failed") and not fields.get("headline"):
                fields["headline"] = kit.last_line(ph["name"])
        with lock:
            ph.update(fields, wall_s=round(time.monotonic() - started, 1))
            record["wall_s"] = round(time.monotonic() - kit_start, 1)
            print(f"[kit] {ph['name']}: {ph['status']} after {ph['wall_s']} s"
                  + (f": {ph['headline']}" if ph.get("headline") else ""), flush=True)
            publish(record, results, args.out)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for stage in STAGES:
            threads = [threading.Thread(target=run_phase, args=(phases[name],), daemon=True) for name, *_ in stage]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        for pgid in list(_groups):  # the kit itself was stopped: so are its phases
            _kill_group(pgid)
    print(f"[kit] results in {results} ({record['wall_s']} s)")
    print(summary(record), end="")
    return 0 if all(ph["status"] in ("done", "skipped") for ph in record["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
