"""Choosing the path of one layer call: Triton kernel (compiled or interpreted) or torch native.

The kernel config comes from the first of a chain of sources that answers (SOURCES): a pinned
config (pin_config), the user's tuned table, the shipped tuned table, the static tables
(configs.py). Each source returns a Choice, a config or torch with its reason, or None to let the
next one decide; the static tables always answer. The choice is never silent: every call's
`Dispatch` is kept on the module (`module.last_dispatch`) and logged at DEBUG level on the
`persistrnn` logger.
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
from ..configs import (DTYPES, MIN_BLOCK, SMALL_BLOCK_H, device_sms, kernel_config, launch_waves, target_of)
from ..kernels.config import KernelConfig
from .backend import current_backend
from .transforms import forward_ad_active, only_vmap_active, transforms_active

log = logging.getLogger("persistrnn")

STATIC_TABLES = "the static tables (autotune/configs/static)"


@dataclasses.dataclass(frozen=True)
class Dispatch:
    path: str  # "triton", "interpret", "torch" or "reference" (reference.py, under torch.func's grad transforms)
    reason: str
    config: KernelConfig = None
    waves: tuple = None  # the kernel's launches, (tile0, tiles, dir0, dirs) each: configs.launch_waves
    # the layer as its custom ops take it (layer.layer_spec); None on the torch path
    spec: str = dataclasses.field(default=None, repr=False)


_pinned = contextvars.ContextVar("persistrnn_pinned_config", default=None)


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


# ---- fewer SMs than the device has, learned from refused launches ----
# Under MPS limits, green contexts or another process's kernels fewer SMs are usable than
# device_sms, and the driver refuses a cooperative launch of more programs than can be resident at
# once (kernels/launcher.py: LaunchRefused). Per device, the most programs a split launch may have
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
    """Learn from a refused launch (launcher.LaunchRefused): its device holds fewer than
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


@dataclasses.dataclass(frozen=True)
class Query:
    """One layer call as the sources of a config see it. sms: the device's SMs (its tuned tables'
    key); usable: the programs a launch may take there now (usable_sms)."""
    cell: str
    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    proj_size: int
    batch: int
    num_directions: int
    pass_: str  # "forward" (inference) or "train"
    target: str
    sms: int
    usable: int

    def fewer(self):
        """What the reason says where fewer SMs are usable than the device has."""
        return "" if self.usable == self.sms else (f" ({self.usable} of its {self.sms} SMs usable: the driver "
                                                   "refused a larger cooperative launch there)")


@dataclasses.dataclass(frozen=True)
class Choice:
    """A source's answer: run `config`, or torch where config is None; reason says why."""
    config: KernelConfig
    reason: str


def pins():
    """The fields pin_config pins now ({} outside it)."""
    return _pinned.get() or {}


def pinned_source(q):
    """pin_config's fields over the static tables' choice; None when nothing is pinned. A pin is
    judged by the device (pin_config raises where it can never run); with fewer SMs usable it runs
    in more launches, or torch runs."""
    pinned = pins()
    if not pinned:
        return None
    config, why = kernel_config(q.cell, q.dtype, q.hidden_size, q.proj_size, q.batch, q.num_directions, q.sms,
                                q.target, q.pass_, pinned=pinned)
    if config is None:
        return Choice(None, why + q.fewer())
    fields = ", ".join(f"{k}={v}" for k, v in pinned.items())
    return Choice(config, f"config from {STATIC_TABLES} and pin_config({fields})")


def _table_source(q, source):
    """What `persistrnn tune` decided for this layer on this device in the `source` table ("tuned":
    the user's, "shipped": the package's); None where the table has no entry for the layer, or its
    config cannot run this call."""
    index = None
    if q.device.type == "cuda":
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    layer = cache.layer_key(q.cell, q.dtype, q.pass_, q.hidden_size, q.proj_size, q.num_directions, q.batch)
    entry, path = cache.table_entry(_device_key(q.device.type, index, q.sms), layer, source)
    if entry is None:
        return None
    where = f"the {source} table {path}"
    if entry["choice"] == "torch":
        return Choice(None, f"{where} chose PyTorch's native RNN for this layer: torch.nn took "
                            f"{entry.get('torch_ms')} ms and the best kernel config {entry.get('ms')} ms "
                            f"(T={entry.get('seq')})")
    config = KernelConfig(**entry["config"])
    if launch_waves(config, q.batch, q.hidden_size, q.num_directions, q.usable) is None:
        return None
    if source == "shipped" and not _shipped_config_on_chip(q.cell, q.dtype, q.proj_size > 0, config,
                                                           q.proj_size or q.hidden_size, q.target,
                                                           triton.cdiv(q.hidden_size, config.block_h), q.pass_, path):
        return None
    return Choice(config, f"config from {where}")


def tuned_source(q):
    return _table_source(q, "tuned")


def shipped_source(q):
    return _table_source(q, "shipped")


def static_source(q):
    """The static tables' choice for the SMs usable now (configs.kernel_config); always answers."""
    config, why = kernel_config(q.cell, q.dtype, q.hidden_size, q.proj_size, q.batch, q.num_directions, q.usable,
                                q.target, q.pass_)
    if config is None:
        return Choice(None, why + q.fewer())
    return Choice(config, f"config from {STATIC_TABLES}")


SOURCES = (pinned_source, tuned_source, shipped_source, static_source)


def plan(cell, device, dtype, weight_dtype, hidden_size, proj_size, batch, num_directions,
         grad_needed) -> Dispatch:
    transforms = transforms_active() or forward_ad_active()
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
    if dtype not in DTYPES:
        return Dispatch("torch", f"no kernel for dtype {dtype}")
    if dtype != weight_dtype:  # torch.nn raises its own error for this (the layer casts under autocast)
        return Dispatch("torch", f"input dtype {dtype} differs from weight dtype {weight_dtype}")
    target = target_of(device)
    if target is None:
        props = torch.cuda.get_device_properties(device)
        return Dispatch("torch", f"no kernel tables for {props.name} (compute capability {props.major}.{props.minor}, "
                                 f"{props.shared_memory_per_block_optin // 1024} KB shared memory per block)")
    sms = device_sms(device)
    q = Query(cell, device, dtype, hidden_size, proj_size, batch, num_directions,
              "train" if grad_needed else "forward", target, sms, usable_sms(device, sms))
    choice = next(c for c in (source(q) for source in SOURCES) if c is not None)
    if choice.config is None:
        return Dispatch("torch", choice.reason)
    what = "kernels (forward saving for backward, backward)" if grad_needed else "kernel"
    return _kernel_dispatch(name, f"{what}; {choice.reason}", choice.config, q)


def _kernel_dispatch(path, reason, config, q):
    waves = launch_waves(config, q.batch, q.hidden_size, q.num_directions, q.usable)
    if waves is None:  # a pinned config, where fewer SMs are usable than one batch tile's programs
        return Dispatch("torch", f"{config} needs the {triton.cdiv(q.hidden_size, config.block_h)} programs of a "
                                 f"batch tile running at once{q.fewer()}")
    if len(waves) > 1:
        reason += (f"; in {len(waves)} launches one after another, each a block of batch tiles and directions "
                   f"whose programs fit on {q.usable} SMs at once{q.fewer()}")
    return Dispatch(path, reason, config, waves)


@functools.lru_cache(maxsize=None)
def _device_key(device_type, index, sms):
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    return cache.device_key(device, sms)


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
