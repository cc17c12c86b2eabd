"""On a GPU: the compiled kernels against cuDNN (torch.nn on CUDA) with the same weights."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import persistrnn
from persistrnn.layers import dispatch
from persistrnn.layers.check import relative_error, tolerance

pytestmark = pytest.mark.gpu

CASES = [
    ("lstm", 64, {}), ("lstm", 64, dict(bidirectional=True, num_layers=2)), ("lstm", 64, dict(proj_size=32)),
    ("lstm", 48, dict(batch_first=True)), ("gru", 128, {}), ("gru", 128, dict(bidirectional=True)),
    ("gru", 100, dict(num_layers=2, bias=False)),
]


def _pair(cell, hidden, dtype, kwargs):
    ours = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(64, hidden, device="cuda", dtype=dtype, **kwargs)
    ref = (nn.LSTM if cell == "lstm" else nn.GRU)(64, hidden, device="cuda", dtype=dtype, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def _expected_config(layer, x):
    """The config the planner's tables give for this layer and input on this GPU (None: torch)."""
    device = x.device
    target = dispatch.target_of(device)
    if target is None:
        return None
    batch = x.shape[0] if layer.batch_first else x.shape[1]
    config, _ = dispatch.kernel_config(layer._cell, x.dtype, layer.hidden_size, layer.proj_size, batch,
                                       2 if layer.bidirectional else 1,
                                       torch.cuda.get_device_properties(device).multi_processor_count, target)
    return config


def _outputs(result):
    out, hidden = result
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    return (out, *hidden) if isinstance(hidden, tuple) else (out, hidden)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cell,hidden,kwargs", CASES)
def test_matches_cudnn(cell, hidden, kwargs, dtype):
    ours, ref = _pair(cell, hidden, dtype, kwargs)
    shape = (8, 100, 64) if kwargs.get("batch_first") else (100, 8, 64)
    x = torch.randn(*shape, device="cuda", dtype=dtype)
    with torch.no_grad(), persistrnn.backend("triton"):
        got = _outputs(ours(x))
        want = _outputs(ref(x))
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(dtype, "cuda")
    assert ours.last_dispatch.path == ("triton" if _expected_config(ours, x) else "torch"), ours.last_dispatch


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_matches_cudnn(cell):
    ours, ref = _pair(cell, 64, torch.float16, dict(bidirectional=True))
    seqs = [torch.randn(n, 64, device="cuda", dtype=torch.float16) for n in (50, 7, 33, 1)]
    x = pack_sequence(seqs, enforce_sorted=False)
    with torch.no_grad(), persistrnn.backend("triton"):
        got, want = _outputs(ours(x)), _outputs(ref(x))
    assert ours.last_dispatch.path == "triton"
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(torch.float16, "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell,hidden,kwargs", [("lstm", 512, {}), ("lstm", 1024, {}), ("gru", 512, {}),
                                                ("gru", 1024, dict(bidirectional=True)),
                                                ("lstm", 1024, dict(proj_size=64))])
def test_split_tier_matches_cudnn(cell, hidden, kwargs, dtype):
    ours, ref = _pair(cell, hidden, dtype, kwargs)
    x = torch.randn(64, 16, 64, device="cuda", dtype=dtype)
    expected = _expected_config(ours, x)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert expected is not None and expected.block_h < hidden, "H100/H200 tables hold these in the split tier"
    with torch.no_grad(), persistrnn.backend("triton"):
        got, want = _outputs(ours(x)), _outputs(ref(x))
    assert ours.last_dispatch.path == ("triton" if expected else "torch"), ours.last_dispatch
    assert ours.last_dispatch.config == expected
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(dtype, "cuda")


def test_impossible_config_raises_instead_of_hanging():
    ours, _ = _pair("lstm", 512, torch.float16, {})
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(8, 16 * (sms // 32 + 1), 64, device="cuda", dtype=torch.float16)
    with torch.no_grad(), persistrnn.backend("triton"), persistrnn.pin_config(block_h=16):
        with pytest.raises(ValueError, match="at once"):
            ours(x)


def test_barrier_timeout_raises_on_the_gpu(monkeypatch):
    """With no polls allowed, 32 programs cannot all meet at every one of 256 steps: the kernel
    must flag it and the host raise."""
    import persistrnn.kernels.forward as forward
    monkeypatch.setitem(forward.MAX_SPIN, "compiled", 0)
    ours, _ = _pair("gru", 512, torch.float16, {})
    x = torch.randn(256, 16, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad(), persistrnn.backend("triton"), persistrnn.pin_config(block_h=16):
        with pytest.raises(forward.BarrierTimeout):
            ours(x)
