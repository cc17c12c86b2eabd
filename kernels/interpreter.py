"""Run a compiled-mode `@triton.jit` kernel through the Triton interpreter, chosen at run time.

Triton picks interpreter or compiler when a function is decorated (TRITON_INTERPRET=1 before
import). The `interpret` backend must be selectable after import, so inside `interpreting()` we
make every JITFunction call behave as the interpreter's own device-function call would
(triton 3.6: `InterpretedFunction.__call__`), and set the interpret knob that constexpr
functions consult. Pinned to triton 3.6; tests/test_interpreter.py guards it.
"""
import contextlib
import threading

import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_lock = threading.RLock()
# keyed by id(): hashing a JITFunction walks its AST, which fails while tl is patched
_interpreted = {}


def interpreted(kernel: JITFunction) -> InterpretedFunction:
    fn = _interpreted.get(id(kernel))
    if fn is None:
        fn = _interpreted[id(kernel)] = InterpretedFunction(kernel.fn)
    return fn


def _call_interpreted(self, *args, **kwargs):
    return interpreted(self)(*args, **kwargs)


@contextlib.contextmanager
def interpreting():
    """Within this block, `interpreted(kernel)[grid](...)` runs `kernel` on CPU tensors."""
    with _lock:  # the interpreter patches triton.language globally: one launch at a time
        saved_call, saved_knob = JITFunction.__call__, triton.knobs.runtime.interpret
        JITFunction.__call__ = _call_interpreted
        triton.knobs.runtime.interpret = True
        try:
            yield
        finally:
            JITFunction.__call__ = saved_call
            triton.knobs.runtime.interpret = saved_knob
