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


# ---- issue 27: every number checked where it is parsed; a store missing what a command needs ------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["fit", "S", "--out", "O", "--k", "0"], "--k: expected comma-separated integers of at least 1, got '0'"),
    (["fit", "S", "--out", "O", "--k", "2,-1"], "--k: expected comma-separated integers of at least 1"),
    (["ladder", "S", "--out", "O", "--k", "0"], "--k: expected comma-separated integers of at least 1"),
    (["concepts", "S", "--out", "O", "--concepts", "0"], "--concepts: must be at least 1, got 0"),
    (["ladder", "S", "--out", "O", "--loop-scales", "0"], "--loop-scales: expected comma-separated finite numbers above 0"),
    (["ladder", "S", "--out", "O", "--loop-scales", "1,-1"], "finite numbers above 0, got '1,-1'"),
    (["ladder", "S", "--out", "O", "--loop-scales", "nan"], "finite numbers above 0, got 'nan'"),
    (["ladder", "S", "--out", "O", "--loop-scales", "inf"], "finite numbers above 0, got 'inf'"),
    (["record", "--out", "O", "--patch-tokens", "0"], "--patch-tokens: must be at least 1"),
    (["phases", "S", "--lens", "cosine", "--rank", "0"], "--rank: must be at least 1"),
    (["record", "--out", "O", "--timm", "global_pool"], "--timm takes key=value pairs"),
    (["record", "--out", "O", "--timm", "img_size=64"], "set by dynamo itself"),
])
def test_zero_negative_and_nan_counts_are_refused_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_backwards_phase_range_is_refused_not_read_as_an_empty_phase(store, tmp_path, capsys):
    code, err = run(["fit", store, "--surrogate", "identity", "--partition", "6-1,7-12", "--out", tmp_path / "f"], capsys)
    assert code == 2 and "the phase 6-1 runs backwards" in err and "first <= last" in err
    # a single block may stand as its own phase beside ranges
    assert dynamo.Partition.parse("1-2,3", 3) == [[1, 2], [3]]


@pytest.fixture
def partial_stores(tmp_path, digits_folder):
    """Stores of one tiny model recorded with --summaries-only, --layers 0,6,12 and --patch-tokens 8."""
    model = tiny_model("cls", img_size=48, depth=12)
    paths = {}
    for name, options in (("summaries", {"summaries_only": True}), ("layers", {"layers": [0, 6, 12]}),
                          ("tokens", {"patch_tokens": 8})):
        paths[name] = tmp_path / f"{name}.zarr"
        dynamo.record(model, digits_folder, paths[name], limit=8, batch_size=4, progress=False, **options)
    return paths


def test_a_store_missing_what_a_command_needs_says_what_and_who_needs_it(partial_stores, tmp_path, capsys):
    summaries, layers, tokens = partial_stores["summaries"], partial_stores["layers"], partial_stores["tokens"]
    cases = [
        (["fit", summaries, "--k", "2", "--steps", "1"], ["dynamo fit (Raptor", "holds only the reduced views",
                                                          "without --summaries-only"]),
        (["ladder", summaries, "--k", "1"], ["the ladder's rungs identity, linear, dmd, teacher-block, raptor",
                                             "--summaries-only"]),
        (["ladder", layers, "--surrogates", "identity,linear,teacher-block", "--k", "1"],
         ["the ladder's rungs identity, linear, teacher-block", "keeps layers [0, 6, 12]", "without --layers"]),
        (["ladder", tokens, "--surrogates", "identity,linear,teacher-block", "--k", "1"],
         ["the ladder's rungs identity, linear, teacher-block", "(recorded with --patch-tokens)"]),
        (["fit", layers, "--surrogate", "linear", "--k", "1"], ["dynamo fit --surrogate linear", "keeps layers [0, 6, 12]"]),
        (["phases", layers, "--lens", "cosine,knee"], ["the knee lens", "layers [5, 11] before [6, 12] are missing",
                                                       "leave knee out"]),
    ]
    for number, (argv, expected) in enumerate(cases):
        out = tmp_path / f"out{number}"
        code, err = run([*argv, *([] if argv[0] == "phases" else ["--out", out]), "--quiet"], capsys)
        assert code == 2, (argv, err)
        assert all(part in err for part in expected), (argv, err)
        assert "Raptor needs" not in err and "KeyError" not in err and "not in the store" not in err, (argv, err)
        assert not out.exists() or not any(out.iterdir()), argv


