"""Update-rank collapse (Raptor paper, section 5 (iii), appendix D): rank measures of each block's
centred update matrix per token kind, raw and on the unit sphere, from one pass over the store,
with a bootstrap over groups of images (exact scatters, or Nyström sketches for wide models).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.linalg import blas
from threadpoolctl import threadpool_limits

from analyses.streaming import Accumulator, Chunk, provenance, rounded, stream, token_sample
from dynamo.layout import token_groups

DESCRIPTION = (
    "Rank of each block's updates per token kind (stable and effective rank, participation "
    "ratio, directions for a variance share), raw and on the unit sphere, with bootstrap intervals."
)
SPACES = ("raw", "sphere")
MEASURES = ("stable_rank", "effective_rank", "participation_ratio", "n_directions")
TOKENS_PER_IMAGE = 64
N_GROUPS = 20
SKETCH_SIZE = 64


def spectrum_measures(eigenvalues: np.ndarray, variance: float = 0.9) -> dict[str, np.ndarray]:
    """Rank measures of (..., n) scatter spectra σ² (any order; tiny negatives count as 0).

    Returns
    -------
    dict of numpy.ndarray
        ``stable_rank`` Σσ²/max σ², ``effective_rank`` exp(H(σ²/Σσ²)), ``participation_ratio``
        (Σσ²)²/Σσ⁴, ``n_directions`` holding ``variance`` of Σσ²; each (...), NaN for an all-zero spectrum.
    """
    values = np.sort(np.clip(eigenvalues, 0.0, None), axis=-1)[..., ::-1]
    total = values.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = values / total[..., None]
        entropy = -np.sum(np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0), axis=-1)
        measures = {
            "stable_rank": total / values[..., 0],
            "effective_rank": np.exp(entropy),
            "participation_ratio": total**2 / np.sum(values**2, axis=-1),
            "n_directions": np.where(
                total > 0, np.sum(np.cumsum(share, axis=-1) < variance - 1e-12, axis=-1) + 1.0, np.nan
            ),
        }
    return measures


def compute(ds: xr.Dataset, *, spaces: tuple[str, ...] = SPACES, n_bootstrap: int = 100, variance: float = 0.9, seed: int = 0,
            tokens_per_image: int | None = TOKENS_PER_IMAGE, n_groups: int = N_GROUPS, sketch_size: int = SKETCH_SIZE,
            progress: bool = True) -> xr.Dataset:
    """Rank measures of the per-block updates, per token kind, with bootstrap error bars.

    Parameters
    ----------
    spaces : tuple of {"raw", "sphere"}
        Updates X_{ℓ+1} − X_ℓ of the states, and/or x̂_{ℓ+1} − x̂_ℓ of their directions.
    n_bootstrap : int
        Bootstrap replicates over ``n_groups`` groups of images (a seeded shuffle dealt round; 0: none).
    variance : float
        Variance fraction for ``n_directions``.
    tokens_per_image : int or None
        A kind with more tokens per image contributes a seeded subset of this many per image (the
        same at every layer); None for every token.
    sketch_size : int
        Width above which each group's scatter is kept as a rank-``sketch_size`` Nyström sketch
        (Tropp et al. 2017), replicates then being shifts of the exact estimate.

    Returns
    -------
    xarray.Dataset
        ``rank`` (measure, token_kind, space, block); ``rank_bootstrap`` (replicate, ...);
        ``spectrum`` (token_kind, space, block, component), largest first; ``rows`` (token_kind,
        block). ``block`` b is the step from layer ``from_layer`` to b.
    """
    accumulator = UpdateRank(ds, spaces=spaces, n_bootstrap=n_bootstrap, variance=variance, seed=seed,
                             tokens_per_image=tokens_per_image, n_groups=n_groups, sketch_size=sketch_size)
    return stream(ds, {"rank": accumulator}, description="rank", progress=progress)["rank"]


class UpdateRank(Accumulator):
    """`compute`'s accumulator for `analyses.streaming.stream`.

    Its total holds, per step, token kind and space, ``scatter`` (upper triangle of UᵀU, float64),
    ``sums`` and ``rows``; with a bootstrap, ``groups``: each group's ``sketch`` (its scatter times
    Ω, or its upper-triangular scatter when exact), ``sums``, ``trace`` and ``rows``.
    """

    def __init__(self, ds: xr.Dataset, *, spaces=SPACES, n_bootstrap: int = 100, variance: float = 0.9,
                 seed: int = 0, tokens_per_image: int | None = TOKENS_PER_IMAGE, n_groups: int = N_GROUPS,
                 sketch_size: int = SKETCH_SIZE):
        unknown = set(spaces) - set(SPACES)
        if unknown or not spaces:
            raise ValueError(f"spaces must be a subset of {SPACES}, got {spaces!r}")
        if n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
        if ds.sizes["layer"] < 2:
            raise ValueError("update rank needs at least two recorded layers; record without --layers")
        for name, value in (("tokens_per_image", tokens_per_image), ("n_groups", n_groups), ("sketch_size", sketch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number, got {value}")
        self.spaces, self.n_bootstrap, self.variance, self.seed = tuple(spaces), n_bootstrap, variance, seed
        self.kinds = token_groups(ds["token_kind"])
        self.per_image = {kind: tokens_per_image if tokens_per_image is not None and tokens_per_image < len(positions)
                          else None for kind, positions in self.kinds.items()}
        self.tokens_per_image = tokens_per_image
        self.images = ds["image"].values
        self.n_steps, self.n_features = ds.sizes["layer"] - 1, ds.sizes["feature"]
        self.n_groups = min(n_groups, len(self.images)) if n_bootstrap else 0
        # each image's group: a seeded shuffle dealt round, so groups are equal and mix the store's order
        self.group_of = np.random.default_rng([seed, 2]).permutation(len(self.images)) % max(self.n_groups, 1)
        self.exact = self.n_features <= sketch_size
        self.sketch_size = self.n_features if self.exact else sketch_size
        test = np.random.default_rng([seed, 1]).normal(size=(self.n_features, self.sketch_size))
        self.test = None if self.exact else np.linalg.qr(test)[0].astype(np.float32)  # Ω, orthonormal columns

    def _shape(self) -> tuple[int, int, int]:
        return self.n_steps, len(self.kinds), len(self.spaces)

    def start(self) -> dict:
        shape, f = self._shape(), self.n_features
        return {"scatter": np.zeros(shape + (f, f)), "sums": np.zeros(shape + (f,)), "rows": np.zeros(shape[:2]),
                "groups": {}}

    def open_block(self, block: xr.Dataset, total: dict) -> dict:
        order = np.argsort(self.images, kind="stable")
        positions = order[np.searchsorted(self.images, block["image"].values, sorter=order)]
        tokens = {}
        for k, (kind, kind_positions) in enumerate(self.kinds.items()):
            subset = token_sample(len(kind_positions), self.per_image[kind], positions, (self.seed, k))
            tokens[kind] = kind_positions if subset is None else kind_positions[subset]  # (token,) or (image, token)
        members = {}  # the block's images (indices into the block) by bootstrap group
        if self.n_groups:
            labels = self.group_of[positions]
            for g in np.unique(labels):
                members[int(g)] = np.flatnonzero(labels == g)
                total["groups"].setdefault(int(g), self._group())
        return {"total": total, "tokens": tokens, "members": members, "rows": None}

    def _group(self) -> dict:
        shape, f = self._shape(), self.n_features
        sketch = np.zeros(shape + (f, f)) if self.exact else np.zeros(shape + (f, self.sketch_size), dtype=np.float32)
        return {"sketch": sketch, "sums": np.zeros(shape + (f,)), "trace": np.zeros(shape), "rows": np.zeros(shape[:2])}

    def _rows(self, state: dict, chunk: Chunk) -> dict:
        """Each kind's chosen tokens of a chunk, as states and unit directions (image, token, feature)."""
        rows = {}
        for kind, tokens in state["tokens"].items():
            index = (slice(None), tokens) if tokens.ndim == 1 else (np.arange(len(tokens))[:, None], tokens)
            states, norms = chunk.states[index], chunk.norms[index][..., None]
            directions = (np.divide(states, norms, out=np.zeros_like(states), where=norms > 0)
                          if "sphere" in self.spaces else None)
            rows[kind] = (states, directions)
        return rows

    def update(self, state: dict, chunk: Chunk, previous: Chunk | None, final: Chunk | None) -> None:
        rows, before = self._rows(state, chunk), state["rows"]
        state["rows"] = rows
        if previous is None:
            return
        total, step = state["total"], chunk.index - 1
        for k, kind in enumerate(self.kinds):
            for s, space in enumerate(self.spaces):
                column = 0 if space == "raw" else 1
                update = rows[kind][column] - before[kind][column]  # (image, token, feature)
                self._add(state, total, (step, k, s), update)
            total["rows"][step, k] += update.shape[0] * update.shape[1]

    def _add(self, state: dict, total: dict, where: tuple, update: np.ndarray) -> None:
        """Add one block's (image, token, feature) update rows of one step, kind and space into the totals.

        The Gram matrix is formed from rows centred on their float32 mean (`_centred_gram`), so a large
        common drift costs the exact estimate no precision.
        """
        total["scatter"][where] += _centred_gram(update.reshape(-1, self.n_features))
        total["sums"][where] += update.sum(axis=(0, 1), dtype=np.float64)
        for g, images in state["members"].items():
            rows, group = update[images].reshape(-1, self.n_features), total["groups"][g]
            group["sketch"][where] += _centred_gram(rows) if self.exact else rows.T @ (rows @ self.test)
            group["sums"][where] += rows.sum(axis=0, dtype=np.float64)
            group["trace"][where] += np.einsum("rf,rf->r", rows, rows).sum(dtype=np.float64)
            if where[2] == 0:
                group["rows"][where[:2]] += len(rows)

    def close_block(self, state: dict, total: dict) -> None:
        state.clear()

    def merge(self, total: dict, part: dict) -> dict:
        merged = {name: total[name] + part[name] for name in ("scatter", "sums", "rows")}
        merged["groups"] = dict(total["groups"])
        for g, group in part["groups"].items():
            mine = total["groups"].get(g)
            merged["groups"][g] = group if mine is None else {name: mine[name] + value for name, value in group.items()}
        return merged

    def finish(self, total: dict, dataset: xr.Dataset) -> xr.Dataset:
        shape, n_features = self._shape(), self.n_features
        measures = {name: np.zeros((self.n_bootstrap + 1,) + shape) for name in MEASURES}
        spectrum = np.zeros(shape + (n_features,))
        weights = (np.random.default_rng(self.seed).multinomial(self.n_groups, np.full(self.n_groups, 1 / self.n_groups),
                                                                  size=self.n_bootstrap).astype(np.float64)
                   if self.n_bootstrap else None)
        groups = [total["groups"][g] for g in sorted(total["groups"])]
        with threadpool_limits(limits=1, user_api="blas"):  # many mid-sized problems: threads only contend
            for where in np.ndindex(*shape):
                count = total["rows"][where[:2]]
                scatter = _symmetric(total["scatter"][where]) - np.outer(total["sums"][where], total["sums"][where]) / max(count, 1)
                values = np.clip(np.linalg.eigvalsh(scatter)[::-1], 0.0, None)
                spectrum[where] = values
                point = spectrum_measures(values, self.variance)
                for name in MEASURES:
                    measures[name][(0,) + where] = point[name]
                if weights is not None:
                    replicates = self._replicates(weights, groups, where, values)
                    for name in MEASURES:
                        measures[name][(slice(1, None),) + where] = replicates[name]
        return self._result(dataset, measures, spectrum, total["rows"])

    def _replicates(self, weights: np.ndarray, groups: list[dict], where: tuple, values: np.ndarray) -> dict:
        """Rank measures of the resampled groups' scatters (replicate,), for one step, kind and space."""
        sketches, sums, rows, traces = (np.stack([group[name][index] for group in groups]) for name, index in
                                        (("sketch", where), ("sums", where), ("rows", where[:2]), ("trace", where)))
        if self.exact:
            resampled_sums, resampled_rows = weights @ sums, np.maximum(weights @ rows, 1)
            scatter = np.tensordot(weights, _symmetric(sketches), 1)
            scatter -= np.einsum("rf,rh->rfh", resampled_sums, resampled_sums) / resampled_rows[:, None, None]
            return spectrum_measures(np.linalg.eigvalsh(scatter), self.variance)
        sketched = []
        for draw in (weights, np.ones((1, len(groups)))):  # the replicates, and the full data through the same sketch
            draw_sums, draw_rows = draw @ sums, np.maximum(draw @ rows, 1)
            sketch = np.tensordot(draw.astype(np.float32), sketches, 1).astype(np.float64)  # summed as accumulated
            sketch -= (draw_sums / draw_rows[:, None])[:, :, None] * (draw_sums @ self.test)[:, None, :]
            trace = draw @ traces - np.einsum("rf,rf->r", draw_sums, draw_sums) / draw_rows
            sketched.append(_sketched_measures(sketch, self.test, trace, values[self.sketch_size :], self.variance))
        replicate, full = sketched
        exact = spectrum_measures(values, self.variance)
        return {name: exact[name] + replicate[name] - full[name] for name in MEASURES}

    def _result(self, dataset: xr.Dataset, measures: dict, spectrum: np.ndarray, rows: np.ndarray) -> xr.Dataset:
        layers = dataset["layer"].values
        stacked = np.stack([measures[name] for name in MEASURES], axis=1)  # (replicate, measure, step, kind, space)
        stacked = stacked.transpose(0, 1, 3, 4, 2)  # (replicate, measure, token_kind, space, block)
        dims = ("measure", "token_kind", "space", "block")
        variables = {
            "rank": (dims, stacked[0], {"long_name": "rank measures of the centred update matrix, all images"}),
            "spectrum": (("token_kind", "space", "block", "component"), spectrum.transpose(1, 2, 0, 3),
                         {"long_name": "eigenvalues σ² of the centred update scatter, largest first"}),
            "rows": (("token_kind", "block"), rows.T.astype(np.int64), {"long_name": "rows (tokens x images) of the update matrix"}),
        }
        if self.n_bootstrap:
            variables["rank_bootstrap"] = (("replicate",) + dims, stacked[1:],
                                           {"long_name": "bootstrap replicates over groups of images"})
        subsampled = [kind for kind, count in self.per_image.items() if count is not None]
        groups = (f"{self.n_groups} contiguous groups of images resampled with replacement, shared by every block; "
                  + ("exact replicate spectra" if self.exact else
                     f"replicate spectra from a rank-{self.sketch_size} Nyström sketch of each group's scatter, "
                     "as shifts of the exact estimate"))
        return xr.Dataset(
            variables,
            coords={"measure": list(MEASURES), "token_kind": list(self.kinds), "space": list(self.spaces), "block": layers[1:],
                    "from_layer": ("block", layers[:-1]), "component": np.arange(1, self.n_features + 1)},
            attrs={
                **provenance(dataset),
                "analysis_detail": "rank of per-block updates, stacked over tokens and images, centred",
                "variance": self.variance,
                "n_bootstrap": self.n_bootstrap,
                "bootstrap": groups if self.n_bootstrap else "none",
                "n_groups": self.n_groups,
                "sketch_size": 0 if self.exact else self.sketch_size,
                "tokens_per_image": self.tokens_per_image if subsampled else "all",
                "subsampled_kinds": subsampled,
                "token_sampling": (f"a seeded random subset of {self.tokens_per_image} tokens per image for kinds with "
                                   f"more ({', '.join(subsampled)}), the same at every layer" if subsampled
                                   else "every token"),
                "seed": self.seed,
            },
        )


