"""Forward parity of persistrnn.LSTM/GRU (kernels, through the interpreter) with torch.nn in float64."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

import persistrnn
from persistrnn.configs import DEFAULT_SMS, kernel_config

from helpers import CELL_VARIANTS, DTYPES, INPUTS, VARIANTS, assert_close_to_ref, make_input, make_pair


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell,variant", CELL_VARIANTS)
def test_forward_matches_torch_nn(cell, variant, dtype, kind, interpret):
    kwargs = VARIANTS[variant]
    ours, ref = make_pair(cell, 6, 12, dtype, **kwargs)
    ours.eval(), ref.eval()
    x, hx = make_input(kind, ours, T=5, B=3, dtype=dtype)
    assert_close_to_ref(ours, ref, x, hx, dtype)
    assert ours.last_dispatch.path == "interpret", ours.last_dispatch


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_many_batch_tiles_and_odd_sizes(cell, interpret):
    """B > BLOCK_B (three batch tiles), H and I not powers of two, H < 16 (padded block)."""
    for hidden in (7, 29):
        ours, ref = make_pair(cell, 5, hidden, torch.float32, bidirectional=True)
        x, hx = make_input("packed_unsorted_with_state", ours, T=4, B=37, dtype=torch.float32)
        assert_close_to_ref(ours, ref, x, hx)
        assert ours.last_dispatch.path == "interpret"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_between_layers_in_training(cell, interpret):
    """dropout=1 zeroes the second layer's input: deterministic, so it can be compared exactly."""
    ours, ref = make_pair(cell, 4, 8, torch.float64, num_layers=2, dropout=1.0)
    ours.train(), ref.train()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert_close_to_ref(ours, ref, x, dtype=torch.float64)
    assert ours.last_dispatch.path == "interpret"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_is_applied_only_in_training(cell, interpret):
    ours, _ = make_pair(cell, 4, 8, torch.float64, num_layers=2, dropout=0.5)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        ours.eval()
        out_eval = ours(x)[0]
        assert torch.equal(out_eval, ours(x)[0])  # eval: deterministic
        ours.train()
        out_a, out_b = ours(x)[0], ours(x)[0]
    assert not torch.equal(out_a, out_b)  # fresh dropout masks each call
    assert not torch.equal(out_a, out_eval)


def test_non_finite_values_pass_through_as_in_torch(interpret):
    for cell in ("lstm", "gru"):
        ours, ref = make_pair(cell, 3, 8, torch.float64)
        x = torch.randn(4, 2, 3, dtype=torch.float64)
        x[1, 0, 0] = float("nan")
        x[2, 1, 1] = float("inf")
        with torch.no_grad():
            got, want = ours(x)[0], ref(x)[0]
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        finite = torch.isfinite(want)
        assert torch.allclose(got[finite], want[finite], rtol=1e-10, atol=1e-12)


def test_empty_batch_returns_empty_outputs(interpret):
    ours, ref = make_pair("lstm", 3, 8, torch.float32, bidirectional=True)
    x = torch.randn(4, 0, 3)
    with torch.no_grad():
        out, (h, c) = ours(x)
        want, (hw, cw) = ref(x.double())
    assert out.shape == want.shape and h.shape == hw.shape and c.shape == cw.shape


def test_packed_input_with_padded_batch_first_lengths(interpret):
    ours, ref = make_pair("gru", 4, 10, torch.float32, batch_first=True, bidirectional=True)
    x = torch.randn(3, 6, 4)
    packed = pack_padded_sequence(x, torch.tensor([2, 6, 4]), batch_first=True, enforce_sorted=False)
    assert_close_to_ref(ours, ref, packed)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cell=st.sampled_from(["lstm", "gru"]), dtype=st.sampled_from(DTYPES),
       hidden=st.integers(1, 40), input_size=st.integers(1, 12), T=st.integers(1, 6), B=st.integers(1, 20),
       num_layers=st.integers(1, 2), bidirectional=st.booleans(), batch_first=st.booleans(), bias=st.booleans(),
       proj=st.integers(0, 39), kind=st.sampled_from(INPUTS), seed=st.integers(0, 2**31 - 1))
def test_random_configurations(cell, dtype, hidden, input_size, T, B, num_layers, bidirectional, batch_first,
                               bias, proj, kind, seed):
    torch.manual_seed(seed)
    proj_size = proj % hidden if cell == "lstm" else 0
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if proj_size:
        kwargs["proj_size"] = proj_size
    ours, ref = make_pair(cell, input_size, hidden, dtype, **kwargs)
    x, hx = make_input(kind, ours, T=T, B=B, dtype=dtype)
    with persistrnn.backend("interpret"):
        assert_close_to_ref(ours, ref, x, hx, dtype)
    batch = 1 if kind == "unbatched" else B
    config, _ = kernel_config(cell, dtype, hidden, proj_size, batch, 2 if bidirectional else 1, DEFAULT_SMS)
    assert ours.last_dispatch.path == ("interpret" if config else "torch"), ours.last_dispatch
