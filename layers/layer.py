"""One layer (all directions) on the persistent kernels, below autograd: its fixed description (Layer,
carried by the custom ops as a JSON spec), torch.nn's weights packed as the kernels take them, and
the forward and backward of the layer (the kernel launches and the whole-sequence GEMMs around them).
autograd.py wraps these in custom ops and an autograd.Function; reference.py computes the same
layer from torch's ops.
"""
import dataclasses
import functools
import json

import torch
import torch._dynamo
import torch.nn.functional as F

from ..configs import launch_waves
from ..kernels.backward import rnn_backward
from ..kernels.config import KernelConfig, state_dtype
from ..kernels.forward import SAVED, rnn_forward
from ..kernels.launcher import LaunchRefused
from .backend import cudnn_rnn_allows_tf32
from .dispatch import refused, usable_sms


@dataclasses.dataclass(frozen=True)
class Layer:
    """What is fixed about one layer call."""
    cell: str
    num_directions: int
    hidden_size: int
    real_hidden_size: int  # proj_size or hidden_size
    has_bias: bool
    has_proj: bool
    batch_first: bool
    config: KernelConfig
    interpret: bool
    allow_tf32: bool
    waves: tuple = None  # the kernels' launches (configs.launch_waves); None: the whole grid at once


@functools.lru_cache(maxsize=None)
def layer_spec(layer):
    return json.dumps(dataclasses.asdict(layer), sort_keys=True)


def describe_layer(cell, num_directions, hidden_size, proj_size, has_bias, batch_first, config, interpret, waves):
    """The spec (layer_spec) of one layer call, with torch's current TF32 setting for cuDNN's RNNs."""
    return layer_spec(Layer(cell=cell, num_directions=num_directions, hidden_size=hidden_size,
                            real_hidden_size=proj_size or hidden_size, has_bias=has_bias, has_proj=proj_size > 0,
                            batch_first=batch_first, config=config, interpret=interpret,
                            allow_tf32=cudnn_rnn_allows_tf32(), waves=waves))


# under torch.compile (the reference path, functional.rnn) a constant of the graph
@torch._dynamo.assume_constant_result
def layer_from_spec(spec):
    return _parse_spec(spec)


@functools.lru_cache(maxsize=None)
def _parse_spec(spec):
    fields = json.loads(spec)
    if fields["config"] is not None:
        fields["config"] = KernelConfig(**fields["config"])
    if fields["waves"] is not None:
        fields["waves"] = tuple(tuple(wave) for wave in fields["waves"])
    return Layer(**fields)


def _h_prev(y, h0, lengths, layer):
    """h_{t-1} of every step, in y's layout: y shifted one step back in each direction's own time
    order, h0 at each row's first step (the reverse direction's first is the row's last)."""
    R = layer.real_hidden_size
    h_prev = torch.zeros_like(y)
    y_tb, h_prev_tb = time_major(y, layer.batch_first), time_major(h_prev, layer.batch_first)
    rows = torch.arange(y_tb.shape[1], device=y.device)
    for d in range(layer.num_directions):
        cols = slice(d * R, (d + 1) * R)
        if d == 0:
            h_prev_tb[1:, :, cols] = y_tb[:-1, :, cols]
            h_prev_tb[0, :, cols] = h0[0]
        else:
            h_prev_tb[:-1, :, cols] = y_tb[1:, :, cols]
            h_prev_tb[lengths.long() - 1, rows, cols] = h0[1]
    return h_prev


def direction_weights(weights, num_directions, has_bias, has_proj):
    """One layer's flat weights (torch.nn's order: w_ih, w_hh[, b_ih, b_hh][, w_hr] per direction),
    one list per direction."""
    per_dir = 2 + 2 * has_bias + has_proj
    return [weights[d * per_dir:(d + 1) * per_dir] for d in range(num_directions)]


