"""The autotuner without a GPU: config space and pruning, keys, the per-device cache (round trip,
corrupted, stale and concurrent files), the whole flow through the interpreter, and the planner's
lookup order (pin > tuned table > shipped table > static tables)."""
import dataclasses
import json
import os

import pytest
import torch

import persistrnn
from persistrnn import cli
from persistrnn.autotune import cache, space, tune
from persistrnn.autotune.inspect import inspect_layer
from persistrnn.autotune.space import Layer
import persistrnn.kernels.config as config_mod
from persistrnn.kernels.config import KernelConfig

pytestmark = pytest.mark.filterwarnings("ignore:persistrnn. ignoring the tuned table")

INTERPRETER = torch.device("cpu")


def interpreter_key():
    from persistrnn.configs import DEFAULT_SMS
    return cache.device_key(INTERPRETER, DEFAULT_SMS)


def kernel_entry(config, **extra):
    import dataclasses
    return dict({"choice": "kernel", "config": dataclasses.asdict(config), "ms": 1.0, "torch_ms": 2.0, "seq": 8},
                **extra)


# --- space and pruning -----------------------------------------------------------------------

def test_space_covers_both_tiers_batch_tiles_and_warps():
    layer = Layer("lstm", torch.float16, "train", 100, batch=40)
    configs = space.config_space(layer)
    assert {c.block_h for c in configs} == {16, 32, 64, 128}  # 128: the single program holding H=100
    assert {c.block_b for c in configs} == {16, 32, 64}
    assert {(c.num_warps, c.backward_warps) for c in configs} == {(4, 4), (4, 8), (8, 4), (8, 8)}
    assert {c.backward_warps for c in space.config_space(Layer("gru", torch.float16, "forward", 100))} == {None}


def test_cheap_pruning_reasons():
    # weights over shared memory; grids that cannot be co-resident; nothing else before the compile
    small = Layer("lstm", torch.float16, "forward", 64, batch=3)
    kept, dropped = space.cheap_prune(small, space.config_space(small), "sm_90", 132)
    assert dropped == [] and {c.block_b for c in kept} == {16, 32, 64}
    big = Layer("lstm", torch.float32, "forward", 2048, batch=16)
    kept, dropped = space.cheap_prune(big, space.config_space(big), "sm_90", 132)
    assert any(c.block_h == 128 and "shared memory" in why for c, why in dropped)
    assert all(c.block_h * 16 * 2048 <= 227 * 1024 for c in kept)
    # a grid larger than the SMs stays (it runs as several launches); SPLIT > SMs is dropped
    wide = Layer("gru", torch.bfloat16, "forward", 1024, num_directions=2, batch=256)
    kept, dropped = space.cheap_prune(wide, space.config_space(wide), "sm_90", 132)
    assert any(wide.programs(c) > 132 and wide.launches(c, 132) > 1 for c in kept)
    assert all(wide.launches(c, 132) >= 1 for c in kept) and not any("resident" in why for _, why in dropped)
    mid = Layer("gru", torch.bfloat16, "forward", 512, num_directions=2, batch=256)
    kept16, dropped16 = space.cheap_prune(mid, space.config_space(mid), "sm_90", 16)
    assert kept16 and all(mid.split(c) <= 16 for c in kept16)
    assert len(kept16) < len(space.cheap_prune(mid, space.config_space(mid), "sm_90", 132)[0])
    assert any(mid.split(c) == 32 and "cannot all be resident on 16 SMs" in why for c, why in dropped16)


