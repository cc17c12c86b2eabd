"""Persistent forward of one LSTM or GRU layer: every time step of every direction in one launch.

Computes, per direction d and batch row b, over that row's own length (reversed when d == 1):
    gates_t = xproj[t, b, d] + h_{t-1} @ W_hh[d]^T     (xproj: the input GEMM, biases folded in)
    LSTM:  h_t, c_t = lstm_cell(gates_t, c_{t-1});  h_t = h_t @ W_hr[d]^T with proj_size
    GRU:   h_t = gru_cell(gates_t, b_hn[d], h_{t-1})
and writes y[t, b, d*R:(d+1)*R] = h_t (zero past the row's length), h_n, c_n.

Grid: (cdiv(B, BLOCK_B), SPLIT, D). A program owns a batch tile of one direction and BLOCK_H
hidden units (all G gates of them); SPLIT = cdiv(H, BLOCK_H) programs share a batch tile.
On-chip for the whole sequence: the program's W_hh^T rows as G tiles [BLOCK_R, BLOCK_H] (and its
W_hr^T columns [BLOCK_H, BLOCK_R]), loaded once before the time loop; h (and c) in fp32
registers (fp64 for fp64 inputs). Per step: one xproj row in and one y row out per batch row.
SPLIT > 1: each step a program publishes its part of h_t to `xbuf` (its slice; with proj_size
its partial W_hr product), meets the other programs of its batch tile at a barrier, and reads
the full h_t back. xbuf is double-buffered by step parity, so a program that runs ahead never
overwrites what a slower one still reads. The barrier counter only grows (target SPLIT*(step+1));
its spin is bounded by MAX_SPIN polls, after which the program raises `error_ptr` and stops
waiting: the host turns the flag into an exception, and no input can hang the GPU.
"""
import torch
import triton
import triton.language as tl

from .cells import GRU, LSTM, gru_cell, lstm_cell
from .interpreter import interpreted, interpreting


