"""`persistrnn.LSTM` and `persistrnn.GRU`: torch.nn.LSTM / torch.nn.GRU with the persistent kernels.

They subclass the torch.nn classes, so the constructor, parameter names, shapes, registration
order, init, state_dict, `.to()`, `flatten_parameters()` and repr are torch's own. Only
`forward` differs: it validates as torch does, then runs the kernels or torch's native RNN as
`dispatch.plan` decides, and records that choice in `self.last_dispatch`.
"""
import dataclasses
import operator

import torch
import torch._dynamo
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from ..kernels.launcher import LaunchRefused
from . import autocast, functional
from .dispatch import log, plan, refused
from .layer import describe_layer

# Dynamo refuses to trace any torch.nn.LSTM/GRU module, ours too (they subclass them), unless its
# process-wide `allow_rnn` is set. Setting it only while Dynamo wraps one of our layers lets
# torch.compile(fullgraph=True) trace our forward down to its custom ops (autograd.py), and leaves
# the config, and how Dynamo treats torch.nn's own RNN modules, as they were.
def _allow_our_layers(wrap_module):
    def wrap_module_allowing_ours(builder, value):
        if isinstance(value, _PersistentRNN):
            with torch._dynamo.config.patch(allow_rnn=True):
                return wrap_module(builder, value)
        return wrap_module(builder, value)

    wrap_module_allowing_ours.__wrapped__ = wrap_module
    return wrap_module_allowing_ours


_VariableBuilder = torch._dynamo.variables.builder.VariableBuilder
_VariableBuilder.wrap_module = _allow_our_layers(_VariableBuilder.wrap_module)


# torch.compile calls it once when it traces a layer and keeps the result as a constant of the graph
# (a later backend(), pin_config or tune does not re-plan a compiled model: recompile it)
@torch._dynamo.assume_constant_result
def _plan(cell, device, dtype, weight_dtype, hidden_size, proj_size, batch, num_directions, grad_needed, has_bias,
          batch_first, autocast_dtype):
    """dispatch.plan's Dispatch, with the spec of the layer its custom ops take (kernel paths) or its
    reference runs; autocast_dtype: the dtype autocast runs the layer in (None: autocast off)."""
    dispatch = plan(cell, device, dtype, weight_dtype, hidden_size, proj_size, batch, num_directions, grad_needed)
    if autocast_dtype is not None:
        dispatch = dataclasses.replace(
            dispatch, reason=f"{dispatch.reason} (autocast: run in {autocast_dtype}, as torch.nn does)")
    if dispatch.path == "torch":
        return dispatch
    spec = describe_layer(cell, num_directions, hidden_size, proj_size, has_bias, batch_first, dispatch.config,
                          dispatch.path == "interpret", dispatch.waves)
    return dataclasses.replace(dispatch, spec=spec)


