"""Layer benchmark: persistrnn's kernels against torch.nn (cuDNN), side by side in one run.

    persistrnn bench [--quick] [--mode forward train] [--cell lstm gru] [--batch 1 8 16 64]
                     [--hidden 256 512 768 1024] [--seq 1024] [--dtype float16 bfloat16 float32]
                     [--no-stacked] [--budget SECONDS] [--tuned] [--out DIR]

Mode "forward": one layer forward (inference, no grad). Mode "train": one training step of the
layer, forward and backward (every weight gradient and the input gradient, from a fixed random
output gradient). Each case times persistrnn and torch.nn on the same weights and inputs,
alternating call by call, with CUDA events around each call after warm-up, and records every
raw time, the peak memory of a call of each, the largest difference of their outputs (and input
gradients), the path persistrnn took and the cuDNN algorithm torch picks. The grid is the one of
the options, plus the FlashRNN shape (B = 16, T = 1024, H = 768, always) and a 2-layer
bidirectional case (B = 16, H = 512; --no-stacked leaves it out). No shape is measured twice.

Order: the FlashRNN shape first (fp16, then bf16), then the grid per dtype, hidden size and batch;
each shape runs forward then train, lstm and gru alternating, so that a run cut short by
--budget has measured every mode and cell. With --budget, no case starts once the seconds since
the start are spent; the report says how many were skipped.

Configs: by default persistrnn runs each case under the static tables' config (autotune/configs/static,
pinned: the user's and the shipped tuned tables are not consulted), and where the static tables
hold none for the layer, torch.nn runs on both sides (the report shows no speedup there). With
--tuned the planner decides as in normal use (tuned tables first). Each case records the config,
path and reason of the call.

The results go to DIR/results.json (default benchmarks/results/<device>/), rewritten after every
case, which benchmarks/report.py renders into report.md, PNG plots and, where pyperf is installed,
one pyperf suite per mode (`persistrnn report` re-renders them, or compares two runs). Without a
GPU it says so and exits 0. A case that raises is recorded (the report lists it), the others
still run, and the exit status is 1.
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from ..autotune.cache import device_slug
from ..configs import MEASURED_DTYPES as DTYPES
from . import report

GRID = dict(mode=["forward", "train"], cell=["lstm", "gru"], batch=[1, 8, 16, 64], hidden=[256, 512, 768, 1024],
            seq=1024, dtype=["float16", "bfloat16", "float32"], repeat=20)
QUICK = dict(batch=[1, 16], hidden=[256, 768], dtype=["float16"], repeat=10)
FLASHRNN_SHAPE = dict(batch=16, hidden=768, seq=1024)  # FlashRNN's published H100 plot (DESIGN.md)
STACKED_SHAPE = dict(batch=16, hidden=512, layers=2, bidirectional=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = dict(
    timing="CUDA events around each call (torch.cuda.Event elapsed_time), after warm-up calls that also compile.",
    memory="Memory: torch.cuda.max_memory_allocated during one call (forward) or one training step, minus what "
           "was allocated before it, after torch.cuda.reset_peak_memory_stats; each implementation on its own.",
    error="Max abs error: the largest |persistrnn - torch.nn| over the outputs (forward), and over the outputs and "
          "the input gradient (train), same weights and inputs, compared in float32.",
    cudnn_algo="cuDNN algorithm: what PyTorch's get_algo (aten/src/ATen/native/cudnn/RNN.cpp) picks for the shape "
               "and device, read off its rules: persistent kernels (PERSIST_STATIC, or PERSIST_STATIC_SMALL_H for "
               "small H) or the standard one; a training step names the forward's and the backward's.")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="persistrnn bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a short subset: B {QUICK['batch']}, H {QUICK['hidden']}, {QUICK['dtype'][0]}, "
                        f"{QUICK['repeat']} repeats (options given explicitly still win)")
    p.add_argument("--mode", nargs="+", default=None, choices=["forward", "train"])
    p.add_argument("--cell", nargs="+", default=None, choices=["lstm", "gru"])
    p.add_argument("--batch", nargs="+", type=int, default=None, help=f"default {GRID['batch']}")
    p.add_argument("--hidden", nargs="+", type=int, default=None, help=f"default {GRID['hidden']}")
    p.add_argument("--seq", type=int, default=None, help=f"default {GRID['seq']}")
    p.add_argument("--input-size", type=int, default=0, help="default: the hidden size")
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES), help=f"default {GRID['dtype']}")
    p.add_argument("--stacked", action=argparse.BooleanOptionalAction, default=True,
                   help="add the 2-layer bidirectional case (B = 16, H = 512)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=None, help=f"timed calls per implementation (default "
                                                            f"{GRID['repeat']}, --quick {QUICK['repeat']})")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case once SECONDS have passed since the start (cases are ordered so that "
                        "what fits covers every mode and cell); the report is rendered from what was measured")
    p.add_argument("--tuned", action="store_true",
                   help="let the planner decide each config as in normal use (the user's tuned table, the shipped "
                        "ones, then the static tables); default: the static tables' config, pinned")
    p.add_argument("--out", default=None, help="report folder (default benchmarks/results/<device>)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the headline")
    args = p.parse_args(argv)
    for name, value in GRID.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name, value) if args.quick else value)
    return args


CLOCK = time.monotonic  # the budget's clock
FIRST_DTYPES = ("float16", "bfloat16")  # the FlashRNN shape's dtypes: measured first


def cases(args):
    """Every case of a run, in the order measured: the FlashRNN shape in fp16 and bf16 (those of
    --dtype), then per dtype the grid's hidden sizes and batches, the FlashRNN shape in the other
    dtypes and the stacked case. Per shape: every mode (forward first), the cells alternating
    within each. A shape already listed is not added again."""
    out = []
    modes = [m for m in ("forward", "train") if m in args.mode]
    dtypes = [d for d in FIRST_DTYPES if d in args.dtype] + [d for d in args.dtype if d not in FIRST_DTYPES]

    def add(dtype, **shape):
        for mode in modes:
            for cell in args.cell:
                case = dict(dict(layers=1, bidirectional=False, seq=args.seq), mode=mode, cell=cell, dtype=dtype,
                            **shape)
                case["input_size"] = args.input_size or case["hidden"]
                if case not in out:
                    out.append(case)

    for dtype in dtypes:
        if dtype in FIRST_DTYPES:
            add(dtype, **FLASHRNN_SHAPE)
    for dtype in dtypes:
        for hidden in args.hidden:
            for batch in args.batch:
                add(dtype, hidden=hidden, batch=batch)
        add(dtype, **FLASHRNN_SHAPE)
        if args.stacked:
            add(dtype, **STACKED_SHAPE)
    return out


def cudnn_algo(cell, dtype, batch, hidden, seq, input_size, layers, bidirectional, capability, sms, forward,
               cudnn_version):
    """The cuDNN RNN algorithm PyTorch picks (get_algo in aten/src/ATen/native/cudnn/RNN.cpp), for an
    unpacked input without projections."""
    if dtype != "float64" and cudnn_version >= 8201 and capability[0] >= 6 and hidden <= (192 if forward else 128):
        return "PERSIST_STATIC_SMALL_H"
    if dtype != "float16":  # PERSIST_STATIC is picked for CUDNN_DATA_HALF only
        return "STANDARD"
    common = layers == 1 and not bidirectional and hidden <= 1024 and hidden % 128 == 0 and input_size % 128 == 0
    major, minor = capability
    if major == 7:  # Volta; Turing (7.5) excluded
        device = minor != 5 and ((batch % 16 == 0 and batch not in (80, 112)) or batch == 8) and (
            (seq >= 40 and batch <= 128) or (seq >= 20 and batch <= 96) or (seq >= 10 and batch <= 32))
    elif major >= 8 and sms >= 98:  # sm_86 excluded; GRUs never persistent here
        device = minor != 6 and cell == "lstm" and batch % 8 == 0 and batch <= 128
    else:
        device = False
    return "PERSIST_STATIC" if common and device else "STANDARD"


def describe(config, waves=None):
    """A kernel config in a table cell: 'block_b=16 block_h=64 warps=4', plus what differs from the usual."""
    text = f"block_b={config.block_b} block_h={config.block_h} warps={config.num_warps}"
    if config.backward_warps:
        text += f" backward_warps={config.backward_warps}"
    if config.num_stages != 1:
        text += f" stages={config.num_stages}"
    if waves and len(waves) > 1:
        text += f", {len(waves)} launches"
    return text


def _time_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _peak_bytes(fn, free):
    """Peak bytes allocated while fn runs, above what was allocated before it; free() first drops
    what a previous call left (gradients), which fn would free anyway."""
    free()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def static_config(case, device):
    """The static tables' kernel config for the case's layer on `device` (configs.kernel_config, the
    pass the case runs: "train" for a training step): (config, None), or (None, why none)."""
    from .. import configs
    target = configs.target_of(device)
    if target is None:
        return None, f"no kernel tables for {torch.cuda.get_device_name(device)}"
    return configs.kernel_config(case["cell"], DTYPES[case["dtype"]], case["hidden"], 0, case["batch"],
                                 2 if case["bidirectional"] else 1, configs.device_sms(device), target,
                                 "train" if case["mode"] == "train" else "forward")


def persistrnn_side(case, device, tuned, backend="triton"):
    """How persistrnn runs a case: (context manager factory, static config or None, where the config
    comes from; None with `tuned`). By default the static tables' config pinned (no tuned table
    consulted), or torch.nn where they hold none; with `tuned` the planner decides as in normal use."""
    import contextlib

    import persistrnn
    if tuned:
        return (lambda: persistrnn.backend(backend)), None, None
    config, why = static_config(case, device)
    if config is None:
        return ((lambda: persistrnn.backend("torch")), None,
                f"torch.nn on both sides: the static tables hold no kernel config ({why})")
    fields = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}

    def pinned():
        stack = contextlib.ExitStack()
        stack.enter_context(persistrnn.backend(backend))
        stack.enter_context(persistrnn.pin_config(**fields))
        return stack
    return pinned, config, "the static tables' config, pinned (no tuned table consulted)"


def bench_case(case, warmup, repeat, tuned=False):
    import persistrnn
    mode, hidden = case["mode"], case["hidden"]
    cls = persistrnn.LSTM if case["cell"] == "lstm" else persistrnn.GRU
    dtype = DTYPES[case["dtype"]]
    layer = cls(case["input_size"], hidden, num_layers=case["layers"], bidirectional=case["bidirectional"],
                device="cuda", dtype=dtype).train(mode == "train")
    # in a training step the input gradient is computed too (cuDNN always computes it)
    x = torch.randn(case["seq"], case["batch"], case["input_size"], device="cuda", dtype=dtype,
                    requires_grad=mode == "train")
    directions = 2 if case["bidirectional"] else 1
    grad_y = torch.randn(case["seq"], case["batch"], directions * hidden, device="cuda", dtype=dtype)

    def free():
        layer.zero_grad(set_to_none=True)
        x.grad = None

    def step():
        if mode == "forward":
            with torch.inference_mode():
                return layer(x)[0]
        free()
        y = layer(x)[0]
        y.backward(grad_y)
        return y

    ours, _, source = persistrnn_side(case, x.device, tuned)
    sides = {"persistrnn": ours, "torch.nn": lambda: persistrnn.backend("torch")}
    times = {impl: [] for impl in sides}
    for i in range(warmup + repeat):
        for impl, side in sides.items():  # alternate, so drift hits both alike
            with side():
                ms = _time_ms(step)
            if i >= warmup:
                times[impl].append(ms)
    peak, outputs = {}, {}
    for impl, side in sides.items():
        with side():
            peak[impl] = _peak_bytes(step, free)
            y = step()
            # copies: a float32 .float() is the tensor itself, and holding it would skew the next peak
            outputs[impl] = [t.detach().float().clone() for t in [y] + ([x.grad] if mode == "train" else [])]
            if impl == "persistrnn":
                dispatch = layer.last_dispatch
                persistrnn.raise_if_failed()  # a barrier timeout belongs to this case, not to a later one
    free()
    # torch.max propagates NaN (Python's max would drop one not listed first)
    error = torch.stack([(a - b).abs().max() for a, b in zip(outputs["persistrnn"], outputs["torch.nn"])]).max().item()
    props = torch.cuda.get_device_properties(0)
    algo = {fwd: cudnn_algo(case["cell"], case["dtype"], case["batch"], hidden, case["seq"], case["input_size"],
                            case["layers"], case["bidirectional"], (props.major, props.minor),
                            props.multi_processor_count, fwd, torch.backends.cudnn.version() or 0)
            for fwd in (True, False)}
    return dict(case, **dispatch_record(dispatch, source),
                cudnn_algo=algo[True] if mode == "forward" else f"forward {algo[True]}, backward {algo[False]}",
                times_ms=times, peak_bytes=peak, max_abs_error=error)


def dispatch_record(dispatch, source):
    """What results.json says of persistrnn's side of a case: path, reason, config (None on the torch
    path) and config_source, where the config came from."""
    reason = dispatch.reason
    if source is None:  # --tuned: the planner's own account
        where = reason.split("config from ", 1)[1].split(";")[0] if "config from " in reason else None
        source = f"the planner (--tuned): {where or 'no kernel config, torch.nn'}"
    elif dispatch.path == "torch" and source.startswith("torch.nn on both sides"):
        reason = source  # the bench chose torch (backend "torch"): say why
    return dict(path=dispatch.path, reason=reason, config_source=source,
                config=None if dispatch.config is None else describe(dispatch.config, dispatch.waves))


def _nvidia_smi(fields):
    """nvidia-smi's answer for the GPU torch uses (by UUID: nvidia-smi's numbering ignores
    CUDA_VISIBLE_DEVICES), or None."""
    uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader",
                              "-i", f"GPU-{uuid}" if uuid is not None else "0"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _git_commit():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def environment(command):
    import triton

    import persistrnn
    props = torch.cuda.get_device_properties(0)
    clocks = _nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem")
    return dict(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                clocks=None if clocks is None else f"SM, max SM, memory (MHz), read before the runs: {clocks}",
                driver=_nvidia_smi("driver_version"), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), torch=torch.__version__, triton=triton.__version__,
                persistrnn=persistrnn.__version__, python=platform.python_version(), git_commit=_git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=command)


def headline(results):
    lines = []
    for mode, title in report.MODES.items():
        speedups = [report.summarize(c)["speedup"] for c in results["cases"]
                    if c["mode"] == mode and report.compared(c)]
        if speedups:
            lines.append(f"{title}: geometric mean speedup over torch.nn {report.geomean(speedups):.2f}x "
                         f"({len(speedups)} cases run by persistrnn's kernels)")
    run = results.get("run") or {}
    if run.get("skipped_for_budget"):
        lines.append(f"{len(run['skipped_for_budget'])} of {run['planned']} cases skipped for the budget "
                     f"({run['budget_s']:g} s)")
    if run.get("failed"):
        lines.append(f"{len(run['failed'])} cases failed (listed in the report)")
    return "\n".join(lines)


def write_json(results, path):
    """results.json replaced whole (a run stopped mid-write leaves the previous one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def run_cases(results, planned, out, measure, budget=None, start=None, progress=None):
    """Measure `planned` cases in order with measure(case) -> the case's record, appending each to
    results["cases"] and rewriting out/results.json after each. With `budget` (seconds since
    `start`), no case starts once it is spent: the rest are listed in results["run"]
    ["skipped_for_budget"]. A case that raises is listed in results["run"]["failed"] and the run
    goes on."""
    clock = CLOCK
    start = clock() if start is None else start
    run = results["run"] = dict(planned=len(planned), budget_s=budget, skipped_for_budget=[], failed=[])
    path = os.path.join(out, "results.json")
    write_json(results, path)
    for i, case in enumerate(planned):
        if budget is not None and clock() - start >= budget:
            run["skipped_for_budget"] = [report.case_name(c) for c in planned[i:]]
            break
        try:
            results["cases"].append(measure(case))
        except Exception as exc:  # noqa: BLE001 - one case's failure is recorded; the others still run
            run["failed"].append(dict(case=report.case_name(case), error=f"{type(exc).__name__}: {exc}"))
        write_json(results, path)  # a run cut short keeps what it measured
        progress and progress()
    run["elapsed_s"] = round(clock() - start, 1)
    write_json(results, path)
    return results


def main(argv=None):
    start = CLOCK()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the benchmark needs one; nothing measured")
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        print(f"persistrnn bench: {exc.name} is missing: pip install 'persistrnn[bench]'", file=sys.stderr)
        return 2
    if not report.have_pyperf():
        print("persistrnn bench: pyperf is not installed: measuring anyway; the report's pyperf suites are skipped",
              file=sys.stderr)
    from tqdm import tqdm
    command = " ".join(["persistrnn bench", *argv])
    out = args.out or os.path.join(report.RESULTS_DIR, device_slug({"name": torch.cuda.get_device_name()}))
    configs = ("the planner's choice per layer, as in normal use (--tuned: the user's tuned table, then the shipped "
               "one, then the static tables)" if args.tuned else
               "the static tables' config (autotune/configs/static) for each layer, pinned, so that no tuned table is "
               "consulted; where they hold none, torch.nn runs on both sides (no speedup shown)")
    results = dict(schema=report.SCHEMA, fixture=False, environment=environment(command),
                   method=dict(METHOD, warmup=args.warmup, repeat=args.repeat, configs=configs, tuned=args.tuned),
                   floor=report.FLOOR, cases=[])
    os.makedirs(out, exist_ok=True)
    planned = cases(args)
    with tqdm(total=len(planned), desc="bench", unit="case", file=sys.stderr) as bar:
        run_cases(results, planned, out, lambda case: bench_case(case, args.warmup, args.repeat, args.tuned),
                  budget=args.budget, start=start, progress=bar.update)
    report.render(results, out)
    print(json.dumps(results) if args.json else f"{headline(results)}\nreport: {os.path.join(out, 'report.md')}")
    return 1 if results["run"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