def layer_weights(cell, weights, num_directions, has_bias, has_proj, hidden_size):
    """Stack one layer's per-direction weights (direction_weights) into the kernel's layout:
    (w_ih, bias_x, w_hh, b_hn, w_hr); b_hn is None for the LSTM, w_hr None without proj_size."""
    dirs = direction_weights(weights, num_directions, has_bias, has_proj)
    H = hidden_size
    w_ih = torch.cat([w[0] for w in dirs])
    w_hh = torch.stack([w[1] for w in dirs]).contiguous()
    w_hr = torch.stack([w[-1] for w in dirs]).contiguous() if has_proj else None
    if not has_bias:
        b_hn = torch.zeros(num_directions, H, dtype=w_hh.dtype, device=w_hh.device) if cell == "gru" else None
        return w_ih, None, w_hh, b_hn, w_hr
    b_ih = torch.cat([w[2] for w in dirs])
    if cell == "lstm":
        bias_x = b_ih + torch.cat([w[3] for w in dirs])
        b_hn = None
    else:  # b_hr, b_hz fold into the input projection; b_hn stays inside r * (W_hn h + b_hn)
        bias_x = b_ih + torch.cat([torch.cat([w[3][:2 * H], torch.zeros_like(w[3][2 * H:])]) for w in dirs])
        b_hn = torch.stack([w[3][2 * H:] for w in dirs]).contiguous()
    return w_ih, bias_x, w_hh, b_hn, w_hr


def time_major(t, batch_first):
    """A (T, B, ...) view of a tensor in the layer's layout: batch-first views need no copy,
    the kernels take (t, b) strides."""
    return t.transpose(0, 1) if batch_first else t


def layer_forward(layer, x, h0, c0, lengths, weights, *, save):
    """One layer, all directions. x: (T, B, I), or (B, T, I) with layer.batch_first; h0 (D, B, R)
    and c0 (D, B, H). Returns (y, h_n, c_n, saved); saved is None unless `save`."""
    cell, D, H, R = layer.cell, layer.num_directions, layer.hidden_size, layer.real_hidden_size
    h0, c0 = h0.contiguous(), (None if c0 is None else c0.contiguous())  # the kernels read them densely
    w_ih, bias_x, w_hh, b_hn, w_hr = layer_weights(cell, weights, D, layer.has_bias, layer.has_proj, H)
    xproj = F.linear(x, w_ih, bias_x)
    y = x.new_empty(*x.shape[:2], D * R)
    hn = torch.empty_like(h0)
    cn = torch.empty_like(c0) if cell == "lstm" else None
    saved = x.new_empty(*x.shape[:2], D, SAVED[cell], H, dtype=state_dtype(x.dtype)) if save else None
    if y.shape[0] * y.shape[1] > 0:  # an empty batch has nothing to launch
        rnn_forward(cell, time_major(xproj, layer.batch_first), w_hh, b_hn, w_hr, h0, c0, lengths,
                    time_major(y, layer.batch_first), hn, cn,
                    saved=None if saved is None else time_major(saved, layer.batch_first),
                    config=layer.config, interpret=layer.interpret, allow_tf32=layer.allow_tf32, waves=layer.waves)
    return y, hn, cn, saved


def replanned(layer, batch, device):
    """The layer with its launches planned for `batch` rows on the SMs usable on `device` now
    (waves None where not even one batch tile's programs fit)."""
    return dataclasses.replace(layer, waves=launch_waves(layer.config, batch, layer.hidden_size, layer.num_directions,
                                                         usable_sms(device)))


def relaunching(run, layer, batch, device):
    """run(layer): one pass of a layer's launches. Where the driver refuses one (fewer SMs usable than
    its waves assume), learn from it (dispatch.refused) and run the pass again with the same config
    in more launches of fewer programs; LaunchRefused propagates where not even one batch tile's
    programs fit. Every launch rewrites all of its outputs."""
    while True:
        try:
            return run(layer)
        except LaunchRefused as error:
            refused(error)
            layer = replanned(layer, batch, device)
            if layer.waves is None:
                error.add_note("persistrnn: a compiled model keeps the plan it was traced with; compiled again "
                               "(after torch._dynamo.reset()), it plans for the SMs usable now")
                raise


