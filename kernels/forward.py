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
overwrites what a slower one still reads. The barrier is skeleton._barrier (bounded spin).

Saving for the backward (SAVE, only when autograd needs it; otherwise nothing is stored or
allocated): per step, row and direction the post-activation gates and c (LSTM: i, f, g, o, c,
5H values) or r, z, n and W_hn h + b_hn (GRU, 4H), in the state dtype, as cuDNN's reserve space.
That is T * B * D * 5H * 4 bytes for an fp32-state LSTM: 320 KiB per step and direction at
H = 1024, B = 16 (GRU: 256 KiB). The backward recomputes nothing and needs no W_hh^T on-chip.
"""
import torch
import triton
import triton.language as tl

from .cells import GRU, LSTM, gru_cell, lstm_cell
from .skeleton import (MAX_SPIN, BarrierTimeout, _barrier, _k_chunks, _load_w_chunks, _program_tile,  # noqa: F401
                       _recurrent_dot, kernel_constexprs, launch, split_scratch, state_dtype)

# what the forward saves for the backward, per row, step and direction: H values each
SAVED = {"lstm": 5, "gru": 4}


@triton.jit
def _gate_preact(x_row_ptr, gate, H, mask, h_chunks, w_chunks, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 STATE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    x = tl.load(x_row_ptr + gate * H, mask=mask, other=0.0).to(STATE_DTYPE)
    return x + _recurrent_dot(h_chunks, w_chunks, BLOCK_R, BLOCK_K, INPUT_PRECISION).to(STATE_DTYPE)


@triton.jit
def _save(saved_ptr, y_t, offs_b, offs_h, mask_bh, active, direction, H, stride_st, stride_sb,
          a0, a1, a2, a3, a4, N: tl.constexpr):
    """Store the first N (4 or 5) of a0..a4 (my hidden units) in saved[y_t, b, direction, 0..N-1, :]:
    the values while active, zeros past the row's length. With N == 4, a4 is not used."""
    row = (saved_ptr + y_t[:, None].to(tl.int64) * stride_st + offs_b[:, None].to(tl.int64) * stride_sb
           + direction * (N * H) + offs_h[None, :])
    keep = active[:, None]
    tl.store(row, tl.where(keep, a0, 0.0), mask=mask_bh)
    tl.store(row + H, tl.where(keep, a1, 0.0), mask=mask_bh)
    tl.store(row + 2 * H, tl.where(keep, a2, 0.0), mask=mask_bh)
    tl.store(row + 3 * H, tl.where(keep, a3, 0.0), mask=mask_bh)
    if N == 5:
        tl.store(row + 4 * H, tl.where(keep, a4, 0.0), mask=mask_bh)


