"""torch.compile of models that hold persistrnn layers, on CPU through the interpreter:
fullgraph=True traces the layer down to its custom ops (layers/autograd.py) with no graph break,
gives eager's outputs and gradients, and does not recompile for the same shapes; the two custom
ops pass torch.library.opcheck (schema, fake implementations, autograd registration)."""
import inspect

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.variables.builder import VariableBuilder
from torch.nn.utils.rnn import pack_padded_sequence

import persistrnn
import persistrnn.layers.autograd as autograd_mod
import persistrnn.layers.functional as functional
import persistrnn.layers.layer as layer_mod


class Model(torch.nn.Module):
    def __init__(self, cell, dtype=torch.float64, **kwargs):
        super().__init__()
        self.rnn = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(3, 16, dtype=dtype, **kwargs)
        width = (self.rnn.proj_size or 16) * (2 if self.rnn.bidirectional else 1)
        self.head = torch.nn.Linear(width, 1, dtype=dtype)

    def forward(self, x, hx=None):
        y, hidden = self.rnn(2 * x, hx)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.head(torch.tanh(y)).square().mean() + h_n.square().mean()


def _inputs(model, T, B=2):
    rnn = model.rnn
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    x = torch.randn(*((B, T) if rnn.batch_first else (T, B)), 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, B, rnn.proj_size or 16, dtype=torch.float64, requires_grad=True)
    if isinstance(rnn, torch.nn.LSTM):
        return x, (h0, torch.randn(layers, B, 16, dtype=torch.float64, requires_grad=True))
    return x, h0


def _loss_and_grads(model, fn, x, hx):
    loss = fn(x, hx)
    states = list(hx) if isinstance(hx, tuple) else [hx]
    return loss, torch.autograd.grad(loss, [x, *states, *model.parameters()])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cell,kwargs", [
    ("lstm", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("gru", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("lstm", dict(proj_size=8)),
    ("gru", dict()),
])
def test_fullgraph_gives_eagers_bits_without_recompiles(interpret, cell, kwargs):
    """aot_eager runs the traced graph as captured (forward and backward through AOTAutograd), so
    outputs and gradients equal eager's bit for bit."""
    model = Model(cell, **kwargs)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for T, graphs in ((5, 1), (5, 1), (7, 2), (9, 2)):  # a new length recompiles once, as a dynamic size
        x, hx = _inputs(model, T)
        model.rnn.last_dispatch = None
        loss, grads = _loss_and_grads(model, compiled, x, hx)
        assert model.rnn.last_dispatch.path == "interpret"
        want, want_grads = _loss_and_grads(model, model, x, hx)
        assert torch.equal(loss, want)
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))
        assert counter.frame_count == graphs


def test_fullgraph_with_inductor_matches_eager(interpret):
    """The default backend: Inductor compiles the ops around the layer (its fusions round
    differently), the layer's custom ops run the kernels. The input reaches the layer as a
    transposed view: the backward op's fake gradients must have the real ones' strides."""
    model = Model("lstm")

    def loss(x):  # x batch-first, the layer time-major
        y, (h_n, _) = model.rnn(x.transpose(0, 1))
        return model.head(torch.tanh(y)).square().mean() + h_n.square().mean()

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    # Inductor's caches do not key on a custom op's fake implementation: compile afresh
    with torch._inductor.config.patch(force_disable_caches=True):
        for _ in range(2):
            x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
            got = compiled(x)
            grads = torch.autograd.grad(got, [x, *model.parameters()])
            want = loss(x)
            want_grads = torch.autograd.grad(want, [x, *model.parameters()])
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
            for a, b in zip(grads, want_grads):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert counter.frame_count == 1 and model.rnn.last_dispatch.path == "interpret"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fullgraph_inference_and_autocast(interpret, cell):
    model = Model(cell, dtype=torch.float32).rnn
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        assert torch.equal(compiled(x)[0], model(x)[0])
        assert torch.equal(compiled(x[:, 0])[0], model(x[:, 0])[0])  # unbatched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x)[0], model(x)[0]
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert model.last_dispatch.path == "interpret" and "autocast" in model.last_dispatch.reason


