"""The edit stream as a LightningDataModule: epoch e serves the e-th chunk of the stream.

A sequential editing run edits N requests in batches of ``batch_size``; ``edits_per_epoch``
requests make one edit "epoch", after which validation measures every edit so far. The
module records how far the stream has been applied (``position``), so a run resumed from
a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from lightning_alphaedit.requests import EditRequest, read_requests, validate_requests


class RequestBatch:
    """The requests of one batch, in order; indexing, slicing and iteration as a list's.

    Deliberately not a list (nor any Sequence): under ``precision: bf16-true`` Lightning
    walks a batch's lists and dataclasses to cast its float tensors, and refuses the frozen
    request dataclasses it finds. A batch holds strings only; there is nothing to cast.
    """

    __slots__ = ("requests",)

    def __init__(self, requests) -> None:
        self.requests: tuple[EditRequest, ...] = tuple(requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    def __getitem__(self, index):
        chosen = self.requests[index]
        return list(chosen) if isinstance(index, slice) else chosen

    def __repr__(self) -> str:
        return f"RequestBatch({len(self)} requests)"


class EditStreamDataModule(pl.LightningDataModule):
    """Streams edit requests from a file in order (or a seeded shuffle of it).

    Args:
        path: Edit requests: CounterFact (original or EasyEdit), zsRE-MEND, or the project's JSONL.
            A bare name like ``tiny_edits.jsonl`` is looked up in the package's data folder too.
        format: ``auto`` (detect), ``counterfact``, ``easyedit_counterfact``, ``zsre``, ``qaedit`` or ``jsonl``.
        batch_size: Requests per edit batch (one training step).
        edits_per_epoch: Requests per edit epoch; validation runs after each. None = the whole stream.
        limit: Edit only the first ``limit`` requests (after shuffling). None = all.
        shuffle: Shuffle the stream once, with ``seed``.
        seed: Seed of the shuffle.
        eval_batch_size: Requests per validation batch.
    """

    def __init__(
        self,
        path: str,
        format: str = "auto",
        batch_size: int = 100,
        edits_per_epoch: int | None = None,
        limit: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        eval_batch_size: int = 16,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (edits_per_epoch is not None and edits_per_epoch < 1):
            raise ValueError("batch_size and edits_per_epoch must be >= 1")
        if edits_per_epoch is not None and edits_per_epoch % batch_size:
            raise ValueError(f"edits_per_epoch ({edits_per_epoch}) must be a multiple of batch_size ({batch_size})")
        self.path, self.format, self.batch_size = path, format, batch_size
        self.edits_per_epoch, self.limit, self.shuffle, self.seed = edits_per_epoch, limit, shuffle, seed
        self.eval_batch_size = eval_batch_size
        self.requests: list[EditRequest] = []
        self.position = 0  # requests of the stream applied so far

    @property
    def source(self) -> Path:
        path = Path(self.path).expanduser()
        if not path.exists() and not path.is_absolute():
            packaged = Path(__file__).parent / "data" / self.path
            if packaged.exists():
                return packaged
        return path

    def load(self, tokenizer=None, max_tokens: int | None = None) -> list[EditRequest]:
        """Read and validate the whole stream (before anything is edited); with ``max_tokens``
        every prompt and its answer must fit in that many tokens."""
        requests = read_requests(self.source, format=self.format)
        if tokenizer is not None:
            validate_requests(requests, tokenizer, source=str(self.source), max_tokens=max_tokens)
        if self.shuffle:
            random.Random(self.seed).shuffle(requests)
        if self.limit is not None:
            requests = requests[: self.limit]
        if not requests:  # a run would export an unedited "edited" model and report success
            raise ValueError(f"{self.source}: no edit requests" + (f" (limit {self.limit})" if self.limit is not None else ""))
        return requests

    def setup(self, stage: str) -> None:
        if not self.requests:
            module = self.trainer.lightning_module if self.trainer is not None else None
            limit = module.max_request_tokens() if hasattr(module, "max_request_tokens") else None
            self.requests = self.load(getattr(module, "tokenizer", None), limit)

    @property
    def chunk_size(self) -> int:
        return self.edits_per_epoch or len(self.requests)

    @property
    def num_epochs(self) -> int:
        """Edit epochs needed for the whole stream."""
        return -(-len(self.requests) // self.chunk_size)

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self.requests)

    def advance(self, count: int) -> None:
        """Called when ``count`` more requests of the stream have been processed."""
        self.position += count

    def train_dataloader(self) -> DataLoader:
        # The chunk holding the next request to apply, from the stream position rather than the
        # epoch counter: a run resumed from a checkpoint written at an epoch's end (or in its
        # middle) goes on with exactly the requests not yet applied.
        start = self.position
        end = min((start // self.chunk_size + 1) * self.chunk_size, len(self.requests))
        return DataLoader(self.requests[start:end], batch_size=self.batch_size, collate_fn=RequestBatch)

    def val_dataloader(self) -> DataLoader:
        """Every request edited by the end of the current edit epoch (validation runs after it).

        Lightning builds the first validation loader before epoch 0 has edited anything and
        reloads it only from epoch 1 on; a loader of ``requests[:position]`` would leave epoch
        0 (and a run of one epoch) unvalidated.
        """
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        end = max(self.position, min((epoch + 1) * self.chunk_size, len(self.requests)))
        return self._evaluation_loader(self.requests[:end])

    def test_dataloader(self) -> DataLoader:
        """Every request of the stream processed so far (after fit: the whole edited stream)."""
        return self._evaluation_loader(self.requests[: self.position])

    def _evaluation_loader(self, requests: list[EditRequest]) -> DataLoader:
        """Batches of ``eval_batch_size``; under several processes rank r takes batches r, r + w, ...
        Whole batches, not samples, are dealt out, so each batch (and the seeded generation in it)
        is the one a single process sees, and no request is repeated to even out the ranks (the
        metrics sum over the ranks)."""
        batches = [requests[i : i + self.eval_batch_size] for i in range(0, len(requests), self.eval_batch_size)]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        mine = batches[rank::world]
        if batches and not mine:  # fewer batches than ranks: Lightning refuses an empty loader on a rank
            mine = [[]]  # an empty batch scores nothing; the metrics still synchronise
        return DataLoader(mine, batch_size=None, collate_fn=RequestBatch)

    def stream_fingerprint(self) -> str:
        return hashlib.sha256("\n".join(r.case_id for r in self.requests).encode()).hexdigest()[:16]

    def content_fingerprint(self) -> str:
        """A hash of every field of every request in order: a data file changed under the same case ids differs."""
        records = json.dumps([r.to_dict() for r in self.requests], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(records.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {
            "position": self.position, "stream": self.stream_fingerprint(), "size": len(self.requests),
            "content": self.content_fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.requests and state["stream"] != self.stream_fingerprint():
            raise ValueError(
                f"the checkpoint was made on another edit stream ({state['size']} requests, "
                f"fingerprint {state['stream']}) than {self.source} ({len(self.requests)} requests)"
            )
        if self.requests and "content" in state and state["content"] != self.content_fingerprint():
            raise ValueError(
                f"the checkpoint was made on an edit stream with the same case ids but other content than "
                f"{self.source} now holds (content fingerprint {state['content']}, now {self.content_fingerprint()}): "
                "the file changed since; resume with the data it was made on, or start a new run"
            )
        self.position = int(state["position"])
