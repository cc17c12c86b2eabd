"""Persistent forward of one LSTM or GRU layer: every time step of every direction in one launch.

Computes, per direction d and batch row b, over that row's own length (reversed when d == 1):
    gates_t = xproj[t, b, d] + W_hh[d] @ h_{t-1}       (xproj: the input GEMM, biases folded in)
    LSTM:  h_t, c_t = lstm_cell(gates_t, c_{t-1});  h_t = W_hr[d] @ h_t with proj_size
    GRU:   h_t = gru_cell(gates_t, b_hn[d], h_{t-1})
and writes y[t, b, d*R:(d+1)*R] = h_t (zero past the row's length), h_n, c_n.

Grid (cdiv(B, BLOCK_B), SPLIT, D), see tiles.py. A program owns BLOCK_H hidden units (all
gates) of a batch tile of BLOCK_B rows of one direction. On-chip for the whole sequence: its W_hh
rows as one [4 * BLOCK_H, R] tile in K-chunks (the A operand of gates^T = W @ h^T), with
proj_size its W_hr columns; h and c in fp32 registers (fp64 for fp64), as [BLOCK_H, BLOCK_B]
tiles. Per step: one chained MMA over K, the gate split, the cell, one y store.
The next step's xproj rows are loaded before the barrier wait, so their latency is off the
critical path; 16-bit rows are loaded one element per register where registers allow
(X_IN_PLACE, config.xproj_in_place), since ptxas unpacks a loaded pair at once and the warp
would wait for the load there.
SPLIT > 1: each step a program publishes its part of h_t to `xbuf` (its units' rows; with
proj_size its partial W_hr product, one slot per program), arrives at the barrier, prefetches,
waits, and reads h_t back as the next step's MMA operand (with proj_size every program sums the
slots in the same order). xbuf is double-buffered by step parity; h0 is published the same way
before the loop.

Saving for the backward (SAVE, only when autograd needs it; otherwise nothing is stored or
allocated): per step, row and direction the post-activation gates and c (LSTM: i, f, g, o, c,
5H values) or r, z, n and W_hn h + b_hn (GRU, 4H), in the state dtype, as cuDNN's reserve space.
That is T * B * D * 5H * 4 bytes for an fp32-state LSTM: 320 KiB per step and direction at
H = 1024, B = 16 (GRU: 256 KiB). The backward recomputes nothing.
"""
import triton
import triton.language as tl

from .cells import GRU, LSTM, gru_cell, lstm_cell
from .config import kernel_constexprs, last_chunk_late, state_dtype, xproj_in_place
from .exchange import MAX_SPIN, _arrive, _store_in_place, _wait, _xbuf_tile, split_scratch
from .launcher import launch, one_wave, run_in_waves, whole_grid
from .tiles import (_batch_tile, _chunked_dot, _dot_from_memory, _gate_rows, _load_chunks, _load_in_place, _next,
                    _program, _split_gates, _time_index)

# what the forward saves for the backward, per row, step and direction: H values each
SAVED = {"lstm": 5, "gru": 4}


@triton.jit
def _load_x(xproj_ptr, step, length, direction, offs_b, mask_b, units, unit_mask, H, stride_xt, stride_xb,
            G: tl.constexpr, STATE_DTYPE: tl.constexpr, X_IN_PLACE: tl.constexpr):
    """The xproj gates of `step`: G tiles [BLOCK_H, BLOCK_B], zero past each row's length. Loaded in
    place (one register per element): nothing reads them until the cell, after the barrier wait."""
    t = _time_index(step, length, direction)
    rows = (xproj_ptr + t[None, :] * stride_xt + offs_b[None, :].to(tl.int64) * stride_xb + direction * (G * H)
            + units)
    mask = unit_mask & (mask_b & (step < length))[None, :]
    x = ()
    for g in tl.static_range(G):
        x = x + (_load_in_place(rows + g * H, mask, X_IN_PLACE).to(STATE_DTYPE),)
    return x


