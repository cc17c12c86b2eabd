"""The mechanisms of the time step (kernels/tiles.py, exchange.py, fastmath.py), run by the interpreter against torch.nn in
float64: loads ahead of the barrier, h read back in groups of K-chunks, batch tiles of 32 and 64
rows, exact K for widths that are not powers of two, the hardware's transcendentals (emulated on CPU
at their documented error). Each mechanism is also broken on purpose: the check must fail."""
import pytest
import torch
import triton
import triton.language as tl

import persistrnn
import persistrnn.kernels.backward as backward
import persistrnn.kernels.forward as forward
import persistrnn.kernels.config as config_mod
import persistrnn.kernels.fastmath as fastmath
import persistrnn.kernels.launcher as launcher
import persistrnn.kernels.cells as cells
from persistrnn.kernels.cells import (ACCURATE, APPROX, EXACT, HIGH, LOW, NONE, memory_sigmoid, sigmoid,
                                        tanh)
from persistrnn.kernels.config import k_chunks, recurrent_chunks

from helpers import TOL, assert_close_to_ref, assert_gradients_match, gradients, make_input, make_pair, rel_err


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


def _forward_constexprs(monkeypatch):
    """The list to which every forward launch from now on appends its constexprs."""
    launches = []
    real = launcher.launch
    monkeypatch.setattr(forward, "launch", lambda *a, **k: launches.append(a[3]) or real(*a, **k))
    return launches


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_h_read_back_in_groups_of_chunks(cell, monkeypatch, interpret):
    """With the group size cut to one K-chunk, the split tier reads h back chunk by chunk
    (H = 200, fp64: six chunks of 32 and one of 16), and still matches."""
    monkeypatch.setattr(config_mod, "H_GROUP_BYTES", 1)
    launches = _forward_constexprs(monkeypatch)
    ours, ref = make_pair(cell, 3, 200, torch.float64)
    x, hx = make_input("padded_with_state", ours, T=3, B=3, dtype=torch.float64)
    with persistrnn.pin_config(block_h=64):
        assert_close_to_ref(ours, ref, x, hx, torch.float64)
    assert [(c["CHUNKS"], c["H_GROUP"]) for c in launches] == [((32,) * 6 + (16,), 1)]


@triton.jit
def _publish_my_units_only(xbuf_ptr, parity, pid_d, pid_b, units, unit_mask, cols, h, XBUF_ROWS,
                           BLOCK_B: tl.constexpr, W_DTYPE: tl.constexpr, H_IN_FLIGHT: tl.constexpr,
                           INTERPRET: tl.constexpr):
    tl.store(forward._xbuf_tile(xbuf_ptr, parity, pid_d, pid_b, 0, XBUF_ROWS, 1, BLOCK_B) + units * BLOCK_B
             + cols[None, :], h.to(W_DTYPE), mask=unit_mask)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_h_read_back_without_a_mask(cell, monkeypatch, interpret):
    """H = 100 in blocks of 32: the read-back covers 112 rows (K-chunks of 32 and one of 16) with
    unmasked loads, so the last program publishes zeros for its units past H. Publishing only the
    units < H leaves rows 100-111 as the exchange buffer's poison (NaN): the check must fail."""
    launches = _forward_constexprs(monkeypatch)
    ours, ref = make_pair(cell, 3, 100, torch.float64)
    x, hx = make_input("padded_with_state", ours, T=3, B=3, dtype=torch.float64)
    with persistrnn.pin_config(block_h=32):
        assert_close_to_ref(ours, ref, x, hx, torch.float64)
        assert launches[-1]["H_IN_FLIGHT"] and sum(launches[-1]["CHUNKS"]) == 112
        monkeypatch.setattr(forward, "_publish", _publish_my_units_only)
        with torch.no_grad():
            got = ours(x, hx)[0]
    assert not rel_err(got.data, ref(x, hx)[0].data) <= TOL[torch.float64]


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
        assert sum(chunks) == triton.cdiv(width, 16) * 16
        assert all(c & (c - 1) == 0 and 16 <= c <= config_mod.K_CHUNK for c in chunks)
    assert k_chunks(200, config_mod.FMA_K_CHUNK) == (32,) * 6 + (16,)
    # one program without proj_size multiplies its own [BLOCK_H, BLOCK_B] h tile
    assert recurrent_chunks(1, False, 64, 40) == (64,)
    assert recurrent_chunks(1, True, 64, 40) == (32, 16)
    assert recurrent_chunks(3, False, 16, 40) == (32, 16)


