"""``lightning-alphaedit``: the single entry point, a LightningCLI over YAML configs.

    lightning-alphaedit fit --config configs/tiny.yaml
    lightning-alphaedit fit --config configs/llama3-8b.yaml --data.limit 2000
    lightning-alphaedit statistics --config configs/llama3-8b.yaml --statistics.output stats/
    lightning-alphaedit trace --config configs/demo.yaml --trace.limit 20
    lightning-alphaedit spectrum --config configs/demo.yaml
    lightning-alphaedit report RUN_DIR [RUN_DIR ...]
    lightning-alphaedit ask RUN_DIR ["The capital of Norway is" ...]

``trace`` reads the same config (the model, the edit stream) plus its own ``trace:``
section, and runs causal tracing instead of training. ``report`` draws the figures of
finished runs against the number of edits (see `lightning_alphaedit.report`); ``spectrum``
shows the key statistics' eigenvalues and the null space each selection rule keeps;
``ask`` answers prompts with the unedited and the edited model side by side (see
`lightning_alphaedit.ask`); ``statistics`` computes the key statistics a ``fit`` of the same
config would, and nothing else (resumable; exportable with a manifest).

Configs are parsed in OmegaConf mode (``${...}`` interpolation works). The
``NullSpaceUpdate`` callback is always present and configured under ``edit:``; the standard
monitors beside it under their own keys: ``drift:`` (`DriftMonitor`), ``history:``
(`EditHistory`), ``checkpoint:`` (`EditCheckpoint`) and ``export:`` (`ExportEditedModel`);
``enabled: false`` leaves one out.
W&B runs offline unless ``WANDB_MODE`` says otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from lightning_alphaedit import __version__
from lightning_alphaedit.ask import main as ask_main
from lightning_alphaedit.callbacks import (
    STANDARD_MONITORS,
    EditHistory,
    EditProgressBar,
    ExportEditedModel,
    NullSpaceUpdate,
    find_callback,
)
from lightning_alphaedit.datamodule import EditStreamDataModule
from lightning_alphaedit.evaluation import RATES
from lightning_alphaedit.wild import WILD_PREFIX
from lightning_alphaedit.run_folder import run_directory
from lightning_alphaedit.corpus import load_corpus
from lightning_alphaedit.module import AlphaEditModule
from lightning_alphaedit.report import main as report_main
from lightning_alphaedit.resume import read_checkpoint, report_differences
from lightning_alphaedit.spectrum import SpectrumConfig, parse_rule, spectrum_rows
from lightning_alphaedit.spectrum import eigenvalues as spectrum_eigenvalues
from lightning_alphaedit.spectrum import format_table as format_spectrum
from lightning_alphaedit.spectrum import save as save_spectrum
from lightning_alphaedit.statistics import (
    CollectionStopped,
    StatisticsCommandConfig,
    export_statistics,
    layer_statistics,
    statistics_keys,
)
from lightning_alphaedit.timing import timed
from lightning_alphaedit.trace import (
    TraceConfig,
    TraceResult,
    causal_trace,
    format_table,
    recommended,
    save_trace,
)


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


COMMANDS = {
    "fit": "edit a model with a stream of edit requests: statistics, value steps, projected weight "
           "updates, validation after every edit epoch, the test stage, the edited model saved",
    "ask": "answer prompts with the unedited and an edited model side by side",
    "statistics": "compute (or go on computing) the key statistics a fit with the same config needs, "
                  "and nothing else; --statistics.output DIR exports them for another machine",
    "trace": "causal tracing: which layers carry the facts of the edit stream's subjects",
    "spectrum": "the key statistics' eigenvalues and the null space each selection rule keeps",
    "report": "figures against the number of edits, and a table of final figures, from finished runs",
}
"""Every command of ``lightning-alphaedit``, with what it does (the top-level help)."""


TOOL = ("Knowledge editing with AlphaEdit (and MEMIT, PRUNE, RECT, FT) on PyTorch Lightning: change facts "
        "inside a language model, keep everything else it knows.")


def usage() -> str:
    """The top-level help: what the tool is, and every command in one line."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lightning-alphaedit COMMAND [options]",
        "",
        TOOL,
        "",
        "commands:",
        *(f"  {name:{width}s}  {text}" for name, text in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help     show this help and exit",
        "  --version      show the version and exit",
        "  --debug        show the traceback behind an error message",
        "",
        "lightning-alphaedit COMMAND --help lists a command's options, e.g.",
        "  lightning-alphaedit fit --config configs/demo.yaml",
        "  lightning-alphaedit fit --help",
    ]
    return "\n".join(lines)


class AlphaEditCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: an edit run is a fit; Lightning's validate, test and predict would run
        an unedited module outside the edit stream, which nothing in this project needs."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(NullSpaceUpdate, "edit")
        for key, monitor in STANDARD_MONITORS.items():
            parser.add_lightning_class_args(monitor, key)
        parser.add_class_arguments(TraceConfig, "trace", fail_untyped=False)
        parser.add_class_arguments(SpectrumConfig, "spectrum", fail_untyped=False)
        parser.add_class_arguments(StatisticsCommandConfig, "statistics", fail_untyped=False)

    def instantiate_trainer(self, **kwargs):
        """The trainer with ``edit`` and the standard monitors, less those configured ``enabled: false``."""
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        callbacks = [cb for cb in callbacks if getattr(cb, "enabled", True)]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        configured = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar", True) is not False and not any(
            isinstance(cb, ProgressBar) for cb in configured
        ):
            callbacks.append(EditProgressBar())
        trainer = self._instantiate_trainer(trainer_config, callbacks)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                _quiet_wandb(logger)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """A ``ckpt_path`` must be one of this framework's checkpoints (refused clearly otherwise).

        LightningCLI would replace the ``model`` options with the checkpoint's hyperparameters,
        silently overriding those given now; here this run's options are kept, each difference is
        logged, and what decides the edits is compared with the checkpoint's at fit start."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        checkpoint = read_checkpoint(ckpt_path)
        given = self.config[subcommand]["model"]
        report_differences(
            checkpoint.get("hyper_parameters", {}), given.as_dict() if hasattr(given, "as_dict") else dict(given),
            "model", checkpoint_wins=("model.context",),  # the context prefixes are the checkpoint's
        )

    def after_fit(self) -> None:
        """The test stage on every edited request (the paper's protocol), then the table."""
        trainer = self.trainer
        update = find_callback(trainer, NullSpaceUpdate)
        history, export = find_callback(trainer, EditHistory), find_callback(trainer, ExportEditedModel)
        if self.datamodule.position:
            trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if not trainer.is_global_zero:
            return
        print(f"\nedits applied: {update.edits_applied}, batches rejected: {len(update.rejected)}")
        results_path = history.results_path if history is not None else None
        print(format_results(self.model.baseline or {}, self.model.test_results or {}, results_path))
        print(f"run folder:   {run_directory(trainer)}")
        if export is not None and export.exported_to:
            print(f"edited model: {export.exported_to}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                print(f"W&B run:      {Path(logger.experiment.dir).parent}")
                # finished here, or a second run in this process would write into this one
                logger.experiment.finish()


def _quiet_wandb(logger: WandbLogger) -> None:
    """Removes the causes of two W&B warnings nobody can act on: Lightning passes
    ``anonymous=None``, which W&B reports as a deprecated setting, and W&B looks for a git
    repository in the run folder before it exists. Other W&B warnings still show."""
    init = getattr(logger, "_wandb_init", None)  # Lightning's arguments for wandb.init
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)


def format_results(unedited: dict[str, float], edited: dict[str, float], results_path=None) -> str:
    """The unedited and edited figures side by side (rates in %, fluency and consistency as is)."""
    wild = [n for n in dict.fromkeys([*unedited, *edited]) if n.startswith(WILD_PREFIX)]
    names = [n for n in (*RATES, "fluency", "consistency", *wild) if n in unedited or n in edited]
    width = max([26, *map(len, names)])
    lines = [f"  {'':{width}s} {'unedited':>9s} {'edited':>9s}"]
    for name in names:
        scale = 1 if name in ("fluency", "consistency") else 100
        cells = [f"{scale * t[name]:9.1f}" if name in t else f"{'-':>9s}" for t in (unedited, edited)]
        lines.append(f"  {name:{width}s} {cells[0]} {cells[1]}")
    if results_path:
        lines.append(f"drift and everything else: {results_path}")
    return "\n".join(lines)


EXPECTED_WARNINGS = (
    ".*module\\(s\\) in eval mode",  # the language model stays in eval mode on purpose
    ".*overridden `transfer_batch_to_device`",  # batches are strings; tensors are made later
    ".*configure_optimizers` returned `None`",  # δ has its own optimizer inside each step
    ".*Total length of `DataLoader` across ranks is zero",  # no edits to validate before the first
    ".*isinstance\\(treespec, LeafSpec\\)",  # Lightning's own deprecation, nothing to act on
    ".*args parameter is intended",  # the CLI hands LightningCLI the arguments it has read itself
)
"""Lightning warnings about choices this design makes on purpose (silenced in the CLI only)."""

UNACTIONABLE_LOG_LINES = (
    "💡 Tip:",  # advertisements for other products (litlogger, litmodels)
)
"""Starts of Lightning info lines that tell a user nothing about their run (dropped in the CLI only)."""


class _DropLines(logging.Filter):
    """Drops log records whose message starts with one of ``UNACTIONABLE_LOG_LINES``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(UNACTIONABLE_LOG_LINES)


def quiet_lightning() -> None:
    """Silence the expected warnings and the unactionable info lines (by message, nothing else)."""
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")  # where rank_zero_info logs
    if not any(isinstance(f, _DropLines) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLines())


def run(args: list[str] | None = None) -> AlphaEditCLI | Path:
    """Parse ``args`` (default: the command line), run the subcommand, return the CLI
    (the report folder for ``report``)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    quiet_lightning()
    args = sys.argv[1:] if args is None else list(args)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if args else 2)
    if args[0] == "--version":
        print(f"lightning-alphaedit {__version__}")
        raise SystemExit(0)
    if args[0] not in COMMANDS and not args[0].startswith("-"):
        raise SystemExit(f"lightning-alphaedit: unknown command {args[0]!r}; the commands are "
                         f"{', '.join(COMMANDS)} (lightning-alphaedit --help)")
    if args and args[0] == "report":
        return report_main(args[1:])
    if args and args[0] == "ask":
        return ask_main(args[1:])
    if args and args[0] in ("trace", "spectrum", "statistics"):
        with warnings.catch_warnings():  # args differ from sys.argv by the subcommand, on purpose
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            cli = _cli(args[1:], run=False, prog=f"lightning-alphaedit {args[0]}", description=COMMANDS[args[0]])
        {"trace": trace, "spectrum": spectrum, "statistics": statistics}[args[0]](cli)
        return cli
    return _cli(args)


