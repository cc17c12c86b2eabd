"""Ahead-of-time compile (no GPU needed): the shipped tables hold what they claim on their target
(sm_80, sm_90), for inference (forward) and training (saving forward + backward): every single-
program block, and every split config at the widest width of each run of widths it holds (the
tightest of the run: a narrower width multiplies fewer K-chunks; the search that wrote the table
compiled them all), with no spills and shared memory within the limit. For the forward pass the
tables are also maximal: the next block up does not fit, nor does any width the search tried
and left out (ptxas is not monotonic in the width). The check itself detects spills."""
import pytest
import torch

from persistrnn.autotune.aot import PASSES, TARGETS, kernel_resources, prefetch
from persistrnn.autotune.capacity import (BATCH_TILES, BLOCK_B, BLOCKS, NUM_WARPS, SMALL_BLOCK_H, WIDTHS, _variants,
                                          block_warps, capacity_table, searched_widths, single_keys,
                                          small_block_widths, split_keys, split_programs, split_shapes,
                                          split_width_warps, table_config)
from persistrnn.autotune.tables import TABLES
from persistrnn.kernels.skeleton import KernelConfig
from persistrnn.layers.dispatch import kernel_config, launch_waves, single_program_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
SINGLE = [(t, p, cell, dtype) for t in TABLES for p in PASSES for (cell, dtype) in sorted(TABLES[t][p]["single"])]
SPLIT = [(t, p, *key) for t in TABLES for p in PASSES for key in sorted(TABLES[t][p]["split"])]
# Passes whose tables are also checked to be maximal. Those failing compiles are the slowest
# (ptxas on spilling code): the train pass's maximality rests on the search that wrote the tables.
MAXIMAL = ("forward",)


def split_checks(held, dtype, proj, target):
    """Per (batch tile, BLOCK_H) of a split table entry: the widest width of each run of held widths
    with its warps, and the widths to show do not fit (every other width the search tried)."""
    checks = {}
    for block_b in BATCH_TILES:
        for block_h in split_shapes(block_b) + (SMALL_BLOCK_H,):
            widths = (searched_widths(DTYPES[dtype], block_h, proj, target) if block_h != SMALL_BLOCK_H else
                      small_block_widths(DTYPES[dtype], proj, target, held, block_b))
            held_at = [w for w in widths if block_h in held.get(w, {}).get(block_b, {})]
            if not held_at:
                continue
            ends = {w: held[w][block_b][block_h] for i, w in enumerate(widths) if w in held_at and
                    (i + 1 == len(widths) or widths[i + 1] not in held_at)}
            checks[(block_b, block_h)] = ends, [w for w in widths if w not in held_at]
    return checks


def test_tables_cover_both_targets_and_passes():
    assert set(TABLES) == set(TARGETS)
    assert all(set(TABLES[t]) == set(PASSES) for t in TABLES)


@pytest.fixture(scope="module", autouse=True)
def compile_everything_first():
    """Compile, on all cores, every config the tests below look at: the shipped ones and the
    candidates of the next size up (a compile takes a second; the tests then read the cache)."""
    keys = []
    for target, pass_, cell, dtype in SINGLE:
        held = TABLES[target][pass_]["single"][(cell, dtype)]
        for block_h, warps in held.items():
            config = table_config(BLOCK_B, block_h, warps)
            keys += [(cell, DTYPES[dtype], p, config, r, target, 1, pass_) for r, p in _variants(cell, block_h)]
        if pass_ in MAXIMAL and len(held) < len(BLOCKS):
            keys += single_keys(cell, DTYPES[dtype], BLOCKS[len(held)], target, pass_=pass_)
    for target, pass_, cell, dtype, proj in SPLIT:
        held = TABLES[target][pass_]["split"][(cell, dtype, proj)]
        for (block_b, block_h), (ends, misses) in split_checks(held, dtype, proj, target).items():
            for width, warps in ends.items():
                keys.append((cell, DTYPES[dtype], proj, table_config(block_b, block_h, warps), width, target,
                             split_programs(width, block_h, proj), pass_))
            if pass_ in MAXIMAL:
                for width in misses:
                    for w in NUM_WARPS:
                        keys += split_keys(cell, DTYPES[dtype], proj, KernelConfig(block_b, block_h, w), width,
                                           target, pass_)
    prefetch(keys)


@pytest.mark.parametrize("target,pass_,cell,dtype", SINGLE)
def test_every_single_program_config_is_on_chip_and_the_next_block_is_not(target, pass_, cell, dtype):
    held = TABLES[target][pass_]["single"][(cell, dtype)]
    assert sorted(held) == list(BLOCKS[:len(held)]), "blocks must be contiguous from the smallest"
    for block_h, warps in held.items():
        assert isinstance(warps, tuple) == (pass_ == "train")
        config = table_config(BLOCK_B, block_h, warps)
        for width, has_proj in _variants(cell, block_h):
            res = kernel_resources(cell, DTYPES[dtype], has_proj, config, width, target, 1, pass_)
            assert res.on_chip, (target, pass_, cell, dtype, block_h, width, has_proj, config, res)
            assert res.stack == 0 and res.local == 0 and res.shared <= TARGETS[target]["smem"]
    if pass_ in MAXIMAL and len(held) < len(BLOCKS):
        assert block_warps(cell, DTYPES[dtype], BLOCKS[len(held)], target, pass_) is None


