"""Speed and memory of one layer: forward and training-step time per time step (medians from
torch.utils.benchmark), and memory. On a GPU, persistrnn's layer (the kernels) and torch.nn
(cuDNN) side by side; on CPU, persistrnn's layer, which runs torch's native RNN there (the
interpreter's times would mean nothing), labelled as CPU figures, and torch.nn with oneDNN off:
torch's CPU path fuses the LSTM with oneDNN but runs the GRU cell by cell, so the default path's
GRU/LSTM time ratio measures the two implementations, and the oneDNN-off rows the same generic
path for both cells.

Memory: the bytes autograd saves for the backward in one training step (activations; measured with
saved-tensor hooks, on any device), and on a GPU the peak allocated during the step above what was
allocated before it."""
import contextlib

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

import persistrnn

MIN_RUN_SECONDS = 0.3  # per measurement: torch.utils.benchmark repeats blocks until this is spent


KINDS_GPU = ("persistrnn", "torch.nn")
KINDS_CPU = ("persistrnn", "torch.nn, oneDNN off")


def _layer(kind, cell, inputs, hidden, device):
    if kind == "persistrnn":
        cls = persistrnn.LSTM if cell == "lstm" else persistrnn.GRU
    else:
        cls = nn.LSTM if cell == "lstm" else nn.GRU
    return cls(inputs, hidden, device=device)


def _saved_bytes(layer, x):
    """Bytes of the tensors autograd saves for backward in one training forward (each storage once)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)[0]
    out.sum().backward()
    return sum(seen.values())


def measure(kind, cell, inputs, hidden, seq, batch, device):
    """{"forward_us_per_step", "train_us_per_step", "saved_bytes", "peak_bytes" (GPU) or None,
    "path_forward", "path_train" (persistrnn's last_dispatch.path, or "torch.nn")}: one layer of `kind`
    (KINDS_GPU or KINDS_CPU) at these sizes, medians."""
    # only switched off, so a user's oneDNN settings hold in the other rows
    off = kind.endswith("oneDNN off")
    with torch.backends.mkldnn.flags(enabled=False) if off else contextlib.nullcontext():
        return _measure(kind, cell, inputs, hidden, seq, batch, device)


def _measure(kind, cell, inputs, hidden, seq, batch, device):
    torch.manual_seed(0)
    layer = _layer(kind, cell, inputs, hidden, device)
    x = torch.randn(seq, batch, inputs, device=device)
    x_grad = x.clone().requires_grad_()

    def train_step():
        layer.zero_grad(set_to_none=True)
        layer(x_grad)[0].sum().backward()

    with torch.no_grad():
        layer(x)  # warm-up (on a GPU: compiles)
    train_step()
    with torch.no_grad():
        forward = Timer("layer(x)", globals=dict(layer=layer, x=x)).blocked_autorange(min_run_time=MIN_RUN_SECONDS)
    path_forward = getattr(layer, "last_dispatch", None)
    train = Timer("step()", globals=dict(step=train_step)).blocked_autorange(min_run_time=MIN_RUN_SECONDS)
    path_train = getattr(layer, "last_dispatch", None)
    peak = None
    if x.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    return {"kind": kind, "cell": cell, "hidden": hidden, "seq": seq, "batch": batch, "device": str(device),
            "forward_us_per_step": forward.median * 1e6 / seq, "train_us_per_step": train.median * 1e6 / seq,
            "saved_bytes": _saved_bytes(layer, x_grad), "peak_bytes": peak,
            "path_forward": path_forward.path if path_forward else "torch.nn",
            "path_train": path_train.path if path_train else "torch.nn"}
