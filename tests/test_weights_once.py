"""The forward and backward kernels read W_hh from memory once per sequence, not once per step.

Under the interpreter every load goes through InterpreterBuilder.create_masked_load; we record the
addresses it reads and count those that fall inside W_hh. The count must not grow with T. A toy
kernel that re-reads its weights every step shows the counter catches the per-step pattern.
"""
import contextlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpreterBuilder

import persistrnn
import persistrnn.layers.layer as layer
from persistrnn.kernels.interpreter import interpreted, interpreting

from helpers import make_pair


@contextlib.contextmanager
def count_reads(tensor, tile_dim=None):
    """Yields a list whose len() is the number of elements of `tensor` read so far; with tile_dim,
    by loads of tiles that have a dimension of that size only (the kernels' W tiles have the
    4 * BLOCK_H gate rows: other loads of the backward kernel were seen, rarely and depending on
    where tensors are allocated, to report addresses inside W_hh under the interpreter)."""
    start, stop = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    reads = []
    original = InterpreterBuilder.create_masked_load

    def recording_load(self, ptrs, mask, *args, **kwargs):
        if tile_dim is not None and tile_dim not in ptrs.data.shape:
            return original(self, ptrs, mask, *args, **kwargs)
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        reads.extend(addresses[(addresses >= start) & (addresses < stop)].tolist())
        return original(self, ptrs, mask, *args, **kwargs)

    InterpreterBuilder.create_masked_load = recording_load
    try:
        yield reads
    finally:
        InterpreterBuilder.create_masked_load = original


def w_hh_reads(cell, T, B, monkeypatch, kernel="forward"):
    """(elements of W_hh read, W_hh's size) for one layer over T steps, by the forward kernel or
    (after a forward that saves) by the backward kernel."""
    ours, _ = make_pair(cell, 4, 16, torch.float32)
    name, w_hh_index = ("rnn_forward", 2) if kernel == "forward" else ("rnn_backward", 8)
    module = layer
    launches = []
    real_launch = getattr(module, name)

    def counting_launch(*args, **kwargs):
        with count_reads(args[w_hh_index], tile_dim=4 * 16) as reads:  # BLOCK_H = 16: one program holds H = 16
            real_launch(*args, **kwargs)
        launches.append((len(reads), args[w_hh_index].numel()))

    monkeypatch.setattr(module, name, counting_launch)
    with persistrnn.backend("interpret"):
        if kernel == "forward":
            with torch.no_grad():
                ours(torch.randn(T, B, 4))
        else:
            ours(torch.randn(T, B, 4))[0].sum().backward()
    assert ours.last_dispatch.path == "interpret" and len(launches) == 1
    return launches[0]


@pytest.mark.parametrize("kernel", ["forward", "backward"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_w_hh_is_read_once_per_sequence(cell, kernel, monkeypatch):
    B = 20  # two batch tiles: each program reads W_hh once
    short, numel = w_hh_reads(cell, T=2, B=B, monkeypatch=monkeypatch, kernel=kernel)
    long, _ = w_hh_reads(cell, T=7, B=B, monkeypatch=monkeypatch, kernel=kernel)
    assert short == long == 2 * numel


@triton.jit
def _per_step_reload(w_ptr, out_ptr, T, N: tl.constexpr):
    offs = tl.arange(0, N)
    acc = tl.zeros([N], tl.float32)
    for _ in range(T):
        acc += tl.load(w_ptr + offs)  # the pattern the real kernel must not have
    tl.store(out_ptr + offs, acc)


def test_counter_catches_a_kernel_that_rereads_weights_each_step():
    w = torch.randn(16)
    counts = []
    for T in (2, 7):
        out = torch.empty(16)
        with count_reads(w) as reads, interpreting():
            interpreted(_per_step_reload)[(1,)](w, out, T, N=16)
        assert torch.allclose(out, T * w)
        counts.append(len(reads))
    assert counts == [2 * 16, 7 * 16]

