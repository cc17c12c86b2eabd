"""Fitting the PyTorch stack, on CPU through the interpreter: no host synchronization on
the launch path, bitwise determinism, higher-order autograd (second derivatives against torch.nn,
gradcheck and gradgradcheck with batched gradients), and torch.func (vmap, grad, jacrev,
functional_call). torch.compile: tests/test_compile.py."""
import contextlib

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, jacrev, vmap

import persistrnn
import persistrnn.kernels.exchange as exchange
import persistrnn.kernels.launcher as launcher
import persistrnn.layers.autograd as autograd_mod

from helpers import make_pair

# calls that wait for the device when their tensor is on a GPU
SYNCING = {"item": torch.Tensor, "cpu": torch.Tensor, "tolist": torch.Tensor, "__bool__": torch.Tensor,
           "__int__": torch.Tensor, "__float__": torch.Tensor, "synchronize": torch.cuda}


@contextlib.contextmanager
def no_syncing_calls():
    """Make the calls that synchronize on a GPU raise, except inside a kernel (the interpreter runs
    the kernels on the host, where it reads tensors: that is the GPU's own work)."""
    inside = []
    real_interpreted = launcher.interpreted

    def forbid(name, real):
        def call(*args, **kwargs):
            if not inside:
                raise AssertionError(f"a synchronizing call on the launch path: {name}")
            return real(*args, **kwargs)
        return call

    class Kernel:
        def __init__(self, launcher):
            self.launcher = launcher

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                inside.append(True)
                try:
                    return self.launcher[grid](*args, **kwargs)
                finally:
                    inside.pop()
            return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launcher, "interpreted", lambda kernel, **kw: Kernel(real_interpreted(kernel, **kw)))
        for name, owner in SYNCING.items():
            mp.setattr(owner, name, forbid(name, getattr(owner, name)))
        yield


def _train_step(ours, x, hx, grad_y):
    out, _ = ours(x, hx)
    out.backward(grad_y)
    return out


@pytest.mark.parametrize("cell,kwargs,block_h", [
    ("lstm", dict(bidirectional=True), 16),  # split tier: 2 programs per tile meet at a barrier
    ("gru", dict(num_layers=2, batch_first=True), 16),
    ("lstm", dict(proj_size=8), None),  # one program per tile
])
def test_no_host_synchronization_on_the_launch_path(monkeypatch, interpret, cell, kwargs, block_h):
    ours, _ = make_pair(cell, 4, 32, torch.float32, **kwargs)
    D = 2 if ours.bidirectional else 1
    x = torch.randn(3, 5, 4).requires_grad_()
    h0 = torch.randn(ours.num_layers * D, 3 if ours.batch_first else 5, ours.proj_size or 32)
    hx = (h0, torch.randn(*h0.shape[:2], 32)) if cell == "lstm" else h0
    grad_y = torch.randn(*x.shape[:2], D * (ours.proj_size or 32))
    pin = persistrnn.pin_config(block_h=block_h) if block_h else contextlib.nullcontext()
    with pin:
        _train_step(ours, x, hx, grad_y)  # warm: compiles, tables, autocast probes
        x.grad = None
        with no_syncing_calls():
            out = _train_step(ours, x, hx, grad_y)
    assert ours.last_dispatch.path == "interpret"
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_the_sync_check_catches_a_sync(monkeypatch, interpret):
    """The check above can fail: a launch that reads the timeout count with .item() (as the split tier did)
    trips it."""
    ours, _ = make_pair("lstm", 4, 32, torch.float32)
    x = torch.randn(3, 5, 4)
    real_check = launcher.check_barriers
    monkeypatch.setattr(launcher, "check_barriers", lambda device, wait=False: (
        exchange._watch(device).count.item(), real_check(device, wait)))
    with persistrnn.pin_config(block_h=16), torch.no_grad():
        ours(x)
        with no_syncing_calls(), pytest.raises(AssertionError, match="synchronizing call.*item"):
            ours(x)


