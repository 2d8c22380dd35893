"""Train a zoo ViT on the digits: timm's own VisionTransformer, deterministic given the seed, on CPU.

The model is ``timm.models.vision_transformer.VisionTransformer`` (12 blocks, class token,
optional register tokens) on 32×32 RGB inputs in 4×4 patches. Its ``pretrained_cfg`` makes
``timm.data.resolve_data_config({}, model=model)`` give the transform it was trained with, so
the rest of dynamo preprocesses its images like any timm model's. Training inputs are the
training split's PNGs through that very transform, with small random affine jitter.

Command line: ``dynamo train-zoo`` (or ``python -m dynamo.zoo.train``), e.g. ::

    dynamo train-zoo --drop-path-rate 0.2 --seed 0 --out my-zoo
    dynamo train-zoo --from-card vit-digits-reg4 --out dynamo/zoo   # rebuild a shipped model
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import timm
import timm.data
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from dynamo.zoo import data

IMG_SIZE = 32
PATCH_SIZE = 4


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that decides a zoo model: architecture, optimisation, augmentation, seed."""

    drop_path_rate: float = field(default=0.1, metadata={"help": "stochastic-depth rate p of the last block"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, shuffling, augmentation, drop-path"})
    epochs: int = field(default=30, metadata={"help": "passes over the training split"})
    registers: int = field(default=0, metadata={"help": "register tokens (0 = class token only)"})
    embed_dim: int = field(default=64, metadata={"help": "token width"})
    depth: int = field(default=12, metadata={"help": "transformer blocks"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width / token width"})
    init_values: float = field(default=0.1, metadata={"help": "LayerScale initial value (0: no LayerScale)"})
    batch_size: int = field(default=64, metadata={"help": "images per optimiser step"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    min_lr: float = field(default=1e-5, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_epochs: int = field(default=5, metadata={"help": "epochs of linear warm-up"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on norms, biases, embeddings)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "cross-entropy label smoothing"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping threshold"})
    max_shift: float = field(default=0.1, metadata={"help": "random shift, fraction of the image side"})
    max_rotation: float = field(default=10.0, metadata={"help": "random rotation, degrees"})
    max_scale: float = field(default=0.1, metadata={"help": "random zoom, relative"})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads (fixed, for determinism)"})
    train_limit: int | None = field(default=None, metadata={"help": "train on the first N training images only"})


def default_name(config: TrainConfig) -> str:
    """``vit-digits-p<p>``, with ``-reg<r>`` for register models and ``-s<seed>`` for nonzero seeds."""
    name = "vit-digits" + (f"-reg{config.registers}" if config.registers else "") + f"-p{config.drop_path_rate}"
    return name + (f"-s{config.seed}" if config.seed else "")


def architecture(config: TrainConfig) -> dict:
    """Keyword arguments of `VisionTransformer` for ``config``."""
    return {
        "img_size": IMG_SIZE,
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


def pretrained_cfg(mean: float, std: float) -> dict:
    """timm's pretrained config of a zoo model: what ``resolve_data_config`` reads.

    Parameters
    ----------
    mean, std : float
        Pixel statistics of the training split on the 0..1 scale, used for all three channels.
    """
    return {
        "input_size": (3, IMG_SIZE, IMG_SIZE),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": (mean,) * 3,
        "std": (std,) * 3,
        "num_classes": data.NUM_CLASSES,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def build_model(arch: dict, cfg: dict) -> VisionTransformer:
    """A `VisionTransformer` from architecture kwargs, with ``cfg`` as its ``pretrained_cfg``."""
    model = VisionTransformer(**arch)
    model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return model


def eval_transform(model: torch.nn.Module):
    """timm's eval transform for ``model``: PIL RGB image → float tensor (3, 32, 32)."""
    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


@torch.no_grad()
def evaluate(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent, rounded to 2 decimals.

    Parameters
    ----------
    pixels : torch.Tensor
        Transformed images, shape (N, 3, H, W).
    labels : torch.Tensor
        int64 classes, shape (N,).
    """
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(pixels[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    model.train(was_training)
    return round(100 * correct / len(labels), 2)


def augment(x: torch.Tensor, background: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation, zoom and shift of each image; uncovered pixels get ``background``.

    Parameters
    ----------
    x : torch.Tensor
        Normalised images, shape (B, C, H, W).
    background : torch.Tensor
        The normalised value of a black pixel, shape (C,).
    """
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
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to ``min_lr`` at step ``total``.

    Call ``step_update(step)`` before update ``step`` (0-based): the warm-up takes 0, lr / W, ...,
    each one step behind the trainer's former schedule (which began at lr / W); the decay is
    the same, to rounding.
    """
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=min_lr, warmup_t=warmup,
                             warmup_prefix=True, t_in_epochs=False)


@contextlib.contextmanager
def deterministic(seed: int, num_threads: int):
    """Seed python, numpy and torch, fix the thread count and require deterministic kernels.

    The thread count and the deterministic-algorithms flag are restored on exit.
    """
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


def train_model(config: TrainConfig, name: str | None = None, progress: bool = True) -> tuple[VisionTransformer, dict]:
    """Train one zoo model and measure it on the held-out split.

    The returned weights are rounded to float16 and back, as they are shipped, and the card's
    test accuracy is measured on exactly those weights, through PNG → PIL RGB → timm transform.

    Parameters
    ----------
    config : TrainConfig
        All settings.
    name : str, optional
        Zoo name without prefix; default `default_name` of ``config``.
    progress : bool
        Show a tqdm progress bar (on stderr).

    Returns
    -------
    model : VisionTransformer
        Trained, in eval mode, float32 holding float16-exact values.
    card : dict
        The model card without the ``weights`` entry, which `save_model` adds.
    """
    name = name or default_name(config)
    started = time.perf_counter()
    with deterministic(config.seed, config.num_threads):
        split = data.digits_split()
        train_index = split["train"][: config.train_limit]
        mean, std = data.pixel_stats(split["pixels"][split["train"]])
        model = build_model(architecture(config), pretrained_cfg(mean, std))
        transform = eval_transform(model)
        x = data.png_tensors(split["pixels"][train_index], transform)
        y = torch.from_numpy(split["labels"][train_index])
        background = -torch.tensor(model.pretrained_cfg["mean"]) / torch.tensor(model.pretrained_cfg["std"])

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
        bar = tqdm(total=total, desc=name, unit="step", disable=not progress, file=sys.stderr)
        model.train()
        step = 0
        for epoch in range(config.epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), config.batch_size):
                batch = order[start : start + config.batch_size]
                scheduler.step_update(step)
                logits = model(augment(x[batch], background, config, generator))
                loss = F.cross_entropy(logits, y[batch], label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        bar.close()
        wall = time.perf_counter() - started

        model.eval()
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        test_pixels = data.png_tensors(split["pixels"][split["test"]], eval_transform(model))
        accuracy = evaluate(model, test_pixels, torch.from_numpy(split["labels"][split["test"]]))
    test_labels = split["labels"][split["test"]]
    card = {
        "name": name,
        "architecture": {"class": "timm.models.vision_transformer.VisionTransformer", "kwargs": architecture(config)},
        "pretrained_cfg": model.pretrained_cfg,
        "data": {**data.DATA_SOURCE, "split": data.split_record(split), "n_train_used": int(len(y))},
        "drop_path_rate": config.drop_path_rate,
        "seed": config.seed,
        "epochs": config.epochs,
        "registers": config.registers,
        "training": dataclasses.asdict(config),
        "test_accuracy": accuracy,
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
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return model, card


def save_model(model: torch.nn.Module, card: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``out/weights/<name>.safetensors`` (float16) and ``out/cards/<name>.json``.

    The card gains a ``weights`` entry: file, dtype, size in bytes and sha256 of the file.

    Returns
    -------
    weights, card : pathlib.Path
        The two files written.
    """
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


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the trainer's flags: one per `TrainConfig` field, plus --out, --name, --from-card, --quiet."""
    for spec in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "int | None": int}[str(spec.type)]
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=kind,
            default=spec.default,
            help=f"{spec.metadata['help']} (default: {spec.default})",
        )
    parser.add_argument("--out", default="zoo-out", help="writes OUT/weights/NAME.safetensors and OUT/cards/NAME.json")
    parser.add_argument("--name", help="model name; default vit-digits[-reg<R>]-p<P>[-s<SEED>]")
    parser.add_argument(
        "--from-card",
        metavar="ZOO_NAME",
        help="take every training setting (and the name) from a shipped model's card; other training flags are ignored",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_card(card: dict) -> TrainConfig:
    """The `TrainConfig` a card was trained with."""
    return TrainConfig(**card["training"])


def run_from_args(args: argparse.Namespace) -> dict:
    """Train from parsed flags, write weights and card under ``args.out``, and summarise.

    Returns
    -------
    dict
        ``name``, ``test_accuracy`` (percent), ``chance_accuracy``, ``train_wall_time_s``,
        ``weights`` and ``card`` (paths), ``sha256``, and ``text``, a one-paragraph summary.
    """
    if args.from_card:
        from dynamo import zoo

        shipped = zoo.model_card(args.from_card)
        config, name = config_from_card(shipped), args.name or shipped["name"]
    else:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
        name = args.name
    model, card = train_model(config, name=name, progress=not args.quiet)
    weights, card_path = save_model(model, card, args.out)
    sha256 = json.loads(card_path.read_text())["weights"]["sha256"]
    return {
        "name": card["name"],
        "test_accuracy": card["test_accuracy"],
        "chance_accuracy": card["chance_accuracy"],
        "train_wall_time_s": card["train_wall_time_s"],
        "weights": str(weights),
        "card": str(card_path),
        "sha256": sha256,
        "text": (
            f"{card['name']}: test accuracy {card['test_accuracy']:.2f}% on {card['data']['split']['n_test']} "
            f"held-out digits (chance {card['chance_accuracy']:.0f}%), trained in {card['train_wall_time_s']:.0f} s\n"
            f"weights {weights}\ncard    {card_path}"
        ),
    }


if __name__ == "__main__":
    summary = run_from_args(configure_parser(argparse.ArgumentParser(prog="python -m dynamo.zoo.train")).parse_args())
    print(summary["text"])
