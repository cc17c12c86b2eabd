"""One layer (all directions) as torch's differentiable ops, one time step after another: the path of
gradients the kernels cannot give.

The persistent backward kernel computes first-order gradients only. When autograd asks for more
(a backward with create_graph=True: gradient penalties, Hessian-vector products, gradgradcheck) or
hands the backward batched gradients (torch.func.vmap over it, gradcheck's batched-gradient check),
the layer's backward (autograd.py) recomputes its layer here from the saved inputs and
differentiates that instead. The equations are torch.nn's (docs of nn.LSTM and nn.GRU), with
per-row lengths: a row's steps past its length leave its state alone and output zeros, as a
packed sequence does.
"""
import torch
import torch.nn.functional as F

from .layer import direction_weights, time_major


def _lstm_step(x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr):
    i, f, g, o = (F.linear(x_t, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else F.linear(h, w_hr)), c


def _gru_step(x_t, h, w_ih, w_hh, b_ih, b_hh):
    x_r, x_z, x_n = F.linear(x_t, w_ih, b_ih).chunk(3, dim=1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def layer_reference(layer, x, lengths, h0, c0, weights):
    """(y, h_n, c_n) of one layer as autograd.run_layer returns them (c_n None for the GRU), from
    torch's ops. weights: torch.nn's flat list for this layer."""
    x_tb = time_major(x, layer.batch_first)
    T = x_tb.shape[0]
    ys, h_n, c_n = [], [], []
    for d, w in enumerate(direction_weights(weights, layer.num_directions, layer.has_bias, layer.has_proj)):
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if layer.has_bias else (None, None)
        w_hr = w[-1] if layer.has_proj else None
        h, c = h0[d], (c0[d] if layer.cell == "lstm" else None)
        out = [None] * T
        for t in (range(T) if d == 0 else reversed(range(T))):  # the reverse direction starts at each row's end
            valid = (lengths > t).unsqueeze(1)
            if layer.cell == "lstm":
                h_t, c_t = _lstm_step(x_tb[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
                c = torch.where(valid, c_t, c)
            else:
                h_t = _gru_step(x_tb[t], h, w_ih, w_hh, b_ih, b_hh)
            h = torch.where(valid, h_t, h)
            out[t] = torch.where(valid, h_t, torch.zeros_like(h_t))
        ys.append(torch.stack(out))
        h_n.append(h)
        c_n.append(c)
    y = time_major(torch.cat(ys, dim=2), layer.batch_first)
    return y, torch.stack(h_n), (torch.stack(c_n) if layer.cell == "lstm" else None)
