"""Ahead-of-time compile of a kernel config for a GPU target, with no GPU: is it on-chip?

`triton.compile` lowers to a cubin for sm_80 / sm_90; the cuobjdump bundled with triton reports
its registers (REG), stack (STACK: spills) and local memory, and triton's metadata its shared
memory. A config is on-chip when it spills nothing and its shared memory fits the target.
"""
import concurrent.futures
import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..kernels.forward import _rnn_forward_kernel, kernel_constexprs

# per target: compute capability, SM count, shared memory per block (bytes), registers per SM
TARGETS = {
    "sm_80": dict(capability=80, sms=108, smem=163 * 1024, regs_per_sm=65536),  # A100
    "sm_90": dict(capability=90, sms=132, smem=227 * 1024, regs_per_sm=65536),  # H100
}
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}


@dataclasses.dataclass(frozen=True)
class Resources:
    regs: int
    stack: int
    local: int
    shared: int
    smem_limit: int

    @property
    def on_chip(self):
        return self.stack == 0 and self.local == 0 and self.shared <= self.smem_limit


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


_resources = {}  # per process: config key -> Resources


def forward_resources(cell, dtype, has_proj, block_b, block_h, block_r, num_warps, num_stages,
                      target="sm_90", split=1):
    """Compile the forward kernel for one config and report what it uses on `target` (cached)."""
    key = (cell, dtype, has_proj, block_b, block_h, block_r, num_warps, num_stages, target, split)
    if key not in _resources:
        _resources[key] = _compile_forward(*key)
    return _resources[key]


def prefetch(keys, workers=None):
    """Compile many configs (tuples of forward_resources' arguments, all ten) on all cores."""
    missing = sorted({tuple(k) for k in keys} - set(_resources), key=str)
    if missing:
        with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count()) as pool:
            _resources.update(zip(missing, pool.map(_compile_forward_key, missing)))


def _compile_forward_key(key):
    return _compile_forward(*key)


def _compile_forward(cell, dtype, has_proj, block_b, block_h, block_r, num_warps, num_stages, target, split):
    spec = TARGETS[target]
    ptr = _PTR[dtype]
    signature = {name: ptr for name in ("xproj_ptr", "w_hh_ptr", "b_hn_ptr", "w_hr_ptr", "h0_ptr",
                                         "c0_ptr", "y_ptr", "hn_ptr", "cn_ptr")}
    signature["xbuf_ptr"] = ("*fp64" if dtype == torch.float64 else "*fp32") if has_proj else ptr
    for name in ("lengths_ptr", "counter_ptr", "error_ptr"):
        signature[name] = "*i32"
    for name in ("T", "B", "H", "R", "MAX_SPIN", "stride_xt", "stride_xb", "stride_yt", "stride_yb"):
        signature[name] = "i32"
    constexprs = kernel_constexprs(cell, dtype, has_proj, split, block_b, block_h, block_r,
                                   interpret=False, allow_tf32=False)
    signature.update({name: "constexpr" for name in constexprs})
    # ASTSource wants the signature in the kernel's argument order
    signature = {name: signature[name] for name in _rnn_forward_kernel.arg_names}
    src = ASTSource(_rnn_forward_kernel, signature, constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", spec["capability"], 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    usage = resource_usage(compiled.asm["cubin"])
    return Resources(regs=usage.get("REG", 0), stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0),
                     shared=compiled.metadata.shared, smem_limit=spec["smem"])
