"""The GPU tests' harness on CPU: the per-test timeout of `gpu`-marked tests (tests/conftest.py).

A pytest run in a temporary folder whose conftest takes the timeout hooks from tests/conftest.py
and not its skip of `gpu` tests without CUDA: the tiny tests there are `gpu`-marked but need no
GPU, so they run here and the timeout is what is tested."""
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CONFTEST = os.path.join(HERE, "conftest.py")

HARNESS = f"""
import importlib.util
import sys
sys.path.insert(0, {HERE!r})  # tests/conftest.py imports from tests/helpers.py
spec = importlib.util.spec_from_file_location("persistrnn_tests_conftest", {CONFTEST!r})
ours = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ours)
ours.BACKSTOP_S = {{backstop}}
# the timeout's hooks only: not pytest_collection_modifyitems, which skips gpu tests without CUDA
pytest_configure, pytest_unconfigure = ours.pytest_configure, ours.pytest_unconfigure
pytest_runtest_protocol = ours.pytest_runtest_protocol
"""

TESTS = """
import re
import time

import pytest


@pytest.mark.gpu
def test_quick():
    pass


def test_not_gpu_marked_may_take_longer():
    time.sleep(2.5)  # past the 1 s timeout: no timeout applies here, nor one left armed by test_quick


@pytest.mark.gpu
def test_{name}():
    {body}


@pytest.mark.gpu
def test_never_reached():
    pass
"""


def _start(tmp_path, name, body, backstop):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "conftest.py").write_text(HARNESS.format(backstop=backstop))
    (folder / "test_hang.py").write_text(TESTS.format(name=name, body=body))
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: a gpu test\n")
    env = dict(os.environ, PERSISTRNN_GPU_TEST_TIMEOUT="1")
    return time.monotonic(), subprocess.Popen(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_hang.py"], cwd=folder, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_hung_gpu_test_prints_its_name_and_traceback_and_exits(tmp_path):
    """Sleeping (the GIL free: a host wait on a kernel), the timer names the test and dumps the
    tracebacks at 1 s; holding the GIL (a C call that never returns), faulthandler's watchdog
    dumps them BACKSTOP_S later. Either way the process exits: no test after it runs."""
    runs = {"sleeps": _start(tmp_path, "sleeps", "time.sleep(60)", backstop=30),
            "holds_the_gil": _start(tmp_path, "holds_the_gil", "re.match(r'(a+)+$', 'a' * 64 + 'b')", backstop=1)}
    for name, (start, proc) in runs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name}: the run did not stop at its timeout")
        wall = time.monotonic() - start
        assert proc.returncode == 1, (name, out, err)
        assert "test_quick PASSED" in out and "test_not_gpu_marked_may_take_longer PASSED" in out, (name, out, err)
        assert "test_never_reached" not in out and "passed" not in out.splitlines()[-1], (name, out)
        assert f"in test_{name}" in err, (name, err)  # the hung test's frame in the traceback
        if name == "sleeps":
            assert f"+++ TIMEOUT: test_hang.py::test_{name} ran past 1 s (PERSISTRNN_GPU_TEST_TIMEOUT)" in err, err
            assert wall < 30, wall  # the timer, not the backstop at 31 s
        else:
            assert "Timeout (0:00:02)!" in err, err  # faulthandler's watchdog: 1 s + BACKSTOP_S 1 s


def test_the_timeout_is_read_from_the_environment(monkeypatch):
    import helpers
    monkeypatch.delenv("PERSISTRNN_GPU_TEST_TIMEOUT", raising=False)
    assert helpers.gpu_test_timeout() == 120
    monkeypatch.setenv("PERSISTRNN_GPU_TEST_TIMEOUT", "7.5")
    assert helpers.gpu_test_timeout() == 7.5
    monkeypatch.setenv("PERSISTRNN_GPU_TEST_TIMEOUT", "soon")
    with pytest.raises(pytest.UsageError, match="expected seconds"):
        helpers.gpu_test_timeout()
