"""Discovery (test_time_registers.discovery): on the planted demo model it must find exactly what was planted,
and at scale: workers, user DataLoaders, checkpoints, torchrun and a real kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from test_time_registers import (ImageFolder, InvalidArgumentError, LegacyEdit, ModifiedModel, NoOutliersError,
                                 RegisterNeurons, find_register_neurons, gather_statistics, load_model)
from test_time_registers.analysis.metrics import measure_outliers
from test_time_registers.clip import ClipHookManager
from test_time_registers.discovery import read_checkpoint
from test_time_registers.errors import CheckpointError
from tests.tiny_models import hook_count


@pytest.fixture(scope="module")
def found(demo):
    model, preprocess, planted, images = demo
    hm = ClipHookManager(model, name="demo")
    return hm, find_register_neurons(hm, images, preprocess, top_k=len(planted), progress=False)


def test_recovers_exactly_the_planted_neurons(demo, found):
    model, _, planted, images = demo
    hm, neurons = found
    assert sorted(neurons.pairs()) == sorted(planted)
    planted_layer = planted[0][0]
    assert neurons.highest_layer == planted_layer          # where the outliers first stand out
    assert neurons.detect_layer == hm.num_layers - 1
    assert neurons.threshold > 0 and neurons.extra["threshold_mode"] == "auto"
    assert neurons.images_seen == neurons.images_with_outliers == len(images)
    scores = [n.score for n in neurons]
    assert scores == sorted(scores, reverse=True)
    ratios = neurons.extra["outlier_norm_ratio_by_layer"]
    assert max(ratios[:planted_layer]) < 2 <= ratios[planted_layer]
    assert hook_count(model) == 0
    scores_by_layer = neurons.candidate_scores            # every candidate's score, [layers, neurons]
    assert scores_by_layer.shape[0] > neurons.highest_layer and scores_by_layer.shape[1] == hm.num_neurons(0)
    for item in neurons:
        assert scores_by_layer[item.layer, item.neuron].item() == pytest.approx(item.score)
    cut = torch.tensor([n.score for n in neurons]).min()
    assert int((scores_by_layer[:planted_layer + 1] >= cut).sum()) == len(planted)


def test_a_wider_search_still_ranks_the_planted_neurons_first(demo, found):
    _, preprocess, planted, images = demo
    hm, _ = found
    wide = find_register_neurons(hm, images[:32], preprocess, top_k=20, highest_layer=hm.num_layers - 1,
                                 score="abs", sparsity_filter=True, progress=False)
    assert sorted(wide.pairs()[:len(planted)]) == sorted(planted)
    # By construction (clip/demo.py), a planted neuron is GELU(G (is_top - 0.9)) with G >= 125 and
    # is_top ~ 2 on the outliers; the strongest other neuron there, block 3's step GELU(z), has z <= 28.
    assert min(n.score for n in wide[:len(planted)]) > 100 and max(n.score for n in wide[len(planted):]) < 30


def test_batch_size_does_not_change_the_result(demo, found):
    _, preprocess, planted, images = demo
    hm, _ = found
    # 40 images: batches of 1 and 8 hold images until 32 are in; one batch of 40 calibrates at once
    runs = [find_register_neurons(hm, images[:40], preprocess, top_k=len(planted), batch_size=size, progress=False)
            for size in (1, 8, 40)]
    for run in runs[1:]:
        assert run.pairs() == runs[0].pairs()
        assert run.threshold == pytest.approx(runs[0].threshold, rel=1e-5)
        assert run.images_with_outliers == runs[0].images_with_outliers == 40
        torch.testing.assert_close([n.score for n in run], [n.score for n in runs[0]], rtol=1e-4, atol=1e-4)
    few = find_register_neurons(hm, images[:5], preprocess, top_k=len(planted), batch_size=2, progress=False)
    assert sorted(few.pairs()) == sorted(planted) and few.images_seen == 5   # fewer than 32: calibrated on all


def test_a_folder_path_gives_the_same_neurons(tmp_path, demo, found):
    _, preprocess, planted, images = demo
    hm, neurons = found
    for index, image in enumerate(images[:16]):
        image.save(tmp_path / f"{index:03d}.png")
    (tmp_path / "readme.txt").write_text("skipped")
    from_folder = find_register_neurons(hm, tmp_path, preprocess, top_k=len(planted), progress=False)
    from_memory = find_register_neurons(hm, images[:16], preprocess, top_k=len(planted), progress=False)
    assert from_folder.pairs() == from_memory.pairs()
    assert from_folder.images_seen == 16


def test_the_test_time_register_takes_over_the_outliers(demo, found):
    model, preprocess, planted, images = demo
    hm, neurons = found
    before = measure_outliers(hm, images, preprocess)
    modified = ModifiedModel(model, hm, neurons, num_registers=1)
    after = measure_outliers(modified.hook_manager, images, preprocess)
    assert before.worst_max_over_median >= 10
    assert after.worst_max_over_median <= 2                 # every image
    assert after.register_over_median >= 10                 # the register carries the high norm
    assert after.cls_top_patch_attention < 0.5 * before.cls_top_patch_attention
    legacy = measure_outliers(ModifiedModel(model, hm, neurons, num_registers=1, edit=LegacyEdit()).hook_manager,
                              images, preprocess)
    assert legacy.worst_max_over_median <= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_discovery_matches_float32(demo, dtype):
    from test_time_registers.clip.demo import build_demo_model

    _, preprocess, planted, images = demo
    full = find_register_neurons(ClipHookManager(build_demo_model(seed=0)[0]), images[:16], preprocess,
                                 top_k=len(planted), progress=False)
    reduced = find_register_neurons(ClipHookManager(build_demo_model(seed=0)[0].to(dtype)), images[:16], preprocess,
                                    top_k=len(planted), progress=False)
    assert sorted(reduced.pairs()) == sorted(planted)
    expected = {(n.layer, n.neuron): n.score for n in full}
    for item in reduced:   # summed in float32: only the activations themselves are rounded
        assert item.score == pytest.approx(expected[(item.layer, item.neuron)], rel=0.02)


def test_no_outliers_is_said_plainly_with_a_threshold_to_try(clip_hm):
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NoOutliersError, match=r"no high-norm outliers.*largest patch norm.*threshold=") as error:
        find_register_neurons(clip_hm, images, progress=False)
    assert "1." in str(error.value)          # the ratio of largest to median patch norm
    with pytest.raises(NoOutliersError, match="exceeded the threshold 1e\\+06"):
        find_register_neurons(clip_hm, images, threshold=1e6, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k"), ({"threshold": -1.0}, "threshold"), ({"threshold": "high"}, "threshold"),
    ({"score": "median"}, "score"), ({"detect_layer": 3}, "detect_layer"),
    ({"detect_layer": 1, "highest_layer": 2}, "cannot be after"), ({"device": "meta"}, "move the model"),
])
def test_bad_arguments(clip_hm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_register_neurons(clip_hm, torch.zeros(1, 3, 64, 64), progress=False, **kwargs)


def test_non_finite_activations_are_reported_as_such(clip_model, clip_hm):
    from test_time_registers import NonFiniteActivationsError

    with torch.no_grad():
        clip_model.visual.transformer.resblocks[1].mlp.c_proj.bias[0] = float("inf")
    with pytest.raises(NonFiniteActivationsError, match="NaN or infinite patch norms.*float32"):
        find_register_neurons(clip_hm, torch.randn(2, 3, 64, 64), progress=False)


# ---------------------------------------------------------------------------- at scale: workers, user DataLoaders,
# checkpoints, torchrun and a real kill

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "find_register_neurons.py"


@pytest.fixture(scope="module")
def demo_model():
    return load_model("demo")


@pytest.fixture(scope="module")
def scenes(demo_model):
    return list(demo_model.generate_images(40, 0))


def same_result(one: RegisterNeurons, other: RegisterNeurons) -> None:
    assert one.pairs() == other.pairs()
    torch.testing.assert_close([n.score for n in one], [n.score for n in other], rtol=1e-5, atol=1e-4)
    assert one.threshold == pytest.approx(other.threshold, rel=1e-6)
    assert (one.images_seen, one.images_with_outliers, one.highest_layer) == \
        (other.images_seen, other.images_with_outliers, other.highest_layer)


def test_workers_decode_a_folder_and_still_name_and_count_unreadable_files(tmp_path, demo_model, scenes, caplog):
    for index, scene in enumerate(scenes[:20]):
        scene.save(tmp_path / f"{index:02d}.png")
    for index in range(3):
        (tmp_path / f"notes{index}.txt").write_text("not an image")
    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    in_process = find_register_neurons(hm, ImageFolder(tmp_path), preprocess, top_k=4, batch_size=6, progress=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="test_time_registers.data.sources"):
        folder = ImageFolder(tmp_path)
        with_workers = find_register_neurons(hm, folder, preprocess, top_k=4, batch_size=6, workers=2,
                                             progress=False)
    same_result(with_workers, in_process)
    assert folder.skipped == 3 and with_workers.extra["files_skipped"] == 3 == in_process.extra["files_skipped"]
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records) == [f"skipped notes{i}.txt" for i in range(3)]


def test_a_users_dataloader_of_preprocessed_batches_is_an_image_source(demo_model, scenes):
    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    pixels = torch.stack([preprocess(scene) for scene in scenes])
    expected = find_register_neurons(hm, pixels, top_k=4, progress=False)
    labelled = DataLoader(TensorDataset(pixels, torch.arange(len(pixels))), batch_size=7)   # (pixels, labels)
    from_loader = find_register_neurons(hm, labelled, top_k=4, progress=False, seed=0)
    assert from_loader.pairs() == expected.pairs() and from_loader.images_seen == 40
    as_dicts = ({"pixel_values": batch} for batch in pixels.split(9))
    assert find_register_neurons(hm, as_dicts, top_k=4, progress=False).pairs() == expected.pairs()


def _environment(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_torchrun_with_two_ranks_finds_what_one_process_finds(tmp_path, demo_model, scenes):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, scene in enumerate(scenes[:36]):
        scene.save(folder / f"{index:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    common = ["--images", str(folder), "--num-images", "30", "--eval-images", "4", "--batch-size", "5", "--quiet"]
    single = subprocess.run([sys.executable, str(SCRIPT), *common, "--out", str(tmp_path / "one.json")],
                            env=_environment(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = subprocess.run([*torchrun, str(SCRIPT), *common, "--workers", "1", "--out", str(tmp_path / "two.json")],
                            env=_environment(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    console = Path(sys.executable).parent / "find-register-neurons"
    installed = subprocess.run([*torchrun, str(console), *common, "--out", str(tmp_path / "console.json")],
                               env=_environment(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    one = RegisterNeurons.load(tmp_path / "one.json")
    for name, run in (("two.json", script), ("console.json", installed)):
        other = RegisterNeurons.load(tmp_path / name)
        same_result(other, one)
        assert other.extra["files_skipped"] == one.extra["files_skipped"] == 1
        assert run.stdout.count("wrote ") == 1 and run.stdout.count("planted neurons recovered: 4 of 4") == 1


def test_resume_after_sigkill_writes_the_neuron_file_of_an_uninterrupted_run(tmp_path, demo_model):
    folder = tmp_path / "images"   # a folder, with unreadable files whose count must survive the kill
    folder.mkdir()
    for index, scene in enumerate(demo_model.generate_images(124, 1)):
        scene.save(folder / f"{index:03d}.png")
    for index in range(3):
        (folder / f"{index:03d}.txt").write_text("not an image")
    common = [str(SCRIPT), "--images", str(folder), "--eval-images", "4", "--batch-size", "2", "--quiet"]
    uninterrupted = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "whole.json")],
                                   env=_environment(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    checkpoint = tmp_path / "discovery.ckpt"
    flags = ["--out", str(tmp_path / "resumed.json"), "--checkpoint", str(checkpoint), "--checkpoint-every", "1"]
    process = subprocess.Popen([sys.executable, *common, *flags], env=_environment(), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = 0
    deadline = time.monotonic() + 300
    while done < 40 and time.monotonic() < deadline:   # past the 32 calibration images, well before 120
        time.sleep(0.02)
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {process.stderr.read().decode()}")
        if checkpoint.is_file():
            try:
                done = read_checkpoint(checkpoint).consumed
            except CheckpointError:   # the file is replaced atomically, but may vanish between calls
                continue
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL and 40 <= done < 120
    assert not (tmp_path / "resumed.json").exists()

    resumed = subprocess.run([sys.executable, *common, *flags, "--resume"], env=_environment(),
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "resumed.json").read_text() == (tmp_path / "whole.json").read_text().replace(
        "whole.scores.safetensors", "resumed.scores.safetensors")     # each names its own scores file
    assert (tmp_path / "resumed.scores.safetensors").read_bytes() == (tmp_path / "whole.scores.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]   # a killed save's file is cleaned up

    other = subprocess.run([sys.executable, *common, *flags, "--resume", "--batch-size", "4"], env=_environment(),
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert other.returncode == 2 and "other settings (--batch-size 2, not 4)" in other.stderr


def test_an_unreadable_calibration_sample_widens_until_enough_images_are_read(tmp_path, demo_model, scenes):
    for index in range(40):
        (tmp_path / f"notes{index:02d}.txt").write_text("not an image")
    for index, scene in enumerate(scenes[:3]):
        scene.save(tmp_path / f"photo{index}.png")
    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    found = find_register_neurons(hm, ImageFolder(tmp_path), preprocess, top_k=4, batch_size=4, progress=False)
    assert found.images_seen == 3 and found.extra["files_skipped"] == 40
    given = find_register_neurons(hm, ImageFolder(tmp_path), preprocess, top_k=4, threshold=found.threshold,
                                  progress=False)
    same_result(found, given)


def test_a_checkpoint_of_other_images_is_refused(tmp_path, demo_model, scenes):
    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    for name, chosen in (("a", scenes[:6]), ("b", scenes[6:12])):
        (tmp_path / name).mkdir()
        for index, scene in enumerate(chosen):
            scene.save(tmp_path / name / f"{name}{index}.png")
    gather_statistics(hm, tmp_path / "a", preprocess, checkpoint=tmp_path / "run.ckpt", progress=False)
    with pytest.raises(InvalidArgumentError, match="other settings .*image_names"):
        gather_statistics(hm, tmp_path / "b", preprocess, checkpoint=tmp_path / "run.ckpt", resume=True,
                          progress=False)
    resumed = gather_statistics(hm, tmp_path / "a", preprocess, checkpoint=tmp_path / "run.ckpt", resume=True,
                                progress=False)   # complete: nothing left to read
    assert resumed.images_seen == 6


def test_a_missing_or_unreadable_checkpoint_is_a_checkpoint_error_not_a_bad_argument(tmp_path, demo_model, scenes):
    from test_time_registers.errors import CheckpointError

    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        gather_statistics(hm, scenes[:4], preprocess, checkpoint=tmp_path / "none.ckpt", resume=True, progress=False)
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a discovery checkpoint") as raised:
        gather_statistics(hm, scenes[:4], preprocess, checkpoint=tmp_path / "garbage.ckpt", resume=True,
                          progress=False)
    assert not isinstance(raised.value, InvalidArgumentError)


# ---------------------------------------------------------------------------- Algorithm 1 where only some images
# have outliers, and checkpoints that are read without unpickling


def naive_algorithm_1(hook_manager, pixels, threshold, detect_layer, highest_layer, score="raw"):
    """Algorithm 1 one image at a time: {(layer, neuron): mean over the images with outliers of the
    neuron's mean activation over that image's outlier patches}, and the number of those images."""
    totals, with_outliers = None, 0
    for image in pixels:
        _, captured = hook_manager.run_with_capture(image[None], neurons=list(range(highest_layer + 1)),
                                                    residual=[detect_layer])
        norms = captured.patches("residual", detect_layer)[0].norm(dim=-1)            # [P]
        outliers = (norms > threshold).nonzero()[:, 0]
        if not len(outliers):
            continue
        with_outliers += 1
        per_layer = []
        for layer in range(highest_layer + 1):
            acts = captured.neurons[layer][0]                                          # [L, N]
            patches = acts[captured.layout.patches(acts.shape[0])]                     # [P, N]
            values = patches[outliers].double()
            per_layer.append((values.abs() if score == "abs" else values).mean(dim=0))
        image_scores = torch.stack(per_layer)                                          # [layers, N]
        totals = image_scores if totals is None else totals + image_scores
    return totals / with_outliers, with_outliers


@pytest.mark.parametrize("score", ["raw", "abs"])
def test_only_some_images_have_outliers_and_the_scores_are_the_naive_algorithm_1s(clip_hm, score):
    pixels = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    _, captured = clip_hm.run_with_capture(pixels, residual=[2])
    largest = captured.patches("residual", 2).norm(dim=-1).amax(dim=1).sort().values    # [12]
    threshold = float((largest[5] + largest[6]) / 2)     # 6 images have an outlier, 6 have none
    expected, with_outliers = naive_algorithm_1(clip_hm, pixels, threshold, 2, 2, score)
    assert with_outliers == 6
    found = find_register_neurons(clip_hm, pixels, threshold=threshold, highest_layer=2, top_k=20, score=score,
                                  batch_size=5, progress=False)
    assert (found.images_seen, found.images_with_outliers) == (12, 6)
    torch.testing.assert_close(found.candidate_scores.double(), expected, rtol=1e-4, atol=1e-5)
    best = expected.flatten().topk(20)
    width = expected.shape[1]
    assert [(n.layer, n.neuron) for n in found] == [divmod(int(index), width) for index in best.indices]
    torch.testing.assert_close(torch.tensor([n.score for n in found], dtype=torch.float64), best.values,
                               rtol=1e-4, atol=1e-5)


def test_a_checkpoint_round_trip_is_byte_identical(tmp_path, demo_model, scenes):
    from test_time_registers.discovery import write_checkpoint

    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    stats = gather_statistics(hm, scenes[:10], preprocess, checkpoint=tmp_path / "run.ckpt", progress=False)
    checkpoint = read_checkpoint(tmp_path / "run.ckpt")
    assert checkpoint.complete and checkpoint.consumed == 10 and checkpoint.skipped == []
    write_checkpoint(tmp_path / "again.ckpt", checkpoint)
    assert (tmp_path / "again.ckpt").read_bytes() == (tmp_path / "run.ckpt").read_bytes()
    restored = gather_statistics(hm, scenes[:10], preprocess, checkpoint=tmp_path / "again.ckpt", resume=True,
                                 progress=False)
    assert restored.finalize(top_k=4).to_dict() == stats.finalize(top_k=4).to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.ckpt", "run.ckpt"]   # no temporary left


class WritesAMarker:
    """Unpickling this creates the file ``path`` (a stand-in for any code a hostile pickle runs)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_checkpoint_that_would_run_code_if_unpickled_is_refused_unrun(tmp_path, demo_model, scenes, kind):
    import pickle
    import warnings

    marker = tmp_path / "unpickled"
    payload = {"format": 1, "settings": WritesAMarker(marker), "consumed": 0}
    if kind == "pickle":
        (tmp_path / "run.ckpt").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, tmp_path / "run.ckpt")
    assert not marker.exists()
    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError) as raised:
        warnings.simplefilter("always")
        gather_statistics(hm, scenes[:4], preprocess, checkpoint=tmp_path / "run.ckpt", resume=True, progress=False)
    assert not marker.exists()
    assert not caught, [str(warning.message) for warning in caught]
    message = str(raised.value)
    assert "never unpickles" in message and "weights_only" not in message and "\n" not in message
