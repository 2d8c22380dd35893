"""Which head turns a ViT's last layer into classes: the model's own, or a linear probe.

Every accuracy in dynamo is an argmax over a head's logits, and says which head that was:

- ``"model"``: the model's own final norm, pooling and classifier (timm ``forward_head``), for
  models that have one (timm ``num_classes > 0``);
- ``"probe"``: a `LinearHead`, the paper's head: a linear map of ``[cls ‖ mean of the patch
  tokens]`` of the last layer after the model's final norm (``module.norm``, or timm's
  ``fc_norm`` on the pooled parts; registers and a distillation token are left out; a model
  without a cls token uses the patch mean alone). It
  is fitted on a labelled, stratified, seeded split of a store's images (`LinearHead.fit`), or
  loaded from a file (`LinearHead.load`: a DINOv2-style ``*_linear_head.pth`` with ``weight``
  and ``bias``).

A model without a classifier (DINOv2, CLIP/SigLIP image towers, MAE: timm ``num_classes=0``)
has no logits: ``forward_head`` returns pooled features, and an argmax over those is no class.
Without a probe, such a model's accuracies are absent and a one-line note (`NO_HEAD`) says why.

A fitted probe's training images are never scored: accuracies with a probe are measured on the
other images only (`scored`), and results record how many.
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

__all__ = [
    "HEAD_KINDS",
    "NO_HEAD",
    "NO_LABELS",
    "LinearHead",
    "NoHeadError",
    "has_classifier",
    "model_head_attrs",
    "resolve_head",
    "scored",
    "store_accuracy",
    "store_labels",
]

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
    """A linear head on ``[cls ‖ patch mean]`` of the last layer after the model's final norm.

    Parameters
    ----------
    model : LoadedModel or torch.nn.Module
        The timm ViT whose final norm and token layout the head reads (not modified).
    train_fraction : float
        Share of a store's images `fit` trains on (a stratified split); the rest are scored.
    seed : int
        Seed of the split.
    max_iter : int
        Iterations of scikit-learn's `LogisticRegression` (lbfgs).
    batch_size : int
        Images per forward of the final norm while reading a store.

    Attributes
    ----------
    weight_ : torch.Tensor
        (C, F) with F = (1 + has cls) * D.
    bias_ : torch.Tensor
        (C,).
    classes_ : numpy.ndarray
        (C,) the label of each output (``arange(C)`` for a loaded file).
    train_images_ : numpy.ndarray
        ``image`` coordinate values the head was fitted on (empty for a loaded file).
    source_ : str
        Where the head came from, in words.

    Examples
    --------
    >>> head = LinearHead(dynamo.load_model("vit_small_patch14_reg4_dinov2")).fit(ds)
    >>> head.predict(states_at_layer_L)                  # (B,) labels
    >>> head = LinearHead.load("dinov2_vits14_reg4_linear_head.pth", model)
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
        """The head's input from last-layer states: (B, T, D) -> (B, F), after the final norm.

        The final norm is ``module.norm`` on every token; a model that norms after pooling
        instead (timm's ``fc_norm``, with ``norm`` the identity) gets it on each pooled part.
        """
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

    # ---- fitting and loading ------------------------------------------------------------

    def fit(self, ds: xr.Dataset, progress: bool = False) -> LinearHead:
        """Fit a logistic-regression probe on a stratified, seeded split of a store's labelled images.

        The features are standardised for the fit and the scaling folded back into ``weight_``
        and ``bias_``, so the head is one linear map of the raw features.

        Parameters
        ----------
        ds : xarray.Dataset
            A trajectory store of this model with labels, every token and its last layer.
        progress : bool

        Raises
        ------
        ValueError
            No labels, a class with a single image, or a store without every token.
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
        """A head from a file: a DINOv2-style ``*_linear_head.pth`` (``weight`` (C, F), ``bias`` (C,)).

        Torch files are read with ``weights_only=True`` (never unpickled); ``.safetensors`` too.
        Output c is class c (compared with the store's ``label`` as is).

        Raises
        ------
        ValueError
            The file holds no single weight/bias pair, or its width is not the model's F.
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
    """``function`` (a head's ``features`` or ``predict``) of the last stored layer of the images at
    ``positions``, a batch at a time, concatenated on the CPU."""
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
    """Which of ``images`` (``image`` coordinate values) an accuracy with ``head`` may score: all
    but a fitted probe's training images. (N,) bool."""
    images = np.asarray(images)
    if head is None:
        return np.ones(images.shape, bool)
    return ~np.isin(images, head.train_images_)


def store_accuracy(ds: xr.Dataset, head: LinearHead | None = None, progress: bool = False) -> dict:
    """Accuracy of the recorded model on a store's images, from its last stored layer, and its head.

    With ``head``, the probe's predictions on the images it was not fitted on; without, the
    stored ``logits`` of the model's own head; with neither (a headless model) or without
    labels, no accuracy but a note.

    Returns
    -------
    dict
        ``model_accuracy``, ``accuracy_images`` (how many were scored), ``accuracy_head``
        (``model`` / ``probe``), ``head_source`` (and a probe's ``head_train_images``); or
        ``accuracy_note``.
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
    """The head a pipeline scores a store with: a file, else the model's own, else a probe fitted on the store.

    Returns
    -------
    LinearHead or None
        The head loaded from ``head_file``; None when the model has a classifier (its own head is
        used) or when it has none and the store has no labels (accuracies are then absent, with
        `NO_HEAD`); otherwise a `LinearHead` fitted on the store with ``seed``.
    """
    if head_file is not None:
        loaded = LinearHead.load(head_file, model)
        _check_classes(loaded, ds, head_file)
        return loaded
    module = model.module if isinstance(model, LoadedModel) else model
    if has_classifier(module) or store_labels(ds) is None:
        return None
    return LinearHead(model, seed=seed).fit(ds, progress=progress)
