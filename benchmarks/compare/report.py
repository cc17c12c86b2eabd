"""The comparison's report: per-task summaries over seeds, the verdict on each common claim, and
the files (report.md, report.json, PNG plots). Needs matplotlib for the plots."""
import dataclasses

import numpy as np

from . import tasks as T
from .cells import EQUATIONS

CLAIMS = [
    "The LSTM has three gates and the GRU two.",
    "The GRU has fewer parameters and trains faster.",
    "The LSTM captures longer dependencies and more complex patterns.",
    "The GRU overfits less on small data.",
    "In many cases the difference is not significant.",
]


def quartiles(values):
    """(median, q25, q75) of a list of numbers, None where empty."""
    if not values:
        return None, None, None
    q25, median, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(median), float(q25), float(q75)


def counted_up_to(recognized):
    """The largest n such that every length 1..n was recognized (0 if n = 1 was not)."""
    n = 0
    for ok in recognized:
        if not ok:
            break
        n += 1
    return n


def summarize(task, runs):
    """Per cell: the final metric's median and IQR, the fraction of seeds that beat the baseline
    by the task's margin, and the medians of steps and training seconds to threshold over the seeds
    that reached it."""
    cells = {}
    for cell in ("lstm", "gru"):
        mine = [r for r in runs if r.cell == cell]
        if not mine:
            continue
        median, q25, q75 = quartiles([r.final for r in mine])
        reached = [r for r in mine if r.steps_to_threshold is not None]
        row = dict(hidden=mine[0].hidden, seeds=len(mine), final_median=median, final_q25=q25, final_q75=q75,
                   beat_baseline=sum(task.beats_baseline(r) for r in mine) / len(mine),
                   reached_threshold=len(reached),
                   steps_to_threshold=quartiles([r.steps_to_threshold for r in reached])[0],
                   seconds_to_threshold=quartiles([r.seconds_to_threshold for r in reached])[0],
                   stopped_by_budget=sum(r.stopped_by_budget for r in mine),
                   paths=sorted({r.path for r in mine}))
        if task.name == "counting":
            row["counted_up_to_median"] = quartiles([counted_up_to(r.extra["recognized"]) for r in mine])[0]
        if task.name == "digits":
            gaps = [r.extra["train_accuracy"] - r.final for r in mine]
            row["train_accuracy_median"] = quartiles([r.extra["train_accuracy"] for r in mine])[0]
            row["overfit_gap_median"] = quartiles(gaps)[0]
        cells[cell] = row
    return cells


def _better(task, a, b):
    """Whether metric value a is strictly better than b for the task."""
    return a > b if task.higher_is_better else a < b


def verdict(report):
    """One entry per claim: {claim, measured, held} with held True, False or None (not measured)."""
    learning, speed = report["learning"], report["speed"]
    arch = report["architecture"]
    lines = []
    gates = arch["gates"]
    lines.append(dict(claim=CLAIMS[0], held=gates["lstm"] == 3 and gates["gru"] == 2,
                      measured=f"gates read off torch.nn's weights: LSTM {gates['lstm']} (i, f, o; g is the "
                               f"candidate), GRU {gates['gru']} (r, z; n is the candidate)"))

    same = arch["same_hidden_parameters"]
    ratio_params = same["gru"] / same["lstm"]
    ours = {(r["cell"], r["hidden"]): r for r in speed if r["kind"] == "persistrnn"}
    hidden = report["config"]["hidden"]
    if ("lstm", hidden) in ours and ("gru", hidden) in ours:
        ratio_time = ours[("gru", hidden)]["train_us_per_step"] / ours[("lstm", hidden)]["train_us_per_step"]
        measured = (f"at H = {hidden}: GRU/LSTM parameters {ratio_params:.2f}, training-step time "
                    f"{ratio_time:.2f} ({report['config']['device_name']})")
        generic = {r["cell"]: r for r in speed if r["kind"].endswith("oneDNN off") and r["hidden"] == hidden}
        if len(generic) == 2:  # CPU: the default path fuses only the LSTM (oneDNN)
            measured += (f"; torch fuses only the LSTM with oneDNN on CPU: with the same generic path for both "
                         f"(oneDNN off) {generic['gru']['train_us_per_step'] / generic['lstm']['train_us_per_step']:.2f}")
        lines.append(dict(claim=CLAIMS[1], held=ratio_params < 1 and ratio_time < 1, measured=measured))
    else:
        lines.append(dict(claim=CLAIMS[1], held=None, measured=f"parameters GRU/LSTM {ratio_params:.2f}; "
                                                               "training time not measured"))

    long_tasks = [t for t in ("adding", "copy", "counting") if t in learning]
    if long_tasks:
        wins, parts = 0, []
        for name in long_tasks:
            task, cells = T.TASKS[name], learning[name]["cells"]
            if name == "counting":
                a, b = cells["lstm"]["counted_up_to_median"], cells["gru"]["counted_up_to_median"]
                parts.append(f"counting: recognized every n up to {a:g} (LSTM) vs {b:g} (GRU), trained to "
                             f"{T.COUNTING_N}")
                wins += a > b
            else:
                a, b = cells["lstm"]["final_median"], cells["gru"]["final_median"]
                parts.append(f"{name} (T = {learning[name]['seq']}): {task.metric} {a:.3g} (LSTM) vs {b:.3g} (GRU)")
                wins += _better(task, a, b)
        lines.append(dict(claim=CLAIMS[2], held=wins * 2 > len(long_tasks),
                          measured=f"LSTM better on {wins} of {len(long_tasks)} (medians over seeds): "
                                   + "; ".join(parts)))
    else:
        lines.append(dict(claim=CLAIMS[2], held=None, measured="not measured (no adding, copy or counting task run)"))

    if "digits" in learning:
        cells = learning["digits"]["cells"]
        a, b = cells["lstm"]["overfit_gap_median"], cells["gru"]["overfit_gap_median"]
        lines.append(dict(claim=CLAIMS[3], held=b < a,
                          measured=f"digits ({T.DIGITS_TRAIN} training images): train - test accuracy {a:.3f} "
                                   f"(LSTM) vs {b:.3f} (GRU), medians"))
    else:
        lines.append(dict(claim=CLAIMS[3], held=None, measured="not measured (digits not run)"))

    overlaps = []
    for name, entry in learning.items():
        lstm, gru = entry["cells"]["lstm"], entry["cells"]["gru"]
        overlap = lstm["final_q25"] <= gru["final_q75"] and gru["final_q25"] <= lstm["final_q75"]
        overlaps.append((name, overlap))
    if overlaps:
        close = [n for n, o in overlaps if o]
        lines.append(dict(claim=CLAIMS[4], held=len(close) * 2 >= len(overlaps),
                          measured=f"the interquartile ranges of the final metric over seeds overlap on "
                                   f"{len(close)} of {len(overlaps)} tasks ({', '.join(close) or 'none'})"))
    else:
        lines.append(dict(claim=CLAIMS[4], held=None, measured="not measured (no task run)"))
    return lines