@triton.jit
def _rnn_forward_kernel(
    xproj_ptr, w_hh_ptr, b_hn_ptr, w_hr_ptr, h0_ptr, c0_ptr, lengths_ptr,
    y_ptr, hn_ptr, cn_ptr, saved_ptr, xbuf_ptr, counter_ptr, error_ptr,
    T, B, H, R, MAX_SPIN,
    stride_xt, stride_xb, stride_yt, stride_yb, stride_st, stride_sb,
    SAVE: tl.constexpr, CELL: tl.constexpr, HAS_PROJ: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    W_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    G: tl.constexpr = 4 if CELL == LSTM else 3
    # with proj_size every program holds a partial of the full h_t: one xbuf slot per program
    SLOTS: tl.constexpr = SPLIT if HAS_PROJ else 1
    pid_b, pid_h, direction, offs_b, offs_h, offs_r, mask_b, mask_h, mask_r, length = _program_tile(
        lengths_ptr, B, H, R, BLOCK_B, BLOCK_H, BLOCK_R)
    mask_bh = mask_b[:, None] & mask_h[None, :]
    mask_br = mask_b[:, None] & mask_r[None, :]

    # Recurrent weights: read from memory once, kept on-chip for all T steps.
    w_hh_dir = w_hh_ptr + direction * (G * H * R)
    w_0 = _load_w_chunks(w_hh_dir + 0 * H * R, offs_h, mask_h, R, 1, R, BLOCK_R, BLOCK_K, STATE_DTYPE, MMA_DTYPE)
    w_1 = _load_w_chunks(w_hh_dir + 1 * H * R, offs_h, mask_h, R, 1, R, BLOCK_R, BLOCK_K, STATE_DTYPE, MMA_DTYPE)
    w_2 = _load_w_chunks(w_hh_dir + 2 * H * R, offs_h, mask_h, R, 1, R, BLOCK_R, BLOCK_K, STATE_DTYPE, MMA_DTYPE)
    if CELL == LSTM:
        w_3 = _load_w_chunks(w_hh_dir + 3 * H * R, offs_h, mask_h, R, 1, R, BLOCK_R, BLOCK_K, STATE_DTYPE, MMA_DTYPE)
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
        # every (step, row) writes one y row (and one saved row): at t while active, zero at
        # `step` past the length, so no output or saved row is left unwritten
        y_t = tl.where(active, t, step)
        if CELL == LSTM:
            h_cell, c_new, i, f, g, o = lstm_cell(
                _gate_preact(x_row, 0, H, m_x, h_mma, w_0, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 1, H, m_x, h_mma, w_1, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 2, H, m_x, h_mma, w_2, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 3, H, m_x, h_mma, w_3, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION), c)
            c = tl.where(active[:, None], c_new, c)
            if SAVE:
                _save(saved_ptr, y_t, offs_b, offs_h, mask_bh, active, direction, H, stride_st, stride_sb,
                      i, f, g, o, c, 5)
            if HAS_PROJ:  # my hidden units' share of h_t = (o * tanh(c)) @ W_hr^T
                h_new = tl.dot(h_cell.to(W_DTYPE).to(MMA_DTYPE), w_hr_t,
                               input_precision=INPUT_PRECISION).to(STATE_DTYPE)
            else:
                h_new = h_cell
        else:
            x_n = tl.load(x_row + 2 * H, mask=m_x, other=0.0).to(STATE_DTYPE)
            hh_n = _recurrent_dot(h_mma, w_2, BLOCK_R, BLOCK_K, INPUT_PRECISION).to(STATE_DTYPE) + b_hn
            h_new, r, z, n = gru_cell(
                _gate_preact(x_row, 0, H, m_x, h_mma, w_0, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 1, H, m_x, h_mma, w_1, BLOCK_R, BLOCK_K, STATE_DTYPE, INPUT_PRECISION),
                x_n, hh_n, h_mine)
            if SAVE:
                _save(saved_ptr, y_t, offs_b, offs_h, mask_bh, active, direction, H, stride_st, stride_sb,
                      r, z, n, hh_n, hh_n, 4)

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


def rnn_forward(cell, xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, h_n, c_n, *, saved=None,
                block_b, block_h, block_r, num_warps, num_stages, interpret, allow_tf32, max_spin=None):
    """Launch one layer (all directions). Shapes: xproj (T, B, D*G*H) with any (t, b) strides and
    unit stride inside a row; w_hh (D, G*H, R); b_hn (D, H); w_hr (D, R, H); h0, h_n (D, B, R);
    c0, c_n (D, B, H); lengths (B,) int32; y (T, B, D*R), same row rule as xproj. What a layer does
    not use (b_hn for LSTM, w_hr without projection, c0/c_n for GRU) may be None.
    saved: None, or (T, B, D, SAVED[cell], H) in the state dtype (same row rule), filled with what
    the backward needs (LSTM i, f, g, o, c; GRU r, z, n, W_hn h + b_hn per step).
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
    # the exchange buffer holds h slices in the weights' dtype, or partial products with proj_size
    slots = split if has_proj else 1
    xbuf, counters, error = split_scratch(split, D, grid[0], (slots, B, R),
                                          state_dtype(w_hh.dtype) if has_proj else w_hh.dtype, xproj.device)
    if max_spin is None:
        max_spin = MAX_SPIN["interpret" if interpret else "compiled"]
    save = saved is not None
    # unused pointers point at a tensor the kernel has anyway
    args = (xproj, w_hh, w_hh if b_hn is None else b_hn, w_hh if w_hr is None else w_hr, h0,
            h0 if c0 is None else c0, lengths, y, h_n, h_n if c_n is None else c_n,
            saved if save else error, xbuf, counters, error, T, B, H, R, max_spin,
            xproj.stride(0), xproj.stride(1), y.stride(0), y.stride(1),
            saved.stride(0) if save else 0, saved.stride(1) if save else 0)
    launch(_rnn_forward_kernel, grid, args, dict(constexprs, SAVE=save), interpret=interpret,
           num_warps=num_warps, num_stages=num_stages, device=xproj.device, what="forward", error=error,
           max_spin=max_spin)
