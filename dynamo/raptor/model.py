"""Raptor: k blocks applied recurrently in place of the L blocks of a ViT.

A router sends each target layer t (1..L) to one of the k blocks: block i (0-based) for the first
i with t <= thresholds[i], the last block beyond every threshold (the paper's
``Raptor(blocks, thresholds)``; k - 1 thresholds, as `dynamo.partition.Partition.thresholds`
gives). The model runs between any two layers of the trajectory store's numbering (layer 0 =
input to the first block), and, with a teacher attached, as a whole surrogate of the ViT: the
teacher's own embedding, the k blocks applied L times, the teacher's final norm and head.

`Raptor.run` and `Raptor.head` have the signatures of `dynamo.stepping.BlockStepper`, so code that
pushes states through a ViT (perturbations, basins) takes a Raptor surrogate unchanged.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from dynamo.heads import NO_HEAD, NoHeadError
from dynamo.raptor.block import RaptorBlock
from dynamo.stepping import BlockStepper

__all__ = ["Raptor"]


class Raptor(nn.Module):
    """k Raptor blocks and the router from layer index to block.

    Parameters
    ----------
    thresholds : list of int
        k - 1 increasing layer indices (empty for k = 1); target layer t goes to block i
        (0-based) for the first i with t <= thresholds[i], and to the last block when t exceeds
        them all: `dynamo.partition.Partition.thresholds` of a contiguous partition.
    num_layers : int
        L, the teacher's number of blocks; `run` covers layers 0..L.
    block_config : dict
        Keyword arguments of `RaptorBlock` (dim, num_heads, mlp_ratio, mlp, layerscale_init,
        depth_hidden, depth_scaling), the same for every block.
    teacher : BlockStepper, optional
        The ViT whose embedding and head `embed`, `head` and `forward` use. It is held as a
        plain attribute, not a submodule: its weights are not part of this model's state dict.
    """

    def __init__(self, thresholds: list[int], num_layers: int, block_config: dict, teacher: BlockStepper | None = None):
        super().__init__()
        thresholds = [int(t) for t in thresholds]
        if any(b <= a for a, b in zip(thresholds, thresholds[1:])) or any(not 1 <= t < num_layers for t in thresholds):
            raise ValueError(f"thresholds must be increasing layer indices in 1..{num_layers - 1}, got {thresholds}")
        self.thresholds = thresholds
        self.num_layers = int(num_layers)
        self.block_config = dict(block_config)
        self.blocks = nn.ModuleList(RaptorBlock(**self.block_config) for _ in range(len(thresholds) + 1))
        self.teacher = teacher

    @property
    def k(self) -> int:
        return len(self.blocks)

    @property
    def num_blocks(self) -> int:
        """L, the number of block applications from layer 0 to the last layer (as BlockStepper)."""
        return self.num_layers

    def block_index(self, layer: int) -> int:
        """0-based index of the block that produces target ``layer`` (1..L)."""
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}")
        return bisect.bisect_left(self.thresholds, layer)

    def step(self, x: torch.Tensor, layer: int, block: int | None = None) -> torch.Tensor:
        """The state at ``layer`` from the state at ``layer - 1``.

        Parameters
        ----------
        x : torch.Tensor
            (B, T, D) at layer ``layer - 1``.
        layer : int
            1..L, the layer to produce (also the depth signal t).
        block : int, optional
            1-based Raptor block to use instead of the routed one.
        """
        index = self.block_index(layer) if block is None else block - 1
        return self.blocks[index](x, layer)

    def run(
        self,
        x: torch.Tensor,
        start: int,
        stop: int | None = None,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Autoregressive rollout from layer ``start`` to layer ``stop``.

        Parameters
        ----------
        x : torch.Tensor
            (B, T, D), the state at layer ``start``.
        start, stop : int
            0 <= start <= stop <= L; ``stop`` defaults to L.
        noise : float
            Standard deviation sigma of Gaussian noise added to each block's input (training
            only; the paper's released runs use 0).
        generator : torch.Generator, optional
            Source of that noise.

        Returns
        -------
        list of torch.Tensor
            ``stop - start + 1`` states, layers ``start..stop``, each (B, T, D); the first is ``x``.
        """
        stop = self.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"need 0 <= start <= stop <= {self.num_layers}, got {start}, {stop}")
        states = [x]
        for layer in range(start + 1, stop + 1):
            inp = states[-1]
            if noise:
                inp = inp + noise * torch.randn(inp.shape, generator=generator, dtype=inp.dtype, device=inp.device)
            states.append(self.step(inp, layer))
        return states

    def _teacher(self) -> BlockStepper:
        if self.teacher is None:
            raise ValueError(
                "this Raptor model has no teacher attached for its embedding and head; pass "
                "teacher= (a LoadedModel) to RaptorFitter.fit / load"
            )
        return self.teacher

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Layer 0 from preprocessed images, by the teacher's own embedding: (B, C, H, W) -> (B, T, D)."""
        return self._teacher().embed(pixels)

    @property
    def head(self):
        """Logits from the last layer by the teacher's head (`BlockStepper.head`): (B, T, D) -> (B, classes);
        None without a teacher, or when the teacher has no classifier and no linear head."""
        return None if self.teacher is None else self.teacher.head

    @property
    def head_kind(self) -> str | None:
        """The teacher's head kind (`BlockStepper.head_kind`), None without a teacher."""
        return None if self.teacher is None else self.teacher.head_kind

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Classes from the last layer by the teacher's head: (B, T, D) -> (B,) (`BlockStepper.predict`)."""
        return self._teacher().predict(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The whole surrogate: teacher embedding -> k blocks applied L times -> teacher head (logits)."""
        teacher = self._teacher()
        if teacher.head is None:
            raise NoHeadError(NO_HEAD.format(model=teacher.name))
        return teacher.head(self.run(self.embed(pixels), 0)[-1])
