"""`check(module, input, state=None)`: a persistrnn layer against its torch.nn twin, same weights."""
import copy

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..kernels.exchange import raise_if_failed
from .backend import backend, cudnn_rnn_allows_tf32, current_backend
from .convert import convert
from .rnn import GRU, LSTM

_TORCH_TWIN = {LSTM: nn.LSTM, GRU: nn.GRU}


def _torch_twin(module, dtype=None):
    twin = copy.deepcopy(module)
    twin.__class__ = _TORCH_TWIN.get(type(module), type(module))
    return twin if dtype is None else twin.to(dtype)


def _map(value, fn):
    if value is None:
        return None
    if isinstance(value, PackedSequence):
        return value._replace(data=fn(value.data))
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    return fn(value)


def _flatten(out):
    output, hidden = out
    if isinstance(output, PackedSequence):
        output = output.data
    names = ("output", "h_n", "c_n")
    values = (output, *hidden) if isinstance(hidden, tuple) else (output, hidden)
    return dict(zip(names, values))


def relative_error(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


@torch.no_grad()
def check(module, input, state=None):
    """Run the persistrnn layer `module` (an nn.LSTM/nn.GRU is converted on a copy) and its torch.nn
    twin on the same input and state, and return {"output", "h_n"[, "c_n"]: relative error}.
    On CUDA the twin is cuDNN in the same dtype; on CPU it is torch.nn in float64 and, unless a
    backend is selected, our side runs the kernels through the Triton interpreter."""
    ours = module if isinstance(module, (LSTM, GRU)) else convert(copy.deepcopy(module))
    if not isinstance(ours, (LSTM, GRU)):
        raise TypeError(f"check() takes an LSTM or GRU layer, got {type(module).__name__}")
    device = next(ours.parameters()).device
    name = current_backend()
    if name == "auto" and device.type == "cpu":
        name = "interpret"
    with backend(name):
        got = _flatten(ours(input, state))
    raise_if_failed(device)  # a check waits for the device anyway: a barrier timeout is an error here
    if device.type == "cuda":
        ref = _flatten(_torch_twin(ours)(input, state))
    else:
        to64 = lambda t: t.double()  # noqa: E731
        ref = _flatten(_torch_twin(ours, torch.float64)(_map(input, to64), _map(state, to64)))
    return {k: relative_error(got[k], ref[k]) for k in got}


# Relative error ||out - ref|| / ||ref|| a correct layer stays under, against torch.nn in float64 with
# the same weights (check() on CPU, and the tests). fp16/bf16: the state and accumulation are fp32,
# the tolerance covers operand and output rounding.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TF32_TOLERANCE = 5e-3  # fp32 where both sides may multiply in TF32 (cuDNN, on a GPU)


def tolerance(dtype, device):
    """Relative error a correct kernel stays under, against the reference check() uses."""
    # on CUDA both sides may use TF32 (torch.backends.cudnn.allow_tf32, on by default)
    if dtype == torch.float32 and torch.device(device).type == "cuda" and cudnn_rnn_allows_tf32():
        return TF32_TOLERANCE
    return TOLERANCE[dtype]
