"""The tuner's config space for one layer, its static pruning, and a static cost to rank it.

Space, per (cell, dtype, pass, tier): BLOCK_B in BATCH_TILES; BLOCK_H a power of two from 16,
below the hidden size (split tier) or the one block that holds it (single tier); num_warps 4 or
8, and for the train pass the backward kernel's warps apart (4 or 8); num_stages 1 (the time loop
is not software-pipelined: its K-chunks are unrolled and the next step's loads are issued by
hand, so Triton's stages have nothing to pipeline). The kernels have no other variants: the
other choices (K-chunks, fast math, the poll) follow from the dtype and shapes.

Pruning, before any timing, in this order:
1. weights over the target's shared memory (an estimate, to skip hopeless compiles);
2. split configs whose SPLIT programs of one batch tile exceed the SMs: the barrier would wait
   for programs that never start (this check is a guarantee). A grid larger than the SMs but
   with SPLIT <= SMs runs as several launches one after another (configs.launch_waves);
3. the ahead-of-time compile for the target (aot.py), in parallel processes: spills, shared
   memory over the limit, or a compiler error. The unit compiled is one kernel (aot.KernelKey),
   compiled once: train configs that differ only in the other kernel's warps share it.
Batch tiles larger than the batch stay: padding rows cost little in a wgmma's N, and a larger
tile can be the only one that compiles on-chip (the GRU's train pass at H = 1024 needs 32 rows).

Static cost (lower is better): the modelled cycles of one step, from `persistrnn inspect`'s
per-step mix of each kernel of the pass, the sum of
- issue: instructions one warp issues per step x ceil(warps / 4) (an SM's 4 schedulers issue one
  instruction per cycle each, and a program's warps share them);
- the exchange's read-back: one L2 round trip (L2_ROUND_TRIP) per batch of exchange loads in flight
  at once (a read-back whose loads wait for one another costs several), and SPLIT - 1 for a
  read-back of the other programs' slots that the compiler left as a loop (one trip per slot);
- the tensor core's drains: WGMMA_DRAIN per wait for a group of wgmma (WARPGROUP.DEPBAR), which
  also holds the wgmma's reads of W through the shared-memory pipe;
- the split tier's barrier, BARRIER_CYCLES (the arrival's fence and atomic, the poll, the skew
  between programs).
The constants are the mid figures of a latency model of the sm_90 step (350-cycle L2 round trip;
8 wgmma of 64 x 16 x 16 reading 2 KiB of W each at 128 B per cycle). The instruction count alone
cannot see a latency chain. Summed over the pass's kernels, and ranked times the layer's launches
(each runs every step). It ranks; it is not a time.
"""
import dataclasses

import torch
import triton

from ..configs import KERNELS, TARGETS, dtype_name, launch_waves, programs
from ..kernels.config import KernelConfig
from ..layers.backend import cudnn_rnn_allows_tf32
from .aot import compile_kernels, kernel_key
from .capacity import BATCH_TILES, NUM_WARPS, weight_bytes

BARRIER_CYCLES = 1000
L2_ROUND_TRIP = 350
WGMMA_DRAIN = 160
SCHEDULERS_PER_SM = 4
NUM_STAGES = (1,)


@dataclasses.dataclass(frozen=True)
class Layer:
    cell: str
    dtype: object  # torch.dtype
    pass_: str  # "forward" or "train"
    hidden_size: int
    proj_size: int = 0
    num_directions: int = 1
    batch: int = 16

    @property
    def width(self):
        return self.proj_size or self.hidden_size

    def split(self, config):
        return triton.cdiv(self.hidden_size, config.block_h)

    def programs(self, config):
        return programs(config, self.batch, self.hidden_size, self.num_directions)

    def launches(self, config, sms):
        """How many launches one after another the layer's grid takes on `sms` SMs (0: it cannot
        run there, one batch tile's SPLIT programs exceed the SMs)."""
        return len(launch_waves(config, self.batch, self.hidden_size, self.num_directions, sms) or ())

    def describe(self):
        extra = (f" proj={self.proj_size}" if self.proj_size else "") + (" bidir" if self.num_directions == 2 else "")
        return (f"{self.cell} {dtype_name(self.dtype)} {self.pass_} H={self.hidden_size}{extra} "
                f"B={self.batch}")


def config_space(layer):
    """Every config of the space for this layer, before pruning."""
    single = max(16, 1 << (layer.hidden_size - 1).bit_length())
    blocks = [b for b in (16, 32, 64, 128) if b < layer.hidden_size] + [single]
    backward = NUM_WARPS if layer.pass_ == "train" else (None,)
    return [KernelConfig(block_b, block_h, warps, stages, bwd)
            for block_b in BATCH_TILES for block_h in dict.fromkeys(blocks) for warps in NUM_WARPS
            for stages in NUM_STAGES for bwd in backward]


def cheap_prune(layer, configs, target, sms):
    """(kept, dropped): dropped is [(config, reason)] for steps 1-2 of the pruning."""
    kept, dropped = [], []
    smem = TARGETS[target]["smem"]
    for c in configs:
        split = layer.split(c)
        if weight_bytes(layer.dtype, c.block_h, layer.width, layer.proj_size > 0) > smem:
            dropped.append((c, f"weights over {smem} B of shared memory"))
        elif not layer.launches(c, sms):
            dropped.append((c, f"SPLIT={split} programs of one batch tile cannot all be resident on {sms} SMs"))
        else:
            kept.append(c)
    return kept, dropped


