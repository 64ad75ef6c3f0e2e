"""The README's "Add a new architecture" example, run exactly as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_new_architecture_example_runs(capsys):
    section = README.read_text().split("## Add a new architecture", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert 30 <= len([line for line in code.splitlines() if line.strip()]) <= 70
    namespace = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    assert "largest/median patch norm" in capsys.readouterr().out
    hook_manager = namespace["hm"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hook_manager.model.modules())
