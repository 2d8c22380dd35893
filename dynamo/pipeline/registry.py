"""The analyses `dynamo analyze` and `dynamo profile` run, each described once.

An entry names the analysis module (``DESCRIPTION``, ``compute``, ``summarize``), its figures
(each with a caption), whether it runs the live model, and its typed options
(`dynamo.pipeline.arguments.ANALYSIS_OPTIONS`, where their defaults live).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType

import xarray as xr

from analyses import basins, jacobian, perturbation, rank, swap, tokens
from analyses.streaming import Accumulator, stream
from dynamo.partition import Partition
from dynamo.pipeline.arguments import ANALYSIS_OPTIONS, Option
from dynamo.surrogates import RaptorFitter
from figures import basins as basins_figures
from figures import jacobian as jacobian_figures
from figures import perturbation as perturbation_figures
from figures import rank as rank_figures
from figures import swap as swap_figures
from figures import tokens as tokens_figures

__all__ = ["ANALYSES", "Analysis", "FigureSpec", "Option", "options_for", "partition_from_boundaries", "summarize"]


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
    return basins.Convergence(ds, progress=options["progress"], head=options.get("head"))


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
        module=basins, **_streamed(_accumulate_basins), options=ANALYSIS_OPTIONS["basins"],
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
        module=tokens, **_streamed(_accumulate_tokens), options=ANALYSIS_OPTIONS["tokens"],
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
        options=ANALYSIS_OPTIONS["rank"],
    ),
    "perturbation": Analysis(
        module=perturbation, run=_run_perturbation, needs_model=True,
        figures=(FigureSpec("recovery", _recovery_figures,
                            "Gap to the clean trajectory after a relative perturbation at each start layer, per token kind."),),
        options=ANALYSIS_OPTIONS["perturbation"],
    ),
    "jacobian": Analysis(
        module=jacobian, run=_run_jacobian, needs_model=True,
        figures=(FigureSpec("spectrum", jacobian_figures.plot_jacobian_spectrum,
                            "Top singular values of each block's Jacobian along real trajectories: expansion above 1, contraction below."),),
        options=ANALYSIS_OPTIONS["jacobian"],
    ),
    "swap": Analysis(
        module=swap, run=_run_swap, needs_model=True,
        figures=(FigureSpec("accuracy", swap_figures.plot_layer_swap,
                            "Accuracy and last-layer R² when block j runs in layer i's place, within and across phases."),),
        options=ANALYSIS_OPTIONS["swap"],
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


def partition_from_boundaries(boundaries, num_blocks: int) -> Partition | None:
    """The contiguous partition whose phases end after each boundary (None for no boundaries given)."""
    return None if boundaries is None else Partition.from_thresholds(boundaries, num_blocks)
