"""k maps routed over the L layers of a ViT, with the teacher's embedding and head: what every surrogate shares.

Target layer t (1..L) goes to the map of the phase holding block t (for contiguous phases, the
paper's router thresholds). `run` and `head` have `dynamo.stepping.BlockStepper`'s signatures, so
code that pushes states through a ViT takes a surrogate unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamo.heads import NO_HEAD, NoHeadError
from dynamo.partition import Partition
from dynamo.stepping import BlockStepper, rollout

__all__ = ["PhaseRecurrence"]


class PhaseRecurrence(nn.Module):
    """The router, the rollout and the teacher's ends; subclasses define `apply` (one map, once).

    Parameters
    ----------
    partition : Partition, or list of int
        The phases of blocks 1..L in any form `Partition.parse` reads, contiguous or not (map i
        serves phase i), e.g. a `Partition` or the k - 1 increasing router thresholds of contiguous
        phases (empty for k = 1).
    num_layers : int
        L, the teacher's number of blocks; `run` covers layers 0..L.
    teacher : BlockStepper, optional
        For `embed`, `head`, `predict` and `forward`; a plain attribute, not a submodule (its
        weights are not part of the surrogate's state dict).
    """

    name = "surrogate"

    def __init__(self, partition, num_layers: int, teacher: BlockStepper | None = None):
        super().__init__()
        partition = Partition.parse(partition, num_layers, contiguous=False)
        self.partition = partition
        self.num_layers = int(num_layers)
        self.teacher = teacher
        self._route = partition.phase_of(range(1, num_layers + 1)).tolist()

    @property
    def thresholds(self) -> list[int]:
        """The router thresholds of contiguous phases (`Partition.thresholds`; raises for others)."""
        return self.partition.thresholds

    @property
    def k(self) -> int:
        """Number of maps (phases)."""
        return len(self.partition)

    @property
    def num_blocks(self) -> int:
        """L, the number of steps from layer 0 to the last layer (as `BlockStepper`)."""
        return self.num_layers

    def block_index(self, layer: int) -> int:
        """0-based index of the map that produces target ``layer`` (1..L)."""
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}")
        return self._route[layer - 1]

    def apply(self, x: torch.Tensor, index: int, layer: float) -> torch.Tensor:
        """Map ``index`` (0-based) applied once to (B, T, D) states, producing depth ``layer``."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, layer: float, block: int | None = None) -> torch.Tensor:
        """The state at ``layer`` from the state at ``layer - 1``.

        Parameters
        ----------
        x : torch.Tensor
            (B, T, D) at layer ``layer - 1``.
        layer : float
            1..L, the layer to produce (a depth-conditioned map's depth signal); any depth when
            ``block`` is given (as `dynamo.surrogates.measures.loop_count` runs them).
        block : int, optional
            1-based map to use instead of the routed one.
        """
        return self.apply(x, self.block_index(layer) if block is None else block - 1, layer)

    def run(self, x: torch.Tensor, start: int, stop: int | None = None, noise: float = 0.0,
            generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Autoregressive rollout from layer ``start`` to layer ``stop``.

        Parameters
        ----------
        x : torch.Tensor
            (B, T, D), the state at layer ``start``.
        start, stop : int
            0 <= start <= stop <= L; ``stop`` defaults to L.
        noise : float
            Standard deviation of Gaussian noise added to each map's input (Raptor's training;
            0 everywhere else).
        generator : torch.Generator, optional
            Source of that noise.

        Returns
        -------
        list of torch.Tensor
            ``stop - start + 1`` states, layers ``start..stop``, each (B, T, D); the first is ``x``.
        """
        return rollout(self.step, x, start, stop, self.num_layers, noise=noise, generator=generator)

    def _teacher(self) -> BlockStepper:
        if self.teacher is None:
            raise ValueError(f"this {self.name} surrogate has no teacher attached for its embedding and head; pass "
                             "teacher= (a LoadedModel) when fitting or loading it")
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
        """The whole surrogate: teacher embedding -> k maps applied L times -> teacher head (logits)."""
        teacher = self._teacher()
        if teacher.head is None:
            raise NoHeadError(NO_HEAD.format(model=teacher.name))
        return teacher.head(self.run(self.embed(pixels), 0)[-1])
