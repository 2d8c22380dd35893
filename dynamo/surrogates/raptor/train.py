"""The training loop of a Raptor fit (`RaptorFitter.fit`): stage 1 block by block, then stage 2, with AdamW and a cosine schedule.

Stage 1 trains one block per phase on its layer range, teacher forcing annealed into rollout; stage 2 all blocks
over 0 -> L. A segment stops at ``steps``, or earlier when `plateaued` on the early-stopping images. Draws come
from seeds of (seed, stage, range), so stage-1 blocks can be reused and a checkpointed fit resumes to the same weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from timm.scheduler import CosineLRScheduler

from dynamo.metrics import r2_score
from dynamo.progress import progress_bar
from dynamo.serialize import derived_seed, read_hidden
from dynamo.store import positions_of
from dynamo.surrogates.raptor.data import trajectory_loader
from dynamo.surrogates.raptor.io import load_block, load_checkpoint, save_block, save_checkpoint
from dynamo.surrogates.raptor.loss import PAPER_STAGE2_WEIGHTS, loss_weights, segment_loss, stage1_weights

__all__ = ["DONE", "Segment", "phase_runs", "plateaued", "segments", "stopping_rule", "train", "warmup_steps"]

DONE = (3, 0, 0)  # (stage, phase, step) of a finished fit
NOT_STAGE1 = ("k", "partition", "stage1_loss", "stage2_loss", "stage2_steps", "checkpoint_every", "stage1_cache")


@dataclass(frozen=True)
class Segment:
    """One training segment: stage 1 trains block ``phase`` (0-based) on layers start..stop, stage 2 all blocks on 0..L.

    A phase not contiguous in depth is trained on its ``runs`` (the layer ranges of its runs of consecutive blocks,
    each rolled out from its own start); empty for a contiguous phase.
    """

    stage: int
    phase: int
    start: int
    stop: int
    steps: int
    weights: dict | None  # token-kind loss weights (`dynamo.surrogates.raptor.loss.loss_weights`), None for MSE
    runs: tuple[tuple[int, int], ...] = ()

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The (start, stop) layer ranges trained: ``runs``, or the one range start..stop."""
        return list(self.runs) or [(self.start, self.stop)]

    @property
    def name(self) -> str:
        block = f" block {self.phase + 1}" if self.stage == 1 else ""
        return f"stage {self.stage}{block} layers {','.join(f'{a}->{b}' for a, b in self.ranges)}"


def phase_runs(phase: list[int]) -> tuple[tuple[int, int], ...]:
    """The layer ranges (b - 1, e) of a phase's maximal runs of consecutive blocks b..e; () when it is one run."""
    cuts = [i for i in range(1, len(phase)) if phase[i] != phase[i - 1] + 1]
    runs = tuple((run[0] - 1, run[-1]) for run in np.split(np.asarray(phase), cuts))
    return () if len(runs) == 1 else tuple((int(a), int(b)) for a, b in runs)


def segments(fitter) -> list[Segment]:
    """The segments of a `RaptorFitter`'s recipe with any steps, in training order."""
    partition = fitter.partition_
    weights = stage1_weights(fitter.stage1_loss, len(partition))
    if fitter.step_budget not in ("segment", "layer"):
        raise ValueError(f"step_budget must be 'segment' or 'layer', got {fitter.step_budget!r}")
    per_layer = fitter.step_budget == "layer"
    stage1 = [Segment(1, index, phase[0] - 1, phase[-1], fitter.steps * (len(phase) if per_layer else 1), weights[index],
                      phase_runs(phase)) for index, phase in enumerate(partition)]
    steps = fitter.steps if fitter.stage2_steps is None else fitter.stage2_steps
    stage2 = Segment(2, 0, 0, fitter.model_.num_layers, steps, loss_weights(fitter.stage2_loss, PAPER_STAGE2_WEIGHTS))
    return [segment for segment in [*stage1, stage2] if segment.steps]


def warmup_steps(fitter, steps: int) -> int:
    """Warmup steps of a segment of ``steps``: ``warmup`` itself from 1 up, a fraction of ``steps`` below 1."""
    return int(fitter.warmup) if fitter.warmup >= 1 else int(fitter.warmup * steps)


def plateaued(fitter, segment: Segment, entries: list[dict]) -> bool:
    """Whether a segment stops early, by the rule `stopping_rule` states, on its validation ``entries``."""
    if not fitter.patience:
        return False
    settled = max(warmup_steps(fitter, segment.steps), fitter.tf_anneal * segment.steps if segment.stage == 1 else 0)
    scores = [entry["val_r2"] for entry in entries if entry["step"] > settled]
    if len(scores) <= fitter.patience:
        return False
    return max(scores[-fitter.patience:]) <= max(scores[: -fitter.patience]) + fitter.tol


def stopping_rule(fitter) -> str:
    """`plateaued`'s rule with a fitter's numbers, in words."""
    unit = "block of a stage-1 segment's phase" if fitter.step_budget == "layer" else "stage-1 segment"
    steps = f"at most {fitter.steps} steps per {unit}" + (
        f" and {fitter.stage2_steps} in stage 2" if fitter.stage2_steps is not None else " and in stage 2")
    if not fitter.patience:
        return f"fixed step count: {steps.removeprefix('at most ')} (patience 0)"
    return (f"{steps}; a segment stops earlier once its last {fitter.patience} validations (every "
            f"{fitter.validate_every} steps: R² at the segment's end layer on up to {fitter.validation_images} "
            f"early-stopping images from the training split, disjoint from the scored ones), after warmup and teacher-forcing anneal, gain no more than {fitter.tol:g} over "
            "the best one before them")


