"""Static capacity: which kernel configs keep their weights on-chip, per GPU target.

A config is held when its kernels compile ahead of time with no spills and shared memory within
the target's limit (aot.py), for a pass: "forward" (inference) or "train" (the saving forward and
the backward kernel, one config for both).

Single-program tier (BLOCK_H >= H, one batch tile of BLOCK_B = 16 rows): each power-of-two block
with the candidate warp counts; a block is held when some warp count compiles on-chip for every
variant (for the LSTM: with every proj_size up to the block too).
Split tier (SPLIT = cdiv(H, BLOCK_H) programs per batch tile): for each batch tile (16, 32, 64 rows)
and BLOCK_H, the widths of the recurrent input (hidden or proj size) it holds, among all WIDTHS
whose weights fit in shared memory. The kernels multiply exactly R columns (K-chunks,
kernels/config.py), so a width is held as compiled: the planner picks the smallest table width >= R.
Batch tiles of 32 and 64 rows are searched with BLOCK_H = 16 only: they exist for batches whose
tiles of 16 would not all be resident at once, where the smallest BLOCK_H is what fits.

    python -m persistrnn.autotune.capacity [--write] [--dtypes ...] [--passes ...] [--scope ...]

`--write` regenerates autotune/configs/static/<target>.json, the static tables the planner reads
(configs.py; all of it takes about two and a half hours on 2 cores). float16 is searched on its
own: its register use differs from bfloat16's (the GRU's train pass at width 512 spills in float16
only). After a kernel change, search again only what it compiles differently and keep the rest:
`--dtypes`, `--passes`, and `--scope split` (the split tier) or `--scope in-flight` (the split
configs that read h back in flight); the file then records the command that made what it kept,
then this one.
"""
import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys

import torch
import triton

from ..configs import (BLOCK_B, CELLS, DTYPES, KERNELS, PASSES, SMALL_BLOCK_H, STATIC_DIR, TARGETS, dtype_name,
                       kernel_config, launch_waves, static_tables, tables_to_json)
from ..kernels.config import KernelConfig, kernel_constexprs
from .aot import kernel_resources
from .sass import bundled_tool

BLOCKS = (16, 32, 64, 128, 256)  # single-program BLOCK_H
WIDTHS = (32, 64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 2048)  # split tier: recurrent input widths
SPLIT_BLOCK_H = (16, 32, 64, 128)
BATCH_TILES = (16, 32, 64)  # split tier: BLOCK_B
NUM_WARPS = (4, 8)


def warp_order(block_h):
    """Warp counts to try, best first: a W tile of 128 rows and more gives each of 8 warps (two
    warpgroups) its own 64 rows of the MMA; 64 rows are one warpgroup's."""
    return (8, 4) if 4 * block_h >= 128 else (4, 8)


def weight_bytes(dtype, block_h, width, has_proj):
    """Shared memory for a program's weights: its W_hh tile (4 gate blocks, the GRU's fourth zero)
    and, with proj_size, its W_hr columns."""
    elements = 4 * block_h * width + (block_h * width if has_proj else 0)
    return elements * torch.finfo(dtype).bits // 8


def _fits_smem(dtype, block_h, width, has_proj, target):
    return weight_bytes(dtype, block_h, width, has_proj) <= TARGETS[target]["smem"]


def held_warps(fits, block_h, pass_):
    """What a table holds for a (block_b, block_h): the first warp count (warp_order) for which
    fits(num_warps, kernels) is true; for the train pass the saving forward's and the backward's
    apart, as a pair. None if none fits."""
    def first(kernels):
        return next((w for w in warp_order(block_h) if fits(w, kernels)), None)
    if pass_ == "forward":
        return first("forward")
    forward, backward = first("forward_save"), first("backward")
    return (forward, backward) if forward and backward else None


# --- single-program tier -------------------------------------------------------------------

def _variants(cell, block_h):
    """(width, has_proj) of every kernel the planner may launch with this block_h."""
    variants = [(block_h, False)]
    if cell == "lstm":  # proj_size < hidden_size: width <= block_h
        variants += [(r, True) for r in BLOCKS if r <= block_h]
    return variants


def single_keys(cell, dtype, block_h, target, warps=NUM_WARPS, pass_="forward"):
    """kernel_resources keys that block_warps may compile (for aot.prefetch)."""
    return [(cell, dtype, p, KernelConfig(BLOCK_B, block_h, w), r, target, 1, k)
            for r, p in _variants(cell, block_h) for w in warps for k in KERNELS[pass_]
            if _fits_smem(dtype, block_h, r, p, target)]


