"""Raptor: the block against timm's, routing, the closed-form fit, resume, save/load, the CLI.

Teachers here are tiny random-weight timm ViTs (mechanics, not findings), recorded on real digits.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import r2_score as sklearn_r2
from torch import nn

import dynamo
from dynamo.models import weights_sha256
from dynamo.partition import Partition, from_result
from dynamo.raptor import Raptor, RaptorBlock, RaptorFitter, r2_score
from dynamo.raptor import train as raptor_train
from dynamo.raptor.data import batch_plan, trajectory_loader
from dynamo.stepping import BlockStepper
from tests.conftest import tiny_model

DEPTH = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(tied: bool) -> dynamo.LoadedModel:
    """A 4-block width-32 ViT with large block updates; ``tied``: all blocks share block 1's weights."""
    loaded = tiny_model("cls", img_size=32, embed_dim=32, num_heads=2, depth=DEPTH)
    module = loaded.module
    with torch.no_grad():
        for block in module.blocks:
            block.attn.proj.weight.mul_(20)
            block.mlp.fc2.weight.mul_(20)
    if tied:
        module.blocks = torch.nn.Sequential(*[module.blocks[0]] * DEPTH)
    return dataclasses.replace(loaded, weights_sha256=weights_sha256(module))


@pytest.fixture(scope="module")
def tied(digits_folder, tmp_path_factory):
    teacher = _teacher(tied=True)
    path = tmp_path_factory.mktemp("raptor") / "tied.zarr"
    dynamo.record(teacher, dynamo.image_set(digits_folder), path, batch_size=16, progress=False)
    return teacher, path


@pytest.fixture(scope="module")
def untied(digits_folder, tmp_path_factory):
    teacher = _teacher(tied=False)
    path = tmp_path_factory.mktemp("raptor") / "untied.zarr"
    dynamo.record(teacher, dynamo.image_set(digits_folder), path, batch_size=16, progress=False)
    return teacher, path


FAST = dict(k=1, steps=600, stage2_steps=600, lr=3e-3, mlp="gelu", progress=False)


def test_block_reproduces_a_timm_block():
    """With a timm block's weights, LayerScale 1 and no depth scaling, RaptorBlock is that block."""
    teacher = tiny_model("cls", img_size=32, embed_dim=32, num_heads=2, depth=1).module.blocks[0]
    block = RaptorBlock(32, 2, mlp_ratio=4.0, mlp="gelu", layerscale_init=1.0, depth_scaling=False)
    with torch.no_grad():
        for ours, theirs in [(block.norm1, teacher.norm1), (block.norm2, teacher.norm2),
                             (block.mlp.fc1, teacher.mlp.fc1), (block.mlp.fc2, teacher.mlp.fc2),
                             (block.attn.out_proj, teacher.attn.proj)]:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        block.attn.in_proj_weight.copy_(teacher.attn.qkv.weight)
        block.attn.in_proj_bias.copy_(teacher.attn.qkv.bias)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(block(x, 1), teacher(x), atol=1e-5, rtol=1e-5)
    # depth scaling starts near 1: gains within 1e-2 of 1 for every layer index
    gains = torch.cat(RaptorBlock(32, 2).depth(torch.arange(1.0, 13.0)), dim=-1)
    assert (gains - 1).abs().max() < 1e-2


class OldRaptorBlock(nn.Module):
    """The block as written before it used timm's layers (the reference for bit-identity): its own
    LayerScale gammas and a hand-written SwiGLU / GELU MLP, under the former parameter names."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, mlp="swiglu", layerscale_init=1e-5, depth_scaling=True):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.mlp_kind = mlp
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layerscale_init)))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden if mlp == "swiglu" else hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma2 = nn.Parameter(torch.full((dim,), float(layerscale_init)))
        self.depth = RaptorBlock(dim, num_heads).depth if depth_scaling else None

    def mlp(self, x):
        h = self.fc1(x)
        if self.mlp_kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * value
        else:
            h = torch.nn.functional.gelu(h)
        return self.fc2(h)

    def forward(self, x, t):
        h = self.norm1(x)
        attended = self.attn(h, h, h, need_weights=False)[0]
        if self.depth is None:
            x = x + self.gamma1 * attended
            return x + self.gamma2 * self.mlp(self.norm2(x))
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s1, s2, s3 = self.depth(t)
        x = x + s1 * (self.gamma1 * attended)
        x = x + s2 * (self.gamma2 * self.mlp(self.norm2(x)))
        return s3 * x


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("depth_scaling", [True, False])
def test_block_is_bit_identical_to_the_former_one(mlp, depth_scaling):
    """timm's LayerScale and MLPs compute exactly what the hand-written block did, and a state
    dict saved under the former names loads into the new block."""
    torch.manual_seed(0)
    old = OldRaptorBlock(32, 2, mlp=mlp, layerscale_init=0.3, depth_scaling=depth_scaling)
    with torch.no_grad():
        for parameter in old.parameters():
            parameter.normal_(std=0.2)
    new = RaptorBlock(32, 2, mlp=mlp, depth_scaling=depth_scaling)
    new.load_state_dict(old.state_dict())
    x, t = torch.randn(3, 5, 32), torch.tensor([1.0, 4.0, 7.0])
    assert torch.equal(new(x, t), old(x, t))
    new.train(), old.train()
    assert torch.equal(new(x, 2), old(x, 2))


def test_r2_matches_sklearn_in_both_argument_orders():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(4, 6, 8)) + rng.normal(size=8)
    prediction = target + 0.3 * rng.normal(size=target.shape)
    assert r2_score(prediction, target) == pytest.approx(sklearn_r2(target.ravel(), prediction.ravel()))
    assert r2_score(prediction, target, reference="prediction") == pytest.approx(sklearn_r2(prediction.ravel(), target.ravel()))


def test_routing_follows_thresholds():
    config = dict(dim=16, num_heads=2, mlp_ratio=2.0, layerscale_init=0.5)
    torch.manual_seed(0)
    model = Raptor([3, 7], num_layers=10, block_config=config)
    assert [model.block_index(t) for t in range(1, 11)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    x = torch.randn(2, 4, 16)
    expected, state = [x], x
    for layer, block in zip(range(1, 11), [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]):
        state = model.blocks[block](state, layer)
        expected.append(state)
    for got, want in zip(model.run(x, 0), expected):
        torch.testing.assert_close(got, want)
    # a segment: layers 5..8 from the state at layer 4
    torch.testing.assert_close(model.run(expected[4], 4, 8)[-1], expected[8])
    # every way of writing the same partition, and its thresholds
    partition = [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    for written in ("1-3,4-7,8-10", "3,7", [3, 7], partition):
        assert Partition.parse(written, 10) == partition
    assert Partition(partition).thresholds == model.thresholds
    for bad in ("1-3,5-10", "1-4,3-10", "0-10", "banana", [[1, 2], [3]]):
        with pytest.raises(ValueError, match="partition"):
            Partition.parse(bad, 10)
    with pytest.raises(ValueError, match="thresholds"):
        Raptor([7, 3], num_layers=10, block_config=config)


def test_loader_serves_the_planned_rows(tied):
    _, path = tied
    ds = dynamo.open_trajectories(path)
    hidden = ds["hidden"].values
    assert ds["hidden"].variable.chunksizes["image"][0] == 16
    images = np.arange(3, 60, 2)
    plan = [b for epoch in range(3) for b in batch_plan(images, 16, 8, seed=5, epoch=epoch, buffer_chunks=2)]
    assert all(len(np.unique(np.concatenate(plan[i * 3 : i * 3 + 3]))) == 24 for i in range(3))  # no repeats in an epoch
    batches = list(itertools.islice(trajectory_loader(ds, images, 1, 3, batch_size=8, seed=5, buffer_chunks=2), 8))
    for batch, rows in zip(batches, plan):
        np.testing.assert_array_equal(batch.numpy(), hidden[rows, 1:4])
    resumed = trajectory_loader(ds, images, 0, 4, batch_size=8, seed=5, first_step=4, buffer_chunks=2, workers=0)
    np.testing.assert_array_equal(next(iter(resumed)).numpy(), hidden[plan[4]])
    # read in this process: every chunk is freed after its last batch of the epoch
    loader = trajectory_loader(ds, images, 1, 3, batch_size=8, seed=5, buffer_chunks=2, workers=0)
    for batch, rows in zip(itertools.islice(loader, 3), plan):
        np.testing.assert_array_equal(batch.numpy(), hidden[rows, 1:4])
    assert loader.dataset.chunks == {}


def test_tied_vit_is_fitted_by_one_block(tied, untied):
    """The closed-form case: L blocks sharing one set of weights are one recurrent block."""
    teacher, path = tied
    fitter = RaptorFitter(**FAST)
    fitter.fit(path, teacher=teacher)
    report = fitter.evaluate(path, probe=False)
    assert report.attrs["images"] == "held-out images of the fit store"
    assert list(report["token_kind"].values) == ["all", "cls", "patch"] and report.attrs["model"] == teacher.source
    assert from_result(report) == fitter.partition_ == [[1, 2, 3, 4]]
    r2 = report["r2"].sel(token_kind="all").values
    assert (r2 > 0.99).all(), r2
    # the bar is not met by doing nothing: the rollout of an unfitted block falls short of it
    unfitted = RaptorFitter(**{**FAST, "steps": 0, "stage2_steps": 0}).fit(path, teacher=teacher)
    assert unfitted.score(path) < 0.95
    # and the same recipe cannot reach it when the blocks differ
    other_teacher, other_path = untied
    assert RaptorFitter(**FAST).fit(other_path, teacher=other_teacher).evaluate(other_path, probe=False)["r2"].sel(token_kind="all").min() < 0.99
    # the whole surrogate (teacher embedding -> Raptor -> teacher head) agrees with the teacher
    assert report.attrs["agreement"] >= 0.9


def _old_learning_rate(step: int, steps: int, peak: float, warmup: float, floor: float) -> float:
    """The fitter's former hand-written schedule: linear warmup to ``peak``, cosine to ``floor``."""
    warmup_steps = int(warmup * steps)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * progress))