@triton.jit
def _publish(xbuf_ptr, parity, pid_d, pid_b, units, unit_mask, cols, h, XBUF_ROWS, BLOCK_B: tl.constexpr,
             W_DTYPE: tl.constexpr, H_IN_FLIGHT: tl.constexpr, INTERPRET: tl.constexpr):
    """My block's rows of h in the exchange buffer, in the weights' dtype. For the unmasked read-back
    (H_IN_FLIGHT) rows past H are written too, as zeros, so every row up to SPLIT * BLOCK_H is
    finite, each element by the thread that holds it (no shared-memory round trip). Otherwise a
    masked tl.store: the in-place store there took the GRU bf16 H = 1024 forward to 255 registers
    and halved its loads in flight."""
    tile = _xbuf_tile(xbuf_ptr, parity, pid_d, pid_b, 0, XBUF_ROWS, 1, BLOCK_B) + units * BLOCK_B + cols[None, :]
    if H_IN_FLIGHT:
        _store_in_place(tile, tl.where(unit_mask, h, 0.0).to(W_DTYPE), INTERPRET)
    else:
        tl.store(tile, h.to(W_DTYPE), mask=unit_mask)


@triton.jit
def _save(saved_ptr, y_t, b64, units, mask, active, direction, H, stride_st, stride_sb,
          a0, a1, a2, a3, a4, N: tl.constexpr):
    """Store the first N (4 or 5) of a0..a4 ([BLOCK_H, BLOCK_B]) in saved[y_t, b, direction, 0..N-1, unit]:
    the values while active, zeros past the row's length. With N == 4, a4 is not used."""
    row = saved_ptr + y_t * stride_st + b64 * stride_sb + direction * (N * H) + units
    tl.store(row, tl.where(active, a0, 0.0), mask=mask)
    tl.store(row + H, tl.where(active, a1, 0.0), mask=mask)
    tl.store(row + 2 * H, tl.where(active, a2, 0.0), mask=mask)
    tl.store(row + 3 * H, tl.where(active, a3, 0.0), mask=mask)
    if N == 5:
        tl.store(row + 4 * H, tl.where(active, a4, 0.0), mask=mask)


