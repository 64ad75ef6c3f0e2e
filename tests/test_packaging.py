"""The library installs under one namespace, beside OpenAI's ``clip`` and torch.hub's ``dinov2``."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import test_time_registers

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("shared", "clip", "dinov2", "deit", "scripts")


def make_stand_ins(folder: Path) -> Path:
    """Stand-ins for OpenAI's ``clip`` package and torch.hub's ``dinov2`` repository (``dinov2/hub/backbones.py``)."""
    (folder / "clip").mkdir(parents=True)
    (folder / "clip" / "__init__.py").write_text("STAND_IN = 'openai clip'\ndef load(name):\n    return name\n")
    (folder / "dinov2" / "hub").mkdir(parents=True)
    (folder / "dinov2" / "__init__.py").write_text("STAND_IN = 'torch.hub dinov2'\n")
    (folder / "dinov2" / "hub" / "__init__.py").write_text("")
    (folder / "dinov2" / "hub" / "backbones.py").write_text("def dinov2_vits14():\n    return 'hub backbone'\n")
    return folder


COLLISION_CHECK = textwrap.dedent("""
    import clip, dinov2.hub.backbones
    from test_time_registers import HookManager, ModifiedModel, RegisterNeurons, find_register_neurons
    from test_time_registers.clip import ClipHookManager, load_openclip
    from test_time_registers.deit import DeitHookManager, load_timm
    from test_time_registers.dinov2 import Dinov2HookManager, load_dinov2
    import clip as clip_again, dinov2 as dinov2_again
    assert clip_again.STAND_IN == "openai clip" and clip_again.load("ViT-B/32") == "ViT-B/32"
    assert dinov2_again.STAND_IN == "torch.hub dinov2"
    assert dinov2.hub.backbones.dinov2_vits14() == "hub backbone"
    print("both")
""")


def _environment(stand_ins: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(stand_ins), "HF_HUB_OFFLINE": "1"}


def test_stand_in_clip_and_dinov2_import_beside_the_library(tmp_path):
    stand_ins = make_stand_ins(tmp_path / "stand_ins")
    result = subprocess.run([sys.executable, "-c", COLLISION_CHECK], cwd=tmp_path, env=_environment(stand_ins),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "both", result.stderr


def test_a_fresh_environment_installs_the_wheel_and_its_console_script_runs_the_demo(tmp_path):
    """A real (not editable) install into a new venv, whose dependencies come from this one."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = tmp_path / "source"   # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "-q", str(source)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    assert (site / "test_time_registers" / "dinov2" / "presets" / "dinov2_vitl14.json").is_file()
    assert not (site / "shared").exists() and not (site / "clip").exists()

    stand_ins = make_stand_ins(tmp_path / "stand_ins")
    check = subprocess.run([str(python), "-c", COLLISION_CHECK], cwd=tmp_path, env=_environment(stand_ins),
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "both" in check.stdout, check.stderr
    demo = subprocess.run([str(venv / "bin" / "find-register-neurons"), "--num-images", "8", "--eval-images", "4",
                           "--quiet", "--out", str(tmp_path / "neurons.json")],
                          cwd=tmp_path, env=_environment(stand_ins), capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr
    assert "planted neurons recovered: 4 of 4" in demo.stdout
    assert (tmp_path / "neurons.json").is_file()


def test_version_is_the_installed_distributions():
    assert test_time_registers.__version__ == metadata.version("test-time-registers")
    requirements = metadata.requires("test-time-registers")
    assert any(re.match(r"torchvision\b", requirement) for requirement in requirements)


def test_console_scripts_point_at_the_scripts():
    scripts = {entry.name: entry.value for entry in metadata.entry_points(group="console_scripts")
               if entry.value.startswith("test_time_registers.")}
    expected = {"find-register-neurons": "test_time_registers.scripts.launch:find_register_neurons",
                "test-time-registers-benchmark": "test_time_registers.scripts.launch:benchmark",
                "test-time-registers-visualize": "test_time_registers.scripts.launch:visualize",
                "test-time-registers-evaluate": "test_time_registers.scripts.launch:evaluate",
                "test-time-registers-train": "test_time_registers.scripts.launch:train_registers"}
    assert expected.items() <= scripts.items()   # others may be declared beside these
    for value in expected.values():
        assert callable(metadata.EntryPoint(name="x", value=value, group="console_scripts").load())


@pytest.mark.parametrize("folder", SOURCE_FOLDERS)
def test_no_code_edits_sys_path(folder):
    for path in (ROOT / folder).rglob("*.py"):
        assert not re.search(r"sys\.path\.(insert|append|extend)", path.read_text()), path
