"""An address checker for kernels run by the Triton interpreter (triton 3.6): every load, store and
atomic of an active lane must fall inside the storage of one of the launch's tensors.

Inside `checking_addresses()`, each interpreted launch runs on copies of its tensors, each storage
placed in an allocation of its own with a guard zone on both sides as large as the storage (at
least GUARD_BYTES), and copied back after the launch (aliases stay aliases: one copy per storage).
Every masked load and store and every atomic checks its active lanes' addresses against the
storages of the launch. A lane that strays from its own tensor by less than the guard lands in a
guard zone, never inside another tensor, so the check does not depend on where the allocator put
the tensors.
"""
import contextlib
import dataclasses
import threading

import numpy as np
import torch
from triton.runtime.interpreter import GridExecutor, InterpreterBuilder

GUARD_BYTES = 1 << 16


@dataclasses.dataclass
class Report:
    launches: int = 0
    accesses: int = 0  # active lanes checked
    lanes_outside: int = 0
    # up to 8 per operation: (operation, address, nearest storage, offset from its start (< 0) or its end (>= 0))
    outside: list = dataclasses.field(default_factory=list)
    kernels: set = dataclasses.field(default_factory=set)  # (kernel, its constexprs) launched

    def summary(self):
        return (f"{self.launches} launches of {len(self.kernels)} kernel variants, {self.accesses} lane accesses, "
                f"{self.lanes_outside} outside")

    def describe(self, limit=5):
        where = [f"{op} {-offset} B before storage {index}" if offset < 0 else f"{op} {offset} B past storage {index}"
                 for op, _, index, offset in self.outside[:limit]]
        return f"{self.summary()}: {'; '.join(where)}"


class _Storages:
    """The launch's storages as sorted [start, end) byte ranges."""

    def __init__(self):
        self.starts = np.zeros(0, dtype=np.uint64)
        self.ends = np.zeros(0, dtype=np.uint64)

    def set(self, ranges):
        ranges = sorted(ranges)
        self.starts = np.array([a for a, _ in ranges], dtype=np.uint64)
        self.ends = np.array([b for _, b in ranges], dtype=np.uint64)

    def check(self, report, operation, pointers, mask, element_bytes):
        addresses = np.asarray(pointers.data, dtype=np.uint64).ravel()
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), pointers.data.shape).ravel()]
        if addresses.size == 0:
            return
        index = np.searchsorted(self.starts, addresses, side="right").astype(np.int64) - 1
        safe = np.maximum(index, 0)
        inside = (index >= 0) & (addresses >= self.starts[safe]) & (addresses + np.uint64(element_bytes)
                                                                   <= self.ends[safe])
        report.accesses += int(addresses.size)
        report.lanes_outside += int((~inside).sum())
        for address in addresses[~inside][:8].tolist():
            report.outside.append((operation, address, *self.nearest(address)))

    def nearest(self, address):
        """(storage index, offset): the storage nearest to `address`, and the address's offset from
        its start (negative: before it) or from its end (zero or positive: at or past it)."""
        distances = [(address - int(end) if address >= int(end) else address - int(start), i)
                     for i, (start, end) in enumerate(zip(self.starts.tolist(), self.ends.tolist()))]
        offset, index = min(distances, key=lambda d: abs(d[0]))
        return index, offset


def _element_bytes(pointers):
    return max(1, pointers.get_element_ty().primitive_bitwidth // 8)


def _relocate(value, copies, storages):
    """A copy of `value` (a tensor; anything else is returned as is) inside a guarded allocation."""
    if not isinstance(value, torch.Tensor):
        return value
    storage = value.untyped_storage()
    key = storage.data_ptr()
    if key not in copies:
        nbytes = storage.nbytes()
        guard = max(GUARD_BYTES, -(-nbytes // 64) * 64)
        block = torch.empty(2 * guard + nbytes, dtype=torch.uint8)
        original = torch.empty(0, dtype=torch.uint8).set_(storage)
        block[guard:guard + nbytes].copy_(original)
        copies[key] = (block, guard, original)
        start = block.data_ptr() + guard
        storages.append((start, start + nbytes))
    block, guard, _ = copies[key]
    return value.new_empty(0).set_(block.untyped_storage(), guard // value.element_size() + value.storage_offset(),
                                   value.size(), value.stride())


@contextlib.contextmanager
def checking_addresses():
    """Check every interpreted launch inside the block; yields the Report (see the module doc)."""
    report = Report()
    storages = _Storages()
    lock = threading.Lock()  # concurrently interpreted programs check at once
    launch = GridExecutor.__call__
    masked_load, masked_store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
    atomic_rmw, atomic_cas = InterpreterBuilder.create_atomic_rmw, InterpreterBuilder.create_atomic_cas

    def checked_launch(self, *args, **kwargs):
        copies, ranges = {}, []
        args = [_relocate(a, copies, ranges) for a in args]
        kwargs = {k: _relocate(v, copies, ranges) for k, v in kwargs.items()}
        storages.set(ranges)
        report.launches += 1
        report.kernels.add((getattr(self.fn, "__name__", "?"),
                            *sorted((k, str(v)) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))))
        try:
            return launch(self, *args, **kwargs)
        finally:
            for block, guard, original in copies.values():
                original.copy_(block[guard:guard + original.numel()])

    def check(operation, pointers, mask):
        with lock:
            storages.check(report, operation, pointers, mask, _element_bytes(pointers))

    def load(self, ptrs, mask, *rest):
        check("load", ptrs, mask)
        return masked_load(self, ptrs, mask, *rest)

    def store(self, ptrs, value, mask, *rest):
        check("store", ptrs, mask)
        return masked_store(self, ptrs, value, mask, *rest)

    def rmw(self, op, ptr, val, mask, *rest):
        check("atomic", ptr, mask)
        return atomic_rmw(self, op, ptr, val, mask, *rest)

    def cas(self, ptr, *rest):
        check("atomic", ptr, None)
        return atomic_cas(self, ptr, *rest)

    patches = dict(create_masked_load=load, create_masked_store=store, create_atomic_rmw=rmw, create_atomic_cas=cas)
    saved = {name: getattr(InterpreterBuilder, name) for name in patches}
    GridExecutor.__call__ = checked_launch
    for name, fn in patches.items():
        setattr(InterpreterBuilder, name, fn)
    try:
        yield report
    finally:
        GridExecutor.__call__ = launch
        for name, fn in saved.items():
            setattr(InterpreterBuilder, name, fn)
