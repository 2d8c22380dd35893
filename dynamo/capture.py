"""Capture a ViT's residual stream during its own forward pass and bring it to the host.

Summaries are reduced on the device in float32. On CUDA each layer is copied into a pinned host buffer
on a side stream while the next blocks compute; on the CPU the block's output is kept by reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from dynamo.models import LoadedModel
from dynamo.store import RECORDED, UNREADABLE

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class CaptureError(RuntimeError):
    """The model did not apply its blocks the way a recording needs."""


@dataclass
class CapturedBatch:
    """One batch's arrays on the host, possibly still arriving from the device.

    ``hidden``: (B, tokens, D) per kept layer in the storage dtype (empty for summaries only); ``summaries``: (B, layers, D)
    float32; ``logits``: (B, C) or None; ``peak``: (B, layers) largest |value| before the storage cast; ``status``:
    (B,) int8; ``ready``: the CUDA event after the last copy, or None on the CPU.
    """

    hidden: list
    summaries: dict
    logits: np.ndarray | None
    peak: np.ndarray
    status: np.ndarray
    ready: torch.cuda.Event | None = None

    def arrays(self) -> dict:
        """Wait for the device-to-host copies, blank unreadable images (NaN), and return every array."""
        if self.ready is not None:
            self.ready.synchronize()
        unreadable = self.status == UNREADABLE
        arrays = {**self.summaries, "hidden": self.hidden, "status": self.status}
        if self.logits is not None:
            arrays["logits"] = self.logits
        for values in [*self.hidden, *self.summaries.values(), *([self.logits] if self.logits is not None else [])]:
            values[unreadable] = np.nan
        return arrays

    def check_finite(self, layers, dtype) -> None:
        """Raise `CaptureError` if a readable image's states at ``layers`` are NaN or inf, or overflow ``dtype``."""
        peak = self.peak[self.status != UNREADABLE]  # call after `arrays`, which waits for the copies
        if not np.isfinite(peak).all():
            layer = layers[int(np.flatnonzero(~np.isfinite(peak).all(0))[0])]
            raise CaptureError(
                f"the model produced non-finite activations (NaN or inf) at layer {layer}: the model or its "
                "checkpoint is the cause (NaN weights, or a forward that overflows), not the store; check the "
                "weights, or record without --autocast"
            )
        limit = np.finfo(dtype).max
        if (peak > limit).any():
            column = int(np.flatnonzero((peak > limit).any(0))[0])  # the first layer that overflows
            raise CaptureError(
                f"activations overflow {np.dtype(dtype).name} at layer {layers[column]} (largest |value| "
                f"{peak[:, column].max():.4g} > {limit:.5g}); refusing to store inf: record with --dtype float32"
            )


