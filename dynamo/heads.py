"""Which head turns a ViT's last layer into classes: the model's own (``"model"``), or a linear probe (``"probe"``).

A model without a classifier (timm ``num_classes=0``) has no logits; without a probe its accuracies are
absent with a note (`NO_HEAD`). A fitted probe's training images are never scored (`scored`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from dynamo.layout import token_layout
from dynamo.models import LoadedModel, unreadable_reason
from dynamo.progress import progress_bar

__all__ = ["HEAD_KINDS", "NO_HEAD", "NO_LABELS", "LinearHead", "NoHeadError", "has_classifier", "model_head_attrs", "resolve_head",
           "scored", "store_accuracy", "store_labels"]

HEAD_KINDS = ("model", "probe")
NO_HEAD = ("no accuracy: {model} has no classifier head (timm num_classes=0) and no probe was given; fit one on "
           "labelled images (class sub-folders) or pass a linear head on [cls ‖ patch mean]: --head FILE")
NO_LABELS = "no accuracy: the images have no labels (record a folder with class sub-folders)"


class NoHeadError(ValueError):
    """The model has no classifier head and no linear head is attached: there are no classes to predict."""


def has_classifier(module: nn.Module) -> bool:
    """Whether a timm model has a classifier of its own (``num_classes > 0``)."""
    return int(getattr(module, "num_classes", 0) or 0) > 0


def model_head_attrs(name: str, num_classes: int) -> dict:
    """The attrs an accuracy with the model's own head carries."""
    return {"accuracy_head": "model", "head_source": f"{name}'s own classifier ({num_classes} classes)"}


