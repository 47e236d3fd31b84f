"""Editing on several processes: what the ranks share and how.

One edit batch is split across the ranks, never the stream: every rank receives the whole
edit batch, optimises the target values of its own contiguous share (the expensive part,
now in parallel), and the update is then made once:

- keys, current values and targets of every share are gathered to every rank, in rank
  order, which is the batch's order (`Collective.gather_rows`, uneven shares padded);
- rank 0 solves and applies each layer's update; the layer's weight is broadcast from it, so
  every rank holds bitwise the same weights; whether the batch was refused is broadcast too,
  so a batch is rolled back on every rank or on none;
- the sequential cache grows on every rank from the same gathered keys.

Key statistics are sharded the same way (`lightning_alphaedit.statistics`): each rank
accumulates its slice of the corpus, the sums are all-reduced, rank 0 writes the cache.

`Collective` is plain torch.distributed (no Lightning); in one process every method is the
identity. The processes themselves come from Lightning (`lightning_alphaedit.strategy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class Collective:
    """The collective operations editing needs, over the default process group when one is
    initialised (any backend: gloo on CPUs, NCCL on GPUs), else the single-process identity."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items: the first ``count % world_size`` ranks
        take one more, so a batch that does not divide evenly still splits (some shares may be empty)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` (n_r, ...) concatenated in rank order: (sum n_r, ...)."""
        if not self.active:
            return rows
        sizes = torch.zeros(self.world_size, dtype=torch.long, device=rows.device)
        sizes[self.rank] = rows.shape[0]
        dist.all_reduce(sizes)  # every rank's share size
        widest = int(sizes.max())
        padded = rows.new_zeros((widest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded.contiguous())
        return torch.cat([piece[: int(size)] for piece, size in zip(pieces, sizes)])

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank 0's (same shape and dtype on every rank)."""
        if self.active:
            with torch.no_grad():
                dist.broadcast(tensor.data, src=0)
        return tensor

    def from_zero(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum over the ranks)."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise logical OR of a boolean tensor over the ranks (a new tensor)."""
        if not self.active:
            return flags.clone()
        as_int = flags.to(torch.int64).clone()
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
        return as_int.bool()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def run_on_zero(self, work: Callable[[], Any]) -> Any:
        """``work()`` on rank 0 only, its (picklable) result on every rank."""
        return self.from_zero(work() if self.is_zero else None)
