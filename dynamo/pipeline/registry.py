"""The analyses `dynamo analyze` and `dynamo profile` run, each described once.

An entry names the analysis module (its ``DESCRIPTION``, ``compute`` and ``summarize``), the
figures drawn from its result (each with a one-sentence caption), whether it runs the live model,
and its typed options. The options are the one place their defaults live: the command line is
built from them and `options_for` fills in what a caller left out, so ``--help``, the README and
the report all read the same text.

Adding an analysis is one more entry::

    ANALYSES["name"] = Analysis(module=analyses.name, run=..., figures=(FigureSpec(...),), options=(Option(...),))
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType

import torch
import xarray as xr

from analyses import convergence, jacobian, perturbation, rank, swap, tokens
from analyses.streaming import Accumulator, stream
from dynamo.partition import Partition
from dynamo.surrogates import RaptorFitter
from figures import basins as basins_figures
from figures import jacobian as jacobian_figures
from figures import perturbation as perturbation_figures
from figures import rank as rank_figures
from figures import swap as swap_figures
from figures import tokens as tokens_figures

__all__ = ["ANALYSES", "Analysis", "FigureSpec", "Option", "add_arguments", "comma_list", "options_for"]


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
    """One typed option of an analysis: its Python name, default, command-line flag and help.

    ``type`` parses the command-line text (``bool`` makes a switch); the flag defaults to
    ``--name-with-dashes``.
    """

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


@dataclass(frozen=True)
class FigureSpec:
    """A figure of an analysis: ``plot(result)`` returns a Figure, or a dict of Figures by file name.

    ``needs`` names a result variable without which the figure is skipped (a store without labels
    has no class structure).
    """

    name: str
    plot: Callable
    caption: str
    needs: str | None = None

    def draw(self, result: xr.Dataset) -> dict:
        if self.needs is not None and self.needs not in result:
            return {}
        drawn = self.plot(result)
        return dict(drawn) if isinstance(drawn, Mapping) else {self.name: drawn}


@dataclass(frozen=True)
class Analysis:
    """One analysis of `dynamo analyze`.

    Attributes
    ----------
    module : module
        The analysis module: ``DESCRIPTION``, ``compute``, ``summarize``.
    run : callable
        ``run(ds, model, partition, options) -> xr.Dataset``; ``model`` is a `LoadedModel` when
        ``needs_model`` (else None), ``options`` a dict with every `Option`'s value plus ``seed``,
        ``progress``, ``device`` and ``head`` (the `dynamo.heads.LinearHead` accuracies use, or
        None for the model's own classifier).
    figures : tuple of FigureSpec
    needs_model : bool
        The analysis runs the model (perturbations, Jacobians, layer swaps).
    options : tuple of Option
    accumulate : callable, optional
        ``accumulate(ds, options) -> analyses.streaming.Accumulator``: the analysis' share of the
        one pass over ``hidden`` that `dynamo analyze` makes for all such analyses together
        (`analyses.streaming.stream`); its ``run`` is that pass alone (`_streamed`).
    """

    module: ModuleType
    run: Callable[..., xr.Dataset]
    figures: tuple[FigureSpec, ...]
    needs_model: bool = False
    options: tuple[Option, ...] = field(default_factory=tuple)
    accumulate: Callable[..., Accumulator] | None = None

    @property
    def description(self) -> str:
        return self.module.DESCRIPTION


def _streamed(accumulate: Callable[..., Accumulator]) -> dict:
    """``run`` and ``accumulate`` of an analysis that reads ``hidden`` in the one pass (`analyses.streaming.stream`)."""
    return {"run": partial(_run_streamed, accumulate=accumulate), "accumulate": accumulate}


def _run_streamed(ds, model, partition, options, *, accumulate) -> xr.Dataset:
    return stream(ds, {"result": accumulate(ds, options)}, progress=options["progress"])["result"]


def _accumulate_basins(ds, options) -> Accumulator:
    return convergence.Convergence(ds, progress=options["progress"], head=options.get("head"))


def _accumulate_tokens(ds, options) -> Accumulator:
    return tokens.TokenDynamics(ds)


def _accumulate_rank(ds, options) -> Accumulator:
    return rank.UpdateRank(ds, n_bootstrap=options["n_bootstrap"], seed=options["seed"],
                           tokens_per_image=options["tokens_per_image"] or None)


def _run_perturbation(ds, model, partition, options) -> xr.Dataset:
    propagators = {"ViT": model}
    if options["surrogate"]:
        propagators["Raptor"] = RaptorFitter.load(options["surrogate"], teacher=model).model_
    results = [
        perturbation.compute(ds, propagator, alphas=options["alphas"], starts=options["starts"],
                             n_directions=options["directions"], images=options["perturbation_images"],
                             seed=options["seed"], progress=options["progress"])
        for propagator in propagators.values()
    ]
    return xr.concat(results, dim="propagator", combine_attrs="override").assign_coords(propagator=list(propagators))


def _recovery_figures(result: xr.Dataset) -> dict:
    figures = {f"recovery_{name}": perturbation_figures.plot_perturbation_recovery(result.sel(propagator=name))
               for name in result["propagator"].values}
    if result.sizes["propagator"] > 1:
        by_propagator = {str(name): result.sel(propagator=name) for name in result["propagator"].values}
        figures.update({f"comparison_{basis}": perturbation_figures.plot_recovery_comparison(by_propagator, basis=str(basis))
                        for basis in result["basis"].values})
    return figures


def _summarize_perturbation(result: xr.Dataset) -> dict:
    return {f"{name}_{key}": value for name in result["propagator"].values
            for key, value in perturbation.summarize(result.sel(propagator=name)).items()}


def _run_jacobian(ds, model, partition, options) -> xr.Dataset:
    return jacobian.compute(ds, model, n_singular=options["singular_values"], composed=options["composed"],
                            images=options["jacobian_images"], seed=options["seed"], progress=options["progress"])


def _run_swap(ds, model, partition, options) -> xr.Dataset:
    return swap.compute(ds, model, width=options["swap_width"], partition=partition, images=options["swap_images"],
                        progress=options["progress"], head=options.get("head"))


ANALYSES: dict[str, Analysis] = {
    "basins": Analysis(
        module=convergence, **_streamed(_accumulate_basins),
        figures=(
            FigureSpec("convergence", basins_figures.plot_convergence,
                       "γ, the cosine of each token to its own final direction, per layer and token kind (10-90% bands over images)."),
            FigureSpec("class_structure", basins_figures.plot_class_structure,
                       "Within- and between-class angles of the cls direction, and the accuracy of the nearest final class centroid, per layer.",
                       needs="within_class_angle"),
            FigureSpec("cls_projection", basins_figures.plot_cls_projection,
                       "cls trajectories on two principal directions of the last layer, coloured by class.", needs="projection"),
        ),
    ),
    "tokens": Analysis(
        module=tokens, **_streamed(_accumulate_tokens),
        figures=(
            FigureSpec("angular_speed", tokens_figures.plot_angular_speed,
                       "Angle each token turns per block, per token kind."),
            FigureSpec("coherence", tokens_figures.plot_coherence,
                       "Patch coherence: mean cosine of the patches (and of their updates) to their mean direction.",
                       needs="coherence"),
        ),
    ),
    "rank": Analysis(
        module=rank, **_streamed(_accumulate_rank),
        figures=(FigureSpec("update_rank", rank_figures.plot_update_rank,
                            "Rank measures of each block's updates, raw and on the sphere, with bootstrap intervals over images."),),
        options=(
            Option("n_bootstrap", 100, "bootstrap resamples of the images for error bars", int, flag="--bootstrap"),
            Option("tokens_per_image", rank.TOKENS_PER_IMAGE,
                   "rank: at most N tokens of a kind per image (a seeded subset of kinds with more; 0 for all)", int),
        ),
    ),
    "perturbation": Analysis(
        module=perturbation, run=_run_perturbation, needs_model=True,
        figures=(FigureSpec("recovery", _recovery_figures,
                            "Gap to the clean trajectory after a relative perturbation at each start layer, per token kind."),),
        options=(
            Option("alphas", [0.01, 0.05, 0.1, 0.2], "perturbation: relative sizes", float_list),
            Option("starts", None, "perturbation: injection layers (default all but the last)", int_list),
            Option("directions", 2, "perturbation: random draws and principal directions each", int),
            Option("perturbation_images", None, "perturbation: N images evenly spaced through the store (default all)", int),
            Option("surrogate", None, "perturbation: also run through a saved Raptor fit (folder of `dynamo fit`)", str),
        ),
    ),
    "jacobian": Analysis(
        module=jacobian, run=_run_jacobian, needs_model=True,
        figures=(FigureSpec("spectrum", jacobian_figures.plot_jacobian_spectrum,
                            "Top singular values of each block's Jacobian along real trajectories: expansion above 1, contraction below."),),
        options=(
            Option("singular_values", 4, "jacobian: singular values per block", int),
            Option("composed", False, "jacobian: also the map from every layer to the last", bool),
            Option("jacobian_images", 32, "jacobian: N images evenly spaced through the store", int),
        ),
    ),
    "swap": Analysis(
        module=swap, run=_run_swap, needs_model=True,
        figures=(FigureSpec("accuracy", swap_figures.plot_layer_swap,
                            "Accuracy and last-layer R² when block j runs in layer i's place, within and across phases."),),
        options=(
            Option("swap_width", 1, "swap: consecutive layers replaced", int),
            Option("swap_images", None, "swap: N images evenly spaced through the store (default all)", int),
        ),
    ),
}
SUMMARIZERS = {"perturbation": _summarize_perturbation}


def summarize(name: str, result: xr.Dataset) -> dict:
    """The headline numbers of one analysis' result (a flat dict)."""
    return SUMMARIZERS.get(name, ANALYSES[name].module.summarize)(result)


def options_for(names, given: Mapping) -> dict:
    """Every option of the named analyses: the given value, else its one default."""
    options = {}
    for name in names:
        for option in ANALYSES[name].options:
            value = given.get(option.name)
            options[option.name] = option.default if value is None else value
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every registered analysis' own options to a command line (each flag once)."""
    seen = set()
    for entry in ANALYSES.values():
        for option in entry.options:
            if option.name not in seen:
                option.add_to(parser)
                seen.add(option.name)


def partition_from_boundaries(boundaries, num_blocks: int) -> Partition | None:
    """The contiguous partition whose phases end after each boundary (None for no boundaries given)."""
    return None if boundaries is None else Partition.from_thresholds(boundaries, num_blocks)
