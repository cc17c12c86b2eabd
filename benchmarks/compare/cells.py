"""The two cells as torch computes them: gate equations, parameter counts, and the GRU hidden size
whose parameter count matches an LSTM's."""
import math

import torch.nn as nn

# torch.nn's equations (docs of nn.LSTM and nn.GRU), sigma the logistic sigmoid, * elementwise
EQUATIONS = {
    "lstm": [
        "i_t = sigma(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)",
        "f_t = sigma(W_if x_t + b_if + W_hf h_{t-1} + b_hf)",
        "g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)",
        "o_t = sigma(W_io x_t + b_io + W_ho h_{t-1} + b_ho)",
        "c_t = f_t * c_{t-1} + i_t * g_t",
        "h_t = o_t * tanh(c_t)",
    ],
    "gru": [
        "r_t = sigma(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)",
        "z_t = sigma(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)",
        "n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))",
        "h_t = (1 - z_t) * n_t + z_t * h_{t-1}",
    ],
}
# weight blocks per cell (rows of weight_ih / hidden_size); one of them is the candidate (g, n), not a gate
BLOCKS = {"lstm": 4, "gru": 3}


def parameter_formula(cell, input_size, hidden_size, bias=True):
    """One layer's parameters: LSTM 4H(I+H) + 8H, GRU 3H(I+H) + 6H (both biases)."""
    blocks = BLOCKS[cell]
    return blocks * hidden_size * (input_size + hidden_size) + (2 * blocks * hidden_size if bias else 0)


def module_parameters(cell, input_size, hidden_size, bias=True):
    """The parameter count of the real torch.nn module."""
    module = (nn.LSTM if cell == "lstm" else nn.GRU)(input_size, hidden_size, bias=bias)
    return sum(p.numel() for p in module.parameters())


def gates_of(module):
    """The gates of a torch.nn LSTM/GRU read off its weights: blocks of weight_ih_l0 minus the candidate."""
    return module.weight_ih_l0.shape[0] // module.hidden_size - 1


def matched_gru_hidden(input_size, lstm_hidden, bias=True):
    """The GRU hidden size whose parameter count is nearest the LSTM's: the positive root of
    3h^2 + (3I + 6)h = P (3I without biases), then the nearer of the integers around it."""
    target = parameter_formula("lstm", input_size, lstm_hidden, bias)
    b = 3 * input_size + (6 if bias else 0)
    root = (-b + math.sqrt(b * b + 12 * target)) / 6
    return min((math.floor(root), math.ceil(root)),
               key=lambda h: (abs(parameter_formula("gru", input_size, h, bias) - target), h))