@pytest.mark.parametrize("cell,kwargs,block_h,dtype", [
    ("lstm", dict(bidirectional=True, proj_size=12), 16, torch.float32),
    ("gru", dict(num_layers=2), 16, torch.float32),
    ("lstm", {}, None, torch.bfloat16),
])
def test_two_runs_give_the_same_bits(interpret, cell, kwargs, block_h, dtype):
    ours, _ = make_pair(cell, 6, 32, dtype, **kwargs)
    x = torch.randn(4, 5, 6, dtype=dtype)
    D = 2 if ours.bidirectional else 1
    grad_y = torch.randn(4, 5, D * (ours.proj_size or 32), dtype=dtype)
    runs = []
    pin = persistrnn.pin_config(block_h=block_h) if block_h else contextlib.nullcontext()
    with pin:
        for _ in range(2):
            ours.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            out, hidden = ours(xi)
            out.backward(grad_y)
            runs.append([out, *(hidden if cell == "lstm" else (hidden,)), xi.grad,
                         *(p.grad for p in ours.parameters())])
    assert ours.last_dispatch.path == "interpret"
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _second_derivatives(layer, x):
    """d/d(x, params) of sum(g^3), g = d sum(y^2) / dx taken with create_graph=True."""
    y = layer(x)[0]
    g, = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    return g, torch.autograd.grad((g ** 3).sum(), [x, *layer.parameters()])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_second_derivatives_match_torch_nn(interpret, cell):
    ours, ref = make_pair(cell, 3, 4, torch.float64, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    g, second = _second_derivatives(ours, x)
    assert ours.last_dispatch.path == "interpret" and g.requires_grad
    g_ref, second_ref = _second_derivatives(ref, x)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(second, second_ref):
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_without_the_recompute_the_second_derivative_is_wrong(monkeypatch, interpret):
    """Breaking the mechanism: a backward that ignores create_graph runs the backward kernel's op,
    which has no derivative: the second derivative raises (an autograd.Function ignoring it gave
    None, the silent wrong answer this guards), or is wrong."""
    monkeypatch.setattr(autograd_mod, "_needs_reference", lambda *grads: False)
    ours, ref = make_pair("lstm", 3, 4, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)

    def second(layer):
        g, = torch.autograd.grad((layer(x)[0] ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad((g ** 3).sum(), x, allow_unused=True)[0]

    want = second(ref)
    assert want is not None and want.abs().sum() > 0
    try:
        got = second(ours)
    except RuntimeError as error:
        assert "no autograd formula" in str(error)
    else:
        assert got is None or not torch.allclose(got, want)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_and_gradgradcheck_with_batched_grads(interpret, cell):
    ours, _ = make_pair(cell, 3, 4, torch.float64, bidirectional=True)
    names = [name for name, _ in ours.named_parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]

    def layer(x, h0, c0, *params):
        hx = (h0, c0) if cell == "lstm" else h0
        out, hidden = functional_call(ours, dict(zip(names, params)), (x, hx))
        return (out, *hidden) if cell == "lstm" else (out, hidden)

    inputs = (x, h0, c0, *params) if cell == "lstm" else (x, h0, *params)
    if cell == "gru":
        inputs_fn = lambda x, h0, *params: layer(x, h0, None, *params)  # noqa: E731
    else:
        inputs_fn = layer
    assert gradcheck(inputs_fn, inputs, check_batched_grad=True, fast_mode=True)
    assert ours.last_dispatch.path == "interpret"
    assert gradgradcheck(inputs_fn, inputs, check_batched_grad=True, fast_mode=True)


def test_torch_func_transforms_match_torch_nn(interpret):
    ours, ref = make_pair("gru", 3, 4, torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for transform in (lambda m: grad(lambda xi: m(xi)[0].pow(2).sum())(x),
                      lambda m: jacrev(lambda xi: m(xi)[0].sum(0))(x),
                      lambda m: grad(lambda p: functional_call(m, p, (x,))[0].sum())(dict(m.named_parameters()))):
        got, want = transform(ours), transform(ref)
        if isinstance(got, dict):
            got, want = torch.cat([v.flatten() for v in got.values()]), torch.cat([v.flatten() for v in want.values()])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert ours.last_dispatch.path == "reference"
    lstm, _ = make_pair("lstm", 3, 4, torch.float64, num_layers=2, bidirectional=True, batch_first=True)
    xs = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    # forward-mode AD (a dual tensor's tangent): the kernels would drop it
    import torch.autograd.forward_ad as fwAD
    tangent = torch.randn_like(x)
    tangents = []
    for layer in (ours, ref):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent))[0]).tangent)
    assert ours.last_dispatch.path == "reference"
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)
    # outside a transform, the kernels run again
    lstm(xs[0])
    assert lstm.last_dispatch.path == "interpret"


@pytest.fixture
def forward_launches(monkeypatch):
    """The (batch rows, time steps) of every forward launch (the layer's call; the kernels still run)."""
    shapes = []
    real = autograd_mod.layer_forward

    def recording(layer, x, *args, **kwargs):
        shapes.append((x.shape[0], x.shape[1]) if layer.batch_first else (x.shape[1], x.shape[0]))
        return real(layer, x, *args, **kwargs)

    monkeypatch.setattr(autograd_mod, "layer_forward", recording)
    return shapes


