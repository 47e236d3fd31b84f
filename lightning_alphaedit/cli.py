"""``lightning-alphaedit``: the single entry point, a LightningCLI over YAML configs.

    lightning-alphaedit fit --config configs/tiny.yaml
    lightning-alphaedit fit --config configs/llama3-8b.yaml --data.limit 2000

Configs are parsed in OmegaConf mode (``${...}`` interpolation works). The
``NullSpaceUpdate`` callback is always present and configured under ``edit:``.
W&B runs offline unless ``WANDB_MODE`` says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from lightning_alphaedit.callbacks import NullSpaceUpdate
from lightning_alphaedit.datamodule import EditStreamDataModule
from lightning_alphaedit.export import run_directory
from lightning_alphaedit.module import AlphaEditModule


class SaveRunConfig(SaveConfigCallback):
    """Stores the resolved config in the run's own folder and sends it to the loggers (W&B)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        path = run_directory(trainer) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict()})


class AlphaEditCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(NullSpaceUpdate, "edit")

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        update = next(cb for cb in trainer.callbacks if isinstance(cb, NullSpaceUpdate))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        print(f"\nedits applied: {update.edits_applied}, batches rejected: {len(update.rejected)}")
        for name, value in sorted(metrics.items()):
            print(f"  {name:24s} {100 * value:6.1f} %")
        print(f"run folder:   {run_directory(trainer)}")
        if update.exported_to:
            print(f"edited model: {update.exported_to}")
        for logger in trainer.loggers:
            if hasattr(logger, "experiment") and hasattr(logger.experiment, "dir"):
                print(f"W&B run:      {Path(logger.experiment.dir).parent}")


def run(args: list[str] | None = None) -> AlphaEditCLI:
    """Parse ``args`` (default: the command line), run the subcommand, return the CLI."""
    os.environ.setdefault("WANDB_MODE", "offline")
    return AlphaEditCLI(
        AlphaEditModule,
        EditStreamDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"save_to_log_dir": False},
        auto_configure_optimizers=False,
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """The ``lightning-alphaedit`` console script."""
    run(args)
