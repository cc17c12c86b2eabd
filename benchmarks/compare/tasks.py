"""The learning tasks: generators, losses, evaluation metrics and their known baselines.

Every generator takes a torch.Generator, so a run is reproducible from its seed, and returns
batch-first tensors: x (n, T, inputs) and the targets.

- adding (Hochreiter & Schmidhuber 1997; Bai et al. 2018): T uniform values and a marker channel
  with two ones, one in each half; the answer is the sum of the two marked values. Always
  answering 1 (the mean) has MSE Var(u1 + u2) = 2/12 = 1/6.
- copy (Arjovsky et al. 2016): 10 symbols from 8, T - 1 blanks, a delimiter, 10 blanks; the
  target is blank everywhere but the last 10 steps, which repeat the symbols. Blanks then a
  uniform guess over the 8 symbols has cross-entropy 10 ln 8 / (T + 20) per step.
- counting (Weiss et al. 2018): a^n b^n as next-symbol prediction. Once the first b is read,
  every next symbol is determined (n - 1 more b, then the end), and so is the first a after the
  start; those steps are trained and scored. A string is recognized when every determined step is
  predicted. Trained on n <= N, tested on n up to 3N: generalization in length.
- digits (scikit-learn's 8x8 digits, shipped with the package): each image as 64 steps of one
  pixel, classified after the last; a fixed split of 1200 training and 597 test images.
"""
import dataclasses
import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

COUNTING_N = 10  # counting: trained on n <= COUNTING_N, tested on n <= 3 * COUNTING_N
DIGITS_STEPS = 64
DIGITS_TRAIN = 1200


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    inputs: int
    outputs: int
    metric: str  # what evaluate() returns
    higher_is_better: bool
    min_seq: int  # the smallest --seq the task takes (0: it has no length option)
    default_seq: int
    default_steps: int  # training steps when --steps is not given: what the task needs on the default sizes
    margin: str  # what "beats the baseline" means, in words
    batch: Callable = dataclasses.field(repr=False, compare=False)  # (gen, n, seq) -> a training batch (x, target)
    eval_set: Callable = dataclasses.field(repr=False, compare=False)  # (gen, n, seq) -> the fixed evaluation data

    def baseline(self, seq):
        return BASELINES[self.name](seq)

    def threshold(self, seq):
        """The metric at which a run counts as learned (steps and time to threshold): the margin
        over the baseline, except for counting, whose margin is on lengths beyond training
        (beats_baseline) and whose threshold is every training length recognized."""
        return THRESHOLDS[self.name](seq)

    def reaches(self, value, seq):
        threshold = self.threshold(seq)
        return value >= threshold if self.higher_is_better else value <= threshold

    def beats_baseline(self, result):
        """Whether a finished run (train.RunResult) beats the baseline by the stated margin."""
        if self.name == "counting":
            return all(result.extra["recognized"][:2 * COUNTING_N])
        return self.reaches(result.final, result.seq)


# ---- adding ----

def adding_batch(gen, n, seq):
    values = torch.rand(n, seq, generator=gen)
    half = seq // 2
    first = torch.randint(0, half, (n,), generator=gen)
    second = torch.randint(half, seq, (n,), generator=gen)
    markers = torch.zeros(n, seq)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], dim=-1), values[rows, first] + values[rows, second]


# ---- copy ----

BLANK, DELIMITER, SYMBOLS, RECALL = 0, 9, 8, 10


def copy_batch(gen, n, seq):
    """tokens x (n, seq + 20) one-hot over 10, targets (n, seq + 20) class ids."""
    symbols = torch.randint(1, SYMBOLS + 1, (n, RECALL), generator=gen)
    tokens = torch.full((n, seq + 2 * RECALL), BLANK, dtype=torch.long)
    tokens[:, :RECALL] = symbols
    tokens[:, seq + RECALL - 1] = DELIMITER
    targets = torch.full_like(tokens, BLANK)
    targets[:, -RECALL:] = symbols
    return F.one_hot(tokens, 10).float(), targets


# ---- counting ----

START, A, B, END = 0, 1, 2, 3