# ---- plots ----

def _band(ax, xs, ys, label):
    """Median line and interquartile band over seeds (rows of ys)."""
    ys = np.asarray(ys, dtype=float)
    q25, median, q75 = np.percentile(ys, [25, 50, 75], axis=0)
    line, = ax.plot(xs, median, label=label)
    ax.fill_between(xs, q25, q75, alpha=0.25, color=line.get_color())


def _common_points(runs):
    """How many leading evaluation points all runs share (the same steps): a run stopped by the
    budget ends early, at a step off the others' grid."""
    points = 0
    while all(len(r.curve) > points for r in runs) and len({r.curve[points][0] for r in runs}) == 1:
        points += 1
    return points


def plot_curves(task, runs, path):
    """The learning curves of a task against steps and training seconds: median and IQR over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for cell in ("lstm", "gru"):
        mine = [r for r in runs if r.cell == cell]
        if not mine:
            continue
        curves = np.asarray([r.curve[:_common_points(mine)] for r in mine], dtype=float)
        label = f"{cell.upper()} (H = {mine[0].hidden})"
        _band(by_step, curves[0, :, 0], curves[:, :, 2], label)
        _band(by_time, np.median(curves[:, :, 1], axis=0), curves[:, :, 2], label)
    seq = runs[0].seq
    for ax in (by_step, by_time):
        ax.axhline(task.baseline(seq), color="gray", linestyle="--", linewidth=1, label="baseline")
        ax.set_ylabel(task.metric)
        ax.grid(alpha=0.3)
    by_step.set_xlabel("training step")
    by_time.set_xlabel("training seconds (median over seeds)")
    by_step.legend(fontsize=8)
    fig.suptitle(f"{task.name}: median and interquartile range over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_counting(runs, path):
    """Counting: the fraction of seeds that recognize a^n b^n, per n."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for cell in ("lstm", "gru"):
        mine = [r for r in runs if r.cell == cell]
        if mine:
            ns = mine[0].extra["ns"]
            ax.plot(ns, np.mean([r.extra["recognized"] for r in mine], axis=0), marker="o", markersize=3,
                    label=f"{cell.upper()} (H = {mine[0].hidden})")
    ax.axvline(T.COUNTING_N, color="gray", linestyle="--", linewidth=1, label="longest trained")
    ax.set_xlabel("n (string a^n b^n)")
    ax.set_ylabel("fraction of seeds recognizing it")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- markdown ----

