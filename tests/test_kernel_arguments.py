"""The ahead-of-time compile (autotune/aot.py), which the static tables and the tuner trust, binds a
kernel's arguments exactly as a real launch does: the same argument list, constexprs, and triton's
specialization of them (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16)."""
import pytest
import torch

import persistrnn
import persistrnn.kernels.backward as backward
import persistrnn.kernels.forward as forward
from persistrnn.autotune import aot
from persistrnn.kernels.config import KernelConfig

T, B = 16, 16  # as the ahead-of-time compile's layer

CASES = [  # (cell, hidden, proj_size, bidirectional, block_h)
    ("lstm", 32, 0, False, None),
    ("gru", 32, 0, True, 16),
    ("lstm", 32, 16, False, 16),
]


def launches_of(monkeypatch):
    """Every launch of either kernel: (kernel function, grid, args, constexprs, config)."""
    seen = []
    for module in (forward, backward):
        real = module.launch

        def recording(kernel, grid, args, constexprs, *, real=real, **kwargs):
            seen.append((kernel, grid, args, constexprs, kwargs["config"]))
            return real(kernel, grid, args, constexprs, **kwargs)
        monkeypatch.setattr(module, "launch", recording)
    return seen


def bound(jit_fn, args, constexprs, config, kernel):
    _, signature, bound_constexprs, attrs = aot.bind(jit_fn, args, constexprs, config=config, kernel=kernel,
                                                     target="sm_90")
    return signature, bound_constexprs, attrs


@pytest.mark.parametrize("cell, hidden, proj_size, bidirectional, block_h", CASES)
def test_ahead_of_time_binding_is_the_launch_binding(monkeypatch, cell, hidden, proj_size, bidirectional, block_h):
    seen = launches_of(monkeypatch)
    kwargs = dict(bidirectional=bidirectional, **({"proj_size": proj_size} if proj_size else {}))
    layer = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(8, hidden, **kwargs)
    x = torch.randn(T, B, 8, requires_grad=True)
    pins = {} if block_h is None else {"block_h": block_h}
    with persistrnn.backend("interpret"), persistrnn.pin_config(**pins):
        layer(x)[0].sum().backward()
    assert [kernel for kernel, *_ in seen] == [forward._rnn_forward_kernel, backward._rnn_backward_kernel]
    D = 2 if bidirectional else 1
    for kernel, grid, args, constexprs, config in seen:
        name = "backward" if kernel is backward._rnn_backward_kernel else "forward_save"
        jit_fn, aot_grid, aot_args, aot_constexprs = aot.kernel_arguments(
            name, cell, torch.float32, proj_size > 0, config, (hidden, proj_size or hidden, B, D),
            allow_tf32=False, interpret=True, T=T)
        assert jit_fn is kernel and aot_grid == grid and aot_constexprs == constexprs
        assert len(aot_args) == len(args)
        assert bound(jit_fn, aot_args, aot_constexprs, config, name) == bound(kernel, args, constexprs, config, name)


def test_a_slipped_argument_changes_the_binding():
    """The comparison above can fail: the same launch with two integer arguments swapped (B = 16 and
    H = 24: divisible by 16 or not) binds differently."""
    config = KernelConfig(16, 32)
    jit_fn, _, args, constexprs = aot.kernel_arguments("forward", "lstm", torch.float32, False, config, (24, 24, 16, 1),
                                                       allow_tf32=False, interpret=True, T=T)
    B_at, H_at = 15, 16  # the kernel's (..., T, B, H, R, ...)
    assert (args[B_at], args[H_at]) == (16, 24)
    slipped = args[:B_at] + (args[H_at], args[B_at]) + args[H_at + 1:]
    assert bound(jit_fn, slipped, constexprs, config, "forward") != bound(jit_fn, args, constexprs, config, "forward")
