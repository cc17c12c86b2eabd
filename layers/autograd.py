"""Training through the persistent kernels: one layer (all directions) as two custom ops,
`persistrnn::layer_forward` and `persistrnn::layer_backward`, with autograd between them.

Custom ops (torch.library), so that torch.compile sees one opaque op per layer pass: Dynamo traces
the model around it without a graph break, AOTAutograd and Inductor get its output shapes from the
fake implementations, and at run time the op launches the kernels as in eager mode; and so that
vmap has a batching rule (the mapped dimension folded into the batch). Plain eager calls run the
same functions through `_EagerLayer`, an autograd.Function, which costs the host less.

forward: the forward kernel, saving (per step gate activations and c, see kernels/forward.py) when
`save` is set.
backward: the backward kernel walks the sequence in reverse and returns the pre-activation
gradients of every step (dgates), dh0, dc0 (and dh_t with proj_size); then every weight, bias and
input gradient is one GEMM (or sum) over the whole sequence:
    dx = dgates @ W_ih            dW_ih = dgates^T x            db_ih = sum dgates
    dW_hh = dgates_h^T h_prev     db_hh = sum dgates_h          dW_hr = dh^T (o * tanh c)
with dgates_h = dgates for the LSTM, and for the GRU dgates with its n part times r (the n gate
sees W_hn h + b_hn through r).

Higher order: a backward asked to build a graph (create_graph=True), or handed batched gradients
(vmap over the backward), differentiates the layer recomputed from torch's ops instead
(reference.py): the kernels give first-order gradients only, and those two must be right too.

The ops take the layer's fixed description (layer.py: `Layer`) as a JSON string (`layer_spec`): a
custom op's arguments are tensors and plain values, and a string survives Inductor's graph cache.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..kernels.config import state_dtype
from ..kernels.forward import SAVED
from ..kernels.launcher import LaunchRefused
from .layer import layer_backward, layer_forward, layer_from_spec, layer_spec, relaunching, replanned, time_major
from .reference import layer_reference
from .transforms import is_batched, transforms_active


def _needs_reference(*grads):
    """A backward building a graph (create_graph=True), or handed batched gradients, differentiates
    the reference: the kernels give neither. (So does a forward run without `save`.)"""
    return torch.is_grad_enabled() or any(is_batched(g) for g in grads)


def _none_to_empty(t, like):
    """A custom op returns tensors only: an absent one travels as an empty tensor."""
    return like.new_empty(0) if t is None else t


# ---- forward ---------------------------------------------------------------------------------------

def _layer_forward(x, lengths, h0, c0, weights, layer, save):
    y, hn, cn, saved = layer_forward(layer, x, h0, c0, lengths, weights, save=save)
    return y, hn, _none_to_empty(cn, h0), _none_to_empty(saved, x)


@torch.library.custom_op("persistrnn::layer_forward", mutates_args=())
def layer_forward_op(x: Tensor, lengths: Tensor, h0: Tensor, c0: Optional[Tensor], weights: List[Tensor],
                     spec: str, save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h_n, c_n, saved) of one layer; c_n (GRU) and saved (without `save`) are empty tensors.
    The op runs inside a compiled graph or vmap, whose plan is fixed: a refused launch changes only
    the layer's launches here (layer.relaunching); eager calls re-plan in the module (rnn.py)."""
    layer = layer_from_spec(spec)
    return relaunching(lambda layer: _layer_forward(x, lengths, h0, c0, weights, layer, save), layer,
                        time_major(x, layer.batch_first).shape[1], x.device)


@layer_forward_op.register_fake
def _(x, lengths, h0, c0, weights, spec, save):
    layer = layer_from_spec(spec)
    D, H = layer.num_directions, layer.hidden_size
    y = x.new_empty(*x.shape[:2], D * layer.real_hidden_size)
    cn = c0.new_empty(c0.shape) if layer.cell == "lstm" else h0.new_empty(0)
    saved = (x.new_empty(*x.shape[:2], D, SAVED[layer.cell], H, dtype=state_dtype(x.dtype)) if save
             else x.new_empty(0))
    return y, h0.new_empty(h0.shape), cn, saved  # contiguous, as layer_forward allocates them


