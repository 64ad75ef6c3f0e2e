"""torch.compile of a ModifiedModel gives the eager answer, with no graph break inside the intervention.

On an open_clip CLIP, a timm DeiT-III and a transformers DINOv2 (tiny, with planted register
neurons so that the edit really moves something), in fp32 and bf16: the compiled ModifiedModel
(its ``forward``, ``forward_images`` and a forwarded method) differs from eager by no more than
the compiled unmodified model differs from its own eager run (up to a small floor), and
``torch._dynamo.explain`` counts no graph break. Before the edits read positions as slices, a
graph break inside the MLP hook made Dynamo drop the edit: the compiled model ran with the
register appended but nothing moved onto it.
"""

from __future__ import annotations

import pytest
import torch

from test_time_registers import LegacyEdit, ModifiedModel, PaperEdit
from test_time_registers.hooks import _first_tensor
from test_time_registers.planting import marker_images, plant_register_neurons
from tests.tiny_models import IMAGE_SIZE, LAYERS, clip_model, dinov2_model, hook_count, timm_model
from test_time_registers.registry import hook_manager_for

PLANTED_LAYER = 1
#: (name, model builder, a method ModifiedModel forwards) for one model of each library.
FAMILIES = [("openclip", clip_model, "encode_image"), ("timm", lambda: timm_model(num_classes=0), "forward_features"),
            ("dinov2", dinov2_model, None)]
#: The smallest difference a test demands be matched: rounding noise of one dtype.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 0.05}
#: How much the edit must change the output for the comparison to mean something.
CHANGED = {torch.float32: 1e-3, torch.bfloat16: 0.1}


def _planted(build, dtype):
    model = build().eval()
    hook_manager = hook_manager_for(model)
    patch = hook_manager.patch_size[0]
    planted = plant_register_neurons(hook_manager, marker_images(24, IMAGE_SIZE, patch, seed=0), PLANTED_LAYER, 3)
    model.to(dtype)
    hook_manager = hook_manager_for(model)
    pixels = marker_images(4, IMAGE_SIZE, patch, seed=3).pixel_values.to(dtype)
    return model, hook_manager, planted, pixels


def _largest_difference(first, second) -> float:
    return float((_first_tensor(first).float() - _first_tensor(second).float()).abs().max())


def _operations(graph: torch.fx.GraphModule) -> int:
    return sum(node.op in ("call_function", "call_method", "call_module") for node in graph.graph.nodes)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,build,method", FAMILIES, ids=[family[0] for family in FAMILIES])
def test_compiled_modified_model_matches_eager_as_closely_as_the_compiled_plain_model(name, build, method, dtype):
    model, hook_manager, planted, pixels = _planted(build, dtype)
    modified = ModifiedModel(model, hook_manager, planted, num_registers=1)
    unedited = ModifiedModel(model, hook_manager, [], num_registers=1)
    tokens = method or "forward_images"   # the method whose output carries every token (timm's pools CLS)
    with torch.no_grad():
        plain = getattr(hook_manager if method is None else model, tokens)(pixels)
        compiled_plain = torch.compile(getattr(hook_manager if method is None else model, tokens))(pixels)
        allowed = max(2 * _largest_difference(compiled_plain, plain), FLOOR[dtype])
        eager = getattr(modified, tokens)(pixels)
        assert _largest_difference(eager, getattr(unedited, tokens)(pixels)) > CHANGED[dtype]   # the edit matters
        assert _largest_difference(torch.compile(lambda x: getattr(modified, tokens)(x))(pixels), eager) <= allowed
        for run in (modified.forward_images, modified):   # forward_images, and forward through the module
            assert _largest_difference(torch.compile(run)(pixels), run(pixels)) <= allowed
    assert hook_count(model) == 0


@pytest.mark.parametrize("name,build,method,edit",
                         [(*family, PaperEdit()) for family in FAMILIES]
                         + [(*FAMILIES[0], LegacyEdit()), (*FAMILIES[0], PaperEdit(normal_values="mean"))],
                         ids=lambda value: value if isinstance(value, str) else "")
