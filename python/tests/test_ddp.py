"""Data-parallel training on an existing engine: torch.distributed DDP, two processes, the gloo
backend on the CPU. Each rank runs SVFT layers on its half of a batch; DDP all-reduces (averages)
the coefficient gradients, which must equal one process's gradients on the whole batch."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from svft.nn import SVFTLinear

BATCH, D_IN, D_HID, D_OUT = 10, 13, 21, 7


def _model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))
    return nn.Sequential(
        SVFTLinear.from_linear(base[0], pattern="banded:2", init="official", gate=True, seed=1),
        nn.Tanh(),
        SVFTLinear.from_linear(base[2], pattern="random:3:seed=4", init="official", gate=True, seed=2),
    )


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g)


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def _rank_main(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x, y = _data()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = nn.functional.mse_loss(model(x[part]), y[part])  # mean over this rank's rows
        loss.backward()  # DDP averages over ranks: the mean over the whole batch
        torch.save(_grads(model.module), os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process():
    model = _model()
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()
    want = _grads(model)
    assert len(want) == 4 and all(g.abs().sum() > 0 for g in want)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
        got = [torch.load(os.path.join(out, f"grads{r}.pt")) for r in range(2)]
    for rank_grads in got:
        for a, b in zip(rank_grads, want):
            assert ((a - b).norm() / b.norm()).item() < 1e-5, (a, b)