def test_phases_k_beyond_the_maxcut_names_no_flag_that_does_not_exist(store, capsys):
    code, err = run(["phases", store, "--k", "12", "--bootstrap", "0"], capsys)
    assert code == 2 and "--min-size" not in err and "cannot be reached" in err and "--method contiguous" in err


def test_figures_and_results_are_never_written_into_a_store(store, capsys):
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    for flag, path in (("--figure", store / "hidden" / "x.png"), ("--out", store / "hidden" / "p.zarr")):
        code, err = run(["phases", store, flag, path, "--bootstrap", "0", "--quiet"], capsys)
        assert code == 2 and "a trajectory store, which a result never replaces" in err
        code, err = run(["phases", store, "--lens", "cosine", flag, path, "--quiet"], capsys)
        assert code == 2 and "a trajectory store" in err
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_a_second_ladder_into_the_same_out_is_refused_while_the_first_runs(store, tmp_path, capsys):
    from dynamo.store import writer_lock
    out = tmp_path / "ladder"
    with writer_lock(out):  # as a first `dynamo ladder --out` holds it
        code, err = run(["ladder", store, "--out", out, "--k", "1", "--surrogates", "identity", "--quiet"], capsys)
    assert code == 2 and f"another process is writing {out}" in err and not out.exists()
    code, err = run(["ladder", store, "--out", out, "--k", "1", "--surrogates", "identity", "--bootstrap", "10",
                     "--loop-scales", "1", "--quiet"], capsys)
    assert code == 0 and (out / "ladder.csv").exists()


def test_ladder_called_from_python_takes_the_writer_lock_itself(store, tmp_path):
    from dynamo.pipeline.ladder import ladder
    from dynamo.store import StoreBusyError, writer_lock
    out = tmp_path / "ladder"
    with writer_lock(out), pytest.raises(StoreBusyError, match="another process is writing"):
        ladder(store, out, ks=[1], surrogates=["identity"], n_bootstrap=10, loop_scales=[1.0], progress=False)
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--directions", "0", "--directions: must be at least 1, got 0"),
    ("--singular-values", "0", "--singular-values: must be at least 1, got 0"),
    ("--swap-width", "-1", "--swap-width: must be at least 1, got -1"),
    ("--jacobian-images", "0", "--jacobian-images: must be at least 1"),
    ("--perturbation-images", "0", "--perturbation-images: must be at least 1"),
    ("--swap-images", "0", "--swap-images: must be at least 1"),
    ("--bootstrap", "-1", "--bootstrap: must be at least 0"),
    ("--tokens-per-image", "-2", "--tokens-per-image: must be at least 0"),
    ("--alphas", "0,0.1", "--alphas: expected comma-separated finite numbers above 0"),
    ("--alphas", "nan", "--alphas: expected comma-separated finite numbers above 0, got 'nan'"),
    ("--directions", "two", "--directions: expected an integer, got 'two'"),
])
def test_analysis_options_are_checked_when_parsed(flag, value, message, capsys):
    code, err = run(["analyze", "STORE", "--out", "O", flag, value], capsys)
    assert code == 2 and message in err


def test_the_installed_script_prints_one_line_as_a_user_types_it(store, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(sys.executable).with_name("dynamo")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for argv, message in ((["ladder", str(store), "--out", str(tmp_path / "l"), "--loop-scales", "nan"], "finite numbers above 0"),
                          (["fit", str(store), "--surrogate", "identity", "--partition", "6-1,7-12", "--out", str(tmp_path / "f")],
                           "runs backwards")):
        result = subprocess.run([str(script), *argv], capture_output=True, text=True, env=env, timeout=120)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr
