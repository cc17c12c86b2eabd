"""The config model: which kernel configs exist for a layer's shape on a GPU target, and how its grid
maps onto the SMs. It decides; it never runs a layer (it imports nothing of layers/ or autotune/).

A config (kernels/config.py: KernelConfig) cuts a layer into programs of block_b batch rows and
block_h hidden units: one program per batch tile when block_h holds the layer (the single tier), else
SPLIT = cdiv(H, block_h) programs that meet at a barrier every step (the split tier), which must all
be resident at once. The configs that compile on-chip per target are the static tables,
autotune/configs/static/<target>.json (made by `python -m persistrnn.autotune.capacity --write`,
read when first needed). A grid larger than the SMs runs as waves: launches one after another.
"""
import dataclasses
import functools
import json
import os

import torch
import triton

from .kernels.config import KernelConfig

# per target: compute capability, SM count, shared memory per block (bytes)
TARGETS = {
    "sm_80": dict(capability=80, sms=108, smem=163 * 1024),  # A100
    "sm_90": dict(capability=90, sms=132, smem=227 * 1024),  # H100
}
PASSES = ("forward", "train")
# the kernels of a pass ("forward": inference; "train": the forward saving for the backward, and the
# backward, with one config), and the single kernels a search may ask about on their own
KERNELS = {"forward": ("forward",), "train": ("forward_save", "backward"), "forward_save": ("forward_save",),
           "backward": ("backward",)}
CELLS = ("lstm", "gru")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BLOCK_B = 16  # the single tier's batch tile
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16 on the GPU
# fp32's fallback BLOCK_H, searched where 16 units are not held: a tile of 4 x 8 = 32 gate rows
# (mma.sync). Only in the split tier without proj_size and not in fp64, where no MMA has K = BLOCK_H.
SMALL_BLOCK_H = 8
# programs that can run at once where no GPU tells us: an H100's SMs, one program each
DEFAULT_SMS = 132

STATIC_DIR = os.path.join(os.path.dirname(__file__), "autotune", "configs", "static")
STATIC_FORMAT = 1


def dtype_name(dtype):
    """'bfloat16' for torch.bfloat16: how tables, keys and reports name a dtype."""
    return str(dtype).replace("torch.", "")


# the kernels' dtypes by name, and the ones a benchmark measures (fp64 is the reference's)
DTYPE_BY_NAME = {dtype_name(d): d for d in DTYPES}
MEASURED_DTYPES = {name: d for name, d in DTYPE_BY_NAME.items() if d != torch.float64}


def block_for(n):
    """The single tier's block for n hidden units: the next power of two, at least MIN_BLOCK."""
    return max(MIN_BLOCK, triton.next_power_of_2(n))


# ---- the static tables ----

def _held(warps):
    """A table entry's warps: an int (forward pass), or [forward, backward] (train pass) as a pair."""
    return tuple(warps) if isinstance(warps, list) else warps


def _ints(d, inner=lambda v: v):
    return {int(k): inner(v) for k, v in d.items()}


def tables_from_json(data):
    """One target's tables as the planner reads them, from a static table file's contents:
    {pass: {"single": {(cell, dtype): {block_h: warps}},
            "split": {(cell, dtype, has_proj): {width: {block_b: {block_h: warps}}}}}}."""
    if data.get("format") != STATIC_FORMAT:
        raise ValueError(f"not a static table of format {STATIC_FORMAT}: format {data.get('format')!r}")
    tables = {}
    for pass_, tiers in data["passes"].items():
        tables[pass_] = {
            "single": {(cell, dtype): _ints(blocks, _held)
                       for cell, by_dtype in tiers["single"].items() for dtype, blocks in by_dtype.items()},
            "split": {(cell, dtype, kind == "proj"): _ints(widths, lambda tiles: _ints(tiles, lambda b: _ints(b, _held)))
                      for cell, by_dtype in tiers["split"].items() for dtype, kinds in by_dtype.items()
                      for kind, widths in kinds.items()},
        }
    return tables


