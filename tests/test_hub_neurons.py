"""Neuron files on the Hugging Face hub, offline: ``hf-hub:ORG/REPO[/FILE]`` read through a cache laid out as
``huggingface_hub`` lays it out (``models--ORG--REPO/refs/main``, ``snapshots/COMMIT/``, ``blobs/``), with the
hub unreachable (``HF_HUB_OFFLINE=1``, or an endpoint on a closed port); and ``save_pretrained``, the folder
to upload there."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants, try_to_load_from_cache

import test_time_registers.neurons as neurons_module
from test_time_registers import NeuronFileError, RegisterNeuron, RegisterNeurons, hub, load_neurons
from test_time_registers.neurons import CARD_FILE, CARD_TAGS, HUB_FILE, LIBRARY_NAME, scores_path_for
from test_time_registers.scripts import find_register_neurons

ROOT = Path(__file__).resolve().parent.parent
DEMO_RUN = ["--num-images", "12", "--eval-images", "4", "--quiet"]
SCORES = scores_path_for(HUB_FILE).name
#: Where the hub would be, if anything listened there.
CLOSED_PORT = "http://127.0.0.1:9"


def sample(model: str = "dinov2:facebook/dinov2-small", **changes) -> RegisterNeurons:
    """Neurons with candidate scores that fit the 3-block tiny CLIP (256 MLP neurons per block)."""
    fields = dict(neurons=[RegisterNeuron(1, 3, 2.5), RegisterNeuron(0, 200, 1.5)], model=model, detect_layer=2,
                  threshold=10.0, highest_layer=1, images_seen=64, images_with_outliers=60, image_size=(224, 224),
                  score="raw", source="find_register_neurons", extra={"threshold_mode": "auto"},
                  candidate_scores=torch.rand(3, 256, generator=torch.Generator().manual_seed(0)))
    return RegisterNeurons(**{**fields, **changes})


def commit_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


def publish(cache: Path, repo_id: str, files: dict[str, bytes]) -> str:
    """Put ``files`` in ``cache`` as ``huggingface_hub`` stores a download of ``repo_id`` at ``main``: each file
    a blob named by its digest, linked from the snapshot of the commit ``refs/main`` names. Returns the commit."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for name in files:   # huggingface_hub itself finds every file there
        assert try_to_load_from_cache(repo_id, name, cache_dir=cache) == str(folder / "snapshots" / commit / name)
    return commit


