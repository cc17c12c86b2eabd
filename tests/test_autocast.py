"""Under torch.autocast a layer with fp32 weights runs the kernels in the dtype torch.nn runs in,
returns what torch.nn returns, and sends gradients to the fp32 parameters. Checked on CPU
autocast (bf16) through the interpreter, against torch.nn under the same autocast (dtypes) and
against torch.nn in float64 with the weights rounded to the run dtype (values)."""
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import TOL, flat_outputs, gradients, rel_err
from torch import _VF, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import persistrnn
import persistrnn.layers.autocast as autocast
import persistrnn.layers.functional as functional

VARIANTS = [("lstm", {}), ("lstm", {"proj_size": 3}), ("lstm", {"bidirectional": True, "num_layers": 2}),
            ("gru", {}), ("gru", {"bidirectional": True, "num_layers": 2})]
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")


def torch_nn_under_autocast(cell, kwargs, ours, x):
    twin = (nn.LSTM if cell == "lstm" else nn.GRU)(4, 8, **kwargs)
    twin.load_state_dict(ours.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        return flat_outputs(twin(x))


def reference(cell, kwargs, ours, run_dtype):
    """torch.nn in float64 with our weights rounded to the run dtype: what the kernels compute."""
    ref = (nn.LSTM if cell == "lstm" else nn.GRU)(4, 8, dtype=torch.float64, **kwargs)
    ref.load_state_dict({k: v.to(run_dtype).double() for k, v in ours.state_dict().items()})
    return ref


@pytest.mark.parametrize("cell, kwargs", VARIANTS, ids=lambda v: str(v))
def test_forward_under_autocast(cell, kwargs, interpret):
    ours = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(4, 8, **kwargs)
    x = torch.randn(6, 3, 4)
    want_dtypes = [t.dtype for t in torch_nn_under_autocast(cell, kwargs, ours, x)]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got = flat_outputs(ours(x))
    assert ours.last_dispatch.path == "interpret" and "autocast" in ours.last_dispatch.reason
    assert [t.dtype for t in got] == want_dtypes
    # torch 2.13 on CPU: the LSTM runs in bf16, the GRU stays in fp32
    run = want_dtypes[0]
    assert run == (torch.bfloat16 if cell == "lstm" else torch.float32)
    with torch.no_grad():
        want = flat_outputs(reference(cell, kwargs, ours, run)(x.to(run).double()))
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOL[run], f"relative error {rel_err(g, w):.3e} > {TOL[run]:.0e}"


@pytest.mark.parametrize("cell, kwargs", VARIANTS, ids=lambda v: str(v))
def test_training_under_autocast(cell, kwargs, interpret):
    ours = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(4, 8, **kwargs)
    run = torch.bfloat16 if cell == "lstm" else torch.float32
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got, weights = gradients(ours, x, None)
    assert ours.last_dispatch.path == "interpret" and "backward" in ours.last_dispatch.reason
    ref = reference(cell, kwargs, ours, run)
    _, want, _ = gradients(ref, x.to(run).double(), None, weights)
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert g.dtype == torch.float32, name  # gradients reach the fp32 input and parameters in fp32
        assert rel_err(g, w) <= TOL[run], f"{name}: relative error {rel_err(g, w):.3e} > {TOL[run]:.0e}"


def test_weights_are_cast_once_per_forward(interpret, monkeypatch):
    """The kernels' wrapper gets every layer's weights already in bf16, in one call: the cast
    happens once per forward, not inside the time loop."""
    calls = []
    real = functional.rnn

    def recording(cell, input, batch_sizes, hx, weights, **kwargs):
        calls.append((input.dtype, [w.dtype for w in weights]))
        return real(cell, input, batch_sizes, hx, weights, **kwargs)
    monkeypatch.setattr(functional, "rnn", recording)
    ours = persistrnn.LSTM(4, 8, num_layers=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ours(torch.randn(3, 2, 4))
    assert calls == [(torch.bfloat16, [torch.bfloat16] * 8)]
    assert all(p.dtype == torch.float32 for p in ours.parameters())  # the module itself is untouched


def test_same_layers_run_the_kernels_as_with_the_dtype_itself(interpret):
    """Autocast changes no decision: the plan in the run dtype is the plan under autocast."""
    ours = persistrnn.LSTM(4, 8)
    with torch.no_grad():
        ours.to(torch.bfloat16)(torch.randn(3, 2, 4, dtype=torch.bfloat16))
        plain = ours.last_dispatch
        ours.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours(torch.randn(3, 2, 4))
    assert ours.last_dispatch.config == plain.config and ours.last_dispatch.path == plain.path


@pytest.fixture
def fresh_probes():
    autocast._probe.cache_clear()
    yield
    autocast._probe.cache_clear()


@pytest.mark.parametrize("cell, has_proj", [("lstm", False), ("lstm", True), ("gru", False)])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("states", [(), (torch.float32, torch.float32)])
def test_traced_probe_gives_the_dtypes_of_the_run(cell, has_proj, input_dtype, states):
    """Where torch's RNN cannot run, the dtypes come from the same call traced with fake tensors:
    they are the dtypes of the run (where it runs)."""
    args = cell, "cpu", input_dtype, states[:2 if cell == "lstm" else 1], torch.float32, has_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ran = autocast._run(*args)
        with FakeTensorMode():
            assert autocast._run(*args) == ran


def torch_lstm_cannot_run(monkeypatch, traced_too):
    """torch's LSTM raises oneDNN's error when it runs, as on a CPU whose oneDNN has no bf16 LSTM
    primitive; traced_too: also when traced with fake tensors."""
    def lstm(x, *args):
        if traced_too or not isinstance(x, FakeTensor):
            raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation primitive")
        return _VF.lstm(x, *args)
    monkeypatch.setattr(autocast, "_VF", SimpleNamespace(lstm=lstm, gru=_VF.gru))


@pytest.mark.parametrize("traced_too", [False, True], ids=["traced", "rule"])
def test_autocast_where_torch_lstm_cannot_run(traced_too, interpret, fresh_probes, monkeypatch):
    """The layer runs its kernels in bf16, as torch.nn would, with one warning for it."""
    ours = persistrnn.LSTM(4, 8)
    x = torch.randn(6, 3, 4)
    want_dtypes = [t.dtype for t in torch_nn_under_autocast("lstm", {}, ours, x)]
    torch_lstm_cannot_run(monkeypatch, traced_too)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        with pytest.warns(RuntimeWarning, match="cannot run under cpu autocast") as record:
            got = flat_outputs(ours(x))
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            ours(x)
    ours_warnings = [w for w in record if "cannot run under cpu autocast" in str(w.message)]
    assert len(ours_warnings) == 1
    assert ("traced" in str(ours_warnings[0].message)) != traced_too
    assert not [w for w in again if "cannot run" in str(w.message)]
    assert ours.last_dispatch.path == "interpret" and "autocast" in ours.last_dispatch.reason
    assert [t.dtype for t in got] == want_dtypes == [torch.bfloat16] * 3
    with torch.no_grad():
        want = flat_outputs(reference("lstm", {}, ours, torch.bfloat16)(x.bfloat16().double()))
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOL[torch.bfloat16]


def test_other_probe_errors_are_torch_nn_errors(fresh_probes):
    """An fp64 LSTM under CPU autocast: torch.nn raises, and so does the layer (no fallback)."""
    ours = persistrnn.LSTM(4, 8, dtype=torch.float64)
    twin = nn.LSTM(4, 8, dtype=torch.float64)
    x = torch.randn(3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        with pytest.raises(RuntimeError) as theirs:
            twin(x)
        with pytest.raises(RuntimeError, match=str(theirs.value).splitlines()[0]):
            ours(x)
