"""Shared helpers: fresh random seeds, layer pairs (ours vs torch.nn in float64), tolerances; GPU
tests skipped without CUDA, and each given a timeout (PERSISTRNN_GPU_TEST_TIMEOUT)."""
import faulthandler
import os
import threading

import pytest
import torch
from torch import nn

import persistrnn

# Relative error ||out - ref|| / ||ref|| against torch.nn in float64 with the same weights.
# fp16/bf16: the state and accumulation are fp32, the tolerance covers operand/output rounding.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Every test draws fresh random inputs; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("PERSISTRNN_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"seed={seed} (replay: PERSISTRNN_TEST_SEED={seed})")
    return seed


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path_factory, monkeypatch):
    """Every test sees an empty tuned-table cache of its own, never the user's ~/.cache/persistrnn."""
    path = tmp_path_factory.mktemp("persistrnn-cache")
    monkeypatch.setenv("PERSISTRNN_CACHE_DIR", str(path))
    return path


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of every forward kernel launch (the launcher still runs)."""
    import persistrnn.layers.functional as functional
    calls = []
    real = functional.rnn_forward

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "rnn_forward", counting)
    return calls


@pytest.fixture
def interpret():
    with persistrnn.backend("interpret"):
        yield


def make_pair(cell, input_size, hidden_size, dtype=torch.float32, **kwargs):
    """Our layer in `dtype` and its torch.nn twin in float64 with exactly the same weights."""
    ours = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(input_size, hidden_size, dtype=dtype, **kwargs)
    ref = (nn.LSTM if cell == "lstm" else nn.GRU)(input_size, hidden_size, dtype=torch.float64, **kwargs)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def to64(value):
    """float64 copy of a tensor, a PackedSequence or a (h0, c0) tuple."""
    if value is None:
        return None
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return value._replace(data=value.data.double())
    if isinstance(value, tuple):
        return tuple(v.double() for v in value)
    return value.double()


def flat_outputs(result):
    """(output, h_n[, c_n]) as plain tensors."""
    output, hidden = result
    if isinstance(output, nn.utils.rnn.PackedSequence):
        output = output.data
    return (output, *hidden) if isinstance(hidden, tuple) else (output, hidden)


def assert_close_to_ref(ours, ref, input, hx=None, dtype=torch.float32):
    with torch.no_grad():
        got = flat_outputs(ours(input, hx))
        want = flat_outputs(ref(to64(input), to64(hx)))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        assert torch.isfinite(g).all()
        assert rel_err(g, w) <= TOL[dtype], f"relative error {rel_err(g, w):.3e} > {TOL[dtype]:.0e}"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- a timeout per GPU test ----
# A GPU test that hangs (a kernel that never ends, a host wait on it) must not take the whole run
# with it. Past the timeout its name and every thread's traceback are written to the terminal's
# stderr and the process exits: under pytest-xdist the worker dies and is replaced, and the run goes
# on (-v names the test); without xdist the run ends there. No pytest-timeout needed.
GPU_TIMEOUT_ENV = "PERSISTRNN_GPU_TEST_TIMEOUT"
GPU_TIMEOUT_S = 120.0
# faulthandler's own watchdog (a C thread, no GIL needed) fires this much later, should the timer
# thread never get the GIL (a C call holding it): then only the tracebacks are written
BACKSTOP_S = 10.0
_stderr_fd = []  # the terminal's stderr, duplicated before any test's output capture


def gpu_test_timeout():
    """Seconds a `gpu`-marked test may run, setup to teardown: $PERSISTRNN_GPU_TEST_TIMEOUT (default
    120; 0 or less: no timeout)."""
    value = os.environ.get(GPU_TIMEOUT_ENV, "").strip()
    try:
        return float(value) if value else GPU_TIMEOUT_S
    except ValueError:
        raise pytest.UsageError(f"{GPU_TIMEOUT_ENV}={value!r}: expected seconds") from None


def pytest_configure(config):
    _stderr_fd.append(os.dup(2))


def pytest_unconfigure(config):
    while _stderr_fd:
        os.close(_stderr_fd.pop())


def _timed_out(nodeid, seconds, fd):
    os.write(fd, f"\n+++ TIMEOUT: {nodeid} ran past {seconds:g} s ({GPU_TIMEOUT_ENV}); the tracebacks of its "
                 f"threads follow, then the process exits +++\n".encode())
    faulthandler.dump_traceback(file=fd, all_threads=True)
    os._exit(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Arm the timeout around a `gpu`-marked test that runs (not one skipped), disarm it after."""
    seconds = gpu_test_timeout() if "gpu" in item.keywords and not item.get_closest_marker("skip") else 0
    if seconds <= 0 or not _stderr_fd:
        yield
        return
    fd = _stderr_fd[-1]
    timer = threading.Timer(seconds, _timed_out, (item.nodeid, seconds, fd))
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + BACKSTOP_S, exit=True, file=fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        timer.cancel()
