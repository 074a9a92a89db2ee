"""The per-process loss scale of train_epoch, without launching processes: N threads stand in for N torchrun
processes (an all-reduce over a barrier for Dist.sum, and DDP's gradient averaging as an optimizer pre-hook)."""
import copy
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offroad.heads import ConvNeXtHead
from offroad.losses import build_loss
from offroad.runtime import Dist, Run
from offroad.segmenter import Segmenter
from offroad.training import Trainer, epoch_batches, make_optimizer, train_epoch
from offroad.vit import DinoVisionTransformer
from tests.conftest import make_params

K, IGNORE, LR = 4, 255, 0.5
SGD = {"optimizer.name": "sgd", "optimizer.lr": LR, "optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0,
       "loss.class_weighted": True}


class Exchange:
    """All-reduce (sum) among `world` threads."""

    def __init__(self, world: int):
        self.barrier, self.slots = threading.Barrier(world, timeout=60), [None] * world

    def all_reduce(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        total = sum(self.slots)
        self.barrier.wait()
        return t.copy_(total)


@dataclass(frozen=True)
class ThreadDist(Dist):
    exchange: Exchange | None = None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.exchange.all_reduce(self.rank, t) if self.world > 1 else t


def data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 16, 2, 4, generator=g)
    target = torch.randint(0, K, (n, 14, 28), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.3] = IGNORE
    target[1] = IGNORE  # an image without labels: weight 0 wherever it lands (image 0 fills empty shares)
    return feats, target, torch.tensor([0.5, 1.0, 2.0, 4.0])


def segmenter() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(DinoVisionTransformer(16, 1, 2), ConvNeXtHead(16, 8, K))


def train_one_epoch(model, feats, target, weights, batch_size, world):
    """Each rank's head after one epoch and what train_epoch returned, for `world` threads."""
    params = make_params(SGD)
    exchange, results = Exchange(world), [None] * world

    def rank_main(rank):
        dist = ThreadDist(rank, world, local=rank, exchange=exchange)
        m = copy.deepcopy(model)
        opt = make_optimizer(params, m.head.parameters())

        def average_gradients(o, *_):  # what DDP does in backward
            for p in (p for g in o.param_groups for p in g["params"]):
                p.grad.copy_(exchange.all_reduce(rank, p.grad) / world)

        if world > 1:
            opt.register_step_pre_hook(average_gradients)
        batches = epoch_batches(len(feats), batch_size, 0, 0, dist)
        inputs = ((feats[b], target[b]) for b, _ in batches)
        run = Run(torch.device("cpu"), False, K, IGNORE, dist)
        t = Trainer(m, m.head, opt, run.grad_scaler(), build_loss(params.loss, weights, IGNORE), run)
        stats = train_epoch(t, inputs, batches, f"rank {rank}")
        results[rank] = (m.head.state_dict(), stats)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results), "a rank failed"
    return results


@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_step_is_sgd_on_the_global_batch_weighted_mean(world):
    model = segmenter()
    feats, target, weights = data(5)
    # independent: one SGD step on the weighted cross-entropy over all 5 images, in float64
    head = copy.deepcopy(model.head).double()
    logits = F.interpolate(head(feats.double()), size=target.shape[-2:], mode="bilinear", align_corners=False)
    F.cross_entropy(logits, target, weight=weights.double(), ignore_index=IGNORE).backward()
    expected = {n: p.detach() - LR * p.grad for n, p in head.named_parameters()}
    for state, _ in train_one_epoch(model, feats, target, weights, 5, world):
        for n, e in expected.items():
            torch.testing.assert_close(state[n].double(), e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_processes_take_the_steps_of_one_process(world):
    # 7 images in batches of 4: shares of 2+2 and 2+1 (world 2), 2+1+1 and 1+1+1 (world 3); 5 images in world 3
    # leave the last global batch (1 image) with empty shares, which still join the gradient average
    for n in (7, 5):
        model = segmenter()
        feats, target, weights = data(n, seed=n)
        (single, one), = train_one_epoch(model, feats, target, weights, 4, 1)
        for state, stats in train_one_epoch(model, feats, target, weights, 4, world):
            for name in single:
                torch.testing.assert_close(state[name], single[name], rtol=1e-4, atol=1e-6)
            assert stats.loss == pytest.approx(one.loss, rel=1e-6)
            assert torch.equal(stats.cm, one.cm)