def test_which_forwards_load_xproj_in_place():
    """The one-element-per-register xproj load is on for compiled 16-bit layers without proj_size
    at <= 16 elements a thread, and off where it cost registers (64-row tiles at 4 warps,
    proj_size) or cannot run (the interpreter, other dtypes)."""
    def in_place(dtype=torch.bfloat16, has_proj=False, block_b=16, block_h=16, warps=4, interpret=False):
        return config_mod.xproj_in_place(dtype, has_proj, config_mod.KernelConfig(block_b, block_h, warps),
                                         interpret=interpret)
    assert in_place() and in_place(dtype=torch.float16) and in_place(block_b=32) and in_place(block_b=64, warps=8)
    assert not in_place(block_b=64) and not in_place(has_proj=True)
    assert not in_place(interpret=True) and not in_place(dtype=torch.float32)


def _forward_launch_constexprs(cell, width, block_h, dtype=torch.bfloat16, block_b=16, has_proj=False):
    """The constexprs of the forward launch of a layer of hidden size `width` (no launch)."""
    config = config_mod.KernelConfig(block_b, block_h)
    split = triton.cdiv(width, block_h)
    return config_mod.kernel_constexprs(cell, dtype, has_proj, split, config, width, interpret=False,
                                        allow_tf32=False)


def test_k_chunks_twice_as_wide_where_h_is_read_back_in_flight(monkeypatch, interpret):
    """LSTM bf16 H = 768, B = 16 in blocks of 16 (the shipped config): 3 chunks of 256, not 6 of
    128; so H = 1024 and 1280. Not where the read-back is masked (GRU H = 1024 in tiles of 32 rows:
    512 B of h per thread) or W's chunk would not stage (BLOCK_H = 32). Then a layer of width
    256 + 32 in blocks of 16 runs them (bf16, against float64)."""
    constexprs = _forward_launch_constexprs
    assert constexprs("lstm", 768, 16)["CHUNKS"] == (256,) * 3 and constexprs("lstm", 768, 16)["H_IN_FLIGHT"]
    assert constexprs("gru", 1024, 16)["CHUNKS"] == (256,) * 4 and constexprs("gru", 1024, 16)["H_IN_FLIGHT"]
    assert constexprs("gru", 1280, 16)["CHUNKS"] == (256,) * 5 and constexprs("gru", 1280, 16)["H_IN_FLIGHT"]
    assert constexprs("gru", 1024, 16, block_b=32)["CHUNKS"] == (128,) * 8
    assert not constexprs("gru", 1024, 16, block_b=32)["H_IN_FLIGHT"]
    assert constexprs("lstm", 768, 32)["CHUNKS"] == (128,) * 6 and constexprs("lstm", 768, 32)["H_IN_FLIGHT"]
    launches = _forward_constexprs(monkeypatch)
    ours, ref = make_pair("lstm", 3, 288, torch.bfloat16)
    x, hx = make_input("padded_with_state", ours, T=3, B=3, dtype=torch.bfloat16)
    with persistrnn.pin_config(block_h=16):
        assert_close_to_ref(ours, ref, x, hx, torch.bfloat16)
    assert launches[-1]["CHUNKS"] == (256, 32) and launches[-1]["H_IN_FLIGHT"]


