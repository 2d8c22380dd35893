"""Train a zoo ViT (timm's own VisionTransformer) on the digits or Fashion-MNIST, deterministically: ``dynamo train-zoo``."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import timm
import timm.data
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import CosineLRScheduler

from dynamo.progress import progress_bar
from dynamo.zoo import build_model, data
from dynamo.zoo.config import (  # noqa: F401  (the trainer's settings, re-exported)
    DATASET_DEFAULTS,
    IMG_SIZE,
    INPUT_SIZES,
    PATCH_SIZE,
    TrainConfig,
    checkpoint_list,
    config_for,
    configure_parser,
    default_name,
)


def architecture(config: TrainConfig) -> dict:
    """Keyword arguments of `VisionTransformer` for ``config``."""
    return {
        "img_size": INPUT_SIZES[config.dataset],
        "patch_size": PATCH_SIZE,
        "in_chans": 3,
        "num_classes": data.NUM_CLASSES,
        "global_pool": "token",
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "num_heads": config.num_heads,
        "mlp_ratio": config.mlp_ratio,
        "init_values": config.init_values,
        "class_token": True,
        "reg_tokens": config.registers,
        "drop_path_rate": config.drop_path_rate,
    }


def pretrained_cfg(mean: float, std: float, img_size: int = IMG_SIZE) -> dict:
    """timm's pretrained config of a zoo model (what ``resolve_data_config`` reads); ``mean``, ``std`` on the 0..1 scale."""
    return {
        "input_size": (3, img_size, img_size),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": (mean,) * 3,
        "std": (std,) * 3,
        "num_classes": data.NUM_CLASSES,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def set_drop_path(model: VisionTransformer, rates: list[float]) -> VisionTransformer:
    """Give block ``i`` of ``model`` stochastic-depth rate ``rates[i]`` (both its residual branches)."""
    for block, rate in zip(model.blocks, rates, strict=True):
        block.drop_path1 = DropPath(rate) if rate > 0 else torch.nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else torch.nn.Identity()
    return model


def drop_path_rates(model: VisionTransformer) -> list[float]:
    """The stochastic-depth rate of each block of ``model``, as its modules hold it."""
    return [round(float(getattr(block.drop_path1, "drop_prob", 0.0)), 6) for block in model.blocks]


def eval_transform(model: torch.nn.Module):
    """timm's eval transform for ``model``: PIL RGB image → float tensor (3, H, W) at its input size."""
    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


@torch.no_grad()
def predict(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Top-1 classes of transformed images (N, 3, H, W), in eval mode: int64 (N,)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(pixels[i : i + batch_size]).argmax(-1) for i in range(0, len(pixels), batch_size)])
    model.train(was_training)
    return out


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of ``predicted`` equal to ``labels``, rounded to 2 decimals."""
    return round(100 * int((predicted == labels).sum()) / len(labels), 2)


def evaluate(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent, rounded to 2 decimals, of (N, 3, H, W) transformed images against int64 labels (N,)."""
    return accuracy(predict(model, pixels, batch_size), labels)


