"""Host side of a multi-layer, possibly bidirectional LSTM/GRU on the persistent kernels.

Mirrors `torch._VF.lstm / gru`: takes the (already validated) input, state and torch.nn's flat
weight list, and returns (output, h_n[, c_n]). Per layer: one GEMM for the input projection of
every step and both directions, then one kernel launch for the whole time loop (layer.py). Each
layer runs through autograd.run_layer (an autograd.Function in eager mode, the custom op
`persistrnn::layer_forward` under torch.compile and vmap): when autograd needs gradients it saves
for the backward kernel; otherwise it saves nothing.
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .autograd import run_layer
from .layer import layer_from_spec
from .reference import layer_reference


def rnn(cell, input, batch_sizes, hx, flat_weights, *, has_bias, num_layers, dropout, training,
        bidirectional, batch_first, hidden_size, proj_size, spec, grad_needed=False, reference=False):
    """input: (T, B, I) ((B, T, I) if batch_first), or packed data (N, I) with batch_sizes.
    hx: h0 (L*D, B, R), or (h0, c0) for the LSTM. Returns (output, h_n) or (output, (h_n, c_n)).
    spec: every layer's fixed description (layer.layer_spec: kernel config, launches, interpreter).
    grad_needed: run each layer through autograd (saving for, and running, the backward kernel).
    reference: run each layer as torch's ops step by step (reference.py), as under torch.func transforms."""
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