def _centred_gram(rows: np.ndarray) -> np.ndarray:
    """rowsᵀrows (its upper triangle, float64), formed in float32 from the rows less their mean.

    The mean's share a mᵀ + m aᵀ (a = Σc + n m / 2) is added in float64 as one array, so a block
    adds the same numbers in this process and on a cluster.
    """
    mean = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = rows - mean
    mean = mean.astype(np.float64)
    share = np.outer(centred.sum(axis=0, dtype=np.float64) + len(rows) / 2 * mean, mean)
    gram = blas.ssyrk(1.0, centred, trans=1) + share
    gram += share.T
    return gram


def _symmetric(upper: np.ndarray) -> np.ndarray:
    """Full symmetric matrices from (..., n, n) arrays whose upper triangles hold them (BLAS syrk's output)."""
    return np.triu(upper) + np.swapaxes(np.triu(upper, 1), -1, -2)


def nystrom_eigenvalues(sketch: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Eigenvalues of the Nyström approximations of PSD matrices A from sketches Y = AΩ (Tropp et al. 2017, Alg. 3).

    Parameters
    ----------
    sketch : numpy.ndarray, (..., n, k)
        Sketches AΩ (summed in float32: the stabilising shift covers that rounding).
    test : numpy.ndarray, (n, k)
        Ω with orthonormal columns.

    Returns
    -------
    numpy.ndarray, (..., k)
        Largest first, at least 0; each at most A's eigenvalue of the same rank.
    """
    swap = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731
    shift = np.sqrt(test.shape[0]) * np.finfo(np.float32).eps * np.linalg.norm(sketch, axis=(-2, -1))
    shifted = sketch + shift[..., None, None] * test
    core = test.T @ shifted
    lower = np.linalg.cholesky((core + swap(core)) / 2)
    half = np.linalg.solve(lower, swap(shifted) @ shifted)
    whitened = np.linalg.solve(lower, swap(half))
    values = np.linalg.eigvalsh((whitened + swap(whitened)) / 2)[..., ::-1]
    return np.clip(values - shift[..., None], 0.0, None)


def _sketched_measures(sketch: np.ndarray, test: np.ndarray, trace: np.ndarray, tail: np.ndarray, variance: float) -> dict:
    """Rank measures of spectra made of a (replicate, n, k) sketch's leading eigenvalues and the rest of
    each exact ``trace`` shaped like ``tail`` (the exact estimate's eigenvalues beyond the k-th).
    """
    leading = nystrom_eigenvalues(sketch, test)
    rest = np.clip(trace - leading.sum(axis=1), 0.0, None)
    shape = tail / tail.sum() if tail.sum() > 0 else np.full(len(tail), 1.0 / max(len(tail), 1))
    return spectrum_measures(np.concatenate([leading, rest[:, None] * shape], axis=1), variance)


def intervals(result: xr.Dataset, level: float = 0.95) -> xr.DataArray:
    """Percentile bootstrap interval of ``rank``: (bound, measure, token_kind, space, block), bound = low/high."""
    if "rank_bootstrap" not in result:
        raise ValueError("the result has no bootstrap replicates; run update_rank with n_bootstrap > 0")
    tail = (1 - level) / 2
    bounds = result["rank_bootstrap"].quantile([tail, 1 - tail], dim="replicate", skipna=True)
    return bounds.rename(quantile="bound").assign_coords(bound=["low", "high"])


def summarize(result: xr.Dataset) -> dict:
    """Stable rank per block for each kind and space (with 95% interval bounds), and the other measures for patches."""
    numbers = {}
    rank = result["rank"].astype(float)
    bounds = intervals(result) if "rank_bootstrap" in result else None
    for space in result["space"].values:
        for kind in result["token_kind"].values:
            key, where = f"stable_rank_{space}_{kind}", dict(measure="stable_rank", token_kind=kind, space=space)
            numbers[key] = rounded(rank.sel(where).values)
            if bounds is not None:
                for bound in ("low", "high"):
                    numbers[f"{key}_ci95_{bound}"] = rounded(bounds.sel(where).sel(bound=bound).values)
    kind = "patch" if "patch" in result["token_kind"].values else str(result["token_kind"].values[-1])
    space = "sphere" if "sphere" in result["space"].values else str(result["space"].values[0])
    for name in ("effective_rank", "participation_ratio", "n_directions"):
        numbers[f"{name}_{space}_{kind}"] = rounded(rank.sel(measure=name, token_kind=kind, space=space).values)
    return numbers