def test_interrupted_fit_resumes_to_the_same_weights(tied, tmp_path, monkeypatch):
    teacher, path = tied
    params = dict(FAST, k=2, partition="1-2,3-4", steps=12, stage2_steps=12, checkpoint_every=5, validate_every=1, warmup=0.25)
    reference = RaptorFitter(**params).fit(path, teacher=teacher)
    # timm's warmup + cosine: from step W = 3 on the former schedule's values exactly; during
    # the warmup, the former value of the step before (0 at step 0)
    for segment in range(3):
        lrs = [entry["lr"] for entry in reference.history_[segment * 12 : segment * 12 + 12]]
        old = [_old_learning_rate(step, 12, 3e-3, 0.25, 1e-6) for step in range(12)]
        assert lrs[3:] == pytest.approx(old[3:], rel=1e-12, abs=0) and lrs[:3] == pytest.approx([0, *old[:2]], rel=1e-12)

    served = {"n": 0}
    original = raptor_train.segment_loss

    def interrupting(*args, **kwargs):
        served["n"] += 1
        if served["n"] == 20:  # stage 1, block 2, step 8 (last checkpoint at step 5)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(raptor_train, "segment_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        RaptorFitter(**params, checkpoint_dir=tmp_path).fit(path, teacher=teacher)
    saved = json.loads((tmp_path / "checkpoint.json").read_text())
    assert saved["position"] == [1, 1, 5]
    monkeypatch.setattr(raptor_train, "segment_loss", original)
    resumed = RaptorFitter(**params, checkpoint_dir=tmp_path).fit(path, teacher=teacher)
    for name, value in reference.model_.state_dict().items():
        torch.testing.assert_close(resumed.model_.state_dict()[name], value, atol=0, rtol=0)
    assert resumed.history_ == reference.history_
    # a checkpoint of another fit is refused, not silently mixed in
    with pytest.raises(ValueError, match="other parameters"):
        RaptorFitter(**{**params, "lr": 1e-3}, checkpoint_dir=tmp_path).fit(path, teacher=teacher)


