"""`persistrnn inspect`: the compiled time loop of the kernels a layer would run, read without a GPU.

The planner picks the config it would launch for the layer on the target (sm_80: an A100's 108
SMs, sm_90: an H100's 132); the kernels of the pass ("forward": the inference kernel; "train":
the forward that saves for the backward, and the backward kernel) are compiled ahead of time for
that target, specialized as a launch of that layer would be; the bundled cuobjdump disassembles
them, and sass.py reads their time loops.
"""
import dataclasses
import os

import torch
import triton

from ..configs import KERNELS, TARGETS, dtype_name, kernel_config, launch_waves
from ..kernels.cells import mufu_per_element
from ..kernels.config import kernel_constexprs
from ..kernels.fastmath import math_mode
from ..layers.backend import cudnn_rnn_allows_tf32
from .aot import compile_kernel
from .sass import loop_mix, resource_usage


def plan(cell, dtype, hidden_size, batch, bidirectional, proj_size, pass_, target):
    """The config the planner launches for this layer on `target`, or raise ValueError with its reason."""
    config, why = kernel_config(cell, dtype, hidden_size, proj_size, batch, 2 if bidirectional else 1,
                                TARGETS[target]["sms"], target, pass_)
    if config is None:
        raise ValueError(f"no kernel runs this layer on {target}: {why}")
    return config


def inspect_layer(cell, dtype, hidden_size, batch, bidirectional=False, proj_size=0, pass_="forward",
                  target="sm_90", cubin_dir=None):
    """Compile the kernels of `pass_` for this layer on `target` and read their time loops. Returns
    a JSON-able report; with cubin_dir, writes forward.cubin (and backward.cubin) there."""
    config = plan(cell, dtype, hidden_size, batch, bidirectional, proj_size, pass_, target)
    split = triton.cdiv(hidden_size, config.block_h)
    R = proj_size or hidden_size
    D = 2 if bidirectional else 1
    shape = (hidden_size, R, batch, D)
    # reported by kernel function: the saving forward is the forward kernel
    kernels = {kernel.replace("_save", ""): kernel for kernel in KERNELS[pass_]}
    allow_tf32 = dtype == torch.float32 and cudnn_rnn_allows_tf32()  # as the layer decides
    math, _ = math_mode(dtype, interpret=False, allow_tf32=allow_tf32)
    report = {"layer": dict(cell=cell, dtype=dtype_name(dtype), hidden_size=hidden_size, batch=batch,
                            bidirectional=bidirectional, proj_size=proj_size, pass_=pass_, target=target),
              "config": dict(dataclasses.asdict(config), split=split, grid=[triton.cdiv(batch, config.block_b), split, D],
                             launches=len(launch_waves(config, batch, hidden_size, D, TARGETS[target]["sms"])),
                             k_chunks=list(kernel_constexprs(cell, dtype, proj_size > 0, split, config, R,
                                                             interpret=False, allow_tf32=allow_tf32)["CHUNKS"])),
              "kernels": {}}
    for name, kernel in kernels.items():
        compiled = compile_kernel(kernel, cell, dtype, proj_size > 0, config, shape, target, allow_tf32)
        cubin = compiled.asm["cubin"]
        if cubin_dir:
            os.makedirs(cubin_dir, exist_ok=True)
            with open(os.path.join(cubin_dir, f"{name}.cubin"), "wb") as f:
                f.write(cubin)
        usage = resource_usage(cubin)
        mix = loop_mix(cubin)
        warps = config.warps(name)
        threads = 32 * warps
        # hidden units x batch rows a program owns, per thread: each needs its transcendentals once
        elements = config.block_h * config.block_b / threads
        entry = {"num_warps": warps, "registers": usage.get("REG", 0),
                 "spill_bytes": usage.get("STACK", 0) + usage.get("LOCAL", 0),
                 "shared_bytes": compiled.metadata.shared, "shared_limit": TARGETS[target]["smem"],
                 "time_loop": mix,
                 "cell_elements_per_thread": elements,
                 "mufu_per_cell_element": round(mix["mufu"] / elements, 2) if mix and elements else None,
                 "math": ["exact", "accurate", "approx"][math.value],
                 "mufu_the_math_takes": mufu_per_element(cell, name, math)}
        report["kernels"][name] = entry
    return report


def format_report(report):
    layer, config = report["layer"], report["config"]
    extras = (" bidirectional" if layer["bidirectional"] else "") + (
        f" proj_size={layer['proj_size']}" if layer["proj_size"] else "")
    lines = [f"{layer['cell']} {layer['dtype']} H={layer['hidden_size']} B={layer['batch']}{extras}"
             f" pass={layer['pass_']} target={layer['target']}",
             "config: " + " ".join(f"{k}={v}" for k, v in config.items())]
    for name, k in report["kernels"].items():
        lines.append(f"\n{name} kernel ({k['num_warps']} warps): {k['registers']} registers, "
                     f"{k['spill_bytes']} spill bytes, {k['shared_bytes']} of {k['shared_limit']} bytes of shared memory")
        mix = k["time_loop"]
        if mix is None:
            lines.append("  no time loop found")
            continue
        mma = ", ".join(f"{n} {kind}" for kind, n in mix["mma"].items()) or "none"
        lines += [
            f"  time loop, per warp per step: {mix['instructions']} instructions",
            f"    MMA: {mma}",
            f"    shared memory: {mix['shared_loads']['instructions']} loads "
            f"({mix['shared_loads']['bytes_per_warp']} B), {mix['shared_stores']['instructions']} stores "
            f"({mix['shared_stores']['bytes_per_warp']} B), {mix['shared_stores_between_mmas']} of them between MMAs",
            f"    global memory: {mix['global_loads']['instructions']} loads ({mix['global_loads']['bytes_per_warp']} B),"
            f" {mix['global_stores']['instructions']} stores ({mix['global_stores']['bytes_per_warp']} B),"
            f" {mix['async_copies']} async copies; exchange loads in flight at once: {mix['exchange_loads_in_flight']};"
            f" loads ahead read before the barrier wait: {mix['loads_ahead_read_early']}",
            f"    MUFU {mix['mufu']} ({k['mufu_per_cell_element']} per cell element; the cell's {k['math']} math "
            f"takes {k['mufu_the_math_takes']}), BAR.SYNC {mix['bar_sync']}, SHFL {mix['shuffles']}, "
            f"atomics {mix['atomics']}" + ("" if mix["polled_by_one_warp"] is None else
                                           f"; barrier polled by {'one warp' if mix['polled_by_one_warp'] else 'every warp'}"),
            "    inner loops (counted once): " + (", ".join(f"{loop['instructions']} instructions"
                                                       for loop in mix["inner_loops"]) or "none")
            + f"; of them read-backs left as a loop (a round trip per trip): {mix['exchange_loops']}",
            "    most frequent: " + ", ".join(f"{op} {n}" for op, n in mix["top"].items()),
        ]
    return "\n".join(lines)
