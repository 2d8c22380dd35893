"""Raptor: the block against timm's, routing, the closed-form fit, resume, save/load, the CLI.

Teachers here are tiny random-weight timm ViTs (mechanics, not findings), recorded on real digits.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import xarray as xr
from safetensors.torch import save_file
from sklearn.base import clone
from sklearn.metrics import r2_score as sklearn_r2
from torch import nn

import dynamo
from dynamo import serialize, zoo
from dynamo.metrics import r2_score
from dynamo.models import weights_sha256
from dynamo.partition import Partition, from_result
from dynamo.pipeline import fit as pipeline_fit
from dynamo.pipeline.cli import main
from dynamo.pipeline.fit import parse_loss
from dynamo.serialize import read_unit
from dynamo.stepping import BlockStepper
from dynamo.surrogates.raptor import PAPER_RECIPE, Raptor, RaptorBlock, RaptorFitter
from dynamo.surrogates.raptor import train as raptor_train
from dynamo.surrogates.raptor.data import batch_plan, trajectory_loader
from dynamo.surrogates.raptor.loss import PAPER_STAGE1_LAST_WEIGHTS, loss_weights, stage1_weights, token_loss
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
                             (block.attn.proj, teacher.attn.proj), (block.attn.qkv, teacher.attn.qkv)]:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
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


def test_routing_follows_any_partition():
    """A shuffled partition routes each layer to its phase's block; its thresholds do not exist."""
    config = dict(dim=16, num_heads=2, mlp_ratio=2.0, layerscale_init=0.5)
    torch.manual_seed(0)
    partition = Partition.random_shuffled(6, 2, seed=1)
    assert not partition.is_contiguous and sorted(b for phase in partition for b in phase) == list(range(1, 7))
    assert partition == Partition.random_shuffled(6, 2, seed=1) != Partition.random_shuffled(6, 2, seed=2)
    model = Raptor(partition, num_layers=6, block_config=config)
    route = partition.phase_of(range(1, 7)).tolist()
    assert [model.block_index(t) for t in range(1, 7)] == route and model.k == 2
    x = torch.randn(2, 4, 16)
    state = x
    for layer, block in zip(range(1, 7), route):
        state = model.blocks[block](state, layer)
    torch.testing.assert_close(model.run(x, 0)[-1], state)
    with pytest.raises(ValueError, match="not contiguous"):
        _ = model.thresholds
    with pytest.raises(ValueError, match="every block 1..6 once"):
        Raptor(Partition([[1, 2], [4, 5, 6]]), num_layers=6, block_config=config)
    assert raptor_train.phase_runs([2, 5, 6, 9]) == ((1, 2), (4, 6), (8, 9))
    assert raptor_train.phase_runs([3, 4, 5]) == ()


def test_segment_loss_over_ranges_is_brute_force():
    """A non-contiguous phase's loss: teacher forcing on its transitions only, rollouts from each run's own start."""
    from dynamo.surrogates.raptor.loss import segment_loss

    config = dict(dim=16, num_heads=2, mlp_ratio=2.0, layerscale_init=0.5)
    torch.manual_seed(0)
    model = Raptor(Partition([[1, 3, 4], [2, 5]]), num_layers=5, block_config=config)
    batch = torch.randn(3, 6, 4, 16)  # layers 0..5
    groups = {"all": torch.arange(4)}
    ranges = [(0, 1), (2, 4)]  # phase 1's runs: block 1, blocks 3-4
    block = model.blocks[0]
    forced = [block(batch[:, layer - 1], torch.full((3,), float(layer))) for layer in (1, 3, 4)]
    expected_tf = torch.stack([torch.nn.functional.mse_loss(p, batch[:, layer]) for p, layer in zip(forced, (1, 3, 4))]).mean()
    got_tf = segment_loss(model, batch, 0, None, groups, anneal=1.0, ranges=ranges)
    torch.testing.assert_close(got_tf, expected_tf, rtol=1e-5, atol=1e-6)
    one = block(batch[:, 0], 1.0)
    three = block(batch[:, 2], 3.0)
    four = block(three, 4.0)
    expected_ar = torch.stack([torch.nn.functional.mse_loss(s, batch[:, layer]) for s, layer in ((one, 1), (three, 3), (four, 4))]).mean()
    torch.testing.assert_close(segment_loss(model, batch, 0, None, groups, anneal=0.0, ranges=ranges), expected_ar, rtol=1e-5, atol=1e-6)
    whole = segment_loss(model, batch[:, 2:5], 2, None, groups, anneal=0.5)
    torch.testing.assert_close(segment_loss(model, batch[:, 2:5], 2, None, groups, anneal=0.5, ranges=[(2, 4)]), whole)