@layer_forward_op.register_vmap
def _(info, in_dims, x, lengths, h0, c0, weights, spec, save):
    """vmap over a layer: with shared weights and lengths, the mapped dimension becomes more batch
    rows of one launch (batch rows are independent); otherwise one launch per mapped slice."""
    x_dim, lengths_dim, h0_dim, c0_dim, weight_dims, _, _ = in_dims
    V = info.batch_size
    if lengths_dim is not None or any(d is not None for d in weight_dims):
        def pick(t, dim, v):
            return t if t is None or dim is None else t.select(dim, v)
        slices = [layer_forward_op(pick(x, x_dim, v), pick(lengths, lengths_dim, v), pick(h0, h0_dim, v),
                                   pick(c0, c0_dim, v), [pick(w, d, v) for w, d in zip(weights, weight_dims)],
                                   spec, save) for v in range(V)]
        return tuple(torch.stack(outputs) for outputs in zip(*slices)), (0, 0, 0, 0)
    layer = layer_from_spec(spec)
    D, bf = layer.num_directions, layer.batch_first
    x = _mapped_first(x, x_dim, V)  # (V, T, B, I), or (V, B, T, I) batch-first
    B = x.shape[1 if bf else 2]
    x = x.reshape(V * B, *x.shape[2:]) if bf else x.transpose(0, 1).reshape(x.shape[1], V * B, x.shape[3])
    # (V, D, B, R) -> (D, V*B, R): at B = 1 a view (of expanded zeros where unmapped), not a copy
    states = [None if s is None else _mapped_first(s, dim, V).transpose(0, 1).reshape(D, V * B, s.shape[-1])
              for s, dim in ((h0, h0_dim), (c0, c0_dim))]
    folded = replanned(layer, V * B, x.device)
    y, hn, cn, saved = layer_forward_op(x, lengths.repeat(V), *states, weights, layer_spec(folded), save)

    def unfold(t, batch_dim):  # the batch dimension (V*B) back into (V, B): V is the mapped one
        return t.unflatten(batch_dim, (V, B)), batch_dim
    sequence_dim = 0 if bf else 1  # y's and saved's batch dimension; the states' is 1
    return tuple(zip(unfold(y, sequence_dim), unfold(hn, 1),
                     unfold(cn, 1) if layer.cell == "lstm" else (cn, None),
                     unfold(saved, sequence_dim) if save else (saved, None)))


def _mapped_first(t, dim, size):
    """t with its mapped dimension first (expanded where t is not mapped)."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _setup_context(ctx, inputs, output):
    x, lengths, h0, c0, weights, spec, save = inputs
    y, _, _, saved = output
    ctx.spec, ctx.saved_for_kernel = spec, save
    ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(x, lengths, h0, c0, y, saved, *weights)


def _gradients(ctx, needs, dy, dh_n, dc_n, kernel_backward):
    """(dx, dh0, dc0, *weight gradients), None where `needs` (x, h0, c0, *weights) says no."""
    layer = layer_from_spec(ctx.spec)
    x, lengths, h0, c0, y, saved, *weights = ctx.saved_tensors
    needs = (needs[0], needs[1], needs[2] and c0 is not None, *needs[3:])
    if layer.cell == "gru":
        dc_n = None
    # the backward may be called under autocast; its GEMMs run in the layer's dtype, as the forward's
    with torch.autocast(dy.device.type, enabled=False):
        if _needs_reference(dy, dh_n, dc_n) or not ctx.saved_for_kernel:
            return backward_reference(layer, x, lengths, h0, c0, weights, needs, dy, dh_n, dc_n)
        grads = kernel_backward(layer, x, lengths, h0, c0, y, saved, weights, needs, dy, dh_n, dc_n)
        return tuple(g if need else None for g, need in zip(grads, needs))


def _kernel_backward(layer, x, lengths, h0, c0, y, saved, weights, needs, dy, dh_n, dc_n):
    """layer_backward's gradients; where not even one batch tile's programs fit now (LaunchRefused),
    the same gradients from torch's ops."""
    try:
        return layer_backward(layer, x, lengths, h0, c0, y, saved, weights, needs, dy, dh_n, dc_n)
    except LaunchRefused:
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip((x, h0, c0, *weights), needs)]
        return backward_reference(layer, leaves[0], lengths, leaves[1], leaves[2], leaves[3:], needs, dy, dh_n, dc_n)


def _through_the_op(layer, x, lengths, h0, c0, y, saved, weights, needs, dy, dh_n, dc_n):
    return layer_backward_op(dy, dh_n, dc_n, x, lengths, h0, c0, y, saved, weights, layer_spec(layer), list(needs))


