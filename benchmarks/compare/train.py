"""One training run: a cell on a task with a seed. Both cells of a seed see the same batches, the
same evaluation set, the same optimizer, learning rate and steps; only the layer differs.

The layers are persistrnn's (persistrnn.LSTM / GRU): on a GPU they run the kernels, on CPU
torch's native RNN; each run records the path its layer took (`last_dispatch`)."""
import dataclasses
import time

import torch
import torch.nn as nn

import persistrnn

from . import tasks as T

LEARNING_RATE = 5e-3
BATCH = 64
CLIP = 1.0
EVAL_BATCH = 512
EVAL_POINTS = 10  # evaluations along a run (and one at step 0)


class SequenceModel(nn.Module):
    """A one-layer persistrnn LSTM or GRU (batch first) and a linear readout at every step."""

    def __init__(self, cell, inputs, hidden, outputs):
        super().__init__()
        self.rnn = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(inputs, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.readout(self.rnn(x)[0])


@dataclasses.dataclass
class RunResult:
    task: str
    cell: str
    seed: int
    hidden: int
    seq: int
    steps_run: int
    stopped_by_budget: bool
    final: float  # the task's metric at the end
    curve: list  # [(step, training seconds, metric)], step 0 first
    steps_to_threshold: int = None  # None: the threshold was not reached
    seconds_to_threshold: float = None
    path: str = ""  # the layer's last_dispatch.path in training
    extra: dict = dataclasses.field(default_factory=dict)  # counting: recognized per n; digits: train accuracy


def _eval_set(task, seq, seed, device):
    """The fixed evaluation data of a (task, seed): the same for both cells."""
    gen = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    return _to(task.eval_set(gen, EVAL_BATCH, seq), device)


def _batches(task, seq, seed, device):
    """The training batches of a (task, seed), an endless stream, the same for both cells."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield _to(task.batch(gen, BATCH, seq), device)


def _to(value, device):
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value.to(device)


@torch.no_grad()
def _evaluate(model, task, data):
    model.eval()
    x, target = data
    value = T.metric(task, model(x), target)
    model.train()
    return value


def _setup(task, cell, hidden, seq, seed, device):
    torch.manual_seed(seed)  # the same initialization for a cell and seed, whatever ran before
    model = SequenceModel(cell, task.inputs, hidden, task.outputs).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE), _batches(task, seq, seed, device)


def _train_step(model, optimizer, task, x, target):
    """One Adam step; returns its wall time in seconds."""
    start = time.perf_counter()
    loss = T.loss(task, model(x), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def seconds_per_step(task, cell, hidden, seq, steps, device="cpu"):
    """Mean training seconds per step over `steps` steps of a throwaway model, after one untimed
    step (on a GPU the first compiles)."""
    model, optimizer, batches = _setup(task, cell, hidden, seq, 0, device)
    _train_step(model, optimizer, task, *next(batches))
    return sum(_train_step(model, optimizer, task, *next(batches)) for _ in range(steps)) / steps


def train_run(task, cell, hidden, seq, seed, steps, budget_seconds, device="cpu"):
    """Train `cell` on `task` for `steps` Adam steps (fewer if its training time passes
    budget_seconds; evaluation time is not counted) and evaluate EVAL_POINTS times along the way."""
    model, optimizer, batches = _setup(task, cell, hidden, seq, seed, device)
    eval_data = _eval_set(task, seq, seed, device)
    every = max(1, steps // EVAL_POINTS)
    curve = [(0, 0.0, _evaluate(model, task, eval_data))]
    seconds, step, stopped = 0.0, 0, False
    reached = None
    while step < steps:
        seconds += _train_step(model, optimizer, task, *next(batches))
        step += 1
        stopped = seconds > budget_seconds and step < steps
        if step % every == 0 or step == steps or stopped:
            value = _evaluate(model, task, eval_data)
            curve.append((step, seconds, value))
            if reached is None and task.reaches(value, seq):
                reached = (step, seconds)
        if stopped:
            break
    result = RunResult(task.name, cell, seed, hidden, seq, step, stopped, curve[-1][2], curve,
                       path=model.rnn.last_dispatch.path if model.rnn.last_dispatch else "")
    if reached:
        result.steps_to_threshold, result.seconds_to_threshold = reached
    if task.name == "counting":  # generalization in length: each n up to 3N, one string each
        ns = list(range(1, 3 * T.COUNTING_N + 1))
        x, target = _to(T.counting_strings(ns), device)
        with torch.no_grad():
            model.eval()
            result.extra["recognized"] = T.recognized(model(x), target).tolist()
        result.extra["ns"] = ns
    if task.name == "digits":
        result.extra["train_accuracy"] = _evaluate(model, task, _to(T.digits_data()[:2], device))
    return result
