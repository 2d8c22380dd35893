"""Time the Raptor fitter's training step against a bare PyTorch loop of the same block and loss.

    python benchmarks/raptor_step.py [--quick] [--store STORE] [--steps 60] [--rounds 3] [--batch-size 16] [--threads 1]

Both run in this process, alternating, on the same teacher store (default: the zoo model
``dynamo-zoo/vit-digits-reg4`` recorded on the 360 bundled digits into a temporary folder):

- fitter: `RaptorFitter(k=1)`, stage 1 only, pure rollout over all L layers (``tf_anneal=0`` so
  every step costs the same), data streamed from the zarr store by its DataLoader's reader
  process; a step is timed from asking for the batch to the end of the optimizer step.
- bare loop: the same `RaptorBlock`, the same token-weighted loss and rollout, AdamW and gradient
  clipping, on batches indexed from a tensor already in memory (no loading at all).

Prints the median step time of each, their ratio (the floor is <= 1.1), and whether loading ever
stalled the fitter: the time it waited for batches, and the slowest wait. ``--quick`` (25 steps,
2 rounds) takes about half a minute.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dynamo
from dynamo import zoo
from dynamo.layout import token_groups
from dynamo.surrogates.raptor import RaptorBlock, RaptorFitter
from dynamo.surrogates.raptor.loss import PAPER_STAGE1_LAST_WEIGHTS, loss_weights, token_loss


def bare_loop(hidden: torch.Tensor, groups: dict, block_config: dict, steps: int, batch_size: int, lr: float) -> list[float]:
    """Step times of a plain loop: rollout of one block over all layers, weighted MSE, AdamW, clip."""
    torch.manual_seed(0)
    block = RaptorBlock(**block_config)
    optimizer = torch.optim.AdamW(block.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    weights = loss_weights("paper", PAPER_STAGE1_LAST_WEIGHTS)  # the fitter's loss at k = 1
    num_layers = hidden.shape[1] - 1
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        batch = hidden[torch.randint(hidden.shape[0], (batch_size,), generator=generator)]
        x, loss = batch[:, 0], 0.0
        for layer in range(1, num_layers + 1):
            x = block(x, layer)
            loss = loss + token_loss(x, batch[:, layer], weights, groups)
        loss = loss / num_layers
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="25 steps per round, 2 rounds")
    parser.add_argument("--store", help="a trajectory store (default: record the zoo model into a temp folder)")
    parser.add_argument("--steps", type=int, default=60, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 25, 2
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        store = args.store
        if store is None:
            store = Path(scratch) / "reg4.zarr"
            dynamo.record(zoo.DEFAULT_MODEL, dynamo.image_set(zoo.default_images()), store, progress=False)
        ds = dynamo.open_trajectories(store)
        groups = {k: torch.from_numpy(v) for k, v in token_groups(ds["token_kind"]).items()}
        params = dict(k=1, steps=args.steps, stage2_steps=0, tf_anneal=0.0, batch_size=args.batch_size,
                      validate_every=10**9, progress=False)
        fitter_times, bare_times, waits = [], [], []
        for round_ in range(args.rounds):
            fitter = RaptorFitter(**params, seed=round_).fit(ds)
            (timing,) = fitter.timings_.values()
            fitter_times += timing["step_seconds"][5:]  # the first steps wait for the reader to start
            waits += timing["wait_seconds"][5:]
            if round_ == 0:
                rows = fitter.training_images_
                hidden = torch.from_numpy(np.asarray(ds["hidden"].sel(image=rows).values, dtype=np.float32))
            bare_times += bare_loop(hidden, groups, fitter.block_config_, args.steps, args.batch_size, fitter.lr)[5:]

    fitter_median, bare_median = np.median(fitter_times), np.median(bare_times)
    print(f"store {store}: {ds.sizes['image']} images, {ds.sizes['layer']} layers, "
          f"{ds.sizes['token']} tokens x {ds.sizes['feature']} features; batch {args.batch_size}, "
          f"{args.threads} thread(s), {len(fitter_times)} timed steps each")
    print(f"bare PyTorch loop  median step {bare_median * 1e3:8.2f} ms  (mean {np.mean(bare_times) * 1e3:.2f})")
    print(f"RaptorFitter       median step {fitter_median * 1e3:8.2f} ms  (mean {np.mean(fitter_times) * 1e3:.2f})")
    print(f"ratio fitter / bare (median): {fitter_median / bare_median:.3f}x  (floor: <= 1.1x)")
    waits = np.array(waits)
    print(f"data loading: waited {waits.sum() * 1e3:.1f} ms in total over {waits.size} steps "
          f"({100 * waits.sum() / np.sum(fitter_times):.2f}% of step time); slowest wait {waits.max() * 1e3:.2f} ms; "
          f"steps that waited > 1 ms: {(waits > 1e-3).sum()}")


if __name__ == "__main__":
    main()
