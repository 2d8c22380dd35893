"""`RaptorFitter`: fit k shared recurrent blocks to the L blocks of a recorded ViT, scikit-learn style.

The recipe (two stages, the paper's losses and schedule) is `dynamo.raptor.train`'s; the losses
are `dynamo.raptor.loss`'s; saving, loading and checkpoints `dynamo.raptor.io`'s.

Defaults. The paper trains 312,500 steps of batch 64 per stage at lr 3e-4 on ImageNet
activations of DINOv2-B (`PAPER_RECIPE`). dynamo's defaults are for a CPU and a converged fit:
batch 16, lr 2e-3, 5% warmup, and each segment trains until its held-out R² stops improving
(``patience`` validations ``validate_every`` steps apart without a gain above ``tol``; the rule
is `dynamo.raptor.train.plateaued`) or ``steps`` is reached. Models this small train fastest
with one intra-op thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``).

The held-out images. ``validation_fraction`` of the dataset's images (drawn with ``split_seed``,
by default ``seed``) are never trained on; periodic validation (R² at the end layer of the range
being trained) and, by default, `evaluate`/`score` on the dataset fitted on use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from dynamo.heads import LinearHead
from dynamo.layout import token_groups
from dynamo.models import LoadedModel
from dynamo.partition import resolve_partition
from dynamo.raptor.block import RaptorBlock, copy_teacher_block
from dynamo.raptor.data import split_images
from dynamo.raptor.evaluate import evaluate
from dynamo.raptor.io import check_teacher, load_fitter, resolve_teacher, save_fitter, teacher_identity
from dynamo.raptor.model import Raptor
from dynamo.raptor.train import derived_seed, train
from dynamo.stepping import BlockStepper
from dynamo.store import jsonable, open_trajectories

__all__ = ["PAPER_RECIPE", "RaptorFitter"]

PAPER_RECIPE = {  # the paper's training recipe (spec 2.5-2.6); the step count is the caller's
    "lr": 3e-4, "weight_decay": 1e-4, "batch_size": 64, "warmup": 10_000, "min_lr": 1e-6,
    "tf_anneal": 0.25, "tf_floor": 0.0, "noise": 0.0, "stage1_loss": "paper", "stage2_loss": "paper",
    "grad_clip": 1.0, "mlp": "swiglu", "layerscale_init": 1e-5, "depth_hidden": 16, "depth_scaling": True,
    "patience": 0,  # a fixed number of steps, as the paper's runs
}

NOT_FITTED = "this %(name)s is not fitted yet: call fit(ds) or RaptorFitter.load(folder)"


class RaptorFitter(BaseEstimator):
    """Fit a Raptor surrogate (k recurrent blocks) to a trajectory dataset.

    Parameters
    ----------
    k : int, optional
        Number of blocks (phases); default the partition's length, or 2 without a partition.
    partition : Partition, str or list, optional
        Phases of depth, in any form `dynamo.partition.Partition.parse` reads: ``"1-7,8-12"``,
        ``[[1, ..., 7], [8, ..., 12]]``, or router thresholds ``"7"`` / ``[7]``; phases need not be
        contiguous (``[[1, 3], [2, 4]]``: a stage-1 block is trained on each run of its phase).
        None: the uniform contiguous split into k phases (`Partition.uniform`); the pipeline
        passes the store's own phases.
    steps : int
        Optimizer steps per stage-1 block at most (all of them with ``patience`` 0).
    stage2_steps : int, optional
        Steps of stage 2 at most (default: ``steps``); 0 skips stage 2.
    batch_size : int
    lr, weight_decay : float
        AdamW (the paper: 3e-4, 1e-4).
    warmup : float
        Linear warmup from 0: a fraction of each segment's steps when below 1, else a number of
        steps (the paper: 10,000 of 312,500).
    min_lr : float
        End of the cosine decay (the paper: 1e-6).
    grad_clip : float
        Gradient-norm clipping (the paper: 1.0).
    tf_anneal : float
        Fraction of stage-1 steps over which teacher forcing anneals into rollout (the paper: 0.25).
    tf_floor : float
        Weight of teacher forcing the anneal ends at and keeps (the paper: 0).
    noise : float
        sigma of Gaussian noise added to block inputs during rollout (the paper's runs: 0).
    stage1_loss : "paper", "mse", dict, or a list of k of ("mse" or dict)
        Stage-1 loss: "paper" (MSE on each segment but the last, weighted 0.34/0.33/0.33; see
        `dynamo.raptor.loss`), "mse", token-kind weights ``{"cls": w, "register": w, "patch":
        w}`` for every segment, or one per segment in depth order. Weights are used as given (a
        kind the model lacks contributes nothing; nothing is renormalised; a distillation token
        takes the cls weight unless given its own, ``"dist"``).
    stage2_loss : "paper", "mse" or dict
        Stage-2 loss ("paper": 0.45/0.10/0.45).
    mlp : {"swiglu", "gelu"}
    mlp_ratio : float, optional
        MLP hidden width over D; default the teacher's.
    num_heads : int, optional
        Default the teacher's.
    layerscale_init : float
        (the paper: 1e-5)
    depth_hidden : int
        Hidden width of the depth-scaling MLP (the paper: 16).
    depth_scaling : bool
        Condition the blocks on the layer index (the paper: yes).
    validation_fraction : float
        Share of images held out from training.
    validate_every : int
        Steps between validations (also run at the end of each stage).
    validation_images : int
        At most this many held-out images are used by the periodic validation.
    patience : int
        Stop a segment once this many validations in a row (after warmup and anneal) have not
        beaten the best before them by more than ``tol``; 0 trains every step.
    tol : float
        The R² gain that counts as an improvement.
    checkpoint_dir : str or Path, optional
        Where to checkpoint; a fit started with the same parameters, store and checkpoint_dir
        resumes where the interrupted one stopped, and gives the same weights.
    checkpoint_every : int
    stage1_cache : str or Path, optional
        A folder where trained stage-1 blocks are kept and reused by fits whose segment (layer
        range, loss weights, recipe, teacher, images, seed) is the same (`dynamo.raptor.train`).
    init : list of int, optional
        Start each phase's block from one of the teacher's own blocks (1-based, one per phase,
        `dynamo.raptor.block.copy_teacher_block`; the ladder passes the ``teacher-block`` rung's
        choice, `dynamo.surrogates.TeacherBlockFitter`); the block must be of the teacher's
        kind (e.g. ``mlp="gelu"`` for a GELU teacher) and takes its norms' epsilon. None: random
        initialisation (seeded, near the identity).
    seed : int
        Initialisation (each block's from its layer range), batch order, noise, and the split.
    split_seed : int, optional
        Seed of the held-out split, when it should not change with ``seed`` (several seeds
        evaluated on the same images).
    device : str
        Torch device for training and evaluation (the teacher is moved there too).
    progress : bool
        Show progress bars.

    Attributes
    ----------
    model_ : Raptor
        The fitted surrogate (with the teacher attached: ``run``, ``head``, ``forward``).
    partition_ : Partition
    validation_images_, training_images_ : numpy.ndarray
        ``image`` coordinate values held out / trained on.
    history_ : list of dict
        One entry per validation: stage, block, step, lr, loss, val_r2 (``stop`` on one that
        ended its segment early, ``reused`` on a kept stage-1 block's).
    timings_ : dict
        Per stage segment: seconds of each training step and the wait for its batch.
    """

    def __init__(
        self,
        k: int | None = None,
        partition=None,
        steps: int = 2000,
        stage2_steps: int | None = None,
        batch_size: int = 16,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup: float = 0.05,
        min_lr: float = 1e-6,
        grad_clip: float = 1.0,
        tf_anneal: float = 0.25,
        tf_floor: float = 0.0,
        noise: float = 0.0,
        stage1_loss="paper",
        stage2_loss="paper",
        mlp: str = "swiglu",
        mlp_ratio: float | None = None,
        num_heads: int | None = None,
        layerscale_init: float = 1e-5,
        depth_hidden: int = 16,
        depth_scaling: bool = True,
        validation_fraction: float = 0.2,
        validate_every: int = 50,
        validation_images: int = 128,
        patience: int = 5,
        tol: float = 1e-4,
        checkpoint_dir=None,
        checkpoint_every: int = 100,
        stage1_cache=None,
        init: list[int] | None = None,
        seed: int = 0,
        split_seed: int | None = None,
        device: str = "cpu",
        progress: bool = True,
    ):
        self.k, self.partition = k, partition
        self.steps, self.stage2_steps, self.batch_size = steps, stage2_steps, batch_size
        self.lr, self.weight_decay, self.warmup, self.min_lr = lr, weight_decay, warmup, min_lr
        self.grad_clip, self.tf_anneal, self.tf_floor, self.noise = grad_clip, tf_anneal, tf_floor, noise
        self.stage1_loss, self.stage2_loss = stage1_loss, stage2_loss
        self.mlp, self.mlp_ratio, self.num_heads = mlp, mlp_ratio, num_heads
        self.layerscale_init, self.depth_hidden, self.depth_scaling = layerscale_init, depth_hidden, depth_scaling
        self.validation_fraction, self.validate_every = validation_fraction, validate_every
        self.validation_images, self.patience, self.tol = validation_images, patience, tol
        self.checkpoint_dir, self.checkpoint_every, self.stage1_cache = checkpoint_dir, checkpoint_every, stage1_cache
        self.init, self.seed, self.split_seed, self.device, self.progress = init, seed, split_seed, device, progress

    def fit(self, ds: xr.Dataset | str | Path, teacher: LoadedModel | None = None, head: LinearHead | None = None) -> RaptorFitter:
        """Fit the surrogate to a trajectory dataset.

        Parameters
        ----------
        ds : xarray.Dataset, str or Path
            A complete trajectory dataset with every layer and token (`dynamo record` without
            ``--layers`` or ``--patch-tokens``), or the path of its store.
        teacher : LoadedModel, optional
            The recorded model; default loaded from the dataset's attributes (its weights hash
            must match the dataset's either way).
        head : LinearHead, optional
            The head the accuracies use (`dynamo.heads`), attached to the teacher; needed for
            accuracies of a teacher without a classifier. Not part of the fit.

        Returns
        -------
        RaptorFitter
            self, fitted.
        """
        ds, teacher, num_layers = start_fit(self, ds, teacher, self.split_seed_)
        self.block_config_ = self._block_config(teacher.module)
        self.groups_ = {kind: torch.from_numpy(index).to(self.device) for kind, index in token_groups(ds["token_kind"]).items()}
        teacher.module.to(self.device)
        self.model_ = Raptor(self.partition_, num_layers, self.block_config_, teacher=BlockStepper(teacher, head))
        starts = self._teacher_blocks(teacher.module)
        for index, phase in enumerate(self.partition_):  # each block's initialisation a function of its range
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derived_seed(self.seed, "init", phase[0] - 1, phase[-1]))
                self.model_.blocks[index] = RaptorBlock(**self.block_config_)
            if starts is not None:
                copy_teacher_block(self.model_.blocks[index], teacher.module.blocks[starts[index] - 1])
        self.model_.to(self.device)
        self.history_, self.timings_ = [], {}
        train(self, ds, self._fit_identity(ds.attrs))
        return self

    @property
    def split_seed_(self) -> int:
        """The seed of the held-out split: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def _fit_identity(self, attrs: dict) -> dict:
        """What an interrupted fit must share with this one to be resumed."""
        params = {k: v for k, v in self.get_params().items() if k not in ("checkpoint_dir", "progress", "device")}
        return jsonable({
            "params": params,
            "teacher_weights_sha256": attrs.get("weights_sha256"),
            "images_sha256": attrs.get("identity", {}).get("images_sha256"),
        })

    def _teacher_blocks(self, module) -> list[int] | None:
        """``init`` checked: one 1-based teacher block per phase, or None."""
        if self.init is None:
            return None
        blocks = [int(b) for b in self.init]
        if len(blocks) != len(self.partition_) or not all(1 <= b <= len(module.blocks) for b in blocks):
            raise ValueError(f"init needs one teacher block in 1..{len(module.blocks)} per phase of "
                             f"{self.partition_}, got {self.init}")
        return blocks

    def _block_config(self, module) -> dict:
        first = module.blocks[0]
        dim = int(module.embed_dim)
        fc1 = getattr(getattr(first, "mlp", None), "fc1", None)
        teacher_ratio = fc1.out_features / dim if isinstance(fc1, torch.nn.Linear) else 4.0
        return {
            "dim": dim,
            "num_heads": int(self.num_heads or first.attn.num_heads),
            "mlp_ratio": float(self.mlp_ratio or teacher_ratio),
            "mlp": self.mlp,
            "layerscale_init": float(self.layerscale_init),
            "depth_hidden": int(self.depth_hidden),
            "depth_scaling": bool(self.depth_scaling),
            # a copied teacher block keeps the teacher's epsilon; random blocks keep torch's
            **({"norm_eps": float(first.norm1.eps)} if self.init is not None else {}),
        }

    # ---- using the fitted surrogate -----------------------------------------------------

    @torch.no_grad()
    def transform(self, states) -> torch.Tensor:
        """The surrogate's states from layer-0 states.

        Parameters
        ----------
        states : array-like or torch.Tensor
            (B, T, D) at layer 0 (e.g. a store's ``hidden`` at layer 0).

        Returns
        -------
        torch.Tensor
            (B, L + 1, T, D): the rollout's layers 0..L.
        """
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        states = torch.as_tensor(states, dtype=torch.float32, device=self.device)
        return torch.stack(self.model_.run(states, 0), dim=1)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """Classes predicted by the whole surrogate: teacher embedding -> k blocks -> teacher head.

        Parameters
        ----------
        pixels : torch.Tensor
            (B, C, H, W) preprocessed with the teacher's data config.

        Returns
        -------
        torch.Tensor
            (B,) classes (the teacher's head's; a linear head's labels).
        """
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        return self.model_.predict(self.model_.run(self.model_.embed(pixels.to(self.device)), 0)[-1])

    def evaluate(self, ds: xr.Dataset | str | Path, images=None, reference: str = "target", probe: bool = True) -> xr.Dataset:
        """The evaluation report (`dynamo.raptor.evaluate.evaluate`) on a trajectory dataset.

        Parameters
        ----------
        ds : xarray.Dataset, str or Path
            A trajectory dataset of the teacher, or its store's path.
        images : array-like of int, optional
            Positions along ``image``. Default: the held-out images when ``ds`` holds the images
            fitted on (same image set), otherwise all images.
        reference, probe
            As in `dynamo.raptor.evaluate.evaluate`.

        Returns
        -------
        xarray.Dataset
            ``r2`` (layer, token_kind), ``r2_stacked`` (token_kind), the partition as the
            ``phase`` coordinate; attrs as `dynamo.raptor.evaluate.evaluate`'s, plus ``images``
            (which images were used).
        """
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        ds, _ = open_store(ds)
        if self.model_.teacher is None:
            raise ValueError("no teacher attached: load with RaptorFitter.load(folder, teacher=...)")
        check_teacher(ds.attrs, self.teacher_identity_)
        positions, which = held_out_positions(self, ds, images)
        return evaluate(self.model_, ds, positions, reference=reference, probe=probe).assign_attrs(images=which)

    def score(self, ds: xr.Dataset | str | Path, images=None) -> float:
        """Final-layer R² (all tokens, teacher variance) of the rollout from layer 0; see `evaluate`."""
        return float(self.evaluate(ds, images, probe=False).attrs["r2_final"])

    # ---- persistence --------------------------------------------------------------------

    def save(self, folder) -> Path:
        """Write ``config.json`` and ``weights.safetensors`` into ``folder``; see `load`."""
        check_is_fitted(self, "model_", msg=NOT_FITTED)
        return save_fitter(self, folder)

    @classmethod
    def load(cls, folder, teacher: LoadedModel | None = None, device: str | None = None,
             head: LinearHead | None = None) -> RaptorFitter:
        """A fitted RaptorFitter from a folder written by `save` (safetensors + JSON; nothing unpickled).

        Parameters
        ----------
        folder : str or Path
        teacher : LoadedModel, optional
            The teacher for the embedding and head; default loaded by the saved name (its
            weights hash is checked). A teacher with random weights cannot be reloaded by name:
            pass it here, or the surrogate is loaded without one (``run`` works, ``head`` not).
        device : str, optional
            Where to put the surrogate (default: the device it was fitted on).
        head : LinearHead, optional
            Attached to the teacher, as in `fit`.
        """
        return load_fitter(cls, folder, teacher, device, head)


def start_fit(estimator, ds: xr.Dataset | str | Path, teacher: LoadedModel | None, split_seed: int):
    """What every surrogate fitter (`RaptorFitter`, `dynamo.surrogates`) learns first from its store.

    Opens and checks the store (`open_store`), resolves and checks the teacher, and sets on
    ``estimator`` ``store_``, ``teacher_identity_``, ``images_sha256_``, ``partition_`` (from its
    ``partition`` and ``k``) and the split of its ``validation_fraction`` drawn with ``split_seed``
    (``training_images_``, ``validation_images_``).

    Returns
    -------
    (xarray.Dataset, LoadedModel, int)
        The dataset, the teacher and L.
    """
    ds, num_layers = open_store(ds)
    teacher = resolve_teacher(ds.attrs, teacher)
    estimator.store_ = ds.encoding.get("source")
    estimator.teacher_identity_ = teacher_identity(teacher)
    estimator.images_sha256_ = ds.attrs.get("identity", {}).get("images_sha256")
    estimator.partition_ = resolve_partition(estimator.partition, estimator.k, num_layers)
    estimator.training_images_, estimator.validation_images_ = split_images(
        ds["image"].values, estimator.validation_fraction, split_seed)
    return ds, teacher, num_layers


def held_out_positions(estimator, ds: xr.Dataset, images=None) -> tuple[np.ndarray | None, str]:
    """Positions a fitted surrogate is evaluated on by default: its held-out images when ``ds``
    holds the images it was fitted on, else all; ``images`` when given. Returns (positions or None, which)."""
    if images is not None:
        return np.asarray(images), "given"
    images_sha256 = ds.attrs.get("identity", {}).get("images_sha256")
    if images_sha256 is not None and images_sha256 == estimator.images_sha256_ and estimator.validation_images_.size:
        return np.flatnonzero(np.isin(ds["image"].values, estimator.validation_images_)), "held-out images of the fit store"
    return None, "all images"


def open_store(ds: xr.Dataset | str | Path) -> tuple[xr.Dataset, int]:
    """The dataset (opened if given as a path) and L, after checking it holds every layer 0..L
    and every token of the model, as a surrogate's rollout needs."""
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
