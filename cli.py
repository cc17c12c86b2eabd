"""The `persistrnn` command (also `python -m persistrnn`): demo, check, capacity, inspect, bench."""
import argparse
import json
import sys
import time

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


def _print_table(rows, columns):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _layer(cell, args, device, dtype):
    import persistrnn
    kwargs = dict(num_layers=args.layers, bidirectional=args.bidirectional, device=device, dtype=dtype)
    if cell == "lstm" and args.proj_size:
        kwargs["proj_size"] = args.proj_size
    cls = persistrnn.LSTM if cell == "lstm" else persistrnn.GRU
    return cls(args.input_size, args.hidden_size, **kwargs)


def _add_shape_args(p, *, seq, batch, input_size, hidden_size, dtype):
    p.add_argument("--seq", type=int, default=seq, help="sequence length T")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--input-size", type=int, default=input_size)
    p.add_argument("--hidden-size", type=int, default=hidden_size)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--proj-size", type=int, default=0, help="LSTM only")
    p.add_argument("--dtype", choices=list(DTYPES), default=dtype)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run_check(cell, args, device):
    """Build the layer for `args`, run persistrnn.check on a fresh random input."""
    import persistrnn
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    layer = _layer(cell, args, device, dtype)
    x = torch.randn(args.seq, args.batch, args.input_size, device=device, dtype=dtype)
    errors = persistrnn.check(layer, x)
    return layer, x, errors


def _time_ms(layer, x, backend_name):
    import persistrnn
    with persistrnn.backend(backend_name), torch.no_grad():
        layer(x)  # warm-up: compiles on a GPU
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        layer(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return round((time.perf_counter() - start) * 1e3, 3)


def cmd_demo(args):
    """LSTM and GRU on a small problem: error against the reference, parameters, time."""
    from persistrnn.layers.check import tolerance
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = "triton" if device == "cuda" else "interpret"
    rows = []
    for cell in ("lstm", "gru"):
        layer, x, errors = _run_check(cell, args, device)
        path = layer.last_dispatch.path
        tol = tolerance(x.dtype, x.device)
        rows.append(dict(cell=cell, params=sum(p.numel() for p in layer.parameters()), path=path,
                         max_rel_error=f"{max(errors.values()):.2e}", tolerance=f"{tol:.0e}",
                         ok=max(errors.values()) <= tol, ms_ours=_time_ms(layer, x, ours),
                         ms_torch=_time_ms(layer, x, "torch")))
    if args.json:
        shape = {k: v for k, v in vars(args).items() if k not in ("func", "command", "json")}
        print(json.dumps(dict(device=device, shape=shape, rows=rows)))
    else:
        print(f"persistrnn demo on {device} ({'compiled Triton' if device == 'cuda' else 'Triton interpreter'}): "
              f"T={args.seq} B={args.batch} I={args.input_size} H={args.hidden_size} {args.dtype}")
        _print_table(rows, ["cell", "params", "path", "max_rel_error", "tolerance", "ok", "ms_ours", "ms_torch"])
        if device == "cpu":
            print("(on CPU the kernels run in the Triton interpreter: its times say nothing about GPU speed)")
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_check(args):
    """Numerics against cuDNN (GPU) or the float64 reference (CPU); exit 1 on mismatch."""
    from persistrnn.layers.check import tolerance
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cells = ["lstm", "gru"] if args.cell == "both" else [args.cell]
    results = []
    for cell in cells:
        layer, x, errors = _run_check(cell, args, device)
        tol = args.tol if args.tol is not None else tolerance(x.dtype, x.device)
        results.append(dict(cell=cell, path=layer.last_dispatch.path, reason=layer.last_dispatch.reason,
                            errors=errors, tolerance=tol, ok=all(e <= tol for e in errors.values())))
    if args.json:
        print(json.dumps(dict(device=device, results=results)))
    else:
        for r in results:
            errs = " ".join(f"{k}={v:.2e}" for k, v in r["errors"].items())
            print(f"{r['cell']}: {'OK' if r['ok'] else 'MISMATCH'} ({r['path']}) {errs} tol={r['tolerance']:.0e}")
    return 0 if all(r["ok"] for r in results) else 1


def cmd_capacity(args):
    """Largest hidden size each cell/dtype holds on-chip on a target (ahead-of-time compile)."""
    from persistrnn.autotune.capacity import capacity_table
    rows = capacity_table(args.target)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table([dict(r, config=" ".join(f"{k}={v}" for k, v in r["config"].items())) for r in rows],
                     ["cell", "dtype", "pass", "target", "max_hidden", "config"])
    return 0


def cmd_inspect(args):
    """The compiled time loop of the kernel(s) the planner would launch for a layer, without a GPU:
    config, registers, spills, shared memory, and the per-step instruction mix."""
    from persistrnn.autotune.inspect import format_report, inspect_layer
    try:
        report = inspect_layer(args.cell, DTYPES[args.dtype], args.hidden_size, args.batch, args.bidirectional,
                               args.proj_size, args.pass_, args.target, cubin_dir=args.cubin)
    except ValueError as exc:
        print(f"persistrnn inspect: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_bench(argv):
    """Forward and training-step benchmark against torch.nn (cuDNN); needs a GPU."""
    from persistrnn.benchmarks import bench_layer
    return bench_layer.main(argv)


def build_parser():
    parser = argparse.ArgumentParser(prog="persistrnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    _add_shape_args(p, seq=16, batch=4, input_size=32, hidden_size=64, dtype="float16")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("check", help=cmd_check.__doc__, description=cmd_check.__doc__)
    p.add_argument("--cell", choices=["lstm", "gru", "both"], default="both")
    p.add_argument("--tol", type=float, default=None, help="relative error allowed (default: by dtype)")
    _add_shape_args(p, seq=8, batch=3, input_size=16, hidden_size=32, dtype="float32")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("capacity", help=cmd_capacity.__doc__, description=cmd_capacity.__doc__)
    p.add_argument("--target", choices=["sm_80", "sm_90"], default="sm_90")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_capacity)
    p = sub.add_parser("inspect", help=cmd_inspect.__doc__, description=cmd_inspect.__doc__)
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--proj-size", type=int, default=0, help="LSTM only")
    p.add_argument("--pass", dest="pass_", choices=["forward", "train"], default="forward",
                   help="forward: the inference kernel; train: the saving forward and the backward kernel")
    p.add_argument("--target", choices=["sm_80", "sm_90"], default="sm_90")
    p.add_argument("--cubin", metavar="DIR", default=None,
                   help="write the compiled kernels to DIR/forward.cubin (and DIR/backward.cubin)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    # listed for --help; main() hands its arguments to benchmarks/bench_layer.py untouched
    sub.add_parser("bench", help=cmd_bench.__doc__, add_help=False)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