@pytest.mark.parametrize("cell,batch_first", [("lstm", True), ("lstm", False), ("gru", False)])
def test_vmap_folds_the_mapped_dimension_into_the_kernels_batch(interpret, forward_launches, cell, batch_first):
    """vmap over a layer runs the kernels once per layer with V x B rows (the mapped dimension is more
    batch rows), states mapped on their own dimension; torch.nn's RNN has no batching rule, so the
    reference is a loop. A forward under vmap trains through the backward kernel."""
    V, B, T = 3, 2, 5
    ours, ref = make_pair(cell, 3, 4, torch.float64, num_layers=2, bidirectional=True, batch_first=batch_first)
    xs = torch.randn(V, *((B, T) if batch_first else (T, B)), 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, V, B, 4, dtype=torch.float64)  # mapped along dim 1
    hx = (h0, torch.randn_like(h0)) if cell == "lstm" else h0

    def layer(module, x, hx):
        out, hidden = module(x, hx)
        return (out, *hidden) if cell == "lstm" else (out, hidden)

    got = vmap(lambda x, hx: layer(ours, x, hx), in_dims=(0, 1))(xs, hx)
    assert ours.last_dispatch.path == "interpret" and forward_launches == [(V * B, T)] * 2
    per_slice = [layer(ref, xs[v], tuple(s[:, v] for s in hx) if cell == "lstm" else hx[:, v]) for v in range(V)]
    for g, want in zip(got, zip(*per_slice)):
        torch.testing.assert_close(g, torch.stack(want), rtol=1e-10, atol=1e-12)
    xs_ref = xs.detach().clone().requires_grad_()
    sum(o.square().sum() for o in got).backward()
    sum(o.square().sum() for s in [layer(ref, xs_ref[v], tuple(t[:, v] for t in hx) if cell == "lstm" else hx[:, v])
                                   for v in range(V)] for o in s).backward()
    torch.testing.assert_close(xs.grad, xs_ref.grad, rtol=1e-10, atol=1e-12)
    for p, p_ref in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12)


def test_vmap_over_unbatched_sequences_and_over_a_torch_plan(forward_launches):
    """A per-sample batch of one, without h0 and with mapped states (folded, the states are views
    that are not contiguous: the kernels get them contiguous); where the planner picks torch.nn
    (here: auto on CPU), vmap runs the reference."""
    V, T = 4, 5
    ours, ref = make_pair("lstm", 3, 4, torch.float64, bidirectional=True)
    xs = torch.randn(V, T, 3, dtype=torch.float64)  # unbatched sequences
    want = torch.stack([ref(x)[0] for x in xs])
    h0, c0 = torch.randn(2, V, 2, 4, dtype=torch.float64)
    want_mapped = torch.stack([ref(x, (h0[v], c0[v]))[1][1] for v, x in enumerate(xs)])
    with persistrnn.backend("interpret"):
        got = vmap(lambda x: ours(x)[0])(xs)
        got_mapped = vmap(lambda x, h, c: ours(x, (h, c))[1][1])(xs, h0, c0)
    assert ours.last_dispatch.path == "interpret" and forward_launches == [(V, T)] * 2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_mapped, want_mapped, rtol=1e-10, atol=1e-12)
    got = vmap(lambda x: ours(x)[0])(xs)
    assert ours.last_dispatch.path == "reference" and "no batching rule" in ours.last_dispatch.reason
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_vmap_over_stacked_weights_runs_a_launch_per_model(interpret, forward_launches):
    """An ensemble (torch.func.stack_module_state): each mapped slice has its own weights, so each is
    its own launch."""
    from torch.func import stack_module_state
    pairs = [make_pair("gru", 3, 4, torch.float64) for _ in range(3)]
    params, _ = stack_module_state([ours for ours, _ in pairs])
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = vmap(lambda p: functional_call(pairs[0][0], p, (x,))[0])(params)
    assert forward_launches == [(2, 5)] * 3
    torch.testing.assert_close(got, torch.stack([ref(x)[0] for _, ref in pairs]), rtol=1e-10, atol=1e-12)


def test_vmap_over_the_backward_runs_the_kernels_forward(interpret):
    """The forward on the kernels; vmap over its backward (many output gradients at once, as
    jacobian(vectorize=True) does) differentiates the recomputed layer."""
    ours, ref = make_pair("lstm", 3, 4, torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    y = ours(x)[0]
    assert ours.last_dispatch.path == "interpret"
    cotangents = torch.randn(6, *y.shape, dtype=torch.float64)
    got = vmap(lambda v: torch.autograd.grad(y, x, v, retain_graph=True)[0])(cotangents)
    y_ref = ref(x)[0]
    want = torch.stack([torch.autograd.grad(y_ref, x, v, retain_graph=True)[0] for v in cotangents])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
