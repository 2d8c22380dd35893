"""dynamo's own model zoo: small timm ViTs trained on digits and Fashion-MNIST, with cards and test images (see README.md here)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ZOO_PREFIX = "dynamo-zoo/"
DEFAULT_MODEL = "dynamo-zoo/vit-digits-reg4"

_HERE = Path(__file__).parent

__all__ = ["DEFAULT_MODEL", "ZOO_PREFIX", "build_model", "default_images", "fashion_images", "list_models", "load_zoo_model", "model_card",
           "natural_images", "weights_path"]


def list_models() -> list[str]:
    """Full names (``dynamo-zoo/...``) of the shipped models, sorted."""
    return sorted(ZOO_PREFIX + card.stem for card in (_HERE / "cards").glob("*.json"))


def _stem(name: str) -> str:
    stem = name.removeprefix(ZOO_PREFIX)
    if ZOO_PREFIX + stem not in list_models():
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(list_models())}")
    return stem


def model_card(name: str) -> dict:
    """The model card of a zoo model, with or without the ``dynamo-zoo/`` prefix; ValueError lists the shipped names."""
    return json.loads((_HERE / "cards" / f"{_stem(name)}.json").read_text())


def weights_path(name: str) -> Path:
    """The float16 safetensors file of a zoo model."""
    return _HERE / model_card(name)["weights"]["file"]


def build_model(arch: dict, cfg: dict):
    """A timm `VisionTransformer` from architecture kwargs, with ``cfg`` as its ``pretrained_cfg``."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**arch)
    model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return model


def load_zoo_model(name: str):
    """Build a zoo model from its card and load its sha256-checked shipped weights, in float32 and eval mode.

    Raises ValueError for an unknown name (listing the shipped models) or weights that do not match the card.
    """
    from safetensors.torch import load_file

    card = model_card(name)
    path = weights_path(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != card["weights"]["sha256"]:
        raise ValueError(f"{path} has sha256 {digest}, but its card says {card['weights']['sha256']}")
    model = build_model(card["architecture"]["kwargs"], card["pretrained_cfg"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def default_images(model: str | None = None) -> Path:
    """The held-out test images of ``model``'s training data (`fashion_images` or the test digits); the digits for any other model."""
    shipped = model is not None and ZOO_PREFIX + model.removeprefix(ZOO_PREFIX) in list_models()
    if shipped and model_card(model)["training"].get("dataset") == "fashion":
        return fashion_images()
    return _HERE / "images" / "digits-test"


def fashion_images() -> Path:
    """1,000 held-out Fashion-MNIST test images, 100 per class: ``<class index>/<index>.png``, 28×28 grayscale."""
    return _HERE / "images" / "fashion-test"


def natural_images() -> Path:
    """A flat folder of 64×64 RGB photographs from scikit-image (CC0 / public domain)."""
    return _HERE / "images" / "natural"