def folder_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under ``HF_HOME``, for this process (``constants``, read when huggingface_hub is
    imported) and for programs it starts (the environment); ``HF_HUB_OFFLINE`` is set by conftest."""
    folder = tmp_path / "hf" / "hub"
    folder.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    assert constants.HF_HUB_OFFLINE
    return folder


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """The file names ``hf_hub_download`` is asked for, from the cache alone (it still runs); a question to
    the hub itself (a file's size, a listing) would be recorded as ``"asked the hub"``."""
    asked = []
    download = huggingface_hub.hf_hub_download

    def recording(repo_id, filename, **options):
        asked.append(filename if options.get("local_files_only") else f"downloaded {filename}")
        return download(repo_id, filename, **options)

    def hub_asked(*args, **options):
        asked.append("asked the hub")
        raise OSError("the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", hub_asked)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", hub_asked)
    return asked


# ---- reading ----------------------------------------------------------------------------------------

def test_a_neuron_file_on_the_hub_loads_as_the_local_file_does_byte_for_byte(tmp_path, cache, downloads, clip_hm):
    local = sample(model=clip_hm.name).save_pretrained(tmp_path / "published")
    publish(cache, "org/repo", folder_files(local))
    expected = RegisterNeurons.load(local / HUB_FILE)

    for loaded in (RegisterNeurons.load("hf-hub:org/repo"), load_neurons("hf-hub:org/repo", clip_hm),
                   RegisterNeurons.load(f"hf-hub:org/repo/{HUB_FILE}", clip_hm)):
        assert loaded == expected and loaded.extra == expected.extra
        assert torch.equal(loaded.candidate_scores, expected.candidate_scores)
    assert downloads == [HUB_FILE, SCORES] * 3
    again = RegisterNeurons.load("hf-hub:org/repo").save(tmp_path / "again" / HUB_FILE)
    assert again.read_bytes() == (local / HUB_FILE).read_bytes()
    assert scores_path_for(again).read_bytes() == (local / SCORES).read_bytes()


def test_a_named_file_in_a_folder_of_the_repo_is_read_with_its_own_scores(tmp_path, cache, downloads):
    first, second = sample(), sample(neurons=[RegisterNeuron(1, 7, 9.0)], candidate_scores=torch.ones(3, 256))
    first.save(tmp_path / "clip.json")
    second.save(tmp_path / "dinov2" / "neurons.json")
    publish(cache, "org/several", {
        "clip.json": (tmp_path / "clip.json").read_bytes(),
        "clip.scores.safetensors": (tmp_path / "clip.scores.safetensors").read_bytes(),
        "dinov2/neurons.json": (tmp_path / "dinov2" / "neurons.json").read_bytes(),
        "dinov2/neurons.scores.safetensors": (tmp_path / "dinov2" / "neurons.scores.safetensors").read_bytes()})

    loaded = RegisterNeurons.load("hf-hub:org/several/dinov2/neurons.json")
    assert loaded == second and torch.equal(loaded.candidate_scores, torch.ones(3, 256))
    assert RegisterNeurons.load("hf-hub:org/several/clip.json") == first
    assert downloads == ["dinov2/neurons.json", "dinov2/neurons.scores.safetensors", "clip.json",
                         "clip.scores.safetensors"]


def test_scores_the_cache_lacks_are_left_out_with_a_warning(tmp_path, cache, downloads, caplog):
    local = sample().save_pretrained(tmp_path / "published")
    publish(cache, "org/no-scores", {HUB_FILE: (local / HUB_FILE).read_bytes()})
    with caplog.at_level("WARNING", logger="test_time_registers"):
        loaded = RegisterNeurons.load("hf-hub:org/no-scores")
    assert loaded == sample() and loaded.candidate_scores is None
    assert [record.getMessage() for record in caplog.records] == [
        f"hf-hub:org/no-scores/{HUB_FILE} names candidate scores in {SCORES}, which org/no-scores does not hold at "
        "that commit (or, offline, the local cache does not); figures of them will be skipped"]


def test_a_repo_the_cache_lacks_says_how_to_pass_a_local_file(cache, downloads):
    with pytest.raises(NeuronFileError) as caught:
        RegisterNeurons.load("hf-hub:org/absent")
    assert str(caught.value) == (
        f"cannot download neuron file hf-hub:org/absent/{HUB_FILE}: HF_HUB_OFFLINE is set and it is not in the "
        f"local cache. Download it where the hub can be reached (hf download org/absent {HUB_FILE} {SCORES} "
        f"--local-dir DIR), then pass DIR/{HUB_FILE} instead of hf-hub:org/absent.")
    assert downloads == [HUB_FILE]


def test_a_repo_of_several_neuron_files_and_no_default_names_them(tmp_path, cache, downloads):
    sample().save(tmp_path / "clip.json")
    sample().save(tmp_path / "dinov2.json")
    publish(cache, "org/several", folder_files(tmp_path))
    with pytest.raises(NeuronFileError) as caught:
        load_neurons("hf-hub:org/several")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download neuron file hf-hub:org/several/{HUB_FILE}: HF_HUB_OFFLINE is set and "
                              "it is not in the local cache; the cached copy of org/several holds clip.json, "
                              "dinov2.json: name one as hf-hub:org/several/FILE. Download it where")
    with pytest.raises(NeuronFileError, match="the cached copy of org/several holds clip.json, dinov2.json: name one"):
        load_neurons("hf-hub:org/several/clip2.json")
    publish(cache, "org/weights-only", {"model.safetensors": b"not neurons"})
    with pytest.raises(NeuronFileError, match="the cached copy of org/weights-only holds no JSON file. Download"):
        load_neurons("hf-hub:org/weights-only")


@pytest.mark.parametrize("spec", ["hf-hub:org", "hf-hub:org/", "hf-hub:/etc/passwd", "hf-hub:../../x",
                                  "hf-hub:org/repo/../../x", "hf-hub:org/repo/a//b.json", "hf-hub:org/re po",
                                  "hf-hub:org/repo/a\\b.json", "hf-hub:org--x/repo"])
def test_names_that_are_no_hub_file_are_refused_before_anything_is_read(spec, cache, downloads):
    with pytest.raises(NeuronFileError, match=r"expected hf-hub:ORG/REPO or hf-hub:ORG/REPO/FILE \(FILE defaults to "
                                              "register_neurons.json\\)"):
        load_neurons(spec)
    assert downloads == []


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "sub\\x.safetensors", "a/../../x",
                                  "README.md", HUB_FILE, "model.bin"])
