"""Ahead-of-time compile (no GPU needed): every config the planner can pick is on-chip on its
target (sm_80, sm_90), for inference (forward) and training (saving forward + backward), the
shipped tables are maximal, and the check itself detects spills."""
import pytest
import torch

from persistrnn.autotune.aot import PASSES, TARGETS, kernel_resources, prefetch
from persistrnn.autotune.capacity import (BLOCK_B, BLOCKS, NUM_WARPS, SPLIT_BLOCK_H, SPLIT_BLOCK_R, _split_variant,
                                          _variants, block_warps, capacity_table, single_keys, split_block,
                                          split_keys)
from persistrnn.autotune.tables import TABLES
from persistrnn.layers.dispatch import kernel_config, single_program_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
SINGLE = [(t, p, cell, dtype) for t in TABLES for p in PASSES for (cell, dtype) in sorted(TABLES[t][p]["single"])]
SPLIT = [(t, p, *key) for t in TABLES for p in PASSES for key in sorted(TABLES[t][p]["split"])]
# Passes whose tables are also checked to be maximal (the next size up does not fit). Those failing
# compiles are the slowest (ptxas on spilling code, every warp count): the train pass's would
# double CI's time, so its maximality rests on the search that wrote the tables (capacity.py).
MAXIMAL = ("forward",)


def test_tables_cover_both_targets_and_passes():
    assert set(TABLES) == set(TARGETS)
    assert all(set(TABLES[t]) == set(PASSES) for t in TABLES)


@pytest.fixture(scope="module", autouse=True)
def compile_everything_first():
    """Compile, on all cores, every config the tests below look at: the shipped ones and the
    candidates of the next size up (a compile takes seconds; the tests then read the cache)."""
    keys = []
    for target, pass_, cell, dtype in SINGLE:
        held = TABLES[target][pass_]["single"][(cell, dtype)]
        for block_h, num_warps in held.items():
            # with a maximal pass, also the warp counts its search (capacity_table) tried first
            warps = NUM_WARPS[:NUM_WARPS.index(num_warps) + 1] if pass_ in MAXIMAL else (num_warps,)
            keys += single_keys(cell, DTYPES[dtype], block_h, target, warps=warps, pass_=pass_)
        if pass_ in MAXIMAL:
            keys += single_keys(cell, DTYPES[dtype], BLOCKS[len(held)], target, pass_=pass_)
    for target, pass_, cell, dtype, proj in SPLIT:
        held = TABLES[target][pass_]["split"][(cell, dtype, proj)]
        for block_r, (block_h, num_warps) in held.items():
            if pass_ in MAXIMAL:  # the wider blocks and smaller warp counts its search tried first
                tried = SPLIT_BLOCK_H[:SPLIT_BLOCK_H.index(block_h)]
                keys += split_keys(cell, DTYPES[dtype], proj, block_r, target, block_hs=tried, pass_=pass_)
                warps = NUM_WARPS[:NUM_WARPS.index(num_warps) + 1]
            else:
                warps = (num_warps,)
            keys += split_keys(cell, DTYPES[dtype], proj, block_r, target, block_hs=(block_h,), warps=warps,
                               pass_=pass_)
        if len(held) < len(SPLIT_BLOCK_R) and pass_ in MAXIMAL:
            keys += split_keys(cell, DTYPES[dtype], proj, SPLIT_BLOCK_R[len(held)], target, pass_=pass_)
    prefetch(keys)


@pytest.mark.parametrize("target,pass_,cell,dtype", SINGLE)
def test_every_single_program_config_is_on_chip_and_the_next_block_is_not(target, pass_, cell, dtype):
    held = TABLES[target][pass_]["single"][(cell, dtype)]
    assert sorted(held) == list(BLOCKS[:len(held)]), "blocks must be contiguous from the smallest"
    for block_h, num_warps in held.items():
        for block_r, has_proj in _variants(cell, block_h):
            res = kernel_resources(cell, DTYPES[dtype], has_proj, BLOCK_B, block_h, block_r, num_warps, 1, target,
                                   pass_=pass_)
            assert res.on_chip, (target, pass_, cell, dtype, block_h, block_r, has_proj, num_warps, res)
            assert res.stack == 0 and res.local == 0 and res.shared <= TARGETS[target]["smem"]
    if pass_ in MAXIMAL:
        assert block_warps(cell, DTYPES[dtype], BLOCKS[len(held)], target, pass_) is None


