"""The split tier: SPLIT programs per batch tile meeting at a per-step barrier, run concurrently
under the interpreter. Parity with torch.nn in float64, a broken barrier caught, a timeout raised."""
import pytest
import torch

import persistrnn
import persistrnn.configs as configs
import persistrnn.kernels.forward as forward
import persistrnn.kernels.launcher as launcher
from persistrnn.kernels.exchange import BarrierTimeout

from helpers import TOL, assert_close_to_ref, make_input, make_pair, rel_err, wait_that_does_not_wait

CASES = [  # (cell, hidden, block_h, layer kwargs, input kind)
    ("lstm", 32, 16, {}, "padded_with_state"),
    ("gru", 32, 16, dict(bidirectional=True), "packed_unsorted_with_state"),
    ("lstm", 64, 16, dict(bidirectional=True, batch_first=True), "padded"),
    ("gru", 64, 16, dict(num_layers=2), "packed_sorted"),
    ("lstm", 40, 16, dict(proj_size=24, bidirectional=True), "packed_unsorted_with_state"),  # 3 programs, ragged
    ("lstm", 128, 16, {}, "padded_with_state"),  # SPLIT = 8
    ("gru", 128, 16, dict(bidirectional=True), "packed_unsorted_with_state"),
    ("lstm", 64, 16, dict(proj_size=20, num_layers=2), "unbatched"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell,hidden,block_h,kwargs,kind", CASES)
def test_split_forward_matches_torch_nn(cell, hidden, block_h, kwargs, kind, dtype, interpret):
    ours, ref = make_pair(cell, 5, hidden, dtype, **kwargs)
    x, hx = make_input(kind, ours, T=4, B=3, dtype=dtype)
    with persistrnn.pin_config(block_h=block_h):
        assert_close_to_ref(ours, ref, x, hx, dtype)
    assert ours.last_dispatch.path == "interpret"
    assert ours.last_dispatch.config.block_h == block_h < hidden


def test_split_with_several_batch_tiles(interpret):
    ours, ref = make_pair("gru", 4, 32, torch.float64, bidirectional=True)
    x, hx = make_input("packed_unsorted_with_state", ours, T=3, B=35, dtype=torch.float64)
    with persistrnn.pin_config(block_h=16):
        assert_close_to_ref(ours, ref, x, hx, torch.float64)


def _run_split_lstm(monkeypatch):
    ours, ref = make_pair("lstm", 4, 32, torch.float64)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    with persistrnn.pin_config(block_h=16), persistrnn.backend("interpret"), torch.no_grad():
        got = ours(x)[0]
    return got, ref(x)[0].detach()


@pytest.fixture
def sequential_programs(monkeypatch):
    """Run the grid's programs one after another, as the stock interpreter does."""
    real = launcher.interpreted
    monkeypatch.setattr(launcher, "interpreted", lambda kernel, concurrent=False: real(kernel))


def test_a_broken_barrier_is_caught(monkeypatch, sequential_programs):
    """With a barrier that does not wait, program 0 runs every step before program 1 has written
    its half of h: the parity check must fail."""
    monkeypatch.setattr(forward, "_wait", wait_that_does_not_wait)
    got, want = _run_split_lstm(monkeypatch)
    assert not (rel_err(got, want) <= TOL[torch.float64])


def test_barrier_timeout_is_a_python_error_not_a_hang(monkeypatch, sequential_programs):
    """Programs that cannot meet (here: run one after another) time out; the launch itself does not
    wait for the timeout count (no host sync), so the error comes at the next check point: the next launch
    on the device, or persistrnn.raise_if_failed(). Once raised, a timeout is not raised again."""
    monkeypatch.setitem(forward.MAX_SPIN, "interpret", 20)
    _run_split_lstm(monkeypatch)  # timed out, not raised yet
    with pytest.raises(BarrierTimeout, match="timed out.*at most 20 polls"):
        persistrnn.raise_if_failed()
    persistrnn.raise_if_failed()  # nothing new
    _run_split_lstm(monkeypatch)
    with pytest.raises(BarrierTimeout, match="timed out"):
        _run_split_lstm(monkeypatch)  # the next launch raises the earlier one's timeout
    persistrnn.raise_if_failed()
    monkeypatch.undo()
    got, want = _run_split_lstm(monkeypatch)  # later, healthy launches raise nothing
    persistrnn.raise_if_failed()
    assert rel_err(got, want) <= TOL[torch.float64]


def test_the_intact_barrier_passes_under_concurrent_programs(monkeypatch):
    got, want = _run_split_lstm(monkeypatch)
    assert rel_err(got, want) <= TOL[torch.float64]


def test_pin_config_validates():
    for bad in (dict(block_h=24), dict(block_h=4), dict(block_b=8), dict(num_warps=3), dict(num_stages=0)):
        with pytest.raises(ValueError, match="pin_config"):
            with persistrnn.pin_config(**bad):
                pass


def test_grid_larger_than_the_device_runs_in_launches(interpret):
    """152 programs (38 batch tiles of 16 x SPLIT 2 x 2 directions) on 132 SMs: a pinned config
    runs as two launches of blocks of tiles; unpinned, the planner takes 32-row tiles (76
    programs, one launch)."""
    ours, _ = make_pair("lstm", 4, 32, torch.float32, bidirectional=True)
    x = torch.randn(2, 600, 4)
    with persistrnn.pin_config(block_h=16, block_b=16), torch.no_grad():
        ours(x)
    assert ours.last_dispatch.waves == ((0, 19, 0, 2), (19, 19, 0, 2))
    with persistrnn.pin_config(block_h=16), torch.no_grad():
        ours(x)
    assert ours.last_dispatch.config.block_b == 32 and len(ours.last_dispatch.waves) == 1


def test_split_wider_than_the_device_raises_or_runs_torch(interpret, monkeypatch):
    """A batch tile's SPLIT programs must all be resident: with fewer SMs than SPLIT a pinned
    config raises, and the planner runs torch, saying why."""
    monkeypatch.setattr(configs, "DEFAULT_SMS", 3)
    ours, _ = make_pair("lstm", 4, 64, torch.float32)
    with persistrnn.pin_config(block_h=16), torch.no_grad(), pytest.raises(ValueError, match="at once"):
        ours(torch.randn(2, 3, 4))  # SPLIT = 4 > 3 SMs
    config, why = configs.kernel_config("lstm", torch.float32, 1024, 0, 16, 1, sms=3)
    assert config is None and "holds 3" in why


def test_pinned_single_program_block_larger_than_needed(interpret):
    ours, ref = make_pair("gru", 4, 20, torch.float64)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with persistrnn.pin_config(block_h=64, num_warps=8):
        assert_close_to_ref(ours, ref, x, dtype=torch.float64)
    config = ours.last_dispatch.config
    assert (config.block_h, config.num_warps) == (64, 8)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fp32_at_hidden_1024_in_blocks_of_8_units(cell, interpret):
    """fp32 H = 1024 in the split tier's small blocks: 128 programs of 8 units (a 32-row gate tile)
    run concurrently for T = 2, forward and backward, against torch.nn in float64."""
    ours, ref = make_pair(cell, 4, 1024, torch.float32)
    x = torch.randn(2, 2, 4)
    xs = x.clone().requires_grad_(), x.double().requires_grad_()
    with persistrnn.pin_config(block_h=8):
        y = ours(xs[0])[0]
    assert ours.last_dispatch.path == "interpret" and ours.last_dispatch.config.block_h == 8
    y_ref = ref(xs[1])[0]
    assert rel_err(y, y_ref) <= TOL[torch.float32]
    dy = torch.randn_like(y_ref)
    with persistrnn.pin_config(block_h=8):
        y.backward(dy.float())
    y_ref.backward(dy)
    for got, want in ((xs[0].grad, xs[1].grad), (ours.weight_hh_l0.grad, ref.weight_hh_l0.grad)):
        assert rel_err(got, want) <= TOL[torch.float32]


def test_blocks_of_8_units_only_where_no_mma_has_k_8(interpret):
    for cell, kwargs, hidden, dtype in (("lstm", {}, 8, torch.float32), ("lstm", dict(proj_size=4), 32, torch.float32),
                                        ("gru", {}, 32, torch.float64)):
        ours, _ = make_pair(cell, 4, hidden, dtype, **kwargs)
        with persistrnn.pin_config(block_h=8), torch.no_grad(), pytest.raises(ValueError, match="block_h=8"):
            ours(torch.randn(2, 2, 4, dtype=dtype))
