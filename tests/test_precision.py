"""Every precision, for every architecture, through its real loader: declared input dtype, discovery, intervention."""

import pytest
import torch

from test_time_registers import ModifiedModel, find_register_neurons, load_model
from test_time_registers.deit import load_timm
from test_time_registers.dinov2 import load_dinov2
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.precision import PRECISIONS
from tests.tiny_models import dinov2_model

#: The dtype the pixels must have in each precision.
INPUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "pure_bf16": torch.bfloat16,
                "pure_fp16": torch.float16, "amp_bf16": torch.float32}
#: The dtype the MLP computes in: autocast runs the float32 weights in bfloat16.
COMPUTE_DTYPES = {**INPUT_DTYPES, "amp_bf16": torch.bfloat16}


def test_the_table_covers_every_precision():
    assert set(INPUT_DTYPES) == set(PRECISIONS)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    dinov2_model().save_pretrained(folder)
    return folder


LOADERS = {
    "openclip": lambda precision, config, dinov2: load_model(f"openclip:{config}:random", precision=precision),
    "dinov2": lambda precision, config, dinov2: load_dinov2(dinov2, precision=precision),
    "timm": lambda precision, config, dinov2: load_timm("vit_tiny_patch16_224", pretrained=False, precision=precision,
                                                        img_size=64, depth=2),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("family", list(LOADERS))
def test_each_architecture_runs_and_is_edited_in_each_precision(family, precision, registered_config, dinov2_dir):
    loaded = LOADERS[family](precision, registered_config, dinov2_dir)
    hook_manager = loaded.hook_manager
    assert hook_manager.input_dtype == INPUT_DTYPES[precision]
    assert (hook_manager.autocast_dtype is torch.bfloat16) == (precision == "amp_bf16")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))   # float32, as preprocessed
    modified = ModifiedModel(loaded.model, hook_manager, [(0, 1), (0, 7)], num_registers=1)
    with torch.no_grad(), modified.capture(neurons=[0], residual=[0]) as captured:
        modified.forward_images(pixels)
    activations = captured.neurons[0]
    assert activations.dtype == COMPUTE_DTYPES[precision]
    assert torch.isfinite(captured.residual[0].float()).all()
    image_tokens = modified.layout.image_tokens(activations.shape[1])
    assert not activations[:, image_tokens][:, :, [1, 7]].any()        # moved off every image token ...
    assert activations[:, -1, [1, 7]].abs().sum() > 0                   # ... onto the register


def test_openclip_mixed_precision_keeps_embeddings_in_float32_and_takes_bfloat16_pixels(registered_config):
    """The reported bug: pixels were cast to the first parameter's dtype (float32), and conv1 failed."""
    loaded = load_model(f"openclip:{registered_config}:random", precision="bf16")
    visual = loaded.model.visual
    assert visual.positional_embedding.dtype == torch.float32 and visual.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        features = loaded.hook_manager.forward_images(torch.randn(1, 3, 64, 64))
    assert features.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_discovery_and_the_intervention_work_on_the_demo_in_each_precision(precision, demo):
    _, _, planted, scenes = demo
    loaded = load_model("demo", precision=precision)
    neurons = find_register_neurons(loaded.hook_manager, scenes[:16], loaded.preprocess, top_k=len(planted),
                                    progress=False)
    assert sorted(neurons.pairs()) == planted
    modified = ModifiedModel(loaded.model, loaded.hook_manager, neurons, num_registers=1)
    after = measure_outliers(modified.hook_manager, scenes[16:24], loaded.preprocess)
    assert after.worst_max_over_median <= 2


def test_modified_model_calls_run_under_the_declared_autocast(registered_config):
    loaded = load_model(f"openclip:{registered_config}:random", precision="amp_bf16")
    modified = ModifiedModel(loaded.model, loaded.hook_manager, [(0, 1)], num_registers=1)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), modified.capture(neurons=[0]) as captured:
        features = modified.encode_image(pixels)
    assert captured.neurons[0].dtype == torch.bfloat16 and features.dtype == torch.bfloat16
    with torch.no_grad():
        assert loaded.model.encode_image(pixels).dtype == torch.float32   # the model itself is left in float32


#: The unmodified demo's outlier patches (largest/median >= 4 at block 7) on ``demo_images(16, seed=5)``, measured
#: on the circuit before exclusion became its default; the change moved none (also on 256 more images, every dtype).
DEMO_OUTLIERS = [[52, 57, 72, 122], [57, 72], [122, 143], [72, 122], [52, 57, 100, 143], [52, 57, 72, 122],
                 [52, 57, 72], [100, 129, 132, 143], [57, 72], [52, 143], [52, 57, 72, 122], [52, 57, 72, 122],
                 [57, 72, 122], [52, 122], [57, 72], [52, 57, 72, 122]]


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_every_demo_image_gets_a_high_norm_register_and_keeps_its_outliers(precision):
    """The register has no positional embedding; the demo's circuit excludes it like CLS, so it never wins the
    global-max head, and every image's outliers move onto it (image 7 once got neither)."""
    from test_time_registers import measures
    from test_time_registers.clip.demo import demo_images

    loaded = load_model("demo", precision=precision)
    hook_manager, last = loaded.hook_manager, loaded.hook_manager.num_layers - 1
    pixels = torch.stack([loaded.preprocess(image) for image in demo_images(16, seed=5)])
    with torch.no_grad(), hook_manager.capture(residual=[last]) as captured:
        hook_manager.forward_images(pixels)
    norms = measures.patch_norms(captured.residual[last], hook_manager.layout).float()
    assert [sorted((n > 4 * n.median()).nonzero()[:, 0].tolist()) for n in norms] == DEMO_OUTLIERS
    view = ModifiedModel(loaded.model, hook_manager, loaded.planted).hook_manager
    with torch.no_grad(), view.capture(residual=[last]) as captured:
        view.forward_images(pixels)
    registers = measures.register_norms(captured.residual[last], view.layout).float().amax(dim=1)
    medians = measures.patch_norms(captured.residual[last], view.layout).float().median(dim=1).values
    assert (registers >= 5 * medians).all(), (registers / medians).tolist()
