"""Perturbation recovery: nudge the residual stream at one layer and watch the trajectory.

The paper calls small perturbations of a ViT's trajectory "self-correcting" (section 5 (i) of
the methods spec) but leaves the protocol unstated. This module makes it a measurement:

1. take the real state X_{l0} of every image at layer l0 from a trajectory store;
2. add to every token t a perturbation of relative size alpha, delta_t = alpha * |x_t| * u_t,
   with u_t a unit vector, either an independent random direction per image and token
   (``"random"``) or one of the top principal directions of the layer's tokens
   (``"principal"``, the same direction for every token);
3. carry the clean and the perturbed state through the remaining blocks, with the live model
   (`dynamo.stepping.BlockStepper`) or any surrogate with the same ``run`` method (a fitted
   Raptor), and measure at every later layer the angle and the relative distance between the
   perturbed and the clean token;
4. the recovery ratio is the relative gap at the last layer over the injected one (alpha):
   below 1 the trajectory bends back, above 1 the perturbation grows.

Choices the paper leaves open, made here and exposed as parameters: the perturbation size is
relative to each token's own norm (the spec's suggestion, delta = alpha |x| u); every token is
perturbed unless ``perturb`` names one token kind; the principal directions are those of the
perturbed tokens at l0, pooled over the selected images (centred, as PCA does), with their
sign as scikit-learn fixes it; gaps are measured on the residual stream itself (no final norm).

The model becomes a propagator in `dynamo.stepping.propagator_for`; the helpers `select_images`
and `states_at` are shared with the other live-model analyses (`analyses.jacobian`, `analyses.swap`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr

from analyses.streaming import image_coords, principal_directions, rounded
from dynamo.layout import token_groups
from dynamo.progress import progress_bar
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
    """The stored states of a batch of images at one layer, as a tensor for the propagator.

    Parameters
    ----------
    ds : xarray.Dataset
        Trajectory store (lazy).
    layer : int
        A layer present in the store.
    batch : slice
        Positions along ``image``.
    like : torch.Tensor, optional
        A tensor whose dtype and device the states take (a model parameter); float32 on the CPU
        by default.

    Returns
    -------
    torch.Tensor
        (B, T, D).
    """
    if layer not in ds.indexes["layer"]:
        raise ValueError(
            f"the store has no layer {layer} (it keeps layers {ds['layer'].values.tolist()}); "
            "record the store with every layer (no --layers)"
        )
    values = ds["hidden"].sel(layer=layer).isel(image=batch).values
    kwargs = {"dtype": like.dtype, "device": like.device} if like is not None else {"dtype": torch.float32}
    return torch.as_tensor(values).to(**kwargs)


def parameter_of(propagator) -> torch.Tensor | None:
    """One parameter of the propagator's module, for the dtype and device of its inputs."""
    for candidate in (getattr(propagator, "module", None), propagator):
        if isinstance(candidate, torch.nn.Module):
            return next(candidate.parameters(), None)
    return None


def last_layer(ds: xr.Dataset) -> int:
    """L, the last layer (output of the last block), from the store's attributes."""
    return int(ds.attrs.get("num_blocks", ds["layer"].values.max()))