def _op_backward(ctx, dy, dh_n, dc_n, _):
    needs_x, _, needs_h0, needs_c0, needs_weights, _, _ = ctx.needs_input_grad
    dx, dh0, dc0, *dweights = _gradients(ctx, (needs_x, needs_h0, needs_c0, *needs_weights), dy, dh_n, dc_n,
                                         _through_the_op)
    return dx, None, dh0, dc0, dweights, None, None


layer_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """The custom op's forward and backward in eager mode, without the custom op dispatcher's cost on
    the host: through the op, a layer's training step took 140 us more on a 2-core CPU (kernels
    stubbed out); through this, the same as before the op existed."""

    @staticmethod
    def forward(ctx, x, lengths, h0, c0, spec, save, *weights):
        # the ctx form: a Function with a separate setup_context binds its arguments by
        # inspect.signature on every call
        output = _layer_forward(x, lengths, h0, c0, weights, layer_from_spec(spec), save)
        _setup_context(ctx, (x, lengths, h0, c0, weights, spec, save), output)
        return output

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _):
        needs_x, _, needs_h0, needs_c0, _, _, *needs_weights = ctx.needs_input_grad
        dx, dh0, dc0, *dweights = _gradients(ctx, (needs_x, needs_h0, needs_c0, *needs_weights), dy, dh_n, dc_n,
                                             _kernel_backward)
        return dx, None, dh0, dc0, None, None, *dweights


# ---- backward --------------------------------------------------------------------------------------

@torch.library.custom_op("persistrnn::layer_backward", mutates_args=())
def layer_backward_op(dy: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], x: Tensor, lengths: Tensor, h0: Tensor,
                      c0: Optional[Tensor], y: Tensor, saved: Tensor, weights: List[Tensor], spec: str,
                      needs: List[bool]) -> List[Tensor]:
    """[dx, dh0, dc0, *weight gradients] of one layer by the backward kernel and GEMMs; an entry not
    in `needs` is an empty tensor."""
    grads = _kernel_backward(layer_from_spec(spec), x, lengths, h0, c0, y, saved, weights, needs, dy, dh_n, dc_n)
    return [_none_to_empty(g if need else None, x) for g, need in zip(grads, needs)]


@layer_backward_op.register_fake
def _(dy, dh_n, dc_n, x, lengths, h0, c0, y, saved, weights, spec, needs):
    # contiguous, as layer_backward allocates them (not empty_like: x may be a transposed view)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip((x, h0, c0, *weights), needs)]


def backward_reference(layer, x, lengths, h0, c0, weights, needs, dy, dh_n, dc_n):
    """The gradients of the layer recomputed with torch's ops from the saved inputs: a graph when
    one is being built (so second derivatives are right), and vmap-able. Same order as
    layer_backward's."""
    inputs = (x, h0, c0, *weights)
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    # half precision recomputes in fp32, as the kernels carry their state (casts are differentiable)
    up = (lambda t: t if t is None or t.dtype not in (torch.float16, torch.bfloat16)  # noqa: E731
          else t.float())
    with torch.enable_grad():
        outputs = layer_reference(layer, up(x), lengths, up(h0), up(c0), [up(w) for w in weights])
    pairs = [(out, up(grad)) for out, grad in zip(outputs, (dy, dh_n, dc_n)) if out is not None]
    grads = torch.autograd.grad([out for out, _ in pairs], [inputs[i] for i in wanted],
                                [grad for _, grad in pairs], create_graph=torch.is_grad_enabled(),
                                allow_unused=True, materialize_grads=True)
    result = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


def run_layer(spec, x, lengths, h0, c0, weights, save):
    """(y, h_n, c_n) of one layer (spec: layer_spec); c_n None for the GRU. `save`: keep what the
    backward kernel needs (training). Traced by torch.compile: the custom op; eager: _EagerLayer."""
    if torch.compiler.is_compiling() or transforms_active():  # vmap: its batching rule
        y, hn, cn, _ = layer_forward_op(x, lengths, h0, c0, list(weights), spec, save)
    elif save:
        y, hn, cn, _ = _EagerLayer.apply(x, lengths, h0, c0, spec, save, *weights)
    else:  # nothing to differentiate
        y, hn, cn, _ = _layer_forward(x, lengths, h0, c0, weights, layer_from_spec(spec), save)
    return y, hn, (cn if c0 is not None else None)
