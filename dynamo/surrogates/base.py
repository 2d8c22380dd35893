"""`SurrogateFitter`: what every surrogate's fitter shares, scikit-learn style, with one save format
(``config.json`` + ``weights.safetensors``, nothing pickled) and one `SurrogateFitter.load`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from dynamo.heads import LinearHead
from dynamo.models import LoadedModel, load_recorded_model, rebuild_attrs
from dynamo.partition import Partition, resolve_partition
from dynamo.serialize import derived_seed, jsonable, read_tensors_and_json, write_tensors_and_json
from dynamo.stepping import BlockStepper
from dynamo.store import open_trajectories, positions_of
from dynamo.surrogates.evaluate import evaluate
from dynamo.surrogates.recurrence import PhaseRecurrence

__all__ = ["FITTERS", "FORMAT", "SurrogateFitter", "check_teacher", "open_store", "resolve_teacher", "split_images",
           "stopping_split", "teacher_identity"]

FORMAT = "dynamo-surrogate/1"
OLD_RAPTOR_FORMAT = "dynamo-raptor/1"  # Raptor fits saved before the one format
NOT_FITTED = "this %(name)s is not fitted yet: call fit(ds) or %(name)s.load(folder)"
FITTERS: dict[str, type[SurrogateFitter]] = {}  # every fitter by name, filled as they are defined


def split_images(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training and held-out ``image`` values (each sorted) of ``rows``: ``round(fraction * n)`` held out, drawn with ``seed``."""
    held_out = np.random.default_rng(seed).permutation(rows)[: int(round(fraction * rows.size))]
    return np.setdiff1d(rows, held_out), np.sort(held_out)


