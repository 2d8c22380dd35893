"""The zoo trainer's settings and its command-line flags, importable without torch."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts the files
IMG_SIZE = 32  # the digits models' input side
PATCH_SIZE = 4
INPUT_SIZES = {"digits": IMG_SIZE, "fashion": 28}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that decides a zoo model: architecture, optimisation, augmentation, seed."""

    drop_path_rate: float = field(
        default=0.1,
        metadata={"help": "stochastic-depth rate p: of the last block (linear schedule) or of every block (uniform)"},
    )
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
    dataset: str = field(
        default="digits",
        metadata={"help": "training data: sklearn's 8x8 digits or Fashion-MNIST", "choices": ("digits", "fashion")},
    )
    drop_path_schedule: str = field(
        default="linear",
        metadata={
            "help": "stochastic depth over the blocks: timm's linear ramp from 0 to p, or p in every block",
            "choices": ("linear", "uniform"),
        },
    )
    checkpoint_epochs: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated epochs before the last (e.g. 10,20,40) after which to save NAME-e<EPOCH> too, "
            "with its own card"
        },
    )

    def __post_init__(self):
        if self.dataset not in INPUT_SIZES:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(INPUT_SIZES)}")
        if self.drop_path_schedule not in ("linear", "uniform"):
            raise ValueError(f"drop_path_schedule is 'linear' or 'uniform', not {self.drop_path_schedule!r}")
        bad = [e for e in checkpoint_list(self) if not 1 <= e < self.epochs]
        if bad:
            raise ValueError(
                f"checkpoint epochs {bad} are not within 1..{self.epochs - 1} (the last epoch is the model itself)"
            )


# What `config_for` (and the command line) changes from `TrainConfig`'s defaults for a dataset.
# Fashion-MNIST: sized for about 3.5 minutes a model on 2 CPU cores (~210 training images/s, so
# 4 passes over 10,000 images = 625 steps). In so short a training the model underfits, so there
# is no augmentation (it only slowed fitting) and a higher peak learning rate; see README.md.
DATASET_DEFAULTS = {
    "digits": {},
    "fashion": {
        "registers": 4,
        "drop_path_schedule": "uniform",
        "epochs": 4,
        "warmup_epochs": 1,
        "train_limit": 10000,
        "lr": 4e-3,
        "max_shift": 0.0,
        "max_rotation": 0.0,
        "max_scale": 0.0,
    },
}


def config_for(dataset: str = "digits", **settings) -> TrainConfig:
    """A `TrainConfig` with ``dataset``'s `DATASET_DEFAULTS`, overridden by ``settings``."""
    if dataset not in DATASET_DEFAULTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_DEFAULTS)}")
    return TrainConfig(**{**DATASET_DEFAULTS[dataset], **settings, "dataset": dataset})


def checkpoint_list(config: TrainConfig) -> list[int]:
    """The sorted epochs of ``config.checkpoint_epochs`` (empty when it is None or blank)."""
    text = (config.checkpoint_epochs or "").replace(" ", "")
    try:
        return sorted({int(part) for part in text.split(",") if part})
    except ValueError:
        raise ValueError(f"checkpoint_epochs is comma-separated integers, not {config.checkpoint_epochs!r}") from None


def default_name(config: TrainConfig) -> str:
    """``vit-<dataset>-p<p>``, with ``-reg<r>`` for register models and ``-s<seed>`` for nonzero seeds."""
    name = f"vit-{config.dataset}" + (f"-reg{config.registers}" if config.registers else "")
    name += f"-p{config.drop_path_rate}"
    return name + (f"-s{config.seed}" if config.seed else "")



def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the trainer's flags: one per `TrainConfig` field, plus --data, --out, --name, --from-card, --quiet.

    A training flag not given takes the chosen ``--dataset``'s default, so the namespace holds only those given.
    """
    kinds = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}
    for spec in dataclasses.fields(TrainConfig):
        differs = {
            d: v[spec.name] for d, v in DATASET_DEFAULTS.items() if v.get(spec.name, spec.default) != spec.default
        }
        shown = f"{spec.default}" + "".join(f"; {d}: {v}" for d, v in differs.items())
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=kinds[str(spec.type)],
            choices=spec.metadata.get("choices"),
            default=argparse.SUPPRESS,
            help=f"{spec.metadata['help']} (default: {shown})",
        )
    parser.add_argument(
        "--data", metavar="DIR", default=str(FASHION_DIR),
        help="folder of the four Fashion-MNIST *-ubyte.gz files (default: %(default)s, Debian's dataset-fashion-mnist)",
    )
    parser.add_argument("--out", default="zoo-out", help="writes OUT/weights/NAME.safetensors and OUT/cards/NAME.json")
    parser.add_argument("--name", help="model name; default vit-<dataset>[-reg<R>]-p<P>[-s<SEED>]")
    parser.add_argument(
        "--from-card",
        metavar="ZOO_NAME",
        help="take every training setting (and the name) from a shipped model's card; other training flags are ignored",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser
