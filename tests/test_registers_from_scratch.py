"""The CPU experiment (experiments/registers_from_scratch.py), run from the checkout on a tiny ViT."""

import json

from experiments import registers_from_scratch
from test_time_registers import load_trained_registers

TINY_VIT = "image_size=32,patch_size=8,dim=32,depth=2,heads=2,mlp_dim=64"


def test_the_from_scratch_experiment_reports_accuracy_and_norms_by_block(tmp_path, capsys):
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
