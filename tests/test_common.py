"""The command line's shared flags read the registry: --model's help and --list-models."""

import pytest

from test_time_registers.registry import _ARCHITECTURES, architectures, register_architecture
from test_time_registers.scripts import find_register_neurons
from test_time_registers.scripts.common import list_models, model_help


def test_list_models_prints_every_spec_and_model_class_and_exits(capsys):
    with pytest.raises(SystemExit) as stopped:
        find_register_neurons.build_parser().parse_args(["--list-models"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    for architecture in architectures().values():
        assert architecture.spec in out
        assert all(example in out for example in architecture.examples)
    for line in ("Dinov2WithRegistersForImageClassification: wraps the model at .dinov2_with_registers",
                 "timm.models.eva.Eva: EvaHookManager", "open_clip.transformer.VisionTransformer: ClipHookManager",
                 "ModifiedResNet: unsupported: a convolutional ResNet has no token sequence",
                 "preset:dinov2-vitl14"):
        assert line in out, line


def test_the_model_help_and_the_list_follow_what_is_registered():
    @register_architecture("tiny-listed", spec="tiny-listed:NAME", description="a test architecture",
                           examples=("tiny-listed:example-one",))
    def load(reference, *, device="cpu", precision="fp32", seed=0):
        raise NotImplementedError

    try:
        assert "tiny-listed:NAME" in model_help() and "tiny-listed:example-one" in model_help()
        assert "a test architecture" in list_models()
    finally:
        _ARCHITECTURES.pop("tiny-listed")
    assert "tiny-listed" not in model_help()
