"""`persistrnn inspect`: the compiled time loop of the kernels a layer would run, read without a GPU.

The planner picks the config it would launch for the layer on the target (sm_80: an A100's 108
SMs, sm_90: an H100's 132); the kernels of the pass ("forward": the inference kernel; "train":
the forward that saves for the backward, and the backward kernel) are compiled ahead of time for
that target, specialized as a launch of that layer would be; the bundled cuobjdump disassembles
them. The time loop is the outermost loop of the SASS that holds the MMA instructions. Its body,
with any loop inside it (the barrier's poll) counted once, is what one warp issues per time step:
that static count, by kind, is the "per-step instruction mix".
"""
import collections
import dataclasses
import os
import re

import torch

from .aot import TARGETS, compile_kernel, disassemble, resource_usage

# opcode (before the first '.') -> kind reported
MMA_KINDS = {"HGMMA": "wgmma", "HMMA": "mma.sync", "DMMA": "mma.sync (fp64)", "IMMA": "mma.sync (int)"}
SHARED_LOADS = ("LDS", "LDSM")
SHARED_STORES = ("STS", "STSM")
GLOBAL_LOADS = ("LDG",)
GLOBAL_STORES = ("STG",)
ATOMICS = ("ATOM", "ATOMG", "ATOMS", "RED", "REDG")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. "LDG.E.128.CONSTANT"
    text: str

    @property
    def op(self):
        return self.opcode.split(".")[0]


def parse_sass(text):
    """The instructions of a `cuobjdump -sass` listing (one kernel), predicates dropped."""
    instructions = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            body = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2).strip())
            instructions.append(Instruction(int(m.group(1), 16), body.split()[0], body))
    return instructions


def loops(instructions):
    """(first, last) address of every loop: a branch back to an earlier (or its own) address."""
    found = []
    for ins in instructions:
        if ins.op == "BRA":
            target = re.search(r"0x([0-9a-f]+)", ins.text)
            if target and int(target.group(1), 16) <= ins.address:
                found.append((int(target.group(1), 16), ins.address))
    return found


def time_loop(instructions):
    """The kernel's loop over time steps: the outermost loop that holds MMA instructions, or
    without MMA (fp32 IEEE dots are FMAs) the one that holds the barrier's atomic, or the
    outermost loop."""
    found = loops(instructions)
    for kinds in (MMA_KINDS, ATOMICS):
        marks = [i.address for i in instructions if i.op in kinds]
        holding = [(lo, hi) for lo, hi in found if any(lo <= a <= hi for a in marks)]
        if holding:
            return max(holding, key=lambda span: span[1] - span[0])
    return max(found, key=lambda span: span[1] - span[0], default=None)


def access_bytes(ins):
    """Bytes one thread moves with a load/store instruction, from its width modifier."""
    mods = ins.opcode.split(".")[1:]
    if ins.op in ("LDSM", "STSM"):  # 8x8 b16 matrices: 4 bytes per thread per matrix
        return 4 * next((int(m) for m in mods if m in ("2", "4")), 1)
    for m in mods:
        if m in ("128", "64"):
            return int(m) // 8
        if m in ("U8", "S8"):
            return 1
        if m in ("U16", "S16"):
            return 2
    return 4


def step_mix(instructions, span):
    """The per-step instruction mix of one warp over the loop `span`, inner loops counted once."""
    lo, hi = span
    body = [i for i in instructions if lo <= i.address <= hi]
    ops = collections.Counter(i.op for i in body)

    def traffic(kinds):
        sel = [i for i in body if i.op in kinds]
        return {"instructions": len(sel), "bytes_per_warp": 32 * sum(access_bytes(i) for i in sel)}

    inner = [(a, b) for a, b in loops(instructions) if lo <= a and b <= hi and (a, b) != span]
    return {
        "instructions": len(body),
        "mma": {kind: ops[op] for op, kind in MMA_KINDS.items() if ops[op]},
        "shared_loads": traffic(SHARED_LOADS),
        "shared_stores": traffic(SHARED_STORES),
        "global_loads": traffic(GLOBAL_LOADS),
        "global_stores": traffic(GLOBAL_STORES),
        "async_copies": ops["LDGSTS"],
        "mufu": ops["MUFU"],
        "bar_sync": sum(1 for i in body if i.op == "BAR"),
        "shuffles": ops["SHFL"],
        "atomics": sum(ops[a] for a in ATOMICS),
        "inner_loops": [{"instructions": sum(1 for i in body if a <= i.address <= b)} for a, b in inner],
        "top": dict(ops.most_common(12)),
    }


def loop_mix(cubin):
    """The per-step instruction mix of a compiled kernel's time loop (step_mix), or None."""
    instructions = parse_sass(disassemble(cubin))
    span = time_loop(instructions)
    return step_mix(instructions, span) if span else None


def plan(cell, dtype, hidden_size, batch, bidirectional, proj_size, pass_, target):
    """The config the planner launches for this layer on `target`, or raise ValueError with its reason."""
    from ..layers.dispatch import kernel_config
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
    split = -(-hidden_size // config.block_h)
    R = proj_size or hidden_size
    D = 2 if bidirectional else 1
    shape = (hidden_size, R, batch, D)
    kernels = {"forward": "forward"} if pass_ == "forward" else {"forward": "forward_save", "backward": "backward"}
    from ..kernels.cells import mufu_per_element
    from ..kernels.skeleton import kernel_constexprs, math_mode
    from ..layers.dispatch import launch_waves
    from ..layers.functional import cudnn_rnn_allows_tf32
    allow_tf32 = dtype == torch.float32 and cudnn_rnn_allows_tf32()  # as the layer decides
    math, _ = math_mode(dtype, interpret=False, allow_tf32=allow_tf32)
    report = {"layer": dict(cell=cell, dtype=str(dtype).replace("torch.", ""), hidden_size=hidden_size, batch=batch,
                            bidirectional=bidirectional, proj_size=proj_size, pass_=pass_, target=target),
              "config": dict(dataclasses.asdict(config), split=split, grid=[-(-batch // config.block_b), split, D],
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
        threads = 32 * config.num_warps
        # hidden units x batch rows a program owns, per thread: each needs its transcendentals once
        elements = config.block_h * config.block_b / threads
        entry = {"registers": usage.get("REG", 0), "spill_bytes": usage.get("STACK", 0) + usage.get("LOCAL", 0),
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
        lines.append(f"\n{name} kernel: {k['registers']} registers, {k['spill_bytes']} spill bytes, "
                     f"{k['shared_bytes']} of {k['shared_limit']} bytes of shared memory")
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
            f"({mix['shared_stores']['bytes_per_warp']} B)",
            f"    global memory: {mix['global_loads']['instructions']} loads ({mix['global_loads']['bytes_per_warp']} B),"
            f" {mix['global_stores']['instructions']} stores ({mix['global_stores']['bytes_per_warp']} B),"
            f" {mix['async_copies']} async copies",
            f"    MUFU {mix['mufu']} ({k['mufu_per_cell_element']} per cell element; the cell's {k['math']} math "
            f"takes {k['mufu_the_math_takes']}), BAR.SYNC {mix['bar_sync']}, SHFL {mix['shuffles']}, "
            f"atomics {mix['atomics']}",
            "    inner loops (counted once): " + (", ".join(f"{loop['instructions']} instructions"
                                                       for loop in mix["inner_loops"]) or "none"),
            "    most frequent: " + ", ".join(f"{op} {n}" for op, n in mix["top"].items()),
        ]
    return "\n".join(lines)