@triton.jit
def _load_w_chunks(w_ptr, row0, n_cols, offs_n, mask_n, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   STATE_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """Rows row0 + offs_n of a row-major (rows, n_cols) matrix, transposed: the B operand of
    _recurrent_dot, [BLOCK_R, BLOCK_N], or cut along K into [BLOCK_R // BLOCK_K, BLOCK_K, BLOCK_N]."""
    if BLOCK_R == BLOCK_K:
        k = tl.arange(0, BLOCK_R)[:, None]
        n = offs_n[None, :]
        mask = (k < n_cols) & mask_n[None, :]
    else:
        k = (tl.arange(0, BLOCK_R // BLOCK_K) * BLOCK_K)[:, None, None] + tl.arange(0, BLOCK_K)[None, :, None]
        n = offs_n[None, None, :]
        mask = (k < n_cols) & mask_n[None, None, :]
    # Every load is upcast at once (the interpreter's bf16 arithmetic is wrong), then cast to the
    # MMA operand type: lossless, and a no-op pair once compiled.
    return tl.load(w_ptr + (row0 + n) * n_cols + k, mask=mask, other=0.0).to(STATE_DTYPE).to(MMA_DTYPE)


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
    """h @ W^T. A wide h is multiplied as a batch of K-chunk products, summed: the warps share K,
    so no warp holds all of h as an MMA operand (a plain dot with K = 1024 spills). A narrow h
    (BLOCK_R == BLOCK_K) takes one plain dot, which uses fewer registers there."""
    if BLOCK_R == BLOCK_K:
        return tl.dot(h_chunks, w_chunks, input_precision=INPUT_PRECISION)
    else:
        return tl.sum(tl.dot(h_chunks, w_chunks, input_precision=INPUT_PRECISION), axis=0)


@triton.jit
def _gate_preact(x_row_ptr, gate, H, mask, h_chunks, w_chunks, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 STATE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    x = tl.load(x_row_ptr + gate * H, mask=mask, other=0.0).to(STATE_DTYPE)
    return x + _recurrent_dot(h_chunks, w_chunks, BLOCK_R, BLOCK_K, INPUT_PRECISION).to(STATE_DTYPE)


@triton.jit
def _barrier(counter_ptr, target, alive, MAX_SPIN):
    """Arrive, then wait until `target` programs have arrived, for at most MAX_SPIN polls.
    Returns False on timeout; a program that timed out before (alive False) no longer waits."""
    tl.debug_barrier()  # every thread's xbuf stores are issued before the release below
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (arrived < target) & (spins < MAX_SPIN) & alive:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()
    return alive & (arrived >= target)


@triton.jit
def _rnn_forward_kernel(
    xproj_ptr, w_hh_ptr, b_hn_ptr, w_hr_ptr, h0_ptr, c0_ptr, lengths_ptr,
    y_ptr, hn_ptr, cn_ptr, xbuf_ptr, counter_ptr, error_ptr,
    T, B, H, R, MAX_SPIN,
    stride_xt, stride_xb, stride_yt, stride_yb,
    CELL: tl.constexpr, HAS_PROJ: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    W_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    G: tl.constexpr = 4 if CELL == LSTM else 3
    # with proj_size every program holds a partial of the full h_t: one xbuf slot per program
    SLOTS: tl.constexpr = SPLIT if HAS_PROJ else 1
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    direction = tl.program_id(2)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # my hidden units
    offs_r = tl.arange(0, BLOCK_R)  # the whole recurrent input h_{t-1}
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_r = offs_r < R
    mask_bh = mask_b[:, None] & mask_h[None, :]
    mask_br = mask_b[:, None] & mask_r[None, :]
    length = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)

    # Recurrent weights: read from memory once, kept on-chip for all T steps.
    w_hh_dir = w_hh_ptr + direction * (G * H * R)
    w_0 = _load_w_chunks(w_hh_dir, 0 * H, R, offs_h, mask_h, BLOCK_R, BLOCK_K, STATE_DTYPE, MMA_DTYPE)
    w_1 = _load_w_chunks(w_hh_dir, 1 * H, R, offs_h, mask_h, BLOCK_R, BLOCK_K, STATE_DTYPE, MMA_DTYPE)
    w_2 = _load_w_chunks(w_hh_dir, 2 * H, R, offs_h, mask_h, BLOCK_R, BLOCK_K, STATE_DTYPE, MMA_DTYPE)
    if CELL == LSTM:
        w_3 = _load_w_chunks(w_hh_dir, 3 * H, R, offs_h, mask_h, BLOCK_R, BLOCK_K, STATE_DTYPE, MMA_DTYPE)
        if HAS_PROJ:  # my columns of W_hr, transposed: [BLOCK_H, BLOCK_R]
            w_hr_t = tl.load(w_hr_ptr + direction * (R * H) + offs_r[None, :] * H + offs_h[:, None],
                             mask=mask_h[:, None] & mask_r[None, :], other=0.0).to(STATE_DTYPE).to(MMA_DTYPE)
    else:
        b_hn = tl.load(b_hn_ptr + direction * H + offs_h, mask=mask_h, other=0.0).to(STATE_DTYPE)[None, :]

    state_bh = direction * B * H + offs_b[:, None] * H + offs_h[None, :]
    state_br = direction * B * R + offs_b[:, None] * R + offs_r[None, :]
    if HAS_PROJ:
        h_full = tl.load(h0_ptr + state_br, mask=mask_br, other=0.0).to(STATE_DTYPE)  # all of h_{t-1}
    else:
        h_mine = tl.load(h0_ptr + state_bh, mask=mask_bh, other=0.0).to(STATE_DTYPE)  # my slice of h_{t-1}
        # all of h_{t-1} only as the MMA sees it: an fp32 copy of a wide h would cost the registers
        h_mma = _k_chunks(tl.load(h0_ptr + state_br, mask=mask_br, other=0.0).to(STATE_DTYPE).to(W_DTYPE)
                          .to(MMA_DTYPE), BLOCK_B, BLOCK_R, BLOCK_K)
    if CELL == LSTM:
        c = tl.load(c0_ptr + state_bh, mask=mask_bh, other=0.0).to(STATE_DTYPE)
    counter = counter_ptr + direction * tl.num_programs(0) + pid_b
    alive = pid_b >= 0  # a true scalar, false after a barrier timeout

    for step in range(T):
        active = step < length
        # per-row time index: the reverse direction starts at each row's own last step
        t = tl.where(direction == 1, length - 1 - step, step).to(tl.int64)
        x_row = (xproj_ptr + t[:, None] * stride_xt + offs_b[:, None].to(tl.int64) * stride_xb
                 + direction * (G * H) + offs_h[None, :])
        m_x = mask_bh & active[:, None]
        if HAS_PROJ:  # round h to the weights' type as the MMA sees it (no-op where MMA_DTYPE == W_DTYPE)
            h_mma = _k_chunks(h_full.to(W_DTYPE).to(MMA_DTYPE), BLOCK_B, BLOCK_R, BLOCK_K)
        if CELL == LSTM:
            h_cell, c_new = lstm_cell(
                _gate_preact(x_row, 0, H, m_x, h_mma, w_0, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 1, H, m_x, h_mma, w_1, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 2, H, m_x, h_mma, w_2, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 3, H, m_x, h_mma, w_3, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION), c)
            c = tl.where(active[:, None], c_new, c)
            if HAS_PROJ:  # my hidden units' share of h_t = (o * tanh(c)) @ W_hr^T
                h_new = tl.dot(h_cell.to(W_DTYPE).to(MMA_DTYPE), w_hr_t,
                               input_precision=INPUT_PRECISION).to(STATE_DTYPE)
            else:
                h_new = h_cell
        else:
            x_n = tl.load(x_row + 2 * H, mask=m_x, other=0.0).to(STATE_DTYPE)
            hh_n = _recurrent_dot(h_mma, w_2, BLOCK_R, BLOCK_K, INPUT_PRECISION).to(STATE_DTYPE) + b_hn
            h_new = gru_cell(
                _gate_preact(x_row, 0, H, m_x, h_mma, w_0, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 1, H, m_x, h_mma, w_1, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                x_n, hh_n, h_mine)

        xbuf = xbuf_ptr + ((step % 2) * tl.num_programs(2) + direction) * (SLOTS * B * R) + offs_b[:, None] * R
        if HAS_PROJ:
            if SPLIT > 1:  # h_t is the sum of every program's partial product
                tl.store(xbuf + pid_h * (B * R) + offs_r[None, :], h_new, mask=mask_br)
                alive = _barrier(counter, SPLIT * (step + 1), alive, MAX_SPIN)
                h_new = tl.zeros([BLOCK_B, BLOCK_R], STATE_DTYPE)
                for slot in range(SLOTS):  # in a fixed order: every program sums alike
                    h_new += tl.load(xbuf + slot * (B * R) + offs_r[None, :], mask=mask_br, other=0.0,
                                     cache_modifier=".cg")
            h_full = tl.where(active[:, None], h_new, h_full)
            out_cols, out_mask, out_val = offs_r, mask_br & (pid_h == 0), h_new
        else:
            h_mine = tl.where(active[:, None], h_new, h_mine)
            if SPLIT > 1:  # publish my slice, read everyone's (xbuf holds the weights' dtype here)
                tl.store(xbuf + offs_h[None, :], h_mine.to(xbuf_ptr.dtype.element_ty), mask=mask_bh)
                alive = _barrier(counter, SPLIT * (step + 1), alive, MAX_SPIN)
                h_mma = _k_chunks(tl.load(xbuf + offs_r[None, :], mask=mask_br, other=0.0, cache_modifier=".cg")
                                  .to(STATE_DTYPE).to(MMA_DTYPE), BLOCK_B, BLOCK_R, BLOCK_K)
            else:
                h_mma = _k_chunks(h_mine.to(W_DTYPE).to(MMA_DTYPE), BLOCK_B, BLOCK_R, BLOCK_K)
            out_cols, out_mask, out_val = offs_h, mask_bh, h_new
        # every (step, row) writes one y row: h_t at t while active, zero at `step` past the length
        y_t = tl.where(active, t, step)
        y_ptrs = (y_ptr + y_t[:, None] * stride_yt + offs_b[:, None].to(tl.int64) * stride_yb + direction * R
                  + out_cols[None, :])
        tl.store(y_ptrs, tl.where(active[:, None], out_val, 0.0).to(y_ptr.dtype.element_ty), mask=out_mask)

    if HAS_PROJ:
        tl.store(hn_ptr + state_br, h_full.to(hn_ptr.dtype.element_ty), mask=mask_br & (pid_h == 0))
    else:
        tl.store(hn_ptr + state_bh, h_mine.to(hn_ptr.dtype.element_ty), mask=mask_bh)
    if CELL == LSTM:
        tl.store(cn_ptr + state_bh, c.to(cn_ptr.dtype.element_ty), mask=mask_bh)
    tl.store(error_ptr, 1, mask=alive == 0)


# K-chunk width of the recurrent dot (see _recurrent_dot)
K_CHUNK = 128

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def kernel_constexprs(cell, dtype, has_proj, split, block_b, block_h, block_r, *, interpret, allow_tf32):
    """The compile-time parameters of one launch (also used by the ahead-of-time compile)."""
    w_dtype = _TL_DTYPE[dtype]
    # the interpreter's bf16 arithmetic is wrong: multiply bf16-rounded values in fp32 there
    mma_dtype = tl.float32 if (interpret and dtype == torch.bfloat16) else w_dtype
    state_dtype = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "tf32" if (dtype == torch.float32 and allow_tf32 and not interpret) else "ieee"
    return dict(CELL=LSTM if cell == "lstm" else GRU, HAS_PROJ=has_proj, SPLIT=split, BLOCK_B=block_b,
                BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_K=min(block_r, K_CHUNK), W_DTYPE=w_dtype, MMA_DTYPE=mma_dtype,
                STATE_DTYPE=state_dtype, INPUT_PRECISION=precision)


# Barrier polls before a program gives up: seconds on a GPU, far beyond any real step.
MAX_SPIN = {"compiled": 1 << 24, "interpret": 1 << 20}


class BarrierTimeout(RuntimeError):
    pass


def rnn_forward(cell, xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, h_n, c_n, *,
                block_b, block_h, block_r, num_warps, num_stages, interpret, allow_tf32, max_spin=None):
    """Launch one layer (all directions). Shapes: xproj (T, B, D*G*H) with any (t, b) strides and
    unit stride inside a row; w_hh (D, G*H, R); b_hn (D, H); w_hr (D, R, H); h0, h_n (D, B, R);
    c0, c_n (D, B, H); lengths (B,) int32; y (T, B, D*R), same row rule as xproj. Unused pointers
    (b_hn for LSTM, w_hr without projection, c0/c_n for GRU) may be any tensor.
    SPLIT = cdiv(H, block_h) programs share a batch tile; with SPLIT > 1 the caller must make sure
    the whole grid can be resident at once (the launch is cooperative and fails otherwise)."""
    T, B = xproj.shape[0], xproj.shape[1]
    D, _, R = w_hh.shape
    H = h0.shape[2] if cell == "gru" else c0.shape[2]
    split = triton.cdiv(H, block_h)
    has_proj = w_hr is not None
    constexprs = kernel_constexprs(cell, w_hh.dtype, has_proj, split, block_b, block_h, block_r,
                                   interpret=interpret, allow_tf32=allow_tf32)
    grid = (triton.cdiv(B, block_b), split, D)
    # scratch of the split tier: the step-parity exchange buffer (h slices in the weights' dtype,
    # or fp32 partial products with proj_size), one barrier counter per (direction, batch tile),
    # and the timeout flag
    slots = split if has_proj else 1
    xbuf_dtype = (torch.float64 if w_hh.dtype == torch.float64 else torch.float32) if has_proj else w_hh.dtype
    xbuf = torch.empty((2, D, slots, B, R) if split > 1 else (1,), dtype=xbuf_dtype, device=xproj.device)
    counters = torch.zeros(D * grid[0] if split > 1 else 1, dtype=torch.int32, device=xproj.device)
    error = torch.zeros(1, dtype=torch.int32, device=xproj.device)
    if max_spin is None:
        max_spin = MAX_SPIN["interpret" if interpret else "compiled"]
    args = (xproj, w_hh, b_hn, w_hh if w_hr is None else w_hr, h0, c0, lengths, y, h_n, c_n, xbuf, counters,
            error, T, B, H, R, max_spin, xproj.stride(0), xproj.stride(1), y.stride(0), y.stride(1))
    if interpret:
        with interpreting():
            # programs that meet at a barrier must run at the same time
            interpreted(_rnn_forward_kernel, concurrent=split > 1)[grid](*args, **constexprs)
    else:
        with torch.cuda.device(xproj.device):  # triton launches on the current device
            _rnn_forward_kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages,
                                      launch_cooperative_grid=split > 1)
    if split > 1 and error.item():
        raise BarrierTimeout(
            f"persistrnn: a barrier of the split forward kernel timed out after {max_spin} polls "
            f"(cell={cell}, grid={grid}, BLOCK_B={block_b}, BLOCK_H={block_h}, BLOCK_R={block_r}, "
            f"num_warps={num_warps}): its programs were not all running at once; outputs are invalid")