def tables_to_json(tables, **record):
    """The inverse of tables_from_json, with `record` (the versions and command that made them)."""
    def keys(d, inner=lambda v: v):
        return {str(k): inner(v) for k, v in sorted(d.items())}

    def warps(w):
        return list(w) if isinstance(w, tuple) else w
    passes = {}
    for pass_, tiers in tables.items():
        single, split = {}, {}
        for (cell, dtype), blocks in sorted(tiers["single"].items()):
            single.setdefault(cell, {})[dtype] = keys(blocks, warps)
        for (cell, dtype, has_proj), widths in sorted(tiers["split"].items()):
            split.setdefault(cell, {}).setdefault(dtype, {})["proj" if has_proj else "plain"] = keys(
                widths, lambda tiles: keys(tiles, lambda b: keys(b, warps)))
        passes[pass_] = {"single": single, "split": split}
    return {"format": STATIC_FORMAT, **record, "passes": passes}


@functools.lru_cache(maxsize=None)
def static_tables(target):
    """The static tables of `target` (tables_from_json), read from STATIC_DIR when first asked for."""
    with open(os.path.join(STATIC_DIR, f"{target}.json")) as f:
        return tables_from_json(json.load(f))


def _tables(target, tables):
    """`tables` (every target's, as a search builds them) for `target`, else the static ones."""
    return tables[target] if tables is not None else static_tables(target)


def table_config(block_b, block_h, held):
    """The KernelConfig of a table entry: num_warps (forward pass), or (num_warps, backward_warps)
    (train pass: the saving forward's and the backward's)."""
    if isinstance(held, tuple):
        return KernelConfig(block_b, block_h, held[0], backward_warps=held[1])
    return KernelConfig(block_b, block_h, held)


def table_width(widths, width):
    """The smallest table width that holds a recurrent input of `width`, or None."""
    return min((w for w in widths if w >= width), default=None)


def single_program_config(cell, dtype, hidden_size, target="sm_90", pass_="forward", tables=None):
    """The single-program config for these sizes, or None if its weights do not fit on-chip.
    pass_ "train" asks for a config whose forward (saving) and backward kernels both fit."""
    held = _tables(target, tables)[pass_]["single"][(cell, dtype_name(dtype))]
    block_h = block_for(hidden_size)
    return table_config(BLOCK_B, block_h, held[block_h]) if block_h in held else None


def split_program_configs(cell, dtype, hidden_size, proj_size, target="sm_90", pass_="forward", tables=None):
    """Every split-tier config the tables hold for these sizes (BLOCK_H < hidden_size)."""
    held = _tables(target, tables)[pass_]["split"].get((cell, dtype_name(dtype), proj_size > 0), {})
    width = table_width(held, proj_size or hidden_size)
    if width is None:
        return []
    return [table_config(block_b, block_h, warps) for block_b, blocks in held[width].items()
            for block_h, warps in blocks.items() if block_h < hidden_size]


# ---- grids and waves ----

def programs(config, batch, hidden_size, num_directions):
    """The grid's size: batch tiles x SPLIT x directions."""
    return triton.cdiv(batch, config.block_b) * triton.cdiv(hidden_size, config.block_h) * num_directions


