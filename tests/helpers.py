"""Helpers the tests share: layer pairs vs torch.nn in float64, tolerances, inputs, gradients, GPU timeout."""
import copy
import os

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs tl in a jit function's globals)
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import persistrnn
from persistrnn.layers.check import TOLERANCE as TOL  # against torch.nn in float64, same weights

DTYPES = list(TOL)


def make_pair(cell, input_size, hidden_size, dtype=torch.float32, **kwargs):
    """Our layer in `dtype` and its torch.nn twin in float64 with exactly the same weights."""
    ours = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(input_size, hidden_size, dtype=dtype, **kwargs)
    ref = (nn.LSTM if cell == "lstm" else nn.GRU)(input_size, hidden_size, dtype=torch.float64, **kwargs)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def to64(value):
    """float64 copy of a tensor, a PackedSequence or a (h0, c0) tuple."""
    if value is None:
        return None
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return value._replace(data=value.data.double())
    if isinstance(value, tuple):
        return tuple(v.double() for v in value)
    return value.double()


def flat_outputs(result):
    """(output, h_n[, c_n]) as plain tensors."""
    output, hidden = result
    if isinstance(output, nn.utils.rnn.PackedSequence):
        output = output.data
    return (output, *hidden) if isinstance(hidden, tuple) else (output, hidden)


def assert_close_to_ref(ours, ref, input, hx=None, dtype=torch.float32):
    """Every output within TOL[dtype] of torch.nn in float64 (same weights). An output that the
    dtype's own rounding cannot resolve that well (cancellation: a one-unit projection of about
    1e-4 while its terms are about 1e-1) is held to twice the error of torch.nn itself run in
    `dtype` on the same input."""
    with torch.no_grad():
        got = flat_outputs(ours(input, hx))
        want = flat_outputs(ref(to64(input), to64(hx)))
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == dtype
        assert torch.isfinite(g).all()
        bound = TOL[dtype]
        if rel_err(g, w) > bound:
            with torch.no_grad():
                native = flat_outputs(copy.deepcopy(ref).to(dtype)(input, hx))[k]
            bound = max(bound, 2 * rel_err(native, w))
        assert rel_err(g, w) <= bound, f"relative error {rel_err(g, w):.3e} > {bound:.1e}"


VARIANTS = {
    "plain": {},
    "two_layers": dict(num_layers=2),
    "bidirectional": dict(bidirectional=True),
    "batch_first": dict(batch_first=True),
    "no_bias": dict(bias=False),
    "proj": dict(proj_size=5),
    "deep_bidir_batch_first_proj": dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=7),
    "dropout_in_eval": dict(num_layers=2, dropout=0.5),
}
INPUTS = ["padded", "padded_with_state", "packed_sorted", "packed_unsorted_with_state", "unbatched"]


def make_input(kind, module, T, B, dtype):
    """An input of `kind` for `module`, and an initial state (or None)."""
    I = module.input_size
    D = 2 if module.bidirectional else 1
    R = module.proj_size or module.hidden_size
    with_state = kind.endswith("with_state")
    if kind.startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,))
        lengths[torch.randint(0, B, ())] = T
        seqs = [torch.randn(int(n), I, dtype=dtype) for n in lengths]
        if kind == "packed_sorted":
            seqs.sort(key=len, reverse=True)
        x = pack_sequence(seqs, enforce_sorted=kind == "packed_sorted")
    elif kind == "unbatched":
        x = torch.randn(T, I, dtype=dtype)
        B = None
    else:
        x = torch.randn(*((B, T) if module.batch_first else (T, B)), I, dtype=dtype)
    if not with_state:
        return x, None
    batch = () if B is None else (B,)
    h0 = torch.randn(module.num_layers * D, *batch, R, dtype=dtype)
    if isinstance(module, torch.nn.LSTM):
        return x, (h0, torch.randn(module.num_layers * D, *batch, module.hidden_size, dtype=dtype))
    return x, h0


CELL_VARIANTS = [(cell, v) for cell in ("lstm", "gru") for v in VARIANTS
                 if cell == "lstm" or "proj_size" not in VARIANTS[v]]  # proj_size is LSTM only


def _leaves(x, hx):
    """The differentiable inputs of one call: the input (or packed data) and h0 (c0)."""
    data = x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x
    states = () if hx is None else (hx if isinstance(hx, tuple) else (hx,))
    return [data, *states]


def _with_grad(x, hx):
    """Copies of x and hx that require grad (a PackedSequence keeps its batch sizes and order)."""
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        x = x._replace(data=x.data.detach().clone().requires_grad_())
    else:
        x = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = tuple(h.detach().clone().requires_grad_() for h in hx) if isinstance(hx, tuple) \
            else hx.detach().clone().requires_grad_()
    return x, hx


def _loss(result, weights):
    """A loss that touches every output (output, h_n, c_n) with fixed random weights."""
    output, hidden = result
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        output = output.data
    outs = [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]
    return sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights))


def gradients(module, x, hx, loss_weights=None):
    """(loss, [d input, d h0, (d c0), d every parameter]) of one forward and backward."""
    x, hx = _with_grad(x, hx)
    result = module(x, hx)
    if loss_weights is None:
        output, hidden = result
        outs = [output.data if isinstance(output, torch.nn.utils.rnn.PackedSequence) else output,
                *(hidden if isinstance(hidden, tuple) else (hidden,))]
        loss_weights = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss = _loss(result, loss_weights)
    leaves = _leaves(x, hx) + list(module.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=False)
    return loss, grads, loss_weights


def assert_gradients_match(ours, ref, x, hx, dtype):
    _, got, weights = gradients(ours, x, hx)
    assert ours.last_dispatch.path == "interpret", ours.last_dispatch
    _, want, _ = gradients(ref, to64(x), to64(hx), weights)
    names = ["input", "h0", "c0"][:len(_leaves(x, hx))] + [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        if not w.any():  # e.g. behind dropout=1: no relative error, ours must be zero too
            assert not g.any(), name
            continue
        err = rel_err(g, w)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3e} > {TOL[dtype]:.0e}"


@triton.jit
def wait_that_does_not_wait(counter_ptr, target, alive, MAX_SPIN, INTERPRET: tl.constexpr):
    return alive


GPU_TIMEOUT_ENV = "PERSISTRNN_GPU_TEST_TIMEOUT"
GPU_TIMEOUT_S = 120.0


def gpu_test_timeout():
    """Seconds a `gpu`-marked test may run, setup to teardown: $PERSISTRNN_GPU_TEST_TIMEOUT (default
    120; 0 or less: no timeout)."""
    value = os.environ.get(GPU_TIMEOUT_ENV, "").strip()
    try:
        return float(value) if value else GPU_TIMEOUT_S
    except ValueError:
        raise pytest.UsageError(f"{GPU_TIMEOUT_ENV}={value!r}: expected seconds") from None
