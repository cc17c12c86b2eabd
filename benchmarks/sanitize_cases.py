"""A small workload that launches every persistrnn kernel in the split tier, for compute-sanitizer.

    python benchmarks/sanitize_cases.py [--backend triton|interpret] [--case NAME ...] [--jobs N] [--list]

Each case is a layer of hidden size 64 with the config pinned to block_h = 16 (SPLIT = 4 programs per
batch tile), T = 6 steps and 3 batch rows: a forward under no_grad (the inference kernel), then a
training step (the saving forward and the backward kernel). The cases cover LSTM and GRU,
bidirectional, proj_size, and packed input with uneven lengths. A case fails if a kernel did not run
(the layer fell back to torch.nn), an output or gradient is not finite, or a barrier timed out.

Run under `compute-sanitizer --tool memcheck`, with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every
tensor is its own allocation and a read past one is reported. --jobs N runs each case in its own
process, N at a time: that compiles the kernels in parallel into Triton's cache before a sanitizer
run. Prints one line per case and exits non-zero if any failed.
"""
import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.nn.utils.rnn import pack_padded_sequence

HIDDEN, BLOCK_H, SEQ, BATCH, INPUT = 64, 16, 6, 3, 32
CASES = {  # name: (cell, layer keyword arguments, lengths of the packed input or None)
    "lstm": ("lstm", {}, None),
    "gru": ("gru", {}, None),
    "lstm_bidirectional": ("lstm", dict(bidirectional=True), None),
    "gru_bidirectional": ("gru", dict(bidirectional=True), None),
    "lstm_proj": ("lstm", dict(proj_size=32), None),
    "lstm_lengths": ("lstm", dict(bidirectional=True), [6, 4, 1]),
    "gru_lengths": ("gru", dict(bidirectional=True), [6, 4, 1]),
}


def run_case(name, backend):
    import persistrnn
    cell, kwargs, lengths = CASES[name]
    device = "cuda" if backend == "triton" else "cpu"
    dtype = torch.bfloat16
    layer = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(INPUT, HIDDEN, device=device, dtype=dtype,
                                                                    **kwargs)
    x = torch.randn(SEQ, BATCH, INPUT, device=device, dtype=dtype, requires_grad=True)
    paths = []

    def call():
        inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
        out, hidden = layer(inp)
        paths.append(layer.last_dispatch.path)
        out = out.data if lengths is not None else out
        return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]

    with persistrnn.backend(backend), persistrnn.pin_config(block_h=BLOCK_H):
        with torch.no_grad():
            outputs = call()  # inference forward
        trained = call()  # saving forward, then the backward kernel
        sum(t.float().sum() for t in trained).backward()
        persistrnn.raise_if_failed()
    tensors = outputs + trained + [x.grad] + [p.grad for p in layer.parameters()]
    if device == "cuda":
        torch.cuda.synchronize()
    if any(p != backend for p in paths):
        return f"kernels did not run (paths {paths}, {layer.last_dispatch.reason})"
    if not all(torch.isfinite(t).all() for t in tensors):
        return "an output or gradient is not finite"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["triton", "interpret"], default="triton")
    p.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--jobs", type=int, default=0, help="run each case in its own process, this many at a time")
    p.add_argument("--list", action="store_true", help="print the case names")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(args.case))
        return 0
    if args.jobs:
        def child(name):
            return subprocess.run([sys.executable, os.path.abspath(__file__), "--backend", args.backend, "--case",
                                   name], capture_output=True, text=True)

        failed = 0
        with ThreadPoolExecutor(args.jobs) as pool:
            for proc in pool.map(child, args.case):
                print(proc.stdout + proc.stderr, end="", flush=True)
                failed += proc.returncode != 0
        return 1 if failed else 0
    failed = 0
    for name in args.case:
        try:
            problem = run_case(name, args.backend)
        except Exception as exc:  # noqa: BLE001 (reported per case; the others still run)
            problem = f"{type(exc).__name__}: {exc}"
        failed += problem is not None
        print(f"{name}: {problem or 'ok'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
