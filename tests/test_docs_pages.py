"""Every fenced code block of the README and of the documentation pages is run, or checked.

The blocks are collected from ``README.md`` and ``docs/pages/**/*.md``, one test per block, with the
id ``PAGE:N`` (N counts the page's fenced blocks from 0). The fence's language gives the rule, and a
language without a rule fails:

``python``
    Run. The blocks of one page run in order in one namespace, as a reader pastes them, so a block
    may use what an earlier block of its page defined (running one block alone runs the earlier
    ones of its page first). They run in a temporary working folder that holds the files the pages
    read (``FILES`` below: ``photos/`` and ``photo.jpg``, the demo's generated scenes;
    ``shard_a/``, ``shard_b/``; ``register_neurons.json``, found on the demo; ``run.h5``, an
    activation log; ``runs/deit3-reg4``, the demo fine-tuned with 4 registers), each made once,
    when a block first names it. A block identical to one that already ran (the README's quick
    start is the Get started page's) is not run twice. Blocks that would need downloaded weights
    are written in the pages to run on the synthetic demo model, or on a tiny model built on the
    spot, with the real model's spec in a comment. The few that only make sense with a real
    checkpoint are listed in ``CHECK_ONLY``, with the reason; they are compiled, and not run.
    Every Python block, run or not, must compile, and every name it imports from
    ``test_time_registers`` must exist.
``bash``
    Every command is checked, none is run. A line ending in a backslash continues on the next, ``#``
    starts a comment, ``&&`` separates commands, and leading ``NAME=value`` assignments and
    ``nice`` are skipped. Then, by program:

    * one of the project's console scripts (``[project.scripts]`` in ``pyproject.toml``), by name or
      by path (``.venv/bin/NAME``, ``"$(which NAME)"``), or ``python scripts/PROGRAM.py``: its
      arguments are parsed by the program's own parser (``build_parser()`` of
      ``scripts/PROGRAM.py``, with abbreviations off), so a renamed or removed flag fails;
    * ``torchrun``: its options, then a script as above, whose arguments are parsed the same way;
    * ``python3 -m venv DIR``, ``pip install ...`` (an extra of ``.`` must exist in
      ``pyproject.toml``), ``python -m pytest ...`` (its paths must exist), ``python -m mkdocs
      build|serve -f FILE`` (FILE must exist), ``hf upload|download ...``: their shape only;
    * any other program fails: give it a rule here.

    Placeholders are UPPERCASE words (``PHOTOS``, ``SPEC``, ``ORG/REPO``), which parse as values;
    ``...`` and ``<...>`` are refused outside comments.
``text``
    Output samples, not run; but a line that starts with ``$ `` is a command, checked as in bash.
``json``
    Parsed by ``json.loads``; a neuron file (one with ``format_version``) is also read by
    ``RegisterNeurons.load``.
``toml``
    Parsed by ``tomllib``; its entry-point groups must be ones ``pyproject.toml`` declares.

A few blocks also have their printed values checked (``CHECKS``): the new-architecture example
registers its spec and leaves no hook behind, and the registry's listing is the one its comment shows.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "pages"
PYPROJECT = ROOT / "pyproject.toml"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: tomli, if pip brought it
    tomllib = pytest.importorskip("tomli")

#: Blocks that are compiled and their imports checked, but not run: (page, a line of the block) -> why.
CHECK_ONLY = {
    ("presets.md", 'model, preprocess, hm = load_model("dinov2:facebook/dinov2-large")'):
        "the preset is DINOv2 ViT-L/14's: 45 neurons of a 24-block, 4096-wide MLP, real weights only",
    ("vlm.md", 'llava = load_model("hf:llava-hf/llava-1.5-7b-hf", device="cuda", precision="bf16")'):
        "LLaVA-1.5-7B on a GPU, its processor's inputs and an evaluation harness",
}


@dataclass(frozen=True)
class Block:
    page: str      # README.md, or a path under docs/pages/
    index: int     # among the page's fenced blocks
    language: str
    code: str
    line: int      # of the opening fence

    @property
    def id(self) -> str:
        return f"{self.page}:{self.index}"


def fenced_blocks(path: Path, page: str) -> list[Block]:
    blocks, lines = [], path.read_text().split("\n")
    opening = None
    for number, line in enumerate(lines, 1):
        if opening is None and line.startswith("```"):
            opening = (number, line[3:].strip(), [])
        elif opening is not None and line.rstrip() == "```":
            blocks.append(Block(page, len(blocks), opening[1], "\n".join(opening[2]) + "\n", opening[0]))
            opening = None
        elif opening is not None:
            opening[2].append(line)
    assert opening is None, f"{page}: the block opened at line {opening[0]} is never closed"
    return blocks


def all_blocks() -> list[Block]:
    blocks = fenced_blocks(ROOT / "README.md", "README.md")
    for path in sorted(PAGES.rglob("*.md")):
        blocks += fenced_blocks(path, path.relative_to(PAGES).as_posix())
    return blocks


BLOCKS = all_blocks()


def test_there_are_blocks_and_every_check_only_entry_names_one_block():
    assert len(BLOCKS) > 40 and {block.page for block in BLOCKS} >= {"README.md", "getting-started.md", "deploy.md"}
    for (page, line), _why in CHECK_ONLY.items():
        assert len([b for b in BLOCKS if b.page == page and line in b.code.split("\n")]) == 1, (page, line)


# ---------------------------------------------------------------- python


def imported_names_exist(block: Block) -> None:
    """Every ``test_time_registers`` module and name the block imports exists."""
    tree = ast.parse(block.code, filename=block.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "test_time_registers":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "test_time_registers":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")   # a submodule, or ImportError


def check_only(block: Block) -> str | None:
    lines = block.code.split("\n")
    return next((why for (page, line), why in CHECK_ONLY.items() if page == block.page and line in lines), None)


class Workdir:
    """The working folder of the Python blocks, and the files they read, made when first named."""

    def __init__(self, path: Path):
        self.path = path
        self.made: set[str] = set()
        self._demo = None

    def demo(self):
        if self._demo is None:
            from test_time_registers import load_model
            self._demo = load_model("demo")
        return self._demo

    def scenes(self, folder: str, count: int, seed: int) -> None:
        (self.path / folder).mkdir()
        for index, image in enumerate(self.demo().generate_images(count, seed)):
            image.save(self.path / folder / f"scene{index:02d}.png")

    def make_photo(self) -> None:
        next(iter(self.demo().generate_images(1, 7))).save(self.path / "photo.jpg")

    def make_neurons(self) -> None:
        from test_time_registers import find_register_neurons
        demo = self.demo()
        neurons = find_register_neurons(demo.hook_manager, list(demo.generate_images(32, 0)), demo.preprocess,
                                        top_k=len(demo.planted), progress=False)
        neurons.save(self.path / "register_neurons.json")

    def make_log(self) -> None:
        from test_time_registers.analysis.activation_log import log_activations
        demo = self.demo()
        log_activations(demo.hook_manager, list(demo.generate_images(4, 3)), demo.planted, self.path / "run.h5",
                        demo.preprocess, progress=False)

    def make_trained(self) -> None:
        from test_time_registers.scripts import train_registers
        out = self.path / "runs" / "deit3-reg4"
        assert train_registers.main(["--num-images", "4", "--batch-size", "4", "--epochs", "1", "--freeze-layers", "7",
                                     "--out", str(out), "--quiet"]) == 0

    def prepare(self, code: str) -> None:
        for name, make in FILES.items():
            if name in code and name not in self.made:
                make(self)
                self.made.add(name)


#: The files the pages' Python blocks read, by the name they use, and how each is made.
FILES = {
    "photos/": lambda w: w.scenes("photos", 32, 0),
    "photo.jpg": Workdir.make_photo,
    "shard_a/": lambda w: w.scenes("shard_a", 16, 1),
    "shard_b/": lambda w: w.scenes("shard_b", 16, 2),
    "register_neurons.json": Workdir.make_neurons,
    "run.h5": Workdir.make_log,
    "runs/deit3-reg4": Workdir.make_trained,
}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return Workdir(tmp_path_factory.mktemp("docs-blocks"))


_namespaces: dict[str, dict] = {}     # page -> the namespace its blocks run in
_ran: dict[str, int] = {}             # page -> how many of its Python blocks have run
_by_code: dict[str, dict] = {}        # a block's code -> the namespace it ran in
_failed: dict[str, str] = {}          # page -> the block of it that failed


def check_architecture_example(namespace: dict, output: str) -> None:
    from test_time_registers.registry import _ARCHITECTURES, architectures
    try:
        assert "largest/median patch norm" in output
        registered = architectures()["hfvit"]
        assert isinstance(namespace["hm"], namespace["ViTHookManager"]) and registered.load is namespace["load_hf_vit"]
        assert namespace["hm"].name == f"hfvit:{namespace['folder']}"   # loaded through the registry, by spec
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in namespace["model"].modules())
    finally:
        _ARCHITECTURES.pop("hfvit", None)   # other tests see only the installed architectures


def check_registry_listing(namespace: dict, output: str) -> None:
    from test_time_registers import architectures
    code = next(b.code for b in BLOCKS if b.page == "architectures.md" and "sorted(architectures())" in b.code)
    shown = ast.literal_eval(re.search(r"sorted\(architectures\(\)\)\s*# (\[.*\])", code).group(1))
    assert sorted(architectures()) == shown
    assert str(namespace["hm"].input_dtype) == "torch.bfloat16"


def check_demo_finds_the_planted_neurons(namespace: dict, output: str) -> None:
    assert len(namespace["neurons"]) == len(namespace["demo"].planted) == 4


#: Checks after a block runs: (page, a line of the block) -> check(namespace, printed output).
CHECKS = {
    ("add-architecture.md", "class ViTHookManager(HookManager):"): check_architecture_example,
    ("architectures.md", 'model, preprocess, hm = load_model("timm:deit3_small_patch16_224:random", precision="bf16")'):
        check_registry_listing,
    ("getting-started.md", "assert sorted(neurons.pairs()) == sorted(demo.planted)"): check_demo_finds_the_planted_neurons,
}


def run_python(block: Block, workdir: Workdir, capsys) -> None:
    page_blocks = [b for b in BLOCKS if b.page == block.page and b.language == "python" and not check_only(b)]
    name = "docs_" + re.sub(r"\W", "_", Path(block.page).stem)
    namespace = _namespaces.setdefault(block.page, {"__name__": name})
    for earlier in page_blocks[_ran.get(block.page, 0):page_blocks.index(block) + 1]:
        if block.page in _failed:
            pytest.fail(f"{_failed[block.page]}, an earlier block of this page, failed")
        _ran[block.page] = page_blocks.index(earlier) + 1
        if earlier.code in _by_code:             # the same block, already run on another page
            namespace.update(_by_code[earlier.code])
            continue
        _failed[block.page] = earlier.id
        workdir.prepare(earlier.code)
        capsys.readouterr()
        exec(compile(earlier.code, f"{earlier.page} (block {earlier.index}, line {earlier.line})", "exec"), namespace)
        lines = earlier.code.split("\n")
        for (page, line), check in CHECKS.items():
            if page == earlier.page and line in lines:
                check(namespace, capsys.readouterr().out)
        _by_code[earlier.code] = namespace
        del _failed[block.page]


def test_every_check_entry_names_one_block():
    for page, line in CHECKS:
        assert len([b for b in BLOCKS if b.page == page and line in b.code.split("\n")]) == 1, (page, line)


# ---------------------------------------------------------------- command lines

PYTHONS = re.compile(r"^(.*/)?python(3(\.\d+)?)?$")


def console_scripts() -> dict[str, str]:
    """Each console script's name -> the program module (``scripts/PROGRAM.py``) it launches."""
    from test_time_registers.scripts import launch
    scripts = {}
    for name, target in tomllib.loads(PYPROJECT.read_text())["project"]["scripts"].items():
        module, function = target.split(":")
        assert module == "test_time_registers.scripts.launch", target
        scripts[name] = re.search(r'_launch\("(\w+)"\)', inspect.getsource(getattr(launch, function))).group(1)
    return scripts