@pytest.mark.parametrize("target,pass_,cell,dtype,proj", SPLIT)
def test_every_split_config_is_on_chip_and_the_missing_widths_are_not(target, pass_, cell, dtype, proj):
    held = TABLES[target][pass_]["split"][(cell, dtype, proj)]
    assert list(held) == sorted(held) and set(held) <= set(WIDTHS)
    checks = split_checks(held, dtype, proj, target)
    assert {(b, h) for tiles in held.values() for b, blocks in tiles.items() for h in blocks} == set(checks)
    for (block_b, block_h), (ends, misses) in checks.items():
        for width, warps in ends.items():
            assert isinstance(warps, tuple) == (pass_ == "train")
            config = table_config(block_b, block_h, warps)
            res = kernel_resources(cell, DTYPES[dtype], proj, config, width, target,
                                   split_programs(width, block_h, proj), pass_)
            assert res.on_chip, (target, pass_, cell, dtype, proj, width, config, res)
        if pass_ in MAXIMAL:
            for width in misses:
                assert split_width_warps(cell, DTYPES[dtype], proj, block_b, block_h, width, target, pass_) is None, \
                    (block_b, block_h, width)


@pytest.mark.parametrize("pass_", PASSES)
def test_planner_picks_only_shipped_configs(pass_):
    for target in TABLES:
        sms = TARGETS[target]["sms"]
        for (cell, dtype), held in TABLES[target][pass_]["single"].items():
            for hidden in range(1, 2 * max(held) + 1):
                config = single_program_config(cell, DTYPES[dtype], hidden, target, pass_)
                if config is None:
                    assert hidden > max(held)
                    continue
                assert config == table_config(BLOCK_B, config.block_h, held[config.block_h])
                assert config.block_h >= hidden
        for (cell, dtype, proj), held in TABLES[target][pass_]["split"].items():
            for width, tiles in held.items():
                hidden, proj_size = (4 * width, width) if proj else (width, 0)
                for batch in (1, 16, 64, 256):
                    config, why = kernel_config(cell, DTYPES[dtype], hidden, proj_size, batch=batch,
                                                num_directions=1, sms=sms, target=target, pass_=pass_)
                    if config is None or config.block_h >= hidden:
                        continue
                    assert config == table_config(config.block_b, config.block_h,
                                                  tiles[config.block_b][config.block_h])
                    split = -(-hidden // config.block_h)
                    waves = launch_waves(config, batch, hidden, 1, sms)
                    assert sum(tiles for _, tiles, _, _ in waves) == -(-batch // config.block_b)
                    assert all(tiles * split * dirs <= sms for _, tiles, _, dirs in waves)


def test_the_check_sees_spills():
    """A 64-row tile of an LSTM bf16 H=1024 with 8 warps keeps two values across the time loop on
    the stack: the check must say so."""
    res = kernel_resources("lstm", torch.bfloat16, False, KernelConfig(64, 16, 8), 1024, "sm_90", 64)
    assert res.stack > 0 and not res.on_chip


def test_the_train_pass_sees_the_backward_spill():
    """The same layer with 4 warps: the forward fits, the backward spills; 8 warps hold the backward.
    So its train config runs the two kernels with different warp counts."""
    config = KernelConfig(64, 16, 4)
    assert kernel_resources("lstm", torch.bfloat16, False, config, 1024, "sm_90", 64, "forward_save").on_chip
    res = kernel_resources("lstm", torch.bfloat16, False, config, 1024, "sm_90", 64, "train")
    assert res.stack > 0 and not res.on_chip
    both = KernelConfig(64, 16, 4, backward_warps=8)
    assert kernel_resources("lstm", torch.bfloat16, False, both, 1024, "sm_90", 64, "train").on_chip


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_reverse_direction_alone_compiles_as_the_tables_say(cell):
    """A bidirectional fp32 layer at H = 1024 (128 programs of 8 units per direction) runs one
    direction per launch on 132 SMs, the reverse one as its own compile (DIR0 = 1): it holds the
    table's config like the DIR0 = 0 compile the tables were searched with."""
    from persistrnn.autotune.aot import compile_kernel, resources_of
    config, _ = kernel_config(cell, torch.float32, 1024, 0, 16, 2, TARGETS["sm_90"]["sms"], "sm_90", "train")
    assert config.block_h == 8 and len(launch_waves(config, 16, 1024, 2, TARGETS["sm_90"]["sms"])) == 2
    for kernel in ("forward_save", "backward"):
        for dir0 in (0, 1):
            compiled = compile_kernel(kernel, cell, torch.float32, False, config, (1024, 1024, 16, 2), "sm_90",
                                      allow_tf32=True, dir0=dir0)
            assert resources_of(compiled, "sm_90").on_chip, (kernel, dir0)


@pytest.mark.parametrize("target", list(TARGETS))
def test_capacity_rows(target):
    rows = capacity_table(target)
    assert {(r["pass"], r["cell"], r["dtype"]) for r in rows} == {
        (p, c, d) for p in PASSES for c in ("lstm", "gru") for d in ("float16", "bfloat16", "float32")}
    for r in rows:
        assert r["target"] == target
        assert r["max_hidden"] >= max(TABLES[target][r["pass"]]["single"][(r["cell"], r["dtype"])], default=0)
        assert r["config"]["spill_bytes"] == 0 and r["config"]["shared_bytes"] <= TARGETS[target]["smem"]
        assert r["config"]["split"] * r["config"]["block_h"] >= r["max_hidden"]
        assert r["config"]["split"] <= TARGETS[target]["sms"]
