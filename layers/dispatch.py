"""Choosing the path of one layer call: Triton kernel (compiled or interpreted) or torch native.

The choice is never silent: every call's `Dispatch` is kept on the module (`module.last_dispatch`)
and logged at DEBUG level on the `persistrnn` logger.
"""
import dataclasses
import logging

import torch
import triton

from ..autotune.tables import SINGLE_PROGRAM
from .backend import current_backend

log = logging.getLogger("persistrnn")

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16 on the GPU


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_b: int
    block_h: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 1


@dataclasses.dataclass(frozen=True)
class Dispatch:
    path: str  # "triton", "interpret" or "torch"
    reason: str
    config: KernelConfig = None


def block_for(n):
    return max(MIN_BLOCK, triton.next_power_of_2(n))


def single_program_config(cell, dtype, hidden_size, proj_size):
    """The single-program config for these sizes, or None if its weights do not fit on-chip.
    The blocks and warp counts come from the ahead-of-time compile (autotune/tables.py)."""
    held = SINGLE_PROGRAM[(cell, str(dtype).replace("torch.", ""))]
    block_h = block_for(hidden_size)
    if block_h not in held:
        return None
    return KernelConfig(block_b=MIN_BLOCK, block_h=block_h, block_r=block_for(proj_size or hidden_size),
                        num_warps=held[block_h])


def plan(cell, device, dtype, weight_dtype, hidden_size, proj_size, grad_needed) -> Dispatch:
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
    if grad_needed:
        return Dispatch("torch", "gradients are needed and the backward kernels are not built yet: "
                                 "torch native computes them")
    if dtype not in KERNEL_DTYPES:
        return Dispatch("torch", f"no kernel for dtype {dtype}")
    if dtype != weight_dtype:  # only reachable under autocast, which torch handles
        return Dispatch("torch", f"input dtype {dtype} differs from weight dtype {weight_dtype} (autocast)")
    config = single_program_config(cell, dtype, hidden_size, proj_size)
    if config is None:
        limit = max(SINGLE_PROGRAM[(cell, str(dtype).replace("torch.", ""))])
        return Dispatch("torch", f"hidden_size={hidden_size} does not fit one program on-chip for "
                                 f"{cell} {dtype} (at most {limit}); the split tier is not built yet")
    return Dispatch(name, "kernel", config)
