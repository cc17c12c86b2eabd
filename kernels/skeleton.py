"""What the persistent forward and backward kernels share: the program's tile of W_hh, the K-chunked
recurrent product, the gate split, the bounded barrier of the split tier, the compile-time
parameters and the launch.

Grid (cdiv(B, BLOCK_B), SPLIT, D): a program owns a batch tile of BLOCK_B rows of one direction
and BLOCK_H hidden units; SPLIT = cdiv(H, BLOCK_H) programs share a batch tile. A grid larger
than the GPU's SMs runs as waves, launches of blocks of batch tiles and directions one after
another (below, "waves"); a launch's first direction is the constexpr DIR0.

The recurrent product is computed swapped, gates^T = W_hh[my rows] @ h^T: one MMA with
M = 4 * BLOCK_H (all gates of the program's units, gate-major; the GRU's fourth gate is zero rows,
since M must be a power of two and wgmma needs M >= 64), N = BLOCK_B and K = R. W_hh's rows stay
in shared memory as the A operand for the whole sequence and the tensor core reads them there
(wgmma on sm_90); each gate value and each cell element is then computed once, by one thread.
K is cut into power-of-two chunks that sum to R (768 = 6 x 128): no MMA work or shared memory
goes to padding, and no W chunk is too large to stage through registers when it is loaded.
The split tier reads h, the B operand, back from memory in groups of K-chunks of at most
H_GROUP_BYTES: a group's chunks are loaded, then multiplied, and the next group reuses its shared
memory (a 64-row tile of H = 1024 fits beside its W that way, in two groups). Loading every chunk
of a group before its MMAs matters: a load between two MMAs makes ptxas hold the loop-invariant
wgmma descriptors in vector registers (two R2UR per wgmma) instead of uniform ones.

The split tier's barrier is a counter per (direction, batch tile) that only grows: a program
arrives (release atomic_add) after publishing its part of the step, and waits until SPLIT more
have arrived. The wait is bounded by MAX_SPIN polls, after which the program stops waiting and
adds one to the device's timeout count, so no input hangs the GPU; the host raises it without a sync (below).
Compiled, the poll is a warp-uniform PTX loop (vote.sync), so that ptxas keeps the loop-invariant
wgmma descriptors in uniform registers across it (a plain Triton while loop there costs two
R2UR per wgmma and spills at 4 warps); the interpreter runs the same protocol in Triton.
"""
import contextlib
import contextvars
import dataclasses

import torch
import triton
import triton.language as tl

from .cells import ACCURATE, APPROX, EXACT, GRU, HIGH, LOW, LSTM, NONE
from .interpreter import interpreted, interpreting


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How a layer is cut into programs: block_b batch rows and block_h hidden units per program
    (SPLIT = cdiv(H, block_h) programs share a batch tile), and the launch's num_warps and num_stages;
    backward_warps, if set, is the backward kernel's num_warps (one kernel's registers may need
    more warps than the other's)."""
    block_b: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 1
    backward_warps: int = None

    def warps(self, kernel):
        """num_warps of the "forward" or "backward" kernel."""
        return self.backward_warps if kernel == "backward" and self.backward_warps else self.num_warps


# widest K chunk of the recurrent product on tensor cores (fp16, bf16, TF32): wide enough that
# chunks cost few fences and waits, narrow enough that a chunk of W, or of a 64-row h, stages
# through registers without spilling. FMA dots (fp32 without TF32) and fp64's hold a whole chunk
# of both operands in registers: FMA_K_CHUNK.
K_CHUNK = 128
FMA_K_CHUNK = 32
MIN_CHUNK = 16  # the MMA's K granularity (and tl.dot's smallest dimension)


