"""Persistent forward of one LSTM or GRU layer: every time step of every direction in one launch.

Computes, per direction d and batch row b, over that row's own length (reversed when d == 1):
    gates_t = xproj[t, b, d] + h_{t-1} @ W_hh[d]^T     (xproj: the input GEMM, biases folded in)
    LSTM:  h_t, c_t = lstm_cell(gates_t, c_{t-1});  h_t = h_t @ W_hr[d]^T with proj_size
    GRU:   h_t = gru_cell(gates_t, b_hn[d], h_{t-1})
and writes y[t, b, d*R:(d+1)*R] = h_t (zero past the row's length), h_n, c_n.

Grid: (cdiv(B, BLOCK_B), D). One program owns a batch tile of one direction and all of its
hidden units (BLOCK_H >= H: the single-program tier).
On-chip for the whole sequence: W_hh^T as G tiles [BLOCK_R, BLOCK_H] and W_hr^T [BLOCK_H, BLOCK_R],
loaded once before the time loop; h (and c) in fp32 registers (fp64 for fp64 inputs).
Per step, memory traffic is one xproj row in and one y row out per batch row.
"""
import torch
import triton
import triton.language as tl

from .cells import GRU, LSTM, gru_cell, lstm_cell
from .interpreter import interpreted, interpreting


