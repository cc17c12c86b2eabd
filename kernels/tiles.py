"""The persistent kernels' tile helpers (`@triton.jit`): a program's place in the grid, its batch
tile and rows of W_hh, the K-chunked recurrent product and the gate split.

Grid (cdiv(B, BLOCK_B), SPLIT, D): a program owns a batch tile of BLOCK_B rows of one direction
and BLOCK_H hidden units; SPLIT = cdiv(H, BLOCK_H) programs share a batch tile. A grid larger
than the GPU's SMs runs as waves, launches of blocks of batch tiles and directions one after
another (below, "waves"); a launch's first direction is the constexpr DIR0.

The recurrent product is computed swapped, gates^T = W_hh[my rows] @ h^T: one MMA with
M = 4 * BLOCK_H (all gates of the program's units, gate-major; the GRU's fourth gate is zero rows,
since M must be a power of two and wgmma needs M >= 64), N = BLOCK_B and K = R. W_hh's rows stay
in shared memory as the A operand for the whole sequence and the tensor core reads them there
(wgmma on sm_90); each gate value and each cell element is then computed once, by one thread.
K is cut into power-of-two chunks that sum to R (768 = 3 x 256, config.py): no MMA work or shared memory
goes to padding, and no W chunk is too large to stage through registers when it is loaded.
The split tier reads h, the B operand, back from memory in groups of K-chunks of at most
H_GROUP_BYTES: a group's chunks are loaded, then multiplied, and the next group reuses its shared
memory (a 64-row tile of H = 1024 fits beside its W that way, in two groups). Loading every chunk
of a group before its MMAs matters: a load between two MMAs makes ptxas hold the loop-invariant
wgmma descriptors in vector registers (two R2UR per wgmma) instead of uniform ones. Staging
(the store to shared memory that the MMA reads) is ordered the same way, with one exception
(LATE_LAST): the last chunk is staged after the MMA before it, so its loads land while the other
chunks multiply. Staging every chunk after the MMA before it costs the descriptors as a load
would (LSTM bf16 H = 768: 140 R2UR a step, 387 -> 555 instructions)."""
import triton
import triton.language as tl


@triton.jit
def _program(H, DIR0: tl.constexpr, BLOCK_H: tl.constexpr):
    """The program's ids in this launch's grid (batch tiles, SPLIT, directions): pid_b, pid_h and
    pid_d index the launch's scratch (exchange buffer, barrier counters); its direction in the
    layer, DIR0 + pid_d (a launch may run the reverse direction alone: `launch`), indexes the
    tensors and sets the time order; and its hidden units."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_u = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    return pid_b, pid_h, pid_d, DIR0 + pid_d, offs_u, offs_u < H


@triton.jit
def _batch_tile(lengths_ptr, B, pid_b, BLOCK_B: tl.constexpr):
    """The program's batch rows, their mask, each row's length."""
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    return offs_b, mask_b, tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)


@triton.jit
def _time_index(step, length, direction):
    """Per batch row, the time index of `step` in the direction's order: the reverse direction
    starts at each row's own last step. int64, for the (t, b) strides of long sequences."""
    return tl.where(direction == 1, length - 1 - step, step).to(tl.int64)


@triton.jit
def _next(it):
    """The iteration whose inputs are loaded ahead, before the barrier of iteration `it`."""
    return it + 1