def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(report, plots):
    config, arch = report["config"], report["architecture"]
    out = [f"# LSTM or GRU? Measured by `persistrnn compare`\n",
           f"Command: `{config['command']}`  \n"
           f"Device: {config['device_name']}; torch {config['torch']}; persistrnn {config['persistrnn']}; "
           f"wall time {report['wall_seconds']:.0f} s.  \n"
           f"Hidden sizes: LSTM {config['hidden']}, GRU {config['gru_hidden_note']}; seeds {config['seeds']}; "
           "steps per run " + ", ".join(f"{t} {n}" for t, n in config["steps"].items())
           + (f" (each task's steps scaled by {config['steps_scale']:.2f} to fit the {config['budget_minutes']:g}-minute "
              "budget, from a timing of a few steps per task and cell)" if config.get("steps_scale", 1) < 1 else "")
           + f"; Adam, learning rate {config['learning_rate']}, batch {config['batch']}, "
           f"gradient norm clipped to {config['clip']}, torch's default initialization for both cells.\n",
           "## Verdict\n", "| claim | measured here | held here |", "|---|---|---|"]
    for line in report["verdict"]:
        held = {True: "yes", False: "no", None: "not measured"}[line["held"]]
        out.append(f"| {line['claim']} | {line['measured']} | {held} |")
    out += ["", "Published measurements for comparison: Chung et al. 2014 (comparable on music and speech), "
            "Jozefowicz et al. 2015 (GRU at least as good except language modelling; a forget-gate bias of 1 "
            "closes the gap), Weiss et al. 2018 (the LSTM counts, the GRU does not), Bai et al. 2018 (adding "
            "problem at T = 600: GRU MSE 5.3e-5, LSTM 0.164). This run's sizes and budgets are small; its "
            "figures hold for them.\n",
            "## 1. Architecture and parameters\n", "torch.nn's equations:\n", "```"]
    for cell in ("lstm", "gru"):
        out += [f"{cell.upper()}:"] + [f"  {e}" for e in EQUATIONS[cell]]
    out += ["```\n", "| cell | input size | hidden | parameters (formula) | parameters (module) |", "|---|---|---|---|---|"]
    for row in arch["parameters"]:
        out.append(f"| {row['cell'].upper()} | {row['inputs']} | {row['hidden']} | {row['formula']} | {row['module']} |")
    out.append("\nFormulas: LSTM 4H(I+H) + 8H, GRU 3H(I+H) + 6H (both biases). GRU hidden size with the "
               "LSTM's parameter count, from 3h^2 + (3I + 6)h = P: " +
               ", ".join(f"{t}: {h}" for t, h in arch["matched_gru_hidden"].items()) + ".\n")
    out += ["## 2. Speed and memory\n", config["speed_note"] + "\n",
            "| layer | cell | H | T x B | forward us/step | training us/step | saved for backward | peak (GPU) | path |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in report["speed"]:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.2f} MiB"
        out.append(f"| {r['kind']} | {r['cell'].upper()} | {r['hidden']} | {r['seq']} x {r['batch']} | "
                   f"{r['forward_us_per_step']:.1f} | {r['train_us_per_step']:.1f} | "
                   f"{r['saved_bytes'] / 2**20:.2f} MiB | {peak} | {r['path_forward']} / {r['path_train']} |")
    out += ["", "## 3. Learning ability\n"]
    for name, entry in report["learning"].items():
        task = T.TASKS[name]
        out += [f"### {name}\n",
                f"{DESCRIPTIONS[name]} Sequence parameter {entry['seq']}. Metric: {task.metric}; baseline "
                f"{entry['baseline']:.4g}; beating it means {task.margin}; threshold for steps and time: "
                f"{entry['threshold']:.4g}.\n",
                "| cell | H | final (median [IQR]) | seeds beating the baseline | reached threshold | "
                "steps to threshold | seconds to threshold | stopped by budget |", "|---|---|---|---|---|---|---|---|"]
        for cell, row in entry["cells"].items():
            out.append(f"| {cell.upper()} | {row['hidden']} | {_fmt(row['final_median'])} "
                       f"[{_fmt(row['final_q25'])}, {_fmt(row['final_q75'])}] | {row['beat_baseline']:.0%} | "
                       f"{row['reached_threshold']}/{row['seeds']} | {_fmt(row['steps_to_threshold'])} | "
                       f"{_fmt(row['seconds_to_threshold'])} | {row['stopped_by_budget']} |")
        if name == "counting":
            out.append("\nLongest n with every shorter string recognized (median): " + ", ".join(
                f"{c.upper()} {row['counted_up_to_median']:g}" for c, row in entry["cells"].items()))
        if name == "digits":
            out.append("\nTrain accuracy (median): " + ", ".join(
                f"{c.upper()} {row['train_accuracy_median']:.3f} (gap {row['overfit_gap_median']:.3f})"
                for c, row in entry["cells"].items()))
        out.append("")
        for plot in plots.get(name, []):
            out.append(f"![{name}]({plot})")
        out.append("")
    return "\n".join(out)


DESCRIPTIONS = {
    "adding": "Two marked values among T uniform ones; the answer is their sum (always answering 1 has MSE 1/6).",
    "copy": "Recall 10 symbols (of 8) after a delay of T blanks (blanks then a uniform guess: 10 ln 8 / (T + 20)).",
    "counting": (f"a^n b^n as next-symbol prediction on the determined steps, trained on n <= {T.COUNTING_N}, "
                 f"tested on every n up to {3 * T.COUNTING_N}."),
    "digits": (f"scikit-learn's 8x8 digits as 64 steps of one pixel, {T.DIGITS_TRAIN} training and "
               f"597 test images (chance: 0.1)."),
}


def runs_json(runs):
    return [dataclasses.asdict(r) for r in runs]
