"""Static capacity: the largest hidden size whose weights one program keeps on-chip, per target.

Single-program tier (BLOCK_H >= H): ahead-of-time compiles each power-of-two block with each
candidate warp count; a block is held when some warp count compiles on-chip (no spills, shared
memory within the target's limit). Split tier (SPLIT = H / BLOCK_H programs per batch tile):
for each power-of-two width BLOCK_R of the recurrent input, the largest BLOCK_H < BLOCK_R whose
kernels compile on-chip, and the grid must fit the target's SMs (one program per SM). Triton places the W_hh^T MMA operands in
shared memory, so a block whose weights alone exceed the target's shared memory is not tried
(those compiles also take ptxas minutes).

    python -m persistrnn.autotune.capacity [--target sm_90] [--write]

`--write` regenerates autotune/tables.py, the table the planner uses at run time.
"""
import argparse
import os
import pprint

import torch

from .aot import TARGETS, forward_resources

CELLS = ("lstm", "gru")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BLOCKS = (16, 32, 64, 128, 256)
SPLIT_BLOCK_R = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SPLIT_BLOCK_H = (64, 32, 16)  # largest first: fewer programs meet at each barrier
NUM_WARPS = (4, 8, 16)
BLOCK_B = 16
GATES = {"lstm": 4, "gru": 3}


def weight_bytes(cell, dtype, block_h, block_r, has_proj):
    elements = GATES[cell] * block_h * block_r + (block_h * block_r if has_proj else 0)
    return elements * torch.finfo(dtype).bits // 8


def _variants(cell, block_h):
    """(block_r, has_proj) of every kernel the planner may launch with this block_h."""
    variants = [(block_h, False)]
    if cell == "lstm":  # proj_size < hidden_size: block_r <= block_h
        variants += [(r, True) for r in BLOCKS if r <= block_h]
    return variants


def block_warps(cell, dtype, block_h, targets):
    """The smallest candidate warp count with which every variant of this block compiles on-chip
    on every target in `targets`, or None."""
    variants = _variants(cell, block_h)
    if any(weight_bytes(cell, dtype, block_h, r, p) > TARGETS[t]["smem"] for r, p in variants for t in targets):
        return None
    for num_warps in NUM_WARPS:
        if all(forward_resources(cell, dtype, p, BLOCK_B, block_h, r, num_warps, 1, t).on_chip
               for r, p in variants for t in targets):
            return num_warps
    return None


def single_program_blocks(cell, dtype, targets):
    """{block_h: num_warps} for every block the single-program tier holds on-chip on `targets`;
    stops at the first block that does not fit."""
    held = {}
    for block_h in BLOCKS:
        num_warps = block_warps(cell, dtype, block_h, targets)
        if num_warps is None:
            break
        held[block_h] = num_warps
    return held


def split_block(cell, dtype, block_r, targets):
    """(block_h, num_warps) of the split tier for a recurrent input of width block_r: the largest
    block_h < block_r with a warp count whose kernels (and the proj_size variant for the LSTM)
    compile on-chip on every target, or None."""
    for block_h in SPLIT_BLOCK_H:
        if block_h >= block_r:
            continue
        variants = [(block_r // block_h, False)] + ([(2, True)] if cell == "lstm" else [])
        if any(weight_bytes(cell, dtype, block_h, block_r, p) > TARGETS[t]["smem"] for _, p in variants
               for t in targets):
            continue
        for num_warps in NUM_WARPS:
            if all(forward_resources(cell, dtype, p, BLOCK_B, block_h, block_r, num_warps, 1, t, split=split).on_chip
                   for split, p in variants for t in targets):
                return block_h, num_warps
    return None


def split_blocks(cell, dtype, targets):
    """{block_r: (block_h, num_warps)} for every width the split tier holds on `targets`; stops at
    the first width that does not fit."""
    held = {}
    for block_r in SPLIT_BLOCK_R:
        found = split_block(cell, dtype, block_r, targets)
        if found is None:
            break
        held[block_r] = found
    return held


def capacity_table(target="sm_90"):
    """Rows of {cell, dtype, pass, target, max_hidden, config} for the forward pass: the largest
    hidden size either tier holds on-chip with a grid that fits the target (batch <= 16,
    unidirectional: one batch tile)."""
    rows = []
    sms = TARGETS[target]["sms"]
    for cell in CELLS:
        for dtype in DTYPES[:3]:  # fp64 is for reference runs, not a capacity question
            held = single_program_blocks(cell, dtype, (target,))
            best = None
            if held:
                block = max(held)
                best = (block, dict(tier="single", block_b=BLOCK_B, block_h=block, num_warps=held[block],
                                    num_stages=1, split=1), (False, block, block, held[block], 1))
            for block_r, (block_h, num_warps) in split_blocks(cell, dtype, (target,)).items():
                hidden = min(block_r, sms * block_h)
                if best is None or hidden > best[0]:
                    split = -(-hidden // block_h)
                    best = (hidden, dict(tier="split", block_b=BLOCK_B, block_h=block_h, num_warps=num_warps,
                                         num_stages=1, split=split), (False, block_h, block_r, num_warps, split))
            config = {}
            if best:
                config = best[1]
                has_proj, block_h, block_r, num_warps, split = best[2]
                res = forward_resources(cell, dtype, has_proj, BLOCK_B, block_h, block_r, num_warps, 1, target,
                                        split=split)
                config.update(regs=res.regs, spill_bytes=res.stack + res.local, shared_bytes=res.shared)
            rows.append(dict(cell=cell, dtype=str(dtype).replace("torch.", ""), **{"pass": "forward"},
                             target=target, max_hidden=best[0] if best else 0, config=config))
    return rows


def shipped_table():
    """What autotune/tables.py holds: configs that are on-chip on every target."""
    targets = tuple(TARGETS)
    keys = [(cell, dtype) for cell in CELLS for dtype in DTYPES]
    name = lambda dtype: str(dtype).replace("torch.", "")  # noqa: E731
    return ({(cell, name(dtype)): single_program_blocks(cell, dtype, targets) for cell, dtype in keys},
            {(cell, name(dtype)): split_blocks(cell, dtype, targets) for cell, dtype in keys})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate autotune/tables.py")
    args = parser.parse_args(argv)
    single, split = shipped_table()
    text = (f"SINGLE_PROGRAM = {pprint.pformat(single, width=100)}\n\n"
            f"SPLIT_PROGRAM = {pprint.pformat(split, width=100)}\n")
    if args.write:
        path = os.path.join(os.path.dirname(__file__), "tables.py")
        with open(path, "w") as f:
            f.write('"""Generated by `python -m persistrnn.autotune.capacity --write`: do not edit by hand.\n\n'
                    "SINGLE_PROGRAM[(cell, dtype)] = {block_h: num_warps}: the blocks one program holds on-chip\n"
                    "on both sm_80 and sm_90 (every block_r <= block_h too for the LSTM), with the warp count\n"
                    "that compiles without spills.\n"
                    "SPLIT_PROGRAM[(cell, dtype)] = {block_r: (block_h, num_warps)}: the split tier's block per\n"
                    'width of the recurrent input, on-chip on both targets. tests/test_aot.py re-checks both."""\n\n'
                    + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