def block_warps(cell, dtype, block_h, target, pass_="forward"):
    """What the single tier's table holds for this block (held_warps): every variant of the block
    compiles on-chip on `target` with it. None if none does."""
    variants = _variants(cell, block_h)
    if not all(_fits_smem(dtype, block_h, r, p, target) for r, p in variants):
        return None

    def fits(num_warps, kernels):
        return all(kernel_resources(cell, dtype, p, KernelConfig(BLOCK_B, block_h, num_warps), r, target,
                                    pass_=kernels).on_chip for r, p in variants)
    return held_warps(fits, block_h, pass_)


def single_program_blocks(cell, dtype, target, pass_="forward"):
    """{block_h: warps} for every block one program holds on-chip on `target`; stops at the
    first block that does not fit."""
    held = {}
    for block_h in BLOCKS:
        warps = block_warps(cell, dtype, block_h, target, pass_)
        if warps is None:
            break
        held[block_h] = warps
    return held


# --- split tier ----------------------------------------------------------------------------

def split_programs(width, block_h, has_proj):
    """SPLIT of the layer a width is compiled for: H = width without proj_size, H = 4 * proj_size with it."""
    return triton.cdiv(4 * width if has_proj else width, block_h)


def split_shapes(block_b):
    """The BLOCK_H searched with a batch tile (see the module doc)."""
    return SPLIT_BLOCK_H if block_b == BLOCK_B else SPLIT_BLOCK_H[:1]


def split_keys(cell, dtype, has_proj, config, width, target, pass_):
    """kernel_resources keys of one split config (for aot.prefetch): one per kernel of the pass."""
    return [(cell, dtype, has_proj, config, width, target, split_programs(width, config.block_h, has_proj), k)
            for k in KERNELS[pass_]]


def split_width_warps(cell, dtype, has_proj, block_b, block_h, width, target, pass_="forward"):
    """What the split tier's table holds for this config at a recurrent input of `width`
    (held_warps), or None."""
    if block_h >= (4 * width if has_proj else width) or not _fits_smem(dtype, block_h, width, has_proj, target):
        return None
    split = split_programs(width, block_h, has_proj)

    def fits(num_warps, kernels):
        return kernel_resources(cell, dtype, has_proj, KernelConfig(block_b, block_h, num_warps), width, target,
                                split, kernels).on_chip
    return held_warps(fits, block_h, pass_)


def searched_widths(dtype, block_h, has_proj, target):
    """The widths split_blocks tries with a BLOCK_H: every one it splits (BLOCK_H < the layer's
    hidden size) whose weights fit in shared memory. All of them, not up to the first that fails:
    ptxas is not monotonic in the width (a GRU fp16 64-row tile fails at 512 and 768, fits at 1024)."""
    return [w for w in WIDTHS if block_h < (4 * w if has_proj else w) and _fits_smem(dtype, block_h, w, has_proj, target)]


def reads_in_flight(cell, dtype, has_proj, block_b, block_h, width):
    """Whether a split config's kernels read h back all in flight (kernel_constexprs' H_IN_FLIGHT,
    which also widens the K-chunks) at some warp count: the entries `--scope in-flight` searches again."""
    split = split_programs(width, block_h, has_proj)
    return any(kernel_constexprs(cell, dtype, has_proj, split, KernelConfig(block_b, block_h, w), width,
                                 interpret=False, allow_tf32=tf32)["H_IN_FLIGHT"]
               for w in NUM_WARPS for tf32 in (True, False))


def small_block_widths(dtype, has_proj, target, held, block_b):
    """The widths searched with BLOCK_H = SMALL_BLOCK_H (8) and a batch tile, given what the other
    blocks hold: fp32 without proj_size only, and only widths that no 16-unit block holds with
    that tile (elsewhere the planner prefers 16 and more)."""
    if dtype != torch.float32 or has_proj:
        return []
    return [w for w in searched_widths(dtype, SMALL_BLOCK_H, has_proj, target)
            if 16 not in held.get(w, {}).get(block_b, {})]


def split_blocks(cell, dtype, has_proj, target, pass_="forward", kept=None):
    """{width: {block_b: {block_h: warps}}} for every (batch tile, BLOCK_H) the split tier holds on
    `target`, at every searched width. With `kept` (the current table's entry), only the configs
    that read h back in flight are compiled; the others keep kept's value."""
    def search(block_b, block_h, width):
        if kept is not None and not reads_in_flight(cell, dtype, has_proj, block_b, block_h, width):
            return kept.get(width, {}).get(block_b, {}).get(block_h)
        return split_width_warps(cell, dtype, has_proj, block_b, block_h, width, target, pass_)
    held = {}
    for block_b in BATCH_TILES:
        for block_h in split_shapes(block_b):
            for width in searched_widths(dtype, block_h, has_proj, target):
                warps = search(block_b, block_h, width)
                if warps is not None:
                    held.setdefault(width, {}).setdefault(block_b, {})[block_h] = warps
    for block_b in BATCH_TILES:
        for width in small_block_widths(dtype, has_proj, target, held, block_b):
            warps = search(block_b, SMALL_BLOCK_H, width)
            if warps is not None:
                held.setdefault(width, {}).setdefault(block_b, {})[SMALL_BLOCK_H] = warps
    return {w: held[w] for w in sorted(held)}


