"""Learned registers beside test-time ones: layouts at every block, CLS entering late, fine-tuning, from scratch,
distillation, checkpoints, the command line and torchrun."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_time_registers import (InvalidArgumentError, LearnableRegisters, ModifiedModel, RegisteredModel,
                                 UnsupportedModelError, find_register_neurons, load_trained_registers)
from test_time_registers.clip import ClipHookManager
from test_time_registers.deit import DeitHookManager
from test_time_registers.hooks import HookSite
from test_time_registers.data.sources import default_transform
from test_time_registers.edits import PaperEdit
from test_time_registers.loading import LoadedModel
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.planting import marker_images, plant_register_neurons
from test_time_registers.scripts import train_registers
from test_time_registers.training.registers import apply_trained_registers, save_trained_registers
from test_time_registers.training.train import (TrainingOptions, fine_tuning_setup, from_scratch_setup, parameter_digest,
                                          scene_images, train, vitrgts_to_timm)
from tests.tiny_models import ARCHITECTURES, IMAGE_SIZE, LAYERS, clip_model, hook_count, timm_model

TINY_VIT = "image_size=32,patch_size=8,dim=32,depth=2,heads=2,mlp_dim=64"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests train: on a shared 2-core machine one thread is many times faster than two fighting ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pixels():
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def deit3(seed: int = 0):
    """A tiny timm DeiT-III (no_embed_class, layer scale) and its hook manager."""
    model = timm_model("deit3_small_patch16_224", seed=seed)
    return model, DeitHookManager(model)


def manual_forward(model, pixels, registers: torch.Tensor, insert_at: int, cls_pos: int | None = None):
    """timm's forward written out, with ``registers`` [1, K, D] entering after the prefix at block ``insert_at``
    and CLS at block ``cls_pos``: what RegisteredModel must compute."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
    batch, count = len(pixels), registers.shape[1]
    held = None
    if cls_pos is not None:
        held, tokens = tokens[:, :1], tokens[:, 1:]
    for index, block in enumerate(model.blocks):
        if index == cls_pos:
            tokens = torch.cat([held, tokens], dim=1)
        if index == insert_at:
            where = 1 if cls_pos is None or index >= cls_pos else 0
            tokens = torch.cat([tokens[:, :where], registers.expand(batch, -1, -1), tokens[:, where:]], dim=1)
        tokens = block(tokens)
    tokens = torch.cat([tokens[:, :1], tokens[:, 1 + count:]], dim=1)
    return model.forward_head(model.norm(tokens))


# ---------------------------------------------------------------------------- the tokens and their layout

def test_learned_registers_before_block_0_are_timm_reg_tokens(pixels):
    with_tokens = timm_model("vit_small_patch16_224", reg_tokens=4, no_embed_class=True)
    plain = timm_model("vit_small_patch16_224", no_embed_class=True)
    plain.load_state_dict({key: value for key, value in with_tokens.state_dict().items() if key != "reg_token"})
    hook_manager = DeitHookManager(plain)
    registers = LearnableRegisters.for_model(hook_manager, 4)
    with torch.no_grad():
        registers.tokens.copy_(with_tokens.reg_token)
    registered = RegisteredModel(plain, hook_manager, registers)
    with torch.no_grad():
        assert torch.equal(registered(pixels), with_tokens(pixels))
    assert registered.hook_manager.layout == DeitHookManager(with_tokens).layout
    assert registered.register_tokens.shape == (3, 4, 64)
    assert hook_count(plain) == 0
    assert isinstance(registers.tokens, torch.nn.Parameter) and registers.tokens.shape == (1, 4, 64)


