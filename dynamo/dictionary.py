"""One sparse dictionary for every layer of the residual stream: TopK SAE (Gao et al. 2024) and
Relaxed Archetypal SAE (Fel et al. 2025), trained on layer-balanced tokens streamed from a store.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from safetensors.torch import load_file
from scipy.optimize import linear_sum_assignment
from sklearn.base import BaseEstimator
from sklearn.cluster import KMeans
from sklearn.utils.validation import check_is_fitted
from torch import nn

from dynamo.blocks import finite, fold_image_blocks, image_blocks, layer_states, unit
from dynamo.progress import progress_bar
from dynamo.serialize import fit_identity, optimizer_state, read_tensors_and_json, tensors_of_optimizer, write_tensors_and_json

__all__ = ["KINDS", "ConceptDictionary", "SparseAutoencoder", "TokenSampler", "layer_scales", "matched_cosine",
           "require_hidden"]

KINDS = ("topk", "rasae")
FORMAT = "dynamo-concepts/1"
ROUND_TOKENS_PER_LAYER = 4096  # at most this many tokens of each layer per round of the sampler
ENCODE_ROWS = 4096  # tokens encoded at a time outside training
NOT_FITTED = "this %(name)s is not fitted yet: call fit(ds) or ConceptDictionary.load(folder)"


def require_hidden(ds: xr.Dataset) -> None:
    """Raise a one-line `ValueError` unless the dataset holds every token (``hidden``)."""
    if "hidden" not in ds.data_vars:
        where = ds.encoding.get("source", "the store")
        raise ValueError(
            f"concepts need `hidden` (every token at every layer), but {where} holds only the reduced views "
            "(recorded with --summaries-only); record it again without --summaries-only"
        )
    if ds.sizes["image"] == 0:
        raise ValueError("the store has no recorded images; record some with `dynamo record`")


def layer_scales(ds: xr.Dataset, layers: Sequence[int], progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer scales to a common norm, and the pooled mean after scaling, from one streamed pass.

    Returns
    -------
    scale : numpy.ndarray, (len(layers),)
        ``1 / sqrt(mean ‖x‖²)`` over the layer's tokens.
    center : numpy.ndarray, (feature,)
        Mean of the scaled tokens, every layer weighted equally.
    """
    layers = list(layers)
    moments = fold_image_blocks(partial(_block_moments, layers=layers), ds, description="concepts: layer scales",
                                progress=progress)
    scale = 1.0 / np.sqrt(moments["squares"] / moments["count"])
    center = (moments["total"] / moments["count"][:, None] * scale[:, None]).mean(axis=0)
    return scale, center


def _block_moments(block: xr.Dataset, layers: list[int]) -> dict:
    width = block.sizes["feature"]
    squares, total, count = np.zeros(len(layers)), np.zeros((len(layers), width)), np.zeros(len(layers))
    selected = block.isel(layer=layers)
    for index, states in enumerate(layer_states(selected)):
        rows = states.reshape(-1, width)
        squares[index] = np.einsum("nf,nf->", rows, rows)
        total[index] = rows.sum(axis=0)
        count[index] = len(rows)
    return {"squares": squares, "total": total, "count": count}