def float16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode whose float32 weights are rounded to float16 values, as shipped."""
    rounded = copy.deepcopy(model).eval()
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return rounded


def augment(x: torch.Tensor, background: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation, zoom and shift of normalised images (B, C, H, W); uncovered pixels get ``background`` (C,)."""
    u = torch.rand(len(x), 4, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(config.max_rotation)
    scale = 1 + u[:, 1] * config.max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = u[:, 2:] * 2 * config.max_shift  # grid coordinates span 2 per image side
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    bg = background.view(1, -1, 1, 1)
    return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg


def schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int, min_lr: float) -> CosineLRScheduler:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``; ``step_update(step)`` before each."""
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=min_lr, warmup_t=warmup,
                             warmup_prefix=True, t_in_epochs=False)


@contextlib.contextmanager
def deterministic(seed: int, num_threads: int):
    """Seed python, numpy and torch, fix the thread count and require deterministic kernels (restored on exit)."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def train_model(
    config: TrainConfig,
    name: str | None = None,
    progress: bool = True,
    data_dir: str | Path | None = None,
    on_checkpoint: Callable[[VisionTransformer, dict], object] | None = None,
) -> tuple[VisionTransformer, dict]:
    """Train one zoo model and measure it on the held-out split; return it (eval mode, float16-exact values) and its card.

    ``name`` defaults to `default_name` of ``config``; ``data_dir`` holds the Fashion-MNIST idx files (default
    `data.FASHION_DIR`). ``on_checkpoint(model, card)`` is called after each epoch of ``config.checkpoint_epochs``
    with a float16-rounded eval copy and its card (name ``<name>-e<epoch>``); training is the same either way.
    The card lacks the ``weights`` entry, which `save_model` adds.
    """
    name = name or default_name(config)
    checkpoints = set(checkpoint_list(config)) if on_checkpoint is not None else set()
    started, paused = time.perf_counter(), 0.0
    with deterministic(config.seed, config.num_threads):
        split = data.load_split(config.dataset, data_dir)
        train_index = split["train"][: config.train_limit]
        mean, std = data.pixel_stats(split["pixels"][split["train"]])
        model = build_model(architecture(config), pretrained_cfg(mean, std, INPUT_SIZES[config.dataset]))
        if config.drop_path_schedule == "uniform":
            set_drop_path(model, [config.drop_path_rate] * config.depth)
        transform = eval_transform(model)
        x = data.png_tensors(split["pixels"][train_index], transform)
        y = torch.from_numpy(split["labels"][train_index])
        background = -torch.tensor(model.pretrained_cfg["mean"]) / torch.tensor(model.pretrained_cfg["std"])
        test = {}  # the held-out images as tensors, made when first needed

        def card_of(net: VisionTransformer, epoch: int, wall: float) -> dict:
            if not test:
                test["x"] = data.png_tensors(split["pixels"][split["test"]], eval_transform(net))
                test["y"] = torch.from_numpy(split["labels"][split["test"]])
                bundled = data.bundled_test(split, config.dataset)
                test["bundled"] = torch.from_numpy(np.searchsorted(split["test"], bundled))
            predicted = predict(net, test["x"])
            scores = {
                "test_accuracy": accuracy(predicted, test["y"]),
                "bundled_test_accuracy": accuracy(predicted[test["bundled"]], test["y"][test["bundled"]]),
            }
            if checkpoint_list(config):  # an over-training series: the training-subset accuracy too
                scores["train_accuracy"] = accuracy(predict(net, x), y)
            card = make_card(config, name, net, split, len(y), epoch, scores, wall)
            if epoch < config.epochs:
                card["name"] = f"{name}-e{epoch}"
                card["checkpoint"] = {"of": name, "epoch": epoch, "of_epochs": config.epochs}
            return card

        decay, no_decay = [], []
        for param_name, param in model.named_parameters():
            skip = param.ndim <= 1 or param_name in {"cls_token", "reg_token", "pos_embed"}
            (no_decay if skip else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
        )
        generator = torch.Generator().manual_seed(config.seed)
        steps_per_epoch = math.ceil(len(y) / config.batch_size)
        total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
        scheduler = schedule(optimizer, total, warmup, config.min_lr)
        bar = progress_bar(total=total, desc=name, unit="step", enabled=progress)
        model.train()
        step = 0
        jitter = bool(config.max_shift or config.max_rotation or config.max_scale)
        for epoch in range(config.epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), config.batch_size):
                batch = order[start : start + config.batch_size]
                scheduler.step_update(step)
                logits = model(augment(x[batch], background, config, generator) if jitter else x[batch])
                loss = F.cross_entropy(logits, y[batch], label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            if epoch + 1 in checkpoints:
                wall, pause_started = time.perf_counter() - started - paused, time.perf_counter()
                snapshot = float16_copy(model)
                on_checkpoint(snapshot, card_of(snapshot, epoch + 1, wall))
                paused += time.perf_counter() - pause_started
        bar.close()
        wall = time.perf_counter() - started - paused

        model = float16_copy(model)
        card = card_of(model, config.epochs, wall)
    return model, card


def make_card(
    config: TrainConfig,
    name: str,
    model: VisionTransformer,
    split: dict,
    n_train: int,
    epoch: int,
    scores: dict,
    wall: float,
) -> dict:
    """The card of ``model`` after ``epoch`` of ``config.epochs`` epochs on ``n_train`` images.

    ``scores``: ``test_accuracy``, ``bundled_test_accuracy`` (the shipped test images) and optionally ``train_accuracy``.
    """
    test_labels = split["labels"][split["test"]]
    return {
        "name": name,
        "architecture": {"class": "timm.models.vision_transformer.VisionTransformer", "kwargs": architecture(config)},
        "pretrained_cfg": model.pretrained_cfg,
        "data": {
            "dataset": config.dataset,
            **data.SOURCES[config.dataset],
            "split": data.split_record(split, dataset=config.dataset),
            "n_train_used": int(n_train),
            "n_bundled_test": int(len(data.bundled_test(split, config.dataset))),
        },
        "drop_path_rate": config.drop_path_rate,
        "drop_path_schedule": config.drop_path_schedule,
        "drop_path_rates": drop_path_rates(model),
        "seed": config.seed,
        "epochs": epoch,
        "registers": config.registers,
        "training": dataclasses.asdict(config),
        **scores,
        "chance_accuracy": round(100 / data.NUM_CLASSES, 2),
        "majority_class_accuracy": round(100 * np.bincount(test_labels).max() / len(test_labels), 2),
        "train_wall_time_s": round(wall, 1),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": config.num_threads},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save_model(model: torch.nn.Module, card: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``out/weights/<name>.safetensors`` (float16) and ``out/cards/<name>.json`` (with a ``weights`` entry); return both paths."""
    out = Path(out)
    weights = out / "weights" / f"{card['name']}.safetensors"
    card_path = out / "cards" / f"{card['name']}.json"
    weights.parent.mkdir(parents=True, exist_ok=True)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes several in random order, which would change the sha256
    save_file(state, str(weights), metadata={"format": "pt"})
    blob = weights.read_bytes()
    card = {
        **card,
        "weights": {
            "file": f"weights/{weights.name}",
            "dtype": "float16",
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
        },
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return weights, card_path


def config_from_card(card: dict) -> TrainConfig:
    """The `TrainConfig` a card was trained with."""
    return TrainConfig(**card["training"])


def run_from_args(args: argparse.Namespace) -> dict:
    """Train from parsed flags, write weights and card (and any checkpoints) under ``args.out``; return a summary dict with ``text``."""
    if args.from_card:
        from dynamo import zoo

        shipped = zoo.model_card(args.from_card)
        config = config_from_card(shipped)
        name = args.name or shipped.get("checkpoint", {}).get("of", shipped["name"])
    else:
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
        config = config_for(given.pop("dataset", "digits"), **given)
        name = args.name
    written = []

    def keep(model: VisionTransformer, card: dict) -> None:
        save_model(model, card, args.out)
        written.append(f"{card['name']} (test {card['test_accuracy']:.2f}%, train {card['train_accuracy']:.2f}%)")

    model, card = train_model(
        config, name=name, progress=not args.quiet, data_dir=getattr(args, "data", None), on_checkpoint=keep
    )
    weights, card_path = save_model(model, card, args.out)
    sha256 = json.loads(card_path.read_text())["weights"]["sha256"]
    held_out = {"digits": "digits", "fashion": "Fashion-MNIST test images"}[config.dataset]
    return {
        "name": card["name"],
        "test_accuracy": card["test_accuracy"],
        "chance_accuracy": card["chance_accuracy"],
        "train_wall_time_s": card["train_wall_time_s"],
        "weights": str(weights),
        "card": str(card_path),
        "sha256": sha256,
        "checkpoints": [entry.split(" ")[0] for entry in written],
        "text": (
            f"{card['name']}: test accuracy {card['test_accuracy']:.2f}% on {card['data']['split']['n_test']} "
            f"held-out {held_out} (chance {card['chance_accuracy']:.0f}%), "
            f"trained in {card['train_wall_time_s']:.0f} s\n"
            f"weights {weights}\ncard    {card_path}"
            + "".join(f"\ncheckpoint {entry}" for entry in written)
        ),
    }


if __name__ == "__main__":
    summary = run_from_args(configure_parser(argparse.ArgumentParser(prog="python -m dynamo.zoo.train")).parse_args())
    print(summary["text"])
