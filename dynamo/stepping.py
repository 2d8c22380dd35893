"""Run a live timm ViT one piece at a time: embedding, any block, final norm and head.

Perturbation experiments, layer swaps and Raptor evaluation all need to enter the residual
stream at some layer, change it, and carry on through the model's own remaining blocks.
`BlockStepper` does that for any timm ViT-family model, with the layer numbering of the
trajectory store: layer 0 is the input to the first block, layer l the output of block l.

The extra arguments a model passes to its blocks (EVA's rotary embedding, an attention mask)
are captured once from the model's own forward on a blank image of its input size, and passed
to every block in the same way, so no per-architecture code is needed. (They assume every image
has the model's default input size, as the recorder's preprocessing gives.)

The head is part of stepping: `BlockStepper.head` gives logits from the last layer with the
model's own classifier, or with a `dynamo.heads.LinearHead` attached for a model that has none
(timm ``num_classes=0``), and is None when there is neither, so that no code can take an argmax
over pooled features and call it a class (`BlockStepper.predict` then raises `NoHeadError`).

`propagator_for` is the one place that turns a model into what the live-model analyses push
states through: a `LoadedModel` or timm module becomes a `BlockStepper`; anything else with
``run(x, start, stop)`` and ``head`` (a fitted Raptor) is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import xarray as xr
from torch import nn

from dynamo.heads import (
    NO_HEAD,
    LinearHead,
    NoHeadError,
    has_classifier,
    model_head_attrs,
)
from dynamo.layout import check_is_vit
from dynamo.models import LoadedModel, data_config

__all__ = ["BlockStepper", "propagator_for", "rollout"]


def rollout(step, x: torch.Tensor, start: int, stop: int | None, num_layers: int, block_for=None, noise: float = 0.0,
            generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Autoregressive states from layer ``start`` to ``stop``, one ``step(x, layer, block)`` per layer.

    Parameters
    ----------
    step : callable
        ``step(x, layer, block)``: the state at ``layer`` from the one before (``block`` None: the routed one).
    x : torch.Tensor
        (B, T, D), the state at layer ``start``.
    start, stop : int
        0 <= start <= stop <= num_layers; ``stop`` None is ``num_layers``.
    num_layers : int
    block_for : callable or sequence, optional
        1-based block producing each layer: ``block_for(layer)`` or ``block_for[layer - 1]``.
    noise : float
        Standard deviation of Gaussian noise added to each step's input (drawn from ``generator``).

    Returns
    -------
    list of torch.Tensor
        ``stop - start + 1`` states, layers ``start..stop``; the first is ``x``.
    """
    stop = num_layers if stop is None else stop
    if not 0 <= start <= stop <= num_layers:
        raise ValueError(f"need 0 <= start <= stop <= {num_layers}, got {start}, {stop}")
    states = [x]
    for layer in range(start + 1, stop + 1):
        inp = states[-1]
        if noise:
            inp = inp + noise * torch.randn(inp.shape, generator=generator, dtype=inp.dtype, device=inp.device)
        block = None if block_for is None else block_for(layer) if callable(block_for) else block_for[layer - 1]
        states.append(step(inp, layer, block))
    return states


class _Embedded(Exception):
    """Raised from a pre-hook on the first block to stop the forward once layer 0 exists."""