def _tf32_modes(layer):
    """fp32's dot modes, the one torch's flag sets now first (its instructions are the ones counted)."""
    tf32_now = cudnn_rnn_allows_tf32()
    return (tf32_now, not tf32_now) if layer.dtype == torch.float32 else (False,)


def kernel_keys(layer, config, target):
    """The compiles a config of the layer takes: [(kernel name, dot mode, aot.KernelKey)], in the
    order compiled_cost judges them, and the keys whose time loop is read (the dot mode of now)."""
    shape = (layer.hidden_size, layer.width, layer.batch, layer.num_directions)
    modes = _tf32_modes(layer)
    keys = [(kernel, allow_tf32, kernel_key(kernel, layer.cell, layer.dtype, layer.proj_size > 0, config, shape,
                                            target, allow_tf32))
            for kernel in KERNELS[layer.pass_] for allow_tf32 in modes]
    return keys, {key for _, allow_tf32, key in keys if allow_tf32 == modes[0]}


def compile_requests(layers, target, sms=None):
    """(keys, keys whose time loop is read): every distinct kernel compile that ranking `layers` on
    `target` takes (the configs that pass cheap_prune), each once."""
    keys, mix = {}, set()
    for layer in layers:
        kept, _ = cheap_prune(layer, config_space(layer), target, sms or TARGETS[target]["sms"])
        for config in kept:
            mine, read = kernel_keys(layer, config, target)
            keys.update((key, None) for _, _, key in mine)
            mix |= read
    return list(keys), mix


def compiled_cost(layer, config, target, compiled=None):
    """Compile the pass's kernels for `target` as a launch of `layer` would; returns
    {"on_chip", "reason", "cost", "kernels": {name: {registers, spill_bytes, shared_bytes, instructions}}}.
    fp32 compiles with TF32 dots and with IEEE ones (torch's flag may change after tuning) and
    must be on-chip with both; the instructions counted are those of the flag set now. Each kernel
    is compiled once per process (aot.compile_kernels); `compiled` may hold them already."""
    keys, read = kernel_keys(layer, config, target)
    if compiled is None or not all(key in compiled for _, _, key in keys):
        compiled = compile_kernels([key for _, _, key in keys], mix=read, workers=1)
    multiple_modes = layer.dtype == torch.float32
    row = {"on_chip": True, "reason": None, "cost": 0, "kernels": {}}
    for kernel, allow_tf32, key in keys:
        done = compiled[key]
        res = done.resources
        if res.failed:
            return dict(row, on_chip=False, reason=f"{kernel}: {done.error}", cost=None)
        if not res.on_chip:
            why = "spills" if res.stack or res.local else f"shared memory {res.shared} > {res.smem_limit} B"
            dots = (" with TF32 dots" if allow_tf32 else " with IEEE dots") if multiple_modes else ""
            return dict(row, on_chip=False, reason=f"{kernel}: {why}{dots}", cost=None)
        if key not in read:
            continue
        if done.mix is None:
            return dict(row, on_chip=False, reason=f"{kernel}: no time loop found in the SASS", cost=None)
        steps = done.mix["instructions"]
        warps = key.num_warps
        row["kernels"][kernel] = {"registers": res.regs, "spill_bytes": res.stack + res.local,
                                  "shared_bytes": res.shared, "instructions": steps, "num_warps": warps}
        row["cost"] += step_cycles(done.mix, warps, layer.split(config))
    return row


def step_cycles(mix, warps, split):
    """The static cost of one kernel's step (see the module doc) from its time loop's mix, for
    SPLIT programs (a barrier when more than one)."""
    read_backs = (triton.cdiv(mix["exchange_loads"], max(1, mix["exchange_loads_in_flight"]))
                  + mix["exchange_loops"] * (split - 1))  # a loop over the other programs' slots
    return (mix["instructions"] * triton.cdiv(warps, SCHEDULERS_PER_SM) + read_backs * L2_ROUND_TRIP
            + mix["wgmma_waits"] * WGMMA_DRAIN + (BARRIER_CYCLES if split > 1 else 0))


def static_rank(layer, target, sms=None, workers=None, progress=None):
    """The layer's pruned space on `target`, ranked by static cost: (ranked, dropped), ranked a list
    of (config, row) best first (ties: fewer programs, then smaller tiles), dropped a list of
    (config, reason). Compiles each distinct kernel once (aot.compile_kernels: the kernels train
    configs share, and any an earlier call compiled, are not compiled again) in `workers` processes
    (default: all cores); progress() after each compile."""
    sms = sms or TARGETS[target]["sms"]
    kept, dropped = cheap_prune(layer, config_space(layer), target, sms)
    keys, read = compile_requests([layer], target, sms)
    compiled = compile_kernels(keys, mix=read, workers=workers, progress=progress)
    ranked = []
    for c in kept:
        row = compiled_cost(layer, c, target, compiled)
        if row["on_chip"]:
            ranked.append((c, row))
        else:
            dropped.append((c, row["reason"]))
    # launches run one after another: a layer that needs several costs each one's steps
    ranked.sort(key=lambda cr: (cr[1]["cost"] * layer.launches(cr[0], sms), layer.programs(cr[0]), cr[0].block_h * cr[0].block_b,
                                cr[0].num_warps))
    return ranked, dropped
