"""Static capacity: which kernel configs keep their weights on-chip, per GPU target.

Single-program tier (BLOCK_H >= H): each power-of-two block is compiled ahead of time with each
candidate warp count; a block is held when some warp count compiles on-chip (no spills, shared
memory within the target's limit) for every variant (for the LSTM: with proj_size too).
Split tier (SPLIT = H / BLOCK_H programs per batch tile): for each power-of-two width BLOCK_R of
the recurrent input (H, or proj_size), the largest BLOCK_H < BLOCK_R whose kernel compiles
on-chip; without and with proj_size apart, since W_hr and the partial sums cost registers.
Triton keeps the W_hh^T MMA operands in shared memory, so a block whose weights alone exceed the
target's shared memory is not tried (those compiles also take ptxas minutes).

    python -m persistrnn.autotune.capacity [--write]

`--write` regenerates autotune/tables.py, the tables the planner uses at run time. Every search
runs for two passes (aot.PASSES): "forward" (inference) and "train" (forward with SAVE and the
backward kernel, one config for both).
"""
import argparse
import concurrent.futures
import os
import pprint

import torch

from .aot import PASSES, TARGETS, kernel_resources

CELLS = ("lstm", "gru")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BLOCKS = (16, 32, 64, 128, 256)
SPLIT_BLOCK_R = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SPLIT_BLOCK_H = (64, 32, 16)  # largest first: fewer programs meet at each barrier
NUM_WARPS = (4, 8, 16)
BLOCK_B = 16
GATES = {"lstm": 4, "gru": 3}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def weight_bytes(cell, dtype, block_h, block_r, has_proj):
    elements = GATES[cell] * block_h * block_r + (block_h * block_r if has_proj else 0)
    return elements * torch.finfo(dtype).bits // 8


def _fits_smem(cell, dtype, block_h, block_r, has_proj, target):
    return weight_bytes(cell, dtype, block_h, block_r, has_proj) <= TARGETS[target]["smem"]


# --- single-program tier -------------------------------------------------------------------

def _variants(cell, block_h):
    """(block_r, has_proj) of every kernel the planner may launch with this block_h."""
    variants = [(block_h, False)]
    if cell == "lstm":  # proj_size < hidden_size: block_r <= block_h
        variants += [(r, True) for r in BLOCKS if r <= block_h]
    return variants


def single_keys(cell, dtype, block_h, target, warps=NUM_WARPS, pass_="forward"):
    """kernel_resources keys that block_warps may compile (for aot.prefetch)."""
    return [(cell, dtype, p, BLOCK_B, block_h, r, w, 1, target, 1, pass_) for r, p in _variants(cell, block_h)
            for w in warps if _fits_smem(cell, dtype, block_h, r, p, target)]


def block_warps(cell, dtype, block_h, target, pass_="forward"):
    """The smallest candidate warp count with which every variant of this block compiles
    on-chip on `target`, or None."""
    variants = _variants(cell, block_h)
    if not all(_fits_smem(cell, dtype, block_h, r, p, target) for r, p in variants):
        return None
    for num_warps in NUM_WARPS:
        if all(kernel_resources(cell, dtype, p, BLOCK_B, block_h, r, num_warps, 1, target, pass_=pass_).on_chip
               for r, p in variants):
            return num_warps
    return None


def single_program_blocks(cell, dtype, target, pass_="forward"):
    """{block_h: num_warps} for every block one program holds on-chip on `target`; stops at the
    first block that does not fit."""
    held = {}
    for block_h in BLOCKS:
        num_warps = block_warps(cell, dtype, block_h, target, pass_)
        if num_warps is None:
            break
        held[block_h] = num_warps
    return held


# --- split tier ----------------------------------------------------------------------------