def test_fullgraph_of_a_torch_func_transform_traces_the_reference(interpret):
    """Inside torch.func.grad the layer runs as torch's ops step by step (layers/reference.py); that
    path traces too."""
    model = Model("gru").rnn
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    loss = lambda m: lambda x: m(x)[0].square().sum()  # noqa: E731
    got = torch.compile(torch.func.grad(loss(model)), fullgraph=True, backend="aot_eager")(x)
    assert model.last_dispatch.path == "reference"
    torch.testing.assert_close(got, torch.func.grad(loss(model))(x), rtol=1e-12, atol=1e-14)


def test_packed_input_compiles_with_a_graph_break(interpret):
    """A packed sequence's batch sizes are data (torch.nn's own RNN cannot be traced with one
    either): without fullgraph, Dynamo runs that part eagerly and the results stand."""
    model = Model("gru", dtype=torch.float32).rnn
    compiled = torch.compile(model, backend="aot_eager")
    packed = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    assert torch.equal(compiled(packed)[0].data, model(packed)[0].data)


def test_breaking_the_mechanism_breaks_fullgraph(interpret, monkeypatch):
    """Without Dynamo's RNN opt-in set while it wraps our layers (layers/rnn.py), or with the layer
    run as plain Python instead of the custom op, fullgraph=True fails."""
    model = Model("gru")
    x, hx = _inputs(model, 4)
    with monkeypatch.context() as patch, pytest.raises(torch._dynamo.exc.Unsupported, match="RNN"):
        patch.setattr(VariableBuilder, "wrap_module", inspect.unwrap(VariableBuilder.wrap_module))
        torch.compile(model, fullgraph=True, backend="eager")(x, hx)
    torch._dynamo.reset()

    model(x, hx)
    layer = layer_mod.layer_from_spec(model.rnn.last_dispatch.spec)

    def without_the_op(spec, x, lengths, h0, c0, weights, save):
        y, hn, cn, _ = layer_mod.layer_forward(layer, x, h0, c0, lengths, weights, save=save)
        return y, hn, cn

    monkeypatch.setattr(functional, "run_layer", without_the_op)
    assert torch.equal(model(x, hx), model(x, hx))  # eagerly, the same layer
    with pytest.raises(torch._dynamo.exc.TorchDynamoException) as error:
        torch.compile(model, fullgraph=True, backend="eager")(x, hx)
    assert "kernels/" in str(error.value)  # Dynamo stopped inside the kernels' launch path


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_custom_ops_pass_opcheck(interpret, cell):
    """torch.library.opcheck: the schema, the fake implementations against the real ones, the
    autograd registration, and AOTAutograd with dynamic shapes."""
    model = Model(cell, bidirectional=True)
    x, hx = _inputs(model, 4)
    model(x, hx)
    spec = model.rnn.last_dispatch.spec
    h0, c0 = hx if cell == "lstm" else (hx, None)
    lengths = torch.full((2,), 4, dtype=torch.int32)
    weights = [w.detach().clone().requires_grad_() for w in model.rnn._flat_weights]
    for save in (True, False):
        torch.library.opcheck(autograd_mod.layer_forward_op, (x, lengths, h0, c0, weights, spec, save))
    with torch.no_grad():
        y, hn, cn, saved = autograd_mod.layer_forward_op(x, lengths, h0, c0, weights, spec, True)
    detached = [t.detach() if t is not None else None for t in (x, h0, c0)]
    detached[0] = detached[0].transpose(0, 1).contiguous().transpose(0, 1)  # a strided x: the fake's strides
    grads_in = (torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn) if cell == "lstm" else None)
    for needs in ([True] * (3 + len(weights)), [False, True, cell == "lstm"] + [False] * len(weights)):
        needs[2] = needs[2] and cell == "lstm"
        torch.library.opcheck(autograd_mod.layer_backward_op,
                              (*grads_in, detached[0], lengths, detached[1], detached[2], y, saved,
                               [w.detach() for w in weights], spec, needs))
