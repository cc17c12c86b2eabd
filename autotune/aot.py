"""Ahead-of-time compile of a kernel config for a GPU target, with no GPU: is it on-chip?

`triton.compile` lowers to a cubin for sm_80 / sm_90 (specialized as a launch would be, through
triton 3.6's own argument binding); the cuobjdump bundled with triton reports
its registers (REG), stack (STACK: spills) and local memory, and triton's metadata its shared
memory. A config is on-chip when it spills nothing and its shared memory fits the target.
Two passes: "forward" (inference: the forward kernel without SAVE) and "train" (the forward
kernel with SAVE and the backward kernel, with the same config: on-chip when both are).

The unit of compilation and of the per-process cache is one kernel (KernelKey: its own warps and
compile-time parameters), never a pass: a train query is the worse of two cached kernels, and
configs that share a kernel compile it once.
"""
import concurrent.futures
import dataclasses
import functools
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from ..kernels.backward import _rnn_backward_kernel
from ..kernels.forward import SAVED, _rnn_forward_kernel
from ..kernels.skeleton import MAX_SPIN, KernelConfig, kernel_constexprs, state_dtype

PASSES = ("forward", "train")
# the kernels of a pass, and the single kernels a search may ask about on their own
KERNELS = {"forward": ("forward",), "train": ("forward_save", "backward"), "forward_save": ("forward_save",),
           "backward": ("backward",)}

# per target: compute capability, SM count, shared memory per block (bytes)
TARGETS = {
    "sm_80": dict(capability=80, sms=108, smem=163 * 1024),  # A100
    "sm_90": dict(capability=90, sms=132, smem=227 * 1024),  # H100
}


@dataclasses.dataclass(frozen=True)
class Resources:
    regs: int
    stack: int
    local: int
    shared: int
    smem_limit: int
    failed: bool = False  # the compiler rejected the config (then nothing else is measured)

    @property
    def on_chip(self):
        return not self.failed and self.stack == 0 and self.local == 0 and self.shared <= self.smem_limit


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cuobjdump_run(cubin: bytes, *flags):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes):
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump_run(cubin, "--dump-resource-usage")))
    return {k: int(v) for k, v in fields.items()}


def disassemble(cubin: bytes):
    """The SASS of a cubin, as `cuobjdump -sass` prints it."""
    return _cuobjdump_run(cubin, "-sass")


@dataclasses.dataclass(frozen=True)
class KernelKey:
    """One compile: a kernel ("forward", "forward_save" or "backward") of a layer of shape (H, R, B, D)
    for a target, with what that kernel alone is compiled with. A config's num_warps is the forward
    kernels' and its backward_warps the backward's, so train configs that differ only in the other
    kernel's warps share this kernel's compile."""
    kernel: str
    cell: str
    dtype: object  # torch.dtype
    has_proj: bool
    block_b: int
    block_h: int
    num_warps: int  # this kernel's
    num_stages: int
    shape: tuple  # (H, R, B, D)
    target: str
    allow_tf32: bool
    dir0: int = 0

    @property
    def config(self):
        return KernelConfig(self.block_b, self.block_h, self.num_warps, self.num_stages)


def kernel_key(kernel, cell, dtype, has_proj, config, shape, target, allow_tf32, dir0=0):
    """The KernelKey of compile_kernel's arguments."""
    return KernelKey(kernel, cell, dtype, bool(has_proj), config.block_b, config.block_h,
                     config.warps("backward" if kernel == "backward" else "forward"), config.num_stages,
                     tuple(shape), target, bool(allow_tf32), dir0)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What one compile gave: its resources (failed: the compiler rejected it, then error says how),
    and, where asked for and the kernel is on-chip, its time loop's instruction mix (inspect.loop_mix,
    None if no time loop was found)."""
    resources: Resources
    error: str = None
    mix_read: bool = False
    mix: dict = dataclasses.field(default=None, compare=False)


_compiled = {}  # per process: KernelKey -> Compiled


def _compile_one(key, mix=False):
    try:
        compiled = compile_kernel(key.kernel, key.cell, key.dtype, key.has_proj, key.config, key.shape, key.target,
                                  key.allow_tf32, key.dir0)
    except Exception as exc:  # noqa: BLE001 - a config the compiler rejects is not held (its error is on stderr)
        return Compiled(Resources(0, 0, 0, 0, TARGETS[key.target]["smem"], failed=True),
                        error=f"compile error {type(exc).__name__}")
    res = resources_of(compiled, key.target)
    if not (mix and res.on_chip):
        return Compiled(res)
    from .inspect import loop_mix
    return Compiled(res, mix_read=True, mix=loop_mix(compiled.asm["cubin"]))


def _compile_job(job):
    return _compile_one(*job)


def _usable(key, mix):
    done = _compiled.get(key)
    return done is not None and (not mix or done.mix_read or not done.resources.on_chip)


def compile_kernels(keys, mix=(), workers=None, progress=None):
    """Compile every distinct KernelKey of `keys` once per process (the cache), in `workers`
    processes (default: all cores; 1: in this one); keys in `mix` also get their time loop read
    (SASS). progress() is called after each compile. Returns {key: Compiled} for `keys`."""
    keys, mix = list(dict.fromkeys(keys)), set(mix)
    todo = [(k, k in mix) for k in keys if not _usable(k, k in mix)]
    if workers == 1 or len(todo) <= 1:
        for job in todo:
            _compiled[job[0]] = _compile_one(*job)
            progress and progress()
    elif todo:
        with concurrent.futures.ProcessPoolExecutor(min(workers or os.cpu_count(), len(todo))) as pool:
            futures = {pool.submit(_compile_job, job): job[0] for job in todo}
            for future in concurrent.futures.as_completed(futures):
                _compiled[futures[future]] = future.result()
                progress and progress()
    return {k: _compiled[k] for k in keys}


def worst(resources):
    """The worse of several kernels' resources, field by field (failed if any failed)."""
    resources = list(resources)
    if any(r.failed for r in resources):
        return next(r for r in resources if r.failed)
    return functools.reduce(lambda a, b: Resources(*(max(x, y) for x, y in zip(dataclasses.astuple(a),
                                                                             dataclasses.astuple(b)))), resources)