def test_no_graph_break_inside_the_intervention(name, build, method, edit):
    model, hook_manager, planted, pixels = _planted(build, torch.float32)
    modified = ModifiedModel(model, hook_manager, planted, num_registers=1, edit=edit)
    assert edit.graph_safe
    with torch.no_grad():
        plain = torch._dynamo.explain(hook_manager.forward_images)(pixels)
        with modified.intervention():   # hooks placed first: the whole forward pass, edits included, is one graph
            inside = torch._dynamo.explain(hook_manager.forward_images)(pixels)
        torch._dynamo.reset()
        opened_inside = torch._dynamo.explain(modified.forward_images)(pixels)
    assert plain.graph_break_count == inside.graph_break_count == 0, inside.break_reasons
    assert plain.graph_count == inside.graph_count == 1
    assert inside.op_count > plain.op_count   # the edit and the register are in the graph
    # Called through the ModifiedModel, the hooks are placed and removed eagerly around the one graph.
    assert opened_inside.graph_break_count == 0 and opened_inside.graph_count == 1, opened_inside.break_reasons
    assert all("disable()" in reason.reason and reason.user_stack[-1].name == "_run"
               for reason in opened_inside.break_reasons)
    assert abs(_operations(opened_inside.graphs[0]) - _operations(inside.graphs[0])) <= 2


def test_edits_that_may_break_the_graph_run_eagerly_and_still_apply():
    model, hook_manager, planted, pixels = _planted(clip_model, torch.float32)
    breaking = PaperEdit(normal_values="noise", seed=3)

    def printing_edit(activations, neurons, layout, context):   # a user's edit with a graph break in it
        torch._dynamo.graph_break()
        return PaperEdit()(activations, neurons, layout, context)

    assert not breaking.graph_safe
    for edit in (breaking, printing_edit):
        modified = ModifiedModel(model, hook_manager, planted, num_registers=1, edit=edit)
        with torch.no_grad():
            eager = modified.forward_images(pixels)
            compiled = torch.compile(modified.forward_images)(pixels)
        assert _largest_difference(compiled, eager) == 0.0


def test_each_modified_model_gets_its_own_graph():
    """Dynamo does not guard on module hooks, so without a key of its own a ModifiedModel would reuse the
    graph another one traced (other neurons, other register count) or the plain model's."""
    model, hook_manager, planted, pixels = _planted(clip_model, torch.float32)
    wrappers = [ModifiedModel(model, hook_manager, planted, num_registers=1),
                ModifiedModel(model, hook_manager, planted[:1], num_registers=2),
                ModifiedModel(model, hook_manager, [], num_registers=1)]
    with torch.no_grad():
        torch.compile(hook_manager.forward_images)(pixels)
        for modified in (*wrappers, *wrappers):
            eager = modified.forward_images(pixels)
            assert _largest_difference(torch.compile(modified.forward_images)(pixels), eager) <= FLOOR[torch.float32]


def test_repeated_compiled_calls_do_not_recompile():
    model, hook_manager, planted, pixels = _planted(clip_model, torch.float32)
    modified = ModifiedModel(model, hook_manager, planted, num_registers=1)
    counts = torch._dynamo.utils.counters
    compiled = torch.compile(modified.forward_images)
    with torch.no_grad():
        compiled(pixels)
        frames = counts["stats"]["unique_graphs"]
        for _ in range(3):
            compiled(pixels)
    assert counts["stats"]["unique_graphs"] == frames


@pytest.mark.parametrize("threshold,detect_layer", [(1.0, None), ("auto", LAYERS - 1)], ids=["every-patch", "auto-last"])
def test_compiled_discovery_gathers_the_same_statistics(threshold, detect_layer):
    """The last block as detection layer too: there the eager pass stops in a hook, which compiled would lose."""
    from test_time_registers import gather_statistics

    model, hook_manager, planted, _ = _planted(clip_model, torch.float32)
    images = marker_images(12, IMAGE_SIZE, hook_manager.patch_size[0], seed=4).pixel_values
    settings = dict(threshold=threshold, detect_layer=detect_layer, highest_layer=PLANTED_LAYER, batch_size=4,
                    progress=False)
    eager = gather_statistics(hook_manager, images, **settings)
    compiled = gather_statistics(hook_manager, images, **settings, compile=True)
    with torch.no_grad():   # a plain forward compiled first must not stand in for discovery's, hooks and all
        torch.compile(hook_manager.forward_images)(images[:4])
    assert eager.threshold == pytest.approx(compiled.threshold, rel=1e-6)
    assert torch.equal(eager.counts, compiled.counts)
    for layer, sums in eager.score_sums.items():
        torch.testing.assert_close(compiled.score_sums[layer], sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(compiled.ratio_sums, eager.ratio_sums, rtol=1e-5, atol=1e-5)
    found = eager.finalize(top_k=3).pairs()
    assert compiled.finalize(top_k=3).pairs() == found and sorted(found) == sorted(planted)
    assert hook_count(model) == 0
