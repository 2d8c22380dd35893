"""The rungs below Raptor: identity, closed-form linear and DMD maps per phase, and the teacher's own blocks."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import xarray as xr
from sklearn.utils.validation import check_is_fitted
from torch import nn

from dynamo.metrics import fold_sums, r2_from_sums, r2_sums
from dynamo.partition import Partition
from dynamo.progress import progress_bar
from dynamo.serialize import read_hidden
from dynamo.stepping import BlockStepper
from dynamo.store import image_positions, positions_of
from dynamo.surrogates.base import NOT_FITTED, SurrogateFitter
from dynamo.surrogates.recurrence import PhaseRecurrence

__all__ = ["ALPHAS", "AffineSurrogate", "DMDFitter", "IdentityFitter", "IdentitySurrogate", "LinearFitter", "PhaseSurrogate",
           "TeacherBlockFitter", "TeacherBlockSurrogate", "TransitionMoments", "per_layer", "rollout_scores", "transition_moments"]

ALPHAS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # ridge penalties `LinearFitter` chooses among


def per_layer(num_layers: int) -> Partition:
    """The partition of L one-block phases: a surrogate on it has one map per layer (no recurrence)."""
    return Partition([layer] for layer in range(1, num_layers + 1))


class PhaseSurrogate(PhaseRecurrence):
    """k maps, one per contiguous phase of depth, each applied once per layer of its phase; subclasses define `apply`.

    ``teacher`` (a BlockStepper, optional) serves `embed`, `head`, `predict`, `forward`; it is a plain attribute, not a submodule.
    """

    def __init__(self, partition: Partition, num_layers: int, teacher: BlockStepper | None = None):
        super().__init__(Partition.parse(partition, num_layers), num_layers, teacher)


class IdentitySurrogate(PhaseSurrogate):
    """Every phase passes its input on unchanged: the state never moves from layer 0."""

    name = "identity"

    def apply(self, x: torch.Tensor, index: int, layer: float) -> torch.Tensor:
        return x


class AffineSurrogate(PhaseSurrogate):
    """Phase i maps every token by x <- A_i x + b_i; ``weight`` is (k, D, D), ``bias`` (k, D)."""

    name = "affine"

    def __init__(self, partition, num_layers: int, weight: torch.Tensor, bias: torch.Tensor,
                 teacher: BlockStepper | None = None, name: str = "affine"):
        super().__init__(partition, num_layers, teacher)
        if weight.shape[0] != self.k or bias.shape != weight.shape[:2]:
            raise ValueError(f"need weight (k, D, D) and bias (k, D) for k={self.k}, got {tuple(weight.shape)}, {tuple(bias.shape)}")
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))
        self.name = name

    def apply(self, x: torch.Tensor, index: int, layer: float) -> torch.Tensor:
        return _affine(x, self.weight[index], self.bias[index])


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x A^T + b over the last dim of (..., D) states."""
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.T).reshape(x.shape)


class TeacherBlockSurrogate(PhaseSurrogate):
    """Phase i runs the teacher's own block ``blocks[i]`` (1-based, a shared submodule, not a copy) for each of its layers."""

    name = "teacher-block"

    def __init__(self, partition, num_layers: int, teacher: BlockStepper, blocks: list[int]):
        super().__init__(partition, num_layers, teacher)
        if len(blocks) != self.k or not all(1 <= b <= teacher.num_blocks for b in blocks):
            raise ValueError(f"need one teacher block in 1..{teacher.num_blocks} per phase, got {blocks}")
        self.blocks_of_phase = [int(b) for b in blocks]
        self.blocks = nn.ModuleList(teacher.module.blocks[b - 1] for b in self.blocks_of_phase)

    def apply(self, x: torch.Tensor, index: int, layer: float) -> torch.Tensor:
        block = self.blocks_of_phase[index]
        return self.teacher.step(x, block, block=block)


@dataclass(frozen=True)
class TransitionMoments:
    """Float64 sums over every token of a set of images, per block l, of its input x (layer l - 1) and output y (layer l).

    ``images`` are the ``image`` values summed over, ``count`` (L,) the tokens; ``sum_in``, ``sum_out`` (L, D) sum x
    and y; ``gram``, ``cross`` (L, D, D) sum x x^T and x y^T.
    """

    images: np.ndarray
    count: torch.Tensor
    sum_in: torch.Tensor
    sum_out: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor

    def phase(self, blocks) -> tuple[torch.Tensor, ...]:
        """``(count, sum_in, sum_out, gram, cross)`` summed over 1-based ``blocks``."""
        index = torch.as_tensor([int(b) - 1 for b in blocks])
        return tuple(value[index].sum(0) for value in (self.count, self.sum_in, self.sum_out, self.gram, self.cross))