def k_chunks(width, widest=K_CHUNK):
    """Power-of-two chunk widths (<= widest, >= MIN_CHUNK) that sum to `width` rounded up to a
    multiple of MIN_CHUNK: 768 -> 6 x 128, 1000 -> 7 x 128, 64, 32, 16."""
    width = -(-width // MIN_CHUNK) * MIN_CHUNK
    chunks = [widest] * (width // widest)
    rest = width % widest
    bit = widest // 2
    while rest:
        if rest >= bit:
            chunks.append(bit)
            rest -= bit
        bit //= 2
    return tuple(chunks)


def recurrent_chunks(split, has_proj, block_h, width, widest=K_CHUNK):
    """The K-chunks of the recurrent product. One program without proj_size multiplies its own
    h tile, [BLOCK_H, BLOCK_B]: one chunk of BLOCK_H. Otherwise h is read back as R rows."""
    return (block_h,) if split == 1 and not has_proj else k_chunks(width, widest)


@triton.jit
def _program(H, DIR0: tl.constexpr, BLOCK_H: tl.constexpr):
    """The program's ids in this launch's grid (batch tiles, SPLIT, directions): pid_b, pid_h and
    pid_d index the launch's scratch (exchange buffer, barrier counters); its direction in the
    layer, DIR0 + pid_d (a launch may run the reverse direction alone: `launch`), indexes the
    tensors and sets the time order; and its hidden units."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_u = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    return pid_b, pid_h, pid_d, DIR0 + pid_d, offs_u, offs_u < H


@triton.jit
def _batch_tile(lengths_ptr, B, pid_b, BLOCK_B: tl.constexpr):
    """The program's batch rows, their mask, each row's length."""
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    return offs_b, mask_b, tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)


@triton.jit
def _time_index(step, length, direction):
    """Per batch row, the time index of `step` in the direction's order: the reverse direction
    starts at each row's own last step. int64, for the (t, b) strides of long sequences."""
    return tl.where(direction == 1, length - 1 - step, step).to(tl.int64)


@triton.jit
def _next(it):
    """The iteration whose inputs are loaded ahead, before the barrier of iteration `it`."""
    return it + 1


@triton.jit
def _gate_rows(pid_h, H, G: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row m of the program's W tile (4 * BLOCK_H rows, gate-major: m = gate * BLOCK_H + unit) is
    row gate * H + unit of the stacked W_hh [G * H, R]; rows of a fourth GRU gate or past H are masked."""
    m = tl.arange(0, 4 * BLOCK_H)
    gate = m // BLOCK_H
    unit = pid_h * BLOCK_H + m % BLOCK_H
    return gate * H + unit, (gate < G) & (unit < H)


@triton.jit
def _load_chunks(ptr, n_offsets, n_mask, K, stride_k, CHUNKS: tl.constexpr, K_FIRST: tl.constexpr,
                 STATE_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """The K-chunks of the matrix (n, k) -> ptr[n_offsets[n] + k * stride_k], zero for k >= K or a
    masked n: a tuple of one tile per width in CHUNKS, [width, N] if K_FIRST else [N, width].
    Loads are upcast at once (the interpreter's bf16 arithmetic is wrong), then cast to the MMA
    operand type: lossless, and a no-op pair once compiled."""
    tiles = ()
    start = 0
    for c in tl.static_range(len(CHUNKS)):
        offs_k = start + tl.arange(0, CHUNKS[c])
        if K_FIRST:
            tile = tl.load(ptr + offs_k[:, None] * stride_k + n_offsets[None, :],
                           mask=(offs_k[:, None] < K) & n_mask[None, :], other=0.0)
        else:
            tile = tl.load(ptr + n_offsets[:, None] + offs_k[None, :] * stride_k,
                           mask=n_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        tiles = tiles + (tile.to(STATE_DTYPE).to(MMA_DTYPE),)
        start += CHUNKS[c]
    return tiles


@triton.jit
def _chunked_dot(a, b, STATE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """sum over chunks c of a[c] @ b[c], chained on one accumulator (no reduction across warps)."""
    acc = tl.dot(a[0], b[0], input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
    for c in tl.static_range(1, len(a)):
        acc = tl.dot(a[c], b[c], acc, input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
    return acc


@triton.jit
def _dot_from_memory(a, ptr, offs_n, K, stride_k, CHUNKS: tl.constexpr, GROUP: tl.constexpr,
                     STATE_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """sum over chunks c of a[c] @ B[chunk c], B (k, n) = ptr[k * stride_k + offs_n[n]] (zero for
    k >= K), read through L2 (.cg: other programs wrote it), GROUP chunks at a time: a group's
    chunks are loaded, then multiplied, so its shared-memory buffers are reused by the next group
    (see the module doc)."""
    start = 0
    for g in tl.static_range(0, len(CHUNKS), GROUP):
        group = ()
        for c in tl.static_range(g, min(g + GROUP, len(CHUNKS))):
            offs_k = start + tl.arange(0, CHUNKS[c])
            group = group + (tl.load(ptr + offs_k[:, None] * stride_k + offs_n[None, :], mask=offs_k[:, None] < K,
                                     other=0.0, cache_modifier=".cg").to(STATE_DTYPE).to(MMA_DTYPE),)
            start += CHUNKS[c]
        for c in tl.static_range(g, min(g + GROUP, len(CHUNKS))):
            if c == 0:
                acc = tl.dot(a[0], group[0], input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
            else:
                acc = tl.dot(a[c], group[c - g], acc, input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
    return acc


@triton.jit
def _split4(gates):
    """[..., gate // 2, gate % 2] -> the four gates."""
    even, odd = tl.split(gates)
    g0, g2 = tl.split(even)
    g1, g3 = tl.split(odd)
    return g0, g1, g2, g3


@triton.jit
def _split_gates(acc, BLOCK_H: tl.constexpr, N: tl.constexpr):
    """[4 * BLOCK_H, N] gate-major rows -> the four gates, [BLOCK_H, N] each."""
    return _split4(tl.permute(tl.reshape(acc, [2, 2, BLOCK_H, N]), (2, 3, 0, 1)))


@triton.jit
def _split_gate_columns(t, BLOCK_H: tl.constexpr):
    """[K, 4 * BLOCK_H] gate-major columns -> the four gates' columns, [K, BLOCK_H] each."""
    K: tl.constexpr = t.shape[0]
    return _split4(tl.permute(tl.reshape(t, [K, 2, 2, BLOCK_H]), (0, 3, 1, 2)))


@triton.jit
def _join_gates(g0, g1, g2, g3, BLOCK_H: tl.constexpr, N: tl.constexpr):
    """The inverse of _split_gates."""
    gates = tl.join(tl.join(g0, g2), tl.join(g1, g3))  # [unit, n, gate // 2, gate % 2]
    return tl.reshape(tl.permute(gates, (2, 3, 0, 1)), [4 * BLOCK_H, N])


@triton.jit
def _xbuf_tile(xbuf_ptr, parity, pid_d, pid_b, slot, ROWS, SLOTS: tl.constexpr, BLOCK_B: tl.constexpr):
    """The [ROWS, BLOCK_B] block (row-major) of the launch's exchange buffer
    (2 step parities, directions, batch tiles, SLOTS, ROWS, BLOCK_B)."""
    block = ((parity * tl.num_programs(2) + pid_d) * tl.num_programs(0) + pid_b) * SLOTS + slot
    return xbuf_ptr + block.to(tl.int64) * ROWS * BLOCK_B


@triton.jit
def _arrive(counter_ptr):
    tl.debug_barrier()  # every thread's exchange-buffer stores are issued before the release below
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _poll(counter_ptr, target, budget):
    """Compiled: every thread polls with acquire loads until the counter reaches `target` or
    `budget` polls are spent, a warp leaving the loop together (vote.sync: the branch is uniform);
    then the program agrees (bar.red.and) on whether every thread saw the target. 1 if so, else 0."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p_wait, p_spin, p_any, p_seen, p_all;
        .reg .u32 polls;
        mov.u32 polls, 0;
        POLL:
        ld.acquire.gpu.global.u32 $0, [$1];
        setp.lt.s32 p_wait, $0, $2;
        setp.lt.u32 p_spin, polls, $3;
        and.pred p_wait, p_wait, p_spin;
        vote.sync.any.pred p_any, p_wait, 0xffffffff;
        add.u32 polls, polls, 1;
        @p_any bra POLL;
        setp.ge.s32 p_seen, $0, $2;
        bar.red.and.pred p_all, 0, p_seen;
        selp.s32 $0, 1, 0, p_all;
        }""", "=r,l,r,r", [counter_ptr, target, budget], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait(counter_ptr, target, alive, MAX_SPIN, INTERPRET: tl.constexpr):
    """Wait until `target` programs have arrived, for at most MAX_SPIN polls. Returns False on
    timeout; a program that timed out before (alive False) no longer waits."""
    budget = tl.where(alive, MAX_SPIN, 0)
    if INTERPRET:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins = 0
        while (arrived < target) & (spins < budget):
            arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        seen = arrived >= target
    else:
        seen = _poll(counter_ptr, target, budget) != 0
    return alive & seen


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


# the interpreter's stand-in for the hardware's transcendentals (cells.py, EMULATE)
_EMULATION = contextvars.ContextVar("persistrnn_emulated_math", default=NONE)


@contextlib.contextmanager
def emulating_math(direction=LOW):
    """Inside the block, interpreted kernels compute tanh and sigmoid as compiled ones would, with
    each hardware instruction replaced by the exact value moved by its error bound (cells.py:
    EMULATE, LOW toward zero or HIGH away from it), instead of exactly: accuracy checks on CPU."""
    if direction not in (LOW, HIGH):
        raise ValueError(f"emulating_math: direction must be cells.LOW or cells.HIGH, got {direction!r}")
    token = _EMULATION.set(direction)
    try:
        yield
    finally:
        _EMULATION.reset(token)


def math_mode(dtype, *, interpret, allow_tf32):
    """(cells.MATH, cells.EMULATE) for a kernel in `dtype`: APPROX for bf16 and fp32 with TF32 (their
    operands round to 8 and 10 bits), ACCURATE for fp16 (whose outputs round finer than tanh.approx's
    error), EXACT otherwise; the interpreter runs EXACT unless emulating_math."""
    if dtype == torch.bfloat16 or (dtype == torch.float32 and allow_tf32):
        math = APPROX
    elif dtype == torch.float16:
        math = ACCURATE
    else:
        return EXACT, NONE
    emulate = _EMULATION.get() if interpret else NONE
    if interpret and emulate == NONE:
        return EXACT, NONE
    return math, emulate


# the most of h the split tier reads back at once (see the module doc)
H_GROUP_BYTES = 64 * 1024


def kernel_constexprs(cell, dtype, has_proj, split, config, width, *, interpret, allow_tf32):
    """The compile-time parameters both kernels take (also used by the ahead-of-time compile), for
    a layer whose recurrent input (hidden or proj size) is `width` wide."""
    w_dtype = _TL_DTYPE[dtype]
    # the interpreter's bf16 arithmetic is wrong: multiply bf16-rounded values in fp32 there
    mma_dtype = tl.float32 if (interpret and dtype == torch.bfloat16) else w_dtype
    state = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "tf32" if (dtype == torch.float32 and allow_tf32 and not interpret) else "ieee"
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or precision == "tf32"
    chunks = recurrent_chunks(split, has_proj, config.block_h, width, K_CHUNK if tensor_cores else FMA_K_CHUNK)
    chunk_bytes = max(chunks) * config.block_b * torch.finfo(dtype).bits // 8
    math, emulate = math_mode(dtype, interpret=interpret, allow_tf32=allow_tf32)
    return dict(CELL=LSTM if cell == "lstm" else GRU, HAS_PROJ=has_proj, SPLIT=split, BLOCK_B=config.block_b,
                BLOCK_H=config.block_h, CHUNKS=tuple(chunks), H_GROUP=max(1, H_GROUP_BYTES // chunk_bytes),
                W_DTYPE=w_dtype, MMA_DTYPE=mma_dtype, STATE_DTYPE=state, INPUT_PRECISION=precision, MATH=math,
                EMULATE=emulate, INTERPRET=interpret)


def state_dtype(dtype):
    """The dtype of the state, the saved activations and the exchange buffers of partial sums."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Barrier polls before a program gives up: seconds on a GPU, far beyond any real step.
MAX_SPIN = {"compiled": 1 << 24, "interpret": 1 << 20}


class BarrierTimeout(RuntimeError):
    pass


def split_scratch(split, D, grid_b, buffer_shape, buffer_dtype, device, interpret=False):
    """The split tier's scratch: the step-parity exchange buffer (2, D, grid_b, *buffer_shape), one
    barrier counter per (direction, batch tile), and the device's timeout count. A single program
    gets stubs. D and grid_b: the launch's grid (directions, batch tiles). The counters are zeroed
    by a fill in the launch's stream, so a replayed CUDA graph starts from zero too. Interpreted,
    the exchange buffer starts as NaN, so a read of a slot nobody has written yet (a broken
    barrier) shows in the outputs."""
    xbuf = torch.empty((2, D, grid_b, *buffer_shape) if split > 1 else (1,), dtype=buffer_dtype, device=device)
    if interpret:
        xbuf.fill_(float("nan"))
    counters = torch.zeros(D * grid_b if split > 1 else 1, dtype=torch.int32, device=device)
    return xbuf, counters, _watch(device).count


# ---- barrier watch: the timeout count, read without a host synchronization ----

class _BarrierWatch:
    """One device's count of programs whose barrier wait timed out (kernels only add to it; the
    host never writes it, so no timeout can be lost to a reset), its host copy (pinned memory; the
    count itself on CPU), and how many of them have been raised already."""

    def __init__(self, device):
        with torch.inference_mode(False):  # made under inference_mode, it could not be copied into later
            self.count = torch.zeros(1, dtype=torch.int32, device=device)
            self.host = self.count if device.type == "cpu" else torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.raised = 0
        self.launches = []  # what ran since the last raise, for the error message


_WATCHES = {}
_LAUNCHES_KEPT = 8


def _watch(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _WATCHES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("persistrnn: run a layer once on this device before capturing it in a CUDA graph "
                               "(its first launch compiles the kernels and allocates the timeout count)")
        _WATCHES[device] = _BarrierWatch(device)
    return _WATCHES[device]


def _after_launch(watch, description):
    """Queue the count's copy to the host behind the launch, on the count's device's stream. Copies
    land in stream order, so the host copy only grows too; a copy still in flight is merely late.
    Not while a CUDA graph is captured: a replay's timeouts reach the host at raise_if_failed()."""
    watch.launches = (watch.launches + [description])[-_LAUNCHES_KEPT:]
    if watch.count.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        with torch.cuda.device(watch.count.device):
            watch.host.copy_(watch.count, non_blocking=True)


def check_barriers(device, wait=False):
    """Raise BarrierTimeout if more programs on `device` have timed out than were raised before.
    wait=False (each launch): read the host copy as it is, never blocking; wait=True
    (raise_if_failed): synchronize the device and copy the count first."""
    watch = _watch(device)
    if wait and watch.count.device.type == "cuda":
        torch.cuda.synchronize(watch.count.device)
        watch.host.copy_(watch.count)
    count = int(watch.host.numpy()[0])  # host memory: reading it waits for nothing
    if count > watch.raised:
        timed_out, watch.raised = count - watch.raised, count
        launches, watch.launches = watch.launches, []
        raise BarrierTimeout(
            f"persistrnn: a barrier of a split kernel timed out ({timed_out} program(s)): its programs were not "
            "all running at once, and the outputs of that launch (and of what used them) are invalid. Launches "
            "since the last check, newest last: " + "; ".join(launches))


def raise_if_failed(device=None):
    """Wait for `device` (default: every device a persistent kernel ran on) and raise BarrierTimeout
    if a persistent kernel's barrier timed out since the last raise. Launches check without
    waiting, so a timeout surfaces at a later launch once its count has reached the host, or here."""
    devices = [device] if device is not None else list(_WATCHES)
    for d in devices:
        check_barriers(d, wait=True)


# ---- waves: a layer's grid as several launches, one after another ----
# A wave is (tile0, tiles, dir0, dirs): `tiles` batch tiles from tile0 and `dirs` directions from
# dir0 (layers/dispatch.py: launch_waves). Batch rows and directions are independent, so a grid
# that cannot be resident at once runs as waves that each can. The launchers run a wave on its
# own rows: the tensors with the batch at dim 1 as views, the (D, B, X) states copied in and out
# (they are small); the direction reaches the kernel as DIR0, its first direction.

def one_wave(B, block_b, D):
    """The launch of a whole grid: every batch tile and direction at once."""
    return ((0, triton.cdiv(B, block_b), 0, D),)


def wave_rows(waves, block_b, B):
    """Per wave: the wave as launched on its own rows, (0, tiles, dir0, dirs), and its rows (a slice)."""
    return [((0, tiles, dir0, dirs), slice(tile0 * block_b, min(B, (tile0 + tiles) * block_b)))
            for tile0, tiles, dir0, dirs in waves]


def rows_of(t, rows):
    """The rows of a (T, B, ...) or (D, B, ...) tensor, a view (None stays None)."""
    return None if t is None else t[:, rows]


def state_in(t, rows):
    """A state (D, B, X) input's rows, contiguous as the kernels index it."""
    return None if t is None else t[:, rows].contiguous()


def state_out(t, rows):
    """Where a wave writes a state (D, B, X) output: t itself if the wave has all its rows."""
    if t is None or rows == slice(0, t.shape[1]):
        return t
    return t.new_empty(t[:, rows].shape)


def write_back(t, part, rows, wave):
    """Copy a wave's state output into the layer's, for the wave's directions."""
    if t is not None and part is not t:
        _, _, dir0, dirs = wave
        t[dir0:dir0 + dirs, rows] = part[dir0:dir0 + dirs]


# ---- a cooperative launch the driver refuses ----
# triton 3.6's launcher (backends/nvidia/driver.py: make_launcher's gpuAssert around cuLaunchKernelEx)
# raises RuntimeError("Triton Error [CUDA]: " + cuGetErrorString(code)). A cooperative grid that
# cannot be resident at once, because fewer SMs are usable than the device has (MPS limits, green
# contexts, another process's kernels), fails with CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, whose
# text is this; nothing runs.
COOPERATIVE_LAUNCH_TOO_LARGE = "Triton Error [CUDA]: too many blocks in cooperative launch"


class LaunchRefused(RuntimeError):
    """The driver refused a split launch of `programs` programs on `device`: they cannot all be
    resident at once there now. Nothing ran; the layers re-plan (layers/dispatch.py: refused)."""

    def __init__(self, programs, device):
        super().__init__(f"persistrnn: the driver refused a cooperative launch of {programs} programs on {device} "
                         f"({COOPERATIVE_LAUNCH_TOO_LARGE}): fewer SMs are usable there than it has")
        self.programs, self.device = programs, device


def _start(kernel, grid, args, constexprs, *, config, interpret, device, what):
    """Start `kernel` on `grid`: interpreted, or compiled (cooperative in the split tier)."""
    split = grid[1]
    if interpret:
        with interpreting():
            # programs that meet at a barrier must run at the same time
            interpreted(kernel, concurrent=split > 1)[grid](*args, **constexprs)
    else:
        with torch.cuda.device(device):  # triton launches on the current device
            kernel[grid](*args, **constexprs, num_warps=config.warps(what), num_stages=config.num_stages,
                         launch_cooperative_grid=split > 1)


def launch(kernel, grid, args, constexprs, *, config, interpret, device, what, max_spin):
    """Run `kernel` on `grid`, compiled or interpreted, with no host synchronization: an earlier
    launch's barrier timeout is raised here (BarrierTimeout) once its timeout count has reached the host.
    what: "forward" or "backward", the kernel (and its num_warps in `config`). A split launch the
    driver refuses for residency raises LaunchRefused; every other error propagates as it is."""
    watch = _watch(device)
    check_barriers(device)
    split = grid[1]
    try:
        _start(kernel, grid, args, constexprs, config=config, interpret=interpret, device=device, what=what)
    except RuntimeError as error:
        if split > 1 and str(error) == COOPERATIVE_LAUNCH_TOO_LARGE:
            raise LaunchRefused(grid[0] * grid[1] * grid[2], device) from error
        raise
    if split > 1:
        _after_launch(watch, f"split {what} kernel (grid={grid}, first direction {constexprs['DIR0']}, {config}, "
                             f"K chunks={constexprs['CHUNKS']}, waits of at most {max_spin} polls)")
