"""Deterministic batch order that a resumed run can rebuild from the step number alone."""

from __future__ import annotations

import torch


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of the examples this process uses at ``micro_step``.

    The data is read as an endless sequence of epochs, each a seeded permutation of ``range(n)``; micro-step ``m``
    takes the ``batch_size * world`` items starting at ``m * batch_size * world`` and process ``rank`` keeps its
    slice. Nothing depends on earlier steps, so resuming at any step yields the same batches.
    """
    if n <= 0:
        raise ValueError("no examples to batch")
    global_batch = batch_size * world
    start = micro_step * global_batch + rank * batch_size
    out: list[int] = []
    perm_epoch, perm = -1, None
    for c in range(start, start + batch_size):
        epoch, pos = divmod(c, n)
        if epoch != perm_epoch:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perm, perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        out.append(perm[pos])
    return out
