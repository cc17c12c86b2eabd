"""A cooperative launch the driver refuses (fewer SMs usable than the device has: MPS limits, green
contexts, another process) is re-planned, not a crash: more launches of fewer programs, else torch.
The driver is stood in for by a launch that raises triton's error past a program limit."""
import warnings

import pytest
import torch
import triton

import persistrnn
import persistrnn.configs as configs
import persistrnn.kernels.launcher as launcher
import persistrnn.layers.dispatch as dispatch
from persistrnn.kernels.launcher import LaunchRefused

from helpers import TOL, _leaves, _loss, _with_grad, assert_close_to_ref, make_input, make_pair, rel_err, to64

# what triton 3.6's launcher raises when cuLaunchKernelEx fails with CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
TOO_LARGE = "Triton Error [CUDA]: too many blocks in cooperative launch"

# SPLIT 2 (block_h 16 of 32 units) x 3 batch tiles of 16 rows x 2 directions: 12 programs in one launch
SIZES = dict(input_size=4, hidden_size=32, bidirectional=True)
PIN = dict(block_h=16, block_b=16)
T, B = 3, 35


class Driver:
    """Refuses a cooperative launch of more than `limit` programs, as the driver does; records the
    launches made ((kernel, programs)) and the ones refused."""

    def __init__(self, limit):
        self.limit, self.launches, self.refused = limit, [], []


@pytest.fixture
def driver(monkeypatch):
    """A device that holds 132 SMs on paper and `driver.limit` programs at once, with nothing learned yet."""
    monkeypatch.setattr(dispatch, "_usable_sms", {})
    state = Driver(limit=132)
    real = launcher._start

    def start(kernel, grid, *args, what, **kwargs):
        programs = grid[0] * grid[1] * grid[2]
        if grid[1] > 1 and programs > state.limit:  # only a split launch is cooperative
            state.refused.append(programs)
            raise RuntimeError(TOO_LARGE)
        state.launches.append((what, programs))
        return real(kernel, grid, *args, what=what, **kwargs)

    monkeypatch.setattr(launcher, "_start", start)
    with persistrnn.backend("interpret"), persistrnn.pin_config(**PIN):
        yield state


def _refusal_warnings(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and "refused" in str(w.message)]


