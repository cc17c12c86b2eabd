"""Launching a persistent kernel: interpreted, or compiled (cooperative in the split tier), on its
whole grid or in waves; a cooperative launch the driver refuses raises LaunchRefused."""
import torch
import triton

from .exchange import _after_launch, _watch, check_barriers
from .interpreter import interpreted, interpreting


# ---- waves: a layer's grid as several launches, one after another ----
# A wave is (tile0, tiles, dir0, dirs): `tiles` batch tiles from tile0 and `dirs` directions from
# dir0 (configs.launch_waves). Batch rows and directions are independent, so a grid that cannot be
# resident at once runs as waves that each can. A wave runs on its own rows: the tensors with the
# batch at dim 1 as views, the (D, B, X) states copied in and out (they are small); the direction
# reaches the kernel as DIR0, its first direction.

def one_wave(B, block_b, D):
    """The launch of a whole grid: every batch tile and direction at once."""
    return ((0, triton.cdiv(B, block_b), 0, D),)


def whole_grid(waves):
    """Whether `waves` is one launch from the first batch tile: the launchers' own grid."""
    return len(waves) == 1 and waves[0][0] == 0


def run_in_waves(run, waves, block_b, lengths, *, rows, states, outputs):
    """run(wave, lengths, rows, states, outputs) once per wave, on the wave's own batch rows: `rows`
    (tensors with the batch at dim 1, or None) as views, `states` (D, B, X) inputs as contiguous
    copies, `outputs` (D, B, X) written back for the wave's directions. wave is (0, tiles, dir0, dirs)."""
    B = lengths.shape[0]
    for tile0, tiles, dir0, dirs in waves:
        mine = slice(tile0 * block_b, min(B, (tile0 + tiles) * block_b))
        parts = [t if t is None or mine == slice(0, B) else t.new_empty(t[:, mine].shape) for t in outputs]
        run((0, tiles, dir0, dirs), lengths[mine], [None if t is None else t[:, mine] for t in rows],
            [None if t is None else t[:, mine].contiguous() for t in states], parts)
        for t, part in zip(outputs, parts):
            if t is not None and part is not t:
                t[dir0:dir0 + dirs, mine] = part[dir0:dir0 + dirs]


# ---- a cooperative launch the driver refuses ----
# triton 3.6's launcher (backends/nvidia/driver.py: make_launcher's gpuAssert around cuLaunchKernelEx)
# raises RuntimeError("Triton Error [CUDA]: " + cuGetErrorString(code)). A cooperative grid that
# cannot be resident at once, because fewer SMs are usable than the device has (MPS limits, green
# contexts, another process's kernels), fails with CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, whose
# text is this; nothing runs.
COOPERATIVE_LAUNCH_TOO_LARGE = "Triton Error [CUDA]: too many blocks in cooperative launch"


class LaunchRefused(RuntimeError):
    """The driver refused a split launch of `programs` programs on `device`: they cannot all be
    resident at once there now. Nothing ran; the layers re-plan (layers/dispatch.py: refused)."""

    def __init__(self, programs, device):
        super().__init__(f"persistrnn: the driver refused a cooperative launch of {programs} programs on {device} "
                         f"({COOPERATIVE_LAUNCH_TOO_LARGE}): fewer SMs are usable there than it has")
        self.programs, self.device = programs, device


def _start(kernel, grid, args, constexprs, *, config, interpret, device, what):
    """Start `kernel` on `grid`: interpreted, or compiled (cooperative in the split tier)."""
    split = grid[1]
    if interpret:
        with interpreting():
            # programs that meet at a barrier must run at the same time
            interpreted(kernel, concurrent=split > 1)[grid](*args, **constexprs)
    else:
        with torch.cuda.device(device):  # triton launches on the current device
            kernel[grid](*args, **constexprs, num_warps=config.warps(what), num_stages=config.num_stages,
                         launch_cooperative_grid=split > 1)


def launch(kernel, grid, args, constexprs, *, config, interpret, device, what, max_spin):
    """Run `kernel` on `grid`, compiled or interpreted, with no host synchronization: an earlier
    launch's barrier timeout is raised here (BarrierTimeout) once its timeout count has reached the host.
    what: "forward" or "backward", the kernel (and its num_warps in `config`). A split launch the
    driver refuses for residency raises LaunchRefused; every other error propagates as it is."""
    watch = _watch(device)
    check_barriers(device)
    split = grid[1]
    try:
        _start(kernel, grid, args, constexprs, config=config, interpret=interpret, device=device, what=what)
    except RuntimeError as error:
        if split > 1 and str(error) == COOPERATIVE_LAUNCH_TOO_LARGE:
            raise LaunchRefused(grid[0] * grid[1] * grid[2], device) from error
        raise
    if split > 1:
        _after_launch(watch, f"split {what} kernel (grid={grid}, first direction {constexprs['DIR0']}, {config}, "
                             f"K chunks={constexprs['CHUNKS']}, waits of at most {max_spin} polls)")