def test_tied_vit_is_exact_on_a_shuffled_partition_and_round_trips(tied, tmp_path):
    """Tied blocks: any partition started from the teacher's block is exact; a shuffled fit trains, saves, loads."""
    teacher, path = tied
    shuffled = Partition([[1, 3], [2, 4]])  # every phase two runs
    untrained = dict(partition=shuffled, steps=1, stage2_steps=0, lr=0.0, mlp="gelu", depth_scaling=False, progress=False)
    exact = RaptorFitter(**untrained, init=[1, 1]).fit(path, teacher=teacher).evaluate(path)
    np.testing.assert_allclose(exact["r2"].values, 1.0, atol=1e-5)
    assert from_result(exact) == shuffled
    fitter = RaptorFitter(partition=shuffled, steps=6, validate_every=2, mlp="gelu", progress=False).fit(path, teacher=teacher)
    names = [name for name in fitter.timings_ if name.startswith("stage 1")]
    assert any("," in name for name in names)  # a phase trained on two runs
    fitter.save(tmp_path / "shuffled")
    loaded = RaptorFitter.load(tmp_path / "shuffled", teacher=teacher)
    assert loaded.model_.partition == shuffled
    np.testing.assert_allclose(loaded.evaluate(path)["r2"].values, fitter.evaluate(path)["r2"].values, rtol=1e-6)


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
    params = dict(FAST, k=2, partition="1-2,3-4", steps=12, stage2_steps=12, checkpoint_every=5, validate_every=1, warmup=0.25,
                  patience=0)
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
    _, saved = read_unit(tmp_path / "checkpoint.safetensors")
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
    with pytest.raises(ValueError, match="not the model the store was recorded from"):
        RaptorFitter(k=1).fit(path)  # its tied weights are not what its name and seed rebuild
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
    teacher = _teacher(tied=True)
    # the CLI loads the teacher by the store's name; stand the random-weight teacher in for it
    path = tmp_path / "store.zarr"
    dynamo.record(dataclasses.replace(teacher, pretrained=True), dynamo.image_set(digits_folder), path, progress=False)
    monkeypatch.setattr("dynamo.surrogates.base.load_recorded_model", lambda *args, **kwargs: teacher)
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
    argv = ["fit", str(path), "--k", "2", "--steps", "3", "--baselines", "2", "--shuffled", "1", "--out", str(tmp_path / "b"), "--json", "--quiet"]
    assert main(argv) == 0
    baselines = json.loads(capsys.readouterr().out)["baselines"]
    assert list(baselines) == ["fitted", "uniform", "random 0", "random 1", "shuffled 0", "k=1"]
    assert baselines["uniform"]["partition"] == "[1-2][3-4]" and baselines["k=1"]["partition"] == "[1-4]"
    assert baselines["shuffled 0"]["partition"] == str(Partition.random_shuffled(4, 2, 0))
    assert all(np.isfinite(b["r2_final"]) for b in baselines.values())