@torch.no_grad()
def transition_moments(ds: xr.Dataset, images=None, batch_size: int = 32, device: str = "cpu",
                       progress: bool = False) -> TransitionMoments:
    """Stream a trajectory dataset once and sum each block's input/output moments (`TransitionMoments`).

    ``images`` are positions along ``image`` to sum over (`dynamo.store.image_positions`, default all);
    ``device`` holds the float64 accumulation.
    """
    positions = image_positions(ds, images)
    hidden = ds["hidden"]
    num_layers, width = hidden.sizes["layer"] - 1, hidden.sizes["feature"]

    def zeros(*shape):
        return torch.zeros(shape, dtype=torch.float64, device=device)

    count, sum_in, sum_out = zeros(num_layers), zeros(num_layers, width), zeros(num_layers, width)
    gram, cross = zeros(num_layers, width, width), zeros(num_layers, width, width)
    for rows in progress_bar(_batches(positions, batch_size), desc="moments", enabled=progress, leave=False):
        states = read_hidden(hidden, rows, device)
        for block in range(num_layers):  # float64 one layer at a time
            x = states[:, block].reshape(-1, width).double()
            y = states[:, block + 1].reshape(-1, width).double()
            count[block] += x.shape[0]
            sum_in[block] += x.sum(0)
            sum_out[block] += y.sum(0)
            gram[block] += x.T @ x
            cross[block] += x.T @ y
    return TransitionMoments(np.asarray(ds["image"].values)[positions], count, sum_in, sum_out, gram, cross)


