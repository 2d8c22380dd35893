"""Every bad input gets a one-line error (exit 2, no traceback), and nothing written is lost (issue 21)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dynamo
from dynamo.images import image_set
from dynamo.pipeline.cli import main
from dynamo.serialize import jsonable
from tests.conftest import tiny_model


def run(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``dynamo ARGV``; the error, if any, must be one line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # refused by the argument parser (a usage line, then the error)
        code = exit_.code
    err = capsys.readouterr().err
    if code == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in err, err
    return code, err


@pytest.fixture
def store(tmp_path, digits_folder):
    out = tmp_path / "s.zarr"
    dynamo.record(tiny_model("cls", img_size=32), digits_folder, out, limit=8, batch_size=4, progress=False)
    return out


# ---- models whose layout changes with depth ---------------------------------------------------


@pytest.mark.parametrize("summaries", [False, True])
def test_models_whose_cls_enters_late_are_refused(tmp_path, digits_folder, capsys, summaries):
    argv = ["record", "cait_xxs24_224", "--no-pretrained", "--images", digits_folder, "--out", tmp_path / "c.zarr",
            "--limit", 2, "--quiet", *(["--summaries-only"] if summaries else [])]
    code, err = run(argv, capsys)
    assert code == 2 and "adds its class token partway through depth" in err
    assert not (tmp_path / "c.zarr").exists()


# ---- images dropped or altered ------------------------------------------------------------------


def test_a_folder_mixing_loose_images_and_class_folders_is_refused(tmp_path, digits_folder, capsys):
    root = tmp_path / "mixed"
    (root / "classA").mkdir(parents=True)
    files = sorted(digits_folder.rglob("*.png"))
    for i, source in enumerate(files[:3]):
        shutil.copy(source, root / f"top{i}.png")
    shutil.copy(files[3], root / "classA" / "a.png")
    code, err = run(["record", "--images", root, "--out", tmp_path / "m.zarr", "--quiet"], capsys)
    assert code == 2 and "mixes 3 top-level images" in err and "classA" in err


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    images = image_set(tmp_path)
    pixels, readable = images.load_batch(range(len(images)), lambda image: torch.from_numpy(np.asarray(image) / 255.0))
    assert readable.all()
    for picture in pixels:
        assert picture.mean() == pytest.approx(0.5, abs=0.01) and picture.max() > 0.99 and picture.min() < 0.01


def test_one_image_file_is_a_set_of_one_and_limit_draws_evenly_across_classes(digits_folder):
    first = sorted((digits_folder / "3").iterdir())[0]
    assert image_set(first).ids == [str(first)]
    taken = image_set(digits_folder).head(12)
    assert len(taken) == 12 and len(set(taken.labels.tolist())) == 10
    assert taken.ids == sorted(taken.ids, key=image_set(digits_folder).ids.index)  # original order kept


def test_skipped_image_warnings_are_one_line_without_source(tmp_path, digits_folder, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    for source in sorted(digits_folder.rglob("*.png"))[:3]:
        shutil.copy(source, folder / source.name)
    (folder / "broken.png").write_bytes(b"not a png")
    model = "dynamo-zoo/vit-digits-reg4"
    code, err = run(["record", model, "--images", folder, "--out", tmp_path / "w.zarr", "--quiet"], capsys)
    assert code == 0
    assert "dynamo: warning: skipping unreadable image" in err and "broken.png" in err
    assert "load_batch" not in err and "pixels, readable" not in err


# ---- counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--limit", -1, "--limit: must be at least 1"), ("--limit", 0, "--limit: must be at least 1"),
    ("--batch-size", 0, "--batch-size: must be at least 1"), ("--batch-size", -1, "--batch-size: must be at least 1"),
    ("--shard", "0/0", "at least one shard"),
])
def test_bad_counts_are_refused_before_anything_is_written(tmp_path, digits_folder, capsys, flag, value, message):
    out = tmp_path / "n.zarr"
    code, err = run(["record", "--images", digits_folder, "--out", out, flag, value, "--quiet"], capsys)
    assert code == 2 and message in err
    assert not out.exists()


# ---- tracebacks for ordinary mistakes -----------------------------------------------------------


def test_an_out_path_under_a_file_is_one_line(tmp_path, digits_folder, capsys):
    (tmp_path / "regular.txt").write_text("x")
    code, err = run(["record", "--images", digits_folder, "--out", tmp_path / "regular.txt" / "sub.zarr", "--quiet"], capsys)
    assert code == 2 and "regular.txt is a file, not a folder" in err


def test_damaged_metadata_names_the_file(store, capsys):
    metadata = store / "hidden" / "zarr.json"
    metadata.write_text(metadata.read_text()[:40])
    code, err = run(["info", store], capsys)
    assert code == 2 and "hidden/zarr.json is not valid JSON" in err
    code, err = run(["analyze", store, "--out", store.parent / "a", "--only", "tokens"], capsys)
    assert code == 2 and "damaged" in err


def test_missing_metadata_in_a_store_with_the_format_attr(store, capsys):
    metadata = json.loads((store / "hidden" / "zarr.json").read_text())
    metadata.pop("dimension_names")
    (store / "hidden" / "zarr.json").write_text(json.dumps(metadata))
    code, err = run(["analyze", store, "--out", store.parent / "a", "--only", "tokens"], capsys)
    assert code == 2 and "damaged" in err


def test_a_complete_store_is_read_without_taking_the_writer_lock(store, digits_folder, monkeypatch):
    """On a read-only filesystem the lock file cannot be created; a finished store needs no lock."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(dynamo.store, "writer_lock", read_only)
    again = dynamo.record(tiny_model("cls", img_size=32), digits_folder, store, limit=8, batch_size=4, progress=False)
    assert again.sizes["image"] == 8
    assert main(["consolidate", str(store)]) == 0


