"""The mechanisms of the time step (kernels/skeleton.py), run by the interpreter against torch.nn in
float64: loads ahead of the barrier, h read back in groups of K-chunks, batch tiles of 32 and 64
rows, exact K for widths that are not powers of two, fast transcendentals (emulated on CPU at
the hardware's documented error). Each mechanism is also broken on purpose: the check must fail."""
import pytest
import torch
import triton
import triton.language as tl

import persistrnn
import persistrnn.kernels.backward as backward
import persistrnn.kernels.forward as forward
import persistrnn.kernels.skeleton as skeleton
from persistrnn.kernels.cells import EMULATED, EXACT, HARDWARE, tanh
from persistrnn.kernels.skeleton import k_chunks, recurrent_chunks

from conftest import TOL, assert_close_to_ref, make_pair, rel_err
from test_backward import assert_gradients_match, gradients
from test_layers import make_input


@triton.jit
def _the_same_step(it):
    return it


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_loading_ahead_the_wrong_step_is_caught(cell, monkeypatch, interpret):
    """The forward loads the next step's xproj before the barrier, the backward the next reverse
    step's dy, activations and state. Loading the current step again instead must fail."""
    ours, ref = make_pair(cell, 4, 32, torch.float64, bidirectional=True)
    x, hx = make_input("packed_unsorted_with_state", ours, T=4, B=5, dtype=torch.float64)
    with persistrnn.pin_config(block_h=16):
        assert_close_to_ref(ours, ref, x, hx, torch.float64)
        assert_gradients_match(ours, ref, x, hx, torch.float64)
        monkeypatch.setattr(forward, "_next", _the_same_step)
        with torch.no_grad():
            got = ours(x, hx)[0]
            want = ref(x, hx)[0]
        assert not rel_err(got.data, want.data) <= TOL[torch.float64]
        monkeypatch.undo()
        monkeypatch.setattr(backward, "_next", _the_same_step)
        _, got, weights = gradients(ours, x, hx)
        _, want, _ = gradients(ref, x, hx, weights)
        assert not all(rel_err(g, w) <= TOL[torch.float64] for g, w in zip(got, want))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_h_read_back_in_groups_of_chunks(cell, monkeypatch, interpret):
    """With the group size cut to one K-chunk, the split tier reads h back chunk by chunk
    (H = 200, fp64: six chunks of 32 and one of 16), and still matches."""
    monkeypatch.setattr(skeleton, "H_GROUP_BYTES", 1)
    launches = []
    real = skeleton.launch
    monkeypatch.setattr(forward, "launch", lambda *a, **k: launches.append(a[3]) or real(*a, **k))
    ours, ref = make_pair(cell, 3, 200, torch.float64)
    x, hx = make_input("padded_with_state", ours, T=3, B=3, dtype=torch.float64)
    with persistrnn.pin_config(block_h=64):
        assert_close_to_ref(ours, ref, x, hx, torch.float64)
    assert [(c["CHUNKS"], c["H_GROUP"]) for c in launches] == [((32,) * 6 + (16,), 1)]


@pytest.mark.parametrize("block_b", [32, 64])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_batch_tiles_of_32_and_64_rows(cell, block_b, interpret):
    """One program per (direction, units) takes block_b batch rows, ragged ones masked: forward
    and gradients, split tier."""
    ours, ref = make_pair(cell, 4, 48, torch.float64, bidirectional=True)
    x, hx = make_input("packed_unsorted_with_state", ours, T=3, B=block_b + 3, dtype=torch.float64)
    with persistrnn.pin_config(block_h=16, block_b=block_b):
        assert_close_to_ref(ours, ref, x, hx, torch.float64)
        assert_gradients_match(ours, ref, x, hx, torch.float64)
    assert ours.last_dispatch.config.block_b == block_b


