"""Gate math of the LSTM and GRU cells, as `@triton.jit` helpers shared by the persistent kernels.

Gate order follows torch.nn: LSTM (i, f, g, o), GRU (r, z, n). Inputs are pre-activations in
the state dtype (fp32, or fp64 for reference runs); nothing here touches memory. The forward
cells also return the activations the backward cells take (the compiler drops them when unsaved).

MATH, how tanh and sigmoid are computed (fastmath.py: math_mode picks it per dtype):
- EXACT: the closed forms (fp64, fp32 without TF32, the interpreter).
- ACCURATE: on the hardware's ex2.approx and rcp.approx, two MUFU each: sigmoid within 2^-21
  relative, tanh = 2 sigmoid(2x) - 1 within 2^-20 absolute (fp16, whose outputs round to 2^-12,
  finer than tanh.approx's error).
- APPROX: the hardware's tanh.approx, one MUFU (2^-10.987 relative by the PTX ISA), and
  sigmoid(x) = 0.5 tanh(x / 2) + 0.5 (bf16, whose own rounding, 2^-9, is coarser; fp32 with TF32).
Whatever MATH says, the gate that carries the state over the steps (the LSTM's f, the GRU's z) is
never APPROX: c_t = f c_{t-1} + ... multiplies f's error into c at every step, so over a long
sequence an error of one sign compounds. memory_sigmoid computes it as 1 - sigmoid(-x) on ex2 and
rcp: the share forgotten, 1 - f, within 2^-21 relative, however close f is to 1.

EMULATE (interpreter only): the interpreter cannot run the hardware's instructions. NONE runs
them (compiled kernels); LOW and HIGH put in their place the exact value moved by the
instruction's error bound toward zero or away from it (never past 1 in magnitude): a constant
error of the largest size and one sign, the worst case for what a cell sums over steps.
"""
import triton
import triton.language as tl

LSTM = tl.constexpr(0)
GRU = tl.constexpr(1)

# MATH (module doc)
EXACT = tl.constexpr(0)
ACCURATE = tl.constexpr(1)
APPROX = tl.constexpr(2)
# EMULATE (module doc)
NONE = tl.constexpr(0)
LOW = tl.constexpr(1)
HIGH = tl.constexpr(2)

# error bounds: tanh.approx.f32 (PTX ISA); ex2.approx.ftz.f32 (2 ulp) and rcp.approx.ftz.f32 (1 ulp)
# with the scaling and the add around them, under 5 ulp of fp32 in all
APPROX_TANH_ERROR = tl.constexpr(2.0 ** -10.987)  # relative
ACCURATE_SIGMOID_ERROR = tl.constexpr(2.0 ** -21)  # relative
ACCURATE_TANH_ERROR = tl.constexpr(2.0 ** -20)  # absolute: 2 sigmoid(2x) - 1
MEMORY_SIGMOID_ERROR = tl.constexpr(2.0 ** -20)  # absolute: 1 - sigmoid(-x)


def mufu_per_element(cell, kernel, math):
    """The MUFU instructions one cell element takes in `kernel` ("forward" or "backward") under MATH:
    one per tanh.approx, two per ACCURATE transcendental and for the memory gate's sigmoid; None
    for EXACT (the compiler's own lowering)."""
    if math == EXACT:
        return None
    others = {("lstm", "forward"): 4, ("lstm", "backward"): 1, ("gru", "forward"): 2, ("gru", "backward"): 0}
    memory_gates = 1 if kernel == "forward" else 0  # the backward reads f and z saved
    return others[(cell, kernel)] * (1 if math == APPROX else 2) + 2 * memory_gates


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
def _sigmoid_ex2_rcp(x):
    """1 / (1 + 2^(-x log2 e)) on the hardware's ex2.approx and rcp.approx: two MUFU."""
    e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x.to(tl.float32) * -1.4426950408889634],
                                  dtype=tl.float32, is_pure=True, pack=1)
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _bounded(exact, RELATIVE: tl.constexpr, ABSOLUTE: tl.constexpr, EMULATE: tl.constexpr):
    """`exact` (|exact| <= 1) moved by its error bound toward zero (LOW) or away from it (HIGH)."""
    size = tl.abs(exact)
    if EMULATE == LOW:
        size = tl.maximum(size * (1.0 - RELATIVE) - ABSOLUTE, 0.0)
    else:
        size = tl.minimum(size * (1.0 + RELATIVE) + ABSOLUTE, 1.0)
    return tl.where(exact < 0, -size, size)