def train(fitter, ds: xr.Dataset, identity: dict) -> None:
    """Train ``fitter.model_`` by the fitter's recipe, resuming from its ``checkpoint_dir``; fills ``history_`` and ``timings_``.

    ``identity`` is what a checkpoint must share with this fit to be resumed.
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
        kept = _block_key(identity, segment) if segment.stage == 1 and fitter.stage1_cache is not None else None
        history = None if kept is None or first else load_block(fitter.stage1_cache, kept, fitter.model_.blocks[segment.phase])
        if history is not None:
            fitter.history_ += [{**entry, "block": segment.phase + 1, "reused": True} for entry in history]
        else:
            _train_segment(fitter, ds, segment, first, optimizer_state if first else None, checkpoint)
            if kept is not None:
                entries = [e for e in fitter.history_ if (e["stage"], e["block"]) == (1, segment.phase + 1)]
                save_block(fitter.stage1_cache, kept, fitter.model_.blocks[segment.phase], entries)
        checkpoint((1, segment.phase + 1, 0) if segment.stage == 1 else DONE)


def _block_key(identity: dict, segment: Segment) -> dict:
    """What a kept stage-1 block must share with a segment to stand for its training."""
    params = {name: value for name, value in identity["params"].items() if name not in NOT_STAGE1}
    if params.get("init") is not None:  # the block starts from its own phase's teacher block only
        params["init"] = params["init"][segment.phase]
    runs = {"runs": [list(run) for run in segment.runs]} if segment.runs else {}
    return {**identity, "params": params, "segment": [segment.start, segment.stop, segment.steps], "weights": segment.weights, **runs}


def _train_segment(fitter, ds: xr.Dataset, segment: Segment, first: int, optimizer_state, checkpoint) -> None:
    model = fitter.model_
    params = list((model.blocks[segment.phase] if segment.stage == 1 else model).parameters())
    optimizer = torch.optim.AdamW(params, lr=fitter.lr, weight_decay=fitter.weight_decay)
    warmup = warmup_steps(fitter, segment.steps)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, segment.steps - warmup), lr_min=fitter.min_lr,
                                  warmup_t=warmup, warmup_prefix=True, t_in_epochs=False)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    validation = _validation_states(fitter, ds, segment)
    timing = fitter.timings_.setdefault(segment.name, {"step_seconds": [], "wait_seconds": []})
    images = positions_of(ds, fitter.training_images_)
    span = (segment.stage, segment.start, segment.stop)
    batches = iter(trajectory_loader(ds, images, segment.start, segment.stop, fitter.batch_size,
                                     seed=derived_seed(fitter.seed, *span), first_step=first))
    bar = progress_bar(total=segment.steps, initial=first, desc=segment.name, enabled=fitter.progress, leave=False)
    anneals = segment.stage == 1 and fitter.tf_anneal > 0
    floor = fitter.tf_floor if segment.stage == 1 else 0.0
    entries = [e for e in fitter.history_ if (e["stage"], e["block"]) == (segment.stage, segment.phase + 1)]
    try:
        for step in range(first, segment.steps):
            began = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - began
            batch = batch.to(fitter.device, non_blocking=True)
            scheduler.step_update(step)
            anneal = max(floor, 1.0 - (1.0 - floor) * step / (fitter.tf_anneal * segment.steps)) if anneals else floor
            generator = torch.Generator(batch.device).manual_seed(derived_seed(fitter.seed, *span, step)) if fitter.noise else None
            loss = segment_loss(model, batch, segment.start, segment.weights, fitter.groups_, anneal, fitter.noise, generator,
                                segment.ranges)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, fitter.grad_clip)
            optimizer.step()
            timing["step_seconds"].append(time.perf_counter() - began)
            timing["wait_seconds"].append(waited)
            bar.update()
            done = step + 1
            stop = False
            if validation is not None and (done % fitter.validate_every == 0 or done == segment.steps):
                lr = optimizer.param_groups[0]["lr"]
                entry = {"stage": segment.stage, "block": segment.phase + 1, "step": done, "lr": lr,
                         "loss": loss.item(), "val_r2": _validate(model, validation, segment)}
                entries.append(entry)
                stop = done < segment.steps and plateaued(fitter, segment, entries)
                if stop:
                    entry["stop"] = f"plateau after {done} of {segment.steps} steps"
                fitter.history_.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4g}", val_r2=f"{entry['val_r2']:.4f}")
            if stop:
                break
            if done % fitter.checkpoint_every == 0 and done < segment.steps:
                checkpoint((segment.stage, segment.phase, done), optimizer)
    finally:
        bar.close()
        del batches  # stops the reader process


def _validation_states(fitter, ds: xr.Dataset, segment: Segment) -> torch.Tensor | None:
    """The start and stop layers of each range on the fit's early-stopping images, (N, 2 × ranges, T, D)."""
    if fitter.stopping_images_.size == 0:
        return None
    rows = positions_of(ds, fitter.stopping_images_)
    return read_hidden(ds["hidden"], rows, fitter.device, layer=[layer for run in segment.ranges for layer in run])


@torch.no_grad()
def _validate(model, validation: torch.Tensor, segment: Segment) -> float:
    """R² (teacher variance) of the rollout start -> stop at layer ``stop``, on early-stopping images; the mean over a phase's ranges."""
    return float(np.mean([r2_score(model.run(validation[:, 2 * i], a, b)[-1], validation[:, 2 * i + 1])
                          for i, (a, b) in enumerate(segment.ranges)]))