@triton.jit
def _load_w_t(w_ptr, row0, n_cols, offs_k, mask_k, offs_n, mask_n, STATE_DTYPE: tl.constexpr,
              MMA_DTYPE: tl.constexpr):
    """Rows row0 .. row0+BLOCK_N of a row-major (rows, n_cols) matrix, transposed to [BLOCK_K, BLOCK_N]."""
    ptrs = w_ptr + (row0 + offs_n[None, :]) * n_cols + offs_k[:, None]
    # Every load is upcast at once (the interpreter's bf16 arithmetic is wrong), then cast to the
    # MMA operand type: lossless, and a no-op pair once compiled.
    return tl.load(ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(STATE_DTYPE).to(MMA_DTYPE)


@triton.jit
def _gate_preact(x_row_ptr, gate, H, mask, h_mma, w_t, STATE_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    x = tl.load(x_row_ptr + gate * H, mask=mask, other=0.0).to(STATE_DTYPE)
    return x + tl.dot(h_mma, w_t, input_precision=INPUT_PRECISION).to(STATE_DTYPE)


@triton.jit
def _rnn_forward_kernel(
    xproj_ptr, w_hh_ptr, b_hn_ptr, w_hr_ptr, h0_ptr, c0_ptr, lengths_ptr,
    y_ptr, hn_ptr, cn_ptr,
    T, B, H, R,
    stride_xt, stride_xb, stride_yt, stride_yb,
    CELL: tl.constexpr, HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    W_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    G: tl.constexpr = 4 if CELL == LSTM else 3
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_r = offs_r < R
    mask_bh = mask_b[:, None] & mask_h[None, :]
    mask_br = mask_b[:, None] & mask_r[None, :]
    length = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)

    # Recurrent weights: read from memory once, kept on-chip for all T steps.
    w_hh_dir = w_hh_ptr + direction * (G * H * R)
    w_0 = _load_w_t(w_hh_dir, 0 * H, R, offs_r, mask_r, offs_h, mask_h, STATE_DTYPE, MMA_DTYPE)
    w_1 = _load_w_t(w_hh_dir, 1 * H, R, offs_r, mask_r, offs_h, mask_h, STATE_DTYPE, MMA_DTYPE)
    w_2 = _load_w_t(w_hh_dir, 2 * H, R, offs_r, mask_r, offs_h, mask_h, STATE_DTYPE, MMA_DTYPE)
    if CELL == LSTM:
        w_3 = _load_w_t(w_hh_dir, 3 * H, R, offs_r, mask_r, offs_h, mask_h, STATE_DTYPE, MMA_DTYPE)
        if HAS_PROJ:
            w_hr_t = _load_w_t(w_hr_ptr + direction * (R * H), 0, H, offs_h, mask_h, offs_r, mask_r,
                               STATE_DTYPE, MMA_DTYPE)
    else:
        b_hn = tl.load(b_hn_ptr + direction * H + offs_h, mask=mask_h, other=0.0).to(STATE_DTYPE)[None, :]

    state_bh = direction * B * H + offs_b[:, None] * H + offs_h[None, :]
    state_br = direction * B * R + offs_b[:, None] * R + offs_r[None, :]
    h = tl.load(h0_ptr + state_br, mask=mask_br, other=0.0).to(STATE_DTYPE)
    if CELL == LSTM:
        c = tl.load(c0_ptr + state_bh, mask=mask_bh, other=0.0).to(STATE_DTYPE)

    for step in range(T):
        active = step < length
        # per-row time index: the reverse direction starts at each row's own last step
        t = tl.where(direction == 1, length - 1 - step, step).to(tl.int64)
        x_row = (xproj_ptr + t[:, None] * stride_xt + offs_b[:, None].to(tl.int64) * stride_xb
                 + direction * (G * H) + offs_h[None, :])
        m_x = mask_bh & active[:, None]
        # round h to the weights' type as the MMA will see it (a no-op where MMA_DTYPE == W_DTYPE)
        h_mma = h.to(W_DTYPE).to(MMA_DTYPE)
        if CELL == LSTM:
            h_cell, c_new = lstm_cell(
                _gate_preact(x_row, 0, H, m_x, h_mma, w_0, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 1, H, m_x, h_mma, w_1, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 2, H, m_x, h_mma, w_2, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 3, H, m_x, h_mma, w_3, STATE_DTYPE, INPUT_PRECISION), c)
            c = tl.where(active[:, None], c_new, c)
            if HAS_PROJ:
                h_cell = h_cell.to(W_DTYPE).to(MMA_DTYPE)
                h_new = tl.dot(h_cell, w_hr_t, input_precision=INPUT_PRECISION).to(STATE_DTYPE)
            else:
                h_new = h_cell
        else:
            x_n = tl.load(x_row + 2 * H, mask=m_x, other=0.0).to(STATE_DTYPE)
            hh_n = tl.dot(h_mma, w_2, input_precision=INPUT_PRECISION).to(STATE_DTYPE) + b_hn
            h_new = gru_cell(
                _gate_preact(x_row, 0, H, m_x, h_mma, w_0, STATE_DTYPE, INPUT_PRECISION),
                _gate_preact(x_row, 1, H, m_x, h_mma, w_1, STATE_DTYPE, INPUT_PRECISION),
                x_n, hh_n, h)
        h = tl.where(active[:, None], h_new, h)
        # every (step, row) writes one y row: h_t at t while active, zero at `step` past the length
        y_t = tl.where(active, t, step)
        y_ptrs = y_ptr + y_t[:, None] * stride_yt + offs_b[:, None] * stride_yb + direction * R + offs_r[None, :]
        y_val = tl.where(active[:, None], h_new, 0.0)
        tl.store(y_ptrs, y_val.to(y_ptr.dtype.element_ty), mask=mask_br)

    tl.store(hn_ptr + state_br, h.to(hn_ptr.dtype.element_ty), mask=mask_br)
    if CELL == LSTM:
        tl.store(cn_ptr + state_bh, c.to(cn_ptr.dtype.element_ty), mask=mask_bh)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def kernel_constexprs(cell, dtype, has_proj, block_b, block_h, block_r, *, interpret, allow_tf32):
    """The compile-time parameters of one launch (also used by the ahead-of-time compile)."""
    w_dtype = _TL_DTYPE[dtype]
    # the interpreter's bf16 arithmetic is wrong: multiply bf16-rounded values in fp32 there
    mma_dtype = tl.float32 if (interpret and dtype == torch.bfloat16) else w_dtype
    state_dtype = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "tf32" if (dtype == torch.float32 and allow_tf32 and not interpret) else "ieee"
    return dict(CELL=LSTM if cell == "lstm" else GRU, HAS_PROJ=has_proj, BLOCK_B=block_b,
                BLOCK_H=block_h, BLOCK_R=block_r, W_DTYPE=w_dtype, MMA_DTYPE=mma_dtype,
                STATE_DTYPE=state_dtype, INPUT_PRECISION=precision)


def rnn_forward(cell, xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, h_n, c_n, *,
                block_b, block_h, block_r, num_warps, num_stages, interpret, allow_tf32):
    """Launch one layer (all directions). Shapes: xproj (T, B, D*G*H) with any (t, b) strides and
    unit stride inside a row; w_hh (D, G*H, R); b_hn (D, H); w_hr (D, R, H); h0, h_n (D, B, R);
    c0, c_n (D, B, H); lengths (B,) int32; y (T, B, D*R), same row rule as xproj. Unused pointers
    (b_hn for LSTM, w_hr without projection, c0/c_n for GRU) may be any tensor."""
    T, B = xproj.shape[0], xproj.shape[1]
    D, _, R = w_hh.shape
    H = h0.shape[2] if cell == "gru" else c0.shape[2]
    constexprs = kernel_constexprs(cell, w_hh.dtype, w_hr is not None, block_b, block_h, block_r,
                                   interpret=interpret, allow_tf32=allow_tf32)
    grid = (triton.cdiv(B, block_b), D)
    w_hr = w_hh if w_hr is None else w_hr
    args = (xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, h_n, c_n, T, B, H, R,
            xproj.stride(0), xproj.stride(1), y.stride(0), y.stride(1))
    if interpret:
        with interpreting():
            interpreted(_rnn_forward_kernel)[grid](*args, **constexprs)
    else:
        _rnn_forward_kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
