"""Training through the persistent kernels (interpreter): gradients against torch.nn in float64,
gradcheck for both tiers, a short training run, and what the forward saves."""
import pytest
import torch
from torch.func import functional_call

import persistrnn
import persistrnn.kernels.backward as backward
import persistrnn.configs as configs
import persistrnn.kernels.launcher as launcher_mod
from persistrnn.layers.layer import _h_prev

from helpers import (CELL_VARIANTS, DTYPES, INPUTS, TOL, VARIANTS, assert_gradients_match, gradients, make_input,
                     make_pair, rel_err, wait_that_does_not_wait)


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell,variant", CELL_VARIANTS)
def test_gradients_match_torch_nn(cell, variant, dtype, kind, interpret):
    ours, ref = make_pair(cell, 6, 12, dtype, **VARIANTS[variant])
    ours.eval(), ref.eval()
    x, hx = make_input(kind, ours, T=5, B=3, dtype=dtype)
    assert_gradients_match(ours, ref, x, hx, dtype)


@pytest.mark.parametrize("block_h", [16, 32])
@pytest.mark.parametrize("variant", ["plain", "bidirectional", "proj"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_split_tier_gradients_match_torch_nn(cell, variant, block_h, interpret):
    """SPLIT = 4 or 2 programs per batch tile, reduce-scatter of dh at every step."""
    if cell == "gru" and variant == "proj":
        pytest.skip("proj_size is LSTM only")
    ours, ref = make_pair(cell, 5, 64, torch.float64, **VARIANTS[variant])
    x, hx = make_input("packed_unsorted_with_state", ours, T=4, B=19, dtype=torch.float64)
    with persistrnn.pin_config(block_h=block_h):
        assert_gradients_match(ours, ref, x, hx, torch.float64)
        assert ours.last_dispatch.config.block_h == block_h


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_training_in_several_launches_matches_torch_nn(cell, monkeypatch, interpret):
    """On a device of 5 SMs, 2 batch tiles x SPLIT 4 x 2 directions run as 4 launches (one tile,
    one direction each), forward and backward, packed unsorted input with a state."""
    monkeypatch.setattr(configs, "DEFAULT_SMS", 5)
    ours, ref = make_pair(cell, 5, 64, torch.float64, bidirectional=True)
    x, hx = make_input("packed_unsorted_with_state", ours, T=4, B=19, dtype=torch.float64)
    with persistrnn.pin_config(block_h=16, block_b=16):
        assert_gradients_match(ours, ref, x, hx, torch.float64)
    assert len(ours.last_dispatch.waves) == 4 and "in 4 launches" in ours.last_dispatch.reason


def _gradcheck(cell, hidden, block_h, **kwargs):
    ours, _ = make_pair(cell, 3, hidden, torch.float64, **kwargs)
    x, hx = make_input("packed_unsorted_with_state", ours, T=3, B=4, dtype=torch.float64)
    params = dict(ours.named_parameters())
    names = list(params)
    hx = hx if isinstance(hx, tuple) else (hx,)

    def f(data, *inputs):
        states, weights = inputs[:len(hx)], inputs[len(hx):]
        packed = x._replace(data=data)
        out, hidden = functional_call(ours, dict(zip(names, weights)), (packed, states if cell == "lstm" else states[0]))
        return (out.data, *(hidden if isinstance(hidden, tuple) else (hidden,)))

    inputs = [t.detach().clone().requires_grad_() for t in (x.data, *hx, *params.values())]
    with persistrnn.pin_config(block_h=block_h):
        assert torch.autograd.gradcheck(f, inputs, fast_mode=True, atol=1e-8, rtol=1e-6)
    assert ours.last_dispatch.path == "interpret" and ours.last_dispatch.config.block_h == block_h


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_single_program(cell, interpret):
    _gradcheck(cell, 10, 16, bidirectional=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_split_tier(cell, interpret):
    _gradcheck(cell, 40, 16, bidirectional=True)


def test_gradcheck_split_tier_with_proj(interpret):
    _gradcheck("lstm", 40, 16, proj_size=7)


@pytest.fixture
def sequential_backward_programs(monkeypatch):
    """Run the backward grid's programs one after another, as the stock interpreter does (the
    forward's still run at once)."""
    real = launcher_mod.interpreted

    def launcher(kernel, concurrent=False):
        return real(kernel, concurrent=concurrent and kernel is not backward._rnn_backward_kernel)

    monkeypatch.setattr(launcher_mod, "interpreted", launcher)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_broken_backward_barrier_is_caught(cell, monkeypatch, sequential_backward_programs, interpret):
    """The split-tier gradient check fails when the backward's barrier does not wait: program 0
    runs every step before the others have written their shares of dh."""
    monkeypatch.setattr(backward, "_wait", wait_that_does_not_wait)
    ours, ref = make_pair(cell, 4, 32, torch.float64)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    with persistrnn.pin_config(block_h=16):
        _, got, weights = gradients(ours, x, None)
    _, want, _ = gradients(ref, x, None, weights)
    assert not all(rel_err(g, w) <= TOL[torch.float64] for g, w in zip(got, want))  # NaN counts: unwritten slots


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_training_run_matches_torch_nn(cell, dtype, interpret):
    """Eight Adam steps of a 2-layer bidirectional model on a toy task: every loss as torch.nn's."""
    class Model(torch.nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn
            self.head = torch.nn.Linear(2 * rnn.hidden_size, 1, dtype=rnn.weight_hh_l0.dtype)

        def forward(self, x):
            return self.head(self.rnn(x)[0][-1]).squeeze(-1)

    ours_rnn, ref_rnn = make_pair(cell, 3, 12, dtype, num_layers=2, bidirectional=True)
    ours, ref = Model(ours_rnn), Model(ref_rnn)
    ref.head.load_state_dict({k: v.double() for k, v in ours.head.state_dict().items()})
    x = torch.randn(6, 8, 3, dtype=torch.float64)
    target = x.sum(dim=(0, 2))  # the task: regress the sum of the sequence
    losses = {}
    for name, model in (("ours", ours), ("ref", ref)):
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        losses[name] = []
        for _ in range(8):
            opt.zero_grad()
            pred = model(x.to(model.head.weight.dtype))
            loss = torch.nn.functional.mse_loss(pred.double(), target)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert ours_rnn.last_dispatch.path == "interpret"
    assert losses["ours"][-1] < losses["ours"][0]  # it learns
    assert rel_err(torch.tensor(losses["ours"]), torch.tensor(losses["ref"])) <= {torch.float64: 1e-10,
                                                                                  torch.float32: 1e-4}[dtype]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_saves_only_when_gradients_are_needed(cell, launches, interpret):
    ours, _ = make_pair(cell, 4, 8, torch.float32, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        ours(x)
    ours.requires_grad_(False)
    ours(x)  # grad mode on, but nothing requires grad
    assert [call["saved"] for call in launches] == [None] * 4 and "backward" not in ours.last_dispatch.reason
    ours.requires_grad_(True)
    launches.clear()
    ours(x)[0].sum().backward()
    S = {"lstm": 5, "gru": 4}[cell]
    assert [tuple(call["saved"].shape) for call in launches] == [(5, 3, 2, S, 8)] * 2
    assert all(call["saved"].dtype == torch.float32 for call in launches)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_between_layers_in_training_backward(cell, interpret):
    """dropout=1 zeroes the second layer's input (deterministic): the first layer gets no
    gradient through the output, only through h_n/c_n."""
    ours, ref = make_pair(cell, 4, 8, torch.float64, num_layers=2, dropout=1.0)
    ours.train(), ref.train()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert_gradients_match(ours, ref, x, None, torch.float64)


def test_only_the_state_requires_grad(interpret):
    """h0/c0 requiring grad (weights frozen, input plain) still runs the kernels and matches."""
    ours, ref = make_pair("lstm", 4, 8, torch.float64, bidirectional=True)
    ours.requires_grad_(False)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    h0, c0 = (torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    (ours(x, (h0, c0))[0] ** 2).sum().backward()
    assert ours.last_dispatch.path == "interpret"
    h0r, c0r = (t.detach().clone().requires_grad_() for t in (h0, c0))
    (ref(x, (h0r, c0r))[0] ** 2).sum().backward()
    assert rel_err(h0.grad, h0r.grad) < 1e-12 and rel_err(c0.grad, c0r.grad) < 1e-12


def test_h_prev_reverse_direction_starts_at_each_rows_last_step():
    """The GEMM input of dW_hh: y shifted by one in each direction's time order, h0 at the start."""
    from persistrnn.layers.layer import Layer
    T, B, R = 4, 3, 2
    y = torch.arange(T * B * 2 * R, dtype=torch.float64).reshape(T, B, 2 * R)
    h0 = -torch.ones(2, B, R, dtype=torch.float64)
    h0[1] *= 2
    layer = Layer("gru", 2, R, R, True, False, False, None, True, False)
    got = _h_prev(y, h0, torch.tensor([4, 2, 1]), layer)
    assert torch.equal(got[0, :, :R], h0[0]) and torch.equal(got[1:, :, :R], y[:-1, :, :R])
    assert torch.equal(got[3, 0, R:], h0[1, 0]) and torch.equal(got[:3, 0, R:], y[1:, 0, R:])
    assert torch.equal(got[1, 1, R:], h0[1, 1]) and torch.equal(got[0, 1, R:], y[1, 1, R:])
    assert torch.equal(got[0, 2, R:], h0[1, 2])
