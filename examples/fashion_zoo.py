"""Train the zoo's Fashion-MNIST family, resumably: every model whose card is missing from OUT.

The family (all timm ``VisionTransformer``: width 64, 4 heads, class token + 4 registers,
28×28 input in 4×4 patches, uniform stochastic depth p in every block; the other settings are
``dynamo.zoo.train.DATASET_DEFAULTS["fashion"]``):

- ``vit-fashion-reg4-p<P>[-s1]``: 12 blocks, p in {0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9}, seeds 0 and 1;
- ``vit-fashion-reg4-d24-p0.1``: 24 blocks, p 0.1, seed 0;
- ``vit-fashion-reg4-n500-p0.0``: the over-training series, 12 blocks on the first 500
  training images for 100 epochs (batch 32, no label smoothing, no stochastic depth: nothing
  but weight decay holds memorisation back), far past a 100% training-subset accuracy, with
  float16 checkpoints ``...-e<EPOCH>`` after epochs 5, 10, 20, 30, 40, 60 and 80 (each card has
  its test and training-subset accuracy).

Each model is written as soon as it is trained (``OUT/weights/NAME.safetensors``,
``OUT/cards/NAME.json``), so an interrupted run resumes where it stopped. Run from the
repository root::

    python examples/fashion_zoo.py                          # the family into dynamo/zoo, ~1 h on 2 idle cores
    python examples/fashion_zoo.py --num-threads 1 --shard 0/2 &    # or two 1-thread halves at once:
    python examples/fashion_zoo.py --num-threads 1 --shard 1/2      # ~50% more images/s on 2 cores
    python examples/fashion_zoo.py --only n500 --out /tmp/zoo    # only the over-training series
    python examples/fashion_zoo.py --smoke --out /tmp/fashion-smoke   # tiny models, a minute or two

Two torch threads lose most of their speed when anything else holds one of the two cores (a
spinning thread waits for a descheduled one); one thread per process does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from dynamo.zoo import data, train

DROP_PATH_RATES = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
SEEDS = (0, 1)
OVERTRAIN = {
    "drop_path_rate": 0.0,
    "train_limit": 500,
    "epochs": 100,
    "warmup_epochs": 3,
    "batch_size": 32,
    "label_smoothing": 0.0,
    "checkpoint_epochs": "5,10,20,30,40,60,80",
}
# --smoke: the same family and code paths on tiny models and subsets, to check the driver end to end
SMOKE = {
    "depth": 2, "embed_dim": 32, "num_heads": 2, "train_limit": 256, "epochs": 2, "warmup_epochs": 1, "batch_size": 32,
}
SMOKE_OVERTRAIN = {"train_limit": 128, "epochs": 4, "checkpoint_epochs": "1,2", "warmup_epochs": 1}


def family(smoke: bool = False, **budget) -> list[tuple[str, train.TrainConfig]]:
    """``(name, config)`` of every model of the family, in training order.

    ``budget`` (e.g. ``epochs=8, train_limit=20000``) overrides the fashion defaults of the
    12- and 24-block models, not the over-training series.
    """
    tiny = SMOKE if smoke else budget
    models = []
    for p in DROP_PATH_RATES:
        for seed in SEEDS:
            config = train.config_for("fashion", drop_path_rate=p, seed=seed, **tiny)
            models.append((train.default_name(config), config))
    deep = {**tiny, "depth": 4 if smoke else 24}
    models.append(("vit-fashion-reg4-d24-p0.1", train.config_for("fashion", drop_path_rate=0.1, **deep)))
    series = {**OVERTRAIN, **(SMOKE | SMOKE_OVERTRAIN if smoke else {})}
    models.append(("vit-fashion-reg4-n500-p0.0", train.config_for("fashion", **series)))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    zoo_folder = Path(__file__).resolve().parents[1] / "dynamo" / "zoo"
    parser.add_argument("--out", default=str(zoo_folder), help="zoo folder (default: dynamo/zoo)")
    parser.add_argument("--data", metavar="DIR", default=str(data.FASHION_DIR), help="Fashion-MNIST folder")
    parser.add_argument("--num-threads", type=int, default=2, help="torch threads per model (in each card)")
    parser.add_argument("--only", metavar="TEXT", help="train only the models whose name contains TEXT")
    parser.add_argument("--shard", metavar="I/N", default="0/1", help="only models I, I+N, I+2N, ...")
    parser.add_argument("--epochs", type=int, help="epochs of the 12- and 24-block models")
    parser.add_argument("--train-limit", type=int, help="their training images")
    parser.add_argument("--smoke", action="store_true", help="tiny models on small subsets, to check the driver")
    parser.add_argument("--progress", action="store_true", help="a progress bar per model")
    args = parser.parse_args()

    out = Path(args.out)
    try:
        data.fashion_split(args.data)  # fail at once, with the one-line message, if the files are missing
    except FileNotFoundError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    shard, shards = (int(part) for part in args.shard.split("/"))
    started, trained = time.perf_counter(), 0
    budget = {k: v for k, v in {"epochs": args.epochs, "train_limit": args.train_limit}.items() if v is not None}
    for index, (name, config) in enumerate(family(args.smoke, **budget)):
        if index % shards != shard or (args.only and args.only not in name):
            continue
        if (out / "cards" / f"{name}.json").exists():
            print(f"{name:36s} card exists, skipped", flush=True)
            continue
        config = dataclasses.replace(config, num_threads=args.num_threads)
        t0 = time.perf_counter()

        def keep(model, card):
            train.save_model(model, card, out)
            scores = f"test {card['test_accuracy']:6.2f}%  train {card['train_accuracy']:6.2f}%"
            print(f"  {card['name']:34s} {scores}", flush=True)

        model, card = train.train_model(
            config, name=name, progress=args.progress, data_dir=args.data, on_checkpoint=keep
        )
        train.save_model(model, card, out)
        trained += 1
        train_part = f"  train {card['train_accuracy']:6.2f}%" if "train_accuracy" in card else ""
        seconds = time.perf_counter() - t0
        print(f"{name:36s} test {card['test_accuracy']:6.2f}%{train_part}  {seconds:6.0f} s", flush=True)
    size = sum(f.stat().st_size for f in out.glob("weights/vit-fashion-*.safetensors"))
    print(f"trained {trained} models in {time.perf_counter() - started:.0f} s; "
          f"Fashion weights in {out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