def parse_program(program: str, arguments: list[str]) -> None:
    from test_time_registers.scripts.common import UsageError
    parser = importlib.import_module(f"test_time_registers.scripts.{program}").build_parser()
    parser.allow_abbrev = False
    try:
        parser.parse_args(arguments)
    except (UsageError, SystemExit) as error:
        pytest.fail(f"scripts/{program}.py refuses {shlex.join(arguments)!r}: {error}")


def script_program(token: str) -> str | None:
    """The program a script token names: a console script (by name, path or $(which NAME)) or scripts/NAME.py."""
    which = re.fullmatch(r"\$\(which ([\w-]+)\)", token)
    name = which.group(1) if which else token.rsplit("/", 1)[-1]
    if name in console_scripts():
        return console_scripts()[name]
    if token.startswith("scripts/") and token.endswith(".py"):
        assert (ROOT / token).is_file(), f"{token} does not exist"
        return Path(token).stem
    return None


def extras() -> set[str]:
    return set(tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"])


def check_pip(arguments: list[str]) -> None:
    assert arguments[:1] == ["install"], arguments
    rest = arguments[1:]
    while rest:
        token = rest.pop(0)
        if token == "--index-url":
            assert re.fullmatch(r"https://\S+", rest.pop(0))
        elif token in ("-e", "-U", "--upgrade"):
            continue
        elif token.startswith(".") or token.startswith("test-time-registers"):
            extra = re.fullmatch(r"(?:\.|test-time-registers)(?:\[([\w,-]+)\])?", token)
            assert extra, f"pip install {token}: expected . or .[EXTRA]"
            assert set(filter(None, (extra.group(1) or "").split(","))) <= extras(), f"no such extra: {token}"
        else:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+([<>=!~]=?[\w.*]+)?", token), f"pip install {token}"


def check_command(tokens: list[str]) -> None:
    while tokens and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]) or tokens[0] == "nice"):
        tokens = tokens[1:]
    assert tokens, "an empty command"
    bad = [t for t in tokens if t == "..." or re.fullmatch(r".*<[^>]+>.*", t)]
    assert not bad, f"placeholders {bad}: write them as UPPERCASE words"
    program, arguments = tokens[0], tokens[1:]
    if (name := script_program(program)) is not None:
        return parse_program(name, arguments)
    if PYTHONS.match(program):
        if arguments[:2] == ["-m", "venv"]:
            assert len(arguments) == 3, tokens
        elif arguments[:2] == ["-m", "pytest"]:
            options = iter(arguments[2:])
            for argument in options:
                if argument in ("-m", "-k"):
                    next(options)                         # a marker or keyword expression
                else:
                    assert argument.startswith("-") or (ROOT / argument.split("::")[0]).exists(), argument
        elif arguments[:2] == ["-m", "mkdocs"]:
            assert arguments[2] in ("build", "serve") and "-f" in arguments, tokens
            assert (ROOT / arguments[arguments.index("-f") + 1]).is_file(), tokens
        elif arguments and (name := script_program(arguments[0])) is not None:
            parse_program(name, arguments[1:])
        else:
            pytest.fail(f"no rule for {shlex.join(tokens)!r}")
    elif program.rsplit("/", 1)[-1] in ("pip", "pip3"):
        check_pip(arguments)
    elif program == "torchrun":
        while arguments and arguments[0].startswith("--"):
            option = arguments.pop(0)
            if option in ("--nproc_per_node", "--nproc-per-node", "--nnodes"):
                assert re.fullmatch(r"\d+", arguments.pop(0)), tokens
            else:
                assert option == "--standalone", f"torchrun {option}: give it a rule"
        name = script_program(arguments[0]) if arguments else None
        assert name is not None, f"torchrun runs no script of this project: {shlex.join(tokens)!r}"
        parse_program(name, arguments[1:])
    elif program == "hf":
        assert arguments[:1] in (["upload"], ["download"]) and len(arguments) >= 2, tokens
    else:
        pytest.fail(f"no rule for the program {program!r} in {shlex.join(tokens)!r}; add one to {__name__}")


