"""The benchmark report: rendering a `results.json` (what `persistrnn bench` measured) into
report.md, PNG plots and, where pyperf is installed, one pyperf suite per mode, and comparing two
result sets.

    persistrnn report RESULTS_JSON [--out DIR]          re-render the report of a results.json
    persistrnn report --compare A_JSON B_JSON [--out DIR]   what changed from A to B, per shape

results.json holds every raw time (milliseconds, CUDA events) of both implementations per case;
every statistic here is derived from them (median, and the 25th and 75th percentiles interpolated
linearly between the sorted times, as pyperf computes them), so a report re-rendered later says
exactly what the first one said. pyperf is needed only to write the pyperf suites; without it the
report says they were skipped. A results.json whose "fixture" is
true is a test fixture with made-up numbers: its report says so on top, and it is never written
under benchmarks/results/.
"""
import argparse
import json
import math
import os
import statistics
import sys

SCHEMA = "persistrnn-bench/1"
IMPLS = ("persistrnn", "torch.nn")
MODES = {"forward": "Forward (inference)", "train": "Training step (forward + backward)"}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# The per-step floor the report measures against (DESIGN.md, "The time step on Hopper").
FLOOR = {"us_per_step": 1.0,
         "source": "DESIGN.md, 'The time step on Hopper': a step of a persistent kernel whose programs meet at a "
                   "global barrier costs at least about 1 us on an H100 (the barrier's ~3 L2 round trips of "
                   "130-250 ns each, and the reload of h); a model, not a measurement"}


# ---- loading and statistics ----

def load(path):
    with open(path) as f:
        results = json.load(f)
    if results.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a persistrnn bench results file (schema {results.get('schema')!r}, "
                         f"expected {SCHEMA!r})")
    return results


def case_name(case):
    """A shape's name, the same in results.json, the pyperf suites and --compare."""
    name = f"{case['mode']}-{case['cell']}-{case['dtype']}-B{case['batch']}-H{case['hidden']}-T{case['seq']}"
    if case["input_size"] != case["hidden"]:
        name += f"-I{case['input_size']}"
    if case["layers"] > 1 or case["bidirectional"]:
        name += f"-L{case['layers']}" + ("-bidir" if case["bidirectional"] else "")
    return name


def have_pyperf():
    """Whether pyperf can be imported (it writes the pyperf suites, nothing else)."""
    try:
        import pyperf  # noqa: F401
    except ImportError:
        return False
    return True


def _benchmark(name, times_ms):
    import pyperf
    run = pyperf.Run([t / 1e3 for t in times_ms], metadata={"name": name, "unit": "second"},
                     collect_metadata=False)
    return pyperf.Benchmark([run])


def percentile(values, p):
    """The p-th percentile (0-100), interpolated linearly between the sorted values (pyperf's rule)."""
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    f, c = math.floor(k), math.ceil(k)
    return values[f] if f == c else values[f] * (c - k) + values[c] * (k - f)


def stats(times_ms):
    """{"median", "q25", "q75"} in milliseconds."""
    return {"median": statistics.median(times_ms), "q25": percentile(times_ms, 25), "q75": percentile(times_ms, 75)}


def compared(case):
    """Whether a case ran persistrnn's kernels: on the torch path torch.nn ran on both sides, and the
    ratio of the two is no speedup of persistrnn's."""
    return case["path"] != "torch"


def summarize(case):
    """A case's derived figures: stats per implementation, speedup (torch.nn / persistrnn, > 1: we are
    faster), microseconds per time step."""
    s = {impl: stats(case["times_ms"][impl]) for impl in IMPLS}
    return dict(stats=s, speedup=s["torch.nn"]["median"] / s["persistrnn"]["median"],
                us_per_step={impl: s[impl]["median"] * 1e3 / case["seq"] for impl in IMPLS})


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# ---- the report ----

def _ms(st):
    return f"{st['median']:.3f} [{st['q25']:.3f}, {st['q75']:.3f}]"


def _mib(value):
    return "-" if value is None else f"{value / 2**20:.1f}"


def _is_single(case):
    return case["layers"] == 1 and not case["bidirectional"]


def _path(case):
    if case["path"] == "torch":
        both = "torch.nn on both sides"
        return case["reason"] if case["reason"].startswith(both) else f"{both}: {case['reason']}"
    text = f"{case['path']} {case.get('config') or ''}".strip()
    return f"{text} ({case['config_source']})" if case.get("config_source") else text