def counting_strings(ns):
    """Start a^n b^n, padded: x (len(ns), 2 max(n) + 1, 4) one-hot, targets (next symbol), and the
    mask of the determined steps (the first a, and every step from the first b on)."""
    length = 2 * max(ns) + 1
    x = torch.zeros(len(ns), length, 4)
    targets = torch.zeros(len(ns), length, dtype=torch.long)
    mask = torch.zeros(len(ns), length, dtype=torch.bool)
    for row, n in enumerate(ns):
        string = [START] + [A] * n + [B] * n
        nexts = string[1:] + [END]
        x[row, torch.arange(len(string)), torch.tensor(string)] = 1.0
        targets[row, :len(string)] = torch.tensor(nexts)
        mask[row, 0] = True
        mask[row, n + 1:len(string)] = True  # from the first b (at n + 1) on
    return x, (targets, mask)


def counting_batch(gen, n, seq):
    return counting_strings(torch.randint(1, COUNTING_N + 1, (n,), generator=gen).tolist())


# ---- digits ----

@functools.lru_cache(maxsize=1)
def digits_data():
    """(x_train, y_train, x_test, y_test): pixels in [0, 1] as (n, 64, 1) sequences. Needs scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the digits task needs scikit-learn: pip install 'persistrnn[compare]'") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, DIGITS_STEPS, 1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # one fixed split
    train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return x[train], y[train], x[test], y[test]


def digits_batch(gen, n, seq):
    """n training images drawn with replacement (seq is the fixed 64)."""
    x_train, y_train, _, _ = digits_data()
    rows = torch.randint(0, len(y_train), (n,), generator=gen)
    return x_train[rows], y_train[rows]


# ---- the tasks ----

TASKS = {
    "adding": Task("adding", 2, 1, "MSE", False, 4, 50, 1000, "MSE at most 10% of the baseline's",
                   adding_batch, adding_batch),
    "copy": Task("copy", 10, 10, "cross-entropy per step", False, 1, 20, 3000,
                 "cross-entropy at most half the baseline's", copy_batch, copy_batch),
    "counting": Task("counting", 4, 4, f"fraction of n <= {COUNTING_N} recognized", True, 0, COUNTING_N, 1000,
                     f"every n <= {2 * COUNTING_N} recognized (twice the training lengths)", counting_batch,
                     lambda gen, n, seq: counting_strings(list(range(1, COUNTING_N + 1)))),
    "digits": Task("digits", 1, 10, "test accuracy", True, 0, DIGITS_STEPS, 1000,
                   "test accuracy at least 0.6", digits_batch,
                   lambda gen, n, seq: digits_data()[2:]),
}

BASELINES = {
    "adding": lambda seq: 1 / 6,
    "copy": lambda seq: 10 * math.log(8) / (seq + 20),
    "counting": lambda seq: 0.0,  # the fraction of lengths recognized by a model that learned nothing
    "digits": lambda seq: 0.1,  # chance over 10 balanced classes
}
THRESHOLDS = {
    "adding": lambda seq: 0.1 / 6,
    "copy": lambda seq: 0.5 * 10 * math.log(8) / (seq + 20),
    "counting": lambda seq: 1.0,  # for curves: every training length recognized
    "digits": lambda seq: 0.6,
}



# ---- losses and metrics, given the model's outputs (n, T, outputs) ----

def loss(task, out, target):
    if task.name == "adding":
        return F.mse_loss(out[:, -1, 0], target)
    if task.name == "copy":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    if task.name == "counting":
        targets, mask = target
        return F.cross_entropy(out[mask], targets[mask])
    return F.cross_entropy(out[:, -1], target)


def recognized(out, target):
    """Per string: every determined step predicted (counting)."""
    targets, mask = target
    wrong = (out.argmax(-1) != targets) & mask
    return ~wrong.any(dim=1)


def metric(task, out, target):
    """The task's metric of a batch of outputs (see Task.metric)."""
    if task.name in ("adding", "copy"):
        return loss(task, out, target).item()
    if task.name == "counting":
        return recognized(out, target).float().mean().item()
    return (out[:, -1].argmax(-1) == target).float().mean().item()
