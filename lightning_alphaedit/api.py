"""``edit``: knowledge editing from Python (a notebook), through the CLI's own Lightning objects.

There is no second code path: ``edit`` parses its arguments with the CLI's parser (the
same YAML configs, the same defaults, the same ``--help`` fields), builds the same
module, edit stream, callbacks (``NullSpaceUpdate`` and the standard monitors) and Trainer, runs ``trainer.fit`` and
the test stage as ``lightning-alphaedit fit`` does, and hands back what it edited.
"""

from __future__ import annotations

import copy as copying
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_alphaedit.ask import Answers, ask
from lightning_alphaedit.callbacks import ExportEditedModel, NullSpaceUpdate, find_callback
from lightning_alphaedit.cli import AlphaEditCLI, _cli, quiet_lightning
from lightning_alphaedit.run_folder import run_directory
from lightning_alphaedit.requests import EditDataError, EditRequest, _parse_project_record, _Where, write_jsonl
from lightning_alphaedit.targets import ModelTargets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The configs of a clone (``configs/*.yaml``), which ``edit`` knows by name."""

DEFAULT_CONFIG = "demo"
"""The settings a model without its own config starts from (SmolLM2-135M's demo)."""

_OTHER_SUBCOMMANDS = ("trace.", "spectrum.")

_REQUEST_DEFAULTS = {"target_true": None, "paraphrase_prompts": [], "neighborhood_prompts": [], "generation_prompts": []}


@dataclass
class EditResult:
    """What an edit run leaves: the edited model, its scores and where everything went."""

    model: torch.nn.Module = field(repr=False)
    """The edited model (the one passed in, when it was edited in place)."""
    tokenizer: Any = field(repr=False)
    requests: list[EditRequest] = field(repr=False)
    """The requests applied, in order."""
    scores: dict[str, dict[str, float]]
    """``{"unedited": {...}, "edited": {...}}``: the test-stage figures before and after."""
    run_dir: Path
    """The run folder: config.yaml, results.json, metrics.jsonl, the exported model."""
    edited_model_dir: Path | None
    """The exported edited model (``save_pretrained`` folder), if the run exported one."""
    deltas: dict[str, torch.Tensor] = field(repr=False)
    """Edited minus original weight of each edited parameter."""
    trainer: Any = field(repr=False)

    def ask(self, prompts: Sequence[str | EditRequest | tuple[str, str]] | str | None = None,
            max_new_tokens: int | None = None, chat: bool = False) -> Answers:
        """Greedy answers of the unedited and the edited model side by side (default: the
        edited requests' prompts, new targets marked); ``chat``: asked through the model's chat
        template, answers read to their end. Prints as a table."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return ask(self.model, self.tokenizer, self.deltas, self.requests if prompts is None else prompts,
                   max_new_tokens, chat=chat)


def edit(
    model: str | os.PathLike | torch.nn.Module,
    requests: Sequence[Mapping | EditRequest] | str | os.PathLike | None = None,
    *,
    tokenizer=None,
    config: str | os.PathLike | Mapping | Sequence[str | os.PathLike | Mapping] | None = None,
    copy: bool = False,
    **settings,
) -> EditResult:
    """Edit ``model`` with ``requests`` and return the edited model, its scores and its run folder.

        from lightning_alphaedit import edit
        result = edit("smollm2-135m", [{"prompt": "The capital of {} is", "subject": "Germany",
                       "target_new": "Vienna"}], layers=[4, 5, 6, 7, 8])
        result.model, result.tokenizer, result.scores, result.run_dir
        print(result.ask())

    Args:
        model: A config name (``tiny``, ``demo``, ``llama3-8b``: ``configs/<name>.yaml``), a model
            one of those configs edits (``smollm2-135m`` runs the demo's settings), any other hub
            id or model folder (the demo's settings, so give its ``layers``), a YAML file, or a
            loaded transformers model (with ``tokenizer``).
        requests: Dicts of the project's JSONL schema (``prompt`` with ``{}`` for the subject,
            ``subject``, ``target_new``; ``case_id``, ``target_true`` and the judging prompts are
            optional), `EditRequest`s, or an edit file. None: the config's ``data.path``.
        tokenizer: The loaded model's tokenizer.
        config: YAML files (paths or names) or dicts applied over the model's config, in order.
        copy: With a loaded model: edit a deep copy and leave the model passed in unchanged
            (the default edits it in place).
        settings: Any config field, by its full dotted name (``**{"data.limit": 8}``), with ``__``
            for dots (``data__limit=8``), or by its last part where that is unique
            (``layers=[4, 5]``, ``limit=8``, ``lr=0.5``).
    """
    loaded = isinstance(model, torch.nn.Module)
    if loaded and tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer: edit(model, requests, tokenizer=tokenizer)")
    configs, overrides = _model_configs(model) if not loaded else ([], {})
    if config is not None:
        configs += [_config_file(c) if not isinstance(c, Mapping) else dict(c)
                    for c in (config if isinstance(config, (list, tuple)) else [config])]
    if not configs:
        configs = [_config_file(_config_for_loaded(model))]
    if isinstance(requests, (str, os.PathLike)):
        overrides["data.path"] = str(Path(requests).expanduser().resolve())
    listed = None if requests is None or isinstance(requests, (str, os.PathLike)) else _as_requests(requests)

    quiet_lightning()
    with warnings.catch_warnings():  # the CLI's parser is given args while sys.argv holds Python's own
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli = _cli({"configs": configs, "overrides": overrides, "settings": settings}, run=False,
                   cli_class=_SettingsCLI)
    module, stream, trainer = cli.model, cli.datamodule, cli.trainer
    if listed is not None:  # a file beside the runs, named by its content: the saved config points at it
        path = Path(trainer.default_root_dir) / "requests" / f"{_digest(listed)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(listed, path)
        stream.path = cli.config["data"]["path"] = str(path)
    if loaded:
        _use_loaded_model(module, copying.deepcopy(model) if copy else model, tokenizer)

    trainer.fit(module, datamodule=stream)
    cli.after_fit()  # the test stage and the table, as the CLI runs them
    update, export = find_callback(trainer, NullSpaceUpdate), find_callback(trainer, ExportEditedModel)
    exported = export.exported_to if export is not None else None
    return EditResult(
        model=module.lm, tokenizer=module.tokenizer, requests=list(update.applied_requests),
        scores={"unedited": dict(module.baseline or {}), "edited": dict(module.test_results or {})},
        run_dir=run_directory(trainer), edited_model_dir=Path(exported) if exported else None,
        deltas=update.deltas(module), trainer=trainer,
    )


class _SettingsCLI(AlphaEditCLI):
    """The CLI, given configs and settings as Python values: short names are resolved against
    the parser's own fields before parsing."""

    def parse_arguments(self, parser, args) -> None:
        fields = _leaves(parser.get_defaults().as_dict())
        nested: dict = {}
        for key, value in {**args["overrides"], **args["settings"]}.items():
            _put(nested, _resolve(key, fields).split("."), value)
        argv = []
        for config in [*args["configs"], *([nested] if nested else [])]:
            argv += ["--config", config if isinstance(config, str) else yaml.safe_dump(config)]
        super().parse_arguments(parser, argv)


def _leaves(tree: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        keys += _leaves(value, name + ".") if isinstance(value, Mapping) and value else [name]
    return keys


def _resolve(key: str, fields: list[str]) -> str:
    """A setting's full dotted name: as given, with ``__`` for dots, or the one field ending so."""
    key = key.replace("__", ".")
    if key in fields or any(f.startswith(key + ".") for f in fields):
        return key
    # trace and spectrum settings (other subcommands) only by their full names: limit is data.limit
    matches = [f for f in fields if f.endswith("." + key) and not f.startswith(_OTHER_SUBCOMMANDS)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise TypeError(f"edit() got an unknown setting {key!r} (a config field, e.g. layers, limit, data.batch_size)")
    raise TypeError(f"edit() setting {key!r} is ambiguous: say which of {', '.join(sorted(matches))}")


def _put(tree: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _config_file(name: str | os.PathLike) -> str:
    """A YAML file given by path, or by name from the clone's ``configs/``."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return str(path.resolve())
    named = CONFIGS / f"{name}.yaml"
    if named.is_file():
        return str(named)
    raise FileNotFoundError(
        f"no config {name!r}: not a YAML file, nor one of {sorted(p.stem for p in CONFIGS.glob('*.yaml'))} in {CONFIGS}"
    )


def _model_configs(model: str | os.PathLike) -> tuple[list, dict]:
    """The configs and overrides a model given by name, folder or YAML file starts from."""
    name = str(model)
    if name.endswith((".yaml", ".yml")) or (CONFIGS / f"{name}.yaml").is_file():
        return [_config_file(name)], {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        if _configured_model(path) == name:
            return [str(path)], {}
    local = Path(name).expanduser()
    return [_config_file(DEFAULT_CONFIG)], {"model.lm.name_or_path": str(local.resolve()) if local.exists() else name}


def _configured_model(path: Path) -> str | None:
    raw = yaml.safe_load(path.read_text()) or {}
    return ((raw.get("model") or {}).get("lm") or {}).get("name_or_path")


def _config_for_loaded(model: torch.nn.Module) -> str:
    """The config of the model a loaded one was read from, if a config edits it; else the default."""
    source = getattr(model, "name_or_path", "") or ""
    for path in sorted(CONFIGS.glob("*.yaml")):
        named = _configured_model(path)
        if named and (named == source or Path(source).name == named):
            return str(path)
    return DEFAULT_CONFIG


def _use_loaded_model(module, model: torch.nn.Module, tokenizer) -> None:
    """Put an already loaded model into the module, frozen as the module loads its own."""
    model.eval()
    model.requires_grad_(False)
    source = getattr(model, "name_or_path", "") or ""
    if source:  # the statistics cache is keyed by the model's identity: this model's, not the config's
        module.lm_config.name_or_path = source
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    module.__dict__["tokenizer"] = tokenizer  # the cached property, set before anything reads it
    module.lm = model
    module.targets = ModelTargets(model, module.lm_config.templates)


def _as_requests(requests: Sequence[Mapping | EditRequest]) -> list[EditRequest]:
    """EditRequests from dicts (the optional fields filled in, ``case_id`` numbered) or as given."""
    if isinstance(requests, (Mapping, EditRequest)):
        requests = [requests]
    made = []
    for index, request in enumerate(requests):
        if isinstance(request, EditRequest):
            made.append(request)
            continue
        where = _Where("edit(requests=...)", index)
        if not isinstance(request, Mapping):
            raise where.error(None, f"expected a dict or an EditRequest, got {type(request).__name__}")
        made.append(_parse_project_record({"case_id": f"request-{index}", **_REQUEST_DEFAULTS, **request}, where))
    if not made:
        raise EditDataError("the list is empty", source="edit(requests=...)")
    return made


def _digest(requests: Sequence[EditRequest]) -> str:
    text = "\n".join(json.dumps(r.to_dict(), sort_keys=True) for r in requests)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
