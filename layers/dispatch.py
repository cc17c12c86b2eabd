"""Choosing the path of one layer call: Triton kernel (compiled or interpreted) or torch native.

The choice is never silent: every call's `Dispatch` is kept on the module (`module.last_dispatch`)
and logged at DEBUG level on the `persistrnn` logger.
"""
import contextlib
import contextvars
import dataclasses
import functools
import logging
import warnings

import torch
import triton

from ..autotune import cache
from ..autotune.aot import TARGETS
from ..autotune.capacity import BLOCK_B, SMALL_BLOCK_H, dtype_name, table_config
from ..autotune.tables import TABLES
from ..kernels.skeleton import KernelConfig  # noqa: F401  (re-exported: the config a Dispatch carries)
from .backend import current_backend

log = logging.getLogger("persistrnn")

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16 on the GPU (SMALL_BLOCK_H: autotune/capacity.py)


@dataclasses.dataclass(frozen=True)
class Dispatch:
    path: str  # "triton", "interpret", "torch" or "reference" (reference.py, under torch.func's grad transforms)
    reason: str
    config: KernelConfig = None
    waves: tuple = None  # the kernel's launches, (tile0, tiles, dir0, dirs) each: launch_waves
    # the layer as its custom ops take it (autograd.layer_spec); None on the torch path
    spec: str = dataclasses.field(default=None, repr=False)


def block_for(n):
    return max(MIN_BLOCK, triton.next_power_of_2(n))


_pinned = contextvars.ContextVar("persistrnn_pinned_config", default=None)
# programs that can run at once where no GPU tells us: an H100's SMs, one program each
DEFAULT_SMS = 132


def device_sms(device):
    """The SMs a device has, one split-tier program each; DEFAULT_SMS for the interpreter. Part of the
    device's identity (tuned tables); a launch may get fewer (usable_sms)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SMS


# ---- fewer SMs than the device has, learned from refused launches ----
# Under MPS limits, green contexts or another process's kernels fewer SMs are usable than
# device_sms, and the driver refuses a cooperative launch of more programs than can be resident at
# once (kernels/skeleton.py: LaunchRefused). Per device, the most programs a split launch may have
# there since it refused one; it only shrinks. A device is in it once it has refused a launch.
_usable_sms = {}


def _device_id(device):
    """The device with its index (a CUDA device without one means the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def usable_sms(device, sms=None):
    """The programs a split launch may have on `device` at once: its SMs (`sms`, where the caller has
    them), fewer once it refused a launch."""
    learned = _usable_sms.get(_device_id(device)) if _usable_sms else None
    if learned is not None:
        return learned
    return device_sms(device) if sms is None else sms


def refused(error):
    """Learn from a refused launch (skeleton.LaunchRefused): its device holds fewer than
    error.programs programs at once, so every plan there from now on makes smaller launches
    (usable_sms). The first refusal on a device is warned about. Returns why, for a Dispatch's reason."""
    device = _device_id(error.device)
    first = device not in _usable_sms
    _usable_sms[device] = usable = min(usable_sms(device), error.programs - 1)
    why = (f"the driver refused a cooperative launch of {error.programs} programs on {device}: fewer SMs are usable "
           f"there than its {device_sms(device)} (MPS limits, green contexts or another process's kernels)")
    if first:
        warnings.warn(f"persistrnn: {why}. Split-tier launches on {device} now take at most {usable} programs "
                      "(more launches, one after another), or torch runs the layer where one batch tile's programs "
                      "do not fit; the layer's last_dispatch.reason says which.", RuntimeWarning)
    return why


def only_vmap_active():
    """Whether the torch.func transforms active now are all vmap (the kernels' op has a batching
    rule: autograd.py), and forward-mode AD is off."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return (torch.autograd.forward_ad._current_level < 0 and
            all(i.key() == torch._C._functorch.TransformType.Vmap for i in retrieve_all_functorch_interpreters()))


@contextlib.contextmanager
def pin_config(block_h=None, block_b=None, num_warps=None, num_stages=None, backward_warps=None):
    """Pin the kernel config of every launch inside the block (any argument optional); it
    overrides the tuned, shipped and static tables. block_h < hidden_size selects the split tier
    with SPLIT = cdiv(hidden_size, block_h). num_warps alone pins both kernels' warps;
    backward_warps pins the backward kernel's apart. A config that cannot run for a layer's
    shapes raises ValueError at that layer's call."""
    pinned = dict(block_h=block_h, block_b=block_b, num_warps=num_warps, num_stages=num_stages,
                  backward_warps=backward_warps)
    for name, least in (("block_h", SMALL_BLOCK_H), ("block_b", MIN_BLOCK)):
        value = pinned[name]
        if value is not None and (not isinstance(value, int) or value < least or value & (value - 1)):
            raise ValueError(f"pin_config: {name} must be a power of two >= {least}, got {value!r}")
    for name in ("num_warps", "backward_warps"):
        if pinned[name] is not None and pinned[name] not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"pin_config: {name} must be a power of two from 1 to 32, got {pinned[name]!r}")
    if num_stages is not None and (not isinstance(num_stages, int) or num_stages < 1):
        raise ValueError(f"pin_config: num_stages must be an int >= 1, got {num_stages!r}")
    token = _pinned.set({k: v for k, v in pinned.items() if v is not None})
    try:
        yield
    finally:
        _pinned.reset(token)


