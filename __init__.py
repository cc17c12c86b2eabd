"""persistrnn: persistent LSTM and GRU layers in Triton, drop-in for torch.nn.LSTM / torch.nn.GRU."""
from .layers.backend import backend, current_backend
from .layers.check import check
from .layers.convert import convert
from .layers.rnn import GRU, LSTM

__all__ = ["LSTM", "GRU", "convert", "check", "backend", "current_backend"]
__version__ = "0.1.0"
