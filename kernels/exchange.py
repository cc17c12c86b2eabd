"""The split tier's exchange: the step-parity buffer through which the SPLIT programs of a batch tile
share h_t (or partial products), the bounded barrier between them, and the device's timeout count,
raised on the host without a synchronization.

The split tier's barrier is a counter per (direction, batch tile) that only grows: a program
arrives (release atomic_add) after publishing its part of the step, and waits until SPLIT more
have arrived. The wait is bounded by MAX_SPIN polls, after which the program stops waiting and
adds one to the device's timeout count, so no input hangs the GPU; the host raises it without a sync
(below).
Compiled, the poll is a warp-uniform PTX loop (vote.sync), so that ptxas keeps the loop-invariant
wgmma descriptors in uniform registers across it (a plain Triton while loop there costs two
R2UR per wgmma and spills at 4 warps); the interpreter runs the same protocol in Triton.
One warp of a program polls (acquire loads, at GPU scope) and the others wait at the program's
barrier (bar.red): the arrivals' release, the poller's acquire and the CTA barrier after it
order every thread's read-back after what the other programs published (the pattern of a
cooperative grid sync), and the line every arrival writes is read by one warp per program, not
all of them."""
import torch
import triton
import triton.language as tl


@triton.jit
def _xbuf_tile(xbuf_ptr, parity, pid_d, pid_b, slot, ROWS, SLOTS: tl.constexpr, BLOCK_B: tl.constexpr):
    """The ROWS * BLOCK_B block of a slot in the launch's exchange buffer (2 step parities,
    directions, batch tiles, SLOTS, ROWS * BLOCK_B). The order within a block is the kernel's:
    the forward's h is row-major [ROWS, BLOCK_B], the backward's partials [BLOCK_B, ROWS]."""
    block = ((parity * tl.num_programs(2) + pid_d) * tl.num_programs(0) + pid_b) * SLOTS + slot
    return xbuf_ptr + block.to(tl.int64) * ROWS * BLOCK_B


@triton.jit
def _store_in_place(ptrs, values, INTERPRET: tl.constexpr):
    """tl.store(ptrs, values) (no mask), each element stored by the thread that holds it (16-bit
    and fp32 compiled: one store of its width each). A tl.store of a whole tile anchors Triton's
    layout propagation on a coalesced layout, so an MMA accumulator (or a cell output in its
    layout) would first go through shared memory (stmatrix, two barriers, loads); an elementwise
    asm store takes its operands' layout as it is. Without a predicate, ptxas issues the stores
    back to back (with one, it branches around each)."""
    if INTERPRET or (values.dtype.primitive_bitwidth != 16 and values.dtype != tl.float32):
        tl.store(ptrs, values)
    elif values.dtype.primitive_bitwidth == 16:  # h in the weights' 16-bit dtype
        tl.inline_asm_elementwise("st.global.b16 [$1], $2; mov.b32 $0, 0;", "=r,l,h",
                                  [ptrs, values.to(tl.int16, bitcast=True)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("st.global.b32 [$1], $2; mov.b32 $0, 0;", "=r,l,r",
                                  [ptrs, values.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _arrive(counter_ptr):
    tl.debug_barrier()  # every thread's exchange-buffer stores are issued before the release below
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _poll(counter_ptr, target, budget):
    """Compiled: the program's first warp polls with acquire loads until the counter reaches
    `target` or `budget` polls are spent, leaving the loop together (vote.sync: the branch is
    uniform); the other warps wait at the program's barrier (bar.red.and), which also carries
    warp 0's acquire to them and makes the program agree on whether the target was seen. 1 if
    so, else 0. The poll does not pause between loads: a nanosleep in the loop, even one taken
    only after 16 polls, changed how ptxas schedules the step's read-back (LSTM fp16 H = 1024
    B = 64 forward: 3.90 -> 4.02 us modelled)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p_wait, p_spin, p_any, p_seen, p_all, p_poller;
        .reg .u32 polls, tid;
        mov.u32 tid, %tid.x;
        setp.lt.u32 p_poller, tid, 32;
        mov.s32 $0, $2;
        @!p_poller bra DONE;
        mov.u32 polls, 0;
        POLL:
        ld.acquire.gpu.global.u32 $0, [$1];
        setp.lt.s32 p_wait, $0, $2;
        setp.lt.u32 p_spin, polls, $3;
        and.pred p_wait, p_wait, p_spin;
        vote.sync.any.pred p_any, p_wait, 0xffffffff;
        add.u32 polls, polls, 1;
        @p_any bra.uni POLL;
        DONE:
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
