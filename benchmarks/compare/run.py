"""`persistrnn compare`: the options, the runs, and the report's files.

    persistrnn compare [--hidden 64] [--match params|hidden] [--tasks adding copy counting digits]
                       [--seq T] [--seeds 5] [--steps N] [--budget-minutes M] [--quick] [--out DIR] [--json]

Writes DIR/report.md, DIR/report.json and DIR/*.png, and prints a summary (the JSON with
--json). The files are written to a temporary folder and moved into DIR at the end: a run that
fails or is stopped leaves DIR as it was.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time

import torch

from . import cells, report, speed, tasks, train

DEFAULTS = dict(hidden=64, seeds=5, steps=None, budget_minutes=8.0)  # steps None: each task's default_steps
QUICK = dict(hidden=32, seeds=3, steps=60, budget_minutes=1.0, seq={"adding": 20, "copy": 10})


def _at_least_one(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def add_arguments(p):
    p.add_argument("--hidden", type=_at_least_one, default=None,
                   help=f"the LSTM's hidden size (default {DEFAULTS['hidden']}, --quick {QUICK['hidden']})")
    p.add_argument("--match", choices=["params", "hidden"], default="params",
                   help="params: the GRU gets the hidden size with the LSTM's parameter count; hidden: the same size")
    p.add_argument("--tasks", nargs="+", choices=list(tasks.TASKS), default=list(tasks.TASKS), metavar="TASK",
                   help=f"tasks to train on, from: {', '.join(tasks.TASKS)} (default all)")
    p.add_argument("--seq", type=_at_least_one, default=None,
                   help="sequence length of the tasks that have one: adding's T and copy's delay (default "
                        + ", ".join(f"{t.name} {t.default_seq}" for t in tasks.TASKS.values() if t.min_seq) + ")")
    p.add_argument("--seeds", type=_at_least_one, default=None,
                   help=f"seeds per task and cell (default {DEFAULTS['seeds']}, --quick {QUICK['seeds']})")
    p.add_argument("--steps", type=_at_least_one, default=None,
                   help="training steps per run, for every task (default per task: "
                        + ", ".join(f"{t.name} {t.default_steps}" for t in tasks.TASKS.values())
                        + f"; --quick {QUICK['steps']})")
    p.add_argument("--budget-minutes", type=_positive_float, default=None,
                   help="training time for all runs together; a run stops early when its share is spent "
                        f"(default {DEFAULTS['budget_minutes']}, --quick {QUICK['budget_minutes']})")
    p.add_argument("--quick", action="store_true", help="3 seeds, fewer steps, smaller sizes: about 2 minutes on CPU")
    p.add_argument("--out", default="compare-report", help="folder of the report (default ./compare-report)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--json", action="store_true", help="print the report's JSON instead of the summary")


def resolve(args, parser):
    """Fill the defaults (--quick's or the standard ones) and check the options against the tasks;
    errors go through parser.error before anything runs or is written."""
    preset = QUICK if args.quick else DEFAULTS
    for name in ("hidden", "seeds", "steps", "budget_minutes"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.tasks = list(dict.fromkeys(args.tasks))
    args.seq_of = {}
    args.steps_of = {name: args.steps or tasks.TASKS[name].default_steps for name in args.tasks}
    for name in args.tasks:
        task = tasks.TASKS[name]
        if not task.min_seq:  # a fixed length (counting's training lengths, digits' 64 pixels)
            seq = task.default_seq
        elif args.seq is not None:
            seq = args.seq
        else:
            seq = QUICK["seq"][name] if args.quick else task.default_seq
        if task.min_seq and seq < task.min_seq:
            parser.error(f"--seq {seq} is below the {name} task's minimum of {task.min_seq}")
        args.seq_of[name] = seq
    if "digits" in args.tasks:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            parser.error("the digits task needs scikit-learn: pip install 'persistrnn[compare]' (or leave digits "
                         "out of --tasks)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("persistrnn compare draws its plots with matplotlib: pip install 'persistrnn[compare]'")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        args.device = torch.device(device)
    except RuntimeError as exc:
        parser.error(f"--device {device!r}: {exc}")
    return args


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


CALIBRATION_STEPS = 4
FIT = 0.9  # the projected training time is scaled to this share of the budget: a margin for the timing's error


def _calibrate(args, gru_hidden, device):
    """Training seconds per step of each (task, cell) at this run's sizes, from a few steps of a
    throwaway model after an untimed one."""
    per_step = {}
    for name in args.tasks:
        for cell in ("lstm", "gru"):
            hidden = args.hidden if cell == "lstm" else gru_hidden[name]
            per_step[(name, cell)] = train.seconds_per_step(tasks.TASKS[name], cell, hidden, args.seq_of[name],
                                                            CALIBRATION_STEPS, device)
    return per_step


def run(args, argv):
    """Everything but the argument parsing: returns the report (a dict) and writes the files."""
    import persistrnn
    from tqdm import tqdm

    started = time.perf_counter()
    device = args.device
    first = tasks.TASKS[args.tasks[0]]
    matched = {name: cells.matched_gru_hidden(tasks.TASKS[name].inputs, args.hidden) for name in args.tasks}
    gru_hidden = matched if args.match == "params" else {name: args.hidden for name in args.tasks}
    on_gpu = device.type == "cuda"
    config = dict(command="persistrnn " + " ".join(shlex.quote(a) for a in argv), hidden=args.hidden,
                  match=args.match, tasks=args.tasks, seq=args.seq_of, seeds=args.seeds, steps=args.steps_of,
                  budget_minutes=args.budget_minutes, quick=args.quick, device=str(device),
                  device_name=_device_name(device), torch=torch.__version__,
                  persistrnn=getattr(persistrnn, "__version__", "0.1.0"),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  learning_rate=train.LEARNING_RATE, batch=train.BATCH, clip=train.CLIP,
                  gru_hidden=gru_hidden,
                  gru_hidden_note=("the LSTM's parameter count per task: " if args.match == "params" else "the same: ")
                  + ", ".join(f"{t} {h}" for t, h in gru_hidden.items()),
                  speed_note=("GPU: persistrnn's layers (the kernels) and torch.nn (cuDNN) side by side; medians of "
                              "torch.utils.benchmark." if on_gpu else
                              "CPU figures: persistrnn's layers run torch's native RNN on CPU (the kernels need a "
                              "GPU; the interpreter's times would mean nothing); there torch fuses the LSTM with "
                              "oneDNN and runs the GRU cell by cell, so torch.nn with oneDNN off (the same generic "
                              "path for both cells) is measured too; medians of torch.utils.benchmark."))

    parameters = []
    for name in args.tasks:
        inputs = tasks.TASKS[name].inputs
        for cell, hidden in (("lstm", args.hidden), ("gru", args.hidden), ("gru", gru_hidden[name])):
            row = dict(cell=cell, inputs=inputs, hidden=hidden, formula=cells.parameter_formula(cell, inputs, hidden),
                       module=cells.module_parameters(cell, inputs, hidden))
            if row not in parameters:
                parameters.append(row)
    architecture = dict(
        equations=cells.EQUATIONS, parameters=parameters, matched_gru_hidden=matched,
        gates={c: cells.gates_of((torch.nn.LSTM if c == "lstm" else torch.nn.GRU)(1, 1)) for c in ("lstm", "gru")},
        same_hidden_parameters={c: cells.parameter_formula(c, first.inputs, args.hidden) for c in ("lstm", "gru")})

    kinds = speed.KINDS_GPU if on_gpu else speed.KINDS_CPU
    sizes = [("lstm", args.hidden), ("gru", args.hidden)] + \
        ([("gru", gru_hidden[first.name])] if gru_hidden[first.name] != args.hidden else [])
    speed_rows = []
    for kind in kinds:
        for cell, hidden in sizes:
            speed_rows.append(speed.measure(kind, cell, first.inputs, hidden, args.seq_of[first.name], train.BATCH,
                                            device))

    per_step = _calibrate(args, gru_hidden, device)
    projected = {(name, cell): args.steps_of[name] * per_step[(name, cell)] for name, cell in per_step}
    budget = args.budget_minutes * 60
    total = args.seeds * sum(projected.values())
    scale = min(1.0, FIT * budget / total) if total > 0 else 1.0
    if scale < 1.0:  # fewer steps for every run, the same for both cells of a task
        args.steps_of = {name: max(1, int(steps * scale)) for name, steps in args.steps_of.items()}
        projected = {(name, cell): args.steps_of[name] * per_step[(name, cell)] for name, cell in per_step}
    config.update(steps=args.steps_of, steps_scale=scale,
                  seconds_per_step_calibrated={f"{n} {c}": v for (n, c), v in per_step.items()})

    jobs = [(name, cell, seed) for name in args.tasks for seed in range(args.seeds) for cell in ("lstm", "gru")]
    spent = 0.0
    runs = []
    left = args.seeds * sum(projected.values())
    with tqdm(jobs, desc="compare", unit="run", file=sys.stderr) as bar:
        for name, cell, seed in bar:
            bar.set_postfix_str(f"{name} {cell} seed {seed}")
            # a run may use what the budget holds beyond the projected times of the runs after it: only
            # when the machine turns out slower than the timing said do the last runs stop early
            left -= projected[(name, cell)]
            share = max(budget - spent - left, 0.0)
            hidden = args.hidden if cell == "lstm" else gru_hidden[name]
            result = train.train_run(tasks.TASKS[name], cell, hidden, args.seq_of[name], seed, args.steps_of[name],
                                     share, device)
            spent += result.curve[-1][1]
            runs.append(result)

    learning = {}
    for name in args.tasks:
        task = tasks.TASKS[name]
        mine = [r for r in runs if r.task == name]
        seq = args.seq_of[name]
        learning[name] = dict(seq=seq, metric=task.metric, baseline=task.baseline(seq), threshold=task.threshold(seq),
                              margin=task.margin, cells=report.summarize(task, mine))
    result = dict(config=config, architecture=architecture, speed=speed_rows, learning=learning)
    result["verdict"] = report.verdict(result)
    result["runs"] = report.runs_json(runs)

    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".compare-", dir=parent)
    try:
        plots = {}
        for name in args.tasks:
            mine = [r for r in runs if r.task == name]
            plots[name] = [f"curves_{name}.png"]
            report.plot_curves(tasks.TASKS[name], mine, os.path.join(staging, plots[name][0]))
            if name == "counting":
                plots[name].append("counting_generalization.png")
                report.plot_counting(mine, os.path.join(staging, plots[name][1]))
        result["wall_seconds"] = time.perf_counter() - started
        result["files"] = ["report.md", "report.json"] + [p for ps in plots.values() for p in ps]
        with open(os.path.join(staging, "report.md"), "w") as f:
            f.write(report.markdown(result, plots))
        with open(os.path.join(staging, "report.json"), "w") as f:
            json.dump(result, f, indent=1)
        os.makedirs(out, exist_ok=True)
        for name in result["files"]:
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result["out"] = out
    return result


def summary(result):
    lines = [f"persistrnn compare: {result['config']['device_name']}, {result['wall_seconds']:.0f} s; "
             f"report in {result['out']}"]
    for line in result["verdict"]:
        held = {True: "held", False: "did not hold", None: "not measured"}[line["held"]]
        lines.append(f"- {line['claim']} {held}: {line['measured']}")
    return "\n".join(lines)


def main(args, parser, argv):
    resolve(args, parser)
    result = run(args, argv)
    print(json.dumps(result) if args.json else summary(result))
    return 0