def test_exact_k_chunks():
    assert k_chunks(768) == (128,) * 6
    assert k_chunks(1024) == (128,) * 8
    assert k_chunks(200) == (128, 64, 16)  # 200 rounded up to a multiple of 16: 8 padded columns
    assert k_chunks(1) == (16,)
    for width in range(1, 1100):
        chunks = k_chunks(width)
        assert sum(chunks) == -(-width // 16) * 16
        assert all(c & (c - 1) == 0 and 16 <= c <= skeleton.K_CHUNK for c in chunks)
    assert k_chunks(200, skeleton.FMA_K_CHUNK) == (32,) * 6 + (16,)
    # one program without proj_size multiplies its own [BLOCK_H, BLOCK_B] h tile
    assert recurrent_chunks(1, False, 64, 40) == (64,)
    assert recurrent_chunks(1, True, 64, 40) == (32, 16)
    assert recurrent_chunks(3, False, 16, 40) == (32, 16)


def test_k_chunks_follow_the_mma():
    """128-wide on tensor cores (fp16, bf16, fp32 with TF32), 32-wide for FMA and fp64 dots."""
    config = skeleton.KernelConfig(16, 16)
    chunks = lambda dtype, tf32: skeleton.kernel_constexprs("lstm", dtype, False, 4, config, 256, interpret=False,  # noqa: E731
                                                            allow_tf32=tf32)["CHUNKS"]
    assert chunks(torch.bfloat16, False) == chunks(torch.float16, False) == chunks(torch.float32, True) == (128, 128)
    assert chunks(torch.float32, False) == chunks(torch.float64, True) == (32,) * 8


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_width_not_a_power_of_two(cell, interpret):
    """H = 96 = 64 + 32, split in 16-unit programs, and an LSTM projection of 24 = 16 + 16."""
    ours, ref = make_pair(cell, 3, 96, torch.float64, bidirectional=True)
    x, hx = make_input("packed_unsorted_with_state", ours, T=3, B=4, dtype=torch.float64)
    with persistrnn.pin_config(block_h=16):
        assert_close_to_ref(ours, ref, x, hx, torch.float64)
    if cell == "lstm":
        ours, ref = make_pair(cell, 3, 40, torch.float64, proj_size=24)
        with persistrnn.pin_config(block_h=16):
            assert_gradients_match(ours, ref, *make_input("padded_with_state", ours, T=3, B=4, dtype=torch.float64),
                                   torch.float64)


def test_fast_math_is_chosen_where_the_dtype_allows():
    fast = skeleton.fast_math
    for dtype in (torch.float16, torch.bfloat16):
        assert fast(dtype, interpret=False, allow_tf32=False) == HARDWARE
        assert fast(dtype, interpret=True, allow_tf32=False) == EXACT
    assert fast(torch.float32, interpret=False, allow_tf32=True) == HARDWARE
    assert fast(torch.float32, interpret=False, allow_tf32=False) == EXACT
    assert fast(torch.float64, interpret=False, allow_tf32=True) == EXACT


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, N: tl.constexpr, FAST: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tanh(tl.load(x_ptr + offs), FAST))


def test_the_emulated_tanh_has_the_documented_error():
    """EMULATED is exact tanh cut to 11 mantissa bits: relative error below 2^-11 (the PTX ISA
    gives 2^-10.987 for tanh.approx.f32), never zero everywhere (it is not the exact one)."""
    from persistrnn.kernels.interpreter import interpreted, interpreting
    x = torch.linspace(-8, 8, 1024)
    y = torch.empty_like(x)
    with interpreting():
        interpreted(_tanh_kernel)[(1,)](x, y, N=1024, FAST=EMULATED)
    exact = torch.tanh(x.double())
    err = ((y.double() - exact).abs() / exact.abs().clamp_min(1e-30))[x != 0]
    assert err.max() < 2 ** -11 and err.max() > 2 ** -14
    assert (y.double().abs() <= exact.abs()).all()  # toward zero


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_parity_holds_with_emulated_fast_math(cell, dtype, monkeypatch, interpret):
    """The tolerances hold with an error of the hardware's documented size in every tanh and
    sigmoid, forward and backward, split tier."""
    monkeypatch.setattr(skeleton, "EMULATE_FAST_MATH", True)
    launches = []
    real = skeleton.launch
    monkeypatch.setattr(forward, "launch", lambda *a, **k: launches.append(a[3]["FAST"]) or real(*a, **k))
    ours, ref = make_pair(cell, 4, 48, dtype, bidirectional=True)
    x, hx = make_input("packed_unsorted_with_state", ours, T=6, B=5, dtype=dtype)
    with persistrnn.pin_config(block_h=16):
        assert_close_to_ref(ours, ref, x, hx, dtype)
        assert_gradients_match(ours, ref, x, hx, dtype)
    assert launches and set(launches) == {EMULATED}
