"""Which implementation runs a layer: `PERSISTRNN_BACKEND` and the `backend(name)` context manager.

auto       Triton kernels for CUDA tensors, PyTorch's native RNN for CPU tensors (default)
triton     Triton kernels, compiled (CUDA tensors only)
interpret  Triton kernels run by the Triton interpreter (CPU; how the tests run the real kernels)
torch      PyTorch's native implementation (reference, fallback)
"""
import contextlib
import contextvars
import os

import torch

BACKENDS = ("auto", "triton", "interpret", "torch")

_override = contextvars.ContextVar("persistrnn_backend", default=None)


def _validate(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown persistrnn backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    name = _override.get()
    if name is None:
        name = os.environ.get("PERSISTRNN_BACKEND", "auto") or "auto"
    return _validate(name)


@contextlib.contextmanager
def backend(name: str):
    """Run every persistrnn layer inside the block with backend `name`."""
    token = _override.set(_validate(name))
    try:
        yield
    finally:
        _override.reset(token)


def cudnn_rnn_allows_tf32():
    """Whether torch lets cuDNN's RNNs use TF32 for fp32: torch.backends.cudnn.rnn.fp32_precision
    where torch has it and it is set, else torch.backends.cudnn.allow_tf32 (reading the latter
    raises once the former API has been used)."""
    for flags in (getattr(torch.backends.cudnn, "rnn", None), torch.backends.cudnn):  # "none": ask the parent
        precision = getattr(flags, "fp32_precision", "none")
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return False
