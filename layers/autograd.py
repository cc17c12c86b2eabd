"""Training through the persistent kernels: one `torch.autograd.Function` per layer (all directions).

forward: the forward kernel with SAVE (per step gate activations and c, see kernels/forward.py).
backward: the backward kernel walks the sequence in reverse and returns the pre-activation
gradients of every step (dgates), dh0, dc0 (and dh_t with proj_size); then every weight, bias and
input gradient is one GEMM (or sum) over the whole sequence:
    dx = dgates @ W_ih            dW_ih = dgates^T x            db_ih = sum dgates
    dW_hh = dgates_h^T h_prev     db_hh = sum dgates_h          dW_hr = dh^T (o * tanh c)
with dgates_h = dgates for the LSTM, and for the GRU dgates with its n part times r (the n gate
sees W_hn h + b_hn through r).

Higher order: a backward asked to build a graph (create_graph=True), or handed batched gradients
(vmap over the backward), differentiates the layer recomputed from torch's ops instead
(reference.py): the kernels give first-order gradients only, and those two must be right too.
"""
import dataclasses

import torch

from ..kernels.backward import rnn_backward
from ..kernels.skeleton import KernelConfig
from .functional import layer_forward, layer_weights, time_major
from .reference import layer_reference


@dataclasses.dataclass(frozen=True)
class Layer:
    """What is fixed about one layer call (passed through autograd as a non-tensor argument)."""
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
    waves: tuple = None  # the kernels' launches (dispatch.launch_waves); None: the whole grid at once


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


def _batched(t):
    """Whether t is a batched tensor of vmap over the backward (torch.func's, or the legacy one that
    gradcheck's batched-gradient check uses)."""
    functorch = torch._C._functorch
    return t is not None and (functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t))


class PersistentLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, x, lengths, h0, c0, *weights):
        y, hn, cn, saved = layer_forward(layer, x, h0, c0, lengths, weights, save=True)
        ctx.layer = layer
        ctx.save_for_backward(x, lengths, h0, c0, y, saved, *weights)
        return (y, hn, cn) if layer.cell == "lstm" else (y, hn)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n=None):
        # the backward may be called under autocast; its GEMMs run in the layer's dtype, as the forward's
        with torch.autocast(dy.device.type, enabled=False):
            if torch.is_grad_enabled() or any(_batched(g) for g in (dy, dh_n, dc_n)):
                return PersistentLayer._backward_reference(ctx, dy, dh_n, dc_n)
            return PersistentLayer._backward(ctx, dy, dh_n, dc_n)

    @staticmethod
    def _backward_reference(ctx, dy, dh_n, dc_n):
        """The gradients of the layer recomputed with torch's ops from the saved inputs: a graph
        when one is being built (so second derivatives are right), and vmap-able."""
        x, lengths, h0, c0, _, _, *weights = ctx.saved_tensors
        inputs = {1: x, 3: h0, 4: c0, **{5 + i: w for i, w in enumerate(weights)}}
        wanted = [i for i, t in inputs.items() if t is not None and ctx.needs_input_grad[i]]
        # half precision recomputes in fp32, as the kernels carry their state (casts are differentiable)
        up = (lambda t: t if t is None or t.dtype not in (torch.float16, torch.bfloat16)  # noqa: E731
              else t.float())
        with torch.enable_grad():
            outputs = layer_reference(ctx.layer, up(x), lengths, up(h0), up(c0), [up(w) for w in weights])
        pairs = [(out, up(grad)) for out, grad in zip(outputs, (dy, dh_n, dc_n)) if out is not None]
        grads = torch.autograd.grad([out for out, _ in pairs], [inputs[i] for i in wanted],
                                    [grad for _, grad in pairs], create_graph=torch.is_grad_enabled(),
                                    allow_unused=True, materialize_grads=True)
        result = [None] * (5 + len(weights))
        for i, grad in zip(wanted, grads):
            result[i] = grad
        return tuple(result)

    @staticmethod
    def _backward(ctx, dy, dh_n, dc_n):
        layer = ctx.layer
        x, lengths, h0, c0, y, saved, *weights = ctx.saved_tensors
        cell, D, H, R = layer.cell, layer.num_directions, layer.hidden_size, layer.real_hidden_size
        G = 4 if cell == "lstm" else 3
        w_ih, _, w_hh, _, w_hr = layer_weights(cell, weights, D, layer.has_bias, layer.has_proj, H)
        # autograd materializes the gradients of unused outputs as zeros
        dh_n = dh_n.contiguous()
        if cell == "lstm":
            dc_n = dc_n.contiguous()
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dgates = x.new_empty(*x.shape[:2], D * G * H)
        dh_all = torch.empty_like(y) if layer.has_proj else None
        dh0 = torch.empty_like(h0)
        dc0 = torch.empty_like(c0) if cell == "lstm" else None
        if dgates.shape[0] * dgates.shape[1] > 0:
            bf = layer.batch_first
            rnn_backward(cell, time_major(dy, bf), dh_n, dc_n, time_major(saved, bf), time_major(y, bf), h0, c0,
                         w_hh, w_hr, lengths, time_major(dgates, bf),
                         None if dh_all is None else time_major(dh_all, bf), dh0, dc0,
                         config=layer.config, interpret=layer.interpret, allow_tf32=layer.allow_tf32,
                         waves=layer.waves)

        rows = dgates.reshape(-1, D * G * H)  # one row per (t, b), in x's layout
        dx = (rows @ w_ih).reshape(x.shape) if ctx.needs_input_grad[1] else None
        if not any(ctx.needs_input_grad[5:]):  # frozen weights: no weight GEMMs
            return (None, dx, None, dh0, dc0, *(None for _ in weights))
        dw_ih = rows.t() @ x.reshape(-1, x.shape[-1])
        db_ih = rows.sum(0)
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
            grads += [dw_ih[gates], rows_h[:, gates].t() @ h_prev[:, d * R:(d + 1) * R]]
            if layer.has_bias:
                grads += [db_ih[gates], rows_h[:, gates].sum(0)]
            if layer.has_proj:  # h_t = (o * tanh c_t) @ W_hr^T
                h_cell = (saved[..., d, 3, :] * torch.tanh(saved[..., d, 4, :])).reshape(-1, H).to(y.dtype)
                grads.append(dh_all.reshape(-1, D * R)[:, d * R:(d + 1) * R].t() @ h_cell)
        grads = [g.to(w.dtype) for g, w in zip(grads, weights)]
        return (None, dx, None, dh0, dc0, *grads)