def test_registers_entering_at_a_later_block_and_the_layout_at_every_block(pixels):
    model, hook_manager = deit3()
    registers = LearnableRegisters.for_model(hook_manager, 3, insert_at=2, seed=1)
    registered = RegisteredModel(model, hook_manager, registers)
    view = registered.hook_manager
    with torch.no_grad():
        assert torch.allclose(registered.forward_images(pixels), manual_forward(model, pixels, registers.tokens, 2),
                              atol=1e-5)
        assert [view.layout_at(block).num_trained_registers for block in range(LAYERS)] == [0, 0, 3, 3]
        assert view.layout.num_trained_registers == 3 and hook_manager.layout_at(1) == hook_manager.layout
        # The tokens that really exist, read on the bare blocks, follow layout_at ...
        true_lengths = {}
        with hook_manager.hooks() as hooks:
            for block in range(LAYERS):
                hooks.on(HookSite(model.blocks[block], "input"),
                         lambda tokens, block=block: true_lengths.__setitem__(block, tokens.shape[1]))
            registered.forward_images(pixels)
        patches = 64
        assert true_lengths == {block: view.layout_at(block).num_prefix + patches for block in range(LAYERS)}
        # ... and every site of the registered model shows the final layout, with zero placeholders before block 2.
        with view.capture(residual=range(LAYERS), neurons=range(LAYERS), attention=[0, 3]) as captured:
            registered.forward_images(pixels)
    learned = view.layout.trained_registers()
    for block in range(LAYERS):
        assert captured.residual[block].shape[1] == captured.neurons[block].shape[1] == 1 + 3 + patches
        empty = bool((captured.neurons[block][:, learned] == 0).all())
        assert empty == (block < 2)
    assert (captured.attention[0][..., learned, :] == 0).all() and (captured.attention[3][..., learned, :] != 0).any()
    assert captured.patches("residual", 0).shape == (3, patches, 64)
    assert hook_count(model) == 0


def test_cls_can_enter_at_a_chosen_block_of_a_timm_vit(pixels):
    model, hook_manager = deit3()
    registers = LearnableRegisters.for_model(hook_manager, 2, insert_at=1, cls_pos=3, seed=2)
    registered = RegisteredModel(model, hook_manager, registers)
    with torch.no_grad():
        expected = manual_forward(model, pixels, registers.tokens, 1, cls_pos=3)
        assert torch.allclose(registered.forward_images(pixels), expected, atol=1e-5)
        with registered.hook_manager.capture(residual=[0, 2, 3]) as captured:
            registered.forward_images(pixels)
    layouts = [registered.hook_manager.layout_at(block) for block in range(LAYERS)]
    assert [(layout.num_cls, layout.num_trained_registers) for layout in layouts] == [(0, 0), (0, 2), (0, 2), (1, 2)]
    assert (captured.residual[0][:, 0] == 0).all() and (captured.residual[2][:, 0] == 0).all()
    assert (captured.residual[3][:, 0] != 0).all()
    assert hook_count(model) == 0
    clip = ClipHookManager(clip_model(layers=2))
    with pytest.raises(UnsupportedModelError, match="cls_pos needs a timm VisionTransformer"):
        RegisteredModel(clip.model, clip, LearnableRegisters.for_model(clip, 1, cls_pos=1))
    with pytest.raises(InvalidArgumentError, match="insert_at must be an int in 0..3"):
        RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 1, insert_at=4))


class Recorder:
    """An edit that keeps what it was given, then applies ``inner``."""

    def __init__(self, inner):
        self.inner, self.seen = inner, {}

    def __call__(self, activations, neurons, layout, context):
        self.seen[context.layer] = (activations.clone(), layout)
        return self.inner(activations, neurons, layout, context)


