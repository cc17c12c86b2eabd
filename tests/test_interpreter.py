"""The run-time interpreter switch (kernels/interpreter.py), pinned to triton 3.6."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from persistrnn.kernels.cells import tanh
from persistrnn.kernels.interpreter import interpreted, interpreting


def test_pinned_triton_version():
    assert triton.__version__.startswith("3.6."), "kernels/interpreter.py relies on triton 3.6 internals"


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tanh(tl.load(x_ptr + offs)))  # a nested @triton.jit helper


def test_nested_helpers_run_and_state_is_restored():
    saved = JITFunction.__call__
    x = torch.linspace(-6, 6, 64, dtype=torch.float64)
    y = torch.full_like(x, float("nan"))
    with interpreting():
        interpreted(_tanh_kernel)[(1,)](x, y, N=64)
    assert torch.allclose(y, torch.tanh(x), rtol=1e-12, atol=1e-15)
    assert JITFunction.__call__ is saved and not triton.knobs.runtime.interpret


def test_state_is_restored_after_an_error():
    saved = JITFunction.__call__
    with pytest.raises(Exception):
        with interpreting():
            interpreted(_tanh_kernel)[(1,)](torch.zeros(3), torch.zeros(3), N=3)  # arange needs a power of 2
    assert JITFunction.__call__ is saved and not triton.knobs.runtime.interpret


def test_outside_the_scope_helpers_refuse_to_run():
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        tanh(torch.zeros(1))