def test_a_hostile_scores_name_is_refused_before_anything_but_the_neuron_file_is_read(name, tmp_path, cache,
                                                                                      downloads):
    data = {**sample().to_dict(), "candidate_scores_file": name, "candidate_scores_sha256": "0" * 64}
    publish(cache, "org/hostile", {HUB_FILE: json.dumps(data).encode()})
    with pytest.raises(NeuronFileError) as caught:
        load_neurons("hf-hub:org/hostile")
    assert re.fullmatch(rf"hf-hub:org/hostile/{HUB_FILE}: 'candidate_scores_file' must be the name of a "
                        r"(\.safetensors )?file beside the neuron file, got .*", str(caught.value))
    assert downloads == [HUB_FILE]


def test_a_hub_on_a_closed_port_means_the_cache_alone(tmp_path, cache, downloads, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    publish(cache, "org/repo", folder_files(sample().save_pretrained(tmp_path / "published")))

    assert RegisterNeurons.load("hf-hub:org/repo") == sample()
    with pytest.raises(NeuronFileError) as caught:
        RegisterNeurons.load("hf-hub:org/absent")
    message = str(caught.value)
    assert message.startswith(f"cannot download neuron file hf-hub:org/absent/{HUB_FILE}: 127.0.0.1 cannot be "
                              "reached (") and "and it is not in the local cache. Download it where" in message
    assert downloads == [HUB_FILE, SCORES, HUB_FILE]


# ---- save_pretrained ------------------------------------------------------------------------------------

def front_matter(card: str) -> dict:
    """The YAML between the card's first two ``---`` lines, which must open it."""
    lines = card.splitlines()
    assert lines[0] == "---" and lines.count("---") >= 2, card[:200]
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


def test_save_pretrained_writes_the_neuron_file_its_scores_and_a_card_the_hub_reads(tmp_path):
    neurons = sample(extra={"threshold_mode": "auto", "images": "64 images from photos/",
                            "command": "find-register-neurons --model dinov2:facebook/dinov2-small --images photos/"})
    folder = neurons.save_pretrained(tmp_path / "nested" / "published")
    assert folder == tmp_path / "nested" / "published"
    assert sorted(os.listdir(folder)) == [CARD_FILE, HUB_FILE, SCORES]
    assert sorted(os.listdir(folder.parent)) == ["published"]          # no temporary left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask

    loaded = RegisterNeurons.load(folder / HUB_FILE)
    assert loaded == neurons and torch.equal(loaded.candidate_scores, neurons.candidate_scores)
    card = (folder / CARD_FILE).read_text()
    expected = {"base_model": "facebook/dinov2-small", "library_name": LIBRARY_NAME, "tags": list(CARD_TAGS)}
    assert front_matter(card) == expected
    assert ModelCard.load(folder / CARD_FILE).data.to_dict() == expected     # as the hub reads it
    for line in ("# Register neurons of dinov2:facebook/dinov2-small", "| model spec | dinov2:facebook/dinov2-small |",
                 "| detection layer | 2 |", "| outlier threshold | 10 (auto) |", "| highest candidate layer | 1 |",
                 "| images | 64 images from photos/ |", "| images seen | 64 |", "| images with outliers | 60 |",
                 "2 neurons in 2 layers (neurons per layer: 0: 1, 1: 1), best first:", "| 1 | 1 | 3 | 2.5 |",
                 "| 2 | 0 | 200 | 1.5 |",
                 "find-register-neurons --model dinov2:facebook/dinov2-small --images photos/",
                 'loaded = load_model("dinov2:facebook/dinov2-small")',
                 'neurons = load_neurons("hf-hub:ORG/REPO", loaded.hook_manager)'):
        assert line in card.splitlines(), line


@pytest.mark.parametrize("model, base_model", [
    ("dinov2:facebook/dinov2-large", "facebook/dinov2-large"),
    ("hf:llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf"),
    ("openclip:hf-hub:timm/ViT-B-16-SigLIP", "timm/ViT-B-16-SigLIP"), ("openclip:ViT-B-16:laion2b_s34b_b88k", None),
    ("timm:vit_small_patch16_224:/models/vit.safetensors", None), ("dinov2:./models/dinov2", None), ("demo", None),
    ("unknown", None)])
def test_the_card_names_a_base_model_only_for_a_hub_model(model, base_model, tmp_path):
    neurons = sample(model=model, candidate_scores=None)
    folder = neurons.save_pretrained(tmp_path / "published")
    assert sorted(os.listdir(folder)) == [CARD_FILE, HUB_FILE]
    card = (folder / CARD_FILE).read_text()
    assert front_matter(card) == {**({"base_model": base_model} if base_model else {}), "library_name": LIBRARY_NAME,
                                  "tags": list(CARD_TAGS)}
    assert "The neuron file does not record the command that found these neurons" in card
    assert SCORES not in card


def test_the_card_of_a_local_model_folder_names_no_base_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)      # org/model is a folder here, not a hub repository
    assert hub.hub_model_of("dinov2:org/model") is None
    assert hub.hub_model_of("dinov2:org/other") == "org/other"