def test_test_time_registers_on_a_model_with_learned_registers_edit_the_right_tokens(pixels):
    model, hook_manager = deit3()
    registered = RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 2, insert_at=2))
    view = registered.hook_manager
    neurons = [(0, 5), (0, 9), (3, 7)]
    recorder = Recorder(PaperEdit())
    with torch.no_grad():
        modified = ModifiedModel(registered, view, neurons, num_registers=1, edit=recorder)
        true = {}
        with hook_manager.hooks() as hooks:   # the bare sites, placed after the edits: the edited tokens as they are
            for layer in (0, 3):
                hooks.on(hook_manager.neuron_site(layer), lambda acts, layer=layer: true.__setitem__(layer, acts))
            output = modified.forward_images(pixels)
        assert torch.equal(modified(pixels), output) and output.shape == (3, 1000)
    for layer, learned_in in ((0, False), (3, True)):
        seen, layout = recorder.seen[layer]
        assert layout == view.layout.with_test_time_registers(1) and seen.shape[1] == 1 + 2 + 64 + 1
        assert bool((seen[:, layout.trained_registers()] == 0).all()) == (not learned_in)
        real = view.layout_at(layer).with_test_time_registers(1)
        assert true[layer].shape[1] == real.num_prefix + 64 + 1
        for neuron in [n for l, n in neurons if l == layer]:
            moved = seen[:, layout.mask(seen.shape[1], cls=True, patches=True), neuron].amax(dim=1)
            edited = true[layer][:, :, neuron]
            assert (edited[:, real.mask(edited.shape[1], cls=True, patches=True)] == 0).all()
            assert torch.equal(edited[:, real.test_time_registers(edited.shape[1])][:, 0], moved)
    assert hook_count(model) == 0
    bare = ModifiedModel(model, view, neurons, num_registers=1)
    with pytest.raises(InvalidArgumentError, match="run the model through its RegisteredModel"):
        bare(pixels)
    assert hook_count(model) == 0


def test_discovery_and_the_test_time_register_work_on_a_model_with_learned_registers():
    model, hook_manager = deit3()
    registered = RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 2, insert_at=1))
    view = registered.hook_manager
    with torch.no_grad():
        planted = plant_register_neurons(view, marker_images(24, IMAGE_SIZE, 8, seed=0), 1, 3)
    held_out = marker_images(24, IMAGE_SIZE, 8, seed=1).pixel_values
    neurons = find_register_neurons(view, held_out, top_k=3, progress=False)
    assert sorted(neurons.pairs()) == planted
    before = measure_outliers(view, held_out)
    after = measure_outliers(ModifiedModel(registered, view, neurons, num_registers=1).hook_manager, held_out)
    assert before.worst_max_over_median >= 10 and after.worst_max_over_median <= 2
    assert hook_count(model) == 0


def test_a_failing_hook_leaves_nothing_behind_and_the_next_pass_is_clean(pixels):
    model, hook_manager = deit3()
    registered = RegisteredModel(model, hook_manager, LearnableRegisters.for_model(hook_manager, 2, insert_at=2))
    with torch.no_grad():
        expected = registered.forward_images(pixels)

        def fail(_tokens):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"), registered.hook_manager.hooks() as hooks:
            hooks.on_block_output(2, fail)
            registered.forward_images(pixels)
        assert hook_count(model) == 0
        assert torch.equal(registered.forward_images(pixels), expected)


REFUSED = {"openclip-relpos-trunk", "timm-beit", "timm-beit-shared-bias", "hf-siglip2"}   # biases or masks for appended tokens
ONLY_BEFORE_BLOCK_0 = {"openclip-eva-trunk", "timm-eva02"}                                   # a prefix count in every block


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda arch: arch.name)
def test_every_architecture_takes_learned_registers_or_says_why_not(arch, pixels):
    model = arch.build()
    hook_manager = arch.hook_manager(model)
    for insert_at in (0, 1):
        registers = LearnableRegisters.for_model(hook_manager, 2, insert_at=insert_at)
        if arch.name in REFUSED or (insert_at and arch.name in ONLY_BEFORE_BLOCK_0):
            with pytest.raises(UnsupportedModelError):
                RegisteredModel(model, hook_manager, registers)
            continue
        registered = RegisteredModel(model, hook_manager, registers)
        view = registered.hook_manager
        with torch.no_grad():
            with view.capture(residual=[0, LAYERS - 1], neurons=[0]) as captured:
                registered.forward_images(pixels)
            modified = ModifiedModel(registered, view, [(0, 1), (2, 3)], num_registers=1)
            with modified.capture(residual=[0, LAYERS - 1]) as edited:
                modified.forward_images(pixels)
        length = captured.residual[LAYERS - 1].shape[1]
        assert view.layout.num_trained_registers == arch.num_trained_registers + 2
        assert captured.residual[0].shape[1] == captured.neurons[0].shape[1] == length
        assert edited.residual[0].shape[1] == edited.residual[LAYERS - 1].shape[1] == length + 1
        assert registered.register_tokens.shape[:2] == (3, 2) and modified.register_tokens.shape[:2] == (3, 1)
        assert hook_count(model) == 0