def _cli(
    args, run: bool = True, cli_class: type[AlphaEditCLI] = AlphaEditCLI, prog: str = "lightning-alphaedit",
    description: str | None = None,
) -> AlphaEditCLI:
    # the configs' field docstrings are the options' --help texts
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    wandb = sys.modules.get("wandb")
    before = wandb.run if wandb is not None else None
    try:
        return cli_class(
            AlphaEditModule,
            EditStreamDataModule,
            parser_kwargs={"parser_mode": "omegaconf", "prog": prog, "description": description or TOOL},
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"save_to_log_dir": False},
            auto_configure_optimizers=False,
            args=None if args == sys.argv[1:] else args,  # LightningCLI warns when given sys.argv again
            run=run,
        )
    except BaseException:
        # A refused or failed run leaves the W&B run it started open, and Lightning's logger
        # reuses an open run: the next run in this process (a notebook, a test) would write
        # into this one's folder. The caller's own run, if any, is left alone.
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None and wandb.run is not before:
            wandb.finish(exit_code=1)
        raise


def trace(cli: AlphaEditCLI) -> TraceResult:
    """Causal tracing on the config's model and the first requests of its edit stream."""
    config = cli.config_init["trace"]
    module = cli.model
    module.configure_model()  # the same model, tokenizer and targets an edit run would use
    module.lm.to(cli.trainer.strategy.root_device)
    requests = cli.datamodule.load(module.tokenizer)
    with timed({}, "trace", announce=f"causal tracing on up to {config.limit} requests"):
        result = causal_trace(module.lm, module.tokenizer, module.targets, requests, config)
    folder = Path(config.output) if config.output else Path(cli.trainer.default_root_dir) / "trace"
    json_path, png_path = save_trace(result, config, folder, module.lm_config.name_or_path or "tiny model")
    print(format_table(result))
    print(f"recommended layers ({config.span} centred on the largest effect at the subject's last token): "
          f"{recommended(result, config)}")
    print(f"heat map: {png_path}\nnumbers:  {json_path}")
    return result


