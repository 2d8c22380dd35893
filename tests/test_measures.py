"""ε of the ε-BRH, its stricter variant, per token kind and its skill over the identity; the loop count's depth signal.

Known answers: hand-built trajectories whose relative errors are chosen (closed forms), the identity rung (skill 0),
an exact Raptor of a tied-block ViT (ε 0, skill 1). Random weights: mechanics, not findings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynamo
from dynamo.partition import Partition
from dynamo.surrogates import IdentityFitter, IdentitySurrogate, RaptorFitter, epsilon, loop_count, loop_schedule
from dynamo.surrogates.measures import DEPTH_SIGNALS
from tests.synthetic import contract_dataset
from tests.test_perturbation import exact_raptor, tied_vit

pytestmark = pytest.mark.usefixtures("one_thread")

# relative errors (image, layer) whose two forms differ: every layer's mean is 0.3, every image's max 0.5, 0.5, 0.3
ERRORS = np.array([[0.1, 0.5], [0.5, 0.1], [0.3, 0.3]])
KINDS = ["cls", "patch", "patch", "patch"]


def chosen_errors(errors: np.ndarray, exact_cls: bool = False):
    """A store whose identity rollout (x_l = x_0) has relative errors ``errors`` (image, layer 1..L) on every token.

    Layer l of image i is x_0 / (1 + e_il), so ||x_0 - x_l|| / ||x_l|| = e_il; ``exact_cls`` keeps the cls token still.
    """
    generator = np.random.default_rng(0)
    start = generator.normal(size=(errors.shape[0], 1, len(KINDS), 8))
    scales = 1 / (1 + np.concatenate([np.zeros((errors.shape[0], 1)), errors], axis=1))
    hidden = np.repeat(start, errors.shape[1] + 1, axis=1) * scales[:, :, None, None]
    if exact_cls:
        hidden[:, :, 0] = start[:, :, 0]
    return contract_dataset(hidden.astype(np.float32), KINDS), hidden


def test_the_two_forms_of_epsilon_have_their_closed_forms():
    ds, _ = chosen_errors(ERRORS)
    result = epsilon(IdentitySurrogate(Partition([[1, 2]]), 2), ds, n_bootstrap=0)
    for kind in ("all", "cls", "patch"):
        np.testing.assert_allclose(result["relative_error"].sel(token_kind=kind).values, ERRORS, rtol=1e-6)
        assert float(result["epsilon"].sel(token_kind=kind)) == pytest.approx(0.3, rel=1e-6)  # max_l E_i e_il
        assert float(result["epsilon_strict"].sel(token_kind=kind)) == pytest.approx(1.3 / 3, rel=1e-6)  # E_i max_l
        assert float(result["epsilon_mean"].sel(token_kind=kind)) == pytest.approx(0.3, rel=1e-6)
        # the identity rung is the identity: no skill
        assert float(result["skill"].sel(token_kind=kind)) == pytest.approx(0.0, abs=1e-12)
        assert float(result["skill_strict"].sel(token_kind=kind)) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(result["epsilon_low"]).all()  # no resamples, no interval


def test_each_token_kind_is_scored_on_its_own_rows():
    ds, hidden = chosen_errors(ERRORS, exact_cls=True)
    result = epsilon(IdentitySurrogate(Partition([[1, 2]]), 2), ds, n_bootstrap=0)
    assert float(result["epsilon"].sel(token_kind="cls")) == 0.0
    np.testing.assert_allclose(result["relative_error"].sel(token_kind="patch").values, ERRORS, rtol=1e-6)
    # all tokens: brute force over the whole (token, feature) matrix
    truth = hidden.astype(np.float32).astype(np.float64)
    pooled = (np.linalg.norm(truth[:, 1:] - truth[:, :1], axis=(2, 3)) / np.linalg.norm(truth[:, 1:], axis=(2, 3)))
    np.testing.assert_allclose(result["relative_error"].sel(token_kind="all").values, pooled, rtol=1e-6)
    assert float(result["epsilon"].sel(token_kind="all")) == pytest.approx(pooled.mean(axis=0).max(), rel=1e-6)
    assert 0 < pooled.max() < ERRORS.max()  # the still cls token dilutes the pooled error


def test_bootstrap_resamples_images_jointly():
    generator = np.random.default_rng(1)
    ds, _ = chosen_errors(generator.uniform(0.05, 0.6, size=(30, 3)))
    result = epsilon(IdentitySurrogate(Partition([[1, 2, 3]]), 3), ds, n_bootstrap=300, seed=2)
    for name in ("epsilon", "epsilon_strict", "epsilon_mean"):
        low, value, high = (float(result[f"{name}{end}"].sel(token_kind="all")) for end in ("_low", "", "_high"))
        assert low < value < high, name
    # the identity scored against itself: every resample has skill 0
    assert float(result["skill_low"].sel(token_kind="all")) == pytest.approx(0.0, abs=1e-12)
    assert float(result["skill_high"].sel(token_kind="all")) == pytest.approx(0.0, abs=1e-12)
    again = epsilon(IdentitySurrogate(Partition([[1, 2, 3]]), 3), ds, n_bootstrap=300, seed=2)
    assert float(again["epsilon_low"].sel(token_kind="all")) == float(result["epsilon_low"].sel(token_kind="all"))


@pytest.fixture(scope="module")
def tied(digits_folder, tmp_path_factory):
    teacher = tied_vit()
    path = tmp_path_factory.mktemp("tied") / "tied.zarr"
    dynamo.record(teacher, dynamo.image_set(digits_folder), path, batch_size=16, progress=False)
    return teacher, dynamo.open_trajectories(path)


def test_an_exact_surrogate_has_no_error_and_full_skill_and_the_identity_none(tied):
    teacher, ds = tied
    images = np.arange(24)
    exact = epsilon(exact_raptor(teacher), ds, images=images, n_bootstrap=100)
    # exact up to float rounding (nn.MultiheadAttention vs timm's attention), amplified by the large-update blocks
    assert float(exact["epsilon"].max()) < 1e-2 and float(exact["epsilon_strict"].max()) < 1e-2
    assert float(exact["skill"].min()) > 0.99 and float(exact["skill_low"].min()) > 0.99
    assert exact["token_kind"].values.tolist() == ["all", "cls", "patch"]
    identity = epsilon(IdentityFitter(k=1).fit(ds, teacher=teacher).model_, ds, images=images, n_bootstrap=100)
    np.testing.assert_array_equal(identity["skill"].values, 0.0)
    np.testing.assert_allclose(identity["epsilon_identity"].values, exact["epsilon_identity"].values, rtol=1e-12)
    assert (identity["epsilon"] > 0.1).all()
    # the stricter variant bounds the ε-BRH's form from above
    assert (identity["epsilon_strict"] >= identity["epsilon"]).all()


def test_loop_count_at_scale_one_is_the_rollout_with_either_depth_signal(tied):
    """A Raptor whose depth signal matters: both mappings reproduce its rollout at scale 1 and differ at 2."""
    teacher, ds = tied
    fitter = RaptorFitter(k=2, steps=1, stage2_steps=0, lr=0.0, mlp="gelu", progress=False).fit(ds, teacher=teacher)
    model = fitter.model_
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
            block.depth.out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    images = np.arange(20)
    rollout = fitter.evaluate(ds, images=images, probe=False).attrs["r2_final"]
    loops = {signal: loop_count(model, ds, scales=(1.0, 2.0), images=images, depth_signal=signal) for signal in DEPTH_SIGNALS}
    for signal, result in loops.items():
        assert float(result["r2_final"].sel(scale=1.0)) == pytest.approx(rollout, abs=1e-9), signal
        assert result.attrs["depth_signal_rule"] == DEPTH_SIGNALS[signal]
    assert abs(float(loops["trained"]["r2_final"].sel(scale=2.0)) - float(loops["interpolated"]["r2_final"].sel(scale=2.0))) > 1e-4
    # without a depth signal the two mappings are one run
    still = {signal: loop_count(exact_raptor(teacher), ds, scales=(2.0,), images=images, depth_signal=signal)
             for signal in DEPTH_SIGNALS}
    assert float(still["trained"]["r2_final"][0]) == float(still["interpolated"]["r2_final"][0])


def test_the_trained_depth_signal_takes_only_layers_of_the_phase():
    phases = Partition([[1, 2, 3], [4, 5]])
    for scale in (0.5, 0.75, 1.0, 1.5, 2.0, 3.3):
        schedule = loop_schedule(phases, scale)
        for index, phase in enumerate(phases):
            signals = [t for block, t in schedule if block == index + 1]
            assert set(signals) <= set(phase) and signals == sorted(signals) and signals[-1] == phase[-1]
            if len(signals) >= len(phase):
                assert set(signals) == set(phase)
    assert loop_schedule(phases, 2.0) == [(1, 1.0), (1, 1.0), (1, 2.0), (1, 2.0), (1, 3.0), (1, 3.0), (2, 4.0), (2, 4.0),
                                          (2, 5.0), (2, 5.0)]
    assert loop_schedule(phases, 0.5) == [(1, 2.0), (1, 3.0), (2, 5.0)]  # round(1.5) = 2 steps, round(1) = 1
    assert loop_schedule(phases, 1.0) == loop_schedule(phases, 1.0, "interpolated")
    with pytest.raises(ValueError, match="depth_signal must be one of trained, interpolated"):
        loop_schedule(phases, 1.0, "nearest")