def compute(
    ds: xr.Dataset,
    model,
    starts: Sequence[int] | None = None,
    alphas: Sequence[float] = (0.01, 0.05, 0.1, 0.2),
    n_directions: int = 2,
    bases: Sequence[str] = BASES,
    perturb: str = "all",
    images: int | Sequence[int] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Inject perturbations at layer l0 and measure how far every later layer stays from clean.

    Parameters
    ----------
    ds : xarray.Dataset
        Trajectory store (`dynamo.open_trajectories`) with every token; the starting states are
        its ``hidden`` at each l0.
    model : LoadedModel, timm ViT, BlockStepper or surrogate
        See `dynamo.stepping.propagator_for`. Clean and perturbed states go through the same propagator.
    starts : sequence of int, optional
        Injection layers l0, 0 <= l0 < L. Default: 0..L-1.
    alphas : sequence of float
        Relative perturbation sizes, |delta_t| / |x_t| (>= 0; 0 gives the clean run).
    n_directions : int
        Random draws, and principal directions (PC 1..n), per basis.
    bases : sequence of {"random", "principal"}
    perturb : str
        Which tokens get a perturbation: ``"all"`` or one token kind (``"cls"``, ``"register"``,
        ``"patch"``, ...). Gaps are measured on every token kind either way.
    images : int, sequence of int, or None
        See `select_images`.
    batch_size : int
        Images per propagation (each is run once per alpha in one stacked batch).
    seed : int
        Seed of the random directions; each image's draw depends only on (seed, direction,
        image position), not on the batching.
    progress : bool
        Show a progress bar.

    Returns
    -------
    xarray.Dataset
        Dims ``image``, ``token_kind``, ``start`` (l0), ``alpha``, ``basis``, ``direction``,
        ``layer`` (0..L; NaN before ``start``):

        - ``distance``: mean over the kind's tokens of |x~_l - x_l| / |x_l| (relative gap);
        - ``angle``: mean over the kind's tokens of the angle between x~_l and x_l, degrees;
        - ``recovery`` (no ``layer``): ``distance`` at L over alpha (NaN for alpha = 0);
        - ``gain`` (image, start, alpha, basis, direction): |X~_L - X_L| / |X~_l0 - X_l0| over
          all tokens (Frobenius), the absolute growth that Jacobian spectra bound;
        - ``prediction_kept`` (same dims as ``gain``): whether the head's top-1 class is the
          clean run's (only if the propagator has a ``head``);
        - ``explained_variance_ratio`` (start, direction): of the principal directions used.
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
    principal = {
        s: _principal_directions(ds, s, perturbed, n_directions, batch_size) if "principal" in bases else None
        for s in starts
    }

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
    coords = {
        "image": ds["image"].values,
        "token_kind": kinds,
        "start": starts,
        "alpha": alphas,
        "basis": bases,
        "direction": np.arange(n_directions),
        "layer": np.arange(L + 1),
    }
    coords.update({name: ("image", values) for name, values in image_coords(ds).items()})
    result = xr.Dataset(
        {
            "distance": (dims, distance, {"long_name": "relative gap |x~ - x| / |x|, mean over the kind's tokens"}),
            "angle": (dims, angle, {"long_name": "angle between perturbed and clean token", "units": "degree"}),
            "gain": (
                dims[:1] + dims[2:-1],
                gain,
                {"long_name": "|X~_L - X_L| / |X~_l0 - X_l0| over all tokens (absolute growth)"},
            ),
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
        result["explained_variance_ratio"] = (
            ("start", "direction"),
            np.stack([principal[s][1] for s in starts]),
            {"long_name": "variance ratio of the principal direction among the perturbed tokens at start"},
        )
    result.attrs = {
        "analysis": "perturbation_recovery",
        "model": ds.attrs.get("model", ""),
        "propagator": type(propagator).__name__,
        "perturb": perturb,
        "seed": seed,
        "num_blocks": L,
        "perturbation": "delta_t = alpha * |x_t| * u_t at layer start; u_t random unit (per image, "
        "token) or principal direction of the perturbed tokens at start",
    }
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
    """Top ``n`` principal directions (n, D) of the perturbed tokens at ``layer``, and their variance ratios.

    Streamed over batches of images (moments summed a batch at a time), so a large store is never
    read whole; signed as scikit-learn signs PCA components (largest-magnitude entry positive).
    """
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
    """Relative distance and angle (degrees) per token kind.

    Parameters
    ----------
    states, clean : torch.Tensor
        (S, A, B, T, D) and (S, 1, B, T, D).
    kind_weights : torch.Tensor
        (K, T), each row averaging over one kind's tokens.

    Returns
    -------
    tuple of torch.Tensor
        Each (S, A, B, K), float32 on the CPU.
    """
    states, clean = states.float().cpu(), clean.float().cpu()
    clean_norm = clean.norm(dim=-1)
    distance = (states - clean).norm(dim=-1) / clean_norm
    # 2 arcsin(|a^ - b^| / 2) is the angle, accurate for small angles where arccos(cos) is not.
    chord = (states / states.norm(dim=-1, keepdim=True) - clean / clean_norm[..., None]).norm(dim=-1)
    angle = torch.rad2deg(2 * torch.arcsin((chord / 2).clamp(max=1)))
    return distance @ kind_weights.T, angle @ kind_weights.T


def summarize(result: xr.Dataset) -> dict:
    """Headline numbers: ``recovery_<kind>_<basis>``, the median recovery ratio over images,
    directions, starts and alphas > 0, and ``prediction_kept_<basis>``, the mean fraction of top-1
    classes kept (where the propagator has a head)."""
    summary = {
        f"recovery_{kind}_{basis}": rounded(float(result["recovery"].sel(token_kind=kind, basis=basis).median()))
        for kind in result["token_kind"].values for basis in result["basis"].values
    }
    if "prediction_kept" in result:
        summary.update({f"prediction_kept_{basis}": rounded(float(result["prediction_kept"].sel(basis=basis).mean()))
                        for basis in result["basis"].values})
    return summary