def _key_statistics(cli: AlphaEditCLI) -> tuple[dict, tuple]:
    """The config's key statistics (cached or collected) and the arguments that decided them,
    on the model a fit of that config would load."""
    module = cli.model
    module.configure_model()  # the same model, tokenizer and targets an edit run would use
    module.lm.to(cli.trainer.strategy.root_device)
    update = find_callback(cli.trainer, NullSpaceUpdate)
    corpus = load_corpus(update.statistics.corpus, update.statistics.text_field, update.statistics.cache_dir)
    arguments = (module.lm, module.tokenizer, module.targets, update.layers, update.statistics, module.lm_config.identity, corpus)
    with timed({}, "statistics", announce=f"key statistics of layers {update.layers}"):
        return layer_statistics(*arguments), arguments


def spectrum(cli: AlphaEditCLI) -> list[dict]:
    """The eigenvalue spectrum of the config's key statistics and the null space each rule keeps."""
    config = cli.config_init["spectrum"]
    module, update = cli.model, find_callback(cli.trainer, NullSpaceUpdate)
    moments = _key_statistics(cli)[0]
    with timed({}, "spectrum", announce="eigenvalues of the key statistics"):
        spectra = spectrum_eigenvalues(moments)
    configured = (update.nullspace_rule, update.nullspace_threshold)
    rules = [configured] + [r for r in map(parse_rule, config.rules) if r != configured]
    rows = spectrum_rows(spectra, rules, config.quantiles)
    folder = Path(config.output) if config.output else Path(cli.trainer.default_root_dir) / "spectrum"
    files = save_spectrum(rows, spectra, configured, folder, module.lm_config.name_or_path or "tiny model")
    print(format_spectrum(rows))
    print(f"figure:  {files['png']}\nnumbers: {files['json']}")
    return rows


def statistics(cli: AlphaEditCLI) -> dict:
    """The key statistics a ``fit`` with this config needs, into the same cache under the same key
    (that fit then starts editing at once); with ``statistics.output``, exported with a manifest."""
    config = cli.config_init["statistics"]
    try:
        moments, arguments = _key_statistics(cli)
    except CollectionStopped as stopped:
        raise SystemExit(f"lightning-alphaedit statistics: {stopped}") from None
    for layer, m in sorted(moments.items()):
        print(f"layer {layer}: {m.count:,} tokens")
    if config.output:
        print(f"exported: {export_statistics(moments, statistics_keys(*arguments), config.output)}")
    return moments


DEBUG_VARIABLE = "LIGHTNING_ALPHAEDIT_DEBUG"
"""Set to 1 (or pass ``--debug``) to see the traceback behind an error message."""


def main(args: list[str] | None = None) -> None:
    """The ``lightning-alphaedit`` console script: exits non-zero when a fit edited nothing or stopped.

    A refusal (bad data, a checkpoint that does not fit, a missing file) is one message and exit
    status 1, not a traceback; ``--debug`` or ``LIGHTNING_ALPHAEDIT_DEBUG=1`` shows the traceback.
    """
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a log file (SLURM) sees each line as it is written
    args = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in args or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        cli = run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        if debug:
            raise
        sys.exit(f"lightning-alphaedit: {error}\n(--debug shows where it came from)")
    if isinstance(cli, AlphaEditCLI) and cli.subcommand == "fit":
        update = find_callback(cli.trainer, NullSpaceUpdate)
        if update.failure:
            sys.exit(f"lightning-alphaedit: {update.failure}")