def test_refused_forward_runs_in_smaller_launches_and_later_calls_plan_so(driver):
    ours, ref = make_pair("lstm", dtype=torch.float64, **SIZES)
    driver.limit = 5
    x, hx = make_input("packed_unsorted_with_state", ours, T=T, B=B, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close_to_ref(ours, ref, x, hx, torch.float64)
    assert driver.refused[0] == 12 and driver.launches and all(n <= 5 for _, n in driver.launches)
    assert len(_refusal_warnings(caught)) == 1
    dispatched = ours.last_dispatch
    assert dispatched.path == "interpret" and len(dispatched.waves) > 1
    assert f"refused a cooperative launch of {driver.refused[-1]} programs" in dispatched.reason

    driver.launches, driver.refused = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close_to_ref(ours, ref, x, hx, torch.float64)
    assert driver.refused == [] and driver.launches and all(n <= 5 for _, n in driver.launches)
    assert _refusal_warnings(caught) == []
    assert ours.last_dispatch.waves == dispatched.waves and "SMs usable" in ours.last_dispatch.reason


@pytest.mark.parametrize("backward_limit", [3, 1], ids=["backward-in-smaller-launches", "backward-on-torch-ops"])
def test_training_step_with_refusals_matches_torch_nn(driver, backward_limit):
    """The forward is refused at 12 programs; the backward, with fewer SMs usable by then, re-plans its
    own launches, or where not one batch tile fits, takes the same gradients from torch's ops."""
    ours, ref = make_pair("gru", dtype=torch.float64, **SIZES)
    x, hx = make_input("packed_unsorted_with_state", ours, T=T, B=B, dtype=torch.float64)
    driver.limit = 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_ours, hx_ours = _with_grad(x, hx)
        result = ours(x_ours, hx_ours)
        weights = [torch.randn(o.shape, dtype=torch.float64) for o in (result[0].data, result[1])]
        driver.limit = backward_limit
        leaves = _leaves(x_ours, hx_ours) + list(ours.parameters())
        got = torch.autograd.grad(_loss(result, weights), leaves)
    assert ours.last_dispatch.path == "interpret" and len(_refusal_warnings(caught)) == 1
    backward = [n for what, n in driver.launches if what == "backward"]
    assert all(n <= backward_limit for n in backward) and bool(backward) == (backward_limit > 1)

    x_ref, hx_ref = _with_grad(to64(x), to64(hx))
    result_ref = ref(x_ref, hx_ref)
    want = torch.autograd.grad(_loss(result_ref, weights), _leaves(x_ref, hx_ref) + list(ref.parameters()))
    assert rel_err(result[0].data, result_ref[0].data) <= TOL[torch.float64]
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOL[torch.float64]


def test_fewer_sms_than_one_batch_tile_runs_torch(driver):
    ours, ref = make_pair("lstm", dtype=torch.float64, **SIZES)
    driver.limit = 1  # SPLIT = 2 programs must be resident at once
    x = torch.randn(T, B, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close_to_ref(ours, ref, x, dtype=torch.float64)
        assert ours.last_dispatch.path == "torch" and "refused a cooperative launch" in ours.last_dispatch.reason
        driver.refused = []
        assert_close_to_ref(ours, ref, x, dtype=torch.float64)  # planned for torch at once
    assert driver.refused == [] and driver.launches == [] and len(_refusal_warnings(caught)) == 1
    assert ours.last_dispatch.path == "torch" and "1 of its 132 SMs usable" in ours.last_dispatch.reason


@pytest.mark.parametrize("split,message", [(True, "Triton Error [CUDA]: an illegal memory access was encountered"),
                                           (False, TOO_LARGE)], ids=["other-error", "not-cooperative"])
def test_other_launch_errors_propagate_unchanged(driver, monkeypatch, split, message):
    error = RuntimeError(message)

    def start(kernel, grid, *args, **kwargs):
        raise error

    monkeypatch.setattr(launcher, "_start", start)
    ours, _ = make_pair("lstm", dtype=torch.float64, **SIZES)
    x = torch.randn(T, 2, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError) as raised, persistrnn.pin_config(block_h=16 if split else 32):
            ours(x)
    assert raised.value is error and dispatch._usable_sms == {} and _refusal_warnings(caught) == []


def test_tuned_tables_keep_the_devices_own_identity(driver, monkeypatch):
    """What was learned changes the launches, not which device's tuned table is asked."""
    asked = []
    monkeypatch.setattr(dispatch.cache, "table_entry", lambda key, layer, source: asked.append(key) or (None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dispatch.refused(LaunchRefused(12, torch.device("cpu")))
    with persistrnn.pin_config(block_h=None):  # unpinned: the tables are asked
        # float32 H = 64 is split-tier: more than one program holds
        planned = dispatch.plan("lstm", torch.device("cpu"), torch.float32, torch.float32, 64, 0, 400, 2, False)
    assert asked and all(key["sms"] == configs.DEFAULT_SMS for key in asked)
    assert planned.path == "interpret" and dispatch.usable_sms(torch.device("cpu")) == 11
    split = triton.cdiv(64, planned.config.block_h)
    assert split > 1 and max(tiles * split * dirs for _, tiles, _, dirs in planned.waves) <= 11


def test_compiled_model_relaunches_or_raises(driver):
    """Under torch.compile the plan is a constant of the graph: a refused launch runs the same config
    in smaller launches, and where not one batch tile fits it raises, never a wrong result."""
    torch._dynamo.reset()
    ours, ref = make_pair("lstm", dtype=torch.float64, **SIZES)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(T, B, 4, dtype=torch.float64)
    driver.limit = 5
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            y = compiled(x)[0]
            assert rel_err(y, ref(x)[0]) <= TOL[torch.float64] and all(n <= 5 for _, n in driver.launches)
            driver.limit = 1
            with pytest.raises(LaunchRefused):
                compiled(x)
        assert len(_refusal_warnings(caught)) == 1
    finally:
        torch._dynamo.reset()
