"""Gate math of the LSTM and GRU cells, as `@triton.jit` helpers shared by the persistent kernels.

Gate order follows torch.nn: LSTM (i, f, g, o), GRU (r, z, n). Inputs are pre-activations in
the state dtype (fp32, or fp64 for reference runs); nothing here touches memory.
"""
import triton
import triton.language as tl

LSTM = tl.constexpr(0)
GRU = tl.constexpr(1)


@triton.jit
def tanh(x):
    # the interpreter has no libdevice tanh; this form is exact to a few ulp away from 0
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def lstm_cell(pre_i, pre_f, pre_g, pre_o, c):
    """Returns (o * tanh(c_new), c_new) with c_new = f * c + i * g."""
    c_new = tl.sigmoid(pre_f) * c + tl.sigmoid(pre_i) * tanh(pre_g)
    return tl.sigmoid(pre_o) * tanh(c_new), c_new


@triton.jit
def gru_cell(pre_r, pre_z, x_n, hh_n, h):
    """h_new = (1 - z) * n + z * h, n = tanh(x_n + r * hh_n); hh_n = W_hn h + b_hn stays apart."""
    r = tl.sigmoid(pre_r)
    z = tl.sigmoid(pre_z)
    n = tanh(x_n + r * hh_n)
    return n + z * (h - n)
