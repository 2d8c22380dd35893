"""Token-specific dynamics (Raptor paper, section 5 (ii)): angular speed per token kind on the unit
sphere, patch coherence κ of states and updates, and token norms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from analyses.streaming import Accumulator, Chunk, angle_deg, contiguous, cosines, provenance, rounded, stream
from dynamo.layout import token_groups
from dynamo.partition import boundaries_of

DESCRIPTION = (
    "Angular speed of each token kind through depth on the unit sphere, the coherence of the "
    "patch tokens and of their updates, and token norms."
)


def compute(ds: xr.Dataset, *, progress: bool = True) -> xr.Dataset:
    """Angular speed per token kind, patch coherence of states and updates, and norms.

    Returns
    -------
    xarray.Dataset
        ``speed`` (image, token_kind, block), degrees per block; ``norm`` (image, token_kind,
        layer); with patch tokens, ``coherence`` (image, layer) and ``update_coherence`` (image,
        block). ``block`` b is the step from layer ``from_layer`` to layer b (several blocks when
        the store keeps only some layers).
    """
    return stream(ds, {"tokens": TokenDynamics(ds)}, description="tokens", progress=progress)["tokens"]


class TokenDynamics(Accumulator):
    """`compute`'s accumulator for `analyses.streaming.stream`: per-image speeds, norms and coherences."""

    def __init__(self, ds: xr.Dataset):
        if ds.sizes["layer"] < 2:
            raise ValueError("token dynamics need at least two recorded layers; record without --layers")
        self.groups = {kind: contiguous(positions) for kind, positions in token_groups(ds["token_kind"]).items()}
        self.n_layers = ds.sizes["layer"]

    def open_block(self, block: xr.Dataset, total: dict) -> dict:
        n_images = block.sizes["image"]
        return {
            "speed": np.zeros((n_images, len(self.groups), self.n_layers - 1)),
            "norm": np.zeros((n_images, len(self.groups), self.n_layers)),
            "coherence": np.zeros((n_images, self.n_layers)),
            "update_coherence": np.zeros((n_images, self.n_layers - 1)),
        }

    def update(self, state: dict, chunk: Chunk, previous: Chunk | None, final: Chunk | None) -> None:
        index, patches = chunk.index, self.groups.get("patch")
        for k, positions in enumerate(self.groups.values()):
            state["norm"][:, k, index] = chunk.norms[:, positions].mean(axis=1)
        if patches is not None:
            state["coherence"][:, index] = patch_coherence(chunk.states[:, patches], chunk.norms[:, patches])
        if previous is None:
            return
        step = angle_deg(cosines(chunk, previous))
        for k, positions in enumerate(self.groups.values()):
            state["speed"][:, k, index - 1] = step[:, positions].mean(axis=1)
        if patches is not None:
            updates = chunk.states[:, patches] - previous.states[:, patches]
            lengths = np.sqrt(np.einsum("ipf,ipf->ip", updates, updates))
            state["update_coherence"][:, index - 1] = patch_coherence(updates, lengths)

    def close_block(self, state: dict, total: dict) -> None:
        for name, values in state.items():
            total.setdefault(name, []).append(values)

    def merge(self, total: dict, part: dict) -> dict:
        return {name: total[name] + part[name] for name in total}

    def finish(self, total: dict, dataset: xr.Dataset) -> xr.Dataset:
        speed, norm, coherence, update_coherence = (np.concatenate(total[name]) for name in
                                                    ("speed", "norm", "coherence", "update_coherence"))
        layers = dataset["layer"].values
        variables = {
            "speed": (("image", "token_kind", "block"), speed.astype(np.float32),
                      {"units": "degree", "long_name": "angular speed arccos<x̂_l+1, x̂_l>, mean over the kind's tokens"}),
            "norm": (("image", "token_kind", "layer"), norm.astype(np.float32),
                     {"long_name": "mean token norm ‖x_l‖ over the kind's tokens"}),
        }
        if "patch" in self.groups:
            variables["coherence"] = (("image", "layer"), coherence.astype(np.float32),
                                      {"long_name": "κ: mean cosine of patch states to their mean"})
            variables["update_coherence"] = (("image", "block"), update_coherence.astype(np.float32),
                                             {"long_name": "κ of updates: mean cosine of patch updates to their mean"})
        return xr.Dataset(
            variables,
            coords={"image": dataset["image"].values, "token_kind": list(self.groups), "layer": layers, "block": layers[1:],
                    "from_layer": ("block", layers[:-1])},
            attrs={**provenance(dataset),
                   "analysis_detail": "token-specific dynamics on the unit sphere; speeds in degrees per block"},
        )


def patch_coherence(vectors: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """κ: mean cosine of each (image, patch, feature) vector to the mean vector of its image's set
    (``norms`` (image, patch) when known); (image,) in [-1, 1], a zero vector counting 0.
    """
    norms = np.linalg.norm(vectors, axis=-1) if norms is None else norms
    mean = vectors.mean(axis=1)
    dots = np.matmul(vectors, mean[:, :, None])[..., 0]
    scale = norms * np.linalg.norm(mean, axis=1, keepdims=True)
    return np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0).mean(axis=1)


def speed_jump_ratio(speed: np.ndarray, blocks: np.ndarray, boundaries: Sequence[int]) -> float | None:
    """Mean |change of speed| across phase boundaries over the mean within phases.

    ``speed`` and ``blocks`` are (block,), block b mapping layer b-1 to b; ``boundaries`` the layers
    after which a new phase begins. None without boundaries or without a step inside a phase.
    """
    change = np.abs(np.diff(speed))
    crosses = np.isin(blocks[:-1], list(boundaries))  # the step from block b to b+1 crosses b
    if not crosses.any() or crosses.all():
        return None
    return float(change[crosses].mean() / max(change[~crosses].mean(), 1e-12))


def summarize(result: xr.Dataset) -> dict:
    """Speeds per kind, where cls turns most, coherence per layer, speed jumps at the result's phase boundaries."""
    blocks = result["block"].values
    speed = result["speed"].mean("image").astype(float)
    kinds = [str(k) for k in result["token_kind"].values]
    boundaries = boundaries_of(result)
    numbers = {}
    for kind in kinds:
        numbers[f"speed_deg_{kind}"] = rounded(speed.sel(token_kind=kind).values)
        numbers[f"speed_jump_ratio_{kind}"] = rounded(speed_jump_ratio(speed.sel(token_kind=kind).values, blocks, boundaries))
    if "cls" in kinds:
        cls_speed = speed.sel(token_kind="cls").values
        turn = int(cls_speed.argmax())
        late = len(blocks) // 2 + int(cls_speed[len(blocks) // 2 :].argmax())  # the paper's late reorientation
        numbers.update(cls_turn_block=int(blocks[turn]), cls_turn_deg=rounded(cls_speed[turn]),
                       cls_late_turn_block=int(blocks[late]), cls_late_turn_deg=rounded(cls_speed[late]))
        if "patch" in kinds:
            numbers["cls_over_patch_speed_at_late_turn"] = rounded(cls_speed[late] / speed.sel(token_kind="patch").values[late])
    if "coherence" in result:
        numbers["coherence"] = rounded(result["coherence"].mean("image").values.astype(float))
        numbers["update_coherence"] = rounded(result["update_coherence"].mean("image").values.astype(float))
    return numbers
