"""The compile-time side of a layer's kernels: how a layer is cut into programs (KernelConfig), the
K-chunks of the recurrent product, and the constexprs both kernels are compiled with."""
import dataclasses

import torch
import triton
import triton.language as tl

from .cells import GRU, LSTM
from .fastmath import math_mode


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How a layer is cut into programs: block_b batch rows and block_h hidden units per program
    (SPLIT = cdiv(H, block_h) programs share a batch tile), and the launch's num_warps and num_stages;
    backward_warps, if set, is the backward kernel's num_warps (one kernel's registers may need
    more warps than the other's)."""
    block_b: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 1
    backward_warps: int = None

    def warps(self, kernel):
        """num_warps of the "forward" or "backward" kernel."""
        return self.backward_warps if kernel == "backward" and self.backward_warps else self.num_warps


# widest K chunk of the recurrent product on tensor cores (fp16, bf16, TF32): wide enough that
# chunks cost few fences and waits, narrow enough that a chunk of W, or of a 64-row h, stages
# through registers without spilling. Where h is read back all in flight (H_IN_FLIGHT, below)
# and a chunk of W twice as wide is at most WIDE_W_CHUNK_BYTES (M = 64 rows of 16-bit: 256
# columns), the chunks are twice as wide: half the wgmma waits and fences per step. Elsewhere the
# wider chunk costs more than it saves (modelled: GRU bf16 H = 1024, LSTM fp16 H = 1024 B = 64).
# FMA dots (fp32 without TF32) and fp64's hold a whole chunk of both operands in registers:
# FMA_K_CHUNK.
K_CHUNK = 128
WIDE_W_CHUNK_BYTES = 32 * 1024
FMA_K_CHUNK = 32
MIN_CHUNK = 16  # the MMA's K granularity (and tl.dot's smallest dimension)


def k_chunks(width, widest=K_CHUNK):
    """Power-of-two chunk widths (<= widest, >= MIN_CHUNK) that sum to `width` rounded up to a
    multiple of MIN_CHUNK: 768 -> 6 x 128, 1000 -> 7 x 128, 64, 32, 16."""
    width = triton.cdiv(width, MIN_CHUNK) * MIN_CHUNK
    chunks = [widest] * (width // widest)
    rest = width % widest
    bit = widest // 2
    while rest:
        if rest >= bit:
            chunks.append(bit)
            rest -= bit
        bit //= 2
    return tuple(chunks)


def recurrent_chunks(split, has_proj, block_h, width, widest=K_CHUNK):
    """The K-chunks of the recurrent product. One program without proj_size multiplies its own
    h tile, [BLOCK_H, BLOCK_B]: one chunk of BLOCK_H. Otherwise h is read back as R rows."""
    return (block_h,) if split == 1 and not has_proj else k_chunks(width, widest)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}

# the most of h the split tier reads back at once (tiles.py: _dot_from_memory)
H_GROUP_BYTES = 64 * 1024
# the most of h per thread read back by unmasked loads, all in flight at once (H_IN_FLIGHT), when
# one group holds every chunk; IN_FLIGHT_BYTES_16_ROWS in 16-row batch tiles (4 warps: up to
# H = 1280, the widest the tables hold). Modelled, bf16 B = 16 forward, against the masked
# read-back: H = 1024 LSTM 2.84 -> 2.41 us, GRU 2.72 -> 2.40; H = 1280 LSTM 2.95 -> 2.65, GRU
# 3.03 -> 2.59 (the GRU's forwards then take 255 registers, unspilled). In 32-row tiles 256 B
# spilled (sm_80 GRU bf16 train, H = 512). With several groups, the loads between two groups'
# MMAs crowd out the loop-invariant wgmma descriptors.
IN_FLIGHT_BYTES = 192
IN_FLIGHT_BYTES_16_ROWS = 320


def in_flight_bytes(block_b):
    """The most of h a thread reads back all in flight with a batch tile of block_b rows."""
    return IN_FLIGHT_BYTES_16_ROWS if block_b == 16 else IN_FLIGHT_BYTES


# the most xproj elements per thread the forward loads one per register (xproj_in_place): more,
# and the 64-row batch tiles' saving forward spills where it held with xproj loaded in pairs
X_IN_PLACE_ELEMENTS = 16


