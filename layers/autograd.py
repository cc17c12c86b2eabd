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

The ops take the layer's fixed description (`Layer`) as a JSON string (`layer_spec`): a custom
op's arguments are tensors and plain values, and a string survives Inductor's graph cache.
"""
import dataclasses
import functools
import json
from typing import List, Optional, Tuple

import torch
import torch._dynamo
from torch import Tensor

from ..kernels.backward import rnn_backward
from ..kernels.forward import SAVED
from ..kernels.skeleton import KernelConfig, LaunchRefused, state_dtype
from .dispatch import launch_waves, refused, usable_sms
from .functional import cudnn_rnn_allows_tf32, layer_forward, layer_weights, time_major
from .reference import layer_reference


@dataclasses.dataclass(frozen=True)
class Layer:
    """What is fixed about one layer call."""
    cell: str
    num_directions: int
    hidden_size: int
    real_hidden_size: int  # proj_size or hidden_size
    has_bias: bool
    has_proj: bool
    batch_first: bool
    config: KernelConfig
    interpret: bool
    allow_tf32: bool
    waves: tuple = None  # the kernels' launches (dispatch.launch_waves); None: the whole grid at once


@functools.lru_cache(maxsize=None)
def layer_spec(layer):
    return json.dumps(dataclasses.asdict(layer), sort_keys=True)


def describe_layer(cell, num_directions, hidden_size, proj_size, has_bias, batch_first, config, interpret, waves):
    """The spec (layer_spec) of one layer call, with torch's current TF32 setting for cuDNN's RNNs."""
    return layer_spec(Layer(cell=cell, num_directions=num_directions, hidden_size=hidden_size,
                            real_hidden_size=proj_size or hidden_size, has_bias=has_bias, has_proj=proj_size > 0,
                            batch_first=batch_first, config=config, interpret=interpret,
                            allow_tf32=cudnn_rnn_allows_tf32(), waves=waves))


# under torch.compile (the reference path, functional.rnn) a constant of the graph
@torch._dynamo.assume_constant_result
def layer_from_spec(spec):
    return _parse_spec(spec)


@functools.lru_cache(maxsize=None)
def _parse_spec(spec):
    fields = json.loads(spec)
    if fields["config"] is not None:
        fields["config"] = KernelConfig(**fields["config"])
    if fields["waves"] is not None:
        fields["waves"] = tuple(tuple(wave) for wave in fields["waves"])
    return Layer(**fields)


def _h_prev(y, h0, lengths, layer):
    """h_{t-1} of every step, in y's layout: y shifted one step back in each direction's own time
    order, h0 at each row's first step (the reverse direction's first is the row's last)."""
    R = layer.real_hidden_size
    h_prev = torch.zeros_like(y)
    y_tb, h_prev_tb = time_major(y, layer.batch_first), time_major(h_prev, layer.batch_first)
    rows = torch.arange(y_tb.shape[1], device=y.device)
    for d in range(layer.num_directions):
        cols = slice(d * R, (d + 1) * R)
        if d == 0:
            h_prev_tb[1:, :, cols] = y_tb[:-1, :, cols]
            h_prev_tb[0, :, cols] = h0[0]
        else:
            h_prev_tb[:-1, :, cols] = y_tb[1:, :, cols]
            h_prev_tb[lengths.long() - 1, rows, cols] = h0[1]
    return h_prev


def _batched(t):
    """Whether t is a batched tensor of vmap over the backward (torch.func's, or the legacy one that
    gradcheck's batched-gradient check uses)."""
    functorch = torch._C._functorch
    return t is not None and (functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t))


def _needs_reference(*grads):
    """A backward building a graph (create_graph=True), or handed batched gradients, differentiates
    the reference: the kernels give neither. (So does a forward run without `save`.)"""
    return torch.is_grad_enabled() or any(_batched(g) for g in grads)


def _none_to_empty(t, like):
    """A custom op returns tensors only: an absent one travels as an empty tensor."""
    return like.new_empty(0) if t is None else t


# ---- forward ---------------------------------------------------------------------------------------

def _layer_forward(x, lengths, h0, c0, weights, layer, save):
    y, hn, cn, saved = layer_forward(layer, x, h0, c0, lengths, weights, save=save)
    return y, hn, _none_to_empty(cn, h0), _none_to_empty(saved, x)


def _relaunching(run, layer, batch, device):
    """run(layer): one pass of a layer's launches. Where the driver refuses one (fewer SMs usable than
    its waves assume), learn from it (dispatch.refused) and run the pass again with the same config
    in more launches of fewer programs; LaunchRefused propagates where not even one batch tile's
    programs fit. Every launch rewrites all of its outputs."""
    while True:
        try:
            return run(layer)
        except LaunchRefused as error:
            refused(error)
            waves = launch_waves(layer.config, batch, layer.hidden_size, layer.num_directions, usable_sms(device))
            if waves is None:
                error.add_note("persistrnn: a compiled model keeps the plan it was traced with; compiled again "
                               "(after torch._dynamo.reset()), it plans for the SMs usable now")
                raise
            layer = dataclasses.replace(layer, waves=waves)


@torch.library.custom_op("persistrnn::layer_forward", mutates_args=())
def layer_forward_op(x: Tensor, lengths: Tensor, h0: Tensor, c0: Optional[Tensor], weights: List[Tensor],
                     spec: str, save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h_n, c_n, saved) of one layer; c_n (GRU) and saved (without `save`) are empty tensors.
    The op runs inside a compiled graph or vmap, whose plan is fixed: a refused launch changes only
    the layer's launches here (_relaunching); eager calls re-plan in the module (rnn.py)."""
    layer = layer_from_spec(spec)
    return _relaunching(lambda layer: _layer_forward(x, lengths, h0, c0, weights, layer, save), layer,
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
    folded = dataclasses.replace(layer, waves=launch_waves(layer.config, V * B, layer.hidden_size, D,
                                                           usable_sms(x.device)))
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
                                             layer_backward)
        return dx, None, dh0, dc0, None, None, *dweights


