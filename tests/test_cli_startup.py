"""The command line answers at once, its defaults are the functions', and its logs stay readable."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, **kwargs)


def test_building_the_parser_imports_nothing_heavy():
    """``dynamo --help`` is fast because the parser never imports torch, timm, xarray, dask or the analyses."""
    heavy = ("torch", "timm", "torchvision", "xarray", "dask", "analyses", "figures", "zarr")
    out = _python("import sys, dynamo.pipeline.cli as cli\n"
                  "cli.build_parser().parse_args(['info', 'x.zarr'])\n"
                  f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))").stdout
    assert out.strip() == "[]"


def test_parser_literals_equal_their_sources():
    from dynamo.capture import AUTOCAST_DTYPES
    from dynamo.models import PRESETS
    from dynamo.pipeline import cli
    from dynamo.pipeline.fit import RECIPES
    from dynamo.pipeline.ladder import CEILING, LOOP_SCALES, RAPTOR_INITS, RUNGS
    from dynamo.pipeline.registry import ANALYSES
    from dynamo.surrogates import SURROGATES

    assert cli.SURROGATES == tuple(SURROGATES)
    assert cli.RECIPES == tuple(sorted(RECIPES))
    assert cli.LADDER_SURROGATES == (*RUNGS, CEILING)
    assert cli.LOOP_SCALES == tuple(LOOP_SCALES)
    assert cli.RAPTOR_INITS == tuple(RAPTOR_INITS)
    assert cli.AUTOCAST_DTYPES == tuple(sorted(AUTOCAST_DTYPES))
    assert cli.PRESETS == tuple(PRESETS)
    assert cli.ANALYSIS_NAMES == tuple(ANALYSES)


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _parser_defaults(command: str) -> dict:
    from dynamo.pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {action.dest: action.default for action in sub._actions}


def test_every_option_default_equals_the_signature_default():
    """Registry options and CLI flags show the default of the function they feed (the CLI keeps literals)."""
    from analyses import jacobian, lenses, perturbation, phases, rank, swap
    from dynamo.pipeline.registry import ANALYSES

    feeds = {  # registry option -> (function, parameter)
        "n_bootstrap": (rank.compute, "n_bootstrap"), "tokens_per_image": (rank.compute, "tokens_per_image"),
        "alphas": (perturbation.compute, "alphas"), "starts": (perturbation.compute, "starts"),
        "directions": (perturbation.compute, "n_directions"), "perturbation_images": (perturbation.compute, "images"),
        "singular_values": (jacobian.compute, "n_singular"), "composed": (jacobian.compute, "composed"),
        "jacobian_images": (jacobian.compute, "images"), "swap_width": (swap.compute, "width"),
        "swap_images": (swap.compute, "images"),
    }
    options = [option for entry in ANALYSES.values() for option in entry.options if option.name != "surrogate"]
    assert {option.name for option in options} == set(feeds)
    for option in options:
        function, parameter = feeds[option.name]
        expected = _defaults(function)[parameter]
        assert option.default == (list(expected) if isinstance(expected, tuple) else expected), option.name
    lens = _parser_defaults("phases")
    for flag, parameter in {"jacobian_images": "images", "rank": "rank", "tolerance": "tolerance", "eps": "eps"}.items():
        assert lens[flag] == _defaults(lenses.compute)[parameter], flag
    stage = _defaults(phases.compute)
    for flag, parameter in {"method": "method", "eps": "eps", "measure": "measure", "tokens": "tokens",
                            "bootstrap": "n_bootstrap", "seed": "seed"}.items():
        assert lens[flag] == stage[parameter], flag


def test_logs_to_a_file_are_lines_not_carriage_returns(tmp_path):
    """stderr to a file: a line per tenth of the work, no '\\r'; the same helper on a terminal is tqdm."""
    log = tmp_path / "log.txt"
    code = ("from dynamo.progress import progress_bar\n"
            "bar = progress_bar(total=1000, desc='work', unit='img')\n"
            "for _ in range(1000): bar.update()\n"
            "bar.close()\n"
            "for _ in progress_bar(range(7), desc='loop'): pass\n")
    with log.open("w") as stderr:
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=stderr, check=True)
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work: 100/1000 img (10%)") and lines[9].startswith("work: 1000/1000 img (100%)")
    assert len([line for line in lines if line.startswith("work")]) == 10
    assert 1 <= len([line for line in lines if line.startswith("loop")]) <= 10


@pytest.mark.slow
def test_a_recording_logged_to_a_file_has_no_carriage_returns(tmp_path):
    from dynamo import zoo

    log = tmp_path / "log.txt"
    with log.open("w") as stderr:
        subprocess.run([sys.executable, "-m", "dynamo.pipeline.cli", "record", "--limit", "64", "--batch-size", "4",
                        "--out", str(tmp_path / "s.zarr"), zoo.DEFAULT_MODEL], stderr=stderr, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    text = log.read_text()
    assert "\r" not in text and 1 <= len(text.splitlines()) <= 12
