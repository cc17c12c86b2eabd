"""Ahead-of-time compile (no GPU needed): every config the planner can pick is on-chip on sm_80 and
sm_90, the shipped table is maximal, and the check itself detects spills."""
import pytest
import torch

from persistrnn.autotune.aot import TARGETS, forward_resources
from persistrnn.autotune.capacity import BLOCK_B, BLOCKS, _variants, block_warps, capacity_table
from persistrnn.autotune.tables import SINGLE_PROGRAM
from persistrnn.layers.dispatch import single_program_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


@pytest.mark.parametrize("cell,dtype", sorted(SINGLE_PROGRAM))
def test_every_shipped_config_is_on_chip_and_the_next_block_is_not(cell, dtype):
    held = SINGLE_PROGRAM[(cell, dtype)]
    assert sorted(held) == list(BLOCKS[:len(held)]), "blocks must be contiguous from the smallest"
    for block_h, num_warps in held.items():
        for block_r, has_proj in _variants(cell, block_h):
            for target in TARGETS:
                res = forward_resources(cell, DTYPES[dtype], has_proj, BLOCK_B, block_h, block_r, num_warps, 1,
                                        target)
                assert res.on_chip, (cell, dtype, block_h, block_r, has_proj, num_warps, target, res)
                assert res.stack == 0 and res.local == 0 and res.shared <= TARGETS[target]["smem"]
    next_block = BLOCKS[len(held)]
    assert block_warps(cell, DTYPES[dtype], next_block, tuple(TARGETS)) is None


def test_planner_picks_only_shipped_configs():
    for (cell, dtype), held in SINGLE_PROGRAM.items():
        for hidden in range(1, 2 * max(held) + 1):
            for proj in ([0] if cell == "gru" else [0, 1, hidden // 2, hidden - 1]):
                if proj >= hidden:
                    continue
                config = single_program_config(cell, DTYPES[dtype], hidden, proj)
                if config is None:
                    assert hidden > max(held)
                    continue
                assert config.num_warps == held[config.block_h]
                assert config.block_h >= hidden and config.block_r >= (proj or hidden)
                assert config.block_r <= config.block_h and config.block_b == BLOCK_B


def test_the_check_sees_spills():
    """An LSTM fp16 block of 128 with 4 warps cannot hold its weights: the check must say so."""
    res = forward_resources("lstm", torch.float16, False, BLOCK_B, 128, 128, 4, 1, "sm_90")
    assert res.stack > 0 and not res.on_chip


def test_capacity_json_rows():
    rows = capacity_table("sm_90")
    assert {(r["cell"], r["dtype"]) for r in rows} == {(c, d) for c in ("lstm", "gru")
                                                        for d in ("float16", "bfloat16", "float32")}
    for r in rows:
        assert r["pass"] == "forward" and r["target"] == "sm_90"
        assert r["max_hidden"] >= max(SINGLE_PROGRAM[(r["cell"], r["dtype"])])
        assert r["config"]["spill_bytes"] == 0 and r["config"]["shared_bytes"] <= TARGETS["sm_90"]["smem"]