def test_a_failed_save_pretrained_into_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    renamed = []

    def failing_rename(source, target):
        renamed.append(Path(source).name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(neurons_module.os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        sample().save_pretrained(tmp_path / "new" / "deeper" / "published")
    assert len(renamed) == 1 and renamed[0].startswith(".published.")   # every file was written, then this failed
    assert os.listdir(tmp_path) == []


def test_a_failed_save_pretrained_into_a_folder_replaces_nothing(tmp_path, monkeypatch):
    folder = sample().save_pretrained(tmp_path / "published")
    (folder / ".git").mkdir()
    before = folder_files(folder)
    monkeypatch.setattr(neurons_module, "model_card", lambda neurons, filename: None)   # the card's write fails
    with pytest.raises(TypeError):
        sample(neurons=[RegisterNeuron(2, 9, 1.0)]).save_pretrained(folder)
    assert folder_files(folder) == before and sorted(os.listdir(tmp_path)) == ["published"]
    monkeypatch.undo()
    assert RegisterNeurons.load(folder / HUB_FILE) == sample()

    sample(neurons=[RegisterNeuron(2, 9, 1.0)], candidate_scores=None).save_pretrained(folder)   # now it succeeds
    assert sorted(os.listdir(folder)) == [".git", CARD_FILE, HUB_FILE]        # the older scores are not published
    assert RegisterNeurons.load(folder / HUB_FILE).pairs() == [(2, 9)]


def test_save_pretrained_refuses_a_file(tmp_path):
    (tmp_path / "published").write_text("mine")
    with pytest.raises(NeuronFileError, match="save_pretrained: .*published is a file; give the folder"):
        sample().save_pretrained(tmp_path / "published")
    assert (tmp_path / "published").read_text() == "mine"


# ---- the command line -------------------------------------------------------------------------------------

def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.fixture(scope="module")
def demo_published(tmp_path_factory) -> Path:
    """``find-register-neurons --save-pretrained DIR`` on the demo."""
    run = tmp_path_factory.mktemp("demo")
    here = os.getcwd()
    os.chdir(run)      # where the default --out would go
    try:
        assert find_register_neurons.main([*DEMO_RUN, "--save-pretrained", "published"]) == 0
    finally:
        os.chdir(here)
    return run / "published"


def test_find_register_neurons_save_pretrained_writes_a_folder_that_records_its_command(demo_published):
    assert sorted(os.listdir(demo_published)) == [CARD_FILE, HUB_FILE, SCORES]
    neurons = RegisterNeurons.load(demo_published / HUB_FILE)
    command = "find-register-neurons --model demo --num-images 12 --eval-images 4"
    assert neurons.extra["command"] == command and neurons.extra["images"] == "12 generated scenes"
    assert neurons.model == "demo" and len(neurons) == 4 and neurons.candidate_scores is not None
    card = (demo_published / CARD_FILE).read_text()
    assert front_matter(card) == {"library_name": LIBRARY_NAME, "tags": list(CARD_TAGS)}
    assert command in card.splitlines() and "| images | 12 generated scenes |" in card.splitlines()
    assert os.listdir(demo_published.parent) == ["published"]       # no --out file beside it


def test_find_register_neurons_applies_neurons_from_the_hub_offline_and_publishes_them_again(
        demo_published, cache, tmp_path, capsys):
    publish(cache, "org/demo-neurons", folder_files(demo_published))
    capsys.readouterr()
    again = tmp_path / "again"
    assert find_register_neurons.main([*DEMO_RUN, "--neurons", "hf-hub:org/demo-neurons",
                                       "--save-pretrained", str(again)]) == 0
    captured = capsys.readouterr()
    assert "loaded 4 register neurons from hf-hub:org/demo-neurons" in captured.out and captured.err == ""
    assert f"wrote {again}: {HUB_FILE} and its candidate scores, and the model card {CARD_FILE}; publish it with: " \
           f"hf upload ORG/REPO {again}" in captured.out.splitlines()
    assert folder_files(again) == folder_files(demo_published)      # the same three files, byte for byte
    assert find_register_neurons.main([*DEMO_RUN, "--neurons", "hf-hub:org/other-neurons"]) == 2
    assert error_line(capsys) == (
        f"error: cannot download neuron file hf-hub:org/other-neurons/{HUB_FILE}: HF_HUB_OFFLINE is set and it is "
        f"not in the local cache. Download it where the hub can be reached (hf download org/other-neurons {HUB_FILE} "
        f"{SCORES} --local-dir DIR), then pass DIR/{HUB_FILE} instead of hf-hub:org/other-neurons.")


HUB_RUNS = textwrap.dedent("""
    import sys
    from test_time_registers.scripts.find_register_neurons import main
    for spec in sys.argv[1:]:
        print(spec, main(["--num-images", "12", "--eval-images", "4", "--quiet", "--neurons", spec]), flush=True)
""")


def test_find_register_neurons_reads_the_cache_when_the_hub_is_on_a_closed_port(demo_published, cache, tmp_path):
    """No HF_HUB_OFFLINE, and a hub that refuses connections: the cached repository is applied, the other
    is one line."""
    publish(cache, "org/demo-neurons", folder_files(demo_published))
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *hub.PROXY_VARIABLES)}
    environment.update(HF_ENDPOINT=CLOSED_PORT, HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", HUB_RUNS, "hf-hub:org/demo-neurons", "hf-hub:org/absent"],
                            env=environment, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    ends = [line for line in result.stdout.splitlines() if line.startswith("hf-hub:")]
    assert ends == ["hf-hub:org/demo-neurons 0", "hf-hub:org/absent 2"], result.stdout + result.stderr
    assert "loaded 4 register neurons from hf-hub:org/demo-neurons" in result.stdout
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: cannot download neuron file hf-hub:org/absent/{HUB_FILE}: 127.0.0.1 cannot "
                                "be reached (")
    assert f"then pass DIR/{HUB_FILE} instead of hf-hub:org/absent." in errors[0]
    assert os.listdir(tmp_path) == ["hf"]       # the cache; the run wrote nothing


