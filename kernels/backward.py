"""Persistent backward of one LSTM or GRU layer: the reverse time loop of every direction in one launch.

Walks each row's steps in the reverse of the forward's order (per row its own length, as the
forward) and, from the activations the forward saved (forward.py, SAVE), computes per step
    dh_t = dy_t + dh_carry                       (with proj_size: dh_t @ W_hr[d] for the cell)
    LSTM:  d(i, f, g, o) pre-activations, dc_carry = (dc + dh o (1 - tanh^2 c)) f
    GRU:   d(r, z) pre-activations, d(x_n) = dh (1 - z)(1 - n^2), direct share dh z
    dh_carry = d(gates) @ W_hh[d]                (GRU: the n gate's share is d(x_n) r)
and writes dgates[t, b, d] (the pre-activation gradients of the x side, in xproj's layout, zero
past a row's length), dh0, dc0, and with proj_size dh_t itself (for dW_hr). Weight, bias and
input gradients are GEMMs over the whole sequence, outside (layers/autograd.py).

Grid: (cdiv(B, BLOCK_B), SPLIT, D), as the forward. A program owns a batch tile of one direction
and BLOCK_H hidden units. On-chip for the whole sequence: its W_hh rows as stored, G tiles
[BLOCK_H, BLOCK_R] (the B operands of d(gates) @ W_hh; no transpose is needed), with proj_size its
W_hr columns [BLOCK_R, BLOCK_H]; the carried dh and dc in fp32 registers (fp64 for fp64 inputs).
SPLIT > 1: d(gates) @ W_hh is a sum over programs. Each step every program writes its partial
product [BLOCK_B, R] (fp32) to its slot of `xbuf`, meets the others at the bounded barrier, and
sums only its own columns over the slots, in slot order (a reduce-scatter: deterministic, and
SPLIT x fewer reads than summing all of R). With proj_size every program sums all of R, since
dh_t @ W_hr needs all of dh_t. xbuf is double-buffered by step parity, as in the forward.
"""
import triton
import triton.language as tl

from .cells import LSTM, gru_cell_backward, lstm_cell_backward
from .skeleton import (MAX_SPIN, _barrier, _k_chunks, _load_w_chunks, _program_tile, _recurrent_dot,  # noqa: F401
                       kernel_constexprs, launch, split_scratch, state_dtype)


@triton.jit
def _load_rows(w_ptr, offs_h, mask_h, offs_r, mask_r, R, STATE_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """Rows offs_h of a row-major (rows, R) matrix, as stored: [BLOCK_H, BLOCK_R]."""
    return tl.load(w_ptr + offs_h[:, None] * R + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :],
                   other=0.0).to(STATE_DTYPE).to(MMA_DTYPE)


@triton.jit
def _mma(x, W_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr):
    # rounded to the weights' type as the forward's MMA operands are (no-op pair where equal)
    return x.to(W_DTYPE).to(MMA_DTYPE)


