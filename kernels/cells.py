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
    # The interpreter has no libdevice tanh. 2*sigmoid(2x) - 1 is accurate away from 0 but
    # cancels near it (fp32: 1e-5 relative at |x| ~ 3e-3); there its Taylor series, to x^9, is
    # within 1e-8 relative for |x| < 1/4. fp64 keeps the closed form (1e-16 absolute).
    closed = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    if x.dtype == tl.float64:
        return closed
    else:
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
        return tl.where(tl.abs(x) < 0.25, series, closed)


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