class TokenSampler:
    """Layer-balanced, shuffled batches of scaled, centered tokens, read from the store a round at a time.

    Round r reads one image block of ``hidden`` per layer (each layer walks the blocks in its own
    seeded order per epoch) and draws ``tokens_per_layer`` tokens from each; everything is a function
    of (seed, round), so a resumed fit sees the same batches.
    """

    def __init__(self, ds: xr.Dataset, layers: Sequence[int], scale: np.ndarray, center: np.ndarray, batch_size: int,
                 seed: int, tokens_per_layer: int = ROUND_TOKENS_PER_LAYER):
        self.hidden = ds["hidden"]
        self.layers, self.seed, self.batch_size = list(layers), int(seed), int(batch_size)
        self.scale, self.center = np.asarray(scale, np.float32), np.asarray(center, np.float32)
        self.blocks = image_blocks(ds)
        largest = max(block.stop - block.start for block in self.blocks) * ds.sizes["token"]
        self.per_layer = max(min(tokens_per_layer, largest), math.ceil(batch_size / len(self.layers)))
        self.batches_per_round = len(self.layers) * self.per_layer // self.batch_size

    def round(self, index: int) -> np.ndarray:
        """The shuffled tokens of round ``index``, (len(layers) x per_layer, feature) float32."""
        epoch, offset = divmod(index, len(self.blocks))
        rng = np.random.default_rng([self.seed, index])
        parts = []
        for position, layer in enumerate(self.layers):
            order = np.random.default_rng([self.seed, epoch, layer]).permutation(len(self.blocks))
            chunk = self.hidden.isel(image=self.blocks[order[offset]], layer=layer)
            rows = finite(np.asarray(chunk.values, dtype=np.float32), chunk).reshape(-1, chunk.sizes["feature"])
            drawn = rows[rng.choice(len(rows), self.per_layer, replace=len(rows) < self.per_layer)]
            parts.append(drawn * self.scale[position] - self.center)
        pooled = np.concatenate(parts)
        return pooled[rng.permutation(len(pooled))]

    def batches(self, first_step: int = 0) -> Iterator[torch.Tensor]:
        """Endless batches (batch_size, feature) from step ``first_step`` on (a resumed fit's)."""
        index, skip = divmod(first_step, self.batches_per_round)
        while True:
            pooled = torch.from_numpy(self.round(index))
            for batch in range(skip, self.batches_per_round):
                yield pooled[batch * self.batch_size : (batch + 1) * self.batch_size]
            index, skip = index + 1, 0

    def sample(self, n: int, first_round: int) -> np.ndarray:
        """``n`` tokens from consecutive rounds starting at ``first_round`` (k-means candidates)."""
        parts, index = [], first_round
        while sum(len(part) for part in parts) < n:
            parts.append(self.round(index))
            index += 1
        return np.concatenate(parts)[:n]