def stopping_split(training: np.ndarray, fraction: float, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Trained-on and early-stopping ``image`` values (each sorted) drawn from a fit's training images.

    ``min(limit, round(fraction * n))`` of the ``n`` training images validate, drawn with a seed derived from ``seed``.
    """
    count = min(int(limit), int(round(fraction * training.size)))
    stopping = np.random.default_rng(derived_seed(seed, "stopping")).permutation(training)[:count]
    return np.setdiff1d(training, stopping), np.sort(stopping)


def open_store(ds: xr.Dataset | str | Path) -> tuple[xr.Dataset, int]:
    """The dataset (opened if a path) and L, checked to hold every layer 0..L and every token (a rollout needs them)."""
    ds = ds if isinstance(ds, xr.Dataset) else open_trajectories(ds)
    where, attrs = ds.encoding.get("source", "the trajectory dataset"), ds.attrs
    num_layers = int(attrs["num_blocks"])
    layers = ds["layer"].values.tolist()
    if layers != list(range(num_layers + 1)):
        raise ValueError(f"{where} holds layers {layers}; Raptor needs all of 0..{num_layers}: record without --layers")
    tokens = int(attrs["num_prefix_tokens"]) + int(np.prod(attrs["patch_grid"]))
    if ds.sizes["token"] != tokens:
        raise ValueError(
            f"{where} holds {ds.sizes['token']} of the model's {tokens} tokens; Raptor's attention "
            "needs them all: record without --patch-tokens"
        )
    if ds.sizes["image"] == 0:
        raise ValueError(f"{where} has no recorded images")
    return ds, num_layers


def teacher_identity(teacher: LoadedModel) -> dict:
    """What a fit records of its teacher: what rebuilds it (`dynamo.models.rebuild_attrs`)."""
    return jsonable(rebuild_attrs(teacher))


def resolve_teacher(attrs: dict, teacher: LoadedModel | None) -> LoadedModel:
    """A store's teacher: the one given, or rebuilt from the store's attributes; weights hash checked."""
    if teacher is None:
        teacher = load_recorded_model(attrs)
    if not isinstance(teacher, LoadedModel):
        raise ValueError(f"teacher must be a dynamo LoadedModel (dynamo.load_model), got {type(teacher).__name__}")
    check_teacher(attrs, teacher_identity(teacher))
    return teacher


def check_teacher(attrs: dict, identity: dict) -> None:
    """Raise unless the teacher ``identity`` has the weights hash of ``attrs`` (a store's)."""
    if attrs.get("weights_sha256") != identity["weights_sha256"]:
        raise ValueError(
            f"the teacher {identity['model']} (weights sha256 {identity['weights_sha256'][:12]}) is not "
            f"the model the store was recorded from (sha256 {str(attrs.get('weights_sha256'))[:12]})"
        )


class SurrogateFitter(BaseEstimator):
    """Fit a surrogate of a ViT's L blocks to a trajectory dataset; evaluate, score, save and load it.

    Subclasses set ``name`` and implement ``_fit``, ``_state`` and ``_restore``. Fitted: ``model_`` (the
    surrogate, teacher attached), ``partition_``, ``training_images_`` and ``validation_images_`` (``image`` values).
    """

    name = "surrogate"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            FITTERS[cls.name] = cls

    @property
    def split_seed_(self) -> int:
        """The seed of the held-out split: ``split_seed`` where a fitter has one and it is set, else ``seed``."""
        split_seed = getattr(self, "split_seed", None)
        return self.seed if split_seed is None else split_seed

    def fit(self, ds: xr.Dataset | str | Path, teacher: LoadedModel | None = None, head: LinearHead | None = None,
            **data) -> SurrogateFitter:
        """Fit the surrogate to a trajectory dataset (or its store's path) with every layer and token; return self.

        ``teacher`` defaults to the model rebuilt from the dataset's attributes (hash checked); ``head`` is
        attached to it for accuracies; ``**data`` are precomputed inputs a fitter accepts (``moments``).
        """
        ds, num_layers = open_store(ds)
        teacher = resolve_teacher(ds.attrs, teacher)
        self.store_ = ds.encoding.get("source")
        self.teacher_identity_ = teacher_identity(teacher)
        self.images_sha256_ = ds.attrs.get("identity", {}).get("images_sha256")
        self.partition_ = resolve_partition(self.partition, self.k, num_layers)
        self.training_images_, self.validation_images_ = split_images(ds["image"].values, self.validation_fraction,
                                                                      self.split_seed_)
        teacher.module.to(self.device)
        self.model_ = self._fit(ds, BlockStepper(teacher, head), **data).to(self.device)
        return self

    def _fit(self, ds: xr.Dataset, stepper: BlockStepper, **data) -> PhaseRecurrence:
        """The fitted surrogate model."""
        raise NotImplementedError

    def _state(self) -> tuple[dict, dict]:
        """Tensors and JSON of the fitted state, for `save`."""
        return {}, {}

    def _restore(self, tensors: dict, state: dict, num_layers: int, stepper: BlockStepper | None) -> PhaseRecurrence:
        """Set the fitted attributes from `_state`'s tensors and JSON; the surrogate model."""
        raise NotImplementedError

    @torch.no_grad()
    def transform(self, states) -> torch.Tensor:
        """The surrogate's layers 0..L, (B, L + 1, T, D), from layer-0 states (B, T, D)."""
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        states = torch.as_tensor(states, dtype=torch.float32, device=self.device)
        return torch.stack(self.model_.run(states, 0), dim=1)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """Classes of preprocessed images (B, C, H, W) by teacher embedding -> surrogate -> teacher head: (B,)."""
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        return self.model_.predict(self.model_.run(self.model_.embed(pixels.to(self.device)), 0)[-1])

    def held_out_positions(self, ds: xr.Dataset, images=None) -> tuple[np.ndarray | None, str]:
        """Positions evaluated on by default and which they are: ``images``, else the held-out images, else all (None)."""
        if images is not None:
            return np.asarray(images), "given"
        images_sha256 = ds.attrs.get("identity", {}).get("images_sha256")
        if images_sha256 is not None and images_sha256 == self.images_sha256_ and self.validation_images_.size:
            return positions_of(ds, self.validation_images_), "held-out images of the fit store"
        return None, "all images"

    def evaluate(self, ds: xr.Dataset | str | Path, images=None, reference: str = "target", probe: bool = True) -> xr.Dataset:
        """`dynamo.surrogates.evaluate.evaluate` of the fitted surrogate on positions ``images`` (default `held_out_positions`)."""
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        ds, _ = open_store(ds)
        if self.model_.teacher is None:
            raise ValueError(f"no teacher attached: load with {type(self).__name__}.load(folder, teacher=...)")
        check_teacher(ds.attrs, self.teacher_identity_)
        positions, which = self.held_out_positions(ds, images)
        report = evaluate(self.model_, ds, positions, reference=reference, probe=probe)
        return report.assign_attrs(images=which, surrogate=self.name)

    def score(self, ds: xr.Dataset | str | Path, images=None) -> float:
        """Final-layer R² (all tokens, teacher variance) of the rollout from layer 0; see `evaluate`."""
        return float(self.evaluate(ds, images, probe=False).attrs["r2_final"])

    def save(self, folder) -> Path:
        """Write ``config.json`` (parameters, partition, teacher, split, fitted state) and ``weights.safetensors``."""
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        tensors, state = self._state()
        config = {
            "format": FORMAT, "surrogate": self.name,
            "params": {k: v for k, v in self.get_params().items() if k != "checkpoint_dir"},
            "partition": self.partition_, "num_layers": self.model_.num_layers, "teacher": self.teacher_identity_,
            "store": self.store_, "images_sha256": self.images_sha256_, "validation_images": self.validation_images_,
            "training_images": self.training_images_, "state": state,
        }
        folder = Path(folder)
        write_tensors_and_json(folder / "weights.safetensors", folder / "config.json", tensors, config)
        return folder

    @classmethod
    def load(cls, folder, teacher: LoadedModel | None = None, device: str | None = None,
             head: LinearHead | None = None) -> SurrogateFitter:
        """A fitted surrogate from a folder written by `save` (or by a Raptor fit of an older dynamo).

        ``teacher`` defaults to the one rebuilt from the saved identity (hash checked); a random-weight teacher
        without a recorded seed cannot be rebuilt: pass it, or get a surrogate without one (``run`` works, ``head``
        not). ``device`` defaults to the one fitted on.
        """
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} holds no saved surrogate (no config.json); save one with fitter.save(folder)")
        tensors, config = read_tensors_and_json(folder / "weights.safetensors", folder / "config.json")
        if config.get("format") == OLD_RAPTOR_FORMAT:
            config = {**config, "surrogate": "raptor", "state": {"block_config": config["block_config"], "history": config["history"]}}
        elif config.get("format") != FORMAT:
            raise ValueError(f"{folder / 'config.json'} is not a saved dynamo surrogate (format {config.get('format')!r})")
        kind = FITTERS[config["surrogate"]]
        if not issubclass(kind, cls):
            raise ValueError(f"{folder} holds a {config['surrogate']} surrogate, not a {cls.__name__}")
        fitter = kind(**{**config["params"], **({"device": device} if device else {})})
        identity = config["teacher"]
        if teacher is None and (identity["pretrained"] or "init_seed" in identity):
            teacher = load_recorded_model(identity)
        if teacher is not None:
            check_teacher({"weights_sha256": identity["weights_sha256"]}, teacher_identity(teacher))
            teacher.module.to(fitter.device)
        fitter.partition_ = Partition(config["partition"])
        fitter.teacher_identity_, fitter.store_, fitter.images_sha256_ = identity, config["store"], config["images_sha256"]
        fitter.validation_images_ = np.asarray(config["validation_images"], dtype=np.int64)
        fitter.training_images_ = np.asarray(config["training_images"], dtype=np.int64)
        stepper = None if teacher is None else BlockStepper(teacher, head)
        fitter.model_ = fitter._restore(tensors, config["state"], config["num_layers"], stepper).to(fitter.device)
        return fitter