@triton.jit
def _gate_rows(pid_h, H, G: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row m of the program's W tile (4 * BLOCK_H rows, gate-major: m = gate * BLOCK_H + unit) is
    row gate * H + unit of the stacked W_hh [G * H, R]; rows of a fourth GRU gate or past H are masked."""
    m = tl.arange(0, 4 * BLOCK_H)
    gate = m // BLOCK_H
    unit = pid_h * BLOCK_H + m % BLOCK_H
    return gate * H + unit, (gate < G) & (unit < H)


@triton.jit
def _load_chunks(ptr, n_offsets, n_mask, K, stride_k, CHUNKS: tl.constexpr, K_FIRST: tl.constexpr,
                 STATE_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """The K-chunks of the matrix (n, k) -> ptr[n_offsets[n] + k * stride_k], zero for k >= K or a
    masked n: a tuple of one tile per width in CHUNKS, [width, N] if K_FIRST else [N, width].
    Loads are upcast at once (the interpreter's bf16 arithmetic is wrong), then cast to the MMA
    operand type: lossless, and a no-op pair once compiled."""
    tiles = ()
    start = 0
    for c in tl.static_range(len(CHUNKS)):
        offs_k = start + tl.arange(0, CHUNKS[c])
        if K_FIRST:
            tile = tl.load(ptr + offs_k[:, None] * stride_k + n_offsets[None, :],
                           mask=(offs_k[:, None] < K) & n_mask[None, :], other=0.0)
        else:
            tile = tl.load(ptr + n_offsets[:, None] + offs_k[None, :] * stride_k,
                           mask=n_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        tiles = tiles + (tile.to(STATE_DTYPE).to(MMA_DTYPE),)
        start += CHUNKS[c]
    return tiles


@triton.jit
def _chunked_dot(a, b, STATE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """sum over chunks c of a[c] @ b[c], chained on one accumulator (no reduction across warps)."""
    acc = tl.dot(a[0], b[0], input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
    for c in tl.static_range(1, len(a)):
        acc = tl.dot(a[c], b[c], acc, input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
    return acc


@triton.jit
def _kept_in_order(tile, INTERPRET: tl.constexpr):
    """A 16-bit tile itself, through an inline-PTX copy the compiler keeps in program order: what
    uses the copy, such as its staging for an MMA, comes after the code before it (Triton would
    otherwise stage a loaded tile right after its load)."""
    if INTERPRET:
        return tile
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tile], dtype=tile.dtype, is_pure=False, pack=2)


@triton.jit
def _dot_from_memory(a, ptr, offs_n, K, stride_k, CHUNKS: tl.constexpr, GROUP: tl.constexpr, MASKED: tl.constexpr,
                     STATE_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     LATE_LAST: tl.constexpr, INTERPRET: tl.constexpr):
    """sum over chunks c of a[c] @ B[chunk c], B (k, n) = ptr[k * stride_k + offs_n[n]], read
    through L2 (.cg: other programs wrote it), GROUP chunks at a time: a group's chunks are loaded,
    then multiplied, so its shared-memory buffers are reused by the next group (see the module doc).
    MASKED: rows k >= K read as zero. Without it every row the chunks cover must hold a finite value
    (zero past K): the loads then have no predicate and no zero-fill, so ptxas gives each its own
    registers and every load of a group is in flight at once (masked, the zero-fills made them share
    two register quads, one L2 round trip after another). LATE_LAST: the last chunk is staged for
    its MMA after the MMA before it (module doc)."""
    start = 0
    for g in tl.static_range(0, len(CHUNKS), GROUP):
        group = ()
        for c in tl.static_range(g, min(g + GROUP, len(CHUNKS))):
            offs_k = start + tl.arange(0, CHUNKS[c])
            chunk = ptr + offs_k[:, None] * stride_k + offs_n[None, :]
            if MASKED:
                tile = tl.load(chunk, mask=offs_k[:, None] < K, other=0.0, cache_modifier=".cg")
            else:
                tile = tl.load(chunk, cache_modifier=".cg")
            group = group + (tile,)
            start += CHUNKS[c]
        for c in tl.static_range(g, min(g + GROUP, len(CHUNKS))):
            if LATE_LAST and c == len(CHUNKS) - 1 and c > g:
                b = _kept_in_order(group[c - g], INTERPRET).to(STATE_DTYPE).to(MMA_DTYPE)
            else:
                b = group[c - g].to(STATE_DTYPE).to(MMA_DTYPE)
            if c == 0:
                acc = tl.dot(a[0], b, input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
            else:
                acc = tl.dot(a[c], b, acc, input_precision=INPUT_PRECISION, out_dtype=STATE_DTYPE)
    return acc


@triton.jit
def _split4(gates):
    """[..., gate // 2, gate % 2] -> the four gates."""
    even, odd = tl.split(gates)
    g0, g2 = tl.split(even)
    g1, g3 = tl.split(odd)
    return g0, g1, g2, g3


@triton.jit
def _split_gates(acc, BLOCK_H: tl.constexpr, N: tl.constexpr):
    """[4 * BLOCK_H, N] gate-major rows -> the four gates, [BLOCK_H, N] each."""
    return _split4(tl.permute(tl.reshape(acc, [2, 2, BLOCK_H, N]), (2, 3, 0, 1)))


@triton.jit
def _split_gate_columns(t, BLOCK_H: tl.constexpr):
    """[K, 4 * BLOCK_H] gate-major columns -> the four gates' columns, [K, BLOCK_H] each."""
    K: tl.constexpr = t.shape[0]
    return _split4(tl.permute(tl.reshape(t, [K, 2, 2, BLOCK_H]), (0, 3, 1, 2)))


@triton.jit
def _join_gates(g0, g1, g2, g3, BLOCK_H: tl.constexpr, N: tl.constexpr):
    """The inverse of _split_gates."""
    gates = tl.join(tl.join(g0, g2), tl.join(g1, g3))  # [unit, n, gate // 2, gate % 2]
    return tl.reshape(tl.permute(gates, (2, 3, 0, 1)), [4 * BLOCK_H, N])


@triton.jit
def _load_in_place(ptrs, mask, IN_PLACE: tl.constexpr):
    """tl.load(ptrs, mask=mask, other=0.0); with IN_PLACE (compiled, 16-bit), each element loaded
    by its own instruction into its own register. A tl.load of a 16-bit tile loads pairs, which
    ptxas unpacks (PRMT) where the load is issued: a load meant to fly across the barrier wait
    would stall before it instead. It costs a register per element (config.xproj_in_place)."""
    dtype: tl.constexpr = ptrs.dtype.element_ty
    if IN_PLACE and dtype.primitive_bitwidth == 16:
        raw = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b16 $0, 0; @p ld.global.b16 $0, [$1]; }", "=h,l,r",
            [ptrs, mask.to(tl.int32)], dtype=tl.int16, is_pure=False, pack=1)
        return raw.to(dtype, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)