def layer_backward(layer, x, lengths, h0, c0, y, saved, weights, needs, dy, dh_n, dc_n):
    """(dx, dh0, dc0, *weight gradients) of one layer from the backward kernel and whole-sequence
    GEMMs; needs: whether each is wanted (x, h0, c0, *weights); an unwanted one may be None. Raises
    LaunchRefused where not even one batch tile's programs fit now (relaunching)."""
    cell, D, H, R = layer.cell, layer.num_directions, layer.hidden_size, layer.real_hidden_size
    G = 4 if cell == "lstm" else 3
    w_ih, _, w_hh, _, w_hr = layer_weights(cell, weights, D, layer.has_bias, layer.has_proj, H)
    h0, c0 = h0.contiguous(), (None if c0 is None else c0.contiguous())  # the kernels read them densely
    # autograd materializes the gradients of unused outputs as zeros
    dh_n = dh_n.contiguous()
    if cell == "lstm":
        dc_n = dc_n.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dgates = x.new_empty(*x.shape[:2], D * G * H)
    dh_all = torch.empty_like(y) if layer.has_proj else None
    dh0 = h0.new_empty(h0.shape)
    dc0 = c0.new_empty(c0.shape) if cell == "lstm" else None
    if dgates.shape[0] * dgates.shape[1] > 0:
        bf = layer.batch_first

        def run(layer):
            rnn_backward(cell, time_major(dy, bf), dh_n, dc_n, time_major(saved, bf), time_major(y, bf), h0, c0,
                         w_hh, w_hr, lengths, time_major(dgates, bf),
                         None if dh_all is None else time_major(dh_all, bf), dh0, dc0,
                         config=layer.config, interpret=layer.interpret, allow_tf32=layer.allow_tf32,
                         waves=layer.waves)
        relaunching(run, layer, time_major(dgates, bf).shape[1], dy.device)

    rows = dgates.reshape(-1, D * G * H)  # one row per (t, b), in x's layout
    dx = (rows @ w_ih).reshape(x.shape) if needs[0] else None
    if not any(needs[3:]):  # frozen weights: no weight GEMMs
        return (dx, dh0, dc0, *(None for _ in weights))
    x_rows = x.reshape(-1, x.shape[-1])
    if cell == "gru":  # the n gate's h side: r * (W_hn h + b_hn)
        dgates_h = dgates.clone().view(*x.shape[:2], D, G, H)
        dgates_h[..., 2, :] *= saved[..., 0, :]
        rows_h = dgates_h.reshape(-1, D * G * H)
    else:
        rows_h = rows
    h_prev = _h_prev(y, h0, lengths, layer).reshape(-1, D * R)
    grads = []
    for d in range(D):
        gates = slice(d * G * H, (d + 1) * G * H)
        # one GEMM per direction: a custom op's outputs may not be views of one another
        grads += [rows[:, gates].t() @ x_rows, rows_h[:, gates].t() @ h_prev[:, d * R:(d + 1) * R]]
        if layer.has_bias:
            grads += [rows[:, gates].sum(0), rows_h[:, gates].sum(0)]
        if layer.has_proj:  # h_t = (o * tanh c_t) @ W_hr^T
            h_cell = (saved[..., d, 3, :] * torch.tanh(saved[..., d, 4, :])).reshape(-1, H).to(y.dtype)
            grads.append(dh_all.reshape(-1, D * R)[:, d * R:(d + 1) * R].t() @ h_cell)
    return (dx, dh0, dc0, *(g.to(w.dtype) for g, w in zip(grads, weights)))
