"""The `persistrnn` command (also `python -m persistrnn`): demo, check, capacity, inspect, tune, bench,
report, compare."""
import argparse
import json
import sys
import time

import torch

from persistrnn.configs import DTYPE_BY_NAME as DTYPES


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
    from persistrnn.configs import TARGETS
    from persistrnn.autotune.capacity import COVERAGE, capacity_table, coverage
    if args.coverage:
        report = coverage(args.target)
        if args.json:
            print(json.dumps(report))
            return 0
        print(f"Layers that run the kernels on {args.target} ({TARGETS[args.target]['sms']} SMs), by dtype and pass, "
              f"over cells {', '.join(COVERAGE['cells'])}, B in {COVERAGE['batch']}, 1 and 2 directions:")
        _print_table(report["rows"], ["dtype", "pass", *map(str, COVERAGE["hidden"])])
        print(f"total: {report['kernel']} of {report['layers']} layers ({report['total']:.0%}); "
              f"{report['several_launches']} of them in several launches one after another "
              f"(a grid larger than the SMs: blocks of batch tiles and directions)")
        return 0
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


def _tune_layers(args):
    from persistrnn.autotune.space import Layer
    passes = ["forward", "train"] if args.pass_ == "both" else [args.pass_]
    return [Layer(cell, DTYPES[dtype], pass_, hidden, args.proj_size if cell == "lstm" else 0,
                  2 if args.bidirectional else 1, batch)
            for cell in args.cell for dtype in args.dtype for pass_ in passes for hidden in args.hidden
            for batch in args.batch]


def cmd_tune(args):
    """Autotune this device: time every config it holds against torch.nn (cuDNN) and remember the
    winner (or torch) per layer in $PERSISTRNN_CACHE_DIR. --static ranks the pruned configs for a
    target without a GPU; --backend interpret runs the whole flow on CPU at tiny sizes."""
    from tqdm import tqdm

    from persistrnn.autotune import tune
    from persistrnn.autotune.space import compile_requests
    interpret = args.backend == "interpret"
    if not (args.static or interpret or torch.cuda.is_available()):
        print("persistrnn tune: no CUDA GPU here; use --static --target sm_90|sm_80 to rank configs without one, "
              "or --backend interpret to run the flow on CPU", file=sys.stderr)
        return 2
    if interpret:  # the interpreter is slow: tiny sizes unless asked otherwise
        args.hidden, args.batch = args.hidden or [32], args.batch or [4]
        args.seq, args.repeats = args.seq or 8, args.repeats or 3
    args.hidden, args.batch = args.hidden or [256, 512, 768, 1024], args.batch or [1, 16, 64]
    layers = _tune_layers(args)
    if args.static:
        total = len(compile_requests(layers, args.target)[0])  # distinct kernels, each compiled once
        with tqdm(total=total, desc="compile", unit="kernel", disable=args.json) as bar:
            report = tune.static_report(layers, args.target, workers=args.workers, progress=bar.update)
        if args.json:
            print(json.dumps(report))
            return 0
        for row in report:
            top = "; ".join(f"{i + 1}. block_b={c['block_b']} block_h={c['block_h']} warps={c['num_warps']}"
                            + (f"/{c['backward_warps']}" if c["backward_warps"] else "") + f" cost={c['cost']}"
                            for i, c in enumerate(row["ranking"][:3])) or "none"
            print(f"{row['layer']} ({row['target']}): {row['survivors']} survive of "
                  f"{row['survivors'] + len(row['pruned'])}; {top}")
        return 0
    device = torch.device("cpu" if interpret else "cuda")
    with tqdm(total=len(layers), desc="tune", unit="layer", disable=args.json) as bar:
        entries, path = tune.tune(layers, device, seq=args.seq or 256, repeats=args.repeats or 10,
                                  max_candidates=args.max_candidates, workers=args.workers, progress=bar.update)
    rows = [dict(shape=e["layer"], winner=e["choice"] if e["choice"] == "torch" else " ".join(
                     f"{k}={v}" for k, v in e["config"].items() if v is not None),
                 ms=e["ms"], torch_ms=e["torch_ms"],
                 ratio=round(e["torch_ms"] / e["ms"], 3) if e["ms"] else None) for e in entries.values()]
    if args.json:
        print(json.dumps({"table": path, "entries": entries}))
    else:
        if interpret:
            print("times: wall clock on CPU through the Triton interpreter, not GPU speed")
        _print_table(rows, ["shape", "winner", "ms", "torch_ms", "ratio"])
        print(f"table: {path}")
    return 0


def cmd_bench(argv):
    """Forward and training-step benchmark against torch.nn (cuDNN); needs a GPU."""
    from persistrnn.benchmarks import bench_layer
    return bench_layer.main(argv)


def cmd_report(argv):
    """Re-render a benchmark report from its results.json, or compare two (--compare A B)."""
    from persistrnn.benchmarks import report
    return report.main(argv)


def cmd_compare(args):
    """LSTM or GRU? Parameters, speed, memory and learning ability, measured: a report in markdown,
    JSON and PNG plots, and a summary."""
    from persistrnn.benchmarks.compare import run
    return run.main(args, args.parser, args.argv)


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
    p.add_argument("--coverage", action="store_true",
                   help="the fraction of a grid of common layers (cell, dtype, H, B, directions, pass) that runs "
                        "the kernels")
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
    p = sub.add_parser("tune", help=cmd_tune.__doc__, description=cmd_tune.__doc__)
    p.add_argument("--cell", nargs="+", choices=["lstm", "gru"], default=["lstm", "gru"])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bfloat16"])
    p.add_argument("--hidden", nargs="+", type=int, default=None, help="hidden sizes (default 256 512 768 1024)")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 16 64)")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--proj-size", type=int, default=0, help="LSTM only")
    p.add_argument("--pass", dest="pass_", choices=["forward", "train", "both"], default="both")
    p.add_argument("--seq", type=int, default=None, help="sequence length timed (default 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per candidate (default 10)")
    p.add_argument("--max-candidates", type=int, default=8, help="best statically ranked configs timed per layer")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: all cores)")
    p.add_argument("--static", action="store_true", help="rank the pruned configs for --target, no GPU needed")
    p.add_argument("--target", choices=["sm_80", "sm_90"], default="sm_90")
    p.add_argument("--backend", choices=["triton", "interpret"], default="triton",
                   help="interpret: the whole flow on CPU through the Triton interpreter (tiny sizes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("compare", help=cmd_compare.__doc__, description=cmd_compare.__doc__)
    from persistrnn.benchmarks.compare.run import add_arguments
    add_arguments(p)
    p.set_defaults(func=cmd_compare, parser=p)
    # listed for --help; main() hands their arguments to benchmarks/bench_layer.py and report.py untouched
    sub.add_parser("bench", help=cmd_bench.__doc__, add_help=False)
    sub.add_parser("report", help=cmd_report.__doc__, add_help=False)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    if argv[:1] == ["report"]:
        return cmd_report(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