class LinearHead:
    """A linear head on ``[cls ‖ patch mean]`` of the last layer after the model's final norm (registers left out).

    ``train_fraction`` of a store's images (a stratified split) train it in `fit` (``max_iter`` lbfgs iterations of
    scikit-learn's `LogisticRegression`); the rest are scored.

    Attributes
    ----------
    weight_, bias_ : torch.Tensor
        (C, F) with F = (1 + has cls) * D, and (C,).
    classes_ : numpy.ndarray
        (C,) the label of each output (``arange(C)`` for a loaded file).
    train_images_, source_
        ``image`` values the head was fitted on (empty for a loaded file); where it came from, in words.
    """

    kind = "probe"

    def __init__(self, model: LoadedModel | nn.Module, train_fraction: float = 0.5, seed: int = 0,
                 max_iter: int = 2000, batch_size: int = 64):
        self.module = model.module if isinstance(model, LoadedModel) else model
        self.name = model.source if isinstance(model, LoadedModel) else type(self.module).__name__
        self.train_fraction, self.seed, self.max_iter, self.batch_size = train_fraction, seed, max_iter, batch_size
        self.layout = token_layout(self.module)

    @property
    def width(self) -> int:
        """F, the width of the head's input ``[cls ‖ patch mean]``."""
        return (1 + int(self.layout.has_cls)) * int(self.module.embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input (B, F) from last-layer states (B, T, D), after ``module.norm`` (or timm's ``fc_norm`` on each pooled part)."""
        normed = self.module.norm(x)
        parts = [normed[:, 0]] if self.layout.has_cls else []
        parts.append(normed[:, self.layout.num_prefix:].mean(dim=1))
        fc_norm = getattr(self.module, "fc_norm", None)
        if isinstance(self.module.norm, nn.Identity) and isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
            parts = [fc_norm(part) for part in parts]
        return torch.cat(parts, dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) last-layer states -> (B, C) logits, one column per `classes_`."""
        features = self.features(x)
        return features @ self.weight_.to(features).T + self.bias_.to(features)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) last-layer states -> (B,) predicted labels."""
        return torch.as_tensor(self.classes_, device=x.device)[self.logits(x).argmax(-1)]

    def describe(self) -> dict:
        """The attrs an accuracy with this head carries: kind, source and the images it was fitted on."""
        return {"accuracy_head": self.kind, "head_source": self.source_,
                "head_train_images": self.train_images_.tolist()}

    def fit(self, ds: xr.Dataset, progress: bool = False) -> LinearHead:
        """Fit a logistic-regression probe on a stratified, seeded split of a store's labelled images.

        The features are standardised for the fit and the scaling folded into ``weight_`` and ``bias_``. Raises ValueError
        for no labels, a class with a single image, or a store without every token.
        """
        labels = store_labels(ds)
        if labels is None:
            raise ValueError("cannot fit a probe: the store's images have no labels (record a folder with class sub-folders)")
        positions = np.arange(ds.sizes["image"])
        try:
            train, _ = train_test_split(positions, train_size=self.train_fraction, stratify=labels, random_state=self.seed)
        except ValueError as error:
            raise ValueError(f"cannot split the images for a probe ({error}); give every class at least 2 images") from None
        train = np.sort(train)
        features = _over_last_layer(self.features, self, ds, train, progress).numpy().astype(np.float64)
        scaler = StandardScaler().fit(features)
        fitted = LogisticRegression(max_iter=self.max_iter).fit(scaler.transform(features), labels[train])
        weight = fitted.coef_ / scaler.scale_
        bias = fitted.intercept_ - weight @ scaler.mean_
        if len(fitted.classes_) == 2:  # one decision function: logits (0, z) have z's argmax
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        self.weight_ = torch.as_tensor(weight, dtype=torch.float32)
        self.bias_ = torch.as_tensor(bias, dtype=torch.float32)
        self.classes_ = np.asarray(fitted.classes_)
        self.train_images_ = np.asarray(ds["image"].values)[train]
        self.source_ = (f"logistic regression on [cls ‖ patch mean] after the final norm, fitted on {train.size} of "
                        f"{positions.size} images (stratified split, train fraction {self.train_fraction}, seed {self.seed})")
        return self

    @classmethod
    def load(cls, path: str | Path, model: LoadedModel | nn.Module) -> LinearHead:
        """A head from a DINOv2-style ``*_linear_head.pth`` or ``.safetensors`` (``weight`` (C, F), ``bias`` (C,)); output c is class c.

        Torch files are read with ``weights_only=True``. Raises ValueError when the file holds no single
        weight/bias pair, or its width is not the model's F.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"head file {path} does not exist")
        try:
            tensors = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
            raise ValueError(f"cannot read head file {path}: {unreadable_reason(error)}; save the head's weight "
                             "(classes, F) and bias (classes,) with torch.save or safetensors") from None
        tensors = tensors.get("state_dict", tensors) if isinstance(tensors, dict) else {}
        tensors = {key: value for key, value in tensors.items() if isinstance(value, torch.Tensor)}
        weights = [key for key in tensors if key.split(".")[-1] == "weight"]
        biases = [key for key in tensors if key.split(".")[-1] == "bias"]
        if len(weights) != 1 or len(biases) != 1:
            raise ValueError(f"head file {path} should hold one linear layer (a weight and a bias tensor); it holds "
                             f"{sorted(tensors)[:6] or 'no tensors'}")
        weight, bias = tensors[weights[0]].float(), tensors[biases[0]].float()
        head = cls(model)
        view = "[cls ‖ patch mean]" if head.layout.has_cls else "the patch mean (the model has no cls token)"
        if weight.ndim != 2 or weight.shape[1] != head.width:
            raise ValueError(
                f"head file {path} has weight {tuple(weight.shape)}, but {head.name}'s head input {view} "
                f"is {head.width} wide: use a linear head of shape (classes, {head.width}) for this model"
            )
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"head file {path} has weight {tuple(weight.shape)} but bias {tuple(bias.shape)}: the bias "
                             f"needs one value per class, shape ({weight.shape[0]},)")
        if weight.shape[0] < 2:
            raise ValueError(f"head file {path} has {weight.shape[0]} class; a classifier needs at least 2")
        bad = [name for name, tensor in (("weight", weight), ("bias", bias)) if not torch.isfinite(tensor).all()]
        if bad:
            raise ValueError(f"head file {path}: its {' and '.join(bad)} hold NaN or infinite values; a head must be finite")
        head.weight_, head.bias_ = weight, bias
        head.classes_ = np.arange(weight.shape[0])
        head.train_images_ = np.array([], dtype=np.int64)
        head.source_ = f"linear head file {path.resolve()} on [cls ‖ patch mean] after the final norm"
        return head


def _over_last_layer(function, head: LinearHead, ds: xr.Dataset, positions: np.ndarray, progress: bool) -> torch.Tensor:
    """``function`` of the last stored layer of the images at ``positions``, a batch at a time, concatenated on the CPU."""
    _check_tokens(head, ds)
    parameter = next(head.module.parameters())
    last = ds["hidden"].isel(layer=-1)
    out = []
    with torch.no_grad():
        for begin in progress_bar(range(0, len(positions), head.batch_size), desc="probe", enabled=progress, leave=False):
            rows = positions[begin: begin + head.batch_size]
            x = torch.as_tensor(np.asarray(last.isel(image=rows).values), dtype=parameter.dtype, device=parameter.device)
            out.append(function(x).cpu())
    return torch.cat(out)


def _check_tokens(head: LinearHead, ds: xr.Dataset) -> None:
    """Raise unless the store keeps every token of the head's model (the patch mean needs them all)."""
    if ds.sizes["token"] != head.layout.num_tokens:
        raise ValueError(
            f"the store keeps {ds.sizes['token']} of {head.name}'s {head.layout.num_tokens} tokens; the head's patch "
            "mean needs every token: record without --patch-tokens"
        )


def _check_classes(head: LinearHead, ds: xr.Dataset, path) -> None:
    """Raise unless every label of the store is one of the head's outputs (output c is class c)."""
    labels = store_labels(ds)
    if labels is not None and labels.max() >= len(head.classes_):
        names = ds.attrs.get("label_names") or []
        raise ValueError(
            f"head file {path} has {len(head.classes_)} classes, but the store's labels go up to {labels.max()} "
            f"({len(np.unique(labels))} classes{': ' + ', '.join(map(str, names[:5])) + ', …' if names else ''}); "
            "use a head trained on these classes, or no --head (a probe is fitted on the labels)"
        )


def store_labels(ds: xr.Dataset) -> np.ndarray | None:
    """The images' integer labels, or None when the store has none (any -1) or only one class."""
    if "label" not in ds.coords:
        return None
    labels = np.asarray(ds["label"].values).astype(int)
    return labels if (labels >= 0).all() and len(np.unique(labels)) > 1 else None


def scored(head: LinearHead | None, images) -> np.ndarray:
    """(N,) bool: which of ``images`` (coordinate values) an accuracy with ``head`` may score (not a probe's training images)."""
    images = np.asarray(images)
    if head is None:
        return np.ones(images.shape, bool)
    return ~np.isin(images, head.train_images_)


def store_accuracy(ds: xr.Dataset, head: LinearHead | None = None, progress: bool = False) -> dict:
    """Accuracy of the recorded model on a store's images, from its last stored layer, and its head.

    Returns a dict: ``model_accuracy``, ``accuracy_images``, ``accuracy_head``, ``head_source`` (and a probe's
    ``head_train_images``); or ``accuracy_note`` without a head or labels.
    """
    labels = store_labels(ds)
    if labels is None:
        return {"accuracy_note": NO_LABELS}
    if head is not None:
        keep = scored(head, ds["image"].values)
        predicted = _over_last_layer(head.predict, head, ds, np.flatnonzero(keep), progress).numpy()
        attrs = head.describe()
        truth = labels[keep]
    elif "logits" in ds.data_vars:
        predicted = np.asarray(ds["logits"].values).argmax(axis=1)
        attrs = model_head_attrs(str(ds.attrs.get("model")), int(ds.sizes["class"]))
        truth = labels
    else:
        return {"accuracy_note": NO_HEAD.format(model=ds.attrs.get("model", "the model"))}
    return {"model_accuracy": float((predicted == truth).mean()), "accuracy_images": int(truth.size), **attrs}


def resolve_head(ds: xr.Dataset, model: LoadedModel | nn.Module, head_file: str | Path | None = None,
                 seed: int = 0, progress: bool = False) -> LinearHead | None:
    """The head a pipeline scores a store with: ``head_file``, else None for the model's own classifier, else a probe fitted on the store.

    None also when the model has no classifier and the store no labels (accuracies are then absent, with `NO_HEAD`).
    """
    if head_file is not None:
        loaded = LinearHead.load(head_file, model)
        _check_classes(loaded, ds, head_file)
        return loaded
    module = model.module if isinstance(model, LoadedModel) else model
    if has_classifier(module) or store_labels(ds) is None:
        return None
    return LinearHead(model, seed=seed).fit(ds, progress=progress)
