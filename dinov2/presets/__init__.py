"""Published register-neuron lists for DINOv2, shipped as JSON neuron files."""

from __future__ import annotations

import json
from importlib import resources

from shared.errors import NeuronFileError
from shared.hooks import HookManager
from shared.neurons import RegisterNeurons

#: preset name -> (file, the model it belongs to)
PRESETS = {
    "dinov2-vitl14": ("dinov2_vitl14.json", "facebook/dinov2-large"),
}


def load_preset(name: str, hook_manager: HookManager | None = None) -> RegisterNeurons:
    """The register neurons of a known preset, with their provenance in ``.source``.

    With ``hook_manager``, also check that they fit that model.
    """
    if name not in PRESETS:
        raise NeuronFileError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    file_name, _ = PRESETS[name]
    path = resources.files(__package__).joinpath(file_name)
    neurons = RegisterNeurons.from_dict(json.loads(path.read_text()), origin=f"preset {name}")
    if hook_manager is not None:
        neurons.check_fits(hook_manager)
    return neurons
