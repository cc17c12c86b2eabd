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


def test_the_language_is_restored_so_kernels_still_compile():
    """triton 3.6's interpreter leaves triton.language patched after a device-function call
    (tl.sigmoid here, through tanh); interpreting() restores it, so a kernel compiled in this
    process afterwards still compiles. Without the restore the compile below fails."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arange, sigmoid = tl.core.arange, tl.sigmoid
    x = torch.randn(16)
    with interpreting():
        interpreted(_tanh_kernel)[(1,)](x, torch.empty(16), N=16)
    assert tl.core.arange is arange and tl.sigmoid is sigmoid
    src = ASTSource(_tanh_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "N": "constexpr"}, {"N": 16})
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]


def test_state_is_restored_after_an_error():
    saved = JITFunction.__call__
    with pytest.raises(Exception):
        with interpreting():
            interpreted(_tanh_kernel)[(1,)](torch.zeros(3), torch.zeros(3), N=3)  # arange needs a power of 2
    assert JITFunction.__call__ is saved and not triton.knobs.runtime.interpret


def test_outside_the_scope_helpers_refuse_to_run():
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        tanh(torch.zeros(1))


@triton.jit
def _meet(counter_ptr, out_ptr, MAX_SPIN):
    """Each program adds its id, waits for all (bounded), then reads the total."""
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    tl.atomic_add(counter_ptr + 1, pid + 1)
    tl.atomic_add(counter_ptr, 1, sem="release")
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")
    spins = 0
    while (arrived < n) & (spins < MAX_SPIN):
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")
        spins += 1
    tl.store(out_ptr + pid, tl.where(arrived >= n, tl.atomic_add(counter_ptr + 1, 0), -1))


@triton.jit
def _fail_in_program_2(out_ptr):
    pid = tl.program_id(0)
    tl.device_assert(pid != 2, "program 2 fails")
    tl.store(out_ptr + pid, pid)


def test_concurrent_programs_meet_at_a_barrier():
    counter = torch.zeros(2, dtype=torch.int32)
    out = torch.full((6,), -7, dtype=torch.int32)
    with interpreting():
        interpreted(_meet, concurrent=True)[(6,)](counter, out, 1 << 20)
    assert out.tolist() == [21] * 6  # every program saw all six arrivals


def test_sequential_programs_cannot_meet():
    """The stock executor runs programs one by one: the bounded spin gives up (the reason the
    concurrent launcher exists)."""
    counter = torch.zeros(2, dtype=torch.int32)
    out = torch.full((3,), -7, dtype=torch.int32)
    with interpreting():
        interpreted(_meet)[(3,)](counter, out, 5)
    assert out.tolist()[:2] == [-1, -1]


def test_concurrent_errors_name_the_program(monkeypatch):
    import dataclasses

    from triton.runtime.interpreter import interpreter_builder
    # device_assert is active in debug mode only
    monkeypatch.setattr(interpreter_builder, "options", dataclasses.replace(interpreter_builder.options, debug=True))
    out = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"program \(2, 0, 0\)"):
        with interpreting():
            interpreted(_fail_in_program_2, concurrent=True)[(4,)](out)


def test_concurrent_wait_is_bounded():
    out = torch.zeros(2, dtype=torch.int32)
    # a counter that can never reach the grid size: the programs spin (bounded, but for longer
    # than the launcher's timeout)
    counter = torch.tensor([-(1 << 30), 0], dtype=torch.int32)
    with pytest.raises(TimeoutError, match="did not finish"):
        with interpreting():
            interpreted(_meet, concurrent=True, timeout=0.05)[(2,)](counter, out, 20000)


def test_tanh_keeps_relative_accuracy_near_zero_in_fp32():
    """2*sigmoid(2x)-1 alone cancels near 0 (1e-5 relative at x ~ 3e-3 in fp32): a hypothesis
    example with H=1 caught it. Every element must be within a few fp32 ulp, relative."""
    x = torch.cat([torch.logspace(-8, 1, 60), -torch.logspace(-8, 1, 4)]).float()
    y = torch.full_like(x, float("nan"))
    with interpreting():
        interpreted(_tanh_kernel)[(1,)](x, y, N=64)
    want = torch.tanh(x.double())
    assert ((y.double() - want).abs() / want.abs()).max() < 1e-6
