"""Training registers (test_time_registers.training.train): fine-tuning, from scratch and distillation on tiny models."""

import json

import pytest
import torch

from test_time_registers import InvalidArgumentError, load_trained_registers
from test_time_registers.clip import ClipHookManager
from test_time_registers.data.labelled import scene_images
from test_time_registers.data.sources import default_transform
from test_time_registers.deit import DeitHookManager
from test_time_registers.loading import LoadedModel
from test_time_registers.training.registers import apply_trained_registers, save_trained_registers
from test_time_registers.errors import NonFiniteLossError
from test_time_registers.training.train import (TrainingOptions, fine_tuning_setup,
                                                from_scratch_setup, train, vitrgts_to_timm)
from tests.tiny_models import IMAGE_SIZE, clip_model, timm_model

pytestmark = pytest.mark.usefixtures("one_thread")


def deit3(seed: int = 0):
    """A tiny timm DeiT-III (no_embed_class, layer scale) and its hook manager."""
    model = timm_model("deit3_small_patch16_224", seed=seed)
    return model, DeitHookManager(model)


def tiny_loaded(model, hook_manager) -> LoadedModel:
    return LoadedModel(model, default_transform(IMAGE_SIZE), hook_manager)


def test_fine_tuning_a_tiny_deit3(tmp_path):
    model, hook_manager = deit3()
    loaded = tiny_loaded(model, hook_manager)
    data = scene_images(24, size=IMAGE_SIZE).with_preprocess(loaded.preprocess)
    probe = torch.stack([data[0][0], data[1][0]])
    setup = fine_tuning_setup(loaded, probe, num_registers=2, freeze_layers=2, num_classes=4)
    registered = setup.registered
    assert setup.head_classes == 4 and model.head.out_features == 4
    frozen_prefixes = ("model.patch_embed.", "model.cls_token", "model.pos_embed", "model.blocks.0.", "model.blocks.1.")
    assert all(name.startswith(frozen_prefixes) for name in setup.plan.frozen)
    assert "registers.tokens" in setup.plan.trainable and "model.head.weight" in setup.plan.trainable
    assert "model.head.weight" not in setup.plan.anchored and "model.blocks.3.mlp.fc1.weight" in setup.plan.anchored
    before = {name: value.clone() for name, value in registered.state_dict().items()}
    history = train(setup, data, TrainingOptions(epochs=4, lr=3e-3, batch_size=8, l2_weight=1e-3, warmup=0))
    after = registered.state_dict()
    for name in setup.plan.frozen:
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["registers.tokens"], before["registers.tokens"])
    assert history.epoch_losses[-1] < history.epoch_losses[0]
    assert all(parameter.requires_grad for parameter in model.parameters())   # as they were

    save_trained_registers(tmp_path, registered, base_model="tiny", parameters=setup.plan.trainable,
                           head_classes=setup.head_classes)
    fresh_model, fresh_hook_manager = deit3()
    restored = apply_trained_registers(tmp_path, tiny_loaded(fresh_model, fresh_hook_manager))
    images = torch.stack([data[index][0] for index in range(4)])
    with torch.no_grad():
        assert torch.equal(restored.model.classify(images), registered.classify(images))
    metadata = json.loads((tmp_path / "registers.json").read_text())
    assert metadata["parameters"] == setup.plan.trainable and metadata["head_classes"] == 4
    assert metadata["base_model"] == "tiny" and metadata["learned_registers"] == 2


def test_a_vit_with_registers_trains_from_scratch_and_loads_back(tmp_path):
    vit = {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 3, "heads": 2, "mlp_dim": 64, "dropout": 0.1,
           "emb_dropout": 0.1}
    assert vitrgts_to_timm(vit) == {"no_embed_class": True, "img_size": 32, "patch_size": 8, "embed_dim": 32,
                                    "depth": 3, "num_heads": 2, "mlp_ratio": 2.0, "proj_drop_rate": 0.1,
                                    "attn_drop_rate": 0.1, "pos_drop_rate": 0.1}
    loaded, setup = from_scratch_setup("vit_small_patch16_224", vit, num_registers=4, num_classes=4, cls_pos=1)
    assert loaded.model.num_reg_tokens == 4 and setup.registered.hook_manager.layout.num_trained_registers == 4
    data = scene_images(32, size=32).with_preprocess(loaded.preprocess)
    registers_before = loaded.model.reg_token.clone()
    history = train(setup, data, TrainingOptions(epochs=2, lr=1e-3, batch_size=16))
    assert len(history.step_losses) == 4 and all(map(torch.isfinite, torch.tensor(history.step_losses)))
    assert not torch.equal(loaded.model.reg_token, registers_before)
    save_trained_registers(tmp_path, setup.registered, base_model=setup.base_model, parameters=setup.plan.trainable,
                           from_scratch=setup.from_scratch)
    restored = load_trained_registers(tmp_path)
    images = torch.stack([data[index][0] for index in range(4)])
    with torch.no_grad():
        assert torch.equal(restored.model.classify(images), setup.registered.classify(images))
    assert restored.hook_manager.layout_at(0).num_cls == 0 and restored.hook_manager.layout.num_cls == 1


def test_self_distillation_of_a_tiny_clip_trains_the_image_tower_only():
    model = clip_model(layers=3)
    hook_manager = ClipHookManager(model)
    loaded = tiny_loaded(model, hook_manager)
    data = scene_images(16, size=IMAGE_SIZE).with_preprocess(loaded.preprocess)
    probe = torch.stack([data[0][0], data[1][0]])
    setup = fine_tuning_setup(loaded, probe, num_registers=2, freeze_layers=1, objective="distill")
    assert all(name.startswith(("model.visual.", "registers.")) for name in setup.plan.trainable)
    assert "model.visual.proj" in setup.plan.trainable and "model.visual.conv1.weight" in setup.plan.frozen
    text = {name: value.clone() for name, value in model.state_dict().items() if not name.startswith("visual.")}
    history = train(setup, data, TrainingOptions(objective="distill", epochs=3, lr=3e-3, batch_size=8, warmup=0))
    assert history.epoch_losses[-1] < history.epoch_losses[0] and history.epoch_accuracy == [None] * 3
    assert all(torch.equal(model.state_dict()[name], value) for name, value in text.items())
    assert all(not parameter.requires_grad for parameter in setup.teacher.model.parameters())
    with pytest.raises(InvalidArgumentError, match="at least 2 classes"):
        fine_tuning_setup(loaded, probe, num_registers=1, objective="classify", num_classes=0)


def test_a_loss_that_becomes_nan_is_its_own_error_not_a_bad_argument():
    vit = {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64}
    _, setup = from_scratch_setup("vit_small_patch16_224", vit, num_registers=1, num_classes=4)
    data = scene_images(8, size=32).with_preprocess(lambda image: torch.full((3, 32, 32), float("nan")))
    with pytest.raises(NonFiniteLossError, match="the loss became nan at epoch 1; lower lr") as raised:
        train(setup, data, TrainingOptions(batch_size=4))
    assert not isinstance(raised.value, InvalidArgumentError)
