"""Run a compiled-mode `@triton.jit` kernel through the Triton interpreter, chosen at run time.

Triton picks interpreter or compiler when a function is decorated (TRITON_INTERPRET=1 before
import). The `interpret` backend must be selectable after import, so inside `interpreting()` we
make every JITFunction call behave as the interpreter's own device-function call would
(triton 3.6: `InterpretedFunction.__call__`), and set the interpret knob that constexpr
functions consult. Pinned to triton 3.6; tests/test_interpreter.py guards it.

The stock interpreter runs a grid's programs one after another, so a program that waits at a
barrier for another would wait forever. `interpreted(kernel, concurrent=True)` runs every program
of the grid in its own thread instead, with a thread-local program id; a spinning atomic poll
yields the GIL, the wait for all programs is bounded, and an error is re-raised with the id of
the program that raised it.
"""
import contextlib
import functools
import inspect
import math
import threading
import time

import numpy as np
import triton
import triton.language as tl  # noqa: F401  (the interpreter patches tl through our globals)
from triton.runtime.interpreter import (GridExecutor, InterpretedFunction, InterpreterBuilder, TensorHandle,
                                        interpreter_builder)
from triton.runtime.jit import JITFunction

_lock = threading.RLock()
# keyed by id(): hashing a JITFunction walks its AST, which fails while tl is patched
_interpreted = {}


def interpreted(kernel: JITFunction, concurrent=False, timeout=600.0):
    """`kernel` as the interpreter runs it: `interpreted(kernel)[grid](*args)` inside `interpreting()`.
    concurrent=True runs the grid's programs at the same time (see the module doc)."""
    fn = _interpreted.get(id(kernel))
    if fn is None:
        fn = _interpreted[id(kernel)] = InterpretedFunction(kernel.fn)
    return _ConcurrentLauncher(fn, timeout) if concurrent else fn


_program = threading.local()


def _thread_program_id(self, axis):
    idx = getattr(_program, "idx", None) or self.grid_idx
    return TensorHandle(np.array([idx[axis]], dtype=np.int32), tl.int32)


def _yielding(atomic):
    @functools.wraps(atomic)
    def call(self, *args, **kwargs):
        result = atomic(self, *args, **kwargs)
        time.sleep(0)  # let the program we may be waiting for run
        return result
    return call


class _ConcurrentLauncher:
    def __init__(self, fn: InterpretedFunction, timeout):
        self.fn, self.timeout = fn, timeout

    def __getitem__(self, grid):
        return functools.partial(self._launch, tuple(grid) + (1,) * (3 - len(grid)))

    def _launch(self, grid, *args, **kwargs):
        body = self.fn.rewrite()
        n_programs = math.prod(grid)
        threads, errors, stuck = [], {}, []

        def run(idx, program_args):
            _program.idx = idx
            try:
                body(**program_args)
            except BaseException as exc:  # noqa: BLE001 - re-raised below with the program id
                errors[idx] = exc

        # GridExecutor calls this once per program (in grid order, with the arguments converted);
        # each call starts a thread, and the last one waits for them all.
        @functools.wraps(body)
        def start_program(**program_args):
            idx = interpreter_builder.grid_idx  # set by GridExecutor for this program
            thread = threading.Thread(target=run, args=(idx, program_args), daemon=True)
            threads.append((idx, thread))
            thread.start()
            if len(threads) == n_programs:
                deadline = time.monotonic() + self.timeout
                for _, t in threads:
                    t.join(max(0.0, deadline - time.monotonic()))
                stuck.extend(i for i, t in threads if t.is_alive())

        start_program.__signature__ = inspect.signature(body)
        saved = InterpreterBuilder.create_get_program_id, InterpreterBuilder.create_atomic_rmw
        InterpreterBuilder.create_get_program_id = _thread_program_id
        InterpreterBuilder.create_atomic_rmw = _yielding(saved[1])
        try:
            GridExecutor(start_program, self.fn.arg_names, grid)(*args, **kwargs)
        finally:
            InterpreterBuilder.create_get_program_id, InterpreterBuilder.create_atomic_rmw = saved
        if stuck:
            raise TimeoutError(f"interpreted programs {stuck} did not finish within {self.timeout} s")
        for idx, exc in sorted(errors.items()):
            raise RuntimeError(f"interpreted program {idx} failed: {exc!r}") from exc


def _call_interpreted(self, *args, **kwargs):
    return interpreted(self)(*args, **kwargs)


def _language_namespaces():
    # what triton 3.6's interpreter patches (runtime/interpreter.py, _patch_lang)
    return (tl, tl.core, tl.core.tensor, tl.math, tl.core.tensor_descriptor_base)


def _snapshot():
    return [(ns, dict(vars(ns))) for ns in _language_namespaces()]


def _restore(snapshot):
    """Undo what the interpreter left patched: triton 3.6 patches the language on every device-function
    call (`InterpretedFunction.__call__`, e.g. tl.sigmoid) and never restores it, so a kernel compiled
    in this process afterwards would be built by the interpreter's builder and fail."""
    for ns, saved in snapshot:
        for name, value in saved.items():
            if vars(ns).get(name) is not value:
                setattr(ns, name, value)


@contextlib.contextmanager
def interpreting():
    """Within this block, `interpreted(kernel)[grid](...)` runs `kernel` on CPU tensors."""
    with _lock:  # the interpreter patches triton.language globally: one launch at a time
        saved_call, saved_knob, saved_language = JITFunction.__call__, triton.knobs.runtime.interpret, _snapshot()
        JITFunction.__call__ = _call_interpreted
        triton.knobs.runtime.interpret = True
        try:
            yield
        finally:
            JITFunction.__call__ = saved_call
            triton.knobs.runtime.interpret = saved_knob
            _restore(saved_language)
