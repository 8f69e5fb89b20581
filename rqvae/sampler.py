"""Batch index samplers for training: plain shuffling and hierarchical (taxonomy-aware) batches."""
from __future__ import annotations

from collections.abc import Iterator

import torch


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator,
                     device: torch.device) -> Iterator[torch.Tensor]:
    """Indices of one epoch in random order, ``batch_size`` at a time (last partial batch dropped
    when at least one full batch exists)."""
    order = torch.randperm(n, generator=generator).to(device)
    stop = n - n % batch_size if n >= batch_size else n
    yield from order[:stop].split(batch_size)


class HierarchicalSampler:
    """Batches where about half the items come from one parent category and the rest from others.

    Sibling leaves of the same parent then appear together, so the contrastive regularizer sees
    hard negatives (same parent, different child) as well as easy ones (Instacart's sampling).

    Args:
        parent_ids: (N,) int64 id of each item's top-level category; -1 = unknown.
        batch_size: items per batch.
        fraction: share of a batch drawn from the chosen parent.
    """

    def __init__(self, parent_ids: torch.Tensor, batch_size: int, fraction: float = 0.5) -> None:
        self.n, self.batch_size = len(parent_ids), batch_size
        self.n_from_parent = int(round(batch_size * fraction))
        order = torch.argsort(parent_ids.cpu(), stable=True)
        self.sorted_items = order
        groups, counts = torch.unique_consecutive(parent_ids.cpu()[order], return_counts=True)
        known = groups >= 0
        starts = torch.cumsum(counts, 0) - counts
        self.starts, self.counts = starts[known], counts[known]

    def batches(self, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
        """One epoch of N // batch_size batches of item indices (on ``device``)."""
        for _ in range(max(1, self.n // self.batch_size)):
            yield self._one_batch(generator).to(device)

    def _one_batch(self, generator: torch.Generator) -> torch.Tensor:
        if len(self.counts) == 0:
            return torch.randint(self.n, (self.batch_size,), generator=generator)
        group = int(torch.multinomial(self.counts.double(), 1, generator=generator))
        start, count = int(self.starts[group]), int(self.counts[group])
        inside = self.sorted_items[start + torch.randint(count, (self.n_from_parent,), generator=generator)]
        if count == self.n:  # one parent holds every item: there are no "others" to draw from
            return torch.cat([inside, torch.randint(self.n, (self.batch_size - self.n_from_parent,),
                                                    generator=generator)])
        outside_pos = torch.randint(self.n - count, (self.batch_size - self.n_from_parent,), generator=generator)
        outside_pos = outside_pos + count * (outside_pos >= start)  # skip the chosen group's block
        return torch.cat([inside, self.sorted_items[outside_pos]])
