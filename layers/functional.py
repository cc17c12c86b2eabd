"""Host side of a multi-layer, possibly bidirectional LSTM/GRU on the persistent kernels.

Mirrors `torch._VF.lstm / gru`: takes the (already validated) input, state and torch.nn's flat
weight list, and returns (output, h_n[, c_n]). Per layer: one GEMM for the input projection of
every step and both directions, then one kernel launch for the whole time loop. Each layer runs
through autograd.run_layer (an autograd.Function in eager mode, the custom op
`persistrnn::layer_forward` under torch.compile and vmap): when autograd needs gradients it saves
for the backward kernel; otherwise it saves nothing.
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..kernels.forward import SAVED, rnn_forward
from ..kernels.skeleton import state_dtype


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


def rnn(cell, input, batch_sizes, hx, flat_weights, *, has_bias, num_layers, dropout, training,
        bidirectional, batch_first, hidden_size, proj_size, spec, grad_needed=False, reference=False):
    """input: (T, B, I) ((B, T, I) if batch_first), or packed data (N, I) with batch_sizes.
    hx: h0 (L*D, B, R), or (h0, c0) for the LSTM. Returns (output, h_n) or (output, (h_n, c_n)).
    spec: every layer's fixed description (autograd.layer_spec: kernel config, launches, interpreter).
    grad_needed: run each layer through autograd (saving for, and running, the backward kernel).
    reference: run each layer as torch's ops step by step (reference.py), as under torch.func transforms."""
    from .autograd import layer_from_spec, run_layer
    from .reference import layer_reference

    D = 2 if bidirectional else 1
    is_lstm = cell == "lstm"
    h0_all, c0_all = (hx if is_lstm else (hx, None))

    if batch_sizes is not None:  # packed: run padded, in the packed (sorted) batch order
        input, host_lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
        batch_first = False
        # a copy from host memory (torch.nn keeps batch_sizes there): packed input is not graph-capturable
        lengths = host_lengths.to(device=input.device, dtype=torch.int32)
    else:
        T = input.shape[1 if batch_first else 0]
        B = input.shape[0 if batch_first else 1]
        lengths = torch.full((B,), T, dtype=torch.int32, device=input.device)  # a fill on the device, no copy
    if input.shape[1 if batch_first else 0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    per_layer = D * (2 + 2 * has_bias + (proj_size > 0))

    layer_input = input
    h_n, c_n = [], []
    for index in range(num_layers):
        weights = flat_weights[index * per_layer:(index + 1) * per_layer]
        h0 = h0_all[index * D:(index + 1) * D]
        c0 = c0_all[index * D:(index + 1) * D] if is_lstm else None
        if reference:
            y, hn, cn = layer_reference(layer_from_spec(spec), layer_input, lengths, h0, c0, weights)
        else:
            y, hn, cn = run_layer(spec, layer_input, lengths, h0, c0, weights, save=grad_needed)
        h_n.append(hn)
        c_n.append(cn)
        layer_input = y
        if dropout > 0 and training and index < num_layers - 1:
            layer_input = F.dropout(y, p=dropout, training=True)

    output = y  # no dropout after the last layer
    if batch_sizes is not None:
        output = pack_padded_sequence(output, host_lengths, enforce_sorted=True).data
    h_n = torch.cat(h_n)
    return (output, (h_n, torch.cat(c_n))) if is_lstm else (output, h_n)