def _pass_kernel_keys(cell, dtype, has_proj, config, width, target, split, pass_):
    """The compiles of kernel_resources' query: each kernel of the pass at the representative shape,
    fp32 with TF32 dots and with IEEE ones."""
    shape = representative_shape(has_proj, config, width, split)
    return [kernel_key(kernel, cell, dtype, has_proj, config, shape, target, allow_tf32)
            for kernel in KERNELS[pass_] for allow_tf32 in ((True, False) if dtype == torch.float32 else (False,))]


def kernel_resources(cell, dtype, has_proj, config, width, target="sm_90", split=1, pass_="forward"):
    """Compile the kernels of one pass ("forward" or "train", or one kernel: "forward_save",
    "backward") for one KernelConfig, a recurrent input of `width` (hidden or proj size) and SPLIT
    programs, and report what they use on `target`: the worse of the two kernels for "train". Each
    kernel is compiled once per process (compile_kernels), so a train query costs only the kernels
    no earlier query compiled."""
    keys = _pass_kernel_keys(cell, dtype, has_proj, config, width, target, split, pass_)
    return worst(c.resources for c in compile_kernels(keys, workers=1).values())


def prefetch(keys, workers=None):
    """Compile many configs (tuples of kernel_resources' arguments, all eight) on all cores: each
    distinct kernel once."""
    compile_kernels([k for key in keys for k in _pass_kernel_keys(*key)], workers=workers)


def representative_shape(has_proj, config, width, split):
    """(H, R, B, D) of the layer a config is picked for: H = SPLIT * BLOCK_H units, R = width
    (with proj_size, R < H), one batch tile of one direction."""
    H = max(config.block_h * split, 16)
    R = width if not has_proj or width < H else max(H - 16, 8)
    return H, R, config.block_b, 1


def resources_of(compiled, target):
    usage = resource_usage(compiled.asm["cubin"])
    return Resources(regs=usage.get("REG", 0), stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0),
                     shared=compiled.metadata.shared, smem_limit=TARGETS[target]["smem"])


def compile_kernel(kernel, cell, dtype, has_proj, config, shape, target, allow_tf32, dir0=0):
    """Compile one kernel ("forward", "forward_save": the forward with SAVE, or "backward") of a
    layer of shape (H, R, B, D) for `target`, exactly as rnn_forward / rnn_backward would launch it."""
    G = 4 if cell == "lstm" else 3
    H, R, B, D = shape
    T = 16
    split = -(-H // config.block_h)
    make = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
    xproj, y = make(T, B, D * G * H), make(T, B, D * R)
    w_hh, h0, c0 = make(D, G * H, R), make(D, B, R), make(D, B, H)
    w_hr = make(D, R, H) if has_proj else w_hh
    saved = make(T, B, D, SAVED[cell], H, dt=state_dtype(dtype))
    ints = make(max(B, 2), dt=torch.int32)
    # dir0: the launch's first direction (skeleton.py, "waves"); 0 unless it runs the reverse one alone
    constexprs = dict(kernel_constexprs(cell, dtype, has_proj, split, config, R, interpret=False, allow_tf32=allow_tf32),
                      DIR0=dir0)
    grid_b = -(-B // config.block_b)
    if kernel == "backward":
        rows = R
        xbuf = make(2, D, grid_b, split, rows, config.block_b, dt=state_dtype(dtype))
        args = (y, h0, c0, saved, y, h0, c0, w_hh, w_hr, ints, xproj, y if has_proj else xproj, h0, c0, xbuf, ints,
                ints, T, B, H, R, rows, MAX_SPIN["compiled"], y.stride(0), y.stride(1), saved.stride(0),
                saved.stride(1), y.stride(0), y.stride(1), xproj.stride(0), xproj.stride(1), y.stride(0), y.stride(1))
        jit_fn = _rnn_backward_kernel
    else:
        rows = R if has_proj else split * config.block_h
        xbuf = make(2, D, grid_b, split if has_proj else 1, rows, config.block_b,
                    dt=state_dtype(dtype) if has_proj else dtype)
        save = kernel == "forward_save"
        args = (xproj, w_hh, make(D, H), w_hr, h0, c0, ints, y, h0, c0, saved if save else ints, xbuf, ints, ints,
                T, B, H, R, rows, MAX_SPIN["compiled"], xproj.stride(0), xproj.stride(1), y.stride(0), y.stride(1),
                saved.stride(0) if save else 0, saved.stride(1) if save else 0)
        constexprs["SAVE"] = save
        jit_fn = _rnn_forward_kernel
    # triton 3.6's own argument binding and specialization, as JITFunction.run does it
    capability = TARGETS[target]["capability"]
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    kwargs = dict(constexprs, num_warps=config.warps("backward" if kernel == "backward" else "forward"),
                  num_stages=config.num_stages,
                  launch_cooperative_grid=split > 1, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                          options=options.__dict__)
