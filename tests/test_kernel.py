"""The forward launcher on its own: poisoned outputs, per-row lengths in both directions, batch tiles."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from persistrnn.kernels.forward import rnn_forward
from persistrnn.layers.dispatch import single_program_config
from persistrnn.layers.functional import _layer_weights

from conftest import DTYPES, TOL, make_pair, rel_err


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

    w_ih, bias_x, w_hh, b_hn, w_hr = _layer_weights(cell, ours._flat_weights, 0, 2, True, proj > 0, H)
    xproj = F.linear(x, w_ih, bias_x)
    # poison every output: a position the kernel fails to write stays NaN
    y = torch.full((T, B, 2 * R), float("nan"), dtype=dtype)
    h_n = torch.full_like(h0, float("nan"))
    c_n = torch.full_like(c0, float("nan"))
    config = single_program_config(cell, dtype, H, proj)
    rnn_forward(cell, xproj, w_hh, b_hn.contiguous(), w_hr, h0, c0 if cell == "lstm" else h0, lengths, y, h_n,
                c_n if cell == "lstm" else h_n, block_b=config.block_b, block_h=config.block_h,
                block_r=config.block_r, num_warps=config.num_warps, num_stages=1, interpret=True, allow_tf32=False)

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