def test_cli_fit_records_the_paper_recipe_and_reports_seeds_and_several_k(digits_folder, tmp_path, capsys, monkeypatch):
    teacher = _teacher(tied=True)
    path = tmp_path / "store.zarr"
    dynamo.record(dataclasses.replace(teacher, pretrained=True), dynamo.image_set(digits_folder), path, progress=False)
    monkeypatch.setattr("dynamo.surrogates.base.load_recorded_model", lambda *args, **kwargs: teacher)
    # --recipe paper: the paper's values in the saved config, flags given as well override them
    out = tmp_path / "paper"
    assert main(["fit", str(path), "--recipe", "paper", "--steps", "3", "--batch-size", "8", "--out", str(out), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "config.json").read_text())["params"]
    assert {name: saved[name] for name in PAPER_RECIPE} == {**PAPER_RECIPE, "batch_size": 8, "stage1_loss": "paper"}
    assert saved["lr"] == 3e-4 and saved["warmup"] == 10_000 and saved["steps"] == 3 and summary["recipe"] == "paper"
    assert "fixed step count" in summary["stopping"] and "never reaches its peak" in summary["text"]
    # several k and seeds: every fit on the same held-out images, mean ± std per layer over seeds
    out = tmp_path / "seeds"
    assert main(["fit", str(path), "--k", "1,2", "--seeds", "2", "--steps", "3", "--stage2-steps", "0", "--step-budget", "layer",
                 "--out", str(out), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(run["k"], run["seed"]) for run in summary["runs"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert summary["params"]["step_budget"] == "layer" and "per block of a stage-1 segment's phase" in summary["stopping"]
    held_out = {json.dumps(json.loads((out / f"k{k}-seed{s}" / "config.json").read_text())["validation_images"])
                for k in (1, 2) for s in (0, 1)}
    assert len(held_out) == 1
    for k in ("1", "2"):
        layers = np.array([run["r2_per_layer"] for run in summary["runs"] if str(run["k"]) == k])
        np.testing.assert_allclose(summary["by_k"][k]["r2_per_layer_mean"], layers.mean(axis=0), atol=1e-4)
        np.testing.assert_allclose(summary["by_k"][k]["r2_per_layer_std"], layers.std(axis=0), atol=1e-4)
    assert "mean ± std" in summary["text"]
    assert main(["fit", str(path), "--k", "1,2", "--baselines", "1", "--out", str(tmp_path / "x")]) == 2
    assert main(["fit", str(path), "--stage1-loss", "0.5/0.5", "--out", str(tmp_path / "y")]) == 2
    assert "cannot read the loss" in capsys.readouterr().err


@pytest.mark.slow
def test_zoo_model_fits_with_three_blocks(tmp_path):
    """The real trained zoo ViT on the 360 bundled digits: k=3 with the CPU defaults keeps most of
    the representation and of the accuracy on held-out images (with the former fixed 200 steps,
    seeds 0 and 1 gave final R² 0.930 and 0.933, accuracy ratios 0.986 and 0.931 on 72 held-out
    images; minutes on a busy CPU)."""
    from analyses.phases import find_phases

    store = tmp_path / "reg4.zarr"
    ds = dynamo.record(zoo.DEFAULT_MODEL, dynamo.image_set(zoo.default_images()), store, progress=False)
    fitter = RaptorFitter(partition=find_phases(ds, method="contiguous", k=3), progress=False).fit(ds)
    report = fitter.evaluate(ds)
    assert report.attrs["images"] == "held-out images of the fit store"
    assert report.attrs["r2_final"] > 0.88
    assert report.attrs["accuracy_ratio"] > 0.9
    assert (report["r2"].sel(token_kind="patch").values > 0.88).all()


class Killed(BaseException):
    """A process killed mid-write (raised from a patched write, past every ``except Exception``)."""


def test_a_fit_killed_at_any_write_step_resumes_to_the_same_weights(tied, tmp_path, monkeypatch):
    """Each checkpoint (and each kept stage-1 block) is one file, renamed into place once: a fit killed
    at any write step (while writing the temporary file, which is left truncated, or before its rename)
    resumes to the weights and the history of an uninterrupted fit."""
    teacher, path = tied
    params = dict(FAST, steps=2, stage2_steps=2, checkpoint_every=1, validate_every=1, patience=0)
    real_save, real_replace = serialize.save_file, serialize.replace
    writes = []

    def run(folder, kill_at=None):
        def save(tensors, filename, metadata=None):
            writes.append(filename)
            if len(writes) == kill_at:
                Path(filename).write_bytes(b"truncated")
                raise Killed
            real_save(tensors, filename, metadata=metadata)

        def rename(source, target):
            writes.append(target)
            if len(writes) == kill_at:
                raise Killed
            real_replace(source, target)

        monkeypatch.setattr(serialize, "save_file", save)
        monkeypatch.setattr(serialize, "replace", rename)
        try:
            return RaptorFitter(**params, checkpoint_dir=folder / "checkpoint", stage1_cache=folder / "stage1").fit(path, teacher=teacher)
        finally:
            monkeypatch.setattr(serialize, "save_file", real_save)
            monkeypatch.setattr(serialize, "replace", real_replace)

    reference = run(tmp_path / "reference")
    n_writes = len(writes)
    assert n_writes == 10  # 2 steps of 5 units: 2 checkpoints and the kept block in stage 1, 2 checkpoints in stage 2
    for kill_at in range(1, n_writes + 1):
        writes.clear()
        folder = tmp_path / f"killed-{kill_at}"
        with pytest.raises(Killed):
            run(folder, kill_at)
        resumed = run(folder)
        for name, value in reference.model_.state_dict().items():
            torch.testing.assert_close(resumed.model_.state_dict()[name], value, atol=0, rtol=0)
        assert resumed.history_ == reference.history_, kill_at
    assert not list(tmp_path.rglob("checkpoint.json"))  # no second file whose rename could lag the first


def test_stage1_blocks_are_reused_where_segments_coincide(tied, tmp_path):
    """k = 2 on [1-2][3-4] and k = 3 on [1][2][3-4] share the segment of layers 2 -> 4 (the last one, with
    the paper's weighted loss in both): it is trained once, and reusing it changes nothing."""
    teacher, path = tied
    params = dict(FAST, k=None, steps=6, stage2_steps=0, patience=0, stage1_cache=tmp_path / "stage1")
    two = RaptorFitter(**params, partition="1-2,3-4").fit(path, teacher=teacher)
    three = RaptorFitter(**params, partition="1-1,2-2,3-4").fit(path, teacher=teacher)
    assert [entry.get("reused", False) for entry in three.history_] == [False, False, True]
    assert [entry["block"] for entry in three.history_] == [1, 2, 3]
    for name, value in two.model_.blocks[1].state_dict().items():
        torch.testing.assert_close(three.model_.blocks[2].state_dict()[name], value, atol=0, rtol=0)
    fresh = RaptorFitter(**{**params, "stage1_cache": None}, partition="1-1,2-2,3-4").fit(path, teacher=teacher)
    for name, value in fresh.model_.state_dict().items():
        torch.testing.assert_close(three.model_.state_dict()[name], value, atol=0, rtol=0)


def test_loss_weights_are_used_as_given_and_per_segment():
    generator = torch.Generator().manual_seed(0)
    predicted, target = torch.randn(2, 4, 8, generator=generator), torch.randn(2, 4, 8, generator=generator)
    groups = {"cls": torch.tensor([0]), "patch": torch.tensor([1, 2, 3])}  # no registers
    weights = loss_weights({"cls": 0.45, "register": 0.10, "patch": 0.45}, None)
    by_hand = 0.45 * ((predicted[:, :1] - target[:, :1]) ** 2).mean() + 0.45 * ((predicted[:, 1:] - target[:, 1:]) ** 2).mean()
    torch.testing.assert_close(token_loss(predicted, target, weights, groups), by_hand)  # not renormalised to 0.5/0.5
    last = {"dist": 0.34, **PAPER_STAGE1_LAST_WEIGHTS}
    assert stage1_weights("paper", 3) == [None, None, last] and stage1_weights("mse", 2) == [None, None]
    assert stage1_weights(["mse", {"cls": 1.0, "patch": 2.0}], 2) == [None, {"dist": 1.0, "cls": 1.0, "patch": 2.0}]
    with pytest.raises(ValueError, match="one per segment"):
        stage1_weights(["mse", "mse"], 3)
    with pytest.raises(ValueError, match="non-negative"):
        loss_weights({"cls": -1.0}, None)
    assert parse_loss("0.34/0.33/0.33") == {"cls": 0.34, "register": 0.33, "patch": 0.33}
    assert parse_loss("cls=1,patch=0.5") == {"cls": 1.0, "patch": 0.5} and parse_loss("mse") == "mse"
    with pytest.raises(ValueError, match="cannot read the loss"):
        parse_loss("0.5/0.5")


def test_a_segment_stops_when_its_held_out_r2_stops_improving():
    fitter = RaptorFitter(steps=1000, warmup=0.05, tf_anneal=0.25, patience=3, tol=1e-3)
    stage1, stage2 = raptor_train.Segment(1, 0, 0, 4, 1000, None), raptor_train.Segment(2, 0, 0, 4, 1000, None)

    def validations(scores):
        return [{"step": 50 * (i + 1), "val_r2": score} for i, score in enumerate(scores)]

    flat = validations([0.1] * 5 + [0.9, 0.95, 0.9505, 0.9508, 0.9509])  # steps 300.. come after the anneal (250)
    rising = validations([0.1] * 5 + [0.9, 0.95, 0.96, 0.97, 0.98])
    assert raptor_train.plateaued(fitter, stage1, flat) and not raptor_train.plateaued(fitter, stage1, rising)
    assert not raptor_train.plateaued(fitter, stage1, validations([0.5] * 5))  # all before the anneal ends
    assert raptor_train.plateaued(fitter, stage2, validations([0.5] * 5))  # stage 2 has no anneal, only the warmup
    assert not raptor_train.plateaued(RaptorFitter(patience=0), stage1, flat)
    assert "stops earlier once its last 3 validations" in raptor_train.stopping_rule(fitter)


def test_a_per_layer_step_budget_gives_every_partition_of_a_k_the_same_stage1_steps():
    """step_budget="layer": a phase of n blocks trains n * steps in stage 1, so [1][2-12] and [1-6][7-12] both train 12 * steps."""
    totals = {}
    for partition in ("1-1,2-12", "1-6,7-12", "1-11,12-12"):
        fitter = RaptorFitter(steps=5, step_budget="layer", stage2_steps=7)
        fitter.partition_, fitter.model_ = Partition.parse(partition, 12), types.SimpleNamespace(num_layers=12)
        found = raptor_train.segments(fitter)
        assert [s.steps for s in found if s.stage == 1] == [5 * len(phase) for phase in fitter.partition_]
        assert found[-1].stage == 2 and found[-1].steps == 7
        totals[partition] = sum(s.steps for s in found if s.stage == 1)
    assert set(totals.values()) == {60}
    fitter.step_budget = "segment"
    assert [s.steps for s in raptor_train.segments(fitter) if s.stage == 1] == [5, 5]
    assert "per block of a stage-1 segment's phase" in raptor_train.stopping_rule(RaptorFitter(step_budget="layer", patience=2))
    fitter.step_budget = "phase"
    with pytest.raises(ValueError, match="step_budget must be 'segment' or 'layer'"):
        raptor_train.segments(fitter)


def test_reader_processes_fork_even_where_the_caller_spawns(tied):
    """A fit inside a spawned worker (the study scripts' process pools) must not re-import torch for every segment's reader."""
    _, path = tied
    ds = dynamo.open_trajectories(path)
    context = multiprocessing.get_context("spawn")
    loader = trajectory_loader(ds, np.arange(ds.sizes["image"]), 0, 2, batch_size=4)
    assert loader.multiprocessing_context.get_start_method() == "fork"
    assert context.get_start_method() == "spawn"  # the caller's own context is left as it is


def test_default_partition_is_the_max_cut_phases_when_contiguous(monkeypatch):
    blocks = np.array([0, 0, 0, 1, 1, 1])
    monkeypatch.setattr(pipeline_fit, "layer_similarity", lambda ds, progress, tokens=None: _matrix((blocks[:, None] != blocks[None]).astype(float)))
    partition, source = pipeline_fit.default_partition(None, 2)
    assert partition == [[1, 2, 3], [4, 5, 6]] and source.startswith("max-cut")
    alternating = np.array([0, 1, 0, 1, 0, 1])  # max-cut pairs layers 1, 3, 5 against 2, 4, 6
    monkeypatch.setattr(pipeline_fit, "layer_similarity", lambda ds, progress, tokens=None: _matrix((alternating[:, None] != alternating[None]).astype(float)))
    partition, source = pipeline_fit.default_partition(None, 2)
    assert partition.is_contiguous and len(partition) == 2 and "not contiguous" in source


@pytest.mark.slow
def test_tied_test_vit_converges_with_the_defaults(tmp_path, capsys):
    """timm's test_vit with its six blocks tied to one module is one recurrent GELU block exactly:
    `dynamo fit STORE --k 1 --mlp gelu` with every other setting its default (train until the held-out
    R² stops improving) reaches R² > 0.99 at every layer, on the 360 bundled digits (minutes on 2 cores)."""
    torch.manual_seed(0)
    module = timm.create_model("test_vit", pretrained=False)
    state = module.state_dict()
    tied = {name: state["blocks.0." + name.split(".", 2)[2]].clone() if name.startswith("blocks.") else value
            for name, value in state.items()}
    save_file({name: value.contiguous() for name, value in tied.items()}, tmp_path / "test_vit_tied.safetensors")
    store = tmp_path / "tied.zarr"
    dynamo.record(dynamo.load_model("test_vit", checkpoint=tmp_path / "test_vit_tied.safetensors"),
                  dynamo.image_set(zoo.default_images()), store, progress=False)
    assert main(["fit", str(store), "--k", "1", "--mlp", "gelu", "--out", str(tmp_path / "fit"), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert min(summary["r2_per_layer"]) > 0.99, summary["r2_per_layer"]
    assert "stops earlier once" in summary["stopping"]


def _matrix(values: np.ndarray) -> xr.DataArray:
    """A stand-in layer dissimilarity, shaped as `analyses.similarity.layer_similarity` returns it."""
    return xr.DataArray(values, dims=("layer_i", "layer_j"), attrs={"tokens": "cls+patch_mean"})
