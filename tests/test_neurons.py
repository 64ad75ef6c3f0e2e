import hashlib
import json
import os
import stat

import pytest

from test_time_registers import IncompatibleNeuronsError, NeuronFileError, RegisterNeuron, RegisterNeurons


def _sample():
    return RegisterNeurons([RegisterNeuron(3, 17, 12.5), RegisterNeuron(2, 4, 3.25)], model="demo", detect_layer=7,
                           threshold=21.0, highest_layer=3, images_seen=64, images_with_outliers=60,
                           image_size=(224, 224), score="raw", source="find_register_neurons",
                           extra={"threshold_mode": "auto"})


def test_json_round_trip_keeps_everything(tmp_path):
    path = _sample().save(tmp_path / "n.json")
    data = json.loads(path.read_text())
    for key in ("model", "detect_layer", "threshold", "highest_layer", "images_with_outliers", "neurons"):
        assert key in data
    assert data["neurons"][0] == {"layer": 3, "neuron": 17, "score": 12.5}
    loaded = RegisterNeurons.load(path)
    assert loaded == _sample()
    assert [(n.layer, n.neuron, n.score) for n in loaded] == [(3, 17, 12.5), (2, 4, 3.25)]
    assert loaded.by_layer() == {2: [4], 3: [17]}
    assert list(tmp_path.iterdir()) == [path]       # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_coerce_accepts_pairs_and_layer_dicts():
    assert RegisterNeurons.coerce([(1, 2), (0, 5)]).pairs() == [(1, 2), (0, 5)]
    assert RegisterNeurons.coerce({4: [1, 2], 0: [9]}).pairs() == [(4, 1), (4, 2), (0, 9)]
    with pytest.raises(ValueError, match="duplicate"):
        RegisterNeurons.coerce([(1, 2), (1, 2)])
    with pytest.raises(TypeError):
        RegisterNeurons.coerce("1,2")
    with pytest.raises(TypeError):
        RegisterNeurons.coerce([(1, -2)])


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"model": "m", "neurons": [{"layer": 0, "neuron": 1}]}), "missing key"),
    (json.dumps({"model": "m", "detect_layer": 1, "threshold": 1, "highest_layer": 0, "images_with_outliers": 1,
                 "neurons": [{"layer": "x", "neuron": 1}]}),
     r"'neurons\[0\].layer' must be an integer in 0..4095, got 'x'"),
    (json.dumps({"model": "m", "detect_layer": 1, "threshold": 1, "highest_layer": 0, "images_with_outliers": 1,
                 "neurons": []}), "non-empty"),
])
def test_bad_files_give_precise_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(NeuronFileError, match=message):
        RegisterNeurons.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(NeuronFileError, match="not found"):
        RegisterNeurons.load(tmp_path / "nope.json")


def test_neurons_that_do_not_fit_the_model(tmp_path, clip_hm):
    path = _sample().save(tmp_path / "n.json")   # layer 3 does not exist in the 3-block tiny model
    with pytest.raises(IncompatibleNeuronsError, match="layers 0..2"):
        RegisterNeurons.load(path, clip_hm)
    with pytest.raises(IncompatibleNeuronsError, match="neurons 0..255"):
        RegisterNeurons.coerce([(1, 256)]).check_fits(clip_hm)


def test_candidate_scores_are_saved_beside_the_json_and_read_back(tmp_path):
    import torch

    neurons = _sample()
    neurons.candidate_scores = torch.tensor([[1.0, 2.0, float("nan")] * 6, [0.5, 12.5, 3.25] * 6,
                                             [0.0] * 18, [4.0] * 18])     # [layers 0..highest_layer 3, neurons]
    path = neurons.save(tmp_path / "n.json")
    sidecar = tmp_path / "n.scores.safetensors"
    assert json.loads(path.read_text())["candidate_scores_file"] == sidecar.name
    assert json.loads(path.read_text())["candidate_scores_sha256"] == hashlib.sha256(sidecar.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.json", sidecar.name]   # no temporary files
    loaded = RegisterNeurons.load(path)
    torch.testing.assert_close(loaded.candidate_scores, neurons.candidate_scores, equal_nan=True)
    assert loaded.top(1).candidate_scores is loaded.candidate_scores

    sidecar.unlink()   # a neuron file copied without its scores still loads, without them
    assert RegisterNeurons.load(path).candidate_scores is None
    sidecar.write_bytes(b"not safetensors")
    with pytest.raises(NeuronFileError, match="not the candidate-score file .* was saved with"):
        RegisterNeurons.load(path)


def test_save_load_save_is_byte_identical(tmp_path):
    import torch

    neurons = _sample()
    neurons.candidate_scores = torch.arange(4 * 20, dtype=torch.float32).reshape(4, 20) / 7
    neurons.candidate_scores[0, 18:] = float("nan")
    first = neurons.save(tmp_path / "a" / "n.json")
    second = RegisterNeurons.load(first).save(tmp_path / "b" / "n.json")
    for name in ("n.json", "n.scores.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert RegisterNeurons.load(second) == neurons


def test_neurons_without_scores_load_equal_to_themselves(tmp_path):
    hand = RegisterNeurons.coerce([(1, 2), (0, 5)])               # scores NaN: none known
    assert RegisterNeurons.load(hand.save(tmp_path / "hand.json")) == hand
    assert len({RegisterNeuron(1, 2), RegisterNeuron(1, 2)}) == 1 and RegisterNeuron(1, 2) != RegisterNeuron(1, 2, 0.5)
