"""The validation loss the loop logs: the mean over fixed batches of the val split."""

from __future__ import annotations

import torch

from moorelm.config import TrainConfig
from moorelm.data import DataSource
from moorelm.device import Precision, autocast
from moorelm.training.distributed import Dist, all_sum, is_sharded


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, data: DataSource, cfg: TrainConfig, seq_len: int,
                  device: torch.device, precision: Precision, d: Dist = Dist()) -> float:
    """Mean val loss over ``eval_iters`` fixed batches (the same windows for every run),
    shared out over the ranks."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    # a sharded model's forward is a collective, so then every rank runs the same number of
    # batches (a rank past the end repeats a batch without counting it)
    rounds = -(-cfg.eval_iters // d.world) if is_sharded(model) else None
    stop = rounds * d.world if rounds else cfg.eval_iters
    for i in range(d.rank, stop, d.world):
        b = data.val_batch(i % cfg.eval_iters, cfg.eval_batch_size or cfg.batch_size, seq_len)
        with autocast(device, precision):
            _, loss = model(b.inputs.to(device), b.targets.to(device),
                            segments=None if b.segments is None else b.segments.to(device))
        if i < cfg.eval_iters:
            total += float(loss)
            n += 1
    model.train(was)
    total, count = all_sum([total, n], d, device)
    return total / max(1, int(count))
