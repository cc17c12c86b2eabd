"""Persistent backward of one LSTM or GRU layer: the reverse time loop of every direction in one launch.

Walks each row's steps in the reverse of the forward's order (per row its own length, as the
forward) and, from the activations the forward saved (forward.py, SAVE), computes per step
    dh_t = dy_t + dh_carry                       (with proj_size: W_hr[d]^T dh_t for the cell)
    LSTM:  d(i, f, g, o) pre-activations, dc_carry = (dc + dh o (1 - tanh^2 c)) f
    GRU:   d(r, z) pre-activations, d(x_n) = dh (1 - z)(1 - n^2), direct share dh z
    dh_carry = W_hh[d]^T d(gates)                (GRU: the n gate's share is d(x_n) r)
and writes dgates[t, b, d] (the pre-activation gradients of the x side, in xproj's layout, zero
past a row's length), dh0, dc0, and with proj_size dh_t itself (for dW_hr). Weight, bias and
input gradients are GEMMs over the whole sequence, outside (layers/autograd.py).

Grid (cdiv(B, BLOCK_B), SPLIT, D), as the forward (tiles.py). On-chip for the whole
sequence: the program's W_hh rows as the forward holds them, read as their transpose, K-chunks
[width, 4 * BLOCK_H]: the A operand of the swapped product dh_carry^T = W^T @ dgates^T (M = R,
N = BLOCK_B, K = 4 * BLOCK_H: wgmma on sm_90 for chunks of 64 rows and more); with proj_size its
W_hr columns; the carried dh and dc in fp32 registers (fp64 for fp64). The next reverse step's
dy, saved activations and c_{t-1} / h_{t-1} are loaded before the barrier wait.
SPLIT > 1: W^T @ dgates^T is a sum over programs. Each step every program stores its partial
product straight from the MMA accumulator's registers (exchange._store_in_place: no round trip
through shared memory), fp32 in its slot of `xbuf`, laid out [BLOCK_B, rows] with units
contiguous as in the saved activations and dgates, so the sum below needs no layout change; it meets the
others at the bounded barrier, and sums only its own units' rows over the slots, in slot order
(a reduce-scatter: deterministic, and SPLIT x fewer reads than summing all of R). With proj_size
every program sums all of R, since W_hr^T dh_t needs all of dh_t. xbuf is double-buffered by
step parity, as in the forward.
"""
import triton
import triton.language as tl

from .cells import LSTM, gru_cell_backward, lstm_cell_backward
from .config import kernel_constexprs, state_dtype
from .exchange import MAX_SPIN, _arrive, _store_in_place, _wait, _xbuf_tile, split_scratch
from .launcher import launch, one_wave, run_in_waves, whole_grid
from .tiles import (_batch_tile, _chunked_dot, _gate_rows, _join_gates, _load_chunks, _next, _program,
                    _split_gate_columns, _time_index)


@triton.jit
def _in_sequence(step, length):
    """Per batch row, whether reverse step `step` is one of the row's steps, 0 <= step < length. The
    prefetch after the last step asks for step -1, which is none: nothing is read for it. One
    unsigned comparison (-1 is the largest uint32): two cost the tightest programs a spill."""
    return step.to(tl.uint32, bitcast=True) < length.to(tl.uint32, bitcast=True)


