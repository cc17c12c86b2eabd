"""The fast-math policy: which transcendentals (cells.py: MATH) a kernel in a dtype is compiled with,
and the interpreter's emulation of them (emulating_math, a context: accuracy checks on CPU)."""
import contextlib
import contextvars

import torch

from .cells import ACCURATE, APPROX, EXACT, HIGH, LOW, NONE

# the interpreter's stand-in for the hardware's transcendentals (cells.py, EMULATE)
_EMULATION = contextvars.ContextVar("persistrnn_emulated_math", default=NONE)


@contextlib.contextmanager
def emulating_math(direction=LOW):
    """Inside the block, interpreted kernels compute tanh and sigmoid as compiled ones would, with
    each hardware instruction replaced by the exact value moved by its error bound (cells.py:
    EMULATE, LOW toward zero or HIGH away from it), instead of exactly: accuracy checks on CPU."""
    if direction not in (LOW, HIGH):
        raise ValueError(f"emulating_math: direction must be cells.LOW or cells.HIGH, got {direction!r}")
    token = _EMULATION.set(direction)
    try:
        yield
    finally:
        _EMULATION.reset(token)


def math_mode(dtype, *, interpret, allow_tf32):
    """(cells.MATH, cells.EMULATE) for a kernel in `dtype`: APPROX for bf16 and fp32 with TF32 (their
    operands round to 8 and 10 bits), ACCURATE for fp16 (whose outputs round finer than tanh.approx's
    error), EXACT otherwise; the interpreter runs EXACT unless emulating_math."""
    if dtype == torch.bfloat16 or (dtype == torch.float32 and allow_tf32):
        math = APPROX
    elif dtype == torch.float16:
        math = ACCURATE
    else:
        return EXACT, NONE
    emulate = _EMULATION.get() if interpret else NONE
    if interpret and emulate == NONE:
        return EXACT, NONE
    return math, emulate
