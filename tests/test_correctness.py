"""Discovery against a naive Algorithm 1, calibration order, error types, hook clean-up and hook-site branches."""

import random
from collections import OrderedDict

import pytest
import torch
from PIL import Image
from torch import nn

from test_time_registers import (HookSite, ImageFolder, ModifiedModel, PaperEdit, RegisterNeurons,
                                 TestTimeRegistersError, TokenLayout, UnsupportedModelError, auto_threshold,
                                 find_register_neurons, load_model)
from test_time_registers.clip import ClipHookManager
from test_time_registers.deit import DeitHookManager
from test_time_registers.dinov2 import Dinov2HookManager
from test_time_registers.errors import NeuronFileError
from test_time_registers.analysis.figures import save_comparison
from test_time_registers.hooks import _first_tensor, _replace_first
from test_time_registers.data.batching import batches
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.precision import get_precision
from tests.tiny_models import hook_count

DETECT_LAYER = 2


def naive_algorithm_1(model, pixels, threshold, score, sparsity=None):
    """Algorithm 1 with plain loops, one image and one layer at a time; CLS is token 0 (open_clip).

    Returns ``{layer: scores [N]}`` for layers 0..DETECT_LAYER.
    """
    visual = model.visual
    activations, outputs = {}, {}
    handles = [block.mlp.c_proj.register_forward_pre_hook(lambda m, a, layer=layer: activations.__setitem__(layer, a[0]))
               for layer, block in enumerate(visual.transformer.resblocks)]
    handles += [block.register_forward_hook(lambda m, a, o, layer=layer: outputs.__setitem__(layer, o))
                for layer, block in enumerate(visual.transformer.resblocks)]
    totals = {layer: torch.zeros(visual.transformer.resblocks[layer].mlp.c_proj.in_features)
              for layer in range(DETECT_LAYER + 1)}
    images_with_outliers = 0
    try:
        for image in pixels:
            with torch.no_grad():
                visual(image[None])
            tokens = outputs[DETECT_LAYER][0]                                 # [L, D]
            outliers = [t for t in range(1, len(tokens)) if float(tokens[t].norm()) > threshold]
            if not outliers:
                continue
            images_with_outliers += 1
            for layer in totals:
                acts = activations[layer][0]                                 # [L, N]
                values = acts[outliers].abs() if score == "abs" else acts[outliers]
                contribution = values.mean(dim=0)
                if sparsity is not None:
                    low_fraction = (acts < sparsity[0]).float().mean(dim=0)    # over every token, CLS included
                    contribution = torch.where(low_fraction >= sparsity[1], contribution, torch.zeros(()))
                totals[layer] += contribution
    finally:
        for handle in handles:
            handle.remove()
    return {layer: total / images_with_outliers for layer, total in totals.items()}


@pytest.mark.parametrize("score, sparsity", [("raw", None), ("abs", None), ("raw", (0.05, 0.5)), ("abs", (0.0, 0.6))])
def test_discovery_scores_match_a_naive_algorithm_1(clip_model, clip_hm, score, sparsity):
    pixels = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), clip_hm.capture(residual=[DETECT_LAYER]) as cap:
        clip_hm.forward_images(pixels)
    threshold = float(cap.patches("residual", DETECT_LAYER).norm(dim=-1).quantile(0.8))   # about 3 outliers an image
    options = {} if sparsity is None else dict(sparsity_filter=True, sparsity_activation_threshold=sparsity[0],
                                                sparsity_frac_threshold=sparsity[1])
    neurons = 256 * (DETECT_LAYER + 1)
    found = find_register_neurons(clip_hm, pixels, top_k=neurons, threshold=threshold, detect_layer=DETECT_LAYER,
                                  highest_layer=DETECT_LAYER, score=score, batch_size=3, progress=False, **options)
    expected = naive_algorithm_1(clip_model, pixels, threshold, score, sparsity)
    got = {layer: torch.zeros(256) for layer in expected}
    for item in found:
        got[item.layer][item.neuron] = item.score
    assert len(found) == neurons
    for layer in expected:
        torch.testing.assert_close(got[layer], expected[layer], atol=1e-5, rtol=1e-4)
    if sparsity is not None:
        assert any((expected[layer] == 0).any() for layer in expected)   # the filter did remove some scores


@pytest.fixture(scope="module")
def two_class_folder(tmp_path_factory):
    """40 images sorted by class: 20 flat grey ones ("a_"), then 20 demo scenes ("b_")."""
    folder = tmp_path_factory.mktemp("classes")
    demo = load_model("demo")
    for index, scene in enumerate(demo.generate_images(20, 0)):
        Image.new("RGB", (224, 224), (100 + 5 * index, 100, 100)).save(folder / f"a_{index:02d}.png")
        scene.save(folder / f"b_{index:02d}.png")
    return folder, demo


