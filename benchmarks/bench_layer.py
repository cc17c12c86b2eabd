"""Layer benchmark: persistrnn's kernels against torch.nn (cuDNN), side by side in one run.

    persistrnn bench [--quick] [--mode forward train] [--cell lstm gru] [--batch 1 8 16 64]
                     [--hidden 256 512 768 1024] [--seq 1024] [--dtype float16 bfloat16 float32]
                     [--no-stacked] [--out DIR]

Mode "forward": one layer forward (inference, no grad). Mode "train": one training step of the
layer, forward and backward (every weight gradient and the input gradient, from a fixed random
output gradient). Each case times persistrnn and torch.nn on the same weights and inputs,
alternating call by call, with CUDA events around each call after warm-up, and records every
raw time, the peak memory of a call of each, the largest difference of their outputs (and input
gradients), the path persistrnn took and the cuDNN algorithm torch picks. The grid is the one of
the options, plus the FlashRNN shape (B = 16, T = 1024, H = 768, always) and a 2-layer
bidirectional case (B = 16, H = 512; --no-stacked leaves it out).

The results go to DIR/results.json (default benchmarks/results/<device>/), which
benchmarks/report.py renders into report.md, PNG plots and one pyperf suite per mode
(`persistrnn report` re-renders them, or compares two runs). Without a GPU it says so and exits 0.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

from ..autotune.cache import device_slug
from . import report

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
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
    p.add_argument("--out", default=None, help="report folder (default benchmarks/results/<device>)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the headline")
    args = p.parse_args(argv)
    for name, value in GRID.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name, value) if args.quick else value)
    return args


def cases(args):
    """The grid's cases, then the FlashRNN shape and the stacked case where the grid lacks them."""
    out = []

    def add(**case):
        case = dict(dict(layers=1, bidirectional=False, seq=args.seq), **case)
        case["input_size"] = args.input_size or case["hidden"]
        if case not in out:
            out.append(case)

    for mode in args.mode:
        for cell in args.cell:
            for dtype in args.dtype:
                for hidden in args.hidden:
                    for batch in args.batch:
                        add(mode=mode, cell=cell, dtype=dtype, hidden=hidden, batch=batch)
                add(mode=mode, cell=cell, dtype=dtype, **FLASHRNN_SHAPE)
                if args.stacked:
                    add(mode=mode, cell=cell, dtype=dtype, **STACKED_SHAPE)
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


def bench_case(case, warmup, repeat):
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

    backends = {"persistrnn": "triton", "torch.nn": "torch"}
    times = {impl: [] for impl in backends}
    for i in range(warmup + repeat):
        for impl, backend in backends.items():  # alternate, so drift hits both alike
            with persistrnn.backend(backend):
                ms = _time_ms(step)
            if i >= warmup:
                times[impl].append(ms)
    peak, outputs = {}, {}
    for impl, backend in backends.items():
        with persistrnn.backend(backend):
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
    return dict(case, path=dispatch.path, reason=dispatch.reason,
                config=None if dispatch.config is None else describe(dispatch.config, dispatch.waves),
                cudnn_algo=algo[True] if mode == "forward" else f"forward {algo[True]}, backward {algo[False]}",
                times_ms=times, peak_bytes=peak, max_abs_error=error)


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
        speedups = [report.summarize(c)["speedup"] for c in results["cases"] if c["mode"] == mode]
        if speedups:
            lines.append(f"{title}: geometric mean speedup over torch.nn {report.geomean(speedups):.2f}x "
                         f"({len(speedups)} cases)")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the benchmark needs one; nothing measured")
        return 0
    try:
        import matplotlib  # noqa: F401
        import pyperf  # noqa: F401
    except ImportError as exc:
        print(f"persistrnn bench: {exc.name} is missing: pip install 'persistrnn[bench]'", file=sys.stderr)
        return 2
    from tqdm import tqdm
    command = " ".join(["persistrnn bench", *argv])
    out = args.out or os.path.join(report.RESULTS_DIR, device_slug({"name": torch.cuda.get_device_name()}))
    results = dict(schema=report.SCHEMA, fixture=False, environment=environment(command),
                   method=dict(METHOD, warmup=args.warmup, repeat=args.repeat), floor=report.FLOOR, cases=[])
    os.makedirs(out, exist_ok=True)
    for case in tqdm(cases(args), desc="bench", unit="case", file=sys.stderr):
        results["cases"].append(bench_case(case, args.warmup, args.repeat))
        with open(os.path.join(out, "results.json"), "w") as f:  # a run cut short keeps what it measured
            json.dump(results, f, indent=1)
    report.render(results, out)
    print(json.dumps(results) if args.json else f"{headline(results)}\nreport: {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