@triton.jit
def tanh(x, MATH: tl.constexpr = EXACT, EMULATE: tl.constexpr = NONE):
    if MATH == EXACT:
        return _tanh_exact(x)
    elif EMULATE == NONE:
        if MATH == APPROX:
            return _tanh_approx(x)
        else:
            return 2.0 * _sigmoid_ex2_rcp(2.0 * x) - 1.0
    elif MATH == APPROX:
        return _bounded(_tanh_exact(x.to(tl.float32)), APPROX_TANH_ERROR, 0.0, EMULATE)
    else:
        return _bounded(_tanh_exact(x.to(tl.float32)), 0.0, ACCURATE_TANH_ERROR, EMULATE)


@triton.jit
def sigmoid(x, MATH: tl.constexpr = EXACT, EMULATE: tl.constexpr = NONE):
    if MATH == EXACT:
        return tl.sigmoid(x)
    elif MATH == APPROX:
        return 0.5 * tanh(0.5 * x, MATH, EMULATE) + 0.5
    elif EMULATE == NONE:
        return _sigmoid_ex2_rcp(x)
    else:
        return _bounded(tl.sigmoid(x.to(tl.float32)), ACCURATE_SIGMOID_ERROR, 0.0, EMULATE)


@triton.jit
def memory_sigmoid(x, MATH: tl.constexpr, EMULATE: tl.constexpr):
    """sigmoid of the gate that carries the state over the steps: never APPROX (module doc)."""
    if MATH == EXACT:
        return tl.sigmoid(x)
    elif EMULATE == NONE:
        return 1.0 - _sigmoid_ex2_rcp(-x)
    else:
        return _bounded(tl.sigmoid(x.to(tl.float32)), 0.0, MEMORY_SIGMOID_ERROR, EMULATE)


@triton.jit
def lstm_cell(pre_i, pre_f, pre_g, pre_o, c, MATH: tl.constexpr, EMULATE: tl.constexpr):
    """Returns (o * tanh(c_new), c_new, i, f, g, o) with c_new = f * c + i * g."""
    i = sigmoid(pre_i, MATH, EMULATE)
    f = memory_sigmoid(pre_f, MATH, EMULATE)
    g = tanh(pre_g, MATH, EMULATE)
    o = sigmoid(pre_o, MATH, EMULATE)
    c_new = f * c + i * g
    return o * tanh(c_new, MATH, EMULATE), c_new, i, f, g, o


@triton.jit
def lstm_cell_backward(dh, dc, i, f, g, o, c, c_prev, MATH: tl.constexpr, EMULATE: tl.constexpr):
    """One step back through lstm_cell. dh, dc: gradients of its h and c outputs. Returns the
    gradients of the four pre-activations and of c_prev."""
    tanh_c = tanh(c, MATH, EMULATE)
    dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
    return (dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dc * i * (1.0 - g * g),
            dh * tanh_c * o * (1.0 - o), dc * f)


@triton.jit
def gru_cell(pre_r, pre_z, x_n, hh_n, h, MATH: tl.constexpr, EMULATE: tl.constexpr):
    """Returns (h_new, r, z, n): h_new = (1 - z) * n + z * h, n = tanh(x_n + r * hh_n);
    hh_n = W_hn h + b_hn stays apart."""
    r = sigmoid(pre_r, MATH, EMULATE)
    z = memory_sigmoid(pre_z, MATH, EMULATE)
    n = tanh(x_n + r * hh_n, MATH, EMULATE)
    return n + z * (h - n), r, z, n


@triton.jit
def gru_cell_backward(dh, r, z, n, hh_n, h):
    """One step back through gru_cell. dh: gradient of h_new. Returns the gradients of pre_r,
    pre_z and x_n, and h's direct share dh * z (hh_n's gradient is that of x_n times r)."""
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    return d_n * hh_n * r * (1.0 - r), dh * (h - n) * z * (1.0 - z), d_n, dh * z
