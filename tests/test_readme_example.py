"""The README's "Add a new architecture" example, run exactly as written."""

import re
from pathlib import Path

from test_time_registers.registry import _ARCHITECTURES, architectures

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_new_architecture_example_runs_and_registers_its_spec(capsys):
    section = README.read_text().split("## Add a new architecture", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace = {"__name__": "readme_example"}
    try:
        exec(compile(code, str(README), "exec"), namespace)
        assert "largest/median patch norm" in capsys.readouterr().out
        registered = architectures()["hfvit"]
        assert isinstance(namespace["hm"], namespace["ViTHookManager"]) and registered.load is namespace["load_hf_vit"]
        assert namespace["hm"].name == f"hfvit:{namespace['folder']}"   # loaded through the registry, by spec
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in namespace["model"].modules())
    finally:
        _ARCHITECTURES.pop("hfvit", None)   # other tests see only the installed architectures


def test_the_offline_demo_and_registry_snippets_run():
    text = README.read_text()
    demo = re.search(r"### The offline demo.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    registry = re.search(r"## Supported architectures.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    namespace = {}
    exec(compile(demo, str(README), "exec"), namespace)
    assert len(namespace["neurons"]) == 4
    exec(compile(registry.replace("sorted(architectures())", "listed = sorted(architectures())"), str(README), "exec"),
         namespace)
    assert namespace["listed"] == ["deit", "demo", "dinov2", "hf", "hf-tower", "openclip", "timm"]
    assert namespace["hm"].input_dtype.is_floating_point and str(namespace["hm"].input_dtype) == "torch.bfloat16"
