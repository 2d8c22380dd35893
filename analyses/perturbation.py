"""Perturbation recovery: nudge the residual stream at layer l0 by delta_t = alpha |x_t| u_t (u_t a
random or principal direction), carry clean and perturbed states through the remaining blocks,
and measure how far every later layer stays from clean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr

from analyses.streaming import image_coords, principal_directions, rounded
from dynamo.layout import token_groups
from dynamo.progress import progress_bar
from dynamo.serialize import read_hidden
from dynamo.stepping import propagator_for
from dynamo.store import image_positions

__all__ = ["DESCRIPTION", "compute", "select_images", "states_at", "summarize"]

DESCRIPTION = (
    "Perturbation recovery: a relative nudge of size alpha at layer l0, carried through the remaining "
    "blocks, and the gap and angle to the clean trajectory at every later layer, per token kind."
)
BASES = ("random", "principal")


def select_images(ds: xr.Dataset, images: int | Sequence[int] | None) -> xr.Dataset:
    """The images an analysis runs on: ``ds`` at `dynamo.store.image_positions` (None: all, n: evenly spaced, positions)."""
    return ds if images is None else ds.isel(image=image_positions(ds, images))


def states_at(ds: xr.Dataset, layer: int, batch: slice, like: torch.Tensor | None = None) -> torch.Tensor:
    """The stored (B, T, D) states of a batch of images at one layer, with the dtype and device of ``like`` (default float32 on the CPU)."""
    if layer not in ds.indexes["layer"]:
        raise ValueError(
            f"the store has no layer {layer} (it keeps layers {ds['layer'].values.tolist()}); "
            "record the store with every layer (no --layers)"
        )
    states = read_hidden(ds["hidden"].sel(layer=layer), batch)
    return states if like is None else states.to(like)


def parameter_of(propagator) -> torch.Tensor | None:
    """One parameter of the propagator's module, for the dtype and device of its inputs."""
    for candidate in (getattr(propagator, "module", None), propagator):
        if isinstance(candidate, torch.nn.Module):
            return next(candidate.parameters(), None)
    return None


def last_layer(ds: xr.Dataset) -> int:
    """L, the last layer (output of the last block), from the store's attributes."""
    return int(ds.attrs.get("num_blocks", ds["layer"].values.max()))


