"""Long-sequence accuracy: persistrnn and torch.nn in the same dtype, each against torch.nn in float64.

    python benchmarks/long_sequence.py [--backend triton|interpret] [--seq 1024] [--batch 16]
        [--hidden 256 768] [--cell lstm gru] [--dtype float16 bfloat16] [--forget-bias 4]
        [--budget SECONDS] [--out FILE.json]

A long sequence with a strong memory gate is where rounding in the recurrence adds up: the gate that
carries the state (LSTM f, GRU z; both are the second slice of b_ih) gets a total bias of
--forget-bias (b_ih's slice is set to forget_bias - b_hh's). For each cell, dtype and hidden size,
one forward of persistrnn (the kernels), of torch.nn in the same dtype (cuDNN on CUDA) and of
torch.nn in float64, all with the same weights (rounded to the dtype) and input. It prints, per
output (y, h_n, and c_n for the LSTM), the relative error ||out - ref64|| / ||ref64|| of persistrnn
and of torch.nn and their ratio, and writes the same as JSON (after every case; --budget stops
starting new cases once that many seconds are spent). `--backend interpret` runs on CPU (keep the
sizes tiny there). Exits non-zero if a case failed or fell back to torch.nn.
"""
import argparse
import json
import os
import sys
import time

import torch
from torch import nn

from persistrnn.configs import MEASURED_DTYPES as DTYPES


def run_case(cell, dtype, hidden, args, device):
    import persistrnn
    from persistrnn.layers.check import relative_error
    input_size = args.input_size or hidden
    ours = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(input_size, hidden, device=device,
                                                                   dtype=DTYPES[dtype])
    with torch.no_grad():  # the memory gate: LSTM (i, f, g, o), GRU (r, z, n)
        ours.bias_ih_l0[hidden:2 * hidden] = args.forget_bias - ours.bias_hh_l0[hidden:2 * hidden]
    twin = (nn.LSTM if cell == "lstm" else nn.GRU)(input_size, hidden, device=device, dtype=DTYPES[dtype])
    twin.load_state_dict(ours.state_dict())
    ref64 = (nn.LSTM if cell == "lstm" else nn.GRU)(input_size, hidden, device=device, dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(args.seq, args.batch, input_size, device=device, dtype=DTYPES[dtype])
    with torch.no_grad(), persistrnn.backend(args.backend):
        got, other, exact = (_flat(m(x.double() if m is ref64 else x)) for m in (ours, twin, ref64))
        persistrnn.raise_if_failed()
    errors = {}
    for name, g, o, e in zip(("y", "h_n", "c_n"), got, other, exact):
        mine, theirs = relative_error(g, e), relative_error(o, e)
        errors[name] = dict(ours=mine, torch_nn=theirs, ratio=mine / theirs if theirs else float("inf"))
    return dict(cell=cell, dtype=dtype, hidden=hidden, input_size=input_size, path=ours.last_dispatch.path,
                errors=errors)


def _flat(result):
    out, hidden = result
    return (out, *hidden) if isinstance(hidden, tuple) else (out, hidden)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["triton", "interpret"], default="triton")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", nargs="+", type=int, default=[256, 768])
    p.add_argument("--input-size", type=int, default=0, help="default: the hidden size")
    p.add_argument("--cell", nargs="+", choices=["lstm", "gru"], default=["lstm", "gru"])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float16", "bfloat16"])
    p.add_argument("--forget-bias", type=float, default=4.0)
    p.add_argument("--budget", type=float, default=None, help="seconds after which no new case starts")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args(argv)
    device = "cuda" if args.backend == "triton" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: use --backend interpret (tiny sizes) on CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    record = dict(seq=args.seq, batch=args.batch, forget_bias=args.forget_bias, backend=args.backend,
                  device=torch.cuda.get_device_name() if device == "cuda" else "cpu", cases=[])
    print(f"relative error against torch.nn in float64, T = {args.seq}, B = {args.batch}, memory-gate bias "
          f"{args.forget_bias:+g}; torch.nn is {'cuDNN' if device == 'cuda' else 'torch.nn on CPU'}")
    print(f"{'cell':5} {'dtype':9} {'H':>5} {'out':4} {'persistrnn':>10} {'torch.nn':>10} {'ratio':>6}", flush=True)
    start, failed = time.monotonic(), 0
    cases = [(cell, dtype, hidden) for hidden in args.hidden for cell in args.cell for dtype in args.dtype]
    for i, (cell, dtype, hidden) in enumerate(cases):
        if args.budget is not None and time.monotonic() - start > args.budget:
            print(f"budget of {args.budget:g} s spent: {len(cases) - i} of {len(cases)} cases not run")
            record["not_run"] = len(cases) - i
            break
        try:
            case = run_case(cell, dtype, hidden, args, device)
        except Exception as exc:  # noqa: BLE001 (recorded; the other cases still run)
            case = dict(cell=cell, dtype=dtype, hidden=hidden, error=f"{type(exc).__name__}: {exc}")
            print(f"{cell:5} {dtype:9} {hidden:5} failed: {case['error']}", flush=True)
        else:
            for name, e in case["errors"].items():
                print(f"{cell:5} {dtype:9} {hidden:5} {name:4} {e['ours']:10.2e} {e['torch_nn']:10.2e} "
                      f"{e['ratio']:6.2f}", flush=True)
            if case["path"] != args.backend:
                case["error"] = f"the layer ran {case['path']!r}, not the kernels"
                print(f"{cell:5} {dtype:9} {hidden:5} {case['error']}", flush=True)
        failed += "error" in case
        record["cases"].append(case)
        if args.out:  # replaced whole, so a reader never sees half a file
            with open(args.out + ".partial", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(args.out + ".partial", args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
