"""Command-line argument types and the analyses' typed options, importable without torch or xarray."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["positive_float_list", "positive_int_list", "timm_options", "ANALYSIS_OPTIONS", "Option", "add_arguments", "boundary_list",
           "comma_list", "float_list", "int_list", "nonnegative_float", "nonnegative_int", "positive_int", "torch_device"]


def comma_list(text: str) -> list[str]:
    """Command-line ``a,b,c`` as a list of names."""
    return [part.strip() for part in text.split(",") if part.strip()]


def float_list(text: str) -> list[float]:
    """Command-line ``0.1,0.2`` as a list of floats."""
    try:
        return [float(part) for part in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> list[int]:
    """Command-line ``0,3,6`` as a list of integers."""
    try:
        return [int(part) for part in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def boundary_list(text: str) -> list[int]:
    """Command-line phase boundaries ``4,8``, or ``none`` for none."""
    return [] if text.strip().lower() == "none" else int_list(text)


def positive_int_list(text: str) -> list[int]:
    """Command-line ``1,2,3``: integers, each at least 1 (numbers of phases, blocks)."""
    values = int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of at least 1, got {text!r}")
    return values


def positive_float_list(text: str) -> list[float]:
    """Command-line ``0.5,1,2``: finite numbers, each above 0 (scales)."""
    values = float_list(text)
    if not values or not all(math.isfinite(value) and value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers above 0, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """A command-line count that must be at least 1."""
    return _bounded(text, int, 1)


def nonnegative_int(text: str) -> int:
    """A command-line count that may be 0."""
    return _bounded(text, int, 0)


def nonnegative_float(text: str) -> float:
    """A command-line number that may be 0, never negative."""
    return _bounded(text, float, 0.0)


def _bounded(text: str, kind: type, least):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {text}")
    return value


def torch_device(text: str) -> str:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    if text == "cpu":
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no Apple GPU (mps) on this machine; use --device cpu")
    return text


@dataclass(frozen=True)
class Option:
    """One typed option of an analysis: its Python name, default, help, parser (``bool``: a switch) and flag."""

    name: str
    default: object
    help: str
    type: Callable | None = None
    flag: str | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        flag = self.flag or "--" + self.name.replace("_", "-")
        if self.type is bool:
            parser.add_argument(flag, dest=self.name, action="store_true", help=self.help)
        else:
            default = f" (default {self.default})" if self.default is not None else ""
            parser.add_argument(flag, dest=self.name, type=self.type or type(self.default), default=self.default,
                                help=self.help + default)


ANALYSIS_OPTIONS: dict[str, tuple[Option, ...]] = {
    "basins": (),
    "tokens": (),
    "rank": (
        Option("n_bootstrap", 100, "bootstrap resamples of the images for error bars", nonnegative_int, flag="--bootstrap"),
        Option("tokens_per_image", 64,
               "rank: at most N tokens of a kind per image (a seeded subset of kinds with more; 0 for all)", nonnegative_int),
    ),
    "perturbation": (
        Option("alphas", [0.01, 0.05, 0.1, 0.2], "perturbation: relative sizes", positive_float_list),
        Option("starts", None, "perturbation: injection layers (default all but the last)", int_list),
        Option("directions", 2, "perturbation: random draws and principal directions each", positive_int),
        Option("perturbation_images", None, "perturbation: N images evenly spaced through the store (default all)", positive_int),
        Option("surrogate", None, "perturbation: also run through a saved Raptor fit (folder of `dynamo fit`)", str),
    ),
    "jacobian": (
        Option("singular_values", 4, "jacobian: singular values per block", positive_int),
        Option("composed", False, "jacobian: also the map from every layer to the last", bool),
        Option("jacobian_images", 32, "jacobian: N images evenly spaced through the store", positive_int),
    ),
    "swap": (
        Option("swap_width", 1, "swap: consecutive layers replaced", positive_int),
        Option("swap_images", None, "swap: N images evenly spaced through the store (default all)", positive_int),
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every analysis' own options to a command line (each flag once)."""
    seen = set()
    for options in ANALYSIS_OPTIONS.values():
        for option in options:
            if option.name not in seen:
                option.add_to(parser)
                seen.add(option.name)


def timm_options(text: str) -> dict:
    """``--timm key=value,...`` as `timm.create_model` options (`dynamo.models.parse_timm_options`)."""
    try:
        from dynamo.models import parse_timm_options  # only when --timm is given

        return parse_timm_options(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