def test_k_chunks_follow_the_mma():
    """128-wide on tensor cores (fp16, bf16, fp32 with TF32), 32-wide for FMA and fp64 dots."""
    config = config_mod.KernelConfig(16, 16)
    chunks = lambda dtype, tf32: config_mod.kernel_constexprs("lstm", dtype, False, 4, config, 256, interpret=False,  # noqa: E731
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


def test_math_is_chosen_by_the_dtype():
    mode = fastmath.math_mode
    assert mode(torch.bfloat16, interpret=False, allow_tf32=False) == (APPROX, NONE)
    assert mode(torch.float16, interpret=False, allow_tf32=False) == (ACCURATE, NONE)
    assert mode(torch.float32, interpret=False, allow_tf32=True) == (APPROX, NONE)
    assert mode(torch.float32, interpret=False, allow_tf32=False) == (EXACT, NONE)
    assert mode(torch.float64, interpret=False, allow_tf32=True) == (EXACT, NONE)
    for dtype in (torch.float16, torch.bfloat16):  # the interpreter cannot run the hardware's instructions
        assert mode(dtype, interpret=True, allow_tf32=False) == (EXACT, NONE)
    with fastmath.emulating_math(HIGH):
        assert mode(torch.bfloat16, interpret=True, allow_tf32=False) == (APPROX, HIGH)
        assert mode(torch.float16, interpret=True, allow_tf32=False) == (ACCURATE, HIGH)
        assert mode(torch.bfloat16, interpret=False, allow_tf32=False) == (APPROX, NONE)
        assert mode(torch.float64, interpret=True, allow_tf32=False) == (EXACT, NONE)


@triton.jit
def _math_kernel(x_ptr, tanh_ptr, sigmoid_ptr, memory_ptr, N: tl.constexpr, MATH: tl.constexpr,
                 EMULATE: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(tanh_ptr + offs, tanh(x, MATH, EMULATE))
    tl.store(sigmoid_ptr + offs, sigmoid(x, MATH, EMULATE))
    tl.store(memory_ptr + offs, memory_sigmoid(x, MATH, EMULATE))


@pytest.mark.parametrize("direction", [LOW, HIGH], ids=["low", "high"])
@pytest.mark.parametrize("math", [APPROX, ACCURATE], ids=["approx", "accurate"])
def test_the_emulation_has_the_documented_error(math, direction):
    """Emulated, every tanh and sigmoid is the exact value moved by the instruction's bound, toward
    zero (LOW) or away from it (HIGH), within [-1, 1]; the memory gate's sigmoid is never APPROX's."""
    from persistrnn.kernels.interpreter import interpreted, interpreting
    x = torch.linspace(-12, 12, 1024)
    out = [torch.empty_like(x) for _ in range(3)]
    with interpreting():
        interpreted(_math_kernel)[(1,)](x, *out, N=1024, MATH=math, EMULATE=direction)
    got_tanh, got_sigmoid, got_memory = (o.double() for o in out)
    exact_tanh, exact_sigmoid = torch.tanh(x.double()), torch.sigmoid(x.double())
    sign = -1 if direction == LOW else 1
    approx, accurate = cells.APPROX_TANH_ERROR.value, cells.ACCURATE_TANH_ERROR.value
    size = exact_tanh.abs() * (1 + sign * approx) if math == APPROX else exact_tanh.abs() + sign * accurate
    assert torch.allclose(got_tanh, exact_tanh.sign() * size.clamp(0, 1), rtol=0, atol=2e-7)
    assert (got_tanh.abs() <= 1).all() and (got_tanh * exact_tanh >= 0).all()
    if math == APPROX:  # 0.5 tanh(x / 2) + 0.5
        want = 0.5 + 0.5 * torch.tanh(x.double() / 2) * (1 + sign * approx)
        assert torch.allclose(got_sigmoid, want.clamp(0, 1), rtol=0, atol=2e-7)
    memory = exact_sigmoid + sign * cells.MEMORY_SIGMOID_ERROR.value  # 1 - sigmoid(-x): an absolute bound
    assert torch.allclose(got_memory, memory.clamp(0, 1), rtol=0, atol=2e-7)
    if math == ACCURATE:
        want = exact_sigmoid * (1 + sign * cells.ACCURATE_SIGMOID_ERROR.value)
        assert torch.allclose(got_sigmoid, want.clamp(0, 1), rtol=0, atol=2e-7)
    assert not torch.equal(got_tanh, exact_tanh.float().double())  # it is not the exact one


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_parity_holds_with_emulated_math(cell, dtype, monkeypatch, interpret):
    """The tolerances hold with an error of the hardware's documented size in every tanh and
    sigmoid, forward and backward, split tier."""
    launches = []
    real = launcher.launch
    monkeypatch.setattr(forward, "launch", lambda *a, **k: launches.append(a[3]["EMULATE"]) or real(*a, **k))
    ours, ref = make_pair(cell, 4, 48, dtype, bidirectional=True)
    x, hx = make_input("packed_unsorted_with_state", ours, T=6, B=5, dtype=dtype)
    with persistrnn.pin_config(block_h=16), fastmath.emulating_math(HIGH):
        assert_close_to_ref(ours, ref, x, hx, dtype)
        assert_gradients_match(ours, ref, x, hx, dtype)
    assert launches and set(launches) == {HIGH}
