"""The compiled time step, read without a GPU (`persistrnn inspect`, autotune/inspect.py): what the
kernels the planner launches compile to on sm_90. These guard the speed work: the recurrent
product on wgmma, no reduction across warps, each cell element's transcendentals computed once
(one MUFU.TANH each, two MUFU where they must be accurate), exact K for widths that are not powers of two,
h read back with every load in flight, the next step's inputs in flight across the barrier wait,
the backward's partials stored from the accumulator, and the step's length.
"""
import pytest
import torch
import triton
import triton.language as tl

import persistrnn.autotune.aot as aot
import persistrnn.kernels.backward as backward
import persistrnn.kernels.config as config_mod
import persistrnn.kernels.forward as forward
from persistrnn.autotune.inspect import inspect_layer
from persistrnn.autotune.sass import access_bytes, parse_sass, step_mix, time_loop


@pytest.fixture(scope="module")
def lstm768():
    return inspect_layer("lstm", torch.bfloat16, 768, 16, pass_="forward", target="sm_90")


def test_the_forward_lstm_step_at_h768(lstm768):
    """LSTM bf16 H=768 B=16 (the FlashRNN shape of the speed goal), forward."""
    kernel = lstm768["kernels"]["forward"]
    loop = kernel["time_loop"]
    config = lstm768["config"]
    assert config["split"] > 1 and config["k_chunks"] == [256] * 3  # 768 = 3 x 256: no padded K
    assert set(loop["mma"]) == {"wgmma"}  # no mma.sync
    # a wgmma is 64 rows of M = 4 * BLOCK_H by 16 of K; the warpgroups (4 warps each) share the rows
    m_blocks_per_warpgroup = max(1, (4 * config["block_h"] // 64) // (config["num_warps"] // 4))
    assert loop["mma"]["wgmma"] == 768 // 16 * m_blocks_per_warpgroup
    assert loop["shuffles"] == 0  # no reduction across lanes or warps
    # one MUFU.TANH per transcendental, two (ex2, rcp) for the forget gate: each computed once
    assert kernel["math"] == "approx" and kernel["mufu_per_cell_element"] == 6 == kernel["mufu_the_math_takes"]
    assert loop["instructions"] < 600
    assert kernel["spill_bytes"] == 0 and kernel["shared_bytes"] <= kernel["shared_limit"]
    assert len(loop["inner_loops"]) == 1 and loop["inner_loops"][0]["instructions"] < 16  # the barrier's poll
    assert loop["atomics"] == 1  # one arrival per step


def test_h_is_read_back_all_in_flight(lstm768, monkeypatch):
    """The split tier's read-back of h_{t-1} (12 loads of 128 bits per thread at H = 768, B = 16)
    is issued before any of it is staged in shared memory, not a load, its store, the next load.
    With the in-flight budget at zero the masked loads come back, one or two at a time."""
    assert lstm768["kernels"]["forward"]["time_loop"]["exchange_loads_in_flight"] >= 8
    monkeypatch.setattr(config_mod, "in_flight_bytes", lambda block_b: 0)
    masked = inspect_layer("lstm", torch.bfloat16, 768, 16, pass_="forward", target="sm_90")
    assert masked["kernels"]["forward"]["time_loop"]["exchange_loads_in_flight"] <= 2


def test_exact_k_costs_no_padding(lstm768):
    """H = 768 multiplies 768 columns: 3/4 of H = 1024's wgmma with the same block."""
    lstm1024 = inspect_layer("lstm", torch.bfloat16, 1024, 16, pass_="forward", target="sm_90")
    assert lstm1024["config"]["block_h"] == lstm768["config"]["block_h"]
    wgmma = [r["kernels"]["forward"]["time_loop"]["mma"]["wgmma"] for r in (lstm768, lstm1024)]
    assert wgmma[0] * 4 == wgmma[1] * 3


def test_the_gru_runs_wgmma():
    """GRU bf16 H=1024 B=16: its three gates padded to four blocks of rows, so M is a power of two
    >= 64 and the product is wgmma; three transcendentals per element, once each (z on two MUFU)."""
    report = inspect_layer("gru", torch.bfloat16, 1024, 16, pass_="forward", target="sm_90")
    kernel = report["kernels"]["forward"]
    assert set(kernel["time_loop"]["mma"]) == {"wgmma"} and kernel["time_loop"]["shuffles"] == 0
    assert kernel["mufu_per_cell_element"] == 4 == kernel["mufu_the_math_takes"]
    assert kernel["spill_bytes"] == 0


def test_the_gru_computes_its_cell_once_where_h_is_read_back_masked():
    """GRU bf16 H=1024 B=64 (a 64-row tile: h read back masked, not in flight): the cell's values
    are stored in two layouts (y, the exchange buffer), and a b_hn loaded as a column let the
    compiler recompute the whole cell for the second one: 8 MUFU a cell element. Loaded as a tile
    it stops that recomputation: 4."""
    report = inspect_layer("gru", torch.bfloat16, 1024, 64, pass_="forward", target="sm_90")
    kernel = report["kernels"]["forward"]
    assert kernel["mufu_per_cell_element"] == 4 == kernel["mufu_the_math_takes"]
    assert kernel["spill_bytes"] == 0


def test_fp16_computes_every_transcendental_accurately():
    """fp16 rounds finer than tanh.approx's error: two MUFU (ex2, rcp) for each of the five."""
    kernel = inspect_layer("lstm", torch.float16, 64, 16, pass_="forward", target="sm_90")["kernels"]["forward"]
    assert kernel["math"] == "accurate" and kernel["mufu_per_cell_element"] == 10 == kernel["mufu_the_math_takes"]


@pytest.fixture(scope="module")
def lstm768_train():
    return inspect_layer("lstm", torch.bfloat16, 768, 16, pass_="train", target="sm_90")


def test_the_train_pass_runs_wgmma_in_both_kernels(lstm768_train):
    for name in ("forward", "backward"):
        kernel = lstm768_train["kernels"][name]
        assert set(kernel["time_loop"]["mma"]) == {"wgmma"}, name
        assert kernel["spill_bytes"] == 0, name
    assert lstm768_train["kernels"]["backward"]["mufu_per_cell_element"] == 1  # tanh(c), once
    # the next step's inputs (forward: xproj; backward: dy, activations, state) stay in flight
    # across the barrier wait
    for name in ("forward", "backward"):
        assert lstm768_train["kernels"][name]["time_loop"]["loads_ahead_read_early"] == 0, name


@triton.jit
def _load_as_tile(ptrs, mask, IN_PLACE: tl.constexpr):
    return tl.load(ptrs, mask=mask, other=0.0)


def test_the_next_xproj_stays_in_flight_across_the_wait(lstm768, monkeypatch):
    """The forward loads the next step's bf16 xproj before the barrier wait, one element per
    register, so nothing reads it before the wait. A plain tl.load of the tile loads pairs, which
    ptxas unpacks at once: the warp then waits for those loads before it reaches the barrier."""
    assert lstm768["config"]["split"] > 1
    assert lstm768["kernels"]["forward"]["time_loop"]["loads_ahead_read_early"] == 0
    monkeypatch.setattr(forward, "_load_in_place", _load_as_tile)
    monkeypatch.setattr(forward._rnn_forward_kernel, "hash", None)  # its cache key names its callees
    monkeypatch.setattr(aot, "_compiled", {})
    plain = inspect_layer("lstm", torch.bfloat16, 768, 16, pass_="forward", target="sm_90")
    assert plain["kernels"]["forward"]["time_loop"]["loads_ahead_read_early"] > 0


@triton.jit
def _store_through_layout(ptrs, values, INTERPRET: tl.constexpr):
    tl.store(ptrs, values)


def test_the_backward_partial_goes_from_the_accumulator_to_the_exchange(lstm768_train, monkeypatch):
    """The split backward's partial product W^T dgates^T is stored from the wgmma accumulator's
    registers: no shared-memory round trip (stmatrix, barriers, loads back) in the step. A plain
    tl.store of the tile in its place brings the round trip back."""
    loop = lstm768_train["kernels"]["backward"]["time_loop"]
    assert lstm768_train["config"]["split"] > 1
    assert loop["shared_loads"]["instructions"] == 0 and loop["bar_sync"] <= 8
    monkeypatch.setattr(backward, "_store_in_place", _store_through_layout)
    monkeypatch.setattr(backward._rnn_backward_kernel, "hash", None)  # its cache key names its callees
    monkeypatch.setattr(aot, "_compiled", {})
    plain = inspect_layer("lstm", torch.bfloat16, 768, 16, pass_="train", target="sm_90")
    loop = plain["kernels"]["backward"]["time_loop"]
    assert loop["shared_loads"]["instructions"] > 0 and loop["bar_sync"] > 8


def test_the_forward_publishes_h_from_its_registers(lstm768, monkeypatch):
    """The split forward stores its units' h_t to the exchange buffer from the registers the cell
    left it in: no shared-memory round trip (stores, barriers, loads back) before the arrival. A
    plain tl.store of the tile in its place brings the round trip back."""
    loop = lstm768["kernels"]["forward"]["time_loop"]
    monkeypatch.setattr(forward, "_store_in_place", _store_through_layout)
    for fn in (forward._rnn_forward_kernel, forward._publish):  # their cache keys name their callees
        monkeypatch.setattr(fn, "hash", None)
    monkeypatch.setattr(aot, "_compiled", {})
    plain = inspect_layer("lstm", torch.bfloat16, 768, 16, pass_="forward", target="sm_90")["kernels"]["forward"]
    assert plain["time_loop"]["shared_loads"]["instructions"] > loop["shared_loads"]["instructions"]
    assert plain["time_loop"]["bar_sync"] > loop["bar_sync"]


def test_the_last_chunk_of_h_is_staged_while_the_others_multiply(lstm768, monkeypatch):
    """LSTM bf16 H = 768, h read back in flight in three K-chunks: the last chunk is staged in
    shared memory after the MMA of the chunk before it, so its loads land while the first two
    multiply (its 4 stores of 128 bits come between MMAs). With the rule off, every chunk is staged
    before the first MMA."""
    assert lstm768["kernels"]["forward"]["time_loop"]["shared_stores_between_mmas"] > 0
    monkeypatch.setattr(forward, "last_chunk_late", lambda constexprs, x_in_place: False)
    monkeypatch.setattr(aot, "_compiled", {})
    plain = inspect_layer("lstm", torch.bfloat16, 768, 16, pass_="forward", target="sm_90")
    assert plain["kernels"]["forward"]["time_loop"]["shared_stores_between_mmas"] == 0


def test_one_warp_polls_the_barrier(lstm768, lstm768_train):
    """Every kernel's barrier is polled by one warp of a program; the other warps wait at the CTA
    barrier."""
    for report, names in ((lstm768, ("forward",)), (lstm768_train, ("forward", "backward"))):
        for name in names:
            assert report["kernels"][name]["time_loop"]["polled_by_one_warp"] is True, name


@pytest.mark.parametrize("guard, peeled", [(True, True), (True, False), (False, True), (False, False)])
def test_sass_reading_of_the_barrier_poll(guard, peeled):
    """The reader on hand-written listings: one warp polls when a branch on the thread index
    against 32 skips the poll loop and its first poll, peeled before the loop or not."""
    instructions = parse_sass("\n".join(f"        /*{a:04x}*/   {text} ;" for a, text in (
        (0x00, "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ"),
        (0x10, "REDG.E.ADD.STRONG.GPU desc[UR4][R116.64], R31"),
        (0x20, "S2R R28, SR_TID.X"),
        (0x30, "ISETP.GE.U32.AND P5, PT, R28, 0x20, PT" if guard else "NOP"),
        (0x40, "@P5 BRA 0xa0" if guard else "NOP"),
        (0x50, "LDG.E.STRONG.GPU R28, desc[UR4][R116.64]" if peeled else "NOP"),
        (0x60, "ISETP.LT.AND P4, PT, R28, R87, PT"),
        (0x70, "LDG.E.STRONG.GPU R28, desc[UR4][R116.64]"),
        (0x80, "VOTE.ANY P4, P4"),
        (0x90, "@P4 BRA 0x70"),
        (0xa0, "BAR.RED.AND.DEFER_BLOCKING 0x0, P4"),
        (0xb0, "@P5 BRA 0x0"),
    )))
    assert step_mix(instructions, (0x00, 0xb0))["polled_by_one_warp"] is guard


def test_batch_64_at_h1024_runs_bidirectional_in_both_passes():
    """B = 64, H = 1024, both directions: one batch tile of 64 rows, 64 programs per direction,
    128 of the H100's 132 SMs; every kernel on-chip."""
    for cell in ("lstm", "gru"):
        for pass_ in ("forward", "train"):
            report = inspect_layer(cell, torch.float16, 1024, 64, bidirectional=True, pass_=pass_, target="sm_90")
            assert report["config"]["grid"][0] * report["config"]["grid"][1] * 2 <= 132
            for name, kernel in report["kernels"].items():
                assert kernel["spill_bytes"] == 0 and kernel["shared_bytes"] <= kernel["shared_limit"], (cell, name)


def test_sass_reading():
    """The reader on a hand-written listing: the outermost loop holding MMA is the time loop, an
    inner loop is counted once, widths give bytes."""
    listing = "\n".join(f"        /*{a:04x}*/   {text} ;" for a, text in (
        (0x00, "MOV R1, c[0x0][0x28]"),
        (0x10, "LDG.E.128 R4, desc[UR4][R2.64]"),
        (0x20, "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ"),
        (0x30, "LDS.64 R8, [R3]"),
        (0x40, "LDG.E.STRONG.GPU R9, desc[UR4][R2.64]"),
        (0x50, "@P0 BRA 0x40"),
        (0x60, "STG.E.U16 desc[UR4][R2.64], R9"),
        (0x70, "@!P1 BRA 0x10"),
        (0x80, "EXIT"),
    ))
    instructions = parse_sass(listing)
    assert time_loop(instructions) == (0x10, 0x70)
    mix = step_mix(instructions, (0x10, 0x70))
    assert mix["instructions"] == 7 and mix["mma"] == {"wgmma": 1}
    assert mix["global_loads"] == {"instructions": 2, "bytes_per_warp": 32 * (16 + 4)}
    assert mix["shared_loads"] == {"instructions": 1, "bytes_per_warp": 32 * 8}
    assert mix["global_stores"]["bytes_per_warp"] == 32 * 2
    assert mix["inner_loops"] == [{"instructions": 2, "exchange_loads": 1}]  # the poll's load
    assert access_bytes(instructions[3]) == 8


def _step_listing(after_load, peeled=False):
    """A time step with the barrier: the MMA, the arrival, a load of the next step's input, `after_load`,
    the poll loop (with `peeled`, its first poll before it, read there, as ptxas rotates the loop), then
    the input's use."""
    return parse_sass("\n".join(f"        /*{a:04x}*/   {text} ;" for a, text in (
        (0x00, "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ"),
        (0x10, "REDG.E.ADD.STRONG.GPU desc[UR4][R116.64], R31"),
        (0x20, "@P5 LDG.E R96, desc[UR4][R24.64]"),
        (0x30, after_load),
        (0x38, "LDG.E.STRONG.GPU R25, desc[UR4][R116.64]" if peeled else "NOP"),
        (0x3c, "ISETP.LT.AND P4, PT, R25, R87, PT" if peeled else "NOP"),
        (0x40, "LDG.E.STRONG.GPU R25, desc[UR4][R116.64]"),
        (0x48, "VOTE.ANY P4, P4"),
        (0x50, "@P4 BRA 0x40"),
        (0x60, "FADD R23, R96, R36"),
        (0x70, "@P5 BRA 0x0"),
    )))


@pytest.mark.parametrize("peeled", [False, True])
@pytest.mark.parametrize("after_load, early", [
    ("PRMT R81, R96, 0x7610, R81", 1),    # unpacked where it is issued: the warp waits on it there
    ("MOV R80, R95", 0),                  # untouched until after the wait
    ("IADD3 R40, P0, R95.64, R8, RZ", 1),  # R95.64 names R95 and R96
])
def test_sass_reading_of_loads_ahead(after_load, early, peeled):
    """The reader counts the loads issued between the barrier's arrival and its poll loop whose
    registers are named before the poll loop ends; a first poll peeled before the loop is a poll,
    not a load ahead, nor an exchange read-back."""
    mix = step_mix(_step_listing(after_load, peeled), (0x00, 0x70))
    assert mix["loads_ahead_read_early"] == early
    assert mix["exchange_loads"] == 0


def test_sass_reading_of_a_read_back_left_as_a_loop():
    """An inner loop that holds an exchange load and does not vote (not the barrier's poll) is a
    read-back the compiler left as a loop, one round trip per trip: counted. The poll is not."""
    instructions = parse_sass("\n".join(f"        /*{a:04x}*/   {text} ;" for a, text in (
        (0x00, "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ"),
        (0x10, "REDG.E.ADD.STRONG.GPU desc[UR4][R116.64], R31"),
        (0x20, "LDG.E.STRONG.GPU R25, desc[UR4][R116.64]"),
        (0x30, "VOTE.ANY P3, P3"),
        (0x40, "@P3 BRA 0x20"),
        (0x50, "@!P5 LDG.E.128.STRONG.GPU R44, desc[UR4][R52.64]"),
        (0x60, "FADD R40, R44, R40"),
        (0x70, "@P1 BRA 0x50"),
        (0x80, "@P5 BRA 0x0"),
    )))
    mix = step_mix(instructions, (0x00, 0x80))
    assert mix["exchange_loops"] == 1 and mix["exchange_loads"] == 0


def test_each_kernel_reports_its_own_warps():
    """GRU bf16 H = 1024 B = 128, train (64-row batch tiles): the backward runs with other warps
    than the forward (KernelConfig.backward_warps); the report gives each kernel's own, which the
    cell-element count per thread and a latency model of the step rest on."""
    report = inspect_layer("gru", torch.bfloat16, 1024, 128, pass_="train", target="sm_90")
    config = report["config"]
    assert config["backward_warps"] not in (None, config["num_warps"])
    for name in ("forward", "backward"):
        warps = config["backward_warps"] if name == "backward" and config["backward_warps"] else config["num_warps"]
        kernel = report["kernels"][name]
        assert kernel["num_warps"] == warps, name
        assert kernel["cell_elements_per_thread"] == config["block_h"] * config["block_b"] / (32 * warps), name


@pytest.mark.xfail(strict=True, reason="at SPLIT = 64 with 128-bit partials per thread (batch tile 32, 4 backward "
                                       "warps) the compiler keeps the backward's reduce-scatter as a loop")
def test_the_backward_reduce_scatter_is_not_a_loop():
    """The backward sums its units' rows of every program's partial (SPLIT - 1 loads after its own):
    unrolled, those loads are in flight together; left as a loop, each trip waits an L2 round trip
    (63 a step at H = 1024 in programs of 16 units)."""
    report = inspect_layer("lstm", torch.float16, 1024, 64, pass_="train", target="sm_90")
    assert report["config"]["split"] == 64
    assert report["kernels"]["backward"]["time_loop"]["exchange_loops"] == 0