def _split_variant(block_r, block_h, has_proj):
    # the layer this width is picked for: H = BLOCK_R without proj_size, H = 4 * proj_size with it
    return (4 * block_r // block_h if has_proj else block_r // block_h), has_proj


def split_keys(cell, dtype, has_proj, block_r, target, block_hs=SPLIT_BLOCK_H, warps=NUM_WARPS, pass_="forward"):
    """kernel_resources keys that split_block may compile (for aot.prefetch)."""
    return [(cell, dtype, has_proj, BLOCK_B, block_h, block_r, w, 1, target,
             _split_variant(block_r, block_h, has_proj)[0], pass_)
            for block_h in block_hs if block_h < block_r for w in warps
            if _fits_smem(cell, dtype, block_h, block_r, has_proj, target)]


def split_block(cell, dtype, has_proj, block_r, target, pass_="forward"):
    """(block_h, num_warps) of the split tier for a recurrent input of width block_r: the largest
    block_h < block_r with a warp count that compiles on-chip on `target`, or None."""
    for block_h in SPLIT_BLOCK_H:
        if block_h >= block_r or not _fits_smem(cell, dtype, block_h, block_r, has_proj, target):
            continue
        split, _ = _split_variant(block_r, block_h, has_proj)
        for num_warps in NUM_WARPS:
            if kernel_resources(cell, dtype, has_proj, BLOCK_B, block_h, block_r, num_warps, 1, target,
                                split=split, pass_=pass_).on_chip:
                return block_h, num_warps
    return None


def split_blocks(cell, dtype, has_proj, target, pass_="forward"):
    """{block_r: (block_h, num_warps)} for every width the split tier holds on `target`; stops at
    the first width that does not fit."""
    held = {}
    for block_r in SPLIT_BLOCK_R:
        found = split_block(cell, dtype, has_proj, block_r, target, pass_)
        if found is None:
            break
        held[block_r] = found
    return held


# --- reports and the shipped tables --------------------------------------------------------

def capacity_table(target="sm_90", passes=PASSES, parallel=True):
    """Rows of {cell, dtype, pass, target, max_hidden, config} per pass: the largest hidden size
    (no proj_size) either tier holds on-chip, with a grid of one batch tile of 16 rows and one
    direction that fits the target's SMs (one program per SM). parallel: one process per (pass,
    cell, dtype), each search being a chain of compiles; else in this process (and its cache)."""
    rows = []
    sms = TARGETS[target]["sms"]
    # fp64 is for reference runs, not a capacity question
    keys = [(cell, dtype, target, pass_) for pass_ in passes for cell in CELLS for dtype in DTYPES[:3]]
    if parallel:
        with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
            searches = list(pool.map(_search, keys))
    else:
        searches = [_search(key) for key in keys]
    for (cell, dtype, _, pass_), (held, split) in zip(keys, searches):
        best = (0, {})
        if held:
            block = max(held)
            best = (block, dict(tier="single", block_b=BLOCK_B, block_h=block, block_r=block,
                                num_warps=held[block], num_stages=1, split=1))
        for block_r, (block_h, num_warps) in split.get((cell, dtype_name(dtype), False), {}).items():
            hidden = min(block_r, sms * block_h)
            if hidden > best[0]:
                best = (hidden, dict(tier="split", block_b=BLOCK_B, block_h=block_h, block_r=block_r,
                                     num_warps=num_warps, num_stages=1, split=-(-hidden // block_h)))
        hidden, config = best
        if config:
            res = kernel_resources(cell, dtype, False, BLOCK_B, config["block_h"], config["block_r"],
                                   config["num_warps"], 1, target,
                                   split=1 if config["split"] == 1 else config["block_r"] // config["block_h"],
                                   pass_=pass_)
            config.update(regs=res.regs, spill_bytes=res.stack + res.local, shared_bytes=res.shared)
        rows.append({"cell": cell, "dtype": dtype_name(dtype), "pass": pass_, "target": target,
                     "max_hidden": hidden, "config": config})
    return rows


def _search(key, with_proj=False):
    """(single-program blocks, {(cell, dtype, has_proj): split widths}) of one (cell, dtype,
    target, pass); the split tier with proj_size too if with_proj (LSTM)."""
    cell, dtype, target, pass_ = key
    single = single_program_blocks(cell, dtype, target, pass_)
    if dtype == torch.float64:  # reference runs on small layers: no split tier
        return single, {}
    split = {(cell, dtype_name(dtype), proj): split_blocks(cell, dtype, proj, target, pass_)
             for proj in ((False, True) if cell == "lstm" and with_proj else (False,))}
    return single, split


def _shipped_entry(key):
    return _search(key, with_proj=True)


def shipped_tables():
    """What autotune/tables.py holds, per target and pass. One process per (cell, dtype, target,
    pass): each search is a chain of compiles."""
    keys = [(cell, dtype, target, pass_) for target in TARGETS for pass_ in PASSES for cell in CELLS
            for dtype in DTYPES]
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        entries = list(pool.map(_shipped_entry, keys))
    tables = {target: {pass_: {"single": {}, "split": {}} for pass_ in PASSES} for target in TARGETS}
    for (cell, dtype, target, pass_), (single, split) in zip(keys, entries):
        tables[target][pass_]["single"][(cell, dtype_name(dtype))] = single
        tables[target][pass_]["split"].update({k: v for k, v in split.items() if v})
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate autotune/tables.py")
    args = parser.parse_args(argv)
    text = f"TABLES = {pprint.pformat(shipped_tables(), width=110)}\n"
    if args.write:
        with open(os.path.join(os.path.dirname(__file__), "tables.py"), "w") as f:
            f.write('"""Generated by `python -m persistrnn.autotune.capacity --write`: do not edit by hand.\n\n'
                    "TABLES[target][pass]: pass 'forward' (inference) or 'train' (forward with SAVE + backward).\n"
                    "TABLES[target][pass]['single'][(cell, dtype)] = {block_h: num_warps}: the blocks one program\n"
                    "holds on-chip (every block_r <= block_h too, for the LSTM with proj_size), and the warp count.\n"
                    "TABLES[target][pass]['split'][(cell, dtype, has_proj)] = {block_r: (block_h, num_warps)}: the\n"
                    "split tier's block per width of the recurrent input. tests/test_aot.py re-checks them.\n"
                    '"""\n\n' + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