def launch_waves(config, batch, hidden_size, num_directions, sms):
    """How a layer's grid runs on a device of `sms` SMs: a tuple of launches (tile0, tiles, dir0,
    dirs), each a block of batch tiles and directions (kernels/launch.py). One launch when the grid
    can be resident at once, or has one program per batch tile; else the fewest launches whose
    programs are each resident at once (one program per SM), one after another: batch rows and
    directions are independent. None when not even one batch tile of one direction fits
    (SPLIT > sms)."""
    tiles = triton.cdiv(batch, config.block_b)
    split = triton.cdiv(hidden_size, config.block_h)
    if split == 1 or programs(config, batch, hidden_size, num_directions) <= sms:
        return ((0, tiles, 0, num_directions),)
    if split > sms:
        return None
    best = None
    for dirs in (num_directions, 1):  # both directions in a launch, or one at a time
        if split * dirs > sms:
            continue
        count = triton.cdiv(tiles, sms // (split * dirs))
        per_launch = triton.cdiv(tiles, count)  # the same number of tiles in every launch but the last
        waves = tuple((tile0, min(per_launch, tiles - tile0), dir0, dirs)
                      for dir0 in range(0, num_directions, dirs) for tile0 in range(0, tiles, per_launch))
        if best is None or len(waves) < len(best):
            best = waves
    return best


# ---- the device ----

def device_sms(device):
    """The SMs a device has, one split-tier program each; DEFAULT_SMS for the interpreter. Part of the
    device's identity (tuned tables); a launch may get fewer (layers/dispatch.py: usable_sms)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SMS


def target_of(device):
    """The static tables for a device: sm_90's for Hopper and later, sm_80's for Ampere and Ada, if
    the device gives a block at least the shared memory that table assumes (an RTX 4090 or L4
    gives 99 KB, not A100's 163 KB); None otherwise. Without a GPU (the interpreter), sm_90's."""
    if device.type != "cuda":
        return "sm_90"
    major, _ = torch.cuda.get_device_capability(device)
    target = "sm_90" if major >= 9 else ("sm_80" if major == 8 else None)
    smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return target if target and smem >= TARGETS[target]["smem"] else None


# ---- the choice ----

def kernel_config(cell, dtype, hidden_size, proj_size, batch, num_directions, sms, target="sm_90",
                  pass_="forward", tables=None, pinned=None):
    """(config, None), or (None, why no kernel config holds these sizes on `target`) for a pass:
    "forward" (inference) or "train" (one config for the saving forward and the backward).
    One program per batch tile when it holds the layer (no barrier); otherwise the split config
    with the fewest launches (launch_waves: one when the whole grid can be resident at once), then
    the least MMA work per program (BLOCK_H x BLOCK_B rows), then fewer programs. `pinned`
    ({field: value}, layers/dispatch.py: pin_config) overrides the choice field by field, and
    raises ValueError if it cannot run."""
    pinned = tuple(sorted((pinned or {}).items()))
    args = (cell, dtype, hidden_size, proj_size, batch, num_directions, sms, target, pass_)
    if tables is None:  # the static tables never change in a process: every layer call asks again
        return _static_kernel_config(*args, pinned)
    return _kernel_config(*args, pinned, tables)


@functools.lru_cache(maxsize=4096)
def _static_kernel_config(*args):
    return _kernel_config(*args, None)


def _kernel_config(cell, dtype, hidden_size, proj_size, batch, num_directions, sms, target, pass_, pinned, tables):
    pinned = dict(pinned)
    single = single_program_config(cell, dtype, hidden_size, target, pass_, tables)
    split = split_program_configs(cell, dtype, hidden_size, proj_size, target, pass_, tables)
    size = lambda c: programs(c, batch, hidden_size, num_directions)  # noqa: E731
    waves = lambda c: len(launch_waves(c, batch, hidden_size, num_directions, sms) or range(1 << 30))  # noqa: E731
    # one launch (all resident at once) first, else the fewest; then 16-unit blocks and more (a
    # 64-row tile: wgmma), then the least MMA work
    by_cost = sorted(split, key=lambda c: (waves(c), c.block_h < MIN_BLOCK, c.block_h * c.block_b, size(c),
                                           c.block_h))
    agrees = [c for c in ([single] if single else []) + by_cost
              if all(getattr(c, k) == v for k, v in pinned.items())]
    if agrees:
        config = agrees[0]
    elif single is not None and pinned.get("block_h", hidden_size) >= hidden_size:
        config = single
    else:
        config = (by_cost or [single])[0]
    if config is None and "block_h" not in pinned:
        held = max(_tables(target, tables)[pass_]["single"][(cell, dtype_name(dtype))], default=0)
        kernels = "forward and backward kernels" if pass_ == "train" else "forward kernel"
        return None, (f"hidden_size={hidden_size}{f', proj_size={proj_size}' if proj_size else ''} does not fit "
                      f"on-chip for {cell} {dtype} on {target} ({kernels}): one program holds at most {held}, "
                      f"and no split block holds a recurrent input of {proj_size or hidden_size}")
    fields = dataclasses.asdict(config) if config else dict(block_b=BLOCK_B, num_warps=4, num_stages=1)
    if "num_warps" in pinned and "backward_warps" not in pinned:  # one pinned warp count for both kernels
        fields["backward_warps"] = None
    config = KernelConfig(**{**fields, **pinned})
    split = triton.cdiv(hidden_size, config.block_h)
    if config.block_h < MIN_BLOCK and (split == 1 or proj_size or dtype == torch.float64):
        raise ValueError(f"pin_config({pinned}): block_h={config.block_h} runs only in the split tier "
                         f"(block_h < hidden_size), without proj_size, and not in float64")
    if launch_waves(config, batch, hidden_size, num_directions, sms) is None:
        why = (f"the split tier needs the SPLIT={split} programs of a batch tile running at once, "
               f"and this device holds {sms}")
        if pinned:
            raise ValueError(f"pin_config({pinned}) cannot run here: {why}")
        return None, why
    return config, None
