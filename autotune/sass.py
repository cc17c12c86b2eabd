"""Reading a compiled kernel without a GPU: its resources (registers, stack, local memory) and SASS from
the cuobjdump bundled with triton, and its time loop's per-step instruction mix.

The time loop is the outermost loop of the SASS that holds the MMA instructions. Its body, with any
loop inside it (the barrier's poll) counted once, is what one warp issues per time step: that
static count, by kind, is the "per-step instruction mix".
"""
import collections
import dataclasses
import os
import re
import subprocess
import tempfile

import triton


def bundled_tool(name):
    """The path of a CUDA tool bundled with triton (cuobjdump, ptxas): the ones its compiles use."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump_run(cubin: bytes, *flags):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([bundled_tool("cuobjdump"), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes):
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump_run(cubin, "--dump-resource-usage")))
    return {k: int(v) for k, v in fields.items()}


def disassemble(cubin: bytes):
    """The SASS of a cubin, as `cuobjdump -sass` prints it."""
    return _cuobjdump_run(cubin, "-sass")


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


def _is_exchange_load(i):
    """A load of what other programs wrote (L2-coherent: .STRONG in SASS, `.cg` in Triton)."""
    return i.op in GLOBAL_LOADS and ".STRONG" in i.opcode


def exchange_loads_in_flight(body):
    """The most exchange loads issued one after another with no shared-memory store between them:
    how many of a step's read-backs are in flight at once before the first is staged for the MMA
    (1 or 2 when each waits for the last one's store)."""
    most = run = 0
    for i in body:
        if _is_exchange_load(i):
            run += 1
            most = max(most, run)
        elif i.op in SHARED_STORES:
            run = 0
    return most


def _registers(i):
    """The registers an instruction names (a .64 operand is a pair)."""
    regs = set()
    for n, pair in re.findall(r"\bR(\d+)(\.64)?\b", i.text):
        regs.update(range(int(n), int(n) + (2 if pair else 1)))
    return regs


def _address(i):
    """A memory instruction's address operand ([R116.64], desc[UR4][R116.64+0x8]), or None."""
    m = re.search(r"(desc\[[^\]]*\])?\[[^\]]*\]", i.text)
    return m.group(0) if m else None


def _poll(body, inner):
    """(the barrier's poll loop (first, last), the addresses of its poll loads), or (None, set()):
    the poll loop is the inner loop that votes, and its first poll may be peeled before it (the
    last load of the same address between the arrival and the loop: ptxas rotates the loop)."""
    voting = [(a, b) for a, b in inner if any(a <= i.address <= b and i.op == "VOTE" for i in body)]
    if not voting:
        return None, set()
    a, b = voting[0]
    polled = {_address(i) for i in body if a <= i.address <= b and _is_exchange_load(i)}
    arrival = max((i.address for i in body if i.op in ATOMICS and i.address < a), default=-1)
    peeled = [i.address for i in body if arrival < i.address < a and _is_exchange_load(i) and _address(i) in polled]
    return (a, b), {i.address for i in body if a <= i.address <= b and _is_exchange_load(i)} | set(peeled[-1:])


def loads_ahead_read_early(body, inner):
    """How many of the global loads issued between the barrier's arrival (its atomic) and its poll
    loop, the next step's inputs loaded ahead, have their registers named before the poll loop
    ends: each such read stalls the warp on the load's latency before the wait (0: all of them
    stay in flight across it). None without a barrier."""
    arrival = next((i.address for i in body if i.op in ATOMICS), None)
    if arrival is None:
        return None
    poll, polls = _poll(body, inner)
    if poll is None or poll[0] < arrival:
        return None
    early = 0
    for k, load in enumerate(body):
        if arrival < load.address < poll[0] and load.op in GLOBAL_LOADS and load.address not in polls:
            first = int(re.search(r"\bR(\d+)", load.text).group(1))  # the destination
            written = set(range(first, first + max(1, access_bytes(load) // 4)))
            early += any(written & _registers(i) for i in body[k + 1:] if i.address <= poll[1])
    return early


def polled_by_one_warp(body, inner):
    """Whether one warp of a program polls the barrier: a branch on the thread index against 32
    skips the poll loop and its peeled first poll (the other warps wait at the CTA barrier). None
    without a poll loop."""
    poll, polls = _poll(body, inner)
    if poll is None:
        return None
    before = [i for i in body if i.address < min(polls | {poll[0]})]
    tid = {r for i in before if i.op == "S2R" and "SR_TID.X" in i.text for r in _registers(i)}
    compared = any(i.op == "ISETP" and tid & _registers(i) and re.search(r",\s*0x20\b", i.text) for i in before)
    targets = [int(m.group(1), 16) for i in before if i.op == "BRA" for m in [re.search(r"0x([0-9a-f]+)", i.text)] if m]
    return compared and any(t > poll[1] for t in targets)


def exchange_loops(body, inner):
    """How many inner loops other than the barrier's poll (the loop that votes) hold exchange
    loads: a read-back the compiler left as a loop, each trip waiting for its loads before the
    next, so one L2 round trip per trip (a static count sees one trip)."""
    poll, _ = _poll(body, inner)
    return sum(1 for a, b in inner
               if (a, b) != poll and any(a <= i.address <= b and _is_exchange_load(i) for i in body))


def shared_stores_between_mmas(body):
    """Shared-memory stores after the step's first MMA instruction and before its last: an MMA
    operand staged while earlier MMAs of the step run (0: everything is staged first)."""
    mma = [i.address for i in body if i.op in MMA_KINDS]
    return sum(1 for i in body if i.op in SHARED_STORES and mma and mma[0] < i.address < mma[-1])


def step_mix(instructions, span):
    """The per-step instruction mix of one warp over the loop `span`, inner loops counted once."""
    lo, hi = span
    body = [i for i in instructions if lo <= i.address <= hi]
    ops = collections.Counter(i.op for i in body)

    def traffic(kinds):
        sel = [i for i in body if i.op in kinds]
        return {"instructions": len(sel), "bytes_per_warp": 32 * sum(access_bytes(i) for i in sel)}

    inner = [(a, b) for a, b in loops(instructions) if lo <= a and b <= hi and (a, b) != span]
    _, polls = _poll(body, inner)
    return {
        "instructions": len(body),
        "mma": {kind: ops[op] for op, kind in MMA_KINDS.items() if ops[op]},
        "shared_loads": traffic(SHARED_LOADS),
        "shared_stores": traffic(SHARED_STORES),
        "global_loads": traffic(GLOBAL_LOADS),
        "global_stores": traffic(GLOBAL_STORES),
        "async_copies": ops["LDGSTS"],
        # outside inner loops, and not the barrier's polls: they are not exchange read-backs
        "exchange_loads": sum(1 for i in body if _is_exchange_load(i) and i.address not in polls
                              and not any(a <= i.address <= b for a, b in inner)),
        "exchange_loads_in_flight": exchange_loads_in_flight(body),
        "loads_ahead_read_early": loads_ahead_read_early(body, inner),
        "polled_by_one_warp": polled_by_one_warp(body, inner),
        "exchange_loops": exchange_loops(body, inner),
        "wgmma_waits": sum(1 for i in body if i.opcode.startswith("WARPGROUP.DEPBAR")),
        "shared_stores_between_mmas": shared_stores_between_mmas(body),
        "mufu": ops["MUFU"],
        "bar_sync": sum(1 for i in body if i.op == "BAR"),
        "shuffles": ops["SHFL"],
        "atomics": sum(ops[a] for a in ATOMICS),
        "inner_loops": [{"instructions": sum(1 for i in body if a <= i.address <= b),
                         "exchange_loads": sum(1 for i in body if a <= i.address <= b and _is_exchange_load(i))}
                        for a, b in inner],
        "top": dict(ops.most_common(12)),
    }


def loop_mix(cubin):
    """The per-step instruction mix of a compiled kernel's time loop (step_mix), or None."""
    instructions = parse_sass(disassemble(cubin))
    span = time_loop(instructions)
    return step_mix(instructions, span) if span else None
