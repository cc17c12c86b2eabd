"""`convert(module)`: swap every torch.nn.LSTM / torch.nn.GRU inside a model for its persistrnn twin."""
import copy

from torch import nn

from .rnn import GRU, LSTM

_TWINS = {nn.LSTM: LSTM, nn.GRU: GRU}


def _twin(module, cls):
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    # own registries, same Parameter objects: the weights are shared, not copied
    for registry in ("_parameters", "_buffers", "_modules", "_flat_weights"):
        setattr(twin, registry, copy.copy(getattr(module, registry)))
    return twin


def convert(module: nn.Module) -> nn.Module:
    """Return `module` with every nn.LSTM / nn.GRU in it (itself included) replaced by the
    persistrnn twin that shares its weights. Subclasses of nn.LSTM / nn.GRU are left alone:
    their forward may differ."""
    cls = _TWINS.get(type(module))
    if cls is not None:
        return _twin(module, cls)
    for name, child in module.named_children():
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
    return module
