"""`persistrnn tune`: time every config the device holds against torch.nn, remember the winner.

Per layer (space.Layer): the pruned, statically ranked space (space.py), compiled for the
device's target in parallel processes; the best `max_candidates` of it are run once each (the
warm-up that compiles them on the device) and checked against torch.nn on the same weights and
input (a wrong answer or a barrier timeout drops the config; so does a timeout while timed); then
every candidate and torch.nn are timed in turn, `repeats` rounds, with L2 flushed before each
timed call so no candidate gains from a warm cache; the TOP fastest medians are timed again, and
their medians decide. A config already in the table
stays unless the new winner beats it by more than MARGIN. Where torch.nn is faster than the best
config, the decision is "torch": the planner then runs PyTorch's native RNN (cuDNN) for the layer.

On CPU through the interpreter (`--backend interpret`) the same flow runs at tiny sizes with
wall-clock times, which say nothing about GPU speed: there the decision is always the kernel
(torch's native CPU RNN would always win), so that the planner's use of the table can be shown.
"""
import contextlib
import dataclasses
import datetime
import statistics
import time

import torch

from ..configs import device_sms, target_of
from ..kernels.config import KernelConfig
from ..kernels.exchange import BarrierTimeout, raise_if_failed
from . import cache
from .aot import compile_kernels
from .space import Layer, compile_requests, static_rank

MARGIN = 0.03  # a new winner must beat the table's config by this fraction to replace it
TOP = 3  # candidates re-timed to confirm
TORCH = "torch"


def _median(xs):
    return statistics.median(xs) if xs else float("inf")


class _Bench:
    """One layer's module, input and output gradient, built once: every candidate and torch.nn
    run on the same weights and data."""

    def __init__(self, layer, device, seq):
        import persistrnn
        self.layer, self.device = layer, device
        kwargs = dict(bidirectional=layer.num_directions == 2, device=device, dtype=layer.dtype)
        if layer.proj_size:
            kwargs["proj_size"] = layer.proj_size
        cls = persistrnn.LSTM if layer.cell == "lstm" else persistrnn.GRU
        self.module = cls(layer.hidden_size, layer.hidden_size, **kwargs).train(layer.pass_ == "train")
        self.x = torch.randn(seq, layer.batch, layer.hidden_size, device=device, dtype=layer.dtype,
                             requires_grad=layer.pass_ == "train")
        out = layer.num_directions * (layer.proj_size or layer.hidden_size)
        self.grad_y = torch.randn(seq, layer.batch, out, device=device, dtype=layer.dtype)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            self.flush = torch.empty(2 * getattr(props, "L2_cache_size", 64 << 20), dtype=torch.uint8, device=device)

    def run(self, config, backend):
        """Run the pass once with `config` (None: torch.nn); returns (y, input gradient or None)."""
        import persistrnn
        pin = (persistrnn.pin_config(**{k: v for k, v in dataclasses.asdict(config).items() if v is not None})
               if config is not None else contextlib.nullcontext())
        with persistrnn.backend(TORCH if config is None else backend), pin:
            if self.layer.pass_ == "train":
                self.x.grad = None
                y, _ = self.module(self.x)
                y.backward(self.grad_y)
                return y.detach(), self.x.grad
            with torch.no_grad():
                return self.module(self.x)[0], None

    def time_ms(self, config, backend):
        if self.device.type == "cuda":
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.run(config, backend)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        self.run(config, backend)
        return (time.perf_counter() - start) * 1e3


def _rel_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def decide(times, torch_ms, previous=None, torch_can_win=True):
    """The winner among timed configs ({config: median ms}): the fastest, unless `previous` is
    within MARGIN of it; "torch" if torch.nn beats that (and torch_can_win)."""
    best = min(times, key=times.get)
    if previous in times and times[previous] <= times[best] * (1 + MARGIN):
        best = previous
    if torch_can_win and torch_ms < times[best]:
        return TORCH, best
    return best, best


