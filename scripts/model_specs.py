"""``--model`` specs for the scripts: ``demo`` or ``openclip:NAME[:PRETRAINED_TAG_OR_PATH]``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from shared.errors import ModelLoadError  # noqa: E402
from shared.loading import LoadedModel  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMS = "demo | openclip:NAME[:PRETRAINED_TAG_OR_PATH]"


@dataclass
class ResolvedModel:
    loaded: LoadedModel
    synthetic: bool = False
    planted: list[tuple[int, int]] | None = None


def load_model(spec: str, *, device: str = "cpu", precision: str = "fp32", seed: int = 0) -> ResolvedModel:
    """Load the model a ``--model`` spec names. Raises ModelLoadError for anything unusable."""
    kind, _, rest = spec.partition(":")
    if kind == "demo" and not rest:
        from clip import ClipHookManager
        from clip.demo import build_demo_model

        model, preprocess, planted = build_demo_model(seed=seed)
        model = model.to(device=device, dtype=PRECISIONS[precision])
        return ResolvedModel(LoadedModel(model, preprocess, ClipHookManager(model, name="demo")),
                             synthetic=True, planted=planted)
    if kind == "openclip" and rest:
        from clip import load_openclip

        scheme = next((s for s in ("hf-hub:", "local-dir:") if rest.startswith(s)), "")
        name, _, pretrained = rest[len(scheme):].partition(":")
        name = scheme + name
        return ResolvedModel(load_openclip(name, pretrained or None, device=device, precision=precision))
    raise ModelLoadError(f"unknown model spec {spec!r}; expected {FORMS}")
