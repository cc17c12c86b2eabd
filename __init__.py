"""persistrnn: persistent LSTM and GRU layers in Triton, drop-in for torch.nn.LSTM / torch.nn.GRU."""
# Absolute imports: pytest imports this file by path too (the repository root is the package).
from persistrnn.layers.backend import backend, current_backend
from persistrnn.layers.check import check
from persistrnn.layers.convert import convert
from persistrnn.layers.dispatch import pin_config
from persistrnn.layers.rnn import GRU, LSTM
from persistrnn.kernels.exchange import BarrierTimeout, raise_if_failed
from persistrnn.kernels.launcher import LaunchRefused
from persistrnn.version import __version__

__all__ = ["LSTM", "GRU", "convert", "check", "backend", "current_backend", "pin_config", "raise_if_failed",
           "BarrierTimeout", "LaunchRefused"]