def target_of(device):
    """The shipped table for a device: sm_90's for Hopper and later, sm_80's for Ampere and Ada, if
    the device gives a block at least the shared memory that table assumes (an RTX 4090 or L4
    gives 99 KB, not A100's 163 KB); None otherwise. Without a GPU (the interpreter), sm_90's."""
    if device.type != "cuda":
        return "sm_90"
    major, _ = torch.cuda.get_device_capability(device)
    target = "sm_90" if major >= 9 else ("sm_80" if major == 8 else None)
    smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return target if target and smem >= TARGETS[target]["smem"] else None


def single_program_config(cell, dtype, hidden_size, target="sm_90", pass_="forward", tables=None):
    """The single-program config for these sizes, or None if its weights do not fit on-chip.
    The blocks and warp counts come from the ahead-of-time compile (autotune/tables.py); pass_
    "train" asks for a config whose forward (saving) and backward kernels both fit."""
    held = (tables or TABLES)[target][pass_]["single"][(cell, dtype_name(dtype))]
    block_h = block_for(hidden_size)
    return table_config(BLOCK_B, block_h, held[block_h]) if block_h in held else None


def table_width(widths, width):
    """The smallest table width that holds a recurrent input of `width`, or None."""
    return min((w for w in widths if w >= width), default=None)


def split_program_configs(cell, dtype, hidden_size, proj_size, target="sm_90", pass_="forward", tables=None):
    """Every split-tier config the tables hold for these sizes (BLOCK_H < hidden_size)."""
    held = (tables or TABLES)[target][pass_]["split"].get((cell, dtype_name(dtype), proj_size > 0), {})
    width = table_width(held, proj_size or hidden_size)
    if width is None:
        return []
    return [table_config(block_b, block_h, warps) for block_b, blocks in held[width].items()
            for block_h, warps in blocks.items() if block_h < hidden_size]


