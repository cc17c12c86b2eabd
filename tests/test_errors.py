"""Bad input gets torch.nn's error, in torch.nn's words, on the kernel path too."""
import pytest
import torch

import persistrnn

from helpers import make_pair


def torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


def both_raise_the_same(cell, call, **kwargs):
    """Run `call(module)` on our layer (interpreter backend) and on torch.nn: same type, same words."""
    ours, ref = make_pair(cell, 4, 8, torch.float32, **kwargs)
    ref = ref.float()
    want = torch_error(lambda: call(ref))
    with persistrnn.backend("interpret"):
        got = torch_error(lambda: call(ours))
    assert got == want
    return got


X = torch.randn(3, 2, 4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_input_size_mismatch(cell):
    _, msg = both_raise_the_same(cell, lambda m: m(torch.randn(3, 2, 5)))
    assert "input.size(-1) must be equal to input_size" in msg


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [(3,), (3, 2, 4, 1)])
def test_wrong_number_of_dimensions(cell, shape):
    _, msg = both_raise_the_same(cell, lambda m: m(torch.randn(*shape)))
    assert "Expected input to be 2D or 3D" in msg


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_input_dtype_differs_from_weights(cell):
    _, msg = both_raise_the_same(cell, lambda m: m(X.double()))
    assert "does not match weight dtype" in msg


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_empty_sequence(cell):
    _, msg = both_raise_the_same(cell, lambda m: m(torch.randn(0, 2, 4)))
    assert "sequence length to be larger than 0" in msg


def test_lstm_state_shapes():
    good = torch.zeros(1, 2, 8)
    _, msg = both_raise_the_same("lstm", lambda m: m(X, (torch.zeros(1, 3, 8), good)))
    assert msg == "Expected hidden[0] size (1, 2, 8), got [1, 3, 8]"
    _, msg = both_raise_the_same("lstm", lambda m: m(X, (good, torch.zeros(2, 2, 8))))
    assert msg == "Expected hidden[1] size (1, 2, 8), got [2, 2, 8]"
    _, msg = both_raise_the_same("lstm", lambda m: m(X, (torch.zeros(2, 8), good)))
    assert "hx and cx should also be 3-D" in msg
    _, msg = both_raise_the_same("lstm", lambda m: m(X[:, 0], (good, good)))
    assert "hx and cx should also be 2-D" in msg
    _, msg = both_raise_the_same("lstm", lambda m: m(X, (good, good)), proj_size=3)
    assert msg == "Expected hidden[0] size (1, 2, 3), got [1, 2, 8]"


def test_gru_state_shapes():
    _, msg = both_raise_the_same("gru", lambda m: m(X, torch.zeros(2, 2, 8)))
    assert msg == "Expected hidden size (1, 2, 8), got [2, 2, 8]"
    _, msg = both_raise_the_same("gru", lambda m: m(X, torch.zeros(2, 8)))
    assert "hx should also be 3-D" in msg
    _, msg = both_raise_the_same("gru", lambda m: m(X[:, 0], torch.zeros(1, 2, 8)))
    assert "hx should also be 2-D" in msg


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_state_dtype_differs_from_input(cell):
    """torch.nn's CPU error here is an internal one; ours names the tensors as cuDNN's does."""
    ours, _ = make_pair(cell, 4, 8, torch.float32)
    h = torch.zeros(1, 2, 8, dtype=torch.float64)
    state = (h, torch.zeros(1, 2, 8)) if cell == "lstm" else h
    for name in ("interpret", "torch"):
        with persistrnn.backend(name), pytest.raises(RuntimeError, match="Input and hidden tensors are not the "
                                                                         "same dtype"):
            ours(X, state)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_devices_differ(cell):
    ours, ref = make_pair(cell, 4, 8, torch.float32)
    h = torch.zeros(1, 2, 8, device="meta")
    state = (h, torch.zeros(1, 2, 8)) if cell == "lstm" else h
    with persistrnn.backend("interpret"):
        with pytest.raises(RuntimeError, match="Input and hidden tensors are not at the same device"):
            ours(X, state)
        with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
            ours(X.to("meta"))
    # torch.nn's words for the same two mistakes
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
        ref.float()(X.to("meta"))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown persistrnn backend"):
        with persistrnn.backend("cuda"):
            pass


def test_triton_backend_on_cpu_tensors_says_so():
    ours, _ = make_pair("lstm", 4, 8, torch.float32)
    with persistrnn.backend("triton"), pytest.raises(RuntimeError, match="needs CUDA tensors"), torch.no_grad():
        ours(X)