@triton.jit
def _rnn_backward_kernel(
    dy_ptr, dhn_ptr, dcn_ptr, saved_ptr, y_ptr, h0_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    dgates_ptr, dh_all_ptr, dh0_ptr, dc0_ptr, xbuf_ptr, counter_ptr, error_ptr,
    T, B, H, R, MAX_SPIN,
    stride_dyt, stride_dyb, stride_st, stride_sb, stride_yt, stride_yb, stride_gt, stride_gb,
    stride_dht, stride_dhb,
    CELL: tl.constexpr, HAS_PROJ: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    W_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    G: tl.constexpr = 4 if CELL == LSTM else 3
    S: tl.constexpr = 5 if CELL == LSTM else 4  # saved values per hidden unit (forward.SAVED)
    pid_b, pid_h, direction, offs_b, offs_h, offs_r, mask_b, mask_h, mask_r, length = _program_tile(
        lengths_ptr, B, H, R, BLOCK_B, BLOCK_H, BLOCK_R)
    offs_b64 = offs_b.to(tl.int64)
    mask_bh = mask_b[:, None] & mask_h[None, :]
    mask_br = mask_b[:, None] & mask_r[None, :]

    # Recurrent weights: read from memory once, kept on-chip for all T steps.
    w_hh_dir = w_hh_ptr + direction * (G * H * R)
    w_0 = _load_rows(w_hh_dir + 0 * H * R, offs_h, mask_h, offs_r, mask_r, R, STATE_DTYPE, MMA_DTYPE)
    w_1 = _load_rows(w_hh_dir + 1 * H * R, offs_h, mask_h, offs_r, mask_r, R, STATE_DTYPE, MMA_DTYPE)
    w_2 = _load_rows(w_hh_dir + 2 * H * R, offs_h, mask_h, offs_r, mask_r, R, STATE_DTYPE, MMA_DTYPE)
    if CELL == LSTM:
        w_3 = _load_rows(w_hh_dir + 3 * H * R, offs_h, mask_h, offs_r, mask_r, R, STATE_DTYPE, MMA_DTYPE)
    if HAS_PROJ:  # my columns of W_hr: element (k, n) = W_hr[k, my unit n], the B operand of dh @ W_hr
        w_hr = _load_w_chunks(w_hr_ptr + direction * (R * H), offs_h, mask_h, 1, H, R, BLOCK_R, BLOCK_K,
                              STATE_DTYPE, MMA_DTYPE)

    state_bh = direction * B * H + offs_b[:, None] * H + offs_h[None, :]
    state_br = direction * B * R + offs_b[:, None] * R + offs_r[None, :]
    if HAS_PROJ:
        dh_full = tl.load(dhn_ptr + state_br, mask=mask_br, other=0.0).to(STATE_DTYPE)  # all of dh
    else:
        dh_mine = tl.load(dhn_ptr + state_bh, mask=mask_bh, other=0.0).to(STATE_DTYPE)  # my slice of dh
    if CELL == LSTM:
        dc = tl.load(dcn_ptr + state_bh, mask=mask_bh, other=0.0).to(STATE_DTYPE)
        c_first = tl.load(c0_ptr + state_bh, mask=mask_bh, other=0.0).to(STATE_DTYPE)
    else:
        h_first = tl.load(h0_ptr + state_bh, mask=mask_bh, other=0.0).to(STATE_DTYPE)
    counter = counter_ptr + direction * tl.num_programs(0) + pid_b
    alive = pid_b >= 0  # a true scalar, false after a barrier timeout

    for it in range(T):
        step = T - 1 - it
        active = step < length
        keep = active[:, None]
        m_act = mask_bh & keep
        has_prev = m_act & (step > 0)
        t = tl.where(direction == 1, length - 1 - step, step).to(tl.int64)
        t_prev = tl.where(direction == 1, t + 1, t - 1)
        out_t = tl.where(active, t, step)  # past the length: zeros at `step`, as the forward's y
        dy_row = dy_ptr + t[:, None] * stride_dyt + offs_b64[:, None] * stride_dyb + direction * R
        if HAS_PROJ:  # dh of all of h_t, then its share of my cell outputs: dh_t @ W_hr[:, mine]
            dh_t = dh_full + tl.load(dy_row + offs_r[None, :], mask=mask_br & keep, other=0.0).to(STATE_DTYPE)
            tl.store(dh_all_ptr + out_t[:, None] * stride_dht + offs_b64[:, None] * stride_dhb + direction * R
                     + offs_r[None, :], tl.where(keep, dh_t, 0.0).to(dh_all_ptr.dtype.element_ty),
                     mask=mask_br & (pid_h == 0))
            dh = _recurrent_dot(_k_chunks(_mma(dh_t, W_DTYPE, MMA_DTYPE), BLOCK_B, BLOCK_R, BLOCK_K), w_hr,
                                BLOCK_R, BLOCK_K, INPUT_PRECISION).to(STATE_DTYPE)
        else:
            dh = dh_mine + tl.load(dy_row + offs_h[None, :], mask=m_act, other=0.0).to(STATE_DTYPE)

        saved = saved_ptr + t[:, None] * stride_st + offs_b64[:, None] * stride_sb + direction * (S * H) + offs_h[None, :]
        dgates = (dgates_ptr + out_t[:, None] * stride_gt + offs_b64[:, None] * stride_gb + direction * (G * H)
                  + offs_h[None, :])
        gate_ty = dgates_ptr.dtype.element_ty
        if CELL == LSTM:
            c_prev_row = (saved_ptr + t_prev[:, None] * stride_st + offs_b64[:, None] * stride_sb
                          + direction * (S * H) + 4 * H + offs_h[None, :])
            c_prev = tl.where(step > 0, tl.load(c_prev_row, mask=has_prev, other=0.0), c_first)
            d_i, d_f, d_g, d_o, dc_prev = lstm_cell_backward(
                dh, dc, tl.load(saved, mask=m_act, other=0.0), tl.load(saved + H, mask=m_act, other=0.0),
                tl.load(saved + 2 * H, mask=m_act, other=0.0), tl.load(saved + 3 * H, mask=m_act, other=0.0),
                tl.load(saved + 4 * H, mask=m_act, other=0.0), c_prev)
            d_i = tl.where(keep, d_i, 0.0)
            d_f = tl.where(keep, d_f, 0.0)
            d_g = tl.where(keep, d_g, 0.0)
            d_o = tl.where(keep, d_o, 0.0)
            dc = tl.where(keep, dc_prev, dc)
            tl.store(dgates, d_i.to(gate_ty), mask=mask_bh)
            tl.store(dgates + H, d_f.to(gate_ty), mask=mask_bh)
            tl.store(dgates + 2 * H, d_g.to(gate_ty), mask=mask_bh)
            tl.store(dgates + 3 * H, d_o.to(gate_ty), mask=mask_bh)
            partial = tl.dot(_mma(d_i, W_DTYPE, MMA_DTYPE), w_0, input_precision=INPUT_PRECISION,
                             out_dtype=STATE_DTYPE)
            partial = tl.dot(_mma(d_f, W_DTYPE, MMA_DTYPE), w_1, partial, input_precision=INPUT_PRECISION,
                             out_dtype=STATE_DTYPE)
            partial = tl.dot(_mma(d_g, W_DTYPE, MMA_DTYPE), w_2, partial, input_precision=INPUT_PRECISION,
                             out_dtype=STATE_DTYPE)
            partial = tl.dot(_mma(d_o, W_DTYPE, MMA_DTYPE), w_3, partial, input_precision=INPUT_PRECISION,
                             out_dtype=STATE_DTYPE)
        else:
            h_prev_row = y_ptr + t_prev[:, None] * stride_yt + offs_b64[:, None] * stride_yb + direction * R
            h_prev = tl.where(step > 0, tl.load(h_prev_row + offs_h[None, :], mask=has_prev, other=0.0)
                              .to(STATE_DTYPE), h_first)
            r = tl.load(saved, mask=m_act, other=0.0)
            d_r, d_z, d_n, dh_direct = gru_cell_backward(
                dh, r, tl.load(saved + H, mask=m_act, other=0.0), tl.load(saved + 2 * H, mask=m_act, other=0.0),
                tl.load(saved + 3 * H, mask=m_act, other=0.0), h_prev)
            d_r = tl.where(keep, d_r, 0.0)
            d_z = tl.where(keep, d_z, 0.0)
            d_n = tl.where(keep, d_n, 0.0)
            tl.store(dgates, d_r.to(gate_ty), mask=mask_bh)
            tl.store(dgates + H, d_z.to(gate_ty), mask=mask_bh)
            tl.store(dgates + 2 * H, d_n.to(gate_ty), mask=mask_bh)
            partial = tl.dot(_mma(d_r, W_DTYPE, MMA_DTYPE), w_0, input_precision=INPUT_PRECISION,
                             out_dtype=STATE_DTYPE)
            partial = tl.dot(_mma(d_z, W_DTYPE, MMA_DTYPE), w_1, partial, input_precision=INPUT_PRECISION,
                             out_dtype=STATE_DTYPE)
            partial = tl.dot(_mma(d_n * r, W_DTYPE, MMA_DTYPE), w_2, partial, input_precision=INPUT_PRECISION,
                             out_dtype=STATE_DTYPE)
        # partial [BLOCK_B, BLOCK_R]: my units' share of dh_{t-1}

        if SPLIT > 1:  # dh_{t-1} is the sum of every program's share
            xbuf = xbuf_ptr + ((it % 2) * tl.num_programs(2) + direction) * (SPLIT * B * R) + offs_b[:, None] * R
            tl.store(xbuf + pid_h * (B * R) + offs_r[None, :], partial, mask=mask_br)
            alive = _barrier(counter, SPLIT * (it + 1), alive, MAX_SPIN)
            if HAS_PROJ:
                partial = tl.zeros([BLOCK_B, BLOCK_R], STATE_DTYPE)
                for slot in range(SPLIT):  # in a fixed order: every program sums alike
                    partial += tl.load(xbuf + slot * (B * R) + offs_r[None, :], mask=mask_br, other=0.0,
                                       cache_modifier=".cg")
            else:  # only my columns
                partial = tl.zeros([BLOCK_B, BLOCK_H], STATE_DTYPE)
                for slot in range(SPLIT):
                    partial += tl.load(xbuf + slot * (B * R) + offs_h[None, :], mask=mask_bh, other=0.0,
                                       cache_modifier=".cg")
        if HAS_PROJ:
            dh_full = tl.where(keep, partial, dh_full)
        elif CELL == LSTM:
            dh_mine = tl.where(keep, partial, dh_mine)
        else:
            dh_mine = tl.where(keep, partial + dh_direct, dh_mine)

    if HAS_PROJ:
        tl.store(dh0_ptr + state_br, dh_full.to(dh0_ptr.dtype.element_ty), mask=mask_br & (pid_h == 0))
    else:
        tl.store(dh0_ptr + state_bh, dh_mine.to(dh0_ptr.dtype.element_ty), mask=mask_bh)
    if CELL == LSTM:
        tl.store(dc0_ptr + state_bh, dc.to(dc0_ptr.dtype.element_ty), mask=mask_bh)
    tl.store(error_ptr, 1, mask=alive == 0)


def rnn_backward(cell, dy, dh_n, dc_n, saved, y, h0, c0, w_hh, w_hr, lengths, dgates, dh_all, dh0, dc0, *,
                 block_b, block_h, block_r, num_warps, num_stages, interpret, allow_tf32, max_spin=None):
    """Launch the backward of one layer (all directions), given the forward's inputs and outputs.
    Shapes as rnn_forward's: dy and y (T, B, D*R); dh_n, h0, dh0 (D, B, R); dc_n, c0, dc0 (D, B, H);
    saved (T, B, D, SAVED[cell], H); dgates (T, B, D*G*H), written in full (zeros past each row's
    length); dh_all (T, B, D*R) with proj_size, written in full, else unused. (t, b) strides are
    free, rows contiguous. What a layer does not use (dc_n, c0, dc0 for GRU; w_hr and dh_all
    without proj) may be None."""
    T, B = dy.shape[0], dy.shape[1]
    D, _, R = w_hh.shape
    H = saved.shape[-1]
    split = triton.cdiv(H, block_h)
    has_proj = w_hr is not None
    constexprs = kernel_constexprs(cell, w_hh.dtype, has_proj, split, block_b, block_h, block_r,
                                   interpret=interpret, allow_tf32=allow_tf32)
    grid = (triton.cdiv(B, block_b), split, D)
    xbuf, counters, error = split_scratch(split, D, grid[0], (split, B, R), state_dtype(w_hh.dtype), dy.device)
    if max_spin is None:
        max_spin = MAX_SPIN["interpret" if interpret else "compiled"]
    # unused pointers point at a tensor the kernel has anyway
    dh_all = dgates if dh_all is None else dh_all
    args = (dy, dh_n, dh_n if dc_n is None else dc_n, saved, y, h0, h0 if c0 is None else c0, w_hh,
            w_hh if w_hr is None else w_hr, lengths, dgates, dh_all, dh0, dh0 if dc0 is None else dc0, xbuf, counters, error, T, B, H, R, max_spin,
            dy.stride(0), dy.stride(1), saved.stride(0), saved.stride(1), y.stride(0), y.stride(1),
            dgates.stride(0), dgates.stride(1), dh_all.stride(0), dh_all.stride(1))
    launch(_rnn_backward_kernel, grid, args, constexprs, interpret=interpret, num_warps=num_warps,
           num_stages=num_stages, device=dy.device, what="backward", error=error, max_spin=max_spin)
