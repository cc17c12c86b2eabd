"""What the persistent forward and backward kernels share: the on-chip operand loaders, the
recurrent dot, the bounded barrier of the split tier, the compile-time parameters and the launch.

Both kernels have the same grid, (cdiv(B, BLOCK_B), SPLIT, D): a program owns a batch tile of one
direction and BLOCK_H hidden units; SPLIT = cdiv(H, BLOCK_H) programs share a batch tile and meet
at a barrier once per step. The barrier counter only grows (target SPLIT * (step + 1)); its spin
is bounded by MAX_SPIN polls, after which the program raises `error_ptr` and stops waiting: the
host turns the flag into `BarrierTimeout`, so no input can hang the GPU.
"""
import torch
import triton
import triton.language as tl

from .cells import GRU, LSTM
from .interpreter import interpreted, interpreting


@triton.jit
def _load_w_chunks(w_ptr, offs_n, mask_n, stride_n, stride_k, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   STATE_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """The B operand of _recurrent_dot, element (k, n) = w_ptr[n * stride_n + k * stride_k] for
    k < K: [BLOCK_R, BLOCK_N], or cut along K into [BLOCK_R // BLOCK_K, BLOCK_K, BLOCK_N]."""
    if BLOCK_R == BLOCK_K:
        k = tl.arange(0, BLOCK_R)[:, None]
        n = offs_n[None, :]
        mask = (k < K) & mask_n[None, :]
    else:
        k = (tl.arange(0, BLOCK_R // BLOCK_K) * BLOCK_K)[:, None, None] + tl.arange(0, BLOCK_K)[None, :, None]
        n = offs_n[None, None, :]
        mask = (k < K) & mask_n[None, None, :]
    # Every load is upcast at once (the interpreter's bf16 arithmetic is wrong), then cast to the
    # MMA operand type: lossless, and a no-op pair once compiled.
    return tl.load(w_ptr + n * stride_n + k * stride_k, mask=mask, other=0.0).to(STATE_DTYPE).to(MMA_DTYPE)


@triton.jit
def _k_chunks(h, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h [BLOCK_B, BLOCK_R] as the A operand of _recurrent_dot: itself, or its K-chunks
    [BLOCK_R // BLOCK_K, BLOCK_B, BLOCK_K]."""
    if BLOCK_R == BLOCK_K:
        return h
    else:
        return tl.permute(tl.reshape(h, [BLOCK_B, BLOCK_R // BLOCK_K, BLOCK_K]), (1, 0, 2))


@triton.jit
def _recurrent_dot(h_chunks, w_chunks, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    """h @ W. A wide h is multiplied as a batch of K-chunk products, summed: the warps share K,
    so no warp holds all of h as an MMA operand (a plain dot with K = 1024 spills). A narrow h
    (BLOCK_R == BLOCK_K) takes one plain dot, which uses fewer registers there."""
    if BLOCK_R == BLOCK_K:
        return tl.dot(h_chunks, w_chunks, input_precision=INPUT_PRECISION)
    else:
        return tl.sum(tl.dot(h_chunks, w_chunks, input_precision=INPUT_PRECISION), axis=0)


@triton.jit
def _program_tile(lengths_ptr, B, H, R, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Where a program of the grid (batch tiles, SPLIT, D) works: its ids, its batch rows,
    its hidden units, the whole recurrent input's columns, their masks, and each row's length."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    direction = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # my hidden units
    offs_r = tl.arange(0, BLOCK_R)  # the whole recurrent input
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_r = offs_r < R
    length = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
    return pid_b, pid_h, direction, offs_b, offs_h, offs_r, mask_b, mask_h, mask_r, length


@triton.jit
def _barrier(counter_ptr, target, alive, MAX_SPIN):
    """Arrive, then wait until `target` programs have arrived, for at most MAX_SPIN polls.
    Returns False on timeout; a program that timed out before (alive False) no longer waits."""
    tl.debug_barrier()  # every thread's exchange-buffer stores are issued before the release below
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (arrived < target) & (spins < MAX_SPIN) & alive:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()
    return alive & (arrived >= target)


# K-chunk width of the recurrent dot (see _recurrent_dot)
K_CHUNK = 128

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def kernel_constexprs(cell, dtype, has_proj, split, block_b, block_h, block_r, *, interpret, allow_tf32):
    """The compile-time parameters both kernels take (also used by the ahead-of-time compile)."""
    w_dtype = _TL_DTYPE[dtype]
    # the interpreter's bf16 arithmetic is wrong: multiply bf16-rounded values in fp32 there
    mma_dtype = tl.float32 if (interpret and dtype == torch.bfloat16) else w_dtype
    state_dtype = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "tf32" if (dtype == torch.float32 and allow_tf32 and not interpret) else "ieee"
    return dict(CELL=LSTM if cell == "lstm" else GRU, HAS_PROJ=has_proj, SPLIT=split, BLOCK_B=block_b,
                BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_K=min(block_r, K_CHUNK), W_DTYPE=w_dtype, MMA_DTYPE=mma_dtype,
                STATE_DTYPE=state_dtype, INPUT_PRECISION=precision)


def state_dtype(dtype):
    """The dtype of the state, the saved activations and the exchange buffers of partial sums."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Barrier polls before a program gives up: seconds on a GPU, far beyond any real step.
MAX_SPIN = {"compiled": 1 << 24, "interpret": 1 << 20}


class BarrierTimeout(RuntimeError):
    pass


def split_scratch(split, D, grid_b, buffer_shape, buffer_dtype, device):
    """The split tier's scratch: the step-parity exchange buffer (2, D, *buffer_shape), one barrier
    counter per (direction, batch tile), and the timeout flag. A single program gets stubs."""
    xbuf = torch.empty((2, D, *buffer_shape) if split > 1 else (1,), dtype=buffer_dtype, device=device)
    counters = torch.zeros(D * grid_b if split > 1 else 1, dtype=torch.int32, device=device)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    return xbuf, counters, error


def launch(kernel, grid, args, constexprs, *, interpret, num_warps, num_stages, device, what, error, max_spin):
    """Run `kernel` on `grid`, compiled or interpreted; raise BarrierTimeout if a barrier gave up."""
    split = grid[1]
    if interpret:
        with interpreting():
            # programs that meet at a barrier must run at the same time
            interpreted(kernel, concurrent=split > 1)[grid](*args, **constexprs)
    else:
        with torch.cuda.device(device):  # triton launches on the current device
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages,
                         launch_cooperative_grid=split > 1)
    if split > 1 and error.item():
        raise BarrierTimeout(
            f"persistrnn: a barrier of the split {what} kernel timed out after {max_spin} polls "
            f"(grid={grid}, BLOCK_B={constexprs['BLOCK_B']}, BLOCK_H={constexprs['BLOCK_H']}, "
            f"BLOCK_R={constexprs['BLOCK_R']}, num_warps={num_warps}): its programs were not all running at "
            f"once; outputs are invalid")