def test_models_whose_biases_assume_appended_tokens_are_refused():
    beit = timm_model("beit_base_patch16_224")
    from test_time_registers.deit import BeitHookManager

    hook_manager = BeitHookManager(beit)
    with pytest.raises(UnsupportedModelError, match="relative position bias"):
        RegisteredModel(beit, hook_manager, LearnableRegisters.for_model(hook_manager, 1))


# ---------------------------------------------------------------------------- training

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


# ---------------------------------------------------------------------------- the command line

def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_the_command_line_writes_the_registers_and_their_metadata(tmp_path, capsys):
    out = tmp_path / "run"
    code = train_registers.main(["--from-scratch", "--model", "timm:vit_small_patch16_224", "--vit", TINY_VIT,
                                 "--num-images", "32", "--epochs", "2", "--batch-size", "16", "--num-registers", "2",
                                 "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "epoch 1/2: loss" in printed and "epoch 2/2: loss" in printed and f"wrote {out}" in printed
    metadata = json.loads((out / "registers.json").read_text())
    assert metadata["from_scratch"]["kwargs"]["reg_tokens"] == 2 and metadata["options"]["epochs"] == 2
    assert len(metadata["history"]["epoch_losses"]) == 2 and "model.reg_token" in metadata["parameters"]
    assert load_trained_registers(out).hook_manager.layout.num_trained_registers == 2


@pytest.fixture(scope="module")
def distilled_clip(tmp_path_factory, registered_config):
    """Registers fine-tuned on a tiny random open_clip model by the command line, by distillation."""
    out = tmp_path_factory.mktemp("clip")
    code = train_registers.main(["--model", f"openclip:{registered_config}:random", "--objective", "distill",
                                 "--freeze-layers", "1", "--l2-weight", "0.01", "--num-images", "8", "--batch-size",
                                 "4", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_the_command_line_fine_tunes_an_openclip_model_by_distillation(distilled_clip):
    out = distilled_clip
    metadata = json.loads((out / "registers.json").read_text())
    assert metadata["base_model"].endswith(":random") and metadata["options"]["objective"] == "distill"
    assert not any(".transformer.resblocks.0." in name for name in metadata["parameters"])
    restored = load_trained_registers(out)
    assert restored.hook_manager.layout.num_trained_registers == 4
    assert restored.hook_manager.forward_methods == ("encode_image",)
    with torch.no_grad():
        assert restored.model.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 32)


def test_evaluate_compares_the_fine_tuned_registers_in_its_third_column(tmp_path, distilled_clip, registered_config,
                                                                        capsys):
    from test_time_registers import RegisterNeurons
    from test_time_registers.scripts import evaluate

    spec = f"openclip:{registered_config}:random"
    neurons = tmp_path / "neurons.json"
    RegisterNeurons.coerce([(0, 3), (1, 5)]).save(neurons)
    images = tmp_path / "images"   # no classes: the tiny text tower's vocabulary is too small for zero-shot prompts
    images.mkdir()
    for index, scene in enumerate(scene_images(8, size=IMAGE_SIZE, seed=3).read.images):
        scene.save(images / f"{index}.png")
    code = evaluate.main(["--model", spec, "--neurons", str(neurons), "--images", str(images), "--trained-model",
                          f"registers:{distilled_clip}", "--json", str(tmp_path / "table.json"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["columns"] == ["original", "with 1 test-time register", "trained registers"]
    assert all(len(row["values"]) == 3 and row["values"][2] is not None for row in table["rows"][:2])


@pytest.fixture
def empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


@pytest.fixture
def flat_folder(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for index, image in enumerate(scene_images(2, size=32).read.images):
        image.save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--images", "{empty}"], "image folder is empty"),
    (["--images", "{flat}", "--from-scratch", "--vit", TINY_VIT], "needs images of at least 2 classes"),
    (["--cifar10", "{tmp}/nowhere"], "no CIFAR-10 in .*cifar-10-batches-py"),
    (["--from-scratch", "--model", "demo"], "--from-scratch builds a timm VisionTransformer"),
    (["--from-scratch", "--freeze-layers", "2"], "--freeze-layers would mean nothing"),
    (["--vit", "dim=32"], "--vit sets the architecture .* add --from-scratch"),
    (["--from-scratch", "--vit", "depth=two"], "depth needs a number"),
    (["--from-scratch", "--vit", "width=3"], "KEY one of image_size"),
    (["--precision", "bf16"], r"invalid choice: 'bf16' \(choose from 'fp32', 'amp_bf16'\)"),
    (["--from-scratch", "--vit", TINY_VIT, "--num-images", "8", "--insert-at", "5"], "--insert-at must be an int in 0..1"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, empty_folder, flat_folder, capsys, flags, message):
    flags = [flag.format(empty=empty_folder, flat=flat_folder, tmp=tmp_path) for flag in flags]
    assert train_registers.main([*flags, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert re.search(message, error_line(capsys))
    assert not (tmp_path / "out" / "registers.safetensors").exists()


def test_freezing_more_blocks_than_the_model_has_is_one_line(tmp_path, capsys, registered_config):
    code = train_registers.main(["--model", f"openclip:{registered_config}:random", "--objective", "distill",
                                 "--freeze-layers", "9", "--num-images", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert "--freeze-layers 9 but the model has 3 blocks" in error_line(capsys)


def test_torchrun_two_ranks_agree_and_rank_0_saves(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = Path(train_registers.__file__)
    run = subprocess.run([*torchrun, str(script), "--from-scratch", "--vit", TINY_VIT, "--num-images", "32",
                          "--epochs", "2", "--batch-size", "8", "--out", str(tmp_path / "out"), "--quiet"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    digests = re.findall(r"rank \d: trained parameters sha256 ([0-9a-f]{64})", run.stdout)   # lines may interleave
    assert len(digests) == 2 and digests[0] == digests[1], run.stdout + run.stderr
    assert run.stdout.count("wrote ") == 2   # the weights and the metadata, once
    metadata = json.loads((tmp_path / "out" / "registers.json").read_text())
    assert metadata["world_size"] == 2 and len(metadata["history"]["epoch_losses"]) == 2
    restored = load_trained_registers(tmp_path / "out")
    names = metadata["parameters"]
    assert parameter_digest(restored.model, names) == digests[0]


def test_the_from_scratch_experiment_reports_accuracy_and_norms_by_block(tmp_path, capsys):
    from test_time_registers.scripts import registers_from_scratch

    code = registers_from_scratch.main(["--vit", TINY_VIT, "--train-images", "32", "--test-images", "16", "--epochs",
                                        "1", "--batch-size", "16", "--out", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    without, with_registers = results["runs"]["0"], results["runs"]["4"]
    assert 0 <= with_registers["test_accuracy"] <= 1 and len(without["norms"]["patch_max_over_median"]) == 2
    assert without["norms"]["register_over_median"] is None and len(with_registers["norms"]["register_over_median"]) == 2
    assert all(value >= 1 for value in with_registers["norms"]["worst_patch_max_over_median"])
    assert "no_outliers" in without["discovery"] or without["discovery"]["neurons"]
    assert load_trained_registers(tmp_path / "registers-4").hook_manager.layout.num_trained_registers == 4


def test_generated_scenes_are_labelled_by_shape_or_texture():
    from test_time_registers.clip.demo import SHAPES, TEXTURES, demo_scenes

    shapes, textures = scene_images(12, size=32), scene_images(12, size=32, task="texture")
    scenes = demo_scenes(12, size=32)
    assert shapes.labels == [scene.label for scene in scenes] and shapes.class_names == list(SHAPES)
    assert textures.labels == [scene.texture_label for scene in scenes] and textures.class_names == list(TEXTURES)
    with pytest.raises(InvalidArgumentError, match="task must be one of"):
        scene_images(4, task="colour")