def test_the_auto_threshold_calibrates_on_a_seeded_sample_whatever_the_file_order(two_class_folder):
    folder, demo = two_class_folder
    hm, preprocess = demo.hook_manager, demo.preprocess
    found = find_register_neurons(hm, ImageFolder(folder, seed=5), preprocess, top_k=4, progress=False)

    files = sorted(folder.iterdir())
    listed_otherwise = ImageFolder(folder, seed=5, files=list(reversed(files)))
    again = find_register_neurons(hm, listed_otherwise, preprocess, top_k=4, progress=False)
    assert again.threshold == found.threshold

    order = list(files)
    random.Random(5).shuffle(order)                     # the documented sample: the seeded shuffle's first 32
    sample = [Image.open(path).convert("RGB") for path in order[:32]]
    pixels = next(batches(sample, preprocess, 32, "cpu", torch.float32)).pixel_values
    with torch.no_grad(), hm.capture(residual=[hm.default_detect_layer]) as cap:
        hm.forward_images(pixels)
    assert found.threshold == pytest.approx(auto_threshold(cap.patches("residual", hm.default_detect_layer).norm(dim=-1)))
    assert {path.name[0] for path in order[:32]} == {"a", "b"}         # both classes, not the first 32 sorted

    sorted_first = find_register_neurons(hm, (Image.open(path).convert("RGB") for path in files), preprocess,
                                         top_k=4, progress=False)     # an iterable: its first 32, 20 of them grey
    assert sorted_first.threshold != pytest.approx(found.threshold)


def test_in_memory_images_calibrate_on_seeded_positions(demo):
    _, preprocess, _, images = demo
    hm = load_model("demo").hook_manager
    one = find_register_neurons(hm, images[:40], preprocess, top_k=4, seed=1, batch_size=16, progress=False)
    two = find_register_neurons(hm, images[:40], preprocess, top_k=4, seed=1, batch_size=5, progress=False)
    other = find_register_neurons(hm, images[:40], preprocess, top_k=4, seed=2, progress=False)
    assert one.threshold == pytest.approx(two.threshold) and one.threshold != other.threshold


@pytest.fixture
def tiny(clip_model, clip_hm):
    return clip_model, clip_hm