class _PersistentRNN:
    """forward() shared by LSTM and GRU; mirrors torch/nn/modules/rnn.py."""

    _cell = None
    last_dispatch = None

    def forward(self, input, hx=None):
        self._update_flat_weights()
        data = input.data if isinstance(input, PackedSequence) else input
        if autocast.enabled(data.device.type):
            return self._forward_autocast(input, hx, data)
        return self._forward(input, hx, self._flat_weights)

    def _forward_autocast(self, input, hx, data):
        """Under autocast: the dtypes torch.nn's own RNN returns here (autocast.torch_dtypes) decide.
        The kernels run in torch's output dtype, with the weights cast once for this call (the
        casts are differentiable: gradients reach the parameters in their own dtype), and each
        result is returned in the dtype torch.nn returns it."""
        states = () if hx is None else (hx if self._cell == "lstm" else (hx,))
        dtypes = autocast.torch_dtypes(self._cell, data.device.type, data.dtype, tuple(s.dtype for s in states),
                                       self._flat_weights[0].dtype, self.proj_size > 0)
        run = dtypes[0]
        cast = lambda t: t if t.dtype == run else t.to(run)  # noqa: E731
        if isinstance(input, PackedSequence):
            input = PackedSequence(cast(input.data), input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        else:
            input = cast(input)
        if hx is not None:
            hx = tuple(cast(s) for s in hx) if self._cell == "lstm" else cast(hx)
        output, hidden = self._forward(input, hx, [cast(w) for w in self._flat_weights], autocast_dtype=run)
        back = lambda t, dt: t if t.dtype == dt else t.to(dt)  # noqa: E731
        if isinstance(output, PackedSequence):
            output = PackedSequence(back(output.data, dtypes[0]), *output[1:])
        else:
            output = back(output, dtypes[0])
        if self._cell == "lstm":
            return output, (back(hidden[0], dtypes[1]), back(hidden[1], dtypes[2]))
        return output, back(hidden, dtypes[1])

    def _forward(self, input, hx, flat_weights, autocast_dtype=None):
        is_lstm = self._cell == "lstm"
        orig_input = input
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched = True
            max_batch_size = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)

        if hx is None:
            shape = (self.num_layers * num_directions, max_batch_size)
            h0 = torch.zeros(*shape, real_hidden_size, dtype=input.dtype, device=input.device)
            hx = (h0, torch.zeros(*shape, self.hidden_size, dtype=input.dtype, device=input.device)) if is_lstm else h0
        else:
            if batch_sizes is None:
                hx = self._check_state_dims(hx, is_batched)
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)
        self._check_devices_and_dtypes(input, hx, flat_weights)

        states = hx if is_lstm else (hx,)
        grad_needed = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, *states, *flat_weights))
        if torch.compiler.is_compiling():
            # torch.compile plans when it traces: one graph per batch size (operator.index makes a
            # dynamic batch size a constant, guarded), the plan a constant in it
            max_batch_size = operator.index(max_batch_size)
        plan_args = (self._cell, input.device, input.dtype, flat_weights[0].dtype, self.hidden_size,
                     self.proj_size, max_batch_size, num_directions, grad_needed, self.bias,
                     self.batch_first and batch_sizes is None,  # packed input runs time-major
                     autocast_dtype)
        if torch.compiler.is_compiling():  # the plan is a constant of the graph
            self.last_dispatch = dispatch = _plan(*plan_args)
            output, hidden = self._run(dispatch, input, batch_sizes, hx, flat_weights, grad_needed)
        else:
            output, hidden = self._run_eager(plan_args, input, batch_sizes, hx, flat_weights, grad_needed)

        if isinstance(orig_input, PackedSequence):
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if is_lstm else hidden.squeeze(1)
        return output, hidden

    def _run_eager(self, plan_args, *inputs):
        """_run with the call's plan, kept in last_dispatch. Where the driver refuses a split launch
        (fewer SMs usable than planned for), dispatch.refused learns from it, and the call is planned
        and run again: fewer programs per launch, or torch. Every launch rewrites all of its outputs,
        so nothing of the refused run is kept."""
        dispatch = _plan(*plan_args)
        while True:
            self.last_dispatch = dispatch
            log.debug("%s: %s (%s) %s", type(self).__name__, dispatch.path, dispatch.reason, dispatch.config or "")
            try:
                return self._run(dispatch, *inputs)
            except LaunchRefused as error:
                why = refused(error)
                replanned = _plan(*plan_args)
                dispatch = dataclasses.replace(replanned, reason=f"{why}; re-planned: {replanned.reason}")

    def _run(self, dispatch, input, batch_sizes, hx, flat_weights, grad_needed):
        """(output, hidden) of the call, by the path `dispatch` names."""
        is_lstm = self._cell == "lstm"
        if dispatch.path == "torch":
            vf = _VF.lstm if is_lstm else _VF.gru
            common = (flat_weights, self.bias, self.num_layers, self.dropout, self.training,
                      self.bidirectional)
            if batch_sizes is None:
                result = vf(input, hx, *common, self.batch_first)
            else:
                result = vf(input, batch_sizes, hx, *common)
            return result[0], (result[1:] if is_lstm else result[1])
        # everything is in the run dtype already: autocast must not recast the kernels' GEMMs
        with torch.autocast(input.device.type, enabled=False):
            return functional.rnn(
                self._cell, input, batch_sizes, hx, flat_weights, has_bias=self.bias,
                num_layers=self.num_layers, dropout=self.dropout, training=self.training,
                bidirectional=self.bidirectional, batch_first=self.batch_first,
                hidden_size=self.hidden_size, proj_size=self.proj_size, spec=dispatch.spec,
                reference=dispatch.path == "reference", grad_needed=grad_needed)

    def _check_state_dims(self, hx, is_batched):
        """torch.nn's checks (and words) for the rank of h0/c0; unbatched states gain a batch dim."""
        want = 3 if is_batched else 2
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        if self._cell == "lstm":
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if hx.dim() != want:
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
        return hx if is_batched else hx.unsqueeze(1)

    def _check_devices_and_dtypes(self, input, hx, flat_weights):
        weight = flat_weights[0]
        if input.device != weight.device:
            raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor "
                               f"at {input.device} and parameter tensor at {weight.device}")
        for state in (hx if self._cell == "lstm" else (hx,)):
            if state.device != input.device:
                raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor "
                                   f"at {input.device} and hidden tensor at {state.device}")
            if state.dtype != input.dtype:
                raise RuntimeError("Input and hidden tensors are not the same dtype, found input tensor "
                                   f"with {input.dtype} and hidden tensor with {state.dtype}")


class LSTM(_PersistentRNN, nn.LSTM):
    __doc__ = "torch.nn.LSTM on persistent Triton kernels.\n\n" + (nn.LSTM.__doc__ or "")
    _cell = "lstm"


class GRU(_PersistentRNN, nn.GRU):
    __doc__ = "torch.nn.GRU on persistent Triton kernels.\n\n" + (nn.GRU.__doc__ or "")
    _cell = "gru"
