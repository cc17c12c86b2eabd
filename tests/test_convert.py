"""persistrnn.LSTM/GRU are drop-in: parameters, state_dict both ways, convert(), module methods."""
import copy

import pytest
import torch
from torch import nn

import persistrnn

from helpers import rel_err


@pytest.mark.parametrize("cell,kwargs", [("lstm", dict(proj_size=3)), ("lstm", {}), ("gru", dict(bias=False))])
def test_same_parameters_and_state_dict_both_ways(cell, kwargs):
    kwargs.update(num_layers=2, bidirectional=True)
    ours = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(5, 7, **kwargs)
    ref = (nn.LSTM if cell == "lstm" else nn.GRU)(5, 7, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert isinstance(ours, nn.LSTM if cell == "lstm" else nn.GRU)
    ours.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    ref2 = copy.deepcopy(ref)
    torch.nn.init.zeros_(ours.weight_hh_l0)
    ref2.load_state_dict(ours.state_dict())
    assert torch.equal(ref2.weight_hh_l0, ours.weight_hh_l0)
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


def test_init_matches_torch_for_the_same_seed():
    torch.manual_seed(7)
    ours = persistrnn.LSTM(4, 6, num_layers=2)
    torch.manual_seed(7)
    ref = nn.LSTM(4, 6, num_layers=2)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.encoder = nn.LSTM(6, 8, batch_first=True, bidirectional=True)
        self.blocks = nn.ModuleList([nn.GRU(16, 8, batch_first=True)])
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        y, _ = self.encoder(self.embed(tokens))
        y, _ = self.blocks[0](y)
        return self.head(y)


def test_convert_swaps_every_rnn_and_shares_weights(interpret):
    model = Tagger()
    tokens = torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        want = model(tokens)
    weight = model.encoder.weight_hh_l0
    converted = persistrnn.convert(model)
    assert converted is model
    assert type(model.encoder) is persistrnn.LSTM and type(model.blocks[0]) is persistrnn.GRU
    assert model.encoder.weight_hh_l0 is weight  # shared, not copied
    with torch.no_grad():
        got = model(tokens)
    assert model.encoder.last_dispatch.path == "interpret"
    assert rel_err(got, want) < 1e-5
    with torch.no_grad():  # training the shared parameter changes the converted model
        weight.add_(1.0)
        assert rel_err(model(tokens), got) > 1e-3


def test_convert_of_a_bare_layer_and_unchanged_models():
    lstm = nn.LSTM(3, 4)
    twin = persistrnn.convert(lstm)
    assert type(twin) is persistrnn.LSTM and twin.weight_ih_l0 is lstm.weight_ih_l0
    linear = nn.Linear(3, 4)
    assert persistrnn.convert(linear) is linear
    assert persistrnn.convert(twin) is twin


def test_module_methods_still_work(interpret):
    m = persistrnn.GRU(4, 8, num_layers=2)
    m.flatten_parameters()  # a no-op on CPU, as in torch
    x = torch.randn(3, 2, 4)
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.float32):
        m.to(dtype)
        assert all(p.dtype == dtype for p in m.parameters())
        with torch.no_grad():
            out, h = m(x.to(dtype))
        assert out.dtype == dtype and m.last_dispatch.path == "interpret"
    m.half()
    assert m.weight_hh_l1.dtype == torch.float16
    restored = copy.deepcopy(m)
    assert type(restored) is persistrnn.GRU
    buf = __import__("io").BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = persistrnn.GRU(4, 8, num_layers=2, dtype=torch.float16)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.weight_hh_l1, m.weight_hh_l1)


def test_check_reports_every_output(interpret):
    errors = persistrnn.check(nn.LSTM(4, 8, proj_size=3), torch.randn(3, 2, 4))
    assert set(errors) == {"output", "h_n", "c_n"} and max(errors.values()) < 1e-5
    errors = persistrnn.check(persistrnn.GRU(4, 8), torch.randn(3, 2, 4), torch.randn(1, 2, 8))
    assert set(errors) == {"output", "h_n"} and max(errors.values()) < 1e-5