@triton.jit
def _rnn_forward_kernel(
    xproj_ptr, w_hh_ptr, b_hn_ptr, w_hr_ptr, h0_ptr, c0_ptr, lengths_ptr,
    y_ptr, hn_ptr, cn_ptr, saved_ptr, xbuf_ptr, counter_ptr, error_ptr,
    T, B, H, R, XBUF_ROWS, MAX_SPIN,
    stride_xt, stride_xb, stride_yt, stride_yb, stride_st, stride_sb,
    SAVE: tl.constexpr, DIR0: tl.constexpr, CELL: tl.constexpr, HAS_PROJ: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, CHUNKS: tl.constexpr, H_GROUP: tl.constexpr,
    H_IN_FLIGHT: tl.constexpr, W_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, MATH: tl.constexpr, EMULATE: tl.constexpr, INTERPRET: tl.constexpr,
    X_IN_PLACE: tl.constexpr, LATE_LAST: tl.constexpr,
):
    G: tl.constexpr = 4 if CELL == LSTM else 3
    # with proj_size every program holds a partial of the full h_t: one xbuf slot per program
    SLOTS: tl.constexpr = SPLIT if HAS_PROJ else 1
    pid_b, pid_h, pid_d, direction, offs_u, mask_u = _program(H, DIR0, BLOCK_H)
    offs_b, mask_b, length = _batch_tile(lengths_ptr, B, pid_b, BLOCK_B)
    units = offs_u[:, None]  # tiles are [BLOCK_H, BLOCK_B]: (unit, batch row)
    unit_mask = mask_u[:, None]
    mask_bh = unit_mask & mask_b[None, :]
    b64 = offs_b[None, :].to(tl.int64)
    cols = tl.arange(0, BLOCK_B)

    # Recurrent weights: read from memory once, kept on-chip for all T steps.
    rows, row_mask = _gate_rows(pid_h, H, G, BLOCK_H)
    w = _load_chunks(w_hh_ptr + direction * (G * H * R), rows * R, row_mask, R, 1, CHUNKS, False, STATE_DTYPE,
                     MMA_DTYPE)
    if HAS_PROJ:  # my columns of W_hr: chunk [width, BLOCK_H], element (r, unit) = W_hr[r, unit]
        w_hr = _load_chunks(w_hr_ptr + direction * (R * H), offs_u, mask_u, R, H, CHUNKS, True, STATE_DTYPE,
                            MMA_DTYPE)
    if CELL == GRU:
        if SPLIT > 1 and not H_IN_FLIGHT:
            # a whole [BLOCK_H, BLOCK_B] tile: Triton's layout-conversion pass recomputes a store's
            # operand in the store's layout back to the nearest costly op, and the y store and the
            # publish want two layouts; with b_hn a column, that copy reached back through the cell
            # (every MUFU twice, GRU bf16 H = 1024 B = 64: 8 a cell element where 4 do)
            b_hn = tl.load(b_hn_ptr + direction * H + units + 0 * cols[None, :], mask=mask_bh, other=0.0)
        else:
            b_hn = tl.load(b_hn_ptr + direction * H + units, mask=unit_mask, other=0.0)
        b_hn = b_hn.to(STATE_DTYPE)
    counter = counter_ptr + pid_d * tl.num_programs(0) + pid_b
    alive = pid_b >= 0  # a true scalar, false after a barrier timeout

    # h_{t-1}: my units; with proj_size all of it, as K-chunks [width, BLOCK_B]
    if HAS_PROJ:
        h = _load_chunks(h0_ptr + direction * B * R, offs_b * R, mask_b, R, 1, CHUNKS, True, STATE_DTYPE,
                         STATE_DTYPE)
    else:
        h = tl.load(h0_ptr + direction * B * R + offs_b[None, :] * R + units, mask=mask_bh, other=0.0).to(STATE_DTYPE)
        if SPLIT > 1:  # h0, published as the step before the first (parity 1)
            _publish(xbuf_ptr, 1, pid_d, pid_b, units, unit_mask, cols, h, XBUF_ROWS, BLOCK_B, W_DTYPE, H_IN_FLIGHT,
                     INTERPRET)
    if CELL == LSTM:
        c = tl.load(c0_ptr + direction * B * H + offs_b[None, :] * H + units, mask=mask_bh, other=0.0).to(STATE_DTYPE)
    x = _load_x(xproj_ptr, 0, length, direction, offs_b, mask_b, units, unit_mask, H, stride_xt, stride_xb, G,
                STATE_DTYPE, X_IN_PLACE)
    if SPLIT > 1:
        _arrive(counter)
        alive = _wait(counter, SPLIT, alive, MAX_SPIN, INTERPRET)

    for step in range(T):
        parity = step % 2
        # gates^T = W @ h_{t-1}^T, h rounded to the weights' type as the MMA sees it
        if HAS_PROJ:
            h_op = ()
            for k in tl.static_range(len(CHUNKS)):
                h_op = h_op + (h[k].to(W_DTYPE).to(MMA_DTYPE),)
            acc = _chunked_dot(w, h_op, STATE_DTYPE, INPUT_PRECISION)
        elif SPLIT > 1:  # everyone's h_{t-1}, published last step
            acc = _dot_from_memory(w, _xbuf_tile(xbuf_ptr, 1 - parity, pid_d, pid_b, 0, XBUF_ROWS, SLOTS, BLOCK_B),
                                   cols, R, BLOCK_B, CHUNKS, H_GROUP, not H_IN_FLIGHT, STATE_DTYPE, MMA_DTYPE,
                                   INPUT_PRECISION, LATE_LAST, INTERPRET)
        else:
            acc = _chunked_dot(w, (h.to(W_DTYPE).to(MMA_DTYPE),), STATE_DTYPE, INPUT_PRECISION)
        g0, g1, g2, g3 = _split_gates(acc, BLOCK_H, BLOCK_B)

        active = (step < length)[None, :]
        # every (step, row) writes one y row (and one saved row): at t while active, zero at
        # `step` past the length, so no output or saved row is left unwritten
        y_t = tl.where(step < length, _time_index(step, length, direction), step)[None, :]
        if CELL == LSTM:
            h_cell, c_new, i, f, g, o = lstm_cell(g0 + x[0], g1 + x[1], g2 + x[2], g3 + x[3], c, MATH,
                                                  EMULATE)
            c = tl.where(active, c_new, c)
            if SAVE:
                _save(saved_ptr, y_t, b64, units, mask_bh, active, direction, H, stride_st, stride_sb, i, f, g, o, c, 5)
        else:
            hh_n = g2 + b_hn
            h_cell, r, z, n = gru_cell(g0 + x[0], g1 + x[1], x[2], hh_n, h, MATH, EMULATE)
            if SAVE:
                _save(saved_ptr, y_t, b64, units, mask_bh, active, direction, H, stride_st, stride_sb,
                      r, z, n, hh_n, hh_n, 4)

        if HAS_PROJ:  # my units' share of h_t = W_hr @ (o * tanh(c)): K-chunks [width, BLOCK_B]
            cell_op = h_cell.to(W_DTYPE).to(MMA_DTYPE)
            partial = ()
            start = 0
            for k in tl.static_range(len(CHUNKS)):
                p = tl.dot(w_hr[k], cell_op, input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
                partial = partial + (p,)
                if SPLIT > 1:
                    offs_r = start + tl.arange(0, CHUNKS[k])
                    tl.store(_xbuf_tile(xbuf_ptr, parity, pid_d, pid_b, pid_h, XBUF_ROWS, SLOTS, BLOCK_B)
                             + offs_r[:, None] * BLOCK_B + cols[None, :], p, mask=(offs_r < R)[:, None])
                start += CHUNKS[k]
        else:
            h = tl.where(active, h_cell, h)
            tl.store(y_ptr + y_t * stride_yt + b64 * stride_yb + direction * R + units,
                     tl.where(active, h_cell, 0.0).to(y_ptr.dtype.element_ty), mask=mask_bh)
            if SPLIT > 1:  # publish my units' h_t for everyone's next step
                _publish(xbuf_ptr, parity, pid_d, pid_b, units, unit_mask, cols, h, XBUF_ROWS, BLOCK_B, W_DTYPE,
                         H_IN_FLIGHT, INTERPRET)

        if SPLIT > 1:
            _arrive(counter)
        # the next step's xproj, loaded before the wait: its latency is off the step's critical path
        x = _load_x(xproj_ptr, _next(step), length, direction, offs_b, mask_b, units, unit_mask, H, stride_xt,
                    stride_xb, G, STATE_DTYPE, X_IN_PLACE)
        if SPLIT > 1:
            alive = _wait(counter, SPLIT * (step + 2), alive, MAX_SPIN, INTERPRET)

        if HAS_PROJ:  # h_t = the sum of every program's partial, in slot order: every program sums alike
            summed = ()
            start = 0
            for k in tl.static_range(len(CHUNKS)):
                offs_r = start + tl.arange(0, CHUNKS[k])
                if SPLIT > 1:
                    slots = _xbuf_tile(xbuf_ptr, parity, pid_d, pid_b, 0, XBUF_ROWS, SLOTS, BLOCK_B) + \
                        offs_r[:, None] * BLOCK_B + cols[None, :]
                    total = tl.load(slots, mask=(offs_r < R)[:, None], other=0.0, cache_modifier=".cg")
                    for slot in range(1, SPLIT):
                        total += tl.load(slots + slot * (XBUF_ROWS * BLOCK_B), mask=(offs_r < R)[:, None], other=0.0,
                                         cache_modifier=".cg")
                else:
                    total = partial[k]
                summed = summed + (tl.where(active, total, h[k]),)
                tl.store(y_ptr + y_t * stride_yt + b64 * stride_yb + direction * R + offs_r[:, None],
                         tl.where(active, total, 0.0).to(y_ptr.dtype.element_ty),
                         mask=(offs_r < R)[:, None] & mask_b[None, :] & (pid_h == 0))
                start += CHUNKS[k]
            h = summed

    if HAS_PROJ:
        start = 0
        for k in tl.static_range(len(CHUNKS)):
            offs_r = start + tl.arange(0, CHUNKS[k])
            tl.store(hn_ptr + direction * B * R + offs_b[None, :] * R + offs_r[:, None], h[k].to(hn_ptr.dtype.element_ty),
                     mask=(offs_r < R)[:, None] & mask_b[None, :] & (pid_h == 0))
            start += CHUNKS[k]
    else:
        tl.store(hn_ptr + direction * B * R + offs_b[None, :] * R + units, h.to(hn_ptr.dtype.element_ty), mask=mask_bh)
    if CELL == LSTM:
        tl.store(cn_ptr + direction * B * H + offs_b[None, :] * H + units, c.to(cn_ptr.dtype.element_ty), mask=mask_bh)
    tl.atomic_add(error_ptr, 1, mask=alive == 0, sem="relaxed")  # counts timed-out programs: only grows


def forward_arguments(cell, xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, h_n, c_n, saved, *, config, interpret,
                      allow_tf32, wave, max_spin):
    """(grid, args, constexprs) of one launch of the forward kernel on the wave (0, tiles, dir0, dirs),
    its split-tier scratch allocated: what rnn_forward launches and the ahead-of-time compile
    (autotune/aot.py) compiles. Arguments as rnn_forward's."""
    _, tiles, dir0, dirs = wave
    T, B = xproj.shape[0], xproj.shape[1]
    R = w_hh.shape[2]
    H = h0.shape[2] if cell == "gru" else c0.shape[2]
    split = triton.cdiv(H, config.block_h)
    has_proj = w_hr is not None
    constexprs = kernel_constexprs(cell, w_hh.dtype, has_proj, split, config, R, interpret=interpret,
                                   allow_tf32=allow_tf32)
    # the exchange buffer holds h rows in the weights' dtype, or partial products (fp32) with proj_size
    rows = R if has_proj else split * config.block_h
    xbuf, counters, error = split_scratch(split, dirs, tiles, (split if has_proj else 1, rows, config.block_b),
                                          state_dtype(w_hh.dtype) if has_proj else w_hh.dtype, xproj.device, interpret)
    save = saved is not None
    # unused pointers point at a tensor the kernel has anyway
    args = (xproj, w_hh, w_hh if b_hn is None else b_hn, w_hh if w_hr is None else w_hr, h0,
            h0 if c0 is None else c0, lengths, y, h_n, h_n if c_n is None else c_n,
            saved if save else error, xbuf, counters, error, T, B, H, R, rows, max_spin,
            xproj.stride(0), xproj.stride(1), y.stride(0), y.stride(1),
            saved.stride(0) if save else 0, saved.stride(1) if save else 0)
    x_in_place = xproj_in_place(w_hh.dtype, has_proj, config, interpret=interpret)
    return (tiles, split, dirs), args, dict(constexprs, SAVE=save, DIR0=dir0, X_IN_PLACE=x_in_place,
                                            LATE_LAST=last_chunk_late(constexprs, x_in_place))


def rnn_forward(cell, xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, h_n, c_n, *, saved=None,
                config, interpret, allow_tf32, waves=None, max_spin=None):
    """Launch one layer (all directions). Shapes: xproj (T, B, D*G*H) with any (t, b) strides and
    unit stride inside a row; w_hh (D, G*H, R); b_hn (D, H); w_hr (D, R, H); h0, h_n (D, B, R);
    c0, c_n (D, B, H); lengths (B,) int32; y (T, B, D*R), same row rule as xproj. What a layer does
    not use (b_hn for LSTM, w_hr without projection, c0/c_n for GRU) may be None.
    saved: None, or (T, B, D, SAVED[cell], H) in the state dtype (same row rule), filled with what
    the backward needs (LSTM i, f, g, o, c; GRU r, z, n, W_hn h + b_hn per step).
    config (KernelConfig): a program takes block_b batch rows and block_h hidden units; SPLIT =
    cdiv(H, block_h) programs share a batch tile.
    waves: the launches, (tile0, tiles, dir0, dirs) each (launcher.py, "waves"), one after another;
    default one, the whole grid. With SPLIT > 1 the caller must make sure each wave's grid can be
    resident at once (the launch is cooperative and fails otherwise)."""
    if cell == "gru":  # no cell state: whatever was passed is not read or written
        c0 = c_n = None
    waves = waves or one_wave(xproj.shape[1], config.block_b, w_hh.shape[0])
    if max_spin is None:
        max_spin = MAX_SPIN["interpret" if interpret else "compiled"]
    if not whole_grid(waves):
        def run(wave, lengths, rows, states, outputs):
            (xproj, y, saved), (h0, c0), (h_n, c_n) = rows, states, outputs
            rnn_forward(cell, xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, h_n, c_n, saved=saved, config=config,
                        interpret=interpret, allow_tf32=allow_tf32, waves=(wave,), max_spin=max_spin)
        return run_in_waves(run, waves, config.block_b, lengths, rows=(xproj, y, saved), states=(h0, c0),
                            outputs=(h_n, c_n))
    grid, args, constexprs = forward_arguments(cell, xproj, w_hh, b_hn, w_hr, h0, c0, lengths, y, h_n, c_n, saved,
                                               config=config, interpret=interpret, allow_tf32=allow_tf32,
                                               wave=waves[0], max_spin=max_spin)
    launch(_rnn_forward_kernel, grid, args, constexprs, config=config, interpret=interpret, device=xproj.device,
           what="forward", max_spin=max_spin)
