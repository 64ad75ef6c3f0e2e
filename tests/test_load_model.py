"""``load_model(spec, neurons=...)``: the model with its test-time registers in one call."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_time_registers import (IncompatibleNeuronsError, InvalidArgumentError, ModifiedModel, RegisterNeurons,
                                 load_model)
from test_time_registers import registry
from test_time_registers.data.scenes import demo_images


@pytest.fixture(scope="module")
def pixels():
    _, preprocess, _ = registry.load_model("demo")
    return torch.stack([preprocess(image) for image in demo_images(3, seed=2)])


def test_without_neurons_it_is_the_registrys_bare_model():
    model, _, hook_manager = load_model("demo")
    assert not isinstance(model, ModifiedModel) and hook_manager.layout.num_test_time_registers == 0


def test_with_neurons_it_returns_the_wrapper_its_preprocessing_and_its_view(pixels, tmp_path):
    bare = registry.load_model("demo")
    loaded = load_model("demo", neurons="planted", num_registers=2)
    modified, preprocess, view = loaded
    assert isinstance(modified, ModifiedModel) and modified.num_registers == 2
    assert view is modified.hook_manager and view.layout.num_test_time_registers == 2
    assert loaded.planted == bare.planted and preprocess is not None
    by_hand = ModifiedModel(bare.model, bare.hook_manager, bare.planted, num_registers=2)
    with torch.no_grad():
        torch.testing.assert_close(modified.encode_image(pixels), by_hand.encode_image(pixels))
        torch.testing.assert_close(view.forward_images(pixels), by_hand.forward_images(pixels))
        assert (modified.encode_image(pixels) - bare.model.encode_image(pixels)).abs().max() > 1e-2

    path = tmp_path / "neurons.json"
    RegisterNeurons.coerce(bare.planted).save(path)
    from_file, _, _ = load_model("demo", neurons=path)
    with torch.no_grad():
        torch.testing.assert_close(from_file.encode_image(pixels), ModifiedModel(
            bare.model, bare.hook_manager, bare.planted).encode_image(pixels))


def test_neurons_found_on_another_model_are_refused_unless_forced(tmp_path):
    _, _, hook_manager = registry.load_model("demo")
    other = dataclasses.replace(RegisterNeurons.coerce([(4, 1), (4, 2)]), model="openclip:ViT-L-14/openai")
    path = tmp_path / "other.json"
    other.save(path)
    with pytest.raises(IncompatibleNeuronsError, match="found on openclip:ViT-L-14/openai.*force=True"):
        load_model("demo", neurons=path)
    forced, _, _ = load_model("demo", neurons=path, force=True)
    assert forced.neurons.pairs() == [(4, 1), (4, 2)]
    with pytest.raises(IncompatibleNeuronsError, match="layer 99"):
        load_model("demo", neurons=RegisterNeurons.coerce([(99, 0)]))
    with pytest.raises(InvalidArgumentError, match="planted"):
        load_model("timm:vit_tiny_patch16_224:random", neurons="planted")