# --- reports and the shipped tables --------------------------------------------------------

SCOPES = ("all", "split", "in-flight")  # what a search covers; outside it the current tables are kept


def _search(key):
    """(single-program blocks, {(cell, dtype, has_proj): split blocks}) of one (cell, dtype,
    target, pass); the LSTM's split tier with proj_size too. `scope` (SCOPES): everything; the
    split tier, the single tier kept from `kept` (that target and pass's current tables); or
    only the split configs that read h back in flight (split_blocks)."""
    cell, dtype, target, pass_, kept, scope = key
    name = dtype_name(dtype)
    single = (single_program_blocks(cell, dtype, target, pass_) if scope == "all"
              else kept["single"].get((cell, name), {}))
    if dtype == torch.float64:  # reference runs on small layers: no split tier
        return single, {}
    split = {(cell, name, proj): split_blocks(cell, dtype, proj, target, pass_,
                                              kept["split"].get((cell, name, proj), {}) if scope == "in-flight"
                                              else None)
             for proj in ((False, True) if cell == "lstm" else (False,))}
    return single, split


def shipped_tables(workers=None, dtypes=DTYPES, passes=PASSES, keep=None, scope="all"):
    """What the static tables hold (autotune/configs/static), per target and pass. One process per
    (cell, dtype, target, pass): each search is a chain of compiles. With `keep` (the current
    tables), only `dtypes` and `passes` are searched again, within `scope` (SCOPES), and every
    other entry is kept: a kernel change that only some configs compile differently needs no more."""
    keys = [(cell, dtype, target, pass_, keep and keep[target][pass_], scope)
            for target in TARGETS for pass_ in passes for cell in CELLS for dtype in dtypes]
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        entries = list(pool.map(_search, keys))
    tables = {target: {pass_: {"single": {}, "split": {}} for pass_ in PASSES} for target in TARGETS}
    searched = {(target, pass_, cell, dtype_name(dtype)) for cell, dtype, target, pass_, _, _ in keys}
    for target in (keep or {}):
        for pass_ in PASSES:
            for tier in ("single", "split"):
                tables[target][pass_][tier].update({k: v for k, v in keep[target][pass_][tier].items()
                                                    if (target, pass_, k[0], k[1]) not in searched})
    for (cell, dtype, target, pass_, _, _), (single, split) in zip(keys, entries):
        tables[target][pass_]["single"][(cell, dtype_name(dtype))] = single
        tables[target][pass_]["split"].update({k: v for k, v in split.items() if v})
    return tables


def capacity_table(target="sm_90", passes=PASSES, tables=None):
    """Rows of {cell, dtype, pass, target, max_hidden, config} per pass and 16-bit/fp32 dtype: the
    largest hidden size (no proj_size) the shipped tables hold for a batch of 16 rows and one
    direction within the target's SMs (in a batch tile of 16 rows or more), with the planner's
    config for it and what that config compiles to (registers, spill bytes, shared bytes)."""
    tables = tables or {target: static_tables(target)}
    rows = []
    sms = TARGETS[target]["sms"]
    for pass_ in passes:
        table = tables[target][pass_]
        for cell in CELLS:
            for dtype in DTYPES[:3]:
                single = table["single"].get((cell, dtype_name(dtype)), {})
                hidden = max(single, default=0)
                for width, tiles in table["split"].get((cell, dtype_name(dtype), False), {}).items():
                    if any(triton.cdiv(width, block_h) <= sms for blocks in tiles.values() for block_h in blocks):
                        hidden = max(hidden, width)
                config, _ = kernel_config(cell, dtype, hidden, 0, BLOCK_B, 1, sms, target, pass_, tables=tables) \
                    if hidden else (None, None)
                row = {"cell": cell, "dtype": dtype_name(dtype), "pass": pass_, "target": target,
                       "max_hidden": hidden, "config": {}}
                if config is not None:
                    split = triton.cdiv(hidden, config.block_h)
                    width = hidden if split > 1 else config.block_h
                    res = kernel_resources(cell, dtype, False, config, width, target, split, pass_)
                    row["config"] = dict(tier="split" if split > 1 else "single", block_b=config.block_b,
                                         block_h=config.block_h, num_warps=config.num_warps,
                                         backward_warps=config.backward_warps, num_stages=config.num_stages,
                                         split=split, regs=res.regs,
                                         spill_bytes=res.stack + res.local, shared_bytes=res.shared)
                rows.append(row)
    return rows