class Capture:
    """Hooks that record one batch per `run` into host arrays for the store.

    ``tokens`` are the positions kept in ``hidden``; ``keep_hidden=False`` records only reduced views and logits;
    ``slots`` pinned host buffers (CUDA only) make the pool, the recorder's ``writers + 1``.
    """

    def __init__(self, loaded: LoadedModel, layers, tokens, dtype: str, device, *, keep_hidden=True, autocast=None, slots=3):
        self.module, self.layout = loaded.module, loaded.layout
        self.num_blocks = loaded.num_blocks
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.device = torch.device(device)
        self.tokens = torch.as_tensor(np.asarray(tokens), device=self.device)
        self.all_tokens = len(tokens) == loaded.layout.num_tokens
        self.dtype = getattr(torch, dtype)
        self.keep_hidden = keep_hidden
        self.autocast = autocast
        self.num_classes = int(getattr(loaded.module, "num_classes", 0) or 0)
        self.views = [
            name
            for name, present in (
                ("cls", self.layout.has_cls),
                ("patch_mean", True),
                ("register_mean", self.layout.num_registers > 0),
            )
            if present
        ]
        self.on_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.pool = _PinnedPool(slots) if self.on_cuda else None
        self.handles = []
        self.calls = 0
        self.batch = 0

    def __enter__(self):
        """Hook the blocks; layer numbers follow the order of block calls in one forward pass.

        Counting calls keeps a model whose ``blocks`` holds one module several times (tied weights) correct.
        """
        blocks = self.module.blocks
        self.handles.append(
            blocks[0].register_forward_pre_hook(
                lambda _, args, kwargs: self._keep(0, args[0] if args else next(iter(kwargs.values())))
                if self.calls == 0 else None,
                with_kwargs=True,
            )
        )
        for block in {id(block): block for block in blocks}.values():
            self.handles.append(block.register_forward_hook(self._block_output))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _block_output(self, _, __, output) -> None:
        self.calls += 1
        self._keep(self.calls, output[0] if isinstance(output, tuple) else output)

    def run(self, pixels: torch.Tensor, readable: np.ndarray) -> CapturedBatch:
        """Run the model on one batch of pixels on the device; raise `CaptureError` unless it called each block exactly once."""
        b, d, n_layers = pixels.shape[0], self.module.embed_dim, len(self.slot)
        self.states = [None] * n_layers
        self.reduced = {name: torch.empty(b, n_layers, d, device=self.device) for name in self.views}
        self.peak = torch.empty(b, n_layers, device=self.device)
        if self.on_cuda:
            self.host = self.pool.take(
                self.batch, b, n_layers, self._kept_shape(b), self.dtype, self.views, d, self.num_classes
            )
        self.calls = 0
        self.batch += 1
        autocast = (
            torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])
            if self.autocast else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            logits = self.module(pixels)
        if self.calls != self.num_blocks:
            raise CaptureError(
                f"{type(self.module).__name__} called its blocks {self.calls} times in one forward pass, "
                f"not {self.num_blocks}; dynamo records models that apply each block once, in order"
            )
        logits = logits.float() if self.num_classes else None
        status = np.where(readable, RECORDED, UNREADABLE).astype(np.int8)
        if not self.on_cuda:
            return CapturedBatch(
                hidden=[state.numpy() for state in self.states] if self.keep_hidden else [],
                summaries={name: values.numpy() for name, values in self.reduced.items()},
                logits=None if logits is None else logits.numpy(),
                peak=self.peak.numpy(),
                status=status,
            )
        host = self.host
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for name, values in self.reduced.items():
                host["summaries"][name][:b].copy_(values, non_blocking=True)
                values.record_stream(self.copy_stream)
            if logits is not None:
                host["logits"][:b].copy_(logits, non_blocking=True)
                logits.record_stream(self.copy_stream)
            host["peak"][:b].copy_(self.peak, non_blocking=True)
            self.peak.record_stream(self.copy_stream)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return CapturedBatch(
            hidden=[host["hidden"][slot, :b].numpy() for slot in range(n_layers)] if self.keep_hidden else [],
            summaries={name: host["summaries"][name][:b].numpy() for name in self.views},
            logits=None if logits is None else host["logits"][:b].numpy(),
            peak=host["peak"][:b].numpy(),
            status=status,
            ready=ready,
        )

    def _kept_shape(self, b: int) -> tuple[int, int, int] | None:
        if not self.keep_hidden:
            return None
        return (b, self.layout.num_tokens if self.all_tokens else len(self.tokens), self.module.embed_dim)

    def _keep(self, layer: int, state: torch.Tensor) -> None:
        if layer not in self.slot:
            return
        if state.shape[1] != self.layout.num_tokens:
            raise CaptureError(
                f"layer {layer} holds {state.shape[1]} tokens, not the {self.layout.num_tokens} of the model's layout; "
                "dynamo records models whose token layout is fixed through depth"
            )
        slot, first_patch = self.slot[layer], self.layout.num_prefix
        self.peak[:, slot] = state.detach().float().abs().amax(dim=(1, 2))
        if "cls" in self.reduced:
            self.reduced["cls"][:, slot] = state[:, 0]
        self.reduced["patch_mean"][:, slot] = state[:, first_patch:].float().mean(1)
        if "register_mean" in self.reduced:
            first = first_patch - self.layout.num_registers
            self.reduced["register_mean"][:, slot] = state[:, first:first_patch].float().mean(1)
        if not self.keep_hidden:
            return
        kept = (state if self.all_tokens else state.index_select(1, self.tokens)).to(self.dtype)
        if not self.on_cuda:
            self.states[slot] = kept.contiguous()
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self.host["hidden"][slot, : kept.shape[0]].copy_(kept, non_blocking=True)
        kept.record_stream(self.copy_stream)


class _PinnedPool:
    """A ring of pinned host buffers (CUDA only); slot ``i % slots`` serves batch ``i``, refilled only once it is on disk."""

    def __init__(self, slots: int):
        self.buffers = [None] * slots

    def take(self, batch_index, b, n_layers, kept_shape, dtype, views, width, n_classes) -> dict:
        index = batch_index % len(self.buffers)
        buffer = self.buffers[index]
        if buffer is None or buffer["capacity"] < b:
            buffer = {"capacity": b, "peak": torch.empty(b, n_layers, pin_memory=True), "summaries": {
                name: torch.empty(b, n_layers, width, pin_memory=True) for name in views
            }}
            if n_classes:
                buffer["logits"] = torch.empty(b, n_classes, pin_memory=True)
            if kept_shape is not None:
                buffer["hidden"] = torch.empty((n_layers, *kept_shape), dtype=dtype, pin_memory=True)
            self.buffers[index] = buffer
        return buffer
