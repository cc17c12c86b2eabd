"""The launchers on their own: poisoned outputs, per-row lengths in both directions, batch tiles."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from persistrnn.kernels.forward import rnn_forward
from persistrnn.configs import single_program_config
from persistrnn.kernels.backward import rnn_backward
from persistrnn.kernels.forward import SAVED
from persistrnn.layers.layer import layer_weights

from helpers import DTYPES, TOL, make_pair, rel_err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 6), ("gru", 0)])
def test_launcher_writes_every_output_with_per_row_lengths(cell, proj, dtype):
    T, B, I, H = 6, 21, 5, 11  # two batch tiles of BLOCK_B = 16
    kwargs = dict(bidirectional=True, proj_size=proj) if proj else dict(bidirectional=True)
    ours, ref = make_pair(cell, I, H, dtype, **kwargs)
    R = proj or H
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int32)
    lengths[3] = T
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(2, B, R, dtype=dtype)
    c0 = torch.randn(2, B, H, dtype=dtype)

    w_ih, bias_x, w_hh, b_hn, w_hr = layer_weights(cell, ours._flat_weights, 2, True, proj > 0, H)
    xproj = F.linear(x, w_ih, bias_x)
    # poison every output: a position the kernel fails to write stays NaN
    y = torch.full((T, B, 2 * R), float("nan"), dtype=dtype)
    h_n = torch.full_like(h0, float("nan"))
    c_n = torch.full_like(c0, float("nan"))
    config = single_program_config(cell, dtype, H)
    rnn_forward(cell, xproj, w_hh, b_hn, w_hr, h0, c0 if cell == "lstm" else h0, lengths, y, h_n,
                c_n if cell == "lstm" else h_n, config=config, interpret=True, allow_tf32=False)

    packed = pack_padded_sequence(x.double(), lengths, enforce_sorted=False)
    hx = (h0.double(), c0.double()) if cell == "lstm" else h0.double()
    with torch.no_grad():
        out, hidden = ref(packed, hx)
    want_y, _ = pad_packed_sequence(out, total_length=T)  # zero past each row's length
    assert torch.isfinite(y).all() and torch.isfinite(h_n).all()
    assert rel_err(y, want_y) <= TOL[dtype]
    past = torch.arange(T)[:, None] >= lengths[None, :]
    assert (y[past] == 0).all(), "outputs past a row's length must be zero"
    want_h = hidden[0] if cell == "lstm" else hidden
    assert rel_err(h_n, want_h) <= TOL[dtype]
    if cell == "lstm":
        assert torch.isfinite(c_n).all() and rel_err(c_n, hidden[1]) <= TOL[dtype]



def _reference(ref, cell, x, h0, c0, lengths, dy, dh_n, dc_n):
    """torch.nn in float64 on the padded input with per-row lengths: the output (zero past each
    row's length), (h_n[, c_n]), and the gradients (dx, dh0[, dc0]) of the loss whose output
    gradients are dy, dh_n[, dc_n]."""
    x64, h64, c64 = (t.double().requires_grad_() for t in (x, h0, c0))
    out, hidden = ref(pack_padded_sequence(x64, lengths, enforce_sorted=False), (h64, c64) if cell == "lstm" else h64)
    out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    hidden = hidden if cell == "lstm" else (hidden,)
    loss = (out * dy.double()).sum() + (hidden[0] * dh_n.double()).sum()
    if cell == "lstm":
        loss = loss + (hidden[1] * dc_n.double()).sum()
    return out, hidden, torch.autograd.grad(loss, [x64, h64] + ([c64] if cell == "lstm" else []))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 6), ("gru", 0)])
def test_backward_launcher_writes_every_output_with_per_row_lengths(cell, proj, dtype):
    """Forward with SAVE then backward, every output poisoned first: saved rows, dgates (zero past
    each row's length), dh_t with proj_size, dh0 and dc0 all written; dh0/dc0 and the input
    gradient (dgates @ W_ih) equal torch.nn's in float64."""
    T, B, I, H = 6, 21, 5, 11
    kwargs = dict(bidirectional=True, proj_size=proj) if proj else dict(bidirectional=True)
    ours, ref = make_pair(cell, I, H, dtype, **kwargs)
    R, G = proj or H, 4 if cell == "lstm" else 3
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int32)
    lengths[3] = T
    x, h0, c0 = torch.randn(T, B, I, dtype=dtype), torch.randn(2, B, R, dtype=dtype), torch.randn(2, B, H, dtype=dtype)
    dy, dh_n, dc_n = torch.randn(T, B, 2 * R, dtype=dtype), torch.randn_like(h0), torch.randn_like(c0)
    w_ih, bias_x, w_hh, b_hn, w_hr = layer_weights(cell, ours._flat_weights, 2, True, proj > 0, H)
    config = single_program_config(cell, dtype, H, pass_="train")
    blocks = dict(config=config, interpret=True, allow_tf32=False)
    nan = float("nan")
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    y, h_n, c_n = torch.empty(T, B, 2 * R, dtype=dtype), torch.empty_like(h0), torch.empty_like(c0)
    saved = torch.full((T, B, 2, SAVED[cell], H), nan, dtype=state_dtype)
    rnn_forward(cell, F.linear(x, w_ih, bias_x), w_hh, b_hn, w_hr, h0, c0 if cell == "lstm" else h0, lengths, y,
                h_n, c_n if cell == "lstm" else h_n, saved=saved, **blocks)
    assert torch.isfinite(saved).all()
    dgates = torch.full((T, B, 2 * G * H), nan, dtype=dtype)
    dh_all = torch.full_like(y, nan) if proj else None
    dh0, dc0 = torch.full_like(h0, nan), torch.full_like(c0, nan)
    rnn_backward(cell, dy, dh_n, dc_n if cell == "lstm" else dh_n, saved, y, h0, c0 if cell == "lstm" else h0,
                 w_hh, w_hr, lengths, dgates, dh_all, dh0, dc0 if cell == "lstm" else dh0, **blocks)
    past = torch.arange(T)[:, None] >= lengths[None, :]
    assert torch.isfinite(dgates).all() and (dgates[past] == 0).all()
    if proj:
        assert torch.isfinite(dh_all).all() and (dh_all[past] == 0).all()

    _, _, (want_dx, want_dh0, *want_dc0) = _reference(ref, cell, x, h0, c0, lengths, dy, dh_n, dc_n)
    assert rel_err(dgates.double() @ w_ih.double(), want_dx) <= TOL[dtype]
    assert rel_err(dh0, want_dh0) <= TOL[dtype]
    if cell == "lstm":
        assert torch.isfinite(dc0).all() and rel_err(dc0, want_dc0[0]) <= TOL[dtype]


def _forward_backward_in_waves(cell, dtype, waves):
    """A bidirectional layer (H = 32 in SPLIT = 2 programs of 16 units, 3 batch tiles of 16 rows)
    forward with SAVE then backward, launched as `waves`, every output poisoned first. Returns the
    outputs (y, h_n, dgates @ W_ih, dh0[, c_n, dc0]) and torch.nn's float64 (y, h_n, dx, dh0[, c_n,
    dc0]), the LSTM's c at the end."""
    from persistrnn.kernels.config import KernelConfig
    T, B, I, H = 4, 37, 5, 32
    ours, ref = make_pair(cell, I, H, dtype, bidirectional=True)
    G = 4 if cell == "lstm" else 3
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int32)
    lengths[20] = T
    x, h0, c0 = torch.randn(T, B, I, dtype=dtype), torch.randn(2, B, H, dtype=dtype), torch.randn(2, B, H, dtype=dtype)
    dy, dh_n, dc_n = torch.randn(T, B, 2 * H, dtype=dtype), torch.randn_like(h0), torch.randn_like(c0)
    w_ih, bias_x, w_hh, b_hn, _ = layer_weights(cell, ours._flat_weights, 2, True, False, H)
    nan = float("nan")
    run = dict(config=KernelConfig(16, 16), interpret=True, allow_tf32=False, waves=waves)
    y, h_n, c_n = torch.full((T, B, 2 * H), nan, dtype=dtype), torch.full_like(h0, nan), torch.full_like(c0, nan)
    saved = torch.full((T, B, 2, SAVED[cell], H), nan, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    rnn_forward(cell, F.linear(x, w_ih, bias_x), w_hh, b_hn, None, h0, c0 if cell == "lstm" else h0, lengths, y,
                h_n, c_n if cell == "lstm" else h_n, saved=saved, **run)
    dgates = torch.full((T, B, 2 * G * H), nan, dtype=dtype)
    dh0, dc0 = torch.full_like(h0, nan), torch.full_like(c0, nan)
    rnn_backward(cell, dy, dh_n, dc_n if cell == "lstm" else dh_n, saved, y, h0, c0 if cell == "lstm" else h0,
                 w_hh, None, lengths, dgates, None, dh0, dc0 if cell == "lstm" else dh0, **run)

    out, hidden, grads = _reference(ref, cell, x, h0, c0, lengths, dy, dh_n, dc_n)
    got, want = [y, h_n, dgates.double() @ w_ih.double(), dh0], [out, hidden[0], grads[0], grads[1]]
    if cell == "lstm":
        got, want = got + [c_n, dc0], want + [hidden[1], grads[2]]
    return got, want


# a layer's grid of 3 tiles x SPLIT 2 x 2 directions (12 programs) on 4 SMs: 3 launches of one tile
# and both directions; on 3 SMs: 6 launches of one tile and one direction
@pytest.mark.parametrize("sms", [4, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_launches_in_waves_write_every_output(cell, dtype, sms):
    from persistrnn.kernels.config import KernelConfig
    from persistrnn.configs import launch_waves
    waves = launch_waves(KernelConfig(16, 16), 37, 32, 2, sms)
    assert len(waves) == (3 if sms == 4 else 6)
    got, want = _forward_backward_in_waves(cell, dtype, waves)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert rel_err(g, w) <= TOL[dtype]


@pytest.mark.parametrize("broken", ["tile0", "dir0"])
def test_waves_that_ignore_their_offsets_fail(broken):
    """The waves' offsets are what places each launch: launching every wave at tile 0 (or
    direction 0) leaves outputs unwritten or wrong, and the check above catches it."""
    from persistrnn.kernels.config import KernelConfig
    from persistrnn.configs import launch_waves
    waves = launch_waves(KernelConfig(16, 16), 37, 32, 2, 3)
    index = 0 if broken == "tile0" else 2
    bad = tuple(w[:index] + (0,) + w[index + 1:] for w in waves)
    got, want = _forward_backward_in_waves("lstm", torch.float64, bad)
    assert not all(torch.isfinite(g).all() and rel_err(g, w) <= TOL[torch.float64] for g, w in zip(got, want))
