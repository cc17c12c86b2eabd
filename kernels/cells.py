"""Gate math of the LSTM and GRU cells, as `@triton.jit` helpers shared by the persistent kernels.

Gate order follows torch.nn: LSTM (i, f, g, o), GRU (r, z, n). Inputs are pre-activations in
the state dtype (fp32, or fp64 for reference runs); nothing here touches memory. The forward
cells also return the activations the backward cells take (the compiler drops them when unsaved).

FAST, where the dtype's tolerance allows it (fp16, bf16, fp32 with TF32): tanh is the hardware's
`tanh.approx.f32` (one MUFU.TANH; maximum relative error 2^-10.987 by the PTX ISA) and
sigmoid(x) = 0.5 * tanh(x / 2) + 0.5: one MUFU instead of ex2 and rcp. FAST = HARDWARE in compiled
kernels; the interpreter cannot run it, and runs EXACT, or EMULATED to measure the accuracy on CPU:
the exact value with its mantissa cut to 11 bits, an error of the documented size (below 2^-11,
always toward zero, the worst case for a sum).
"""
import triton
import triton.language as tl

LSTM = tl.constexpr(0)
GRU = tl.constexpr(1)

# FAST: how tanh and sigmoid are computed (module doc)
EXACT = tl.constexpr(0)
HARDWARE = tl.constexpr(1)
EMULATED = tl.constexpr(2)


@triton.jit
def _tanh_approx(x):
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x.to(tl.float32)], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _tanh_exact(x):
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
def _tanh_emulated(x):
    exact = _tanh_exact(x.to(tl.float32))
    return (exact.to(tl.uint32, bitcast=True) & 0xFFFFF000).to(tl.float32, bitcast=True)


@triton.jit
def tanh(x, FAST: tl.constexpr = EXACT):
    if FAST == HARDWARE:
        return _tanh_approx(x)
    elif FAST == EMULATED:
        return _tanh_emulated(x)
    else:
        return _tanh_exact(x)


@triton.jit
def sigmoid(x, FAST: tl.constexpr = EXACT):
    if FAST == EXACT:
        return tl.sigmoid(x)
    else:
        return 0.5 * tanh(0.5 * x, FAST) + 0.5


@triton.jit
def lstm_cell(pre_i, pre_f, pre_g, pre_o, c, FAST: tl.constexpr):
    """Returns (o * tanh(c_new), c_new, i, f, g, o) with c_new = f * c + i * g."""
    i = sigmoid(pre_i, FAST)
    f = sigmoid(pre_f, FAST)
    g = tanh(pre_g, FAST)
    o = sigmoid(pre_o, FAST)
    c_new = f * c + i * g
    return o * tanh(c_new, FAST), c_new, i, f, g, o


@triton.jit
def lstm_cell_backward(dh, dc, i, f, g, o, c, c_prev, FAST: tl.constexpr):
    """One step back through lstm_cell. dh, dc: gradients of its h and c outputs. Returns the
    gradients of the four pre-activations and of c_prev."""
    tanh_c = tanh(c, FAST)
    dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
    return (dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dc * i * (1.0 - g * g),
            dh * tanh_c * o * (1.0 - o), dc * f)


@triton.jit
def gru_cell(pre_r, pre_z, x_n, hh_n, h, FAST: tl.constexpr):
    """Returns (h_new, r, z, n): h_new = (1 - z) * n + z * h, n = tanh(x_n + r * hh_n);
    hh_n = W_hn h + b_hn stays apart."""
    r = sigmoid(pre_r, FAST)
    z = sigmoid(pre_z, FAST)
    n = tanh(x_n + r * hh_n, FAST)
    return n + z * (h - n), r, z, n


@triton.jit
def gru_cell_backward(dh, r, z, n, hh_n, h):
    """One step back through gru_cell. dh: gradient of h_new. Returns the gradients of pre_r,
    pre_z and x_n, and h's direct share dh * z (hh_n's gradient is that of x_n times r)."""
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    return d_n * hh_n * r * (1.0 - r), dh * (h - n) * z * (1.0 - z), d_n, dh * z
