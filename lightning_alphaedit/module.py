"""``AlphaEditModule``: the value-vector optimization of each edit batch as a training step.

The torch pieces (targets, prompts, values, keys) know nothing of Lightning; this module
wires them into the Trainer. Its ``training_step`` runs the batched δ optimization with
manual optimization and returns the target values; the ``NullSpaceUpdate`` callback then
applies the closed-form weight update. Without that callback the module refuses to run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from tqdm.auto import tqdm

from lightning_alphaedit.chat import FORMS, render_template, require_chat_template
from lightning_alphaedit.collective import Collective
from lightning_alphaedit.evaluation import EditEvaluation, EvaluationConfig
from lightning_alphaedit.keys import KeyReader
from lightning_alphaedit.models import ModelConfig, context_length, load_model, load_tokenizer
from lightning_alphaedit.prompts import generate_context_templates
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.timing import timed
from lightning_alphaedit.values import (
    ValueOptimizationConfig,
    ValueResult,
    optimize_values,
)

if TYPE_CHECKING:
    from lightning_alphaedit.datamodule import RequestBatch


@dataclass
class ContextConfig:
    """The context prefixes prepended to each rewrite prompt (seeded samples from the model)."""

    starts: list[str] = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    """Words each context text is sampled from (one text per word)."""
    length: int = 10
    """Tokens per context text, start word included."""
    forms: list[str] = field(default_factory=lambda: ["question"])
    """The input forms the rewrite prompts are edited in (every context prefix in each): ``question``
    (the prompt as it is), ``qa_instruction`` and ``chat``, where the prompt with its context
    prefix is the user turn of the chat template and the new target the assistant's whole answer,
    ended by the turn's end token, so keys and target values are computed in the context a chat
    model is asked in. The first form's bare prompt gives the edited value's starting point."""

    def __post_init__(self) -> None:
        if not self.forms or any(f not in FORMS for f in self.forms) or len(set(self.forms)) != len(self.forms):
            raise ValueError(f"context.forms must be distinct input forms of {FORMS}, got {self.forms!r}")


class AlphaEditModule(pl.LightningModule):
    """Holds the causal LM (frozen) and optimises the target value of every edit request.

    Args:
        lm: Which language model to edit and how to load it.
        values: Hyperparameters of the value-vector optimization.
        context: Context prefixes of the rewrite prompts.
        evaluation: What validation (after every edit epoch) and test (after the stream) measure.
        seed: Seeds every random choice of the module (context prefixes, fluency sampling).
    """

    def __init__(
        self,
        lm: ModelConfig = ModelConfig(),
        values: ValueOptimizationConfig = ValueOptimizationConfig(),
        context: ContextConfig = ContextConfig(),
        evaluation: EvaluationConfig = EvaluationConfig(),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lm_config, self.values, self.context, self.seed = lm, values, context, seed
        self.evaluation = evaluation
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold no model weights, see on_save_checkpoint
        self.lm: torch.nn.Module | None = None
        self.targets: ModelTargets | None = None
        self.context_templates: list[str] | None = None
        self.chat_templates: list[bool] | None = None  # per context template: a chat rendering
        self.edit_layer: int | None = None  # the last edited layer, set by the callback
        self.optimize_values = True  # False for methods without target values (ft), set by the callback
        self.collective = Collective()  # the ranks sharing each edit batch, set by the callback
        self.baseline: dict[str, float] | None = None  # the unedited model's scores on the stream
        self.wild_reference: dict[str, str] = {}  # the unedited model's free answers, recorded at the baseline
        self.val_metrics = EditEvaluation(evaluation, seed)
        self.test_metrics = EditEvaluation(evaluation, seed)
        self.test_results: dict[str, float] | None = None  # the edited model's scores after the stream

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.lm_config)

    def max_request_tokens(self) -> int | None:
        """Tokens a prompt and its answer may take: the model's context less the context prefix
        that precedes every rewrite prompt (the edit stream checks its requests against it)."""
        limit = context_length(self.lm_config, self.tokenizer)
        return None if limit is None else limit - self.context.length

    def configure_model(self) -> None:
        if self.lm is None:
            self.lm = load_model(self.lm_config, self.tokenizer)
            self.targets = ModelTargets(self.lm, self.lm_config.templates)
        wild = self.evaluation.wild
        if "chat" in [*self.context.forms, *(wild.forms if wild.enabled else [])]:
            require_chat_template(self.tokenizer)  # before any statistics or edit

    def train(self, mode: bool = True) -> AlphaEditModule:
        # Lightning switches modules to train mode during fit; dropout would make every
        # value, key and update random, so the language model always stays in eval mode.
        super().train(mode)
        if self.lm is not None:
            self.lm.eval()
        return self

    def configure_optimizers(self):
        return None  # δ has its own Adam inside each step; the model is frozen

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a RequestBatch (strings); tensors are made on the device later

    def setup(self, stage: str) -> None:
        from lightning_alphaedit.callbacks import NullSpaceUpdate

        if stage == "fit" and not any(isinstance(cb, NullSpaceUpdate) for cb in self.trainer.callbacks):
            raise RuntimeError(
                "AlphaEditModule needs the NullSpaceUpdate callback, which applies the weight updates: "
                "add it to Trainer(callbacks=[...]) (the lightning-alphaedit CLI always adds it)"
            )

    def prepare_editing(self, edit_layer: int, optimize_values: bool = True, collective: Collective | None = None) -> None:
        """Called by the callback before any edit: fixes the optimised layer and the context prefixes,
        whether the method needs target values at all (fine-tuning does not), and the ranks that
        share each batch."""
        self.edit_layer, self.optimize_values = edit_layer, optimize_values
        self.collective = collective or Collective()
        if self.context_templates is None:
            templates = generate_context_templates(
                self.lm, self.tokenizer, self.context.starts, self.context.length, self.seed
            )
            pairs = [(form, template) for form in self.context.forms for template in templates]
            self.context_templates = [render_template(self.tokenizer, form, t) for form, t in pairs]
            self.chat_templates = [form == "chat" for form, _ in pairs]

    def measure_baseline(self, requests: Sequence[EditRequest], batch_size: int, progress: bool = False) -> dict[str, float]:
        """The unedited model's scores (every test-stage figure) on every request of the stream,
        measured once before the first edit (kept in checkpoints) and logged.

        ``batch_size`` should be the test loader's: generation is seeded per batch, so the same
        batches give the unedited and the edited model the same sampling noise.
        """
        if self.baseline is None:
            evaluation = EditEvaluation(self.evaluation, self.seed).to(self.device)
            chunks = [requests[start : start + batch_size] for start in range(0, len(requests), batch_size)]
            mine = chunks[self.collective.rank :: self.collective.world_size]  # the test loader's shards
            for chunk in tqdm(mine, desc="unedited baseline", unit="batch", disable=not progress, leave=False):
                evaluation.update(self.lm, self.tokenizer, self.targets, chunk, generation=True, wild=True,
                                  wild_reference=self.wild_reference, record_wild=True)
            self.baseline = evaluation.compute()
            for shard in self.collective.gather_objects(self.wild_reference):  # every rank validates any request later
                self.wild_reference.update(shard)
            for logger in self.loggers:
                logger.log_metrics({f"baseline/{k}": v for k, v in self.baseline.items()}, step=0)
        return self.baseline

    # --- what the callback reads -------------------------------------------------------------

    def key_reader(self, requests: Sequence[EditRequest], frozen_below: int = 0) -> KeyReader:
        """Keys and current values of ``requests`` (an empty share of a batch smaller than the
        world included), read on the model as it is at each read; the blocks below
        ``frozen_below`` are taken not to change meanwhile."""
        return KeyReader(self.lm, self.tokenizer, self.targets, requests, self.context_templates, frozen_below)

    # --- the loop ------------------------------------------------------------------------------

    def training_step(self, batch: RequestBatch, batch_idx: int) -> dict:
        if self.edit_layer is None or self.context_templates is None:
            raise RuntimeError("training_step before NullSpaceUpdate prepared the module")
        # every rank receives the whole batch and optimises its own share of it
        share = batch[self.collective.share(len(batch))]
        if not self.optimize_values or not share:  # ft edits from the requests alone; or an empty share
            empty = torch.zeros(0, self.targets.value_size(self.edit_layer), device=self.device)
            return {"requests": batch, "share": share, "targets": empty, "values": None, "seconds": {}}
        seconds: dict[str, float] = {}
        with torch.enable_grad(), timed(seconds, "values", self.device):
            result: ValueResult = optimize_values(
                self.lm, self.tokenizer, self.targets, share, self.edit_layer, self.context_templates, self.values,
                chat=self.chat_templates or False,
            )
        size = len(share)
        self.log("edit/value_loss", result.loss.mean(), batch_size=size, prog_bar=True)
        self.log("edit/value_nll", result.nll.mean(), batch_size=size)
        self.log("edit/value_steps", result.steps.float().mean(), batch_size=size)
        return {"requests": batch, "share": share, "targets": result.targets, "values": result, "seconds": seconds}

    def validation_step(self, batch: RequestBatch, batch_idx: int) -> None:
        self.val_metrics.update(self.lm, self.tokenizer, self.targets, batch, wild=self.evaluation.wild.every_epoch,
                                wild_reference=self.wild_reference)

    def on_validation_epoch_end(self) -> None:
        for name, value in self.val_metrics.compute().items():
            self.log(f"val/{name}", value, sync_dist=True)  # already reduced: the same on every rank
        self.val_metrics.reset()

    def test_step(self, batch: RequestBatch, batch_idx: int) -> None:
        self.test_metrics.update(self.lm, self.tokenizer, self.targets, batch, generation=True, wild=True,
                                 wild_reference=self.wild_reference)

    def on_test_epoch_end(self) -> None:
        self.test_results = self.test_metrics.compute()
        for name, value in self.test_results.items():
            self.log(f"test/{name}", value, sync_dist=True)
        self.test_metrics.reset()

    # --- checkpoints: only what this module owns ---------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen model is reloaded from its source; the edited layers are checkpointed by
        # NullSpaceUpdate. Writing every weight of an 8B model per epoch would be wasteful.
        checkpoint["state_dict"] = {}
        checkpoint["context_templates"] = self.context_templates
        checkpoint["chat_templates"] = self.chat_templates
        checkpoint["baseline"] = self.baseline
        checkpoint["wild_reference"] = self.wild_reference
        # plain data only, so the checkpoint loads with torch.load(weights_only=True)
        checkpoint["hyper_parameters"] = {
            k: asdict(v) if is_dataclass(v) else v for k, v in checkpoint.get("hyper_parameters", {}).items()
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.context_templates = checkpoint.get("context_templates")
        self.chat_templates = checkpoint.get("chat_templates")
        self.baseline = checkpoint.get("baseline")
        self.wild_reference = dict(checkpoint.get("wild_reference") or {})