def command_lines(text: str) -> list[list[str]]:
    """The commands of a shell snippet, each as its tokens."""
    commands = []
    for line in text.replace("\\\n", " ").split("\n"):
        tokens = shlex.split(line, comments=True)
        while tokens:
            if "&&" in tokens:
                at = tokens.index("&&")
                commands.append(tokens[:at])
                tokens = tokens[at + 1:]
            else:
                commands.append(tokens)
                tokens = []
    return commands


def prompted_commands(text: str) -> str:
    """The ``$ `` lines of an output sample, with their continuation lines."""
    out, lines = [], iter(text.split("\n"))
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + " " + next(lines)
            out.append(command)
    return "\n".join(out)


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_block(block: Block, request, capsys, monkeypatch):
    if block.language == "python":
        compile(block.code, block.id, "exec")
        imported_names_exist(block)
        if check_only(block) is None:
            workdir = request.getfixturevalue("workdir")
            monkeypatch.chdir(workdir.path)
            run_python(block, workdir, capsys)
    elif block.language == "bash":
        commands = command_lines(block.code)
        assert commands, f"{block.id}: no command"
        for tokens in commands:
            check_command(tokens)
    elif block.language == "text":
        for tokens in command_lines(prompted_commands(block.code)):
            check_command(tokens)
    elif block.language == "json":
        data = json.loads(block.code)
        if isinstance(data, dict) and "format_version" in data:
            from test_time_registers import RegisterNeurons
            path = request.getfixturevalue("tmp_path") / "neurons.json"
            path.write_text(block.code)
            assert RegisterNeurons.load(path).to_dict()["neurons"] == data["neurons"]
    elif block.language == "toml":
        groups = set(tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"])
        assert set(tomllib.loads(block.code)["project"]["entry-points"]) <= groups
    else:
        pytest.fail(f"{block.id} (line {block.line}): no rule for ```{block.language}; use python, bash, text, json "
                    "or toml, or add a rule to this module")


def test_placeholders_and_renamed_flags_are_caught():
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        check_command(["find-register-neurons", "--no-such-flag"])
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        check_command(["find-register-neurons", "--thresh", "3"])        # no abbreviations
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        check_command(shlex.split('torchrun --standalone --nproc_per_node 2 "$(which find-register-neurons)" --nope'))
    with pytest.raises(AssertionError, match="placeholders"):
        check_command(["find-register-neurons", "--images", "<folder>"])
    with pytest.raises(pytest.fail.Exception, match="no rule"):
        check_command(["curl", "https://example.com"])
    with pytest.raises(AssertionError, match="no such extra"):
        check_command(["pip", "install", "-e", ".[nonexistent]"])
