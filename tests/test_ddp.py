"""DistributedDataParallel and DataParallel: a model with a persistrnn layer trains under
DDP, one process per rank (gloo on CPU, the kernels through the interpreter), with the same losses
as the same model with torch.nn's layer, and the ranks' weights stay identical; and under
DataParallel."""
import os
import socket
import time

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

WORLD = 2
STEPS = 3
TIMEOUT_S = 300


class Model(nn.Module):
    def __init__(self, rnn_cls):
        super().__init__()
        self.rnn = rnn_cls(3, 16, num_layers=2, dtype=torch.float64)
        self.head = nn.Linear(16, 1, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1]).squeeze(-1)


def _train(model, seed_of_step):
    """STEPS steps of SGD on random batches (step's from seed_of_step(step)); the losses."""
    import persistrnn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(seed_of_step(step))
        x = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
        target = torch.randn(4, generator=gen, dtype=torch.float64)
        with persistrnn.backend("interpret"):
            loss = (model(x) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _worker(rank, port, out_dir):
    import persistrnn
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    record = {}
    for kind, cls in (("persistrnn", persistrnn.LSTM), ("torch.nn", nn.LSTM)):
        torch.manual_seed(0)  # the same initial weights for both kinds and on every rank
        model = DistributedDataParallel(Model(cls))
        losses = _train(model, lambda step: 1000 * step + rank)  # each rank its own batch
        path = model.module.rnn.last_dispatch.path if kind == "persistrnn" else "torch.nn"
        record[kind] = dict(losses=losses, path=path,
                            weights=torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # Skip the process group's teardown: ProcessGroupGloo's destructor joins its worker thread while
    # holding the GIL, and that thread can be waiting for the GIL (a deadlock seen once in CI).
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_trains_with_the_same_losses_as_torch_nn(tmp_path):
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # a hung rank fails the test instead of holding up CI
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP ranks did not finish in {TIMEOUT_S} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for record in ranks:
        assert record["persistrnn"]["path"] == "interpret"
        torch.testing.assert_close(torch.tensor(record["persistrnn"]["losses"]),
                                   torch.tensor(record["torch.nn"]["losses"]), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(record["persistrnn"]["weights"], record["torch.nn"]["weights"],
                                   rtol=1e-9, atol=1e-12)
    # the ranks saw different batches, yet DDP's all-reduce kept their weights identical
    assert ranks[0]["persistrnn"]["losses"] != ranks[1]["persistrnn"]["losses"]
    assert torch.equal(ranks[0]["persistrnn"]["weights"], ranks[1]["persistrnn"]["weights"])


def test_data_parallel_trains_with_the_same_losses_as_torch_nn():
    """nn.DataParallel around a model with a persistrnn layer. Without GPUs (here) it runs the module
    itself; with several, it replicates it per GPU (torch.nn's RNN replication, which re-points the
    flat weights at each replica's parameters: ours inherits it; not run without GPUs)."""
    import persistrnn
    losses = {}
    for kind, cls in (("persistrnn", persistrnn.GRU), ("torch.nn", nn.GRU)):
        torch.manual_seed(0)
        model = nn.DataParallel(Model(cls))
        losses[kind] = _train(model, lambda step: step)
        if kind == "persistrnn":
            assert model.module.rnn.last_dispatch.path == "interpret"
    torch.testing.assert_close(torch.tensor(losses["persistrnn"]), torch.tensor(losses["torch.nn"]),
                               rtol=1e-9, atol=1e-12)
    assert len(set(losses["persistrnn"])) == STEPS  # it trained: the loss moved
