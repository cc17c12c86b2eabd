"""Which path runs, and that the choice is visible: kernels really ran, fallbacks are named."""
import logging

import pytest
import torch

import persistrnn
import persistrnn.configs as configs
import persistrnn.layers.backend as backend
import persistrnn.layers.dispatch as dispatch

from helpers import make_pair, rel_err


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_kernel_runs_once_per_layer(cell, launches, interpret):
    ours, _ = make_pair(cell, 4, 8, torch.float32, num_layers=3, bidirectional=True)
    with torch.no_grad():
        ours(torch.randn(3, 2, 4))
    assert len(launches) == 3 and all(call["interpret"] for call in launches)
    assert ours.last_dispatch.path == "interpret" and ours.last_dispatch.config.block_h == 16


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_too_large_for_the_kernels_falls_back_visibly(cell, launches, interpret, caplog):
    """float64 has no split tier: one more unit than one program holds goes to torch, visibly."""
    limit = max(configs.static_tables("sm_90")["forward"]["single"][(cell, "float64")])
    ours, ref = make_pair(cell, 4, limit + 1, torch.float64)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="persistrnn"):
        out = ours(x)[0]
    assert launches == []
    assert ours.last_dispatch.path == "torch" and "does not fit on-chip" in ours.last_dispatch.reason
    assert "does not fit on-chip" in caplog.text
    with torch.no_grad():
        assert rel_err(out, ref(x)[0]) < 1e-12


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_grad_enabled_runs_the_training_kernels(cell, launches, interpret, monkeypatch):
    import persistrnn.layers.layer as layer
    backward_calls = []
    real_backward = layer.rnn_backward
    monkeypatch.setattr(layer, "rnn_backward", lambda *a, **k: backward_calls.append(k) or real_backward(*a, **k))
    ours, _ = make_pair(cell, 4, 8, torch.float64, bidirectional=True, num_layers=2)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    ours(x)[0].square().sum().backward()
    assert len(launches) == 2 and all(call["saved"] is not None for call in launches)
    assert len(backward_calls) == 2 and all(call["interpret"] for call in backward_calls)
    assert ours.last_dispatch.path == "interpret" and "backward" in ours.last_dispatch.reason
    assert x.grad is not None and all(p.grad is not None for p in ours.parameters())


def test_sizes_that_fit_only_for_inference_train_on_torch_visibly(launches, interpret):
    """LSTM fp64 H=33: one program holds it for inference (block 64) but not with the backward
    (the train tables hold 32), and fp64 has no split tier."""
    ours, ref = make_pair("lstm", 4, 33, torch.float64)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
    assert ours.last_dispatch.path == "interpret" and len(launches) == 1
    x = x.requires_grad_()
    ours(x)[0].square().sum().backward()
    assert len(launches) == 1 and ours.last_dispatch.path == "torch"
    assert "forward and backward kernels" in ours.last_dispatch.reason
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref)[0].square().sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-12


def test_inference_mode_runs_the_kernel(launches, interpret):
    ours, _ = make_pair("gru", 4, 8, torch.float32)
    with torch.inference_mode():
        ours(torch.randn(3, 2, 4))
    assert len(launches) == 1


def test_auto_backend_runs_torch_on_cpu(launches):
    ours, _ = make_pair("lstm", 4, 8, torch.float32)
    with torch.no_grad():
        ours(torch.randn(3, 2, 4))
    assert launches == [] and ours.last_dispatch.path == "torch" and "'auto'" in ours.last_dispatch.reason


def test_environment_variable_selects_the_backend(launches, monkeypatch):
    ours, _ = make_pair("lstm", 4, 8, torch.float32)
    monkeypatch.setenv("PERSISTRNN_BACKEND", "interpret")
    assert persistrnn.current_backend() == "interpret"
    with torch.no_grad():
        ours(torch.randn(3, 2, 4))
    assert len(launches) == 1
    with persistrnn.backend("torch"), torch.no_grad():  # the context manager wins over the variable
        ours(torch.randn(3, 2, 4))
    assert len(launches) == 1 and ours.last_dispatch.path == "torch"
    monkeypatch.setenv("PERSISTRNN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown persistrnn backend"):
        persistrnn.current_backend()


def test_backend_context_restores_on_exit():
    with persistrnn.backend("interpret"):
        with pytest.raises(RuntimeError):
            with persistrnn.backend("torch"):
                raise RuntimeError
        assert persistrnn.current_backend() == "interpret"
    assert persistrnn.current_backend() == "auto"


def test_fp32_precision_api_of_torch_is_honoured(interpret):
    """torch's newer TF32 switch (cudnn.rnn.fp32_precision) makes reading the legacy
    cudnn.allow_tf32 raise: the layers must keep working and follow the new switch."""
    rnn_flags = torch.backends.cudnn.rnn
    saved = rnn_flags.fp32_precision
    try:
        rnn_flags.fp32_precision = "ieee"
        assert not backend.cudnn_rnn_allows_tf32()
        ours, ref = make_pair("gru", 4, 8, torch.float32)
        x = torch.randn(3, 2, 4)
        with torch.no_grad():
            assert rel_err(ours(x)[0], ref(x.double())[0]) < 1e-5
        rnn_flags.fp32_precision = "tf32"
        assert backend.cudnn_rnn_allows_tf32()
    finally:
        rnn_flags.fp32_precision = saved


def test_gpus_with_less_shared_memory_than_the_tables_run_torch(monkeypatch):
    """An RTX 4090 / L4 (sm_89, 99 KB per block) must not get A100 configs: torch, visibly."""
    from types import SimpleNamespace

    from persistrnn.layers import dispatch
    props = SimpleNamespace(name="NVIDIA L4", major=8, minor=9, shared_memory_per_block_optin=101376,
                            multi_processor_count=58)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    cuda = torch.device("cuda")
    assert configs.target_of(cuda) is None
    with persistrnn.backend("triton"):
        d = dispatch.plan("gru", cuda, torch.float16, torch.float16, 64, 0, 8, 1, grad_needed=False)
    assert d.path == "torch" and "NVIDIA L4" in d.reason and "99 KB" in d.reason
    props.shared_memory_per_block_optin = 227 * 1024
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert configs.target_of(cuda) == "sm_90"


def test_the_remembered_static_choice_follows_the_pins(interpret):
    """kernel_config remembers its answers from the static tables per call arguments and pins: a pin
    set after an unpinned call applies, and leaving it restores the table's choice."""
    from persistrnn.configs import DEFAULT_SMS, kernel_config
    args = ("gru", torch.float32, 64, 0, 4, 1, DEFAULT_SMS)
    table_choice, _ = kernel_config(*args, pinned=dispatch.pins())
    other_warps = 8 if table_choice.num_warps != 8 else 4
    with persistrnn.pin_config(num_warps=other_warps):
        pinned, _ = kernel_config(*args, pinned=dispatch.pins())
        with pytest.raises(ValueError, match="pin_config"), persistrnn.pin_config(block_h=8):
            # float64 has no split tier
            kernel_config("gru", torch.float64, 64, 0, 4, 1, DEFAULT_SMS, pinned=dispatch.pins())
    assert pinned.num_warps == other_warps and kernel_config(*args, pinned=dispatch.pins())[0] == table_choice