def compute(ds: xr.Dataset, model, starts: Sequence[int] | None = None, alphas: Sequence[float] = (0.01, 0.05, 0.1, 0.2),
            n_directions: int = 2, bases: Sequence[str] = BASES, perturb: str = "all",
            images: int | Sequence[int] | None = None, batch_size: int = 32, seed: int = 0, progress: bool = True) -> xr.Dataset:
    """Inject perturbations at layer l0 and measure how far every later layer stays from clean.

    Parameters
    ----------
    ds : xarray.Dataset
        Trajectory store with ``hidden``: the starting states.
    model : LoadedModel, timm ViT, BlockStepper or surrogate
        See `dynamo.stepping.propagator_for`.
    starts : sequence of int, optional
        Injection layers l0 in 0..L-1; default all.
    alphas : sequence of float
        Relative perturbation sizes |delta_t| / |x_t| (0 gives the clean run).
    n_directions : int
        Random draws, and principal directions of the perturbed tokens at l0, per basis.
    perturb : str
        ``"all"`` or the one token kind perturbed; gaps are measured on every kind.
    seed : int
        Each image's random draw depends only on (seed, direction, image position).

    Returns
    -------
    xarray.Dataset
        ``distance`` (relative gap) and ``angle`` (degrees), means over each kind's tokens, over
        (image, token_kind, start, alpha, basis, direction, layer); ``recovery``: ``distance`` at L
        over alpha; ``gain`` |X~_L - X_L| / |X~_l0 - X_l0|; ``prediction_kept`` (with a head).
    """
    propagator = propagator_for(model, ds)
    ds = select_images(ds, images)
    L = last_layer(ds)
    starts = list(range(L)) if starts is None else [int(s) for s in starts]
    alphas = np.asarray(alphas, dtype=float)
    bases = list(bases)
    _check_arguments(starts, alphas, n_directions, bases, L)
    groups = token_groups(ds["token_kind"], pooled=True)
    kinds = list(groups)[1:]
    if perturb not in groups:
        raise ValueError(f"perturb must be 'all' or a token kind of this store {kinds}, got {perturb!r}")
    perturbed = np.isin(np.arange(ds.sizes["token"]), groups[perturb])
    kind_weights = torch.zeros(len(kinds), ds.sizes["token"])
    for row, kind in zip(kind_weights, kinds):
        row[groups[kind]] = 1 / groups[kind].size
    like = parameter_of(propagator)
    has_head = callable(getattr(propagator, "head", None))

    n = ds.sizes["image"]
    shape = (n, len(kinds), len(starts), len(alphas), len(bases), n_directions, L + 1)
    distance = np.full(shape, np.nan, np.float32)
    angle = np.full(shape, np.nan, np.float32)
    gain = np.full(shape[:1] + shape[2:-1], np.nan, np.float32)
    kept = np.zeros(gain.shape, bool)
    principal = {s: _principal_directions(ds, s, perturbed, n_directions, batch_size) if "principal" in bases else None
                 for s in starts}

    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    bar = progress_bar(total=len(batches) * len(starts), desc="perturbation", enabled=progress)
    with torch.no_grad():
        for batch in batches:
            random_units = _random_directions(ds, batch, n_directions, seed, perturbed)
            for si, start in enumerate(starts):
                x0 = states_at(ds, start, batch, like)
                clean = torch.stack(propagator.run(x0, start, L))  # (S, B, T, D)
                clean_top1 = propagator.head(clean[-1]).argmax(-1) if has_head else None
                norms = x0.norm(dim=-1, keepdim=True)
                for bi, basis in enumerate(bases):
                    for d in range(n_directions):
                        if basis == "random":
                            unit = random_units[d].to(x0)
                        else:
                            unit = torch.as_tensor(principal[start][0][d] * perturbed[:, None]).to(x0)
                        delta = norms * unit  # (B, T, D), per-token |delta_t| = |x_t| before alpha
                        stacked = (x0[None] + torch.as_tensor(alphas).to(x0)[:, None, None, None] * delta).flatten(0, 1)
                        states = torch.stack(propagator.run(stacked, start, L))
                        states = states.unflatten(1, (len(alphas), -1))  # (S, A, B, T, D)
                        dist, ang = _gaps(states, clean[:, None], kind_weights)
                        distance[batch, :, si, :, bi, d, start:] = dist.permute(2, 3, 1, 0).numpy()
                        angle[batch, :, si, :, bi, d, start:] = ang.permute(2, 3, 1, 0).numpy()
                        injected = (states[0] - clean[0]).flatten(2).norm(dim=-1)
                        final = (states[-1] - clean[-1]).flatten(2).norm(dim=-1)
                        gain[batch, si, :, bi, d] = (final / injected).T.cpu().numpy()
                        if has_head:
                            top1 = propagator.head(states[-1].flatten(0, 1)).argmax(-1).unflatten(0, (len(alphas), -1))
                            kept[batch, si, :, bi, d] = (top1 == clean_top1).T.cpu().numpy()
                bar.update()
    bar.close()

    dims = ("image", "token_kind", "start", "alpha", "basis", "direction", "layer")
    coords = {"image": ds["image"].values, "token_kind": kinds, "start": starts, "alpha": alphas, "basis": bases,
              "direction": np.arange(n_directions), "layer": np.arange(L + 1),
              **{name: ("image", values) for name, values in image_coords(ds).items()}}
    result = xr.Dataset(
        {
            "distance": (dims, distance, {"long_name": "relative gap |x~ - x| / |x|, mean over the kind's tokens"}),
            "angle": (dims, angle, {"long_name": "angle between perturbed and clean token", "units": "degree"}),
            "gain": (dims[:1] + dims[2:-1], gain, {"long_name": "|X~_L - X_L| / |X~_l0 - X_l0| over all tokens (absolute growth)"}),
        },
        coords=coords,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        result["recovery"] = (result["distance"].sel(layer=L) / result["alpha"].where(result["alpha"] > 0)).drop_vars(
            "layer"
        )
    result["recovery"].attrs["long_name"] = "relative gap at the last layer / injected relative size alpha"
    if has_head:
        result["prediction_kept"] = (dims[:1] + dims[2:-1], kept, {"long_name": "top-1 class equals the clean run's"})
    if principal[starts[0]] is not None:
        ratio = np.stack([principal[s][1] for s in starts])
        long_name = "variance ratio of the principal direction among the perturbed tokens at start"
        result["explained_variance_ratio"] = (("start", "direction"), ratio, {"long_name": long_name})
    result.attrs = {"analysis": "perturbation_recovery", "model": ds.attrs.get("model", ""), "propagator": type(propagator).__name__,
                    "perturb": perturb, "seed": seed, "num_blocks": L,
                    "perturbation": "delta_t = alpha * |x_t| * u_t at layer start; u_t random unit (per image, "
                                    "token) or principal direction of the perturbed tokens at start"}
    return result


def _check_arguments(starts, alphas, n_directions, bases, L) -> None:
    if not starts or min(starts) < 0 or max(starts) >= L:
        raise ValueError(f"starts must lie in 0..{L - 1} (a perturbation needs a later layer), got {starts}")
    if alphas.size == 0 or (alphas < 0).any() or not np.isfinite(alphas).all():
        raise ValueError(f"alphas must be finite and >= 0, got {alphas.tolist()}")
    if n_directions < 1:
        raise ValueError(f"n_directions must be at least 1, got {n_directions}")
    unknown = set(bases) - set(BASES)
    if unknown or not bases:
        raise ValueError(f"bases must be a non-empty subset of {list(BASES)}, got {bases}")


def _random_directions(ds, batch: slice, n_directions: int, seed: int, perturbed: np.ndarray) -> list[torch.Tensor]:
    """Independent unit vectors per image and token, (B, T, D) per direction; 0 on unperturbed tokens."""
    t, d = ds.sizes["token"], ds.sizes["feature"]
    positions = range(batch.start, batch.stop)
    units = []
    for direction in range(n_directions):
        draws = np.stack([np.random.default_rng([seed, direction, p]).standard_normal((t, d)) for p in positions])
        draws /= np.linalg.norm(draws, axis=-1, keepdims=True)
        units.append(torch.as_tensor(draws * perturbed[:, None], dtype=torch.float32))
    return units


def _principal_directions(ds, layer: int, perturbed: np.ndarray, n: int, batch_size: int):
    """Top ``n`` principal directions (n, D) of the perturbed tokens at ``layer``, streamed, and their variance ratios."""
    width = ds.sizes["feature"]
    if n > width:
        raise ValueError(f"n_directions ({n}) exceeds the width of the residual stream ({width})")
    scatter, total, count = np.zeros((width, width)), np.zeros(width), 0
    hidden = ds["hidden"].sel(layer=layer).isel(token=np.flatnonzero(perturbed))
    for i in range(0, ds.sizes["image"], batch_size):
        tokens = hidden.isel(image=slice(i, i + batch_size)).values.reshape(-1, width).astype(np.float64)
        scatter, total, count = scatter + tokens.T @ tokens, total + tokens.sum(0), count + len(tokens)
    _, components, ratio = principal_directions(scatter, total, count, n)
    mean_square = np.trace(scatter) / count
    if not mean_square - total @ total / count**2 > 1e-12 * mean_square:  # rounding noise of a constant
        raise ValueError(
            f"the perturbed tokens at layer {layer} do not vary across images, so they have no "
            "principal directions; perturb along random directions only (bases=['random'])"
        )
    return components.T, ratio


def _gaps(states: torch.Tensor, clean: torch.Tensor, kind_weights: torch.Tensor):
    """Relative distance and angle (degrees) of (S, A, B, T, D) ``states`` to ``clean``, per (K, T) ``kind_weights`` row.
    """
    states, clean = states.float().cpu(), clean.float().cpu()
    clean_norm = clean.norm(dim=-1)
    distance = (states - clean).norm(dim=-1) / clean_norm
    # 2 arcsin(|a^ - b^| / 2) is the angle, accurate for small angles where arccos(cos) is not.
    chord = (states / states.norm(dim=-1, keepdim=True) - clean / clean_norm[..., None]).norm(dim=-1)
    angle = torch.rad2deg(2 * torch.arcsin((chord / 2).clamp(max=1)))
    return distance @ kind_weights.T, angle @ kind_weights.T


def summarize(result: xr.Dataset) -> dict:
    """Median ``recovery_<kind>_<basis>`` over images, directions, starts and alphas > 0, and the mean
    ``prediction_kept_<basis>`` (with a head).
    """
    summary = {
        f"recovery_{kind}_{basis}": rounded(float(result["recovery"].sel(token_kind=kind, basis=basis).median()))
        for kind in result["token_kind"].values for basis in result["basis"].values
    }
    if "prediction_kept" in result:
        summary.update({f"prediction_kept_{basis}": rounded(float(result["prediction_kept"].sel(basis=basis).mean()))
                        for basis in result["basis"].values})
    return summary


