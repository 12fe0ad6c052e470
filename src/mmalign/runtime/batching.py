"""Deterministic batch order that a resumed run can rebuild from the step number alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


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
    for c in range(start, start + batch_size):
        epoch, pos = divmod(c, n)
        out.append(_permutation(n, seed, epoch)[pos])
    return out


def _grouped_epoch(lengths: Sequence[int], global_batch: int, group: int, seed: int, epoch: int) -> tuple[int, ...]:
    """One epoch of ``len(lengths) // global_batch`` global batches, each of items of similar length."""
    n_batches = len(lengths) // global_batch
    perm = _permutation(len(lengths), seed, epoch)[: n_batches * global_batch]
    chunk = global_batch * group
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    out: list[int] = []
    for start in range(0, len(perm), chunk):
        items = sorted(perm[start : start + chunk], key=lambda i: (lengths[i], i))
        batches = [items[b : b + global_batch] for b in range(0, len(items), global_batch)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            out.extend(batches[b])
    return tuple(out)


def length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    micro_step: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    group: int = 64,
) -> list[int]:
    """Like ``batch_indices``, but each global batch holds examples of similar length (less padding).

    Every epoch is a seeded permutation cut into chunks of ``group`` global batches; a chunk is sorted by length
    and split into global batches, whose order inside the chunk is shuffled again. The few examples that do not
    fill a last global batch sit the epoch out (a different few each epoch). Stateless like ``batch_indices``:
    a resumed run rebuilds the same batches from the step number.

    Args:
        lengths: a length (any monotone proxy: characters, tokens) per example.
        group: global batches per sorted chunk; larger pads less but orders the data less randomly.
    """
    return Batches(len(lengths), batch_size, seed, rank, world, tuple(lengths), group)(micro_step)


@dataclass(frozen=True)
class Batches:
    """The batch order of one run and process: ``batches(micro_step)`` gives that micro-step's example indices.

    With ``lengths`` set, batches are grouped by length (the order ``length_grouped_indices`` documents; each
    epoch's order is built once and kept); otherwise plain seeded epochs (``batch_indices``).
    """

    n: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    lengths: tuple[int, ...] | None = None
    group: int = 64
    _orders: dict[int, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_run(cls, examples: Sequence[Any], cfg: Any, rank: int = 0, world: int = 1) -> Batches:
        """Batches over ``examples`` (records with ``text_length``) as ``cfg`` (a ``TrainConfig``) asks."""
        lengths = tuple(e.text_length for e in examples) if cfg.group_by_length else None
        return cls(len(examples), cfg.batch_size, cfg.seed, rank, world, lengths)

    def _epoch_order(self, epoch: int) -> tuple[int, ...]:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.clear()
            lengths = self.lengths or ()
            self._orders[epoch] = _grouped_epoch(lengths, self.batch_size * self.world, self.group, self.seed, epoch)
        return self._orders[epoch]

    def __call__(self, micro_step: int, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        if self.lengths is None:
            return batch_indices(self.n, self.batch_size, micro_step, self.seed, r, self.world)
        global_batch = self.batch_size * self.world
        per_epoch = self.n // global_batch
        if per_epoch == 0:
            raise ValueError(f"length grouping needs a full batch of {global_batch} examples, got {self.n}")
        epoch, b = divmod(micro_step, per_epoch)
        start = b * global_batch + r * self.batch_size
        return list(self._epoch_order(epoch)[start : start + self.batch_size])