class SparseAutoencoder(nn.Module):
    """TopK sparse autoencoder; with ``candidates`` (n, D), its dictionary is relaxed archetypal (RA-SAE).

    The RA-SAE dictionary is ``exp(s) (W C + Λ)``: W row-stochastic, each ‖Λ_i‖ ≤ ``delta``.
    """

    def __init__(self, width: int, concepts: int, k: int, candidates: torch.Tensor | None = None, delta: float = 0.1):
        super().__init__()
        self.k, self.delta = int(k), float(delta)
        self.encoder = nn.Linear(width, concepts)
        if candidates is None:
            self.atoms = nn.Parameter(F.normalize(torch.randn(concepts, width), dim=1))
        else:
            self.register_buffer("candidates", torch.as_tensor(candidates, dtype=torch.float32))
            self.mix = nn.Parameter(torch.eye(concepts, len(candidates)))
            self.relax = nn.Parameter(torch.zeros(concepts, width))
            self.log_scale = nn.Parameter(torch.zeros(()))
        with torch.no_grad():
            self.encoder.weight.copy_(F.normalize(self.dictionary(), dim=1))
            self.encoder.bias.zero_()

    @property
    def archetypal(self) -> bool:
        return hasattr(self, "candidates")

    def dictionary(self) -> torch.Tensor:
        """The atoms as rows, (C, D)."""
        if self.archetypal:
            return torch.exp(self.log_scale) * (self.mix @ self.candidates + self.relax)
        return self.atoms

    @torch.no_grad()
    def project(self) -> None:
        """Back onto the constraints after an optimizer step: unit atoms, or W row-stochastic and ‖Λ_i‖ ≤ δ."""
        if self.archetypal:
            self.mix.clamp_(min=0)
            self.mix.div_(self.mix.sum(dim=1, keepdim=True).clamp_min(1e-12))
            self.relax.mul_((self.delta / self.relax.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1))
        else:
            self.atoms.div_(self.atoms.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def sparse_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest pre-activations of each row through a ReLU: values and concept indices, (N, k) each."""
        values, indices = self.encoder(x).topk(self.k, dim=-1)
        return F.relu(values), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (N, C): `sparse_codes` scattered into zeros."""
        values, indices = self.sparse_codes(x)
        return torch.zeros(len(x), self.encoder.out_features, dtype=values.dtype, device=x.device).scatter_(-1, indices, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of rows x, (N, D), summed over each row's k atoms only."""
        return self.decode(*self.sparse_codes(x), self.dictionary())

    @staticmethod
    def decode(values: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
        """``sum_j values[:, j] * dictionary[indices[:, j]]``, (N, D), without forming the (N, k, D) gather."""
        return F.embedding_bag(indices, dictionary, per_sample_weights=values, mode="sum")


class ConceptDictionary(BaseEstimator):
    """A sparse dictionary of concepts fitted on tokens pooled over layers, scikit-learn style.

    Each layer's tokens are scaled to mean squared norm 1 (``scale_``), then centered (``center_``).

    Parameters
    ----------
    kind : {"topk", "rasae"}
    concepts : int, optional
        Number of atoms; default 8 x the width.
    k : int
        Non-zero codes per token.
    lr : float
        Adam's peak learning rate; cosine decay to 10% of it.
    layers : sequence of int, optional
        Values of ``layer`` to pool; default all (one phase's layers: the per-phase variant).
    candidates, delta
        RA-SAE: k-means centroids the atoms are built from (default ``concepts``), and the bound on
        each atom's relaxation norm in RMS token norms.
    checkpoint_dir : str or Path, optional
        A fit with the same parameters on the same store resumes there to the same weights.

    Attributes
    ----------
    model_ : SparseAutoencoder
    layers_, scale_, center_ : numpy.ndarray
    history_ : list of dict
        ``step``, ``loss`` (squared error over squared norm, on the batch).
    """

    def __init__(self, kind: str = "topk", concepts: int | None = None, k: int = 8, steps: int = 1500,
                 batch_size: int = 1024, lr: float = 2e-3, layers=None, candidates: int | None = None,
                 delta: float = 0.1, checkpoint_dir=None, checkpoint_every: int = 500, seed: int = 0,
                 device: str = "cpu", progress: bool = True):
        self.kind, self.concepts, self.k, self.steps, self.batch_size, self.lr = kind, concepts, k, steps, batch_size, lr
        self.layers, self.candidates, self.delta = layers, candidates, delta
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.seed, self.device, self.progress = seed, device, progress

    def fit(self, ds: xr.Dataset) -> ConceptDictionary:
        """Fit the dictionary to a trajectory dataset, streaming it (resumes from ``checkpoint_dir``)."""
        require_hidden(ds)
        if self.kind not in KINDS:
            raise ValueError(f"unknown dictionary kind {self.kind!r}; expected one of {KINDS}")
        width = ds.sizes["feature"]
        concepts = self.concepts or 8 * width
        if not 0 < self.k <= concepts:
            raise ValueError(f"k={self.k} must be between 1 and the number of concepts, {concepts}")
        positions = self._positions(ds)
        self.layers_ = ds["layer"].values[positions]
        scale, center = layer_scales(ds, positions, progress=self.progress)
        self.scale_, self.center_ = scale.astype(np.float32), center.astype(np.float32)
        sampler = TokenSampler(ds, positions, self.scale_, self.center_, self.batch_size, self.seed)
        identity = self._identity(ds, concepts)
        saved = self._read_checkpoint(identity)
        torch.manual_seed(self.seed)
        candidates = None
        if self.kind == "rasae":
            n = self.candidates or concepts
            candidates = torch.zeros(n, width) if saved else torch.from_numpy(self._centroids(sampler, n))
        self.model_ = SparseAutoencoder(width, concepts, self.k, candidates, self.delta).to(self.device)
        self.history_ = []
        self._train(sampler, identity, saved)
        self.model_.eval()
        return self

    def _positions(self, ds: xr.Dataset) -> np.ndarray:
        values = ds["layer"].values
        if self.layers is None:
            return np.arange(len(values))
        missing = sorted(set(int(v) for v in self.layers) - set(values.tolist()))
        if missing:
            raise ValueError(f"layers {missing} are not in the store (it holds {values.tolist()})")
        return np.flatnonzero(np.isin(values, list(self.layers)))

    def _centroids(self, sampler: TokenSampler, n: int) -> np.ndarray:
        """k-means centroids of a layer-balanced sample (16 tokens per centroid, at least 8192)."""
        first = 1_000_003  # rounds far from the training rounds' start
        tokens = sampler.sample(max(16 * n, 8192), first_round=first)
        if len(tokens) < n:
            raise ValueError(f"{n} RA-SAE candidates need at least as many tokens; got {len(tokens)}")
        kmeans = KMeans(n_clusters=n, n_init=1, max_iter=30, random_state=self.seed)
        return kmeans.fit(tokens).cluster_centers_.astype(np.float32)

    def _identity(self, ds: xr.Dataset, concepts: int) -> dict:
        return fit_identity(self, ds.attrs, ("checkpoint_dir", "checkpoint_every", "progress", "device"),
                            concepts=concepts, images=ds.sizes["image"], layers=self.layers_)

    def _read_checkpoint(self, identity: dict) -> dict | None:
        folder = None if self.checkpoint_dir is None else Path(self.checkpoint_dir)
        if folder is None or not (folder / "checkpoint.json").exists():
            return None
        tensors, config = read_tensors_and_json(folder / "checkpoint.safetensors", folder / "checkpoint.json")
        if config["identity"] != identity:
            raise ValueError(f"{folder} holds a checkpoint of a dictionary with other parameters or another store; "
                             "use another checkpoint directory, or delete it to start over")
        return {"config": config, "tensors": tensors}

    def _train(self, sampler: TokenSampler, identity: dict, saved: dict | None) -> None:
        model = self.model_
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        first = 0
        if saved is not None:
            first = _restore(model, optimizer, saved)
            self.history_ = saved["config"]["history"]
        batches = sampler.batches(first)
        bar = progress_bar(total=self.steps, initial=first, desc=f"concepts: {self.kind} dictionary",
                           enabled=self.progress, leave=False)
        model.train()
        for step in range(first, self.steps):
            x = next(batches).to(self.device)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(self.lr, step, self.steps)
            reconstruction = model(x)
            loss = ((reconstruction - x) ** 2).sum(dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.project()
            bar.update()
            done = step + 1
            if done % 50 == 0 or done == self.steps:
                relative = loss.item() / float((x**2).sum(dim=1).mean())
                self.history_.append({"step": done, "loss": relative})
                bar.set_postfix(unexplained=f"{relative:.3f}")
            if self.checkpoint_dir is not None and (done % self.checkpoint_every == 0 or done == self.steps):
                self._write_checkpoint(identity, done, optimizer)
        bar.close()

    def _write_checkpoint(self, identity: dict, step: int, optimizer: torch.optim.Optimizer) -> None:
        tensors, param_groups = tensors_of_optimizer(optimizer)
        tensors.update({f"model.{name}": value for name, value in self.model_.state_dict().items()})
        config = {"identity": identity, "step": step, "history": self.history_, "param_groups": param_groups}
        folder = Path(self.checkpoint_dir)
        write_tensors_and_json(folder / "checkpoint.safetensors", folder / "checkpoint.json", tensors, config)

    @property
    def atoms_(self) -> np.ndarray:
        """Unit atoms (concept directions in the scaled, centered space), (concepts, feature)."""
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        with torch.no_grad():
            return unit(self.model_.dictionary().cpu().numpy().astype(np.float64))

    def scaled(self, states, layer: int) -> torch.Tensor:
        """States of one layer (a ``layer`` value) scaled and centered as the dictionary sees them, (N, D)."""
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        where = np.flatnonzero(self.layers_ == layer)
        if where.size == 0:
            raise ValueError(f"layer {layer} is not one this dictionary was fitted on ({self.layers_.tolist()})")
        x = torch.as_tensor(np.asarray(states, dtype=np.float32)).reshape(-1, len(self.center_))
        return x * float(self.scale_[where[0]]) - torch.from_numpy(self.center_)

    @torch.no_grad()
    def encode(self, states, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The active concepts of one layer's (..., feature) states, their reconstruction and the scaled states.

        Returns ``activations`` (N, k), the contribution norms ``z_i ‖D_i‖`` of each token's k selected
        concepts (0 where the ReLU cut); ``concepts`` (N, k) int64; ``reconstruction`` and ``target``
        (N, feature) in the scaled, centered space.
        """
        x = self.scaled(states, layer).to(self.device)
        dictionary = self.model_.dictionary()
        norms = dictionary.norm(dim=1)
        parts = []
        for rows in x.split(ENCODE_ROWS):  # bounds the (rows, concepts) pre-activations
            values, indices = self.model_.sparse_codes(rows)
            parts.append(((values * norms[indices]).cpu(), indices.cpu(), self.model_.decode(values, indices, dictionary).cpu()))
        activations, concepts, reconstruction = (torch.cat(part) for part in zip(*parts))
        return activations, concepts, reconstruction, x.cpu()

    def transform(self, states, layer: int) -> np.ndarray:
        """Concept activations (contribution norms) of one layer's states, dense (N, concepts)."""
        values, indices, _, _ = self.encode(states, layer)
        dense = torch.zeros(len(values), self.model_.encoder.out_features)
        return dense.scatter_(1, indices, values).numpy()

    def save(self, folder) -> Path:
        """Write ``config.json`` and ``dictionary.safetensors`` into ``folder``; see `load`."""
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        config = {"format": FORMAT, "params": {k: v for k, v in self.get_params().items() if k != "checkpoint_dir"},
                  "concepts": self.model_.encoder.out_features, "width": len(self.center_),
                  "candidates": len(self.model_.candidates) if self.model_.archetypal else None,
                  "layers": self.layers_, "scale": self.scale_, "center": self.center_, "history": self.history_}
        write_tensors_and_json(Path(folder) / "dictionary.safetensors", Path(folder) / "config.json", self.model_.state_dict(), config)
        return Path(folder)

    @classmethod
    def load(cls, folder, device: str | None = None) -> ConceptDictionary:
        """A fitted dictionary from a folder written by `save` (safetensors + JSON; nothing unpickled)."""
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} holds no saved concept dictionary (no config.json)")
        config = json.loads((folder / "config.json").read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{folder / 'config.json'} is not a dynamo concept dictionary (format {config.get('format')!r})")
        fitted = cls(**{**config["params"], **({"device": device} if device else {})})
        candidates = None if config["candidates"] is None else torch.zeros(config["candidates"], config["width"])
        model = SparseAutoencoder(config["width"], config["concepts"], fitted.k, candidates, fitted.delta)
        model.load_state_dict(load_file(str(folder / "dictionary.safetensors")))
        fitted.model_ = model.to(fitted.device).eval()
        fitted.layers_ = np.asarray(config["layers"])
        fitted.scale_ = np.asarray(config["scale"], dtype=np.float32)
        fitted.center_ = np.asarray(config["center"], dtype=np.float32)
        fitted.history_ = config["history"]
        return fitted


def matched_cosine(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian-matched cosine between the (C1, D) and (C2, D) atoms of two dictionaries.

    Returns
    -------
    cosine : numpy.ndarray, (min(C1, C2),)
        Cosine of each matched pair, in the order of ``first``'s matched atoms.
    match : numpy.ndarray, (min(C1, C2),)
        Index in ``second`` of the atom matched to each of ``first``'s.
    """
    cosine = unit(np.asarray(first, np.float64)) @ unit(np.asarray(second, np.float64)).T
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    return cosine[rows, cols], cols


def _learning_rate(peak: float, step: int, steps: int) -> float:
    """Cosine decay from ``peak`` at step 0 to 10% of it at the last step."""
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> int:
    """Load a checkpoint's weights and optimizer state; the step it was written at."""
    tensors, config = saved["tensors"], saved["config"]
    model.load_state_dict({key.removeprefix("model."): value for key, value in tensors.items() if key.startswith("model.")})
    optimizer.load_state_dict(optimizer_state(tensors, config["param_groups"]))
    return int(config["step"])