def programs(config, batch, hidden_size, num_directions):
    """The grid's size: batch tiles x SPLIT x directions."""
    return -(-batch // config.block_b) * -(-hidden_size // config.block_h) * num_directions


def launch_waves(config, batch, hidden_size, num_directions, sms):
    """How a layer's grid runs on a device of `sms` SMs: a tuple of launches (tile0, tiles, dir0,
    dirs), each a block of batch tiles and directions (kernels/skeleton.py: launch). One launch when
    the grid can be resident at once, or has one program per batch tile; else the fewest launches
    whose programs are each resident at once (one program per SM), one after another: batch rows
    and directions are independent. None when not even one batch tile of one direction fits
    (SPLIT > sms)."""
    tiles = -(-batch // config.block_b)
    split = -(-hidden_size // config.block_h)
    if split == 1 or programs(config, batch, hidden_size, num_directions) <= sms:
        return ((0, tiles, 0, num_directions),)
    if split > sms:
        return None
    best = None
    for dirs in (num_directions, 1):  # both directions in a launch, or one at a time
        if split * dirs > sms:
            continue
        count = -(-tiles // (sms // (split * dirs)))
        per_launch = -(-tiles // count)  # the same number of tiles in every launch but the last
        waves = tuple((tile0, min(per_launch, tiles - tile0), dir0, dirs)
                      for dir0 in range(0, num_directions, dirs) for tile0 in range(0, tiles, per_launch))
        if best is None or len(waves) < len(best):
            best = waves
    return best


def kernel_config(cell, dtype, hidden_size, proj_size, batch, num_directions, sms, target="sm_90",
                  pass_="forward", tables=None):
    """(config, None), or (None, why no kernel config holds these sizes on `target`) for a pass:
    "forward" (inference) or "train" (one config for the saving forward and the backward).
    One program per batch tile when it holds the layer (no barrier); otherwise the split config
    with the fewest launches (launch_waves: one when the whole grid can be resident at once), then
    the least MMA work per program (BLOCK_H x BLOCK_B rows), then fewer programs. A pinned config
    (pin_config) overrides the choice field by field, and raises if it cannot run."""
    pinned = tuple(sorted((_pinned.get() or {}).items()))
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
        held = max((tables or TABLES)[target][pass_]["single"][(cell, dtype_name(dtype))], default=0)
        kernels = "forward and backward kernels" if pass_ == "train" else "forward kernel"
        return None, (f"hidden_size={hidden_size}{f', proj_size={proj_size}' if proj_size else ''} does not fit "
                      f"on-chip for {cell} {dtype} on {target} ({kernels}): one program holds at most {held}, "
                      f"and no split block holds a recurrent input of {proj_size or hidden_size}")
    fields = dataclasses.asdict(config) if config else dict(block_b=BLOCK_B, num_warps=4, num_stages=1)
    if "num_warps" in pinned and "backward_warps" not in pinned:  # one pinned warp count for both kernels
        fields["backward_warps"] = None
    config = KernelConfig(**{**fields, **pinned})
    split = -(-hidden_size // config.block_h)
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


def plan(cell, device, dtype, weight_dtype, hidden_size, proj_size, batch, num_directions,
         grad_needed) -> Dispatch:
    transforms = torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0
    if transforms and not only_vmap_active():
        # the kernels read raw memory, which grad's wrapped tensors do not expose, and drop
        # forward-mode tangents: torch's ops step by step, which every transform differentiates
        return Dispatch("reference", "a torch.func transform (grad, jacrev, vjp, ...) or forward-mode AD is "
                                     "active: the layer as torch's differentiable ops, step by step")
    dispatch = _plan_kernels(cell, device, dtype, weight_dtype, hidden_size, proj_size, batch, num_directions,
                             grad_needed)
    if transforms and dispatch.path == "torch":  # under vmap: the kernels' op has a batching rule, torch's RNN none
        return Dispatch("reference", f"{dispatch.reason}; under vmap, where torch.nn's RNN has no batching rule: "
                                     "the layer as torch's differentiable ops, step by step")
    return dispatch


def _plan_kernels(cell, device, dtype, weight_dtype, hidden_size, proj_size, batch, num_directions,
                  grad_needed) -> Dispatch:
    name = current_backend()
    if name == "torch":
        return Dispatch("torch", "backend 'torch' selected")
    if name == "auto":
        if device.type != "cuda":
            return Dispatch("torch", f"backend 'auto' runs PyTorch's native RNN for {device.type} tensors")
        name = "triton"
    if name == "triton" and device.type != "cuda":
        raise RuntimeError(f"persistrnn backend 'triton' needs CUDA tensors, got {device.type} tensors "
                           "(use backend 'interpret' to run the kernels on CPU)")
    if dtype not in KERNEL_DTYPES:
        return Dispatch("torch", f"no kernel for dtype {dtype}")
    if dtype != weight_dtype:  # torch.nn raises its own error for this (the layer casts under autocast)
        return Dispatch("torch", f"input dtype {dtype} differs from weight dtype {weight_dtype}")
    target = target_of(device)
    if target is None:
        props = torch.cuda.get_device_properties(device)
        return Dispatch("torch", f"no kernel tables for {props.name} (compute capability {props.major}.{props.minor}, "
                                 f"{props.shared_memory_per_block_optin // 1024} KB shared memory per block)")
    sms = device_sms(device)  # the device's identity (tuned tables)
    usable = usable_sms(device, sms)  # what a launch may take
    pass_ = "train" if grad_needed else "forward"
    what = "kernels (forward saving for backward, backward)" if grad_needed else "kernel"
    if not _pinned.get():  # a pinned config overrides the tuned and shipped tables too
        tuned, where = tuned_choice(cell, device, dtype, hidden_size, proj_size, batch, num_directions, sms,
                                    target, pass_, usable)
        if tuned == "torch":
            return Dispatch("torch", where)
        if tuned is not None:
            return _kernel_dispatch(name, f"{what}; config from {where}", tuned, batch, hidden_size, num_directions,
                                    sms, usable)
    # a pin is judged by the device (pin_config raises where it can never run); with fewer SMs usable
    # it runs in more launches, or torch runs
    config, why = kernel_config(cell, dtype, hidden_size, proj_size, batch, num_directions,
                                sms if _pinned.get() else usable, target, pass_)
    if config is None:
        return Dispatch("torch", why + _fewer(sms, usable))
    return _kernel_dispatch(name, f"{what}; config from the static tables (autotune/tables.py)", config, batch,
                            hidden_size, num_directions, sms, usable)


def _fewer(sms, usable):
    return "" if usable == sms else (f" ({usable} of its {sms} SMs usable: the driver refused a larger cooperative "
                                     "launch there)")


def _kernel_dispatch(path, reason, config, batch, hidden_size, num_directions, sms, usable):
    waves = launch_waves(config, batch, hidden_size, num_directions, usable)
    if waves is None:  # a pinned config, where fewer SMs are usable than one batch tile's programs
        return Dispatch("torch", f"{config} needs the {-(-hidden_size // config.block_h)} programs of a batch tile "
                                 f"running at once{_fewer(sms, usable)}")
    if len(waves) > 1:
        reason += (f"; in {len(waves)} launches one after another, each a block of batch tiles and directions "
                   f"whose programs fit on {usable} SMs at once{_fewer(sms, usable)}")
    return Dispatch(path, reason, config, waves)


@functools.lru_cache(maxsize=None)
def _device_key(device_type, index, sms):
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    return cache.device_key(device, sms)


def tuned_choice(cell, device, dtype, hidden_size, proj_size, batch, num_directions, sms, target, pass_, usable):
    """What `persistrnn tune` decided for this layer on this device: (config, where) from the
    user's tuned table, else the shipped one; ("torch", why) where torch.nn won the timing;
    (None, None) where neither table has the layer, or its config cannot run this call (then
    the static tables decide). sms: the device's (its tables' key); usable: what a launch may take."""
    index = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    key = _device_key(device.type, index, sms)
    entry, source, path = cache.lookup(key, cache.layer_key(cell, dtype, pass_, hidden_size, proj_size,
                                                            num_directions, batch))
    if entry is None:
        return None, None
    where = f"the {source} table {path}"
    if entry["choice"] == "torch":
        return "torch", (f"{where} chose PyTorch's native RNN for this layer: torch.nn took {entry.get('torch_ms')} ms "
                         f"and the best kernel config {entry.get('ms')} ms (T={entry.get('seq')})")
    config = KernelConfig(**entry["config"])
    split = -(-hidden_size // config.block_h)
    if launch_waves(config, batch, hidden_size, num_directions, usable) is None:
        return None, None
    if source == "shipped" and not _shipped_config_on_chip(cell, dtype, proj_size > 0, config,
                                                           proj_size or hidden_size, target, split, pass_, path):
        return None, None
    return config, where


@functools.lru_cache(maxsize=None)
def _shipped_config_on_chip(cell, dtype, has_proj, config, width, target, split, pass_, path):
    """A shipped table's config is re-validated against the static check (the ahead-of-time
    compile), once per process and config; a config that fails it is warned about and unused."""
    from ..autotune.aot import kernel_resources
    if kernel_resources(cell, dtype, has_proj, config, width, target, split, pass_).on_chip:
        return True
    warnings.warn(f"persistrnn: the shipped table {path} holds {config} for {cell} {dtype} width {width}, which "
                  f"does not compile on-chip for {target}: the static tables decide instead", RuntimeWarning)
    return False
