"""The training loop of a Raptor fit (`RaptorFitter.fit`): stage 1 block by block, then stage 2.

The recipe is the paper's (spec section 2; official code ``KempnerInstitute/raptor``):

- **Stage 1** trains one block per phase of depth, on that phase's layer range s -> e only,
  with the loss ``lam * L_TF + (1 - lam) * L_AR`` (`dynamo.raptor.loss.segment_loss`): teacher
  forcing annealed linearly into autoregressive rollout, ``lam`` falling from 1 to 0 over the
  first ``tf_anneal`` (25%) of the steps, then staying 0.
- **Stage 2** trains all blocks together, purely autoregressively over the whole depth 0 -> L,
  through the router.
- AdamW; linear warmup from 0 over ``warmup`` of each segment's steps, then cosine decay to
  ``min_lr`` (`timm.scheduler.CosineLRScheduler`, set before each update to its value after the
  updates done: the warmup steps take 0, lr / W, ..., the former hand-written schedule's values one
  step later, and the decay is unchanged to rounding); gradient clipping; optional input noise.

Determinism and resume. A segment's batches are a function of (seed, stage, phase) and the epoch
(`dynamo.raptor.data.batch_plan`), the rollout noise of step s one of (seed, stage, phase, s). A
checkpoint (every ``checkpoint_every`` steps and at each segment's end) holds the weights, the
optimizer's state, the position (stage, phase, step) and the history, so an interrupted fit
resumes to the same final weights.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from dynamo.metrics import r2_score
from dynamo.raptor.data import trajectory_loader
from dynamo.raptor.io import load_checkpoint, save_checkpoint
from dynamo.raptor.loss import PAPER_STAGE1_LAST_WEIGHTS, PAPER_STAGE2_WEIGHTS, loss_weights, segment_loss

__all__ = ["DONE", "Segment", "segments", "train"]

DONE = (3, 0, 0)  # (stage, phase, step) of a finished fit


@dataclass(frozen=True)
class Segment:
    """One training segment: stage 1 trains block ``phase`` (0-based) on layers start..stop, stage 2 all blocks on 0..L."""

    stage: int
    phase: int
    start: int
    stop: int
    steps: int
    weights: dict | None  # token-kind loss weights (`dynamo.raptor.loss.loss_weights`), None for MSE

    @property
    def name(self) -> str:
        block = f" block {self.phase + 1}" if self.stage == 1 else ""
        return f"stage {self.stage}{block} layers {self.start}->{self.stop}"


def segments(fitter) -> list[Segment]:
    """The segments of a `RaptorFitter`'s recipe with any steps, in training order."""
    partition, last = fitter.partition_, len(fitter.partition_) - 1
    stage1 = [
        Segment(1, index, phase[0] - 1, phase[-1], fitter.steps,
                loss_weights(fitter.stage1_loss, PAPER_STAGE1_LAST_WEIGHTS if index == last else None))
        for index, phase in enumerate(partition)
    ]
    steps = fitter.steps if fitter.stage2_steps is None else fitter.stage2_steps
    stage2 = Segment(2, 0, 0, fitter.model_.num_layers, steps, loss_weights(fitter.stage2_loss, PAPER_STAGE2_WEIGHTS))
    return [segment for segment in [*stage1, stage2] if segment.steps]


def train(fitter, ds: xr.Dataset, identity: dict) -> None:
    """Train ``fitter.model_`` by the fitter's recipe, resuming from its ``checkpoint_dir``.

    Parameters
    ----------
    fitter : RaptorFitter
        With ``model_``, ``partition_``, ``groups_`` and the image split set (`RaptorFitter.fit`);
        its ``history_`` (one entry per validation: stage, block, step, lr, loss, val_r2) and
        ``timings_`` (per segment: seconds of each step and of its wait for the batch) are filled.
    ds : xarray.Dataset
        The trajectory dataset fitted on.
    identity : dict
        What a checkpoint must share with this fit to be resumed.
    """
    folder = None if fitter.checkpoint_dir is None else Path(fitter.checkpoint_dir)
    saved = None if folder is None else load_checkpoint(folder, fitter.model_, identity)
    position, optimizer_state = (1, 0, 0), None
    if saved is not None:
        config, optimizer_state = saved
        position, fitter.history_ = tuple(config["position"]), config["history"]

    def checkpoint(where: tuple, optimizer=None) -> None:
        if folder is not None:
            config = {"identity": identity, "position": list(where), "history": fitter.history_}
            save_checkpoint(folder, fitter.model_, config, optimizer)

    for segment in segments(fitter):
        key = (segment.stage, segment.phase)
        if key < position[:2]:
            continue
        first = position[2] if key == position[:2] else 0
        _train_segment(fitter, ds, segment, first, optimizer_state if first else None, checkpoint)
        checkpoint((1, segment.phase + 1, 0) if segment.stage == 1 else DONE)
    checkpoint(DONE)