@triton.jit
def _load_step(dy_ptr, saved_ptr, y_ptr, first, step, length, direction, offs_b, mask_b, units, unit_mask, H, R,
               stride_dyt, stride_dyb, stride_st, stride_sb, stride_yt, stride_yb,
               CELL: tl.constexpr, HAS_PROJ: tl.constexpr, CHUNKS: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """What reverse step `step` reads: dy_t (my units; with proj_size all of R, as
    K-chunks [width, BLOCK_B]), the saved activations of t, and the state before t: c_{t-1} (LSTM,
    saved) or h_{t-1} (GRU, from y), `first` (c0 / h0) at the row's first step. Zero outside the
    row's steps (_in_sequence)."""
    S: tl.constexpr = 5 if CELL == LSTM else 4
    active = mask_b & _in_sequence(step, length)
    t = _time_index(step, length, direction)
    t_prev = tl.where(direction == 1, t + 1, t - 1)
    b64 = offs_b.to(tl.int64)
    m = unit_mask & active[None, :]
    dy_cols = t * stride_dyt + b64 * stride_dyb + direction * R
    if HAS_PROJ:
        dy = _load_chunks(dy_ptr, dy_cols, active, R, 1, CHUNKS, True, STATE_DTYPE, STATE_DTYPE)
    else:
        dy = tl.load(dy_ptr + dy_cols[None, :] + units, mask=m, other=0.0).to(STATE_DTYPE)
    rows = saved_ptr + (t * stride_st + b64 * stride_sb)[None, :] + direction * (S * H) + units
    acts = ()
    for k in tl.static_range(S):
        acts = acts + (tl.load(rows + k * H, mask=m, other=0.0).to(STATE_DTYPE),)
    has_prev = m & (step > 0)
    if CELL == LSTM:
        prev = tl.load(saved_ptr + (t_prev * stride_st + b64 * stride_sb)[None, :] + direction * (S * H) + 4 * H
                       + units, mask=has_prev, other=0.0).to(STATE_DTYPE)
    else:  # y holds h in the input dtype: the GRU's h_{t-1} is rounded to it (within the tolerances)
        prev = tl.load(y_ptr + (t_prev * stride_yt + b64 * stride_yb)[None, :] + direction * R + units,
                       mask=has_prev, other=0.0).to(STATE_DTYPE)
    return dy, acts, tl.where(step > 0, prev, first)


@triton.jit
def _rnn_backward_kernel(
    dy_ptr, dhn_ptr, dcn_ptr, saved_ptr, y_ptr, h0_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    dgates_ptr, dh_all_ptr, dh0_ptr, dc0_ptr, xbuf_ptr, counter_ptr, error_ptr,
    T, B, H, R, XBUF_ROWS, MAX_SPIN,
    stride_dyt, stride_dyb, stride_st, stride_sb, stride_yt, stride_yb, stride_gt, stride_gb,
    stride_dht, stride_dhb,
    DIR0: tl.constexpr, CELL: tl.constexpr, HAS_PROJ: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, CHUNKS: tl.constexpr, H_GROUP: tl.constexpr,
    H_IN_FLIGHT: tl.constexpr, W_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, MATH: tl.constexpr, EMULATE: tl.constexpr, INTERPRET: tl.constexpr,
):
    G: tl.constexpr = 4 if CELL == LSTM else 3
    pid_b, pid_h, pid_d, direction, offs_u, mask_u = _program(H, DIR0, BLOCK_H)
    offs_b, mask_b, length = _batch_tile(lengths_ptr, B, pid_b, BLOCK_B)
    units = offs_u[:, None]  # tiles are [BLOCK_H, BLOCK_B]: (unit, batch row)
    unit_mask = mask_u[:, None]
    mask_bh = unit_mask & mask_b[None, :]
    b64 = offs_b[None, :].to(tl.int64)
    cols = tl.arange(0, BLOCK_B)

    # Recurrent weights: read from memory once, kept on-chip for all T steps. W^T chunk k is
    # [width, 4 * BLOCK_H]: element (r, m) = W_hh[row m of my tile, r].
    rows, row_mask = _gate_rows(pid_h, H, G, BLOCK_H)
    w_t = _load_chunks(w_hh_ptr + direction * (G * H * R), rows * R, row_mask, R, 1, CHUNKS, True, STATE_DTYPE,
                       MMA_DTYPE)
    if STATE_DTYPE == tl.float64:  # Triton's fp64 MMA takes K <= 32: one gate's columns at a time
        by_gate = ()
        for k in tl.static_range(len(CHUNKS)):
            by_gate = by_gate + (_split_gate_columns(w_t[k], BLOCK_H),)
        w_t = by_gate
    if HAS_PROJ:  # my columns of W_hr, chunk [BLOCK_H, width]: element (unit, r) = W_hr[r, unit]
        w_hr_t = _load_chunks(w_hr_ptr + direction * (R * H), offs_u, mask_u, R, H, CHUNKS, False, STATE_DTYPE,
                              MMA_DTYPE)
    counter = counter_ptr + pid_d * tl.num_programs(0) + pid_b
    alive = pid_b >= 0  # a true scalar, false after a barrier timeout

    # the carried dh (my units; with proj_size all of R, as K-chunks [width, BLOCK_B]) and dc,
    # c0 / h0 of my units, and the inputs of the last step
    if HAS_PROJ:
        dh = _load_chunks(dhn_ptr + direction * B * R, offs_b * R, mask_b, R, 1, CHUNKS, True, STATE_DTYPE,
                          STATE_DTYPE)
    else:
        dh = tl.load(dhn_ptr + direction * B * R + offs_b[None, :] * R + units, mask=mask_bh, other=0.0).to(STATE_DTYPE)
    if CELL == LSTM:
        dc = tl.load(dcn_ptr + direction * B * H + offs_b[None, :] * H + units, mask=mask_bh, other=0.0).to(STATE_DTYPE)
        first = tl.load(c0_ptr + direction * B * H + offs_b[None, :] * H + units, mask=mask_bh,
                        other=0.0).to(STATE_DTYPE)
    else:
        first = tl.load(h0_ptr + direction * B * R + offs_b[None, :] * R + units, mask=mask_bh,
                        other=0.0).to(STATE_DTYPE)
    dy, acts, prev = _load_step(dy_ptr, saved_ptr, y_ptr, first, T - 1, length, direction, offs_b, mask_b, units,
                                unit_mask, H, R, stride_dyt, stride_dyb, stride_st, stride_sb, stride_yt, stride_yb,
                                CELL, HAS_PROJ, CHUNKS, STATE_DTYPE)

    gate_ty = dgates_ptr.dtype.element_ty
    for it in range(T):
        step = T - 1 - it
        parity = it % 2
        keep = (step < length)[None, :]
        out_t = tl.where(step < length, _time_index(step, length, direction), step)[None, :]
        if HAS_PROJ:  # dh of all of h_t, then its share of my cell outputs: W_hr[:, mine]^T dh_t
            dh_t = ()
            start = 0
            for k in tl.static_range(len(CHUNKS)):
                offs_r = start + tl.arange(0, CHUNKS[k])
                v = dh[k] + dy[k]
                dh_t = dh_t + (v.to(W_DTYPE).to(MMA_DTYPE),)
                tl.store(dh_all_ptr + out_t * stride_dht + b64 * stride_dhb + direction * R + offs_r[:, None],
                         tl.where(keep, v, 0.0).to(dh_all_ptr.dtype.element_ty),
                         mask=(offs_r < R)[:, None] & mask_b[None, :] & (pid_h == 0))
                start += CHUNKS[k]
            d_cell = _chunked_dot(w_hr_t, dh_t, STATE_DTYPE, INPUT_PRECISION)
        else:
            d_cell = dh + dy

        dgates = dgates_ptr + out_t * stride_gt + b64 * stride_gb + direction * (G * H) + units
        if CELL == LSTM:
            d_i, d_f, d_g, d_o, dc_prev = lstm_cell_backward(d_cell, dc, acts[0], acts[1], acts[2], acts[3], acts[4],
                                                             prev, MATH, EMULATE)
            d_i = tl.where(keep, d_i, 0.0)
            d_f = tl.where(keep, d_f, 0.0)
            d_g = tl.where(keep, d_g, 0.0)
            d_o = tl.where(keep, d_o, 0.0)
            dc = tl.where(keep, dc_prev, dc)
            tl.store(dgates, d_i.to(gate_ty), mask=mask_bh)
            tl.store(dgates + H, d_f.to(gate_ty), mask=mask_bh)
            tl.store(dgates + 2 * H, d_g.to(gate_ty), mask=mask_bh)
            tl.store(dgates + 3 * H, d_o.to(gate_ty), mask=mask_bh)
            d_gates = (d_i, d_f, d_g, d_o)
        else:
            r = acts[0]
            d_r, d_z, d_n, dh_direct = gru_cell_backward(d_cell, r, acts[1], acts[2], acts[3], prev)
            d_r = tl.where(keep, d_r, 0.0)
            d_z = tl.where(keep, d_z, 0.0)
            d_n = tl.where(keep, d_n, 0.0)
            tl.store(dgates, d_r.to(gate_ty), mask=mask_bh)
            tl.store(dgates + H, d_z.to(gate_ty), mask=mask_bh)
            tl.store(dgates + 2 * H, d_n.to(gate_ty), mask=mask_bh)
            # the n gate reaches W_hn h through r; the fourth gate rows of the tile are zero
            d_gates = (d_r, d_z, d_n * r, tl.zeros_like(r))

        # my share of dh_{t-1}^T = W^T @ dgates^T, stored straight from the accumulator, chunk by chunk
        if STATE_DTYPE == tl.float64:
            d_op = d_gates
        else:
            d_op = _join_gates(d_gates[0], d_gates[1], d_gates[2], d_gates[3], BLOCK_H, BLOCK_B).to(W_DTYPE).to(
                MMA_DTYPE)
        partial = ()
        start = 0
        for k in tl.static_range(len(CHUNKS)):
            if STATE_DTYPE == tl.float64:
                p = tl.dot(w_t[k][0], d_op[0], out_dtype=STATE_DTYPE)
                for g in tl.static_range(1, G):
                    p = tl.dot(w_t[k][g], d_op[g], p, out_dtype=STATE_DTYPE)
            else:
                p = tl.dot(w_t[k], d_op, input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
            partial = partial + (p,)
            if SPLIT > 1:
                offs_r = start + tl.arange(0, CHUNKS[k])
                _store_in_place(_xbuf_tile(xbuf_ptr, parity, pid_d, pid_b, pid_h, XBUF_ROWS, SPLIT, BLOCK_B)
                                + offs_r[:, None] + cols[None, :] * XBUF_ROWS, p, INTERPRET)
            start += CHUNKS[k]

        if SPLIT > 1:
            _arrive(counter)
        # the next reverse step's inputs, loaded before the wait: off the step's critical path
        dy, acts, prev = _load_step(dy_ptr, saved_ptr, y_ptr, first, T - 1 - _next(it), length,
                                    direction, offs_b, mask_b, units, unit_mask, H, R, stride_dyt, stride_dyb,
                                    stride_st, stride_sb, stride_yt, stride_yb, CELL, HAS_PROJ, CHUNKS, STATE_DTYPE)
        if SPLIT > 1:
            alive = _wait(counter, SPLIT * (it + 1), alive, MAX_SPIN, INTERPRET)

        slot_stride = XBUF_ROWS * BLOCK_B
        slots = _xbuf_tile(xbuf_ptr, parity, pid_d, pid_b, 0, XBUF_ROWS, SPLIT, BLOCK_B)
        if HAS_PROJ:  # all of dh_{t-1}: the sum of every program's partial, in slot order
            summed = ()
            start = 0
            for k in tl.static_range(len(CHUNKS)):
                if SPLIT > 1:
                    offs_r = start + tl.arange(0, CHUNKS[k])
                    chunk = slots + offs_r[:, None] + cols[None, :] * XBUF_ROWS
                    total = tl.load(chunk, mask=(offs_r < R)[:, None], other=0.0, cache_modifier=".cg")
                    for slot in range(1, SPLIT):
                        total += tl.load(chunk + slot * slot_stride, mask=(offs_r < R)[:, None], other=0.0,
                                         cache_modifier=".cg")
                else:
                    total = partial[k]
                summed = summed + (tl.where(keep, total, dh[k]),)
                start += CHUNKS[k]
            dh = summed
        else:
            if SPLIT > 1:  # only my units' rows
                mine = slots + units + cols[None, :] * XBUF_ROWS
                total = tl.load(mine, mask=unit_mask, other=0.0, cache_modifier=".cg")
                for slot in range(1, SPLIT):
                    total += tl.load(mine + slot * slot_stride, mask=unit_mask, other=0.0, cache_modifier=".cg")
            else:  # one program: its one chunk of BLOCK_H rows is every unit's
                total = partial[0]
            if CELL != LSTM:
                total += dh_direct
            dh = tl.where(keep, total, dh)

    if HAS_PROJ:
        start = 0
        for k in tl.static_range(len(CHUNKS)):
            offs_r = start + tl.arange(0, CHUNKS[k])
            tl.store(dh0_ptr + direction * B * R + offs_b[None, :] * R + offs_r[:, None],
                     dh[k].to(dh0_ptr.dtype.element_ty), mask=(offs_r < R)[:, None] & mask_b[None, :] & (pid_h == 0))
            start += CHUNKS[k]
    else:
        tl.store(dh0_ptr + direction * B * R + offs_b[None, :] * R + units, dh.to(dh0_ptr.dtype.element_ty),
                 mask=mask_bh)
    if CELL == LSTM:
        tl.store(dc0_ptr + direction * B * H + offs_b[None, :] * H + units, dc.to(dc0_ptr.dtype.element_ty),
                 mask=mask_bh)
    tl.atomic_add(error_ptr, 1, mask=alive == 0, sem="relaxed")  # counts timed-out programs: only grows


def backward_arguments(cell, dy, dh_n, dc_n, saved, y, h0, c0, w_hh, w_hr, lengths, dgates, dh_all, dh0, dc0, *,
                       config, interpret, allow_tf32, wave, max_spin):
    """(grid, args, constexprs) of one launch of the backward kernel on the wave (0, tiles, dir0, dirs),
    its split-tier scratch allocated: what rnn_backward launches and the ahead-of-time compile
    (autotune/aot.py) compiles. Arguments as rnn_backward's."""
    _, tiles, dir0, dirs = wave
    T, B = dy.shape[0], dy.shape[1]
    R = w_hh.shape[2]
    H = saved.shape[-1]
    split = triton.cdiv(H, config.block_h)
    has_proj = w_hr is not None
    constexprs = kernel_constexprs(cell, w_hh.dtype, has_proj, split, config, R, interpret=interpret,
                                   allow_tf32=allow_tf32)
    # a slot holds a program's whole partial, every row its K-chunks cover (rows past R are zero)
    rows = sum(constexprs["CHUNKS"])
    xbuf, counters, error = split_scratch(split, dirs, tiles, (split, rows, config.block_b), state_dtype(w_hh.dtype),
                                          dy.device, interpret)
    # unused pointers point at a tensor the kernel has anyway
    dh_all = dgates if dh_all is None else dh_all
    args = (dy, dh_n, dh_n if dc_n is None else dc_n, saved, y, h0, h0 if c0 is None else c0, w_hh,
            w_hh if w_hr is None else w_hr, lengths, dgates, dh_all, dh0, dh0 if dc0 is None else dc0, xbuf, counters,
            error, T, B, H, R, rows, max_spin,
            dy.stride(0), dy.stride(1), saved.stride(0), saved.stride(1), y.stride(0), y.stride(1),
            dgates.stride(0), dgates.stride(1), dh_all.stride(0), dh_all.stride(1))
    return (tiles, split, dirs), args, dict(constexprs, DIR0=dir0)


def rnn_backward(cell, dy, dh_n, dc_n, saved, y, h0, c0, w_hh, w_hr, lengths, dgates, dh_all, dh0, dc0, *,
                 config, interpret, allow_tf32, waves=None, max_spin=None):
    """Launch the backward of one layer (all directions), given the forward's inputs and outputs.
    Shapes as rnn_forward's: dy and y (T, B, D*R); dh_n, h0, dh0 (D, B, R); dc_n, c0, dc0 (D, B, H);
    saved (T, B, D, SAVED[cell], H); dgates (T, B, D*G*H), written in full (zeros past each row's
    length); dh_all (T, B, D*R) with proj_size, written in full, else unused. (t, b) strides are
    free, rows contiguous. What a layer does not use (dc_n, c0, dc0 for GRU; w_hr and dh_all
    without proj) may be None. waves: as rnn_forward's."""
    if cell == "gru":  # no cell state: whatever was passed is not read or written
        dc_n = c0 = dc0 = None
    waves = waves or one_wave(dy.shape[1], config.block_b, w_hh.shape[0])
    if max_spin is None:
        max_spin = MAX_SPIN["interpret" if interpret else "compiled"]
    if not whole_grid(waves):
        def run(wave, lengths, rows, states, outputs):
            (dy, saved, y, dgates, dh_all), (dh_n, dc_n, h0, c0), (dh0, dc0) = rows, states, outputs
            rnn_backward(cell, dy, dh_n, dc_n, saved, y, h0, c0, w_hh, w_hr, lengths, dgates, dh_all, dh0, dc0,
                         config=config, interpret=interpret, allow_tf32=allow_tf32, waves=(wave,), max_spin=max_spin)
        return run_in_waves(run, waves, config.block_b, lengths, rows=(dy, saved, y, dgates, dh_all),
                            states=(dh_n, dc_n, h0, c0), outputs=(dh0, dc0))
    grid, args, constexprs = backward_arguments(cell, dy, dh_n, dc_n, saved, y, h0, c0, w_hh, w_hr, lengths, dgates,
                                                dh_all, dh0, dc0, config=config, interpret=interpret,
                                                allow_tf32=allow_tf32, wave=waves[0], max_spin=max_spin)
    launch(_rnn_backward_kernel, grid, args, constexprs, config=config, interpret=interpret, device=dy.device,
           what="backward", max_spin=max_spin)
