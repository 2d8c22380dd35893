"""The `dynamo` command as a user types it: the installed console script, in a fresh folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo import zoo

DYNAMO = Path(sys.executable).with_name("dynamo")


def _dynamo(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    assert DYNAMO.exists(), f"the dynamo console script is not installed next to {sys.executable}: pip install -e ."
    return subprocess.run([str(DYNAMO), *argv], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("model", [[], [zoo.DEFAULT_MODEL], ["dynamo-zoo/vit-digits-p0.5"]])
def test_profile_takes_a_zoo_name_as_typed(tmp_path, model):
    """Zoo names contain '/': they are models, not paths (the README's main command, made small)."""
    result = _dynamo("profile", *model, "--out", "profile", "--limit", "16", "--bootstrap", "2", "--only", "tokens",
                     "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == (model[0] if model else zoo.DEFAULT_MODEL)
    assert (tmp_path / "profile" / "report.html").is_file()


def test_a_missing_store_path_is_one_line(tmp_path):
    result = _dynamo("profile", "nowhere/store.zarr", "--out", "x", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dynamo profile: error: no trajectory store at nowhere/store.zarr; check the path (or pass a timm or zoo model name)"]
    assert not (tmp_path / "x").exists()


def test_a_model_argument_is_resolved_by_what_it_is(tmp_path):
    """A weights file and a folder that is not a store each get their own one-line error; nothing is written."""
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not really")
    (tmp_path / "photos").mkdir()
    for argument, message in ((weights.name, "is a file, not a model name or a trajectory store: pass weights with --checkpoint"),
                              ("photos", "no trajectory store at photos")):
        result = _dynamo("profile", argument, "--out", "x", cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "x").exists()