def _train_segment(fitter, ds: xr.Dataset, segment: Segment, first: int, optimizer_state, checkpoint) -> None:
    model = fitter.model_
    params = list((model.blocks[segment.phase] if segment.stage == 1 else model).parameters())
    optimizer = torch.optim.AdamW(params, lr=fitter.lr, weight_decay=fitter.weight_decay)
    warmup = int(fitter.warmup * segment.steps)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, segment.steps - warmup), lr_min=fitter.min_lr,
                                  warmup_t=warmup, warmup_prefix=True, t_in_epochs=False)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    validation = _validation_states(fitter, ds, segment)
    timing = fitter.timings_.setdefault(segment.name, {"step_seconds": [], "wait_seconds": []})
    images = np.flatnonzero(np.isin(ds["image"].values, fitter.training_images_))
    batches = iter(trajectory_loader(ds, images, segment.start, segment.stop, fitter.batch_size,
                                     seed=_derived_seed(fitter.seed, segment.stage, segment.phase), first_step=first))
    bar = tqdm(total=segment.steps, initial=first, desc=segment.name, disable=not fitter.progress, leave=False)
    anneals = segment.stage == 1 and fitter.tf_anneal > 0
    try:
        for step in range(first, segment.steps):
            began = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - began
            batch = batch.to(fitter.device, non_blocking=True)
            scheduler.step_update(step)
            anneal = max(0.0, 1.0 - step / (fitter.tf_anneal * segment.steps)) if anneals else 0.0
            seed = _derived_seed(fitter.seed, segment.stage, segment.phase, step)
            generator = torch.Generator(batch.device).manual_seed(seed) if fitter.noise else None
            loss = segment_loss(model, batch, segment.start, segment.weights, fitter.groups_, anneal, fitter.noise, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, fitter.grad_clip)
            optimizer.step()
            timing["step_seconds"].append(time.perf_counter() - began)
            timing["wait_seconds"].append(waited)
            bar.update()
            done = step + 1
            if validation is not None and (done % fitter.validate_every == 0 or done == segment.steps):
                lr = optimizer.param_groups[0]["lr"]
                entry = {"stage": segment.stage, "block": segment.phase + 1, "step": done, "lr": lr,
                         "loss": loss.item(), "val_r2": _validate(model, validation, segment)}
                fitter.history_.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4g}", val_r2=f"{entry['val_r2']:.4f}")
            if done % fitter.checkpoint_every == 0 and done < segment.steps:
                checkpoint((segment.stage, segment.phase, done), optimizer)
    finally:
        bar.close()
        del batches  # stops the reader process


def _validation_states(fitter, ds: xr.Dataset, segment: Segment) -> torch.Tensor | None:
    """Layers start and stop of at most ``validation_images`` held-out images, (N, 2, T, D)."""
    rows = np.sort(np.random.default_rng(fitter.seed).permutation(fitter.validation_images_)[: fitter.validation_images])
    if rows.size == 0:
        return None
    hidden = ds["hidden"].sel(image=rows).isel(layer=[segment.start, segment.stop])
    return torch.from_numpy(np.asarray(hidden.values, dtype=np.float32)).to(fitter.device)


@torch.no_grad()
def _validate(model, validation: torch.Tensor, segment: Segment) -> float:
    """R² (teacher variance) of the rollout start -> stop at layer ``stop``, on held-out images."""
    return r2_score(model.run(validation[:, 0], segment.start, segment.stop)[-1], validation[:, 1])


def _derived_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")
