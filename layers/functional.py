"""Host side of a multi-layer, possibly bidirectional LSTM/GRU forward on the persistent kernels.

Mirrors `torch._VF.lstm / gru`: takes the (already validated) input, state and torch.nn's flat
weight list, and returns (output, h_n[, c_n]). Per layer: one GEMM for the input projection of
every step and both directions, then one kernel launch for the whole time loop.
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..kernels.forward import rnn_forward

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


def _layer_weights(cell, flat_weights, layer, num_directions, has_bias, has_proj, hidden_size):
    """Stack one layer's per-direction weights into the kernel's layout."""
    per_dir = 2 + 2 * has_bias + has_proj
    dirs = [flat_weights[(layer * num_directions + d) * per_dir:(layer * num_directions + d + 1) * per_dir]
            for d in range(num_directions)]
    H = hidden_size
    w_ih = torch.cat([w[0] for w in dirs])
    w_hh = torch.stack([w[1] for w in dirs])
    w_hr = torch.stack([w[-1] for w in dirs]) if has_proj else None
    if not has_bias:
        return w_ih, None, w_hh, torch.zeros(num_directions, H, dtype=w_hh.dtype, device=w_hh.device), w_hr
    b_ih = torch.cat([w[2] for w in dirs])
    if cell == "lstm":
        bias_x = b_ih + torch.cat([w[3] for w in dirs])
        b_hn = w_hh  # unused by the LSTM kernel
    else:  # b_hr, b_hz fold into the input projection; b_hn stays inside r * (W_hn h + b_hn)
        bias_x = b_ih + torch.cat([torch.cat([w[3][:2 * H], torch.zeros_like(w[3][2 * H:])]) for w in dirs])
        b_hn = torch.stack([w[3][2 * H:] for w in dirs])
    return w_ih, bias_x, w_hh, b_hn, w_hr


def rnn(cell, input, batch_sizes, hx, flat_weights, *, has_bias, num_layers, dropout, training,
        bidirectional, batch_first, hidden_size, proj_size, config, interpret):
    """input: (T, B, I) ((B, T, I) if batch_first), or packed data (N, I) with batch_sizes.
    hx: h0 (L*D, B, R), or (h0, c0) for the LSTM. Returns (output, h_n) or (output, (h_n, c_n))."""
    D = 2 if bidirectional else 1
    H = hidden_size
    R = proj_size or hidden_size
    is_lstm = cell == "lstm"
    h0_all, c0_all = (hx if is_lstm else (hx, None))

    if batch_sizes is not None:  # packed: run padded, in the packed (sorted) batch order
        input, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
        time_major = True
    else:
        time_major = not batch_first
        T = input.shape[0 if time_major else 1]
        B = input.shape[1 if time_major else 0]
        lengths = torch.full((B,), T, dtype=torch.int32)
    if (input.shape[0] if time_major else input.shape[1]) == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    lengths = lengths.to(device=input.device, dtype=torch.int32)

    layer_input = input
    h_n, c_n = [], []
    for layer in range(num_layers):
        w_ih, bias_x, w_hh, b_hn, w_hr = _layer_weights(cell, flat_weights, layer, D, has_bias,
                                                        proj_size > 0, H)
        xproj = F.linear(layer_input, w_ih, bias_x)
        y = torch.empty(*layer_input.shape[:2], D * R, dtype=input.dtype, device=input.device)
        if not time_major:  # the kernel takes (t, b) strides: batch-first views need no copy
            xproj_tb, y_tb = xproj.transpose(0, 1), y.transpose(0, 1)
        else:
            xproj_tb, y_tb = xproj, y
        h0 = h0_all[layer * D:(layer + 1) * D].contiguous()
        c0 = c0_all[layer * D:(layer + 1) * D].contiguous() if is_lstm else h0
        hn = torch.empty_like(h0)
        cn = torch.empty_like(c0) if is_lstm else hn
        if y_tb.shape[1] > 0:  # an empty batch has nothing to launch
            rnn_forward(cell, xproj_tb, w_hh.contiguous(), b_hn.contiguous(), w_hr, h0, c0, lengths,
                        y_tb, hn, cn, block_b=config.block_b, block_h=config.block_h,
                        block_r=config.block_r, num_warps=config.num_warps,
                        num_stages=config.num_stages, interpret=interpret,
                        allow_tf32=cudnn_rnn_allows_tf32())
        h_n.append(hn)
        c_n.append(cn)
        layer_input = y
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(y, p=dropout, training=True)

    output = y  # no dropout after the last layer
    if batch_sizes is not None:
        output = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True).data
    h_n = torch.cat(h_n)
    return (output, (h_n, torch.cat(c_n))) if is_lstm else (output, h_n)