BAD_CALLS = {
    "top_k": lambda m, hm, px: find_register_neurons(hm, px, top_k=0),
    "threshold": lambda m, hm, px: find_register_neurons(hm, px, threshold=-1.0),
    "score": lambda m, hm, px: find_register_neurons(hm, px, score="max"),
    "detect_layer": lambda m, hm, px: find_register_neurons(hm, px, detect_layer=9),
    "highest_layer": lambda m, hm, px: find_register_neurons(hm, px, detect_layer=1, highest_layer=2),
    "sparsity": lambda m, hm, px: find_register_neurons(hm, px, sparsity_filter=True, sparsity_frac_threshold="x"),
    "batch_size": lambda m, hm, px: find_register_neurons(hm, px, batch_size=0),
    "device": lambda m, hm, px: find_register_neurons(hm, px, device="meta"),
    "image shape": lambda m, hm, px: find_register_neurons(hm, px[0]),
    "no preprocess": lambda m, hm, px: find_register_neurons(hm, [Image.new("RGB", (8, 8))]),
    "num_registers": lambda m, hm, px: ModifiedModel(m, hm, [], num_registers=-1),
    "scale": lambda m, hm, px: ModifiedModel(m, hm, [], num_registers=2, scale=[1.0]),
    "edit": lambda m, hm, px: ModifiedModel(m, hm, [], edit=3),
    "normal_values": lambda m, hm, px: PaperEdit("median"),
    "other model": lambda m, hm, px: ModifiedModel(nn.Linear(2, 2), hm, []),
    "neurons type": lambda m, hm, px: ModifiedModel(m, hm, "7"),
    "neuron pair": lambda m, hm, px: ModifiedModel(m, hm, [(1,)]),
    "duplicates": lambda m, hm, px: ModifiedModel(m, hm, [(1, 2), (1, 2)]),
    "neuron range": lambda m, hm, px: ModifiedModel(m, hm, [(1, 999)]),
    "layout": lambda m, hm, px: TokenLayout(num_cls=-1),
    "short sequence": lambda m, hm, px: TokenLayout(num_cls=2).num_patches(1),
    "folder limit": lambda m, hm, px: ImageFolder(".", limit=0),
    "capture layer": lambda m, hm, px: hm.capture(neurons=[7]),
    "site": lambda m, hm, px: HookSite(m.visual.ln_pre, "middle").attach(lambda t: None),
    "precision": lambda m, hm, px: get_precision("fp8"),
    "figure": lambda m, hm, px: save_comparison("x.png", [], {"a": torch.zeros(0, 2, 2)}),
    "measure shape": lambda m, hm, px: measure_outliers(hm, px[0]),
    "hook manager": lambda m, hm, px: ClipHookManager(nn.Linear(2, 2)),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_every_bad_argument_raises_the_librarys_own_error(tiny, pixels, name):
    model, hm = tiny
    with pytest.raises(TestTimeRegistersError):
        BAD_CALLS[name](model, hm, pixels)


def test_hooks_close_removes_every_handle_even_when_a_callback_fails(clip_model, clip_hm):
    ran = []
    hooks = clip_hm.hooks()
    hooks.on_neurons(0, lambda acts: None)
    hooks.on_exit(lambda: ran.append("first"))
    hooks.on_exit(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    hooks.on_block_output(1, lambda out: None)
    hooks.on_exit(lambda: (_ for _ in ()).throw(KeyError("second failure")))
    with pytest.raises(KeyError) as raised:
        hooks.close()
    assert hook_count(clip_model) == 0 and ran == ["first"]
    assert any("boom" in note for note in raised.value.__notes__)


def test_a_failing_callback_inside_nested_contexts_leaves_nothing_behind(clip_model, clip_hm, pixels):
    with pytest.raises(RuntimeError, match="restore failed"):
        with clip_hm.capture(neurons=[0], attention=[1]), clip_hm.hooks() as hooks:
            hooks.on_exit(lambda: (_ for _ in ()).throw(RuntimeError("restore failed")))
            hooks.on_neurons(2, lambda acts: acts)
            clip_hm.forward_images(pixels)
    assert hook_count(clip_model) == 0


def test_skipped_files_are_counted_over_every_pass(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "good2.png")   # hold_out keeps at most half the readable images
    (tmp_path / "bad.txt").write_text("x")
    folder = ImageFolder(tmp_path)
    list(folder)
    list(folder)
    assert folder.skipped == 1
    rest, held_out = folder.hold_out(1)
    list(rest)
    list(held_out)
    assert rest.skipped + held_out.skipped == 1


def test_a_newer_neuron_file_format_is_a_clear_error(tmp_path):
    data = RegisterNeurons.coerce([(1, 2)]).to_dict()
    with pytest.raises(NeuronFileError, match="format_version 2, newer than the 1 this version .* reads; upgrade"):
        RegisterNeurons.from_dict({**data, "format_version": 2}, origin="n.json")
    with pytest.raises(NeuronFileError, match="format_version must be a positive integer"):
        RegisterNeurons.from_dict({**data, "format_version": "1"})
    assert RegisterNeurons.from_dict({k: v for k, v in data.items() if k != "format_version"}).pairs() == [(1, 2)]


class KeywordOnly(nn.Module):
    def forward(self, *, hidden_states, scale=1.0):
        return hidden_states * scale


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = KeywordOnly()

    def forward(self, x):
        return self.inner(hidden_states=x, scale=2.0)


def test_an_input_site_reads_and_replaces_a_keyword_argument():
    parent = Parent()
    site = HookSite(parent.inner, "input")
    seen = []
    handle = site.attach(lambda tensor: seen.append(tensor.clone()))
    try:
        assert torch.equal(parent(torch.ones(2)), torch.full((2,), 2.0)) and torch.equal(seen[0], torch.ones(2))
    finally:
        handle.remove()
    handle = site.attach(lambda tensor: tensor + 1)
    try:
        assert torch.equal(parent(torch.ones(2)), torch.full((2,), 4.0))   # replaced, other keywords kept
    finally:
        handle.remove()


class Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "tuple":
            return x, "extra"
        if self.kind == "list":
            return [x, "extra"]
        return OrderedDict(last_hidden_state=x, extra="extra")


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_an_output_site_replaces_the_first_tensor_of_a_tuple_list_or_model_output(kind):
    module = Returns(kind)
    handle = HookSite(module, "output").attach(lambda tensor: tensor * 3)
    try:
        output = module(torch.ones(2))
    finally:
        handle.remove()
    assert torch.equal(_first_tensor(output), torch.full((2,), 3.0))
    extra = output["extra"] if kind == "dict" else output[1]
    assert extra == "extra"


def test_outputs_without_a_tensor_and_models_a_hook_manager_does_not_describe_are_unsupported():
    with pytest.raises(UnsupportedModelError):
        _replace_first(3, torch.ones(1))
    with pytest.raises(UnsupportedModelError):
        _first_tensor("text")
    for manager in (ClipHookManager, DeitHookManager, Dinov2HookManager):
        with pytest.raises(UnsupportedModelError):
            manager(nn.Sequential(nn.Linear(2, 2)))
    assert issubclass(UnsupportedModelError, TypeError)


def test_beit_bias_for_an_extra_token_is_the_cls_tokens():
    from test_time_registers.layout import extend_pairwise

    bias = torch.tensor([[0.0, 1.0, 2.0],     # CLS row: CLS attending to CLS, p1, p2
                         [3.0, 4.0, 5.0],
                         [6.0, 7.0, 8.0]])[None, None]        # [1, heads=1, L=3, L=3]
    padded = extend_pairwise(bias, 2)[0, 0]
    expected = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0],
                             [3.0, 4.0, 5.0, 3.0, 3.0],   # p1 attending to the registers: as to CLS
                             [6.0, 7.0, 8.0, 6.0, 6.0],
                             [0.0, 1.0, 2.0, 0.0, 0.0],   # a register attending: as CLS does
                             [0.0, 1.0, 2.0, 0.0, 0.0]])
    assert torch.equal(padded, expected)
