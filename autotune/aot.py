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

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from ..configs import KERNELS, TARGETS
from ..kernels.backward import _rnn_backward_kernel, backward_arguments
from ..kernels.config import KernelConfig, state_dtype
from ..kernels.exchange import MAX_SPIN
from ..kernels.forward import SAVED, _rnn_forward_kernel, forward_arguments
from .sass import loop_mix, resource_usage


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


def kernel_arguments(kernel, cell, dtype, has_proj, config, shape, dir0=0, *, allow_tf32, interpret=False, T=16):
    """(kernel function, grid, args, constexprs) of one launch of a kernel ("forward", "forward_save" or
    "backward") on a layer of shape (H, R, B, D) with empty tensors, from the launchers' own argument
    builders (kernels/forward.py: forward_arguments, kernels/backward.py: backward_arguments)."""
    G = 4 if cell == "lstm" else 3
    H, R, B, D = shape
    make = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
    xproj, y = make(T, B, D * G * H), make(T, B, D * R)
    w_hh, h0, c0 = make(D, G * H, R), make(D, B, R), make(D, B, H)
    w_hr = make(D, R, H) if has_proj else None
    lengths = make(B, dt=torch.int32)
    saved = make(T, B, D, SAVED[cell], H, dt=state_dtype(dtype))
    c0 = c0 if cell == "lstm" else None
    # dir0: the launch's first direction (kernels/launcher.py, "waves"); 0 unless it runs the reverse one alone
    wave = (0, triton.cdiv(B, config.block_b), dir0, D - dir0)
    common = dict(config=config, interpret=interpret, allow_tf32=allow_tf32, wave=wave,
                  max_spin=MAX_SPIN["interpret" if interpret else "compiled"])
    if kernel == "backward":
        dgates, dh_all = make(T, B, D * G * H), (make(T, B, D * R) if has_proj else None)
        grid, args, constexprs = backward_arguments(cell, y, h0, c0, saved, y, h0, c0, w_hh, w_hr, lengths, dgates,
                                                    dh_all, make(D, B, R), None if c0 is None else make(D, B, H),
                                                    **common)
        return _rnn_backward_kernel, grid, args, constexprs
    b_hn = make(D, H) if cell == "gru" else None
    grid, args, constexprs = forward_arguments(cell, xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, make(D, B, R),
                                               None if c0 is None else make(D, B, H),
                                               saved if kernel == "forward_save" else None, **common)
    return _rnn_forward_kernel, grid, args, constexprs


def bind(jit_fn, args, constexprs, *, config, kernel, target):
    """triton 3.6's own argument binding and specialization of a launch, as JITFunction.run does it:
    (backend, options, signature, constexprs, attrs)."""
    capability = TARGETS[target]["capability"]
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    kwargs = dict(constexprs, num_warps=config.warps("backward" if kernel == "backward" else "forward"),
                  num_stages=config.num_stages, launch_cooperative_grid=constexprs["SPLIT"] > 1, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    return options, signature, constexprs, attrs


def compile_kernel(kernel, cell, dtype, has_proj, config, shape, target, allow_tf32, dir0=0):
    """Compile one kernel ("forward", "forward_save": the forward with SAVE, or "backward") of a
    layer of shape (H, R, B, D) for `target`, exactly as rnn_forward / rnn_backward would launch it."""
    jit_fn, _, args, constexprs = kernel_arguments(kernel, cell, dtype, has_proj, config, shape, dir0,
                                                   allow_tf32=allow_tf32)
    options, signature, constexprs, attrs = bind(jit_fn, args, constexprs, config=config, kernel=kernel, target=target)
    capability = TARGETS[target]["capability"]
    return triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                          options=options.__dict__)