def _batches(positions: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Sorted ``positions`` in runs of at most ``batch_size`` (neighbouring images share the store's chunks)."""
    positions = np.sort(positions)
    return np.split(positions, np.arange(batch_size, positions.size, batch_size))


@torch.no_grad()
def rollout_scores(ds: xr.Dataset, images, partition: Partition, candidates, batch_size: int = 64,
                 device: str = "cpu", progress: bool = False) -> list[np.ndarray]:
    """R² of each candidate map over each phase, rolled out from the recorded state at the phase's entry.

    ``candidates``: per phase, maps (B, T, D) -> (B, T, D), each applied once per layer of the phase; ``images`` are
    positions along ``image``. Returns, per phase, the R² (teacher variance, all tokens, the phase's layers stacked) of each.
    """
    positions = image_positions(ds, images)
    sums = [[None] * len(maps) for maps in candidates]
    for rows in progress_bar(_batches(positions, batch_size), desc="candidates", enabled=progress, leave=False):
        states = read_hidden(ds["hidden"], rows, device)
        for index, phase in enumerate(partition):
            target = states[:, phase[0] : phase[-1] + 1]
            for which, apply in enumerate(candidates[index]):
                x, rollout = states[:, phase[0] - 1], []
                for _ in phase:
                    x = apply(x)
                    rollout.append(x)
                batch = r2_sums(torch.stack(rollout, 1), target, "target", dims=None)
                sums[index][which] = fold_sums(sums[index][which], batch)
    return [np.array([float(r2_from_sums(*total)) for total in phase]) for phase in sums]


def _selection_positions(ds: xr.Dataset, training: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Positions of at most ``count`` training images (``image`` values), drawn with ``seed``, that score candidates."""
    drawn = np.random.default_rng(seed).permutation(training)[:count]
    return positions_of(ds, drawn)


class IdentityFitter(SurrogateFitter):
    """The ``identity`` rung: nothing is learned; the partition only labels the result (parameters as `LinearFitter`'s)."""

    name = "identity"

    def __init__(self, k: int | None = None, partition=None, validation_fraction: float = 0.2, seed: int = 0,
                 device: str = "cpu"):
        self.k, self.partition, self.validation_fraction, self.seed, self.device = k, partition, validation_fraction, seed, device

    def _fit(self, ds, stepper, **data) -> PhaseSurrogate:
        return IdentitySurrogate(self.partition_, int(ds.attrs["num_blocks"]), stepper)

    def _restore(self, tensors, state, num_layers, stepper) -> PhaseSurrogate:
        return IdentitySurrogate(self.partition_, num_layers, stepper)


class _AffineFitter(SurrogateFitter):
    """Shared by `LinearFitter` and `DMDFitter`: moments in, one affine map per phase out."""

    def _fit(self, ds, stepper, moments: TransitionMoments | None = None) -> PhaseSurrogate:
        if moments is None:
            training = positions_of(ds, self.training_images_)
            moments = transition_moments(ds, training, device=self.device, progress=self.progress)
        elif not np.array_equal(np.sort(moments.images), self.training_images_):
            raise ValueError("the moments given were summed over other images than this fit's training images; "
                             "compute them with transition_moments(ds, positions of the fitter's training images)")
        maps = self._maps(ds, moments)
        self.weight_ = np.stack([weight for weight, _ in maps])
        self.bias_ = np.stack([bias for _, bias in maps])
        self.moments_images_ = moments.images.size
        return AffineSurrogate(self.partition_, int(ds.attrs["num_blocks"]), torch.from_numpy(self.weight_),
                               torch.from_numpy(self.bias_), stepper, name=self.name)

    def _maps(self, ds: xr.Dataset, moments: TransitionMoments) -> list[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def _state(self) -> tuple[dict, dict]:
        return {"weight": torch.from_numpy(self.weight_), "bias": torch.from_numpy(self.bias_)}, {}

    def _restore(self, tensors, state, num_layers, stepper) -> PhaseSurrogate:
        self.weight_, self.bias_ = tensors["weight"].numpy(), tensors["bias"].numpy()
        return AffineSurrogate(self.partition_, num_layers, tensors["weight"], tensors["bias"], stepper, name=self.name)

    def operator(self, phase: int, steps: int = 1) -> np.ndarray:
        """K^p of phase ``phase`` (0-based) on the augmented state [x; 1]: (D + 1, D + 1), ``K^p [x; 1] = [x_p; 1]``."""
        check_is_fitted(self, "weight_", msg=NOT_FITTED)
        width = self.weight_.shape[-1]
        operator = np.eye(width + 1)
        operator[:width, :width], operator[:width, width] = self.weight_[phase], self.bias_[phase]
        return np.linalg.matrix_power(operator, steps)


class LinearFitter(_AffineFitter):
    """The ``linear`` rung: one closed-form ridge regression per phase (intercept unpenalised), applied recurrently.

    Parameters
    ----------
    k, partition : optional
        Phases: k uniform ones (default 2), or any form `Partition.parse` reads.
    alpha : float or sequence of float
        Ridge penalties relative to the mean input variance (lambda = alpha * trace(C_xx) / D); several
        are chosen among per phase by rollout R² on training images (0 is least squares, by pseudo-inverse).
    selection_images : int
        At most this many training images (drawn with ``seed``) score the penalties.
    validation_fraction, seed
        The held-out split (`dynamo.surrogates.base.split_images`).

    Attributes
    ----------
    weight_, bias_ : numpy.ndarray
        (k, D, D) and (k, D) float64: A_j, b_j.
    alpha_, scores_
        The penalty chosen per phase; (phase, alpha) R² of each penalty's rollout on the selection images.
    """

    name = "linear"

    def __init__(self, k: int | None = None, partition=None, alpha=ALPHAS, selection_images: int = 64,
                 batch_size: int = 64, validation_fraction: float = 0.2, seed: int = 0, device: str = "cpu",
                 progress: bool = True):
        self.k, self.partition, self.alpha, self.selection_images = k, partition, alpha, selection_images
        self.batch_size, self.validation_fraction, self.seed = batch_size, validation_fraction, seed
        self.device, self.progress = device, progress

    def _maps(self, ds: xr.Dataset, moments: TransitionMoments) -> list[tuple[np.ndarray, np.ndarray]]:
        alphas = [float(a) for a in np.atleast_1d(self.alpha)]
        if not alphas or min(alphas) < 0:
            raise ValueError(f"alpha must be one or more penalties >= 0, got {self.alpha}")
        maps = [[self._solve(*moments.phase(phase), alpha) for alpha in alphas] for phase in self.partition_]
        if len(alphas) == 1:
            scores = [np.full(1, np.nan) for _ in maps]
        else:
            candidates = [[partial(_affine, weight=torch.as_tensor(w, dtype=torch.float32, device=self.device),
                                   bias=torch.as_tensor(b, dtype=torch.float32, device=self.device)) for w, b in phase]
                          for phase in maps]
            scores = rollout_scores(ds, _selection_positions(ds, self.training_images_, self.selection_images, self.seed),
                                    self.partition_, candidates, self.batch_size, self.device, self.progress)
        best = [0 if len(alphas) == 1 else int(np.argmax(row)) for row in scores]
        self.alpha_ = [alphas[b] for b in best]
        self.scores_ = xr.DataArray(np.stack(scores), dims=("phase", "alpha"),
                                    coords={"phase": np.arange(len(maps)), "alpha": alphas},
                                    attrs={"description": "R² (teacher variance, all tokens, the phase's layers "
                                                          "stacked) of each penalty's rollout over each phase"})
        return [phase[b] for phase, b in zip(maps, best)]

    @staticmethod
    def _solve(count, sum_in, sum_out, gram, cross, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        mean_in, mean_out = sum_in / count, sum_out / count
        cov_in = gram / count - torch.outer(mean_in, mean_in)
        cov_cross = cross / count - torch.outer(mean_in, mean_out)
        ridge = alpha * torch.trace(cov_in) / cov_in.shape[0]
        eye = torch.eye(cov_in.shape[0], dtype=cov_in.dtype, device=cov_in.device)
        weight = (torch.linalg.pinv(cov_in + ridge * eye, hermitian=True) @ cov_cross).T
        return weight.cpu().numpy(), (mean_out - weight @ mean_in).cpu().numpy()

    def _state(self) -> tuple[dict, dict]:
        tensors, _ = super()._state()
        return {**tensors, "scores": torch.from_numpy(self.scores_.values)}, {"alpha": self.alpha_}

    def _restore(self, tensors, state, num_layers, stepper) -> PhaseSurrogate:
        self.alpha_ = state["alpha"]
        self.scores_ = xr.DataArray(tensors["scores"].numpy(), dims=("phase", "alpha"),
                                    coords={"alpha": [float(a) for a in np.atleast_1d(self.alpha)]})
        return super()._restore(tensors, state, num_layers, stepper)


class DMDFitter(_AffineFitter):
    """The ``dmd`` rung: exact DMD K = Y Z^+ of each phase's steps with the constant observable appended; p steps are K^p.

    ``rank``: singular directions kept, an int r, a float in (0, 1) for the smallest r holding that fraction of the
    energy (sum of S^2), or None for all (at full rank, `LinearFitter` with alpha = 0). Other parameters as
    `LinearFitter`'s. Fitted: ``weight_``, ``bias_`` (the top rows of K, [A_j b_j]), ``rank_`` per phase and
    ``eigenvalues_`` (k, D) complex, the eigenvalues of A_j.
    """

    name = "dmd"

    def __init__(self, k: int | None = None, partition=None, rank: int | float | None = None,
                 validation_fraction: float = 0.2, seed: int = 0, device: str = "cpu", progress: bool = True):
        self.k, self.partition, self.rank = k, partition, rank
        self.validation_fraction, self.seed, self.device, self.progress = validation_fraction, seed, device, progress

    def _fit(self, ds, stepper, moments: TransitionMoments | None = None) -> PhaseSurrogate:
        self.rank_ = []
        model = super()._fit(ds, stepper, moments)
        self.eigenvalues_ = np.stack([np.linalg.eigvals(weight) for weight in self.weight_])
        return model

    def _maps(self, ds: xr.Dataset, moments: TransitionMoments) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self._solve(*moments.phase(phase)) for phase in self.partition_]

    def _solve(self, count, sum_in, sum_out, gram, cross) -> tuple[np.ndarray, np.ndarray]:
        width = gram.shape[0]
        z_gram = torch.empty(width + 1, width + 1, dtype=gram.dtype, device=gram.device)
        z_gram[:width, :width], z_gram[:width, width], z_gram[width, :width], z_gram[width, width] = gram, sum_in, sum_in, count
        z_cross = torch.cat([cross, sum_out[None]])  # (D + 1, D): Z Y^T
        energy, basis = torch.linalg.eigh(z_gram)
        energy, basis = energy.flip(0), basis.flip(1)
        rank = self._rank(energy)
        self.rank_.append(rank)
        inverse = basis[:, :rank] @ torch.diag(1 / energy[:rank]) @ basis[:, :rank].T
        top = (inverse @ z_cross).T  # (D, D + 1) = [A b]
        return top[:, :width].cpu().numpy(), top[:, width].cpu().numpy()

    def _rank(self, energy: torch.Tensor) -> int:
        numerical = int((energy > energy[0] * energy.shape[0] * torch.finfo(energy.dtype).eps).sum())
        if self.rank is None:
            return numerical
        if isinstance(self.rank, float) and 0 < self.rank < 1:
            fraction = torch.cumsum(energy.clamp(min=0), 0) / energy.clamp(min=0).sum()
            return min(numerical, int(torch.searchsorted(fraction, torch.tensor(self.rank, dtype=fraction.dtype))) + 1)
        if int(self.rank) < 1:
            raise ValueError(f"rank must be a positive int, a fraction in (0, 1) or None, got {self.rank}")
        return min(numerical, int(self.rank))

    def _state(self) -> tuple[dict, dict]:
        tensors, _ = super()._state()
        return tensors, {"rank": self.rank_}

    def _restore(self, tensors, state, num_layers, stepper) -> PhaseSurrogate:
        model = super()._restore(tensors, state, num_layers, stepper)
        self.rank_ = state["rank"]
        self.eigenvalues_ = np.stack([np.linalg.eigvals(weight) for weight in self.weight_])
        return model


class TeacherBlockFitter(SurrogateFitter):
    """The ``teacher-block`` rung: each phase runs the teacher block whose rollout over it has the best R² on training images.

    ``candidates``: every block of the teacher (``"all"``) or only the phase's own (``"phase"``); ``selection_images``
    training images at most score them. Other parameters as `LinearFitter`'s. Fitted: ``blocks_`` (1-based, per
    phase) and ``scores_`` (phase, candidate), NaN where not tried.
    """

    name = "teacher-block"

    def __init__(self, k: int | None = None, partition=None, candidates: str = "all", selection_images: int = 64,
                 batch_size: int = 64, validation_fraction: float = 0.2, seed: int = 0, device: str = "cpu",
                 progress: bool = True):
        self.k, self.partition, self.candidates, self.selection_images = k, partition, candidates, selection_images
        self.batch_size, self.validation_fraction, self.seed = batch_size, validation_fraction, seed
        self.device, self.progress = device, progress

    def _fit(self, ds, stepper, **data) -> PhaseSurrogate:
        if self.candidates not in ("all", "phase"):
            raise ValueError(f"candidates must be 'all' or 'phase', got {self.candidates!r}")
        num_layers = int(ds.attrs["num_blocks"])
        tried = [list(range(1, num_layers + 1)) if self.candidates == "all" else list(phase) for phase in self.partition_]
        candidates = [[partial(stepper.step, layer=block, block=block) for block in blocks] for blocks in tried]
        scores = rollout_scores(ds, _selection_positions(ds, self.training_images_, self.selection_images, self.seed),
                                self.partition_, candidates, self.batch_size, self.device, self.progress)
        table = np.full((len(self.partition_), num_layers), np.nan)
        for index, (blocks, row) in enumerate(zip(tried, scores)):
            table[index, np.asarray(blocks) - 1] = row
        self.scores_ = xr.DataArray(table, dims=("phase", "candidate"),
                                    coords={"phase": np.arange(len(self.partition_)), "candidate": np.arange(1, num_layers + 1)},
                                    attrs={"description": "R² (teacher variance, all tokens, the phase's layers stacked) "
                                                          "of the phase run with each candidate block, on training images"})
        self.blocks_ = [blocks[int(np.argmax(row))] for blocks, row in zip(tried, scores)]
        return TeacherBlockSurrogate(self.partition_, num_layers, stepper, self.blocks_)

    def _state(self) -> tuple[dict, dict]:
        return {"scores": torch.from_numpy(self.scores_.values)}, {"blocks": self.blocks_}

    def _restore(self, tensors, state, num_layers, stepper) -> PhaseSurrogate:
        if stepper is None:
            raise ValueError("the teacher-block surrogate runs the teacher's blocks: load it with teacher=")
        self.blocks_ = state["blocks"]
        self.scores_ = xr.DataArray(tensors["scores"].numpy(), dims=("phase", "candidate"),
                                    coords={"candidate": np.arange(1, num_layers + 1)})
        return TeacherBlockSurrogate(self.partition_, num_layers, stepper, self.blocks_)
