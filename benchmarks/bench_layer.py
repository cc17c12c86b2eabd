"""Layer benchmark: persistrnn's kernels against torch.nn (cuDNN), side by side in one run.

    persistrnn bench [--mode forward train] [--batch 1 8 64] [--hidden 128 256 512] [--seq 512]
                     [--dtype float16 bfloat16]
    python -m persistrnn.benchmarks.bench_layer ...

Mode "forward": one layer forward (inference, no grad). Mode "train": one training step of the
layer, forward and backward (every weight gradient, from a fixed random output gradient). Each
case times ours and torch.nn on the same weights and input, alternating, with CUDA events
around each call after warm-up; the table gives medians and the ratio torch/ours (> 1: we are
faster). A report per mode (markdown, JSON, plus a pyperf suite when pyperf is installed) goes to
benchmarks/results/<device>/. Without a GPU it says so and exits 0.
"""
import argparse
import json
import os
import platform
import statistics
import sys

import torch

from ..autotune.cache import device_slug

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="persistrnn bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    p.add_argument("--cell", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--hidden", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--input-size", type=int, default=0, help="default: the hidden size")
    p.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None, help="report folder (default benchmarks/results/<device>)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def _time_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bench_case(mode, cell, batch, hidden, seq, input_size, dtype, warmup, repeat):
    import persistrnn
    cls = persistrnn.LSTM if cell == "lstm" else persistrnn.GRU
    layer = cls(input_size or hidden, hidden, device="cuda", dtype=dtype).train(mode == "train")
    # in a training step the input gradient is computed too (cuDNN always computes it)
    x = torch.randn(seq, batch, input_size or hidden, device="cuda", dtype=dtype, requires_grad=mode == "train")
    grad_y = torch.randn(seq, batch, hidden, device="cuda", dtype=dtype)

    def step():
        if mode == "forward":
            with torch.inference_mode():
                layer(x)
        else:
            layer.zero_grad(set_to_none=True)
            layer(x)[0].backward(grad_y)

    runs = {"persistrnn": "triton", "torch.nn": "torch"}
    times = {name: [] for name in runs}
    for i in range(warmup + repeat):
        for name, backend in runs.items():  # alternate, so drift hits both alike
            with persistrnn.backend(backend):
                ms = _time_ms(step)
            if i >= warmup:
                times[name].append(ms)
    with persistrnn.backend("triton"):
        step()
    dispatch = layer.last_dispatch
    ours, ref = statistics.median(times["persistrnn"]), statistics.median(times["torch.nn"])
    return dict(mode=mode, cell=cell, batch=batch, hidden=hidden, seq=seq, dtype=str(dtype).replace("torch.", ""),
                path=dispatch.path, reason=dispatch.reason, ms_persistrnn=ours, ms_torch=ref,
                speedup=ref / ours, times=times)


def markdown(rows, device, command, mode):
    what = "Forward (inference)" if mode == "forward" else "Training step (forward + backward)"
    lines = [f"# {what} benchmark on {device}", "", f"Command: `{command}`", "",
             f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
             f"Python {platform.python_version()}. Medians of CUDA-event times; speedup = torch.nn / persistrnn.",
             "", "| cell | dtype | B | H | T | persistrnn ms | torch.nn ms | speedup | path |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        path = r["path"] if r["path"] != "torch" else f"torch fallback: {r['reason']}"
        lines.append(f"| {r['cell']} | {r['dtype']} | {r['batch']} | {r['hidden']} | {r['seq']} | "
                     f"{r['ms_persistrnn']:.3f} | {r['ms_torch']:.3f} | {r['speedup']:.2f}x | {path} |")
    return "\n".join(lines) + "\n"


def _pyperf_suite(rows, path):
    try:
        import pyperf
    except ImportError:
        return False
    benchmarks = []
    for r in rows:
        for impl, values in r["times"].items():
            name = f"{r['mode']}-{r['cell']}-{r['dtype']}-B{r['batch']}-H{r['hidden']}-T{r['seq']}-{impl}"
            run = pyperf.Run([v / 1e3 for v in values], metadata={"name": name, "unit": "second"},
                             collect_metadata=False)
            benchmarks.append(pyperf.Benchmark([run]))
    pyperf.BenchmarkSuite(benchmarks).dump(path, replace=True)
    return True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the benchmark needs one; nothing measured")
        return 0
    device = torch.cuda.get_device_name()
    command = " ".join(["persistrnn bench", *argv])
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   device_slug({"name": device}))
    os.makedirs(out, exist_ok=True)
    all_rows = []
    for mode in args.mode:
        rows = [bench_case(mode, cell, b, h, args.seq, args.input_size, DTYPES[dt], args.warmup, args.repeat)
                for cell in args.cell for dt in args.dtype for h in args.hidden for b in args.batch]
        report = markdown(rows, device, command, mode)
        with open(os.path.join(out, f"{mode}.md"), "w") as f:
            f.write(report)
        with open(os.path.join(out, f"{mode}.json"), "w") as f:
            json.dump(dict(device=device, command=command, rows=rows), f, indent=1)
        _pyperf_suite(rows, os.path.join(out, f"{mode}.pyperf.json"))
        if not args.json:
            print(report)
        all_rows += rows
    if args.json:
        print(json.dumps(all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