def tune_layer(layer, device, *, seq=256, repeats=10, max_candidates=8, workers=None):
    """Tune one layer on `device` (a CUDA device, or CPU for the interpreter). Returns the table
    entry (also for the summary): choice, config, ms, torch_ms, and how it was obtained."""
    from ..layers.check import tolerance
    interpret = device.type != "cuda"
    backend = "interpret" if interpret else "triton"
    target = target_of(device) or "sm_90"
    sms = device_sms(device)
    ranked, dropped = static_rank(layer, target, sms, workers)
    bench = _Bench(layer, device, seq)
    reference = bench.run(None, backend)
    tol = tolerance(layer.dtype, device) * (4 if layer.pass_ == "train" else 1)  # gradients go through T steps
    candidates, rejected = [], []
    for config, _ in ranked[:max_candidates]:
        try:
            y, gx = bench.run(config, backend)  # warm-up: compiles on the device
            raise_if_failed(device)  # a barrier that timed out rejects the config (launches do not wait to tell)
            err = max(_rel_error(y, reference[0]), _rel_error(gx, reference[1]) if gx is not None else 0.0)
        except Exception as exc:  # noqa: BLE001 - a config that cannot run here is dropped, with its reason
            rejected.append((config, f"{type(exc).__name__}: {exc}"))
            continue
        if err > tol:
            rejected.append((config, f"relative error {err:.2e} > {tol:.0e} against torch.nn"))
        else:
            candidates.append(config)
    entry = {"layer": layer.describe(), "seq": seq, "candidates": len(ranked), "pruned": len(dropped),
             "rejected": [[dataclasses.asdict(c), why] for c, why in rejected],
             "timing": ("wall clock on CPU through the Triton interpreter: not GPU speed" if interpret else
                        f"CUDA events, L2 flushed before each call, median of {repeats}, top {TOP} re-timed"),
             "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if not candidates:
        return dict(entry, choice=TORCH, config=None, ms=None, torch_ms=None,
                    why="no config of the space runs this layer on this device")
    first = _timed(bench, candidates, backend, repeats, rejected)
    top = sorted((c for c in first if c != TORCH), key=lambda c: _median(first[c]))[:TOP]
    confirm = _timed(bench, top, backend, repeats, rejected)
    times = {c: _median(confirm[c]) for c in confirm if c != TORCH}
    entry["rejected"] = [[dataclasses.asdict(c), why] for c, why in rejected]
    if not times:
        return dict(entry, choice=TORCH, config=None, ms=None, torch_ms=None,
                    why="every config that ran timed out at a barrier while timed")
    torch_ms = _median(first[TORCH] + confirm[TORCH])
    device_key = cache.device_key(device, sms)
    previous_entry = next((entry for entry in (cache.table_entry(device_key, key_of(layer), source)[0]
                                               for source in ("tuned", "shipped")) if entry), None)
    previous = (KernelConfig(**previous_entry["config"]) if previous_entry and previous_entry.get("config")
                else None)
    choice, best = decide(times, torch_ms, previous, torch_can_win=not interpret)
    return dict(entry, choice="torch" if choice == TORCH else "kernel", config=dataclasses.asdict(best),
                ms=round(times[best], 4), torch_ms=round(torch_ms, 4),
                ranking=[[dataclasses.asdict(c), round(times[c], 4)] for c in sorted(times, key=times.get)])


def _timed(bench, configs, backend, repeats, rejected):
    """{config or TORCH: [ms, ...]}: every config and torch.nn in turn, the order rotated per round.
    A config whose barrier times out while timed is dropped and added to `rejected` (its launches do
    not wait to tell: the count is read after each of its calls)."""
    order = list(configs) + [TORCH]
    times = {c: [] for c in order}
    for r in range(repeats):
        for c in order[r % len(order):] + order[:r % len(order)]:
            if c not in times:
                continue
            try:
                times[c].append(bench.time_ms(None if c == TORCH else c, backend))
                if c != TORCH:
                    raise_if_failed(bench.device)
            except BarrierTimeout as exc:
                rejected.append((c, f"BarrierTimeout while timed: {exc}"))
                del times[c]
    return times


def key_of(layer):
    return cache.layer_key(layer.cell, layer.dtype, layer.pass_, layer.hidden_size, layer.proj_size,
                           layer.num_directions, layer.batch)


def tune(layers, device, *, seq=256, repeats=10, max_candidates=8, workers=None, progress=None):
    """Tune every layer and write each entry to the device's table as soon as it is measured (a
    run cut off keeps what it finished). Returns (entries {layer key: entry}, table path)."""
    key = cache.device_key(device, device_sms(device))
    entries, path = {}, cache.table_path(key)
    for layer in layers:
        entry = tune_layer(layer, device, seq=seq, repeats=repeats, max_candidates=max_candidates, workers=workers)
        entries[key_of(layer)] = entry
        path = cache.write_entries(key, {key_of(layer): entry})
        progress and progress()
    return entries, path


def static_report(layers, target, *, workers=None, top=3, progress=None):
    """`persistrnn tune --static`: per layer, the pruned candidates ranked by static cost. Every
    distinct kernel of every layer's candidates is compiled once, all in one pool of `workers`
    processes (progress() after each compile: compile_requests counts them), then ranked."""
    keys, read = compile_requests(layers, target)
    compile_kernels(keys, mix=read, workers=workers, progress=progress)
    report = []
    for layer in layers:
        ranked, dropped = static_rank(layer, target, workers=workers)
        report.append({"layer": layer.describe(), "target": target, "survivors": len(ranked),
                       "pruned": [[dataclasses.asdict(c), why] for c, why in dropped],
                       "ranking": [dict(dataclasses.asdict(c), cost=row["cost"],
                                        instructions={k: v["instructions"] for k, v in row["kernels"].items()},
                                        programs=layer.programs(c)) for c, row in ranked],
                       "top": [dataclasses.asdict(c) for c, _ in ranked[:top]]})
    return report


__all__ = ["Layer", "decide", "static_report", "tune", "tune_layer"]
