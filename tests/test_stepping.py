"""The block stepper reproduces the model's own forward: layers, logits, and layer swaps."""

from __future__ import annotations

import pytest
import torch
import xarray as xr

from dynamo.models import data_config
from dynamo.stepping import BlockStepper, propagator_for
from tests.conftest import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_embed_run_and_head_equal_the_models_own_forward(kind):
    loaded = tiny_model(kind)
    model = loaded.module
    size = data_config(model)["input_size"]
    pixels = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))
    stepper = BlockStepper(loaded)
    with torch.no_grad():
        states = stepper.run(stepper.embed(pixels), start=0)
        reference = model.forward_intermediates(pixels, norm=False, intermediates_only=True, output_fmt="NLC")
        logits = model(pixels)
        prefix = model.num_prefix_tokens
        for layer, expected in enumerate(reference, start=1):
            torch.testing.assert_close(states[layer][:, prefix:], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stepper.head(states[-1]), logits, rtol=1e-5, atol=1e-5)
        # entering mid-way continues the same trajectory
        tail = stepper.run(states[2], start=2)
        torch.testing.assert_close(tail[-1], states[-1])


def test_block_for_swaps_layers():
    loaded = tiny_model("cls")
    stepper = BlockStepper(loaded)
    x = torch.randn(2, loaded.layout.num_tokens, loaded.module.embed_dim)
    with torch.no_grad():
        swapped = stepper.run(x, start=0, stop=3, block_for=[1, 1, 3])
        by_hand = loaded.module.blocks[2](loaded.module.blocks[0](loaded.module.blocks[0](x)))
        torch.testing.assert_close(swapped[-1], by_hand)
        torch.testing.assert_close(stepper.run(x, 0, 3, block_for=lambda layer: [1, 1, 3][layer - 1])[-1], by_hand)
    with pytest.raises(ValueError, match="start <= stop"):
        stepper.run(x, start=3, stop=2)


def test_propagator_for_takes_a_model_a_timm_module_or_anything_that_runs():
    loaded, blank = tiny_model("cls"), xr.Dataset()
    assert isinstance(propagator_for(loaded, blank), BlockStepper)
    assert isinstance(propagator_for(loaded.module, blank), BlockStepper)
    stepper = BlockStepper(loaded)
    assert propagator_for(stepper, blank) is stepper
    with pytest.raises(ValueError, match="cannot propagate"):
        propagator_for(object(), blank)