def _xproj_elements(config):
    """The xproj elements a thread holds for one step: 4 gate tiles of [BLOCK_H, BLOCK_B]."""
    return 4 * config.block_h * config.block_b // (32 * config.num_warps)


def xproj_by_element(dtype, has_proj, config):
    """Whether the forward's 16-bit xproj tiles take at most X_IN_PLACE_ELEMENTS registers a
    thread, one per element, without proj_size (its W_hr columns and summed h take the registers:
    64-row tiles spilled at 16 elements)."""
    return not has_proj and torch.finfo(dtype).bits == 16 and _xproj_elements(config) <= X_IN_PLACE_ELEMENTS


def xproj_in_place(dtype, has_proj, config, *, interpret):
    """Whether the forward loads its next step's xproj one element per register
    (tiles._load_in_place): compiled, where xproj_by_element."""
    return not interpret and xproj_by_element(dtype, has_proj, config)


def last_chunk_late(constexprs, x_in_place):
    """Whether the forward stages its last K-chunk of h for the MMA only after the MMA before it
    (tiles._dot_from_memory, LATE_LAST), so the last chunk's loads land while the others multiply:
    where h is read back in flight in several chunks and xproj is loaded in place (LSTM bf16
    H = 768 B = 16: 1.96 -> 1.89 us modelled, GRU fp16 H = 512: 1.76 -> 1.71). With xproj loaded
    in pairs the reordering made ptxas read them before the barrier wait (GRU fp16 H = 512:
    1.76 -> 1.95); with a masked read-back it batched the loads worse (GRU bf16 H = 1024
    3.17 -> 3.22, LSTM fp16 H = 1024 B = 64 3.90 -> 4.02)."""
    return bool(x_in_place and constexprs["H_IN_FLIGHT"] and len(constexprs["CHUNKS"]) > 1)


def kernel_constexprs(cell, dtype, has_proj, split, config, width, *, interpret, allow_tf32):
    """The compile-time parameters both kernels take (also used by the ahead-of-time compile), for
    a layer whose recurrent input (hidden or proj size) is `width` wide."""
    w_dtype = _TL_DTYPE[dtype]
    # the interpreter's bf16 arithmetic is wrong: multiply bf16-rounded values in fp32 there
    mma_dtype = tl.float32 if (interpret and dtype == torch.bfloat16) else w_dtype
    state = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "tf32" if (dtype == torch.float32 and allow_tf32 and not interpret) else "ieee"
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or precision == "tf32"
    elt = torch.finfo(dtype).bits // 8
    chunks = recurrent_chunks(split, has_proj, config.block_h, width, K_CHUNK if tensor_cores else FMA_K_CHUNK)
    group = max(1, H_GROUP_BYTES // (max(chunks) * config.block_b * elt))
    # unmasked read-back of h (split tier without proj_size): every row the chunks cover is
    # published (zero past H), in one group
    in_flight = (split > 1 and not has_proj and split * config.block_h >= sum(chunks) and group >= len(chunks)
                 and sum(chunks) * config.block_b * elt <= in_flight_bytes(config.block_b) * 32 * config.num_warps)
    if in_flight and tensor_cores and 4 * config.block_h * 2 * K_CHUNK * elt <= WIDE_W_CHUNK_BYTES:
        chunks = recurrent_chunks(split, has_proj, config.block_h, width, 2 * K_CHUNK)
        group = max(1, H_GROUP_BYTES // (max(chunks) * config.block_b * elt))
    math, emulate = math_mode(dtype, interpret=interpret, allow_tf32=allow_tf32)
    return dict(CELL=LSTM if cell == "lstm" else GRU, HAS_PROJ=has_proj, SPLIT=split, BLOCK_B=config.block_b,
                BLOCK_H=config.block_h, CHUNKS=tuple(chunks), H_GROUP=group, H_IN_FLIGHT=in_flight,
                W_DTYPE=w_dtype, MMA_DTYPE=mma_dtype, STATE_DTYPE=state, INPUT_PRECISION=precision, MATH=math,
                EMULATE=emulate, INTERPRET=interpret)


def state_dtype(dtype):
    """The dtype of the state, the saved activations and the exchange buffers of partial sums."""
    return torch.float64 if dtype == torch.float64 else torch.float32