def test_debug_shows_the_traceback(tmp_path, digits_folder):
    (tmp_path / "mixed" / "a").mkdir(parents=True)
    shutil.copy(sorted(digits_folder.rglob("*.png"))[0], tmp_path / "mixed" / "loose.png")
    with pytest.raises(ValueError, match="mixes 1 top-level images"):
        main(["--debug", "record", "--images", str(tmp_path / "mixed"), "--out", str(tmp_path / "d.zarr")])


def test_json_output_has_no_bare_nan():
    assert jsonable({"r2": float("nan"), "per_layer": [1.0, float("inf")]}) == {"r2": None, "per_layer": [1.0, None]}


@pytest.mark.parametrize(("argv", "message"), [
    (["fit", "S", "--out", "O", "--steps", "0"], "--steps: must be at least 1, got 0"),
    (["fit", "S", "--out", "O", "--steps", "-5"], "--steps: must be at least 1, got -5"),
    (["fit", "S", "--out", "O", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["fit", "S", "--out", "O", "--baselines", "-1"], "--baselines: must be at least 0"),
    (["phases", "S", "--eps", "-1"], "--eps: must be at least 0.0"),
    (["record", "--out", "O", "--device", "gpu"], "unknown device 'gpu'"),
    (["fit", "S", "--out", "O", "--device", "cuda:0"] if not torch.cuda.is_available() else ["fit", "S", "--out", "O", "--device", "gpu"],
     "no CUDA GPU is visible" if not torch.cuda.is_available() else "unknown device"),
])
def test_numbers_and_devices_are_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_analyze_boundaries_outside_the_depth_are_one_line(store, tmp_path, capsys):
    for boundaries in ("13", "0"):
        code, err = run(["analyze", store, "--out", tmp_path / boundaries, "--only", "tokens", "--boundaries", boundaries, "--quiet"], capsys)
        assert code == 2 and "thresholds" in err


def test_a_misspelled_store_path_is_not_taken_for_a_model_name(tmp_path, capsys):
    code, err = run(["profile", tmp_path / "d3.zarr", "--out", tmp_path / "p"], capsys)
    assert code == 2 and "no trajectory store at" in err and "darknet" not in err
