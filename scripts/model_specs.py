"""``--model`` and ``--neurons`` specs for the scripts."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from shared.errors import ModelLoadError  # noqa: E402
from shared.loading import LoadedModel  # noqa: E402
from shared.neurons import RegisterNeurons  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMS = "demo | openclip:NAME[:PRETRAINED_TAG_OR_PATH] | dinov2:HF_ID_OR_DIR | deit:TIMM_NAME[:CHECKPOINT]"


@dataclass
class ResolvedModel:
    loaded: LoadedModel
    planted: list[tuple[int, int]] | None = None   # set only for the synthetic demo

    @property
    def synthetic(self) -> bool:
        return self.planted is not None


def load_model(spec: str, *, device: str = "cpu", precision: str = "fp32", seed: int = 0) -> ResolvedModel:
    """Load the model a ``--model`` spec names. Raises ModelLoadError for anything unusable."""
    kind, _, rest = spec.partition(":")
    if kind == "demo" and not rest:
        from clip import ClipHookManager
        from clip.demo import build_demo_model

        model, preprocess, planted = build_demo_model(seed=seed)
        model = model.to(device=device, dtype=PRECISIONS[precision])
        return ResolvedModel(LoadedModel(model, preprocess, ClipHookManager(model, name="demo")), planted=planted)
    if kind == "openclip" and rest:
        from clip import load_openclip

        scheme = next((s for s in ("hf-hub:", "local-dir:") if rest.startswith(s)), "")
        name, _, pretrained = rest[len(scheme):].partition(":")
        name = scheme + name
        return ResolvedModel(load_openclip(name, pretrained or None, device=device, precision=precision))
    if kind == "dinov2" and rest:
        from transformers.utils import logging as transformers_logging

        from dinov2 import load_dinov2

        transformers_logging.disable_progress_bar()   # stderr stays for our progress and errors

        return ResolvedModel(load_dinov2(rest, device=device, dtype=PRECISIONS[precision]))
    if kind == "deit" and rest:
        from deit import load_timm

        name, _, checkpoint = rest.partition(":")
        return ResolvedModel(load_timm(name, checkpoint or None, device=device, dtype=PRECISIONS[precision]))
    raise ModelLoadError(f"unknown model spec {spec!r}; expected {FORMS}")


def load_neurons(spec: str, hook_manager) -> RegisterNeurons:
    """A neuron file path, or ``preset:NAME`` for a shipped list; checked against the model."""
    if spec.startswith("preset:"):
        from dinov2 import load_preset

        return load_preset(spec.removeprefix("preset:"), hook_manager)
    return RegisterNeurons.load(spec, hook_manager)
