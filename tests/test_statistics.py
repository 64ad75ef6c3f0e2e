"""Algorithm 1's pure part (test_time_registers.statistics): statistics that merge, restore exactly and finalize."""

import pytest
import torch

from test_time_registers import DiscoveryStatistics, InvalidArgumentError, gather_statistics
from tests.test_discovery import demo_model, same_result, scenes  # noqa: F401 - fixtures


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
    for threshold in (6.0, 0.1):   # a few outliers (rows gathered), every patch one (one dense product)
        sums = []
        for rows in (True, False):
            stats = DiscoveryStatistics({layer: 16 for layer in range(3)}, 2, layout, threshold=threshold,
                                        outlier_rows=rows)
            stats.update(activations, norms)
            sums.append(stats.score_sums)
        for layer in range(3):
            torch.testing.assert_close(sums[0][layer], sums[1][layer])


def test_the_settings_are_checked_once_and_name_discoverys_keywords(demo_model):
    from test_time_registers.statistics import DiscoverySettings

    hm = demo_model.hook_manager
    assert DiscoverySettings().layers(hm) == (7, list(range(8)))
    assert DiscoverySettings(detect_layer=5, highest_layer=2).layers(hm) == (5, [0, 1, 2])
    settings, rest = DiscoverySettings.split({"top_k": 3, "threshold": 40.0, "batch_size": 8})
    assert (settings.top_k, settings.threshold, rest) == (3, 40.0, {"batch_size": 8})
    assert DiscoverySettings(sparsity_filter=True).sparsity == (0.5, 0.5) and DiscoverySettings().sparsity is None
    for bad, message in (({"top_k": 0}, "top_k must be a positive int"), ({"threshold": -1}, "threshold must be"),
                         ({"score": "mean"}, "score must be 'raw' or 'abs'"),
                         ({"top_k": "auto", "target_ratio": 0.5}, "target_ratio must be a finite number of at least 1"),
                         ({"sparsity_frac_threshold": "half"}, "sparsity_frac_threshold must be a number")):
        with pytest.raises(InvalidArgumentError, match=message):
            DiscoverySettings(**bad)
    with pytest.raises(InvalidArgumentError, match="highest_layer \\(6\\) cannot be after detect_layer \\(5\\)"):
        DiscoverySettings(detect_layer=5, highest_layer=6).layers(hm)
    with pytest.raises(TypeError):
        gather_statistics(hm, [], top_kk=3)   # an unknown keyword is no setting


def test_load_state_dict_checks_every_field_before_it_restores(demo_model, scenes):
    from test_time_registers import CheckpointError

    hm = demo_model.hook_manager
    stats = gather_statistics(hm, scenes[:4], demo_model.preprocess, threshold=40.0, progress=False)
    state = stats.state_dict()
    for change, message in (({"counts": torch.zeros(3)}, r"counts must be a float32 tensor of shape \[4\]"),
                            ({"counts": torch.tensor([1.0, 2.0, 0.0, 9.0])}, "counts must be whole numbers"),
                            ({"norm_max": torch.tensor(float("nan"))}, "norm_max holds NaN"),
                            ({"score": 3}, "score must be 'raw' or 'abs'"),
                            ({"score_sums": {1: state["score_sums"][1]}}, "score_sums must be a dict of layers"),
                            ({"threshold": float("nan")}, "threshold must be null or a positive number")):
        target = DiscoveryStatistics({layer: 768 for layer in range(8)}, 7, hm.layout)
        before = target.state_dict()
        with pytest.raises(CheckpointError, match=message):
            target.load_state_dict({**state, **change}, origin="stats.pt")
        assert torch.equal(target.counts, before["counts"])     # nothing restored


def test_an_infinite_target_ratio_is_refused():
    from test_time_registers.statistics import check_target_ratio

    for value in (float("inf"), float("nan")):
        with pytest.raises(InvalidArgumentError, match="finite number of at least 1"):
            check_target_ratio(value)
