"""`RaptorFitter`: fit k shared recurrent blocks to the L blocks of a recorded ViT.

The recipe is the paper's (spec section 2; official code ``KempnerInstitute/raptor``):

- **Stage 1** trains one block per phase of depth, on that phase's layer range s -> e only,
  with the loss ``lam * L_TF + (1 - lam) * L_AR``: teacher forcing (the block maps each recorded
  layer to the next) annealed linearly into autoregressive rollout (the block is applied to its
  own output from a_s, loss averaged over the e - s steps); ``lam`` falls from 1 to 0 over the
  first ``tf_anneal`` (25%) of the steps, then stays 0.
- **Stage 2** trains all blocks together, purely autoregressively over the whole depth 0 -> L,
  through the router.
- Losses: plain MSE, or a token-weighted MSE (``w_cls MSE(cls) + w_reg MSE(registers) +
  w_patch MSE(patches)``). The paper's runs use MSE on every stage-1 range but the last, which
  uses (0.34, 0.33, 0.33), and (0.45, 0.10, 0.45) in stage 2 (``"paper"``, the default).
- AdamW, linear warmup from 0 then cosine decay to ``min_lr``, gradient clipping at 1.0,
  optional input noise sigma (0 in the paper's runs), seeds.

Defaults for CPU. The paper trains 312,500 steps of batch 64 per stage at lr 3e-4 on ImageNet
activations of DINOv2-B. dynamo's defaults (``steps=200`` per stage-1 block and 200 in stage 2,
batch 16, lr 2e-3, 5% warmup) are sized so that a fit of a zoo model (12 blocks, width 64, 69
tokens) takes one to two minutes on one idle CPU core (each step rolls the blocks through their
whole layer range); raise ``steps`` (and lower ``lr``) for large teachers. Models this small
train fastest with one intra-op thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``).

The held-out images. ``validation_fraction`` of the store's images (drawn with ``seed``) are never
trained on; periodic validation (R² at the end layer of the range being trained) and, by
default, `evaluate`/`score` on the fit store use them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from tqdm.auto import tqdm

from dynamo.models import LoadedModel, load_model
from dynamo.raptor.data import TrajectoryStream
from dynamo.raptor.evaluate import evaluate, r2_score, token_groups
from dynamo.raptor.io import (
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_tensors_and_json,
    write_tensors_and_json,
)
from dynamo.raptor.model import Raptor
from dynamo.stepping import BlockStepper
from dynamo.store import open_trajectories

__all__ = ["PAPER_STAGE1_LAST_WEIGHTS", "PAPER_STAGE2_WEIGHTS", "RaptorFitter", "parse_partition"]

PAPER_STAGE1_LAST_WEIGHTS = {"cls": 0.34, "register": 0.33, "patch": 0.33}
PAPER_STAGE2_WEIGHTS = {"cls": 0.45, "register": 0.10, "patch": 0.45}
DONE = (3, 0, 0)  # (stage, phase, step) of a finished fit


def parse_partition(value, num_layers: int) -> list[list[int]]:
    """A phase partition from any of the forms users write.

    Parameters
    ----------
    value : str, list of list of int, or list of int
        ``"1-7,8-12"`` or ``[[1, ..., 7], [8, ..., 12]]`` (phases of 1-based block indices), or
        the k - 1 router thresholds ``"7"`` / ``[7]`` (phase i ends at threshold i, the last
        phase runs to L; as ``analyses.phases.thresholds``).
    num_layers : int
        L, the number of blocks of the teacher.

    Returns
    -------
    list of list of int
        Contiguous phases covering 1..L in order.
    """
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
        try:
            if any("-" in part for part in parts):
                value = [list(range(int(a), int(b) + 1)) for a, b in (re.fullmatch(r"(\d+)-(\d+)", p).groups() for p in parts)]
            else:
                value = [int(part) for part in parts]
        except (AttributeError, ValueError):
            raise ValueError(f"cannot read partition {value!r}: write phases like '1-7,8-12' or thresholds like '7'") from None
    value = list(value)
    if value and all(isinstance(v, (int, np.integer)) for v in value):
        bounds = [0, *[int(v) for v in value], num_layers]
        value = [list(range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]
    partition = [[int(i) for i in phase] for phase in value]
    if [i for phase in partition for i in phase] != list(range(1, num_layers + 1)) or not all(partition):
        raise ValueError(
            f"partition {partition} must split blocks 1..{num_layers} into non-empty contiguous "
            "phases in order, e.g. '1-7,8-12'"
        )
    return partition


class RaptorFitter:
    """Fit a Raptor surrogate (k recurrent blocks) to a trajectory store, scikit-learn style.

    Parameters
    ----------
    k : int, optional
        Number of blocks (phases); default the partition's length, or 2 without a partition.
    partition : str or list, optional
        Phases of depth, in any form `parse_partition` reads. Default: the exact contiguous
        partition with k phases of the store's layer similarity (``analyses.phases``).
    steps : int
        Optimizer steps per stage-1 block.
    stage2_steps : int, optional
        Steps of stage 2 (default: ``steps``); 0 skips stage 2.
    batch_size : int
    lr, weight_decay : float
        AdamW (the paper: 3e-4, 1e-4).
    warmup : float
        Fraction of each stage's steps with linear warmup from 0 (the paper: 10k of 312.5k).
    min_lr : float
        End of the cosine decay (the paper: 1e-6).
    grad_clip : float
        Gradient-norm clipping (the paper: 1.0).
    tf_anneal : float
        Fraction of stage-1 steps over which teacher forcing anneals into rollout (the paper: 0.25).
    noise : float
        sigma of Gaussian noise added to block inputs during rollout (the paper's runs: 0).
    stage1_loss, stage2_loss : "paper", "mse" or dict
        Loss per stage: "paper" (see the module docstring), "mse", or token-group weights
        ``{"cls": w, "register": w, "patch": w}`` (cls includes distillation tokens; groups the
        model lacks are dropped and the remaining weights renormalised to sum to 1).
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
    checkpoint_dir : str or Path, optional
        Where to checkpoint; a fit started with the same parameters, store and checkpoint_dir
        resumes where the interrupted one stopped, and gives the same weights.
    checkpoint_every : int
    seed : int
        Initialisation, split, batch order and noise.
    device : str
        Torch device for training and evaluation (the teacher is moved there too).
    progress : bool
        Show progress bars.

    Attributes
    ----------
    model_ : Raptor
        The fitted surrogate (with the teacher attached: ``run``, ``head``, ``forward``).
    partition_ : list of list of int
    validation_images_, training_images_ : numpy.ndarray
        Store rows held out / trained on.
    history_ : list of dict
        One entry per validation: stage, block, step, lr, loss, val_r2.
    timings_ : dict
        Per stage segment: seconds of each training step and the wait for its batch.
    """

    def __init__(
        self,
        k: int | None = None,
        partition=None,
        steps: int = 200,
        stage2_steps: int | None = None,
        batch_size: int = 16,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup: float = 0.05,
        min_lr: float = 1e-6,
        grad_clip: float = 1.0,
        tf_anneal: float = 0.25,
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
        validate_every: int = 100,
        validation_images: int = 128,
        checkpoint_dir=None,
        checkpoint_every: int = 100,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ):
        for name, value in list(locals().items()):
            if name != "self":
                setattr(self, name, value)

    # ---- parameters ---------------------------------------------------------------------

    def get_params(self) -> dict:
        """Constructor parameters, by name (as scikit-learn's ``get_params``)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def _fit_identity(self, attrs: dict) -> dict:
        """What an interrupted fit must share with this one to be resumed."""
        params = {k: v for k, v in self.get_params().items() if k not in ("checkpoint_dir", "progress", "device")}
        identity = attrs.get("identity", {})
        return json.loads(json.dumps({
            "params": params,
            "teacher_weights_sha256": attrs.get("weights_sha256"),
            "images_sha256": identity.get("images_sha256"),
        }, default=str))

    # ---- fitting ------------------------------------------------------------------------

    def fit(self, store, teacher: LoadedModel | None = None) -> RaptorFitter:
        """Fit the surrogate to a trajectory store.

        Parameters
        ----------
        store : str or Path
            A complete trajectory store with every layer and token (`dynamo record` without
            ``--layers`` or ``--patch-tokens``).
        teacher : LoadedModel, optional
            The recorded model; default loaded from the store's attributes (its weights hash
            must match the store's either way).

        Returns
        -------
        RaptorFitter
            self, fitted.
        """
        path = Path(store)
        dataset = open_trajectories(path)
        num_layers = _check_store(dataset, path)
        teacher = resolve_teacher(dataset.attrs, teacher)
        self.store_ = str(path)
        self.teacher_identity_ = teacher_identity(teacher)
        self.images_sha256_ = dataset.attrs.get("identity", {}).get("images_sha256")
        self.partition_ = self._partition(dataset, num_layers)
        self.block_config_ = self._block_config(teacher.module, num_layers)
        rows = dataset["image"].values
        held_out = np.random.default_rng(self.seed).permutation(rows)[: int(round(self.validation_fraction * rows.size))]
        self.validation_images_ = np.sort(held_out)
        self.training_images_ = np.setdiff1d(rows, held_out)
        self.groups_ = {
            name: torch.from_numpy(index).to(self.device)
            for name, index in token_groups(dataset["token_kind"].values).items()
        }
        torch.manual_seed(self.seed)
        teacher.module.to(self.device)
        self.model_ = Raptor(
            thresholds_of(self.partition_), num_layers, self.block_config_, teacher=BlockStepper(teacher)
        ).to(self.device)
        self.history_, self.timings_ = [], {}
        identity = self._fit_identity(dataset.attrs)
        position, optimizer_state = self._resume(identity)
        segments = [(1, phase) for phase in range(len(self.partition_))] + ([(2, 0)] if self._stage2_steps else [])
        for stage, phase in segments:
            if (stage, phase) < position[:2]:
                continue
            first = position[2] if (stage, phase) == position[:2] else 0
            self._train_segment(dataset, stage, phase, first, optimizer_state if first else None, identity)
        self._checkpoint(identity, DONE)
        return self

    @property
    def _stage2_steps(self) -> int:
        return self.steps if self.stage2_steps is None else self.stage2_steps

    def _partition(self, dataset: xr.Dataset, num_layers: int) -> list[list[int]]:
        if self.partition is not None:
            partition = parse_partition(self.partition, num_layers)
            if self.k is not None and self.k != len(partition):
                raise ValueError(f"k={self.k} but the partition {partition} has {len(partition)} phases; give one or the other")
            return partition
        k = 2 if self.k is None else self.k
        if not 1 <= k <= num_layers:
            raise ValueError(f"k must be in 1..{num_layers} for a {num_layers}-block teacher, got {k}")
        if k == 1:
            return [list(range(1, num_layers + 1))]
        from analyses.phases import find_phases

        return parse_partition(find_phases(dataset, method="contiguous", k=k), num_layers)

    def _block_config(self, module, num_layers: int) -> dict:
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
        }

    def _segment(self, stage: int, phase: int) -> tuple[int, int, int, dict | None, list]:
        """Layer range, steps, loss weights and parameters of one training segment."""
        if stage == 1:
            start, stop = self.partition_[phase][0] - 1, self.partition_[phase][-1]
            last = phase == len(self.partition_) - 1
            weights = _loss_weights(self.stage1_loss, PAPER_STAGE1_LAST_WEIGHTS if last else None)
            return start, stop, self.steps, weights, list(self.model_.blocks[phase].parameters())
        weights = _loss_weights(self.stage2_loss, PAPER_STAGE2_WEIGHTS)
        return 0, self.model_.num_layers, self._stage2_steps, weights, list(self.model_.parameters())

    def _train_segment(self, dataset, stage: int, phase: int, first: int, optimizer_state, identity: dict) -> None:
        start, stop, steps, weights, params = self._segment(stage, phase)
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if optimizer_state is not None:
            optimizer_from_tensors(optimizer, *optimizer_state)
        validation = self._validation_states(dataset, start, stop)
        name = f"stage {stage}" + (f" block {phase + 1}" if stage == 1 else "") + f" layers {start}->{stop}"
        timing = self.timings_.setdefault(name, {"step_seconds": [], "wait_seconds": []})
        stream = TrajectoryStream(
            self.store_, self.training_images_, start, stop, self.batch_size,
            seed=_derived_seed(self.seed, stage, phase), first_step=first,
        )
        bar = tqdm(total=steps, initial=first, desc=name, disable=not self.progress, leave=False)
        try:
            for step in range(first, steps):
                began = time.perf_counter()
                batch = next(stream).to(self.device, non_blocking=True)
                lr = _learning_rate(step, steps, self.lr, self.warmup, self.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                anneal = max(0.0, 1.0 - step / (self.tf_anneal * steps)) if stage == 1 and self.tf_anneal > 0 else 0.0
                loss = self._loss(batch, start, weights, anneal, _derived_seed(self.seed, stage, phase, step))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                optimizer.step()
                timing["step_seconds"].append(time.perf_counter() - began)
                timing["wait_seconds"].append(stream.waits[-1])
                bar.update()
                done = step + 1
                if validation is not None and (done % self.validate_every == 0 or done == steps):
                    entry = {"stage": stage, "block": phase + 1, "step": done, "lr": lr,
                             "loss": loss.item(), "val_r2": self._validate(validation, start, stop)}
                    self.history_.append(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4g}", val_r2=f"{entry['val_r2']:.4f}")
                if done % self.checkpoint_every == 0 and done < steps:
                    self._checkpoint(identity, (stage, phase, done), optimizer)
        finally:
            bar.close()
            stream.close()
        following = (stage, phase + 1, 0) if stage == 1 else DONE
        self._checkpoint(identity, following)

    def _loss(self, batch: torch.Tensor, start: int, weights, anneal: float, seed: int) -> torch.Tensor:
        """``anneal * L_TF + (1 - anneal) * L_AR`` on a batch (B, n + 1, T, D) of layers start..start+n."""
        n = batch.shape[1] - 1
        loss = batch.new_zeros(())
        if anneal > 0:
            block = self.model_.blocks[self.model_.block_index(start + 1)]
            inputs = batch[:, :-1].reshape(-1, *batch.shape[2:])
            t = torch.arange(start + 1, start + n + 1, dtype=batch.dtype, device=batch.device).repeat(batch.shape[0])
            predicted = block(inputs, t).reshape(batch[:, 1:].shape)
            loss = loss + anneal * _token_loss(predicted, batch[:, 1:], weights, self.groups_)
        if anneal < 1:
            generator = torch.Generator(batch.device).manual_seed(seed) if self.noise else None
            states = self.model_.run(batch[:, 0], start, start + n, noise=self.noise, generator=generator)
            rollout = sum(_token_loss(states[i], batch[:, i], weights, self.groups_) for i in range(1, n + 1)) / n
            loss = loss + (1 - anneal) * rollout
        return loss

    def _validation_states(self, dataset: xr.Dataset, start: int, stop: int) -> torch.Tensor | None:
        rng = np.random.default_rng(self.seed)
        rows = np.sort(rng.permutation(self.validation_images_)[: self.validation_images])
        if rows.size == 0:
            return None
        hidden = dataset["hidden"].sel(image=rows).isel(layer=[start, stop])
        return torch.from_numpy(np.asarray(hidden.values, dtype=np.float32)).to(self.device)

    @torch.no_grad()
    def _validate(self, validation: torch.Tensor, start: int, stop: int) -> float:
        """R² (teacher variance) of the rollout start -> stop at layer ``stop``, on held-out images."""
        return r2_score(self.model_.run(validation[:, 0], start, stop)[-1], validation[:, 1])

    # ---- checkpoints --------------------------------------------------------------------

    def _checkpoint(self, identity: dict, position: tuple, optimizer=None) -> None:
        if self.checkpoint_dir is None:
            return
        tensors = {f"model.{name}": value for name, value in self.model_.state_dict().items()}
        config = {"identity": identity, "position": list(position), "history": self.history_}
        if optimizer is not None:
            optimizer_tensors, config["optimizer"] = optimizer_to_tensors(optimizer)
            tensors.update(optimizer_tensors)
        folder = Path(self.checkpoint_dir)
        write_tensors_and_json(folder / "checkpoint.safetensors", folder / "checkpoint.json", tensors, config)

    def _resume(self, identity: dict) -> tuple[tuple, tuple | None]:
        """Position (stage, phase, step) to start from, and the optimizer state saved there."""
        folder = None if self.checkpoint_dir is None else Path(self.checkpoint_dir)
        saved = None if folder is None else read_tensors_and_json(folder / "checkpoint.safetensors", folder / "checkpoint.json")
        if saved is None:
            return (1, 0, 0), None
        tensors, config = saved
        if config["identity"] != identity:
            raise ValueError(
                f"{self.checkpoint_dir} holds a checkpoint of a fit with other parameters or "
                "another store; use another checkpoint directory, or delete it to start over"
            )
        prefix = "model."
        self.model_.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.history_ = config["history"]
        optimizer_state = (tensors, config["optimizer"]) if "optimizer" in config else None
        return tuple(config["position"]), optimizer_state

    # ---- using the fitted surrogate -----------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ValueError("this RaptorFitter is not fitted yet: call fit(store) or RaptorFitter.load(folder)")

    @torch.no_grad()
    def transform(self, states, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Roll the surrogate out from states at layer ``start``.

        Parameters
        ----------
        states : array-like or torch.Tensor
            (B, T, D) at layer ``start`` (for example recorded layer 0).
        start, stop : int
            Layers, as in `Raptor.run`; ``stop`` defaults to L.

        Returns
        -------
        torch.Tensor
            (B, stop - start + 1, T, D): layers start..stop.
        """
        self._check_fitted()
        states = torch.as_tensor(states, dtype=torch.float32, device=self.device)
        return torch.stack(self.model_.run(states, start, stop), dim=1)

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
            (B,) class indices.
        """
        self._check_fitted()
        return self.model_(pixels.to(self.device)).argmax(-1)

    def _evaluation_images(self, dataset: xr.Dataset, images):
        if images is not None:
            return images, "given"
        fitted_on = getattr(self, "images_sha256_", None)
        same_store = fitted_on is not None and dataset.attrs.get("identity", {}).get("images_sha256") == fitted_on
        if same_store and getattr(self, "validation_images_", np.empty(0)).size:
            positions = np.flatnonzero(np.isin(dataset["image"].values, self.validation_images_))
            return positions, "held-out images of the fit store"
        return None, "all images"

    def evaluate(self, store, images=None, reference: str = "target", probe: bool = True) -> xr.Dataset:
        """The evaluation report (`dynamo.raptor.evaluate.evaluate`) on a store.

        Parameters
        ----------
        store : str or Path
            A trajectory store of the teacher.
        images : array-like of int, optional
            Positions along ``image``. Default: the held-out images when ``store`` is the one
            fitted on (same image set), otherwise all images.
        reference, probe
            As in `dynamo.raptor.evaluate.evaluate`.
        """
        self._check_fitted()
        dataset = open_trajectories(store)
        _check_store(dataset, store)
        if self.model_.teacher is None:
            raise ValueError("no teacher attached: load with RaptorFitter.load(folder, teacher=...)")
        _check_teacher(dataset.attrs, self.teacher_identity_)
        positions, which = self._evaluation_images(dataset, images)
        report = evaluate(self.model_, dataset, positions, reference=reference, probe=probe)
        report.attrs.update(images=which, partition=json.dumps(self.partition_), teacher=self.teacher_identity_["model"])
        return report

    def score(self, store, images=None) -> float:
        """Final-layer R² (all tokens, teacher variance) of the rollout from layer 0; see `evaluate`."""
        return float(self.evaluate(store, images, probe=False).attrs["r2_final"])

    # ---- persistence --------------------------------------------------------------------

    def save(self, folder) -> Path:
        """Write ``config.json`` and ``weights.safetensors`` into ``folder``; see `load`."""
        self._check_fitted()
        params = {k: v for k, v in self.get_params().items() if k not in ("checkpoint_dir",)}
        config = {
            "format": "dynamo-raptor/1",
            "params": params,
            "partition": self.partition_,
            "thresholds": self.model_.thresholds,
            "num_layers": self.model_.num_layers,
            "block_config": self.block_config_,
            "teacher": self.teacher_identity_,
            "store": getattr(self, "store_", None),
            "images_sha256": self.images_sha256_,
            "validation_images": self.validation_images_,
            "training_images": self.training_images_,
            "history": self.history_,
        }
        folder = Path(folder)
        write_tensors_and_json(folder / "weights.safetensors", folder / "config.json", self.model_.state_dict(), config)
        return folder

    @classmethod
    def load(cls, folder, teacher: LoadedModel | None = None, device: str | None = None) -> RaptorFitter:
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
        """
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{folder} holds no saved Raptor fitter (no config.json); save one with RaptorFitter.save")
        config = json.loads(config_path.read_text())
        if config.get("format") != "dynamo-raptor/1":
            raise ValueError(f"{config_path} is not a dynamo Raptor config (format {config.get('format')!r})")
        fitter = cls(**{**config["params"], **({"device": device} if device else {})})
        identity = config["teacher"]
        if teacher is None and identity["pretrained"]:
            teacher = load_model(identity["model"], checkpoint=identity["checkpoint"])
        if teacher is not None:
            _check_teacher({"weights_sha256": identity["weights_sha256"]}, teacher_identity(teacher))
            teacher.module.to(fitter.device)
        fitter.model_ = Raptor(
            config["thresholds"], config["num_layers"], config["block_config"],
            teacher=None if teacher is None else BlockStepper(teacher),
        ).to(fitter.device)
        fitter.model_.load_state_dict(read_tensors_and_json(folder / "weights.safetensors", config_path)[0])
        fitter.partition_ = config["partition"]
        fitter.block_config_ = config["block_config"]
        fitter.teacher_identity_ = identity
        fitter.store_ = config["store"]
        fitter.images_sha256_ = config["images_sha256"]
        fitter.validation_images_ = np.asarray(config["validation_images"], dtype=np.int64)
        fitter.training_images_ = np.asarray(config["training_images"], dtype=np.int64)
        fitter.history_ = config["history"]
        return fitter


# ---- helpers ----------------------------------------------------------------------------


def thresholds_of(partition: list[list[int]]) -> list[int]:
    """The k - 1 router thresholds of a partition, by ``analyses.phases.thresholds``."""
    from analyses.phases import thresholds

    return [int(t) for t in thresholds(partition)]


def teacher_identity(teacher: LoadedModel) -> dict:
    return {
        "model": teacher.source,
        "checkpoint": teacher.checkpoint,
        "pretrained": bool(teacher.pretrained),
        "weights_sha256": teacher.weights_sha256,
    }


def resolve_teacher(attrs: dict, teacher: LoadedModel | None) -> LoadedModel:
    """The store's teacher: the one given, or loaded from the store's attributes; hashes checked."""
    if teacher is None:
        if not attrs.get("pretrained", True):
            raise ValueError(
                f"the store was recorded from {attrs.get('model')} with random weights, which "
                "cannot be rebuilt by name; pass the recorded model as teacher="
            )
        teacher = load_model(attrs["model"], checkpoint=attrs.get("checkpoint"))
    if not isinstance(teacher, LoadedModel):
        raise ValueError(f"teacher must be a dynamo LoadedModel (dynamo.load_model), got {type(teacher).__name__}")
    _check_teacher(attrs, teacher_identity(teacher))
    return teacher


def _check_teacher(attrs: dict, identity: dict) -> None:
    if attrs.get("weights_sha256") != identity["weights_sha256"]:
        raise ValueError(
            f"the teacher {identity['model']} (weights sha256 {identity['weights_sha256'][:12]}) is not "
            f"the model the store was recorded from (sha256 {str(attrs.get('weights_sha256'))[:12]})"
        )


def _check_store(dataset: xr.Dataset, path) -> int:
    """L, after checking the store holds every layer 0..L and every token of the model."""
    attrs = dataset.attrs
    num_layers = int(attrs["num_blocks"])
    layers = dataset["layer"].values.tolist()
    if layers != list(range(num_layers + 1)):
        raise ValueError(f"{path} holds layers {layers}; Raptor needs all of 0..{num_layers}: record without --layers")
    tokens = int(attrs["num_prefix_tokens"]) + int(np.prod(attrs["patch_grid"]))
    if dataset.sizes["token"] != tokens:
        raise ValueError(
            f"{path} holds {dataset.sizes['token']} of the model's {tokens} tokens; Raptor's attention "
            "needs them all: record without --patch-tokens"
        )
    if dataset.sizes["image"] == 0:
        raise ValueError(f"{path} has no recorded images")
    return num_layers


def _loss_weights(spec, paper: dict | None) -> dict | None:
    if isinstance(spec, str):
        if spec not in ("paper", "mse"):
            raise ValueError(f"a loss must be 'paper', 'mse' or a dict of token-group weights, got {spec!r}")
        return paper if spec == "paper" else None
    unknown = set(spec) - {"cls", "register", "patch"}
    if unknown:
        raise ValueError(f"unknown token groups {sorted(unknown)} in loss weights; use cls, register, patch")
    return dict(spec)


def _token_loss(predicted: torch.Tensor, target: torch.Tensor, weights: dict | None, groups: dict) -> torch.Tensor:
    """MSE, or the token-group weighted MSE (weights renormalised over the groups present)."""
    if weights is None:
        return F.mse_loss(predicted, target)
    present = {name: w for name, w in weights.items() if name in groups and w}
    total = sum(present.values())
    return sum(
        w / total * F.mse_loss(predicted.index_select(-2, groups[name]), target.index_select(-2, groups[name]))
        for name, w in present.items()
    )


def _learning_rate(step: int, steps: int, peak: float, warmup: float, floor: float) -> float:
    """Linear warmup from 0 over ``warmup * steps``, then cosine from ``peak`` to ``floor``."""
    warmup_steps = int(warmup * steps)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def _derived_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")