class BlockStepper:
    """A timm ViT split into embedding, blocks and head, in the trajectory store's layer numbers.

    Parameters
    ----------
    model : LoadedModel or torch.nn.Module
        A timm ViT-family model (``patch_embed``, ``blocks``, ``num_prefix_tokens``); it is used
        as is (eval mode is the caller's choice) and never modified.
    head : LinearHead, optional
        A linear head on ``[cls ‖ patch mean]`` (`dynamo.heads`) used for logits instead of the
        model's own classifier; needed for accuracies of a model without one.

    Examples
    --------
    >>> stepper = BlockStepper(dynamo.load_model("dynamo-zoo/vit-digits-reg4"))
    >>> x = stepper.embed(pixels)                       # layer 0, (B, T, D)
    >>> states = stepper.run(x, start=0, stop=12)       # layers 0..12, each (B, T, D)
    >>> logits = stepper.head(states[-1])               # the model's own logits
    """

    def __init__(self, model: LoadedModel | nn.Module, head: LinearHead | None = None):
        self.module = model.module if isinstance(model, LoadedModel) else model
        self.name = model.source if isinstance(model, LoadedModel) else type(self.module).__name__
        self.linear_head = head
        check_is_vit(self.module)
        size = data_config(self.module)["input_size"]
        parameter = next(self.module.parameters())
        with torch.no_grad():
            _, self.block_kwargs = self._first_block_input(
                torch.zeros(1, *size, dtype=parameter.dtype, device=parameter.device)
            )

    @property
    def num_blocks(self) -> int:
        return len(self.module.blocks)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Layer 0 of preprocessed images: exactly the first block's input in the model's forward.

        Parameters
        ----------
        pixels : torch.Tensor
            (B, C, H, W), preprocessed with the model's own data config.

        Returns
        -------
        torch.Tensor
            (B, T, D): patch embedding, position embedding and prefix tokens, after any pre-norm.
        """
        return self._first_block_input(pixels)[0]

    def _first_block_input(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The first block's input and the extra keyword arguments the model passes its blocks."""
        captured = {}

        def stop(_, args, kwargs):
            if args:
                captured["x"], captured["kwargs"] = args[0], kwargs
            else:
                (_, captured["x"]), *rest = kwargs.items()
                captured["kwargs"] = dict(rest)
            raise _Embedded

        handle = self.module.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.module.forward_features(pixels)
        except _Embedded:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{type(self.module).__name__}.forward_features never reached its first block")
        return captured["x"], captured["kwargs"]

    def step(self, x: torch.Tensor, layer: int, block: int | None = None) -> torch.Tensor:
        """The state at ``layer`` from the state at ``layer - 1``.

        Parameters
        ----------
        x : torch.Tensor
            (B, T, D), the residual stream at layer ``layer - 1``.
        layer : int
            1..L, the layer to produce.
        block : int, optional
            1-based index of the block to apply instead of block ``layer`` (a layer swap).
        """
        if not 1 <= layer <= self.num_blocks:
            raise ValueError(f"layer must be in 1..{self.num_blocks}, got {layer}")
        index = layer if block is None else block
        out = self.module.blocks[index - 1](x, **self.block_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def run(
        self,
        x: torch.Tensor,
        start: int,
        stop: int | None = None,
        block_for: Callable[[int], int] | Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Carry the state at layer ``start`` through the blocks to layer ``stop``.

        Parameters
        ----------
        x : torch.Tensor
            (B, T, D), the residual stream at layer ``start``.
        start, stop : int
            0 <= start <= stop <= L; ``stop`` defaults to L.
        block_for : callable or sequence, optional
            Which block produces each layer: ``block_for(layer)`` or ``block_for[layer - 1]``,
            1-based block indices. Default: the model's own order.

        Returns
        -------
        list of torch.Tensor
            ``stop - start + 1`` states, layers ``start..stop``, each (B, T, D); the first is ``x``.
        """
        return rollout(self.step, x, start, stop, self.num_blocks, block_for)

    @property
    def head_kind(self) -> str | None:
        """``"probe"`` with a linear head attached, ``"model"`` for the model's own classifier, None without either."""
        if self.linear_head is not None:
            return self.linear_head.kind
        return "model" if has_classifier(self.module) else None

    @property
    def head(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Logits from the last layer, (B, T, D) (no final norm) -> (B, classes), or None without a head.

        The attached linear head's logits, else the model's own final norm, pooling and
        classifier; None for a model without a classifier (timm ``num_classes=0``, whose
        ``forward_head`` returns pooled features) when no linear head is attached.
        """
        if self.linear_head is not None:
            return self.linear_head.logits
        return self._model_logits if self.head_kind == "model" else None

    def _model_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_head(self.module.norm(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes from the last layer: (B, T, D) -> (B,) labels.

        Raises
        ------
        NoHeadError
            The model has no classifier and no linear head is attached.
        """
        if self.linear_head is not None:
            return self.linear_head.predict(x)
        if self.head is None:
            raise NoHeadError(NO_HEAD.format(model=self.name))
        return self.head(x).argmax(-1)

    def head_attrs(self) -> dict:
        """What an accuracy with this stepper's head records (`dynamo.heads`), or the note why there is none."""
        if self.linear_head is not None:
            return self.linear_head.describe()
        if self.head_kind == "model":
            return model_head_attrs(self.name, int(self.module.num_classes))
        return {"accuracy_note": NO_HEAD.format(model=self.name)}


def propagator_for(model, ds: xr.Dataset, head: LinearHead | None = None):
    """What carries a store's states through the remaining layers: the live model or a surrogate.

    Parameters
    ----------
    model : LoadedModel, torch.nn.Module, BlockStepper, or any object with ``run(x, start, stop)``
        A `LoadedModel` must be the one the store was recorded with (same weights sha256); it
        and a timm ViT module are wrapped in a `BlockStepper`. Anything with a ``run`` method (a
        stepper, a fitted Raptor surrogate) is used as it is.
    ds : xarray.Dataset
        The trajectory store the starting states come from; it must keep every token.
    head : LinearHead, optional
        Attached to a `BlockStepper` made here (see `BlockStepper`); an object that already
        runs keeps its own.

    Returns
    -------
    object
        Has ``run(x, start, stop) -> list of states`` and, where available, ``head(x)``.

    Raises
    ------
    ValueError
        The store was recorded with other weights, lacks tokens, or ``model`` cannot run.
    """
    grid, prefix = ds.attrs.get("patch_grid"), ds.attrs.get("num_prefix_tokens")
    if grid is not None and prefix is not None and ds.sizes["token"] != prefix + int(np.prod(grid)):
        raise ValueError(
            f"the store keeps {ds.sizes['token']} of the model's {prefix + int(np.prod(grid))} tokens "
            "(recorded with --patch-tokens); a live model needs every token: record a store "
            "without --patch-tokens"
        )
    if isinstance(model, LoadedModel):
        recorded = ds.attrs.get("weights_sha256")
        if recorded is not None and recorded != model.weights_sha256:
            raise ValueError(
                f"the store was recorded with {ds.attrs.get('model')} (weights sha256 {recorded[:12]}), "
                f"not with {model.source} (sha256 {model.weights_sha256[:12]}); pass the model the "
                "store was recorded with, or record a store with this model"
            )
        return BlockStepper(model, head)
    if callable(getattr(model, "run", None)):
        return model
    if isinstance(model, nn.Module):
        return BlockStepper(model, head)
    raise ValueError(
        f"cannot propagate states with a {type(model).__name__}: pass a dynamo LoadedModel, a timm "
        "ViT, a BlockStepper, or a fitted surrogate with a run(x, start, stop) method"
    )
