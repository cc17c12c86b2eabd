"""Importing persistrnn, and compiling one of its layers, leaves torch.compile of the rest of the
program as it was: Dynamo still refuses torch.nn's own LSTM/GRU (its `allow_rnn` stays unset),
with the same graphs and the same reasons as in a process that never imported us, while our layer
next to them is traced whole. Each case runs in a fresh interpreter."""
import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

class Model(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        y, _ = self.rnn(2 * x)
        return self.head(torch.tanh(y)).sum()

class Mixed(torch.nn.Module):
    def __init__(self, ours):
        super().__init__()
        self.ours, self.theirs, self.head = ours, torch.nn.LSTM(3, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        y, _ = self.ours(2 * x)
        y, _ = self.theirs(torch.tanh(y))
        return self.head(y).sum()

def compile_once(model):
    # what Dynamo made of one call: graphs compiled, ops in them, why it broke or skipped a frame
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounter()
    torch.compile(model, backend=counter)(torch.randn(5, 2, 3))
    return dict(graphs=counter.frame_count, ops=counter.op_count, unsupported=sorted(counters["unimplemented"]),
                breaks=sorted(counters["graph_break"]))

found = dict(allow_rnn_before=torch._dynamo.config.allow_rnn)
if sys.argv[1] != "never":
    import persistrnn
if sys.argv[1] == "compiled":
    with persistrnn.backend("interpret"):
        ours = Model(persistrnn.GRU(3, 4))
        torch.compile(ours, fullgraph=True, backend="eager")(torch.randn(5, 2, 3))
        found["ours_path"] = ours.rnn.last_dispatch.path
        # ours next to torch.nn's own LSTM in one model: only the latter is refused
        found["mixed"] = compile_once(Mixed(persistrnn.GRU(3, 3)))
found["allow_rnn_after"] = torch._dynamo.config.allow_rnn
for cell in ("LSTM", "GRU"):
    found[cell] = compile_once(Model(getattr(torch.nn, cell)(3, 4)))
print(json.dumps(found))
"""


def run(mode):
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def never():
    return run("never")


@pytest.mark.parametrize("mode", ["imported", "compiled"])
def test_torch_nn_rnns_compile_as_without_persistrnn(never, mode):
    found = run(mode)
    for cell in ("LSTM", "GRU"):
        assert any("RNN" in why for why in never[cell]["unsupported"]), never[cell]  # Dynamo's default
        assert found[cell] == never[cell], cell
    assert found["allow_rnn_before"] is found["allow_rnn_after"] is never["allow_rnn_after"] is False
    if mode == "compiled":
        assert found["ours_path"] == "interpret"
        mixed = found["mixed"]
        # the frame holding torch.nn's LSTM is refused as in `never`; ours still compiles, in its own
        assert mixed["unsupported"] == never["LSTM"]["unsupported"], mixed
        assert mixed["graphs"] >= 1, mixed
