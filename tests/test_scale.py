"""Discovery at scale: mergeable statistics, checkpoints, workers, user DataLoaders, torchrun and a real kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from test_time_registers import (DiscoveryStatistics, ImageFolder, InvalidArgumentError, RegisterNeurons,
                                 find_register_neurons, gather_statistics, load_model)
from test_time_registers.data.batching import batches

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


def test_the_statistics_of_two_halves_merge_into_those_of_one_pass(demo_model, scenes):
    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    whole = gather_statistics(hm, scenes, preprocess, threshold=40.0, progress=False)
    first = gather_statistics(hm, scenes[:17], preprocess, threshold=40.0, progress=False)
    second = gather_statistics(hm, scenes[17:], preprocess, threshold=40.0, progress=False)
    merged = first.merge(second)
    assert merged.images_seen == whole.images_seen == 40
    for layer in whole.score_sums:
        torch.testing.assert_close(merged.score_sums[layer], whole.score_sums[layer], rtol=1e-5, atol=1e-3)
    same_result(merged.finalize(top_k=8), whole.finalize(top_k=8))
    with pytest.raises(InvalidArgumentError, match="different models, settings or thresholds"):
        first.merge(gather_statistics(hm, scenes[:4], preprocess, threshold=41.0, progress=False))


def test_a_state_dict_restores_the_statistics_exactly(tmp_path, demo_model, scenes):
    hm, preprocess = demo_model.hook_manager, demo_model.preprocess
    stats = gather_statistics(hm, scenes[:12], preprocess, progress=False)
    torch.save(stats.state_dict(), tmp_path / "stats.pt")
    restored = DiscoveryStatistics({layer: 768 for layer in range(8)}, 7, hm.layout)
    restored.load_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    assert restored.finalize(top_k=4).to_dict() == stats.finalize(top_k=4).to_dict()
    with pytest.raises(InvalidArgumentError, match="other discovery settings"):
        DiscoveryStatistics({0: 768}, 7, hm.layout).load_state_dict(stats.state_dict())


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


def test_shards_cover_every_position_once(scenes, demo_model):
    from test_time_registers.data.batching import Shard

    seen = []
    for rank in range(3):
        for batch in batches(scenes[:10], demo_model.preprocess, 2, "cpu", torch.float32, shard=Shard(rank, 3)):
            seen += batch.positions
    assert sorted(seen) == list(range(10))
    resumed = [p for batch in batches(scenes[:10], demo_model.preprocess, 2, "cpu", torch.float32,
                                      shard=Shard(1, 3), start=2) for p in batch.positions]
    assert resumed == [7]


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
                done = torch.load(checkpoint, weights_only=True)["consumed"]
            except Exception:  # noqa: BLE001 - the file is replaced atomically, but may vanish between calls
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


def test_a_stream_of_batches_resumes_inside_a_batch(demo_model, scenes):
    pixels = torch.stack([demo_model.preprocess(scene) for scene in scenes])
    stream = [pixels[start:start + 7] for start in range(0, 40, 7)]     # a list of batches streams too
    positions = [p for batch in batches(stream, None, 8, "cpu", torch.float32, start=24) for p in batch.positions]
    assert positions == list(range(24, 40))


def test_finalize_checks_its_arguments(demo_model, scenes):
    stats = gather_statistics(demo_model.hook_manager, scenes[:8], demo_model.preprocess, highest_layer=5,
                              progress=False)
    for bad in ({"top_k": 0}, {"top_k": -1}, {"top_k": "3"}, {"highest_layer": 6}, {"highest_layer": True}):
        with pytest.raises(InvalidArgumentError):
            stats.finalize(**bad)
    assert stats.finalize(top_k=2, highest_layer=5).highest_layer == 5


def test_outlier_rows_and_the_dense_product_give_the_same_scores(demo_model):
    layout = demo_model.hook_manager.layout
    generator = torch.Generator().manual_seed(0)
    activations = {layer: torch.randn(3, 10, 16, generator=generator) for layer in range(3)}
    norms = {layer: torch.rand(3, 9, generator=generator) * 10 for layer in range(3)}
    sums = []
    for rows in (True, False):
        stats = DiscoveryStatistics({layer: 16 for layer in range(3)}, 2, layout, threshold=6.0, outlier_rows=rows)
        stats.update(activations, norms)
        sums.append(stats.score_sums)
    for layer in range(3):
        torch.testing.assert_close(sums[0][layer], sums[1][layer])


def test_readers_can_be_sent_to_spawned_workers(tmp_path, scenes):
    import pickle

    from test_time_registers.data.batching import ordered_source

    scenes[0].save(tmp_path / "a.png")
    for source in (ordered_source(ImageFolder(tmp_path)), ordered_source(scenes[:3])):
        assert pickle.loads(pickle.dumps(source.read))(0).size == (224, 224)


def test_the_hub_is_not_probed_behind_a_proxy(monkeypatch):
    from huggingface_hub import constants

    from test_time_registers import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert "127.0.0.1 cannot be reached" in hub.why_offline("http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.why_offline("http://127.0.0.1:9") is None
