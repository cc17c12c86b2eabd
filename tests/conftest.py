"""Fixtures and hooks: fresh random seeds, an empty tuned-table cache per test; GPU tests skipped
without CUDA, and each given a timeout (PERSISTRNN_GPU_TEST_TIMEOUT). Helpers are in helpers.py."""
import faulthandler
import os
import threading

import pytest
import torch

import persistrnn

from helpers import GPU_TIMEOUT_ENV, gpu_test_timeout


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
    import persistrnn.layers.layer as layer
    calls = []
    real = layer.rnn_forward

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(layer, "rnn_forward", counting)
    return calls


@pytest.fixture
def interpret():
    with persistrnn.backend("interpret"):
        yield


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
# on (-v names the test); without xdist the run ends there. No pytest-timeout needed. How long a
# test may run: gpu_test_timeout() (helpers.py).
# faulthandler's own watchdog (a C thread, no GIL needed) fires this much later, should the timer
# thread never get the GIL (a C call holding it): then only the tracebacks are written
BACKSTOP_S = 10.0
_stderr_fd = []  # the terminal's stderr, duplicated before any test's output capture


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
