"""What torch.nn's own RNN does under autocast, asked of torch itself rather than guessed.

torch's autocast op lists decide per device: on CUDA the cuDNN RNN runs in the autocast dtype;
on CPU (torch 2.13) the LSTM runs in bf16 and the GRU stays in fp32, and some paths return the
cell state in another dtype than the output (the LSTM with proj_size on CPU keeps c in fp32).
So the layer asks: it runs torch's RNN once on a tiny input with the same dtypes under the
current autocast state, and takes the dtypes of what comes back. Cached per combination.

Where torch's RNN cannot run (on CPU the LSTM's cast to bf16 happens at the oneDNN layer, and a
oneDNN without a bf16 LSTM primitive, as on CPUs without AVX-512, raises "could not create a
primitive": torch.nn itself fails there), the same call is traced with fake tensors instead:
torch takes the same path and casts, runs no kernel, and gives the same dtypes. If that fails
too, every result is assumed in the autocast dtype. Either way the layer warns once per
combination, naming what it assumed. Any other error of the probe is torch.nn's own error for
these dtypes, and the layer raises it as torch.nn does.
"""
import functools
import warnings

import torch
import torch._dynamo
from torch import _VF
from torch._subclasses.fake_tensor import FakeTensorMode


def enabled(device_type):
    """Whether autocast is on for this device type (a device type autocast does not know, such as
    "meta", has none: the layer then reports torch.nn's own errors)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


# torch.compile asks once, when it traces the layer (the answer is a constant of the graph)
@torch._dynamo.assume_constant_result
def torch_dtypes(cell, device_type, input_dtype, state_dtypes, weight_dtype, has_proj):
    """(output dtype, h_n dtype[, c_n dtype]) of torch.nn's `cell` on `device_type` under the
    current autocast state, for these input, state and weight dtypes."""
    return _probe(cell, device_type, input_dtype, state_dtypes, weight_dtype, has_proj,
                  torch.get_autocast_dtype(device_type))


@functools.lru_cache(maxsize=None)
def _probe(cell, device_type, input_dtype, state_dtypes, weight_dtype, has_proj, autocast_dtype):
    """_run's answer; where torch's RNN cannot run, the fallbacks of the module doc, with a warning."""
    args = cell, device_type, input_dtype, state_dtypes, weight_dtype, has_proj
    try:
        return _run(*args)
    except RuntimeError as error:
        if "could not create a primitive" not in str(error):
            raise  # torch.nn's own error for these dtypes
        cannot = f"torch's own {cell} cannot run under {device_type} autocast here ({str(error).splitlines()[0]})"
    try:
        with FakeTensorMode():
            dtypes = _run(*args)
        assumed = "the dtypes torch gives when the same call is traced without running"
    except Exception:
        dtypes = (autocast_dtype,) * (3 if cell == "lstm" else 2)
        assumed = f"every result in {autocast_dtype}, autocast's dtype for {device_type} (tracing the call failed too)"
    warnings.warn(f"persistrnn: {cannot}; the layer runs its kernels with {assumed}: "
                  f"{', '.join(str(d) for d in dtypes)}", RuntimeWarning)
    return dtypes


def _run(cell, device_type, input_dtype, state_dtypes, weight_dtype, has_proj):
    """torch's RNN once on a tiny zero input with these dtypes: the dtypes of its results."""
    device = torch.device(device_type)
    hidden, proj = 2, (1 if has_proj else 0)
    gates = 4 if cell == "lstm" else 3
    weights = [torch.zeros(gates * hidden, 1, device=device, dtype=weight_dtype),
               torch.zeros(gates * hidden, proj or hidden, device=device, dtype=weight_dtype),
               torch.zeros(gates * hidden, device=device, dtype=weight_dtype),
               torch.zeros(gates * hidden, device=device, dtype=weight_dtype)]
    if proj:
        weights.append(torch.zeros(proj, hidden, device=device, dtype=weight_dtype))
    x = torch.zeros(1, 1, 1, device=device, dtype=input_dtype)
    h_dtype = state_dtypes[0] if state_dtypes else input_dtype
    h0 = torch.zeros(1, 1, proj or hidden, device=device, dtype=h_dtype)
    with torch.no_grad():
        if cell == "lstm":
            c0 = torch.zeros(1, 1, hidden, device=device, dtype=state_dtypes[1] if state_dtypes else input_dtype)
            out, h, c = _VF.lstm(x, (h0, c0), weights, True, 1, 0.0, False, False, False)
            return out.dtype, h.dtype, c.dtype
        out, h = _VF.gru(x, h0, weights, True, 1, 0.0, False, False, False)
        return out.dtype, h.dtype
