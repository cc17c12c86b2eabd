"""Gate math of the LSTM and GRU cells, as `@triton.jit` helpers shared by the persistent kernels.

Gate order follows torch.nn: LSTM (i, f, g, o), GRU (r, z, n). Inputs are pre-activations in
the state dtype (fp32, or fp64 for reference runs); nothing here touches memory. The forward
cells also return the activations the backward cells take (the compiler drops them when unsaved).
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
    """Returns (o * tanh(c_new), c_new, i, f, g, o) with c_new = f * c + i * g."""
    i = tl.sigmoid(pre_i)
    f = tl.sigmoid(pre_f)
    g = tanh(pre_g)
    o = tl.sigmoid(pre_o)
    c_new = f * c + i * g
    return o * tanh(c_new), c_new, i, f, g, o


@triton.jit
def lstm_cell_backward(dh, dc, i, f, g, o, c, c_prev):
    """One step back through lstm_cell. dh, dc: gradients of its h and c outputs. Returns the
    gradients of the four pre-activations and of c_prev."""
    tanh_c = tanh(c)
    dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
    return (dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dc * i * (1.0 - g * g),
            dh * tanh_c * o * (1.0 - o), dc * f)


@triton.jit
def gru_cell(pre_r, pre_z, x_n, hh_n, h):
    """Returns (h_new, r, z, n): h_new = (1 - z) * n + z * h, n = tanh(x_n + r * hh_n);
    hh_n = W_hn h + b_hn stays apart."""
    r = tl.sigmoid(pre_r)
    z = tl.sigmoid(pre_z)
    n = tanh(x_n + r * hh_n)
    return n + z * (h - n), r, z, n


@triton.jit
def gru_cell_backward(dh, r, z, n, hh_n, h):
    """One step back through gru_cell. dh: gradient of h_new. Returns the gradients of pre_r,
    pre_z and x_n, and h's direct share dh * z (hh_n's gradient is that of x_n times r)."""
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    return d_n * hh_n * r * (1.0 - r), dh * (h - n) * z * (1.0 - z), d_n, dh * z