# ---- backward --------------------------------------------------------------------------------------

@torch.library.custom_op("persistrnn::layer_backward", mutates_args=())
def layer_backward_op(dy: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], x: Tensor, lengths: Tensor, h0: Tensor,
                      c0: Optional[Tensor], y: Tensor, saved: Tensor, weights: List[Tensor], spec: str,
                      needs: List[bool]) -> List[Tensor]:
    """[dx, dh0, dc0, *weight gradients] of one layer by the backward kernel and GEMMs; an entry not
    in `needs` is an empty tensor."""
    grads = layer_backward(layer_from_spec(spec), x, lengths, h0, c0, y, saved, weights, needs, dy, dh_n, dc_n)
    return [_none_to_empty(g if need else None, x) for g, need in zip(grads, needs)]


@layer_backward_op.register_fake
def _(dy, dh_n, dc_n, x, lengths, h0, c0, y, saved, weights, spec, needs):
    # contiguous, as layer_backward allocates them (not empty_like: x may be a transposed view)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip((x, h0, c0, *weights), needs)]


def layer_backward(layer, x, lengths, h0, c0, y, saved, weights, needs, dy, dh_n, dc_n):
    """(dx, dh0, dc0, *weight gradients) of one layer from the backward kernel and whole-sequence
    GEMMs; needs: whether each is wanted (x, h0, c0, *weights); an unwanted one may be None."""
    cell, D, H, R = layer.cell, layer.num_directions, layer.hidden_size, layer.real_hidden_size
    G = 4 if cell == "lstm" else 3
    w_ih, _, w_hh, _, w_hr = layer_weights(cell, weights, D, layer.has_bias, layer.has_proj, H)
    h0, c0 = h0.contiguous(), (None if c0 is None else c0.contiguous())  # the kernels read them densely
    # autograd materializes the gradients of unused outputs as zeros
    dh_n = dh_n.contiguous()
    if cell == "lstm":
        dc_n = dc_n.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dgates = x.new_empty(*x.shape[:2], D * G * H)
    dh_all = torch.empty_like(y) if layer.has_proj else None
    dh0 = h0.new_empty(h0.shape)
    dc0 = c0.new_empty(c0.shape) if cell == "lstm" else None
    if dgates.shape[0] * dgates.shape[1] > 0:
        bf = layer.batch_first

        def run(layer):
            rnn_backward(cell, time_major(dy, bf), dh_n, dc_n, time_major(saved, bf), time_major(y, bf), h0, c0,
                         w_hh, w_hr, lengths, time_major(dgates, bf),
                         None if dh_all is None else time_major(dh_all, bf), dh0, dc0,
                         config=layer.config, interpret=layer.interpret, allow_tf32=layer.allow_tf32,
                         waves=layer.waves)
        try:
            _relaunching(run, layer, time_major(dgates, bf).shape[1], dy.device)
        except LaunchRefused:  # not one batch tile's programs fit now: the same gradients from torch's ops
            leaves = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip((x, h0, c0, *weights), needs)]
            return backward_reference(layer, leaves[0], lengths, leaves[1], leaves[2], leaves[3:], needs,
                                      dy, dh_n, dc_n)

    rows = dgates.reshape(-1, D * G * H)  # one row per (t, b), in x's layout
    dx = (rows @ w_ih).reshape(x.shape) if needs[0] else None
    if not any(needs[3:]):  # frozen weights: no weight GEMMs
        return (dx, dh0, dc0, *(None for _ in weights))
    x_rows = x.reshape(-1, x.shape[-1])
    if cell == "gru":  # the n gate's h side: r * (W_hn h + b_hn)
        dgates_h = dgates.clone().view(*x.shape[:2], D, G, H)
        dgates_h[..., 2, :] *= saved[..., 0, :]
        rows_h = dgates_h.reshape(-1, D * G * H)
    else:
        rows_h = rows
    h_prev = _h_prev(y, h0, lengths, layer).reshape(-1, D * R)
    grads = []
    for d in range(D):
        gates = slice(d * G * H, (d + 1) * G * H)
        # one GEMM per direction: a custom op's outputs may not be views of one another
        grads += [rows[:, gates].t() @ x_rows, rows_h[:, gates].t() @ h_prev[:, d * R:(d + 1) * R]]
        if layer.has_bias:
            grads += [rows[:, gates].sum(0), rows_h[:, gates].sum(0)]
        if layer.has_proj:  # h_t = (o * tanh c_t) @ W_hr^T
            h_cell = (saved[..., d, 3, :] * torch.tanh(saved[..., d, 4, :])).reshape(-1, H).to(y.dtype)
            grads.append(dh_all.reshape(-1, D * R)[:, d * R:(d + 1) * R].t() @ h_cell)
    return (dx, dh0, dc0, *(g.to(w.dtype) for g, w in zip(grads, weights)))


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
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():  # vmap: its batching rule
        y, hn, cn, _ = layer_forward_op(x, lengths, h0, c0, list(weights), spec, save)
    elif save:
        y, hn, cn, _ = _EagerLayer.apply(x, lengths, h0, c0, spec, save, *weights)
    else:  # nothing to differentiate
        y, hn, cn, _ = _layer_forward(x, lengths, h0, c0, weights, layer_from_spec(spec), save)
    return y, hn, (cn if c0 is not None else None)