def test_save_load_round_trip(tied, tmp_path):
    teacher, path = tied
    ds = dynamo.open_trajectories(path)
    fitter = RaptorFitter(**{**FAST, "steps": 10, "stage2_steps": 5, "mlp": "swiglu"}).fit(ds, teacher=teacher)
    assert clone(fitter).get_params() == fitter.get_params() and not hasattr(clone(fitter), "model_")
    fitter.save(tmp_path / "fit")
    assert not list((tmp_path / "fit").glob("*.pt")) and not list((tmp_path / "fit").glob("*.pkl"))
    with pytest.raises(ValueError, match="random weights"):
        RaptorFitter(k=1).fit(path)  # a random-weight teacher cannot be rebuilt by name
    with pytest.raises(ValueError, match="3 phases"):
        RaptorFitter(k=2, partition="1,2").fit(path, teacher=teacher)
    loaded = RaptorFitter.load(tmp_path / "fit", teacher=teacher)
    states = torch.from_numpy(ds["hidden"].isel(layer=0).values[:8])
    assert fitter.transform(states).shape == (8, DEPTH + 1, *states.shape[1:])
    torch.testing.assert_close(loaded.transform(states), fitter.transform(states), atol=0, rtol=0)
    pixels = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(loaded.predict(pixels), fitter.predict(pixels))
    assert loaded.score(path) == fitter.score(ds)
    assert loaded.partition_ == fitter.partition_ and loaded.get_params() == {**fitter.get_params(), "checkpoint_dir": None}
    # the fitted model stands in for the teacher's BlockStepper (perturbation code duck-types it)
    stepper = BlockStepper(teacher)
    x = stepper.embed(pixels)
    assert len(loaded.model_.run(x, 1, 3)) == len(stepper.run(x, 1, 3)) == 3
    assert loaded.model_.head(x).shape == stepper.head(x).shape
    with pytest.raises(ValueError, match="not the model the store was recorded from"):
        RaptorFitter.load(tmp_path / "fit", teacher=_teacher(tied=False))


def test_cli_fit_prints_the_report_and_resumes(digits_folder, tmp_path, capsys, monkeypatch):
    from dynamo.pipeline.cli import main  # here, so that the rest of the file does not need the pipeline

    teacher = _teacher(tied=True)
    # the CLI loads the teacher by the store's name; stand the random-weight teacher in for it
    path = tmp_path / "store.zarr"
    dynamo.record(dataclasses.replace(teacher, pretrained=True), dynamo.image_set(digits_folder), path, progress=False)
    monkeypatch.setattr("dynamo.raptor.io.load_model", lambda *args, **kwargs: teacher)
    out = tmp_path / "fit"
    argv = ["fit", str(path), "--k", "2", "--partition", "1-1,2-4", "--steps", "6", "--out", str(out), "--json", "--quiet"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["r2_per_layer"]) == DEPTH + 1 and 0 <= summary["accuracy_ratio"]
    assert summary["partition"] == [[1], [2, 3, 4]]
    assert RaptorFitter.load(out, teacher=teacher).partition_ == [[1], [2, 3, 4]]
    assert main(argv) == 0  # finished: resumes at the end, same report
    assert json.loads(capsys.readouterr().out)["r2_final"] == summary["r2_final"]
    assert main(["fit", str(path), "--k", "2", "--partition", "1-9", "--out", str(tmp_path / "x")]) == 2
    assert "partition" in capsys.readouterr().err
    # baselines: the same recipe on the uniform partition, random contiguous ones and k = 1
    assert main(["fit", str(path), "--k", "2", "--steps", "3", "--baselines", "2", "--out", str(tmp_path / "b"), "--json", "--quiet"]) == 0
    baselines = json.loads(capsys.readouterr().out)["baselines"]
    assert list(baselines) == ["fitted", "uniform", "random 0", "random 1", "k=1"]
    assert baselines["uniform"]["partition"] == "[1-2][3-4]" and baselines["k=1"]["partition"] == "[1-4]"
    assert all(np.isfinite(b["r2_final"]) for b in baselines.values())


@pytest.mark.slow
def test_zoo_model_fits_with_three_blocks(tmp_path):
    """The real trained zoo ViT on the 360 bundled digits: k=3 with the CPU defaults keeps most of
    the representation and of the accuracy on held-out images (seeds 0 and 1 gave final R² 0.930 and
    0.933, accuracy ratios 0.986 and 0.931 on 72 held-out images; minutes on a busy CPU)."""
    from dynamo import zoo

    from analyses.phases import find_phases

    store = tmp_path / "reg4.zarr"
    ds = dynamo.record(zoo.DEFAULT_MODEL, dynamo.image_set(zoo.default_images()), store, progress=False)
    fitter = RaptorFitter(partition=find_phases(ds, method="contiguous", k=3), progress=False).fit(ds)
    report = fitter.evaluate(ds)
    assert report.attrs["images"] == "held-out images of the fit store"
    assert report.attrs["r2_final"] > 0.88
    assert report.attrs["accuracy_ratio"] > 0.9
    assert (report["r2"].sel(token_kind="patch").values > 0.88).all()
