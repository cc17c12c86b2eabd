"""No kernel lane reads or writes outside its tensors: every load, store and atomic of an active
lane, traced through the interpreter with every tensor in a guarded allocation (address_checker.py),
over both passes (inference forward, saving forward, backward), both tiers, both cells, proj_size,
packed lengths, the reverse direction, several launches (waves) and the dtypes' element sizes."""
import pytest
import torch
import triton
import triton.language as tl  # noqa: F401
from torch.nn.utils.rnn import pack_sequence

import persistrnn
import persistrnn.kernels.backward as backward
import persistrnn.configs as configs
from address_checker import checking_addresses

from helpers import assert_close_to_ref, assert_gradients_match, gradients, make_pair

# (cell, hidden, block_h or None for one program, layer options, dtype)
CASES = [
    ("lstm", 12, None, dict(bidirectional=True), torch.float64),
    ("lstm", 12, None, dict(proj_size=5), torch.float64),
    ("gru", 12, None, dict(bidirectional=True), torch.float32),
    ("lstm", 48, 16, dict(bidirectional=True), torch.float64),
    ("lstm", 40, 16, dict(proj_size=24), torch.float64),
    ("gru", 48, 16, dict(bidirectional=True), torch.bfloat16),
]


def _packed(layer, lengths, dtype):
    """Unsorted packed input (per-row lengths, one row at full length) and a random initial state."""
    D = 2 if layer.bidirectional else 1
    x = pack_sequence([torch.randn(n, layer.input_size, dtype=dtype) for n in lengths], enforce_sorted=False)
    h0 = torch.randn(D, len(lengths), layer.proj_size or layer.hidden_size, dtype=dtype)
    if isinstance(layer, torch.nn.LSTM):
        return x, (h0, torch.randn(D, len(lengths), layer.hidden_size, dtype=dtype))
    return x, h0


def _pin(block_h):
    return persistrnn.pin_config(block_h=block_h) if block_h else persistrnn.pin_config()


@pytest.mark.parametrize("cell,hidden,block_h,options,dtype", CASES,
                         ids=lambda v: str(v).replace(" ", "") if isinstance(v, dict) else str(v))
def test_every_access_is_inside_a_tensor(cell, hidden, block_h, options, dtype, interpret):
    ours, ref = make_pair(cell, 3, hidden, dtype, **options)
    x, hx = _packed(ours, [3, 1, 4, 2], dtype)
    with _pin(block_h), checking_addresses() as report:
        assert_close_to_ref(ours, ref, x, hx, dtype)  # inference forward
        assert_gradients_match(ours, ref, x, hx, dtype)  # saving forward, backward
    assert (ours.last_dispatch.config.block_h < hidden) == (block_h is not None)
    print(report.summary())
    assert report.launches == 3 and report.accesses > 0
    assert not report.outside, report.describe()


def test_several_launches_stay_inside_their_rows(monkeypatch, interpret):
    """On a device of 5 SMs, 2 batch tiles x SPLIT 4 x 2 directions run as 4 launches per pass, each
    on views of its own rows."""
    monkeypatch.setattr(configs, "DEFAULT_SMS", 5)
    ours, ref = make_pair("lstm", 3, 64, torch.float64, bidirectional=True)
    x, hx = _packed(ours, [3] + [1, 2, 3] * 6, torch.float64)
    with persistrnn.pin_config(block_h=16, block_b=16), checking_addresses() as report:
        assert_gradients_match(ours, ref, x, hx, torch.float64)
    print(report.summary())
    assert len(ours.last_dispatch.waves) == 4 and report.launches == 8
    assert not report.outside, report.describe()


@triton.jit
def _step_below_length(step, length):
    """The backward's prefetch as it once was: step -1, after the last step, counted as in the sequence."""
    return step < length


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_checker_catches_a_prefetch_outside_the_sequence(cell, monkeypatch, interpret):
    """With the prefetch's step -1 unmasked, the backward reads one time row before dy and saved
    (forward direction) and one past their end (reverse direction): the checker must see it."""
    monkeypatch.setattr(backward, "_in_sequence", _step_below_length)
    ours, _ = make_pair(cell, 3, 48, torch.float64, bidirectional=True)
    x, hx = _packed(ours, [3, 1, 4, 2], torch.float64)
    with persistrnn.pin_config(block_h=16), checking_addresses() as report:
        gradients(ours, x, hx)
    print(report.describe())
    assert report.outside and {op for op, *_ in report.outside} == {"load"}