# the grid of `persistrnn capacity --coverage`: the layers people commonly run
COVERAGE = dict(cells=CELLS, dtypes=DTYPES[:3], hidden=(64, 128, 256, 512, 768, 1024),
                batch=(1, 8, 16, 32, 64, 128, 256), directions=(1, 2), passes=PASSES)


def coverage(target="sm_90", tables=None):
    """Which layers of the COVERAGE grid the planner runs on the kernels on `target` (static
    tables, the target's SMs), and in how many launches (configs.launch_waves: one unless the
    grid is larger than the SMs): {"rows": [{dtype, pass, H: fraction, ...}], "total": fraction,
    "layers": n, "kernel": n, "several_launches": n, "by_layer": [{..., "kernel", "launches"}]}."""
    sms = TARGETS[target]["sms"]
    by_layer = []
    for dtype in COVERAGE["dtypes"]:
        for pass_ in COVERAGE["passes"]:
            for hidden in COVERAGE["hidden"]:
                for cell in COVERAGE["cells"]:
                    for batch in COVERAGE["batch"]:
                        for directions in COVERAGE["directions"]:
                            config, _ = kernel_config(cell, dtype, hidden, 0, batch, directions, sms, target, pass_,
                                                      tables=tables)
                            launches = len(launch_waves(config, batch, hidden, directions, sms)) if config else 0
                            by_layer.append(dict(cell=cell, dtype=dtype_name(dtype), pass_=pass_, hidden=hidden,
                                                 batch=batch, directions=directions, kernel=config is not None,
                                                 launches=launches))
    rows = []
    for dtype in COVERAGE["dtypes"]:
        for pass_ in COVERAGE["passes"]:
            row = {"dtype": dtype_name(dtype), "pass": pass_}
            for hidden in COVERAGE["hidden"]:
                sel = [x["kernel"] for x in by_layer
                       if (x["dtype"], x["pass_"], x["hidden"]) == (dtype_name(dtype), pass_, hidden)]
                row[str(hidden)] = round(sum(sel) / len(sel), 3)
            rows.append(row)
    ran = sum(x["kernel"] for x in by_layer)
    return {"target": target, "rows": rows, "layers": len(by_layer), "kernel": ran,
            "several_launches": sum(x["launches"] > 1 for x in by_layer),
            "total": round(ran / len(by_layer), 3), "by_layer": by_layer}


def ptxas_version():
    """The version line of the ptxas bundled with triton, which the tables were compiled with."""
    out = subprocess.run([bundled_tool("ptxas"), "--version"], capture_output=True, text=True, check=True).stdout
    return re.findall(r"release [^\n]*", out)[-1]


def write_tables(tables, command, directory=STATIC_DIR):
    """Write each target's tables to `directory`/<target>.json, with the triton and ptxas versions and
    the command that made them. Returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for target, passes in tables.items():
        record = dict(target=target, command=command, triton=triton.__version__, ptxas=ptxas_version())
        path = os.path.join(directory, f"{target}.json")
        with open(path, "w") as f:
            json.dump(tables_to_json(passes, **record), f, indent=1)
            f.write("\n")
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate autotune/configs/static/<target>.json")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--dtypes", nargs="+", choices=[dtype_name(d) for d in DTYPES], default=None,
                        help="search only these dtypes again; keep the current tables' other entries")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=None,
                        help="search only these passes again; keep the current tables' other entries")
    parser.add_argument("--scope", choices=SCOPES, default="all",
                        help="split: search the split tier again, keep the single tier; in-flight: only the split "
                             "configs that read h back in flight")
    args = parser.parse_args(argv)
    partial = bool(args.dtypes or args.passes or args.scope != "all")
    dtypes = [d for d in DTYPES if args.dtypes is None or dtype_name(d) in args.dtypes]
    tables = shipped_tables(args.workers, dtypes, args.passes or PASSES,
                            keep={t: static_tables(t) for t in TARGETS} if partial else None, scope=args.scope)
    if args.write:
        command = ("python -m persistrnn.autotune.capacity " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        for target, passes in tables.items():
            # a partial search's record: the commands that made the tables it kept, then its own
            for path in write_tables({target: passes}, f"{static_command(target)}; {command}" if partial else command):
                print(path)
    else:
        print(json.dumps({t: tables_to_json(p) for t, p in tables.items()}, indent=1))
    return 0


def static_command(target, directory=STATIC_DIR):
    """The command recorded in `target`'s static table file."""
    with open(os.path.join(directory, f"{target}.json")) as f:
        return json.load(f)["command"]


if __name__ == "__main__":
    raise SystemExit(main())