def test_the_recorded_command_gives_the_flags_discovery_depends_on_and_no_other():
    args = find_register_neurons.build_parser().parse_args([
        "--model", "dinov2:facebook/dinov2-small", "--images", "my photos", "--top-k", "auto", "--target-ratio", "3",
        "--threshold", "53.5", "--batch-size", "32", "--workers", "2", "--quiet", "--save-pretrained", "out",
        "--checkpoint", "c.pt", "--figure", "f.png"])
    assert find_register_neurons.reproducing_command(args) == (
        "find-register-neurons --model dinov2:facebook/dinov2-small --images 'my photos' --top-k auto "
        "--target-ratio 3.0 --threshold 53.5")


@pytest.mark.parametrize("flags, message", [
    (["--out", "n.json"], f"--save-pretrained DIR writes the neuron file as DIR/{HUB_FILE}; drop --out"),
    ([], "--save-pretrained file.txt is a file; give a folder")])
def test_save_pretrained_flag_misuse_is_one_line_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("mine")
    target = "published" if flags else "file.txt"
    assert find_register_neurons.main([*DEMO_RUN, "--save-pretrained", target, *flags]) == 2
    assert error_line(capsys) == f"error: {message}"
    assert sorted(os.listdir(tmp_path)) == ["file.txt"] and (tmp_path / "file.txt").read_text() == "mine"


def test_a_failed_run_removes_the_folder_save_pretrained_wrote(tmp_path, monkeypatch, capsys):
    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(find_register_neurons, "compare", failing)    # fails after the folder is written
    assert find_register_neurons.main([*DEMO_RUN, "--save-pretrained", str(tmp_path / "out" / "published")]) == 2
    assert "No space left on device" in error_line(capsys)
    assert os.listdir(tmp_path) == []