def _speedup(case, summary):
    return f"{summary['speedup']:.2f}x" if compared(case) else "- (torch.nn both sides)"


def markdown(results, plots, suites=None):
    """report.md; `suites` are the pyperf suites written beside it (None: pyperf was not there)."""
    env, method = results["environment"], results["method"]
    floor = results.get("floor", FLOOR)
    out = [f"# persistrnn benchmark: {env['gpu']}", ""]
    if results.get("fixture"):
        out += ["> **FIXTURE: made-up numbers for testing the report code. Nothing here was measured.**", ""]
    out += ["## Environment", "", "| | |", "|---|---|"]
    for key in ("gpu", "capability", "sms", "clocks", "driver", "cuda", "cudnn", "torch", "triton", "persistrnn",
                "python", "git_commit", "date", "command"):
        value = env.get(key)
        out.append(f"| {key} | {'not readable' if value is None else value} |")
    out += ["", "## Method", "",
            f"- {method['timing']}",
            f"- {method['warmup']} warm-up calls, then {method['repeat']} timed calls of each implementation, "
            "alternating persistrnn and torch.nn (cuDNN) call by call on the same weights and inputs, so that "
            "clock and thermal drift hit both alike.",
            "- Figures are medians with the interquartile range [25th, 75th percentile] of the timed calls "
            "(linear interpolation, as pyperf computes them); speedup = torch.nn median / persistrnn median "
            "(> 1: persistrnn is faster); the geometric mean is over the cases of a mode that ran persistrnn's "
            "kernels (a case on the torch path ran torch.nn on both sides and has no speedup).",
            f"- {method['memory']}",
            f"- {method['error']}",
            f"- {method['cudnn_algo']}"]
    if method.get("configs"):
        out.append(f"- persistrnn's configs: {method['configs']}.")
    out += [f"- Per-step floor: {floor['us_per_step']:g} us. Source: {floor['source']}.",
            "- pyperf suites: " + (", ".join(suites) + " (`python -m pyperf compare_to A B` compares two)" if suites
                                   else "none written" if suites is not None else
                                   "skipped: pyperf is not installed here (the statistics above do not need it; "
                                   "`persistrnn report results.json` with pyperf installed writes them)") + ".", ""]
    run = results.get("run")
    if run:
        out += ["## Run", ""]
        measured, skipped, failed = len(results["cases"]), run.get("skipped_for_budget", []), run.get("failed", [])
        out.append(f"- {measured} of {run['planned']} planned cases measured"
                   + (f" in {run['elapsed_s']:g} s" if run.get("elapsed_s") is not None else "") + ".")
        if skipped:
            out.append(f"- {len(skipped)} cases skipped for the budget ({run['budget_s']:g} s: no case starts once "
                       f"it is spent): {', '.join(skipped)}.")
        for f in failed:
            out.append(f"- failed: {f['case']}: {f['error']}")
        missing = run["planned"] - measured - len(skipped) - len(failed)
        if missing > 0:
            out.append(f"- {missing} cases not measured: the run stopped before them (results.json is written "
                       "after every case).")
        out.append("")
    for mode, title in MODES.items():
        cases = [c for c in results["cases"] if c["mode"] == mode]
        if not cases:
            continue
        out += [f"## {title}", "",
                "| cell | dtype | B | H | T | layers | persistrnn ms | torch.nn ms | speedup | persistrnn path | "
                "cuDNN algorithm | max abs error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        summaries = [summarize(c) for c in cases]
        for c, d in zip(cases, summaries):
            layers = f"{c['layers']}{' bidir' if c['bidirectional'] else ''}"
            out.append(f"| {c['cell']} | {c['dtype']} | {c['batch']} | {c['hidden']} | {c['seq']} | {layers} | "
                       f"{_ms(d['stats']['persistrnn'])} | {_ms(d['stats']['torch.nn'])} | {_speedup(c, d)} | "
                       f"{_path(c)} | {c['cudnn_algo']} | {c['max_abs_error']:.2e} |")
        kernel = [d["speedup"] for c, d in zip(cases, summaries) if compared(c)]
        both = len(cases) - len(kernel)
        out += ["", (f"Geometric mean of the speedups: **{geomean(kernel):.2f}x** over {len(kernel)} cases run by "
                     "persistrnn's kernels" if kernel else "No case of this mode ran persistrnn's kernels")
                + (f"; {both} ran torch.nn on both sides (no kernel config) and are not counted" if both else "")
                + ".", ""]
        for name in plots.get(mode, []):
            out.append(f"![{name}]({name})")
        out.append("")

    out += ["## Microseconds per step against the floor", "",
            f"One layer, one direction; floor {floor['us_per_step']:g} us per step (above).", "",
            "| mode | cell | dtype | B | H | persistrnn us/step | torch.nn us/step | persistrnn / floor |",
            "|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        if _is_single(c):
            d = summarize(c)
            ours, ref = d["us_per_step"]["persistrnn"], d["us_per_step"]["torch.nn"]
            out.append(f"| {c['mode']} | {c['cell']} | {c['dtype']} | {c['batch']} | {c['hidden']} | {ours:.2f} | "
                       f"{ref:.2f} | {ours / floor['us_per_step']:.2f} |")
    out += ["", "![us per step](us_per_step.png)" if any(_is_single(c) for c in results["cases"]) else
            "(no single-layer case measured)", "", "## Memory", "",
            "Peak bytes allocated by torch's caching allocator during one call (forward) or one training step, "
            "above what was allocated before it.", "",
            "| mode | cell | dtype | B | H | layers | persistrnn MiB | torch.nn MiB | persistrnn / torch.nn |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        ours, ref = c["peak_bytes"]["persistrnn"], c["peak_bytes"]["torch.nn"]
        ratio = f"{ours / ref:.2f}" if ours is not None and ref else "-"
        layers = f"{c['layers']}{' bidir' if c['bidirectional'] else ''}"
        out.append(f"| {c['mode']} | {c['cell']} | {c['dtype']} | {c['batch']} | {c['hidden']} | {layers} | "
                   f"{_mib(ours)} | {_mib(ref)} | {ratio} |")
    return "\n".join(out) + "\n"


# ---- plots ----

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, axes, title, path):
    """One legend for all panels, under them, and the title above."""
    handles, labels = {}, []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="lower center", fontsize=7,
                   ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.02 - 0.03 * ((len(labels) - 1) // 4)))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 4) if labels else 0, 1, 0.95))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    fig.clear()
    _pyplot().close(fig)


def _title(results, text):
    return ("FIXTURE, made-up numbers: " if results.get("fixture") else "") + text


def _single(results, mode):
    return [c for c in results["cases"] if c["mode"] == mode and _is_single(c)]


def _values(cases, key):
    return sorted({c[key] for c in cases})


def plot_time_vs_hidden(results, mode, path):
    """Time against H, one panel per (cell, batch), persistrnn solid and torch.nn dashed per dtype."""
    plt = _pyplot()
    cases = _single(results, mode)
    cells, batches, dtypes = _values(cases, "cell"), _values(cases, "batch"), _values(cases, "dtype")
    fig, axes = plt.subplots(len(cells), len(batches), figsize=(3.2 * len(batches), 2.8 * len(cells)),
                             squeeze=False)
    for i, cell in enumerate(cells):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for k, dtype in enumerate(dtypes):
                mine = sorted((c for c in cases if (c["cell"], c["batch"], c["dtype"]) == (cell, batch, dtype)),
                              key=lambda c: c["hidden"])
                hs = [c["hidden"] for c in mine]
                for impl, style in (("persistrnn", "-"), ("torch.nn", "--")):
                    ax.plot(hs, [summarize(c)["stats"][impl]["median"] for c in mine], style, marker="o",
                            color=f"C{k}", label=f"{impl} {dtype}")
            ax.set_title(f"{cell.upper()} B={batch}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.set_xticks(_values(cases, "hidden"))
            ax.set_xlabel("H")
            if j == 0:
                ax.set_ylabel("ms per call (median)")
    _save(fig, axes, _title(results, f"{MODES[mode]}: time against H (persistrnn solid, torch.nn dashed)"), path)


def plot_speedup_heatmap(results, mode, cell, path):
    """Speedup over torch.nn on a B x H grid, one panel per dtype."""
    import numpy as np
    plt = _pyplot()
    cases = [c for c in _single(results, mode) if c["cell"] == cell]
    batches, hiddens, dtypes = _values(cases, "batch"), _values(cases, "hidden"), _values(cases, "dtype")
    fig, axes = plt.subplots(1, len(dtypes), figsize=(1.2 + 0.9 * len(hiddens) * len(dtypes), 0.6 + 0.55 * len(batches)),
                             squeeze=False)
    for k, dtype in enumerate(dtypes):
        grid = np.full((len(batches), len(hiddens)), np.nan)
        for c in cases:
            if c["dtype"] == dtype and compared(c):  # a blank cell: torch.nn on both sides
                grid[batches.index(c["batch"]), hiddens.index(c["hidden"])] = summarize(c)["speedup"]
        ax = axes[0][k]
        image = ax.imshow(np.log2(grid), cmap="RdYlGn", vmin=-2, vmax=2, aspect="auto")
        for (r, col), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(col, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(hiddens)), [str(h) for h in hiddens])
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("H")
        if k == 0:
            ax.set_ylabel("B")
        ax.set_title(dtype, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="log2 speedup (green: persistrnn faster)", shrink=0.8)
    fig.suptitle(_title(results, f"{cell.upper()} {MODES[mode].lower()}: speedup over torch.nn (cuDNN)"),
                 fontsize=10, y=1.08)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_us_per_step(results, path, floor_us):
    """Microseconds per step against B, one panel per (mode, H), with the floor."""
    plt = _pyplot()
    cases = [c for c in results["cases"] if _is_single(c)]
    modes = [m for m in MODES if any(c["mode"] == m for c in cases)]
    hiddens = _values(cases, "hidden")
    series = sorted({(c["cell"], c["dtype"]) for c in cases})
    fig, axes = plt.subplots(len(modes), len(hiddens), figsize=(3.2 * len(hiddens), 2.8 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, hidden in enumerate(hiddens):
            ax = axes[i][j]
            for k, (cell, dtype) in enumerate(series):
                mine = sorted((c for c in cases if (c["mode"], c["hidden"], c["cell"], c["dtype"]) ==
                               (mode, hidden, cell, dtype)), key=lambda c: c["batch"])
                bs = [c["batch"] for c in mine]
                for impl, style in (("persistrnn", "-"), ("torch.nn", "--")):
                    ax.plot(bs, [summarize(c)["us_per_step"][impl] for c in mine], style, marker="o",
                            color=f"C{k}", label=f"{impl} {cell} {dtype}")
            ax.axhline(floor_us, color="black", linewidth=0.8, linestyle=":", label="floor")
            ax.set_xscale("log", base=2)
            ax.set_xticks(_values(cases, "batch"), [str(b) for b in _values(cases, "batch")])
            ax.set_ylim(bottom=0)
            ax.set_title(f"{mode} H={hidden}", fontsize=9)
            ax.set_xlabel("B")
            if j == 0:
                ax.set_ylabel("us per step (median)")
    _save(fig, axes, _title(results, "Microseconds per time step (persistrnn solid, torch.nn dashed, floor dotted)"),
          path)


# ---- writing ----

def _check_out(results, out):
    """A fixture's report never lands under benchmarks/results/."""
    if results.get("fixture"):
        results = os.path.realpath(RESULTS_DIR)
        inside = os.path.commonpath([os.path.realpath(out), results]) == results
        if inside:
            raise ValueError(f"{out}: a fixture's report (made-up numbers) is never written under {RESULTS_DIR}")


def pyperf_suite(results, mode, path):
    """One pyperf suite of a mode: a benchmark per (shape, implementation); `pyperf compare_to` reads two."""
    import pyperf
    benchmarks = [_benchmark(f"{case_name(c)}-{impl}", c["times_ms"][impl])
                  for c in results["cases"] if c["mode"] == mode for impl in IMPLS]
    pyperf.BenchmarkSuite(benchmarks).dump(path, replace=True)


def render(results, out):
    """Write out/report.md, out/results.json, the PNGs and, where pyperf is installed,
    out/<mode>.pyperf.json; returns the file names."""
    _check_out(results, out)
    os.makedirs(out, exist_ok=True)
    files, plots = ["report.md", "results.json"], {}
    suites = [] if have_pyperf() else None
    for mode in MODES:
        if not any(c["mode"] == mode for c in results["cases"]):
            continue
        if suites is not None:
            suite = f"{mode}.pyperf.json"
            pyperf_suite(results, mode, os.path.join(out, suite))
            files.append(suite)
            suites.append(suite)
        plots[mode] = []
        if _single(results, mode):
            plots[mode].append(f"time_vs_hidden_{mode}.png")
            plot_time_vs_hidden(results, mode, os.path.join(out, plots[mode][-1]))
            for cell in _values(_single(results, mode), "cell"):
                plots[mode].append(f"speedup_{cell}_{mode}.png")
                plot_speedup_heatmap(results, mode, cell, os.path.join(out, plots[mode][-1]))
    files += [p for ps in plots.values() for p in ps]
    if any(_is_single(c) for c in results["cases"]):
        plot_us_per_step(results, os.path.join(out, "us_per_step.png"), results.get("floor", FLOOR)["us_per_step"])
        files.append("us_per_step.png")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(results, plots, suites))
    return files


def compare(a, b):
    """Per shape present in both: each implementation's median in A and B, the ratio B/A, and
    whether the interquartile ranges overlap (if they do, the change is within the spread)."""
    rows = []
    b_cases = {case_name(c): c for c in b["cases"]}
    for ca in a["cases"]:
        cb = b_cases.get(case_name(ca))
        if cb is None:
            continue
        row = {"shape": case_name(ca)}
        for impl in IMPLS:
            sa, sb = stats(ca["times_ms"][impl]), stats(cb["times_ms"][impl])
            row[impl] = dict(a=sa, b=sb, ratio=sb["median"] / sa["median"],
                             iqr_overlap=sa["q25"] <= sb["q75"] and sb["q25"] <= sa["q75"])
        rows.append(row)
    only = sorted(set(map(case_name, a["cases"])) ^ set(b_cases))
    return dict(a=a["environment"], b=b["environment"], rows=rows, unmatched=only,
                geomean_ratio={impl: geomean(r[impl]["ratio"] for r in rows) for impl in IMPLS},
                fixture=bool(a.get("fixture") or b.get("fixture")))


def compare_markdown(diff, a_path, b_path):
    out = ["# persistrnn benchmark: B against A", ""]
    if diff["fixture"]:
        out += ["> **FIXTURE: at least one side is a test fixture with made-up numbers.**", ""]
    out += [f"- A: `{a_path}` ({diff['a']['gpu']}, persistrnn {diff['a'].get('persistrnn')}, commit "
            f"{diff['a'].get('git_commit')})",
            f"- B: `{b_path}` ({diff['b']['gpu']}, persistrnn {diff['b'].get('persistrnn')}, commit "
            f"{diff['b'].get('git_commit')})",
            "- ratio = B median / A median (< 1: B is faster); 'within spread' when the interquartile ranges "
            "overlap. torch.nn's ratio shows how much the machine itself moved.",
            f"- Geometric mean of the ratios: persistrnn {diff['geomean_ratio']['persistrnn']:.3f}, torch.nn "
            f"{diff['geomean_ratio']['torch.nn']:.3f}, over {len(diff['rows'])} shapes.", "",
            "| shape | persistrnn A ms | persistrnn B ms | ratio | within spread | torch.nn ratio | within spread |",
            "|---|---|---|---|---|---|---|"]
    for r in diff["rows"]:
        p, t = r["persistrnn"], r["torch.nn"]
        out.append(f"| {r['shape']} | {_ms(p['a'])} | {_ms(p['b'])} | {p['ratio']:.3f} | "
                   f"{'yes' if p['iqr_overlap'] else 'no'} | {t['ratio']:.3f} | {'yes' if t['iqr_overlap'] else 'no'} |")
    if diff["unmatched"]:
        out += ["", "In one set only: " + ", ".join(diff["unmatched"])]
    return "\n".join(out) + "\n"


def write_compare(a_path, b_path, out):
    a, b = load(a_path), load(b_path)
    diff = compare(a, b)
    if diff["fixture"]:
        _check_out({"fixture": True}, out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(diff, f, indent=1)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(compare_markdown(diff, a_path, b_path))
    return diff


def main(argv=None):
    p = argparse.ArgumentParser(prog="persistrnn report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", help="a results.json written by persistrnn bench")
    p.add_argument("--compare", nargs=2, metavar=("A_JSON", "B_JSON"), help="two results.json files")
    p.add_argument("--out", default=None, help="folder (default: the results.json's own folder; for --compare, "
                                               "./bench-compare)")
    args = p.parse_args(argv)
    if bool(args.results) == bool(args.compare):
        p.error("give one RESULTS_JSON, or --compare A_JSON B_JSON")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        p.error(f"{exc.name} is missing: pip install 'persistrnn[bench]'")
    if args.results and not have_pyperf():
        print("persistrnn report: pyperf is not installed: the pyperf suites are skipped", file=sys.stderr)
    try:
        if args.compare:
            out = args.out or "bench-compare"
            diff = write_compare(*args.compare, out)
            print(compare_markdown(diff, *args.compare))
        else:
            out = args.out or os.path.dirname(os.path.abspath(args.results))
            files = render(load(args.results), out)
            print(f"wrote {', '.join(files)} to {out}")
    except (OSError, ValueError) as exc:
        print(f"persistrnn report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