def test_compiled_pruning_drops_spills_and_ranks_the_rest():
    """fp32 LSTM, H = 64: one program of 64 units compiles on-chip with TF32 dots but spills with
    IEEE ones, so it is pruned (the flag may change after tuning); the split configs survive,
    ranked by static cost (the barrier's cycles count against them)."""
    layer = Layer("lstm", torch.float32, "forward", 64, batch=16)
    ranked, dropped = space.static_rank(layer, "sm_90", workers=2)
    assert [why for c, why in dropped if c.block_h == 64 and c.block_b == 16] == ["forward: spills with IEEE dots"] * 2
    assert {c.block_h for c, _ in ranked if c.block_b == 16} == {16, 32}
    costs = [row["cost"] for _, row in ranked]
    assert costs == sorted(costs) and all(cost > space.BARRIER_CYCLES for cost in costs)
    for c, row in ranked:
        steps = row["kernels"]["forward"]["instructions"]
        assert row["cost"] >= steps * (c.num_warps // 4) + space.BARRIER_CYCLES


def test_static_cost_sees_the_read_back_chain(monkeypatch):
    """The static cost charges an L2 round trip per batch of exchange loads in flight: LSTM bf16
    H = 768, B = 16, forward, its read-back of h in flight (the shipped kernel) against the same
    config with the loads masked, one or two at a time. The serial one costs more by at least the
    round trips it adds, beyond what its instructions add."""
    def cost():
        report = inspect_layer("lstm", torch.bfloat16, 768, 16, pass_="forward", target="sm_90")
        mix = report["kernels"]["forward"]["time_loop"]
        return space.step_cycles(mix, report["config"]["num_warps"], report["config"]["split"]), mix["instructions"]

    in_flight, in_flight_steps = cost()
    monkeypatch.setattr(config_mod, "in_flight_bytes", lambda block_b: 0)
    serial, serial_steps = cost()
    assert serial - in_flight >= (serial_steps - in_flight_steps) + 3 * space.L2_ROUND_TRIP


def test_step_cycles():
    mix = dict(instructions=400, exchange_loads=12, exchange_loads_in_flight=12, exchange_loops=0, wgmma_waits=3)
    assert space.step_cycles(mix, 4, 48) == 400 + space.L2_ROUND_TRIP + 3 * space.WGMMA_DRAIN + space.BARRIER_CYCLES
    assert space.step_cycles(dict(mix, exchange_loads_in_flight=2), 4, 48) == \
        space.step_cycles(mix, 4, 48) + 5 * space.L2_ROUND_TRIP
    # a read-back left as a loop over the other 47 programs' slots: a round trip per trip
    assert space.step_cycles(dict(mix, exchange_loops=1), 4, 48) == space.step_cycles(mix, 4, 48) + 47 * space.L2_ROUND_TRIP
    assert space.step_cycles(dict(mix, exchange_loads=0), 8, 1) == 800 + 3 * space.WGMMA_DRAIN


# --- keys ------------------------------------------------------------------------------------

def test_batch_buckets_and_layer_keys():
    assert [cache.batch_bucket(b) for b in (1, 2, 3, 8, 9, 16, 17, 64, 65)] == [1, 2, 4, 8, 16, 16, 32, 64, 128]
    key = cache.layer_key("lstm", torch.bfloat16, "train", 768, 0, 2, 12)
    assert key == "lstm|bfloat16|train|hidden=768|proj=0|directions=2|batch<=16"
    assert key == cache.layer_key("lstm", torch.bfloat16, "train", 768, 0, 2, 16)
    others = [cache.layer_key(*args) for args in [("gru", torch.bfloat16, "train", 768, 0, 2, 12),
                                                  ("lstm", torch.float16, "train", 768, 0, 2, 12),
                                                  ("lstm", torch.bfloat16, "forward", 768, 0, 2, 12),
                                                  ("lstm", torch.bfloat16, "train", 512, 0, 2, 12),
                                                  ("lstm", torch.bfloat16, "train", 768, 256, 2, 12),
                                                  ("lstm", torch.bfloat16, "train", 768, 0, 1, 12),
                                                  ("lstm", torch.bfloat16, "train", 768, 0, 2, 17)]]
    assert len(set(others + [key])) == 8


def test_device_key_names_versions():
    import triton
    key = interpreter_key()
    assert key["triton"] == triton.__version__ and key["persistrnn"] == persistrnn.__version__
    assert cache.device_slug({"name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert cache.table_path(key).startswith(os.environ["PERSISTRNN_CACHE_DIR"])


# --- the cache file --------------------------------------------------------------------------

def test_round_trip_and_merge():
    key = interpreter_key()
    a, b = KernelConfig(16, 32, 8), KernelConfig(32, 16, 4, backward_warps=8)
    path = cache.write_entries(key, {"layer a": kernel_entry(a)})
    cache.write_entries(key, {"layer b": kernel_entry(b), "layer c": {"choice": "torch"}})
    entries = cache.read_table(path, key)
    assert set(entries) == {"layer a", "layer b", "layer c"}
    assert KernelConfig(**entries["layer b"]["config"]) == b and entries["layer c"]["choice"] == "torch"
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")]


@pytest.mark.parametrize("content, says", [
    ("{not json", "not readable JSON"),
    ('{"format": 99, "entries": {}}', "not a persistrnn tuned table"),
    ("[1, 2]", "not a persistrnn tuned table"),
])
def test_corrupted_files_are_warned_once_and_ignored(content, says):
    key = interpreter_key()
    path = cache.table_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    with pytest.warns(RuntimeWarning, match=says):
        assert cache.read_table(path, key) == {}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.read_table(path, key) == {}  # once: the second read is silent
    # and a write over it starts a clean table
    cache.write_entries(key, {"x": {"choice": "torch"}})
    assert cache.read_table(path, key) == {"x": {"choice": "torch"}}


def test_stale_files_are_ignored(recwarn):
    key = interpreter_key()
    stale = dict(key, triton="3.5.0")
    path = cache.write_entries(stale, {"x": kernel_entry(KernelConfig(16, 16))})
    assert path == cache.table_path(key)
    assert cache.read_table(path, key) == {}
    assert any("triton '3.5.0'" in str(w.message) for w in recwarn.list)
    # invalid entries inside a valid file are skipped, not trusted
    cache.write_entries(key, {"good": kernel_entry(KernelConfig(16, 16)), "bad": {"choice": "kernel", "config": {}},
                              "worse": "text"})
    assert set(cache.read_table(path, key)) == {"good"}


WRITER = """
import sys, time, torch
from persistrnn.autotune import cache
key = cache.device_key(torch.device("cpu"), int(sys.argv[2]))
while time.time() < float(sys.argv[3]):  # all writers start together
    time.sleep(0.001)
for i in range(40):
    cache.write_entries(key, {f"w{sys.argv[1]}-{i}": {"choice": "torch", "i": i}})
"""


def test_concurrent_writers_lose_nothing():
    """Three processes write 40 entries each into the same file at once: the lock and the
    re-read-and-merge keep all 120 (without the lock, writes are lost)."""
    import subprocess
    import sys
    import time
    key = interpreter_key()
    start = str(time.time() + 8)  # after every writer has imported torch
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(w), str(key["sms"]), start]) for w in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    entries = cache.read_table(cache.table_path(key), key)
    assert set(entries) == {f"w{w}-{i}" for w in range(3) for i in range(40)}


# --- the decision ----------------------------------------------------------------------------

def test_decide_margin_and_torch():
    a, b = KernelConfig(16, 16), KernelConfig(16, 32)
    assert tune.decide({a: 1.00, b: 1.02}, torch_ms=5.0, previous=b) == (b, b)  # within the margin: keep
    assert tune.decide({a: 1.00, b: 1.10}, torch_ms=5.0, previous=b) == (a, a)  # past it: switch
    assert tune.decide({a: 1.00, b: 1.10}, torch_ms=0.9) == (tune.TORCH, a)  # cuDNN wins: torch
    assert tune.decide({a: 1.00}, torch_ms=0.9, torch_can_win=False) == (a, a)


# --- the planner's lookup order --------------------------------------------------------------

def _dispatch(layer, x):
    with persistrnn.backend("interpret"), torch.no_grad():
        layer(x)
    return layer.last_dispatch


def test_lookup_order_pin_tuned_shipped_static(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHIPPED_DIR", str(tmp_path / "shipped"))
    layer, x = persistrnn.GRU(8, 32), torch.randn(5, 3, 8)
    name = cache.layer_key("gru", torch.float32, "forward", 32, 0, 1, 3)
    d = _dispatch(layer, x)
    assert "static tables" in d.reason
    static = d.config

    shipped = KernelConfig(16, 16, 8)
    assert shipped != static
    cache.write_entries(interpreter_key(), {name: kernel_entry(shipped)}, str(tmp_path / "shipped"))
    d = _dispatch(layer, x)
    assert d.config == shipped and "the shipped table" in d.reason and d.path == "interpret"

    tuned = KernelConfig(16, 32, 8)
    cache.write_entries(interpreter_key(), {name: kernel_entry(tuned)})
    d = _dispatch(layer, x)
    assert d.config == tuned and "the tuned table" in d.reason

    with persistrnn.pin_config(block_h=16, num_warps=4):
        d = _dispatch(layer, x)
    assert (d.config.block_h, d.config.num_warps) == (16, 4) and "static tables" in d.reason

    # other batch bucket: not this entry
    assert "static tables" in _dispatch(layer, torch.randn(5, 5, 8)).reason

    cache.write_entries(interpreter_key(), {name: {"choice": "torch", "ms": 3.0, "torch_ms": 1.0, "seq": 8}})
    d = _dispatch(layer, x)
    assert d.path == "torch" and "chose PyTorch's native RNN" in d.reason and "1.0 ms" in d.reason


def test_shipped_config_that_is_not_on_chip_is_revalidated_away(tmp_path, monkeypatch):
    """A shipped table is re-checked against the ahead-of-time compile when used: the fp32 single
    program of 64 units spills with IEEE dots, so the static tables decide instead."""
    from persistrnn.layers import dispatch
    monkeypatch.setattr(cache, "SHIPPED_DIR", str(tmp_path))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dispatch._shipped_config_on_chip.cache_clear()
    name = cache.layer_key("lstm", torch.float32, "forward", 64, 0, 1, 2)
    cache.write_entries(interpreter_key(), {name: kernel_entry(KernelConfig(16, 64, 4))}, str(tmp_path))
    layer = persistrnn.LSTM(4, 64)
    with pytest.warns(RuntimeWarning, match="does not compile on-chip for sm_90"):
        d = _dispatch(layer, torch.randn(3, 2, 4))
    assert "static tables" in d.reason and d.config.block_h < 64


def test_tuned_config_whose_grid_does_not_fit_falls_back(monkeypatch):
    from persistrnn import configs
    from persistrnn.layers import dispatch
    monkeypatch.setattr(configs, "DEFAULT_SMS", 2)
    dispatch._device_key.cache_clear()
    key = cache.device_key(INTERPRETER, 2)
    name = cache.layer_key("gru", torch.float32, "forward", 64, 0, 1, 4)
    cache.write_entries(key, {name: kernel_entry(KernelConfig(16, 16, 4))})  # 4 programs > 2 SMs
    d = _dispatch(persistrnn.GRU(4, 64), torch.randn(3, 4, 4))
    assert "tuned" not in d.reason
    dispatch._device_key.cache_clear()


# --- the whole flow through the interpreter --------------------------------------------------

def test_tune_through_the_interpreter_end_to_end(capsys):
    """Candidates, checks against torch.nn, timing, the winner in the cache file, and the planner
    launching the winner."""
    argv = ["tune", "--backend", "interpret", "--cell", "gru", "--dtype", "float32", "--hidden", "32",
            "--batch", "3", "--pass", "train", "--seq", "4", "--repeats", "2", "--max-candidates", "3", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    entry = out["entries"]["gru|float32|train|hidden=32|proj=0|directions=1|batch<=4"]
    assert entry["choice"] == "kernel" and "not GPU speed" in entry["timing"]
    assert entry["candidates"] >= 3 and entry["rejected"] == [] and entry["ms"] > 0 and entry["torch_ms"] > 0
    assert len(entry["ranking"]) == 3 and entry["ranking"][0][0] == entry["config"]
    assert out["table"] == cache.table_path(interpreter_key())
    winner = KernelConfig(**entry["config"])
    layer = persistrnn.GRU(8, 32)
    x = torch.randn(6, 3, 8, requires_grad=True)
    with persistrnn.backend("interpret"):
        layer(x)[0].sum().backward()
    assert layer.last_dispatch.config == winner and "the tuned table" in layer.last_dispatch.reason


def test_a_candidate_with_wrong_results_is_rejected(monkeypatch):
    real = tune._Bench.run

    def wrong_for_one(self, config, backend):
        y, gx = real(self, config, backend)
        return (y + 1 if config is not None and config.num_warps == 8 else y), gx
    monkeypatch.setattr(tune._Bench, "run", wrong_for_one)
    entry = tune.tune_layer(Layer("lstm", torch.float32, "forward", 32, batch=2), INTERPRETER, seq=3, repeats=1,
                            max_candidates=4)
    assert entry["rejected"] and all(c["num_warps"] == 8 and "relative error" in why for c, why in entry["rejected"])
    assert entry["config"]["num_warps"] == 4


def test_a_candidate_that_times_out_while_timed_is_rejected(monkeypatch):
    """A barrier timeout in the timing rounds (after a clean warm-up) drops that config, not the run."""
    from persistrnn.kernels.exchange import BarrierTimeout
    real = tune._Bench.time_ms
    calls = []

    def times_out_for_one(self, config, backend):
        if config is not None and (not calls or config == calls[0]):  # the first config timed
            calls.append(config)
            if len(calls) == 2:
                raise BarrierTimeout("1 program timed out (simulated)")
        return real(self, config, backend)
    monkeypatch.setattr(tune._Bench, "time_ms", times_out_for_one)
    entry = tune.tune_layer(Layer("lstm", torch.float32, "forward", 32, batch=2), INTERPRETER, seq=3, repeats=3,
                            max_candidates=4)
    dropped = dataclasses.asdict(calls[0])
    assert len(calls) == 2 and entry["choice"] == "kernel" and entry["config"] != dropped
    assert entry["rejected"] == [[dropped, "BarrierTimeout while timed: 1 program timed out (simulated)"]]
    assert dropped not in [c for c, _ in entry["ranking"]] and len(entry["ranking"]) == 3


def test_static_ranking_from_the_cli(capsys):
    argv = ["tune", "--static", "--target", "sm_80", "--cell", "lstm", "--dtype", "float32", "--hidden", "64",
            "--batch", "16", "--pass", "forward", "--json", "--workers", "2"]
    assert cli.main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["target"] == "sm_80" and row["survivors"] == len(row["ranking"]) > 0
    assert [r["cost"] for r in row["ranking"]] == sorted(r["cost"] for r in row["ranking"])
    assert row["top"][0] == {k: row["ranking"][0][k] for k in row["top"][0]}


def test_tune_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["tune"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err and "--static" in err


# --- the static precompile: each distinct kernel compiled once --------------------------------

@pytest.fixture
def fake_compiler(monkeypatch):
    """aot's compiler replaced by a recorder (no ptxas): every kernel compiles, on-chip except the
    backward kernel with 4 warps, which spills. Returns the list of compiles made."""
    import types

    from persistrnn.autotune import aot
    calls = []

    def compile_kernel(kernel, cell, dtype, has_proj, config, shape, target, allow_tf32, dir0=0):
        assert config.backward_warps is None  # a kernel is compiled with its own warps only
        calls.append((kernel, cell, dtype, has_proj, config, shape, target, allow_tf32, dir0))
        return types.SimpleNamespace(asm={"cubin": b""}, spills=kernel == "backward" and config.num_warps == 4,
                                     warps=config.num_warps)

    monkeypatch.setattr(aot, "_compiled", {})
    monkeypatch.setattr(aot, "compile_kernel", compile_kernel)
    monkeypatch.setattr(aot, "resources_of", lambda compiled, target: aot.Resources(
        regs=100 + compiled.warps, stack=64 if compiled.spills else 0, local=0, shared=1024, smem_limit=227 * 1024))
    monkeypatch.setattr(aot, "loop_mix", lambda cubin: {"instructions": 100, "exchange_loads": 0,
                                                        "exchange_loads_in_flight": 0, "exchange_loops": 0,
                                                        "wgmma_waits": 0})
    return calls


def test_static_ranking_compiles_each_distinct_kernel_once(fake_compiler):
    """A train config is two kernels, each compiled with its own warps: the configs that differ only
    in the other kernel's warps share a compile, so the space of 4 warp pairs per block compiles 2
    forward and 2 backward kernels, not 8; and what an earlier query compiled is not compiled
    again."""
    layer = Layer("gru", torch.float16, "train", 64, batch=16)
    kept, _ = space.cheap_prune(layer, space.config_space(layer), "sm_90", 132)
    distinct = {(kernel, c.block_b, c.block_h, c.warps("backward" if kernel == "backward" else "forward"))
                for c in kept for kernel in ("forward_save", "backward")}
    assert len(distinct) == len(kept) < 2 * len(kept)  # 4 warp pairs per block: 2 + 2 kernels
    ranked, dropped = space.static_rank(layer, "sm_90", workers=1)
    assert len(fake_compiler) == len(set(fake_compiler)) == len(distinct)
    compiled = {(k, config.block_b, config.block_h, config.num_warps) for k, _, _, _, config, *_ in fake_compiler}
    assert compiled == distinct
    # the worse of the two kernels decides: a 4-warp backward spills, whatever the forward's warps
    assert {c.backward_warps for c, _ in ranked} == {8} and len(ranked) == len(kept) // 2
    assert {why for c, why in dropped} == {"backward: spills"}
    assert all(set(row["kernels"]) == {"forward_save", "backward"} for _, row in ranked)
    # nothing is compiled twice in a process
    space.static_rank(layer, "sm_90", workers=1)
    assert len(fake_compiler) == len(distinct)
    assert len(space.compile_requests([layer], "sm_90")[0]) == len(distinct)


def test_a_train_query_is_the_worse_of_two_cached_kernels(fake_compiler):
    from persistrnn.autotune import aot
    config = KernelConfig(16, 16, 8, backward_warps=4)
    forward = aot.kernel_resources("lstm", torch.bfloat16, False, config, 256, "sm_90", 16, "forward_save")
    backward = aot.kernel_resources("lstm", torch.bfloat16, False, config, 256, "sm_90", 16, "backward")
    assert forward.on_chip and not backward.on_chip and len(fake_compiler) == 2
    train = aot.kernel_resources("lstm", torch.bfloat16, False, config, 256, "sm_90", 16, "train")
    assert len(fake_compiler) == 2  # both kernels cached
    assert train == aot.worst([forward, backward]) and (train.regs, train.stack) == (108, 64)
    # another train config sharing the forward kernel (num_warps 8) compiles only its backward
    aot.kernel_resources("lstm", torch.bfloat16, False, KernelConfig(16, 16, 8, backward_warps=8), 256, "sm_90", 16,
                         "train")
    assert len(fake_compiler) == 3 and fake_compiler[-1][0] == "backward"
    # prefetch of pass queries compiles each distinct kernel once, too
    aot.prefetch([("gru", torch.float16, False, KernelConfig(16, 16, w, backward_warps=b), 64, "sm_90", 4, "train")
                  for w in (4, 8) for b in (4, 8)], workers=1)
    assert len(fake_compiler) == 3 + 4


def test_the_static_cli_counts_compiles_not_configs(fake_compiler, capsys, monkeypatch):
    from persistrnn.autotune import tune as tune_module
    totals = []
    real = tune_module.static_report

    def report(layers, target, **kwargs):
        progress = kwargs["progress"]
        ticks = []
        kwargs["progress"] = lambda: (ticks.append(1), progress())
        out = real(layers, target, **kwargs)
        totals.append(len(ticks))
        return out
    monkeypatch.setattr(tune_module, "static_report", report)
    argv = ["tune", "--static", "--target", "sm_90", "--cell", "lstm", "gru", "--dtype", "float16", "--hidden", "64",
            "--batch", "16", "--pass", "both", "--json", "--workers", "1"]
    assert cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(row["survivors"] > 0 for row in rows)
    assert totals == [len(fake_compiler)] == [len(set(fake_compiler))]