@pytest.mark.parametrize("target,pass_,cell,dtype,proj", SPLIT)
def test_every_split_config_is_on_chip_and_the_next_width_is_not(target, pass_, cell, dtype, proj):
    held = TABLES[target][pass_]["split"][(cell, dtype, proj)]
    assert sorted(held) == list(SPLIT_BLOCK_R[:len(held)]), "widths must be contiguous from the smallest"
    for block_r, (block_h, num_warps) in held.items():
        split, _ = _split_variant(block_r, block_h, proj)
        res = kernel_resources(cell, DTYPES[dtype], proj, BLOCK_B, block_h, block_r, num_warps, 1, target,
                               split=split, pass_=pass_)
        assert res.on_chip, (target, pass_, cell, dtype, proj, block_r, block_h, num_warps, res)
    if len(held) < len(SPLIT_BLOCK_R) and pass_ in MAXIMAL:
        assert split_block(cell, DTYPES[dtype], proj, SPLIT_BLOCK_R[len(held)], target, pass_) is None


@pytest.mark.parametrize("pass_", PASSES)
def test_planner_picks_only_shipped_configs(pass_):
    for target in TABLES:
        for (cell, dtype), held in TABLES[target][pass_]["single"].items():
            for hidden in range(1, 2 * max(held) + 1):
                for proj in ([0] if cell == "gru" else [0, 1, hidden // 2, hidden - 1]):
                    if proj >= hidden:
                        continue
                    config = single_program_config(cell, DTYPES[dtype], hidden, proj, target, pass_)
                    if config is None:
                        assert hidden > max(held)
                        continue
                    assert config.num_warps == held[config.block_h]
                    assert config.block_h >= hidden and config.block_r >= (proj or hidden)
                    assert config.block_r <= config.block_h and config.block_b == BLOCK_B
        for (cell, dtype, proj), held in TABLES[target][pass_]["split"].items():
            for block_r, (block_h, num_warps) in held.items():
                sms = TARGETS[target]["sms"]
                hidden, proj_size = (min(4 * block_r, sms * block_h), block_r) if proj else (block_r, 0)
                config, why = kernel_config(cell, DTYPES[dtype], hidden, proj_size, batch=16, num_directions=1,
                                            sms=sms, target=target, pass_=pass_)
                if single_program_config(cell, DTYPES[dtype], hidden, proj_size, target, pass_) is not None:
                    continue
                assert why is None, why
                assert (config.block_h, config.block_r, config.num_warps) == (block_h, block_r, num_warps)


def test_the_check_sees_spills():
    """An LSTM fp32 block of 64 with 4 warps cannot hold its weights: the check must say so."""
    res = kernel_resources("lstm", torch.float32, False, BLOCK_B, 64, 64, 4, 1, "sm_90")
    assert res.stack > 0 and not res.on_chip


def test_the_train_pass_sees_the_backward_spill():
    """LSTM bf16 H=1024 in 64 slices of 16 with 4 warps: the forward fits, with backward it spills."""
    config = ("lstm", torch.bfloat16, False, BLOCK_B, 16, 1024, 4, 1, "sm_90", 64)
    assert kernel_resources(*config, pass_="forward").on_chip
    res = kernel_resources(*config, pass_="train")
    assert res.stack > 0 and not res.on_chip


@pytest.mark.parametrize("target", list(TARGETS))
def test_capacity_rows(target):
    """The report's rows (forward pass: its search is what the maximality checks above compiled)."""
    rows = capacity_table(target, passes=MAXIMAL, parallel=False)  # the compiles are in this process's cache
    assert {(r["pass"], r["cell"], r["dtype"]) for r in rows} == {
        (p, c, d) for p in MAXIMAL for c in ("lstm", "gru") for d in ("float16", "bfloat16", "float32")}
    for r in rows:
        assert r["target"] == target
        assert r["max_hidden"] >= max(TABLES[target][r["pass"]]["single"][(r["cell"], r["dtype"])], default=0)
        assert r["config"]["spill_bytes"] == 0 and r["config"]["shared_bytes"] <= TARGETS[target]["smem"]
        assert r["config"]["split"] * r["config"]["block_h"] >= r["max_hidden"]
        assert r["config"]["split"] <= TARGETS[target]["sms"]
