"""Small file helpers shared by every reader and writer: bounded reads, strict JSON, atomic units.

Every file the library reads may come from a stranger or a damaged disk. Readers go through
:func:`read_bounded` (a regular file, under a size limit, before anything is parsed) and
:func:`parse_json` (a nesting limit, no ``NaN``/``Infinity``, no duplicate keys), and raise the
error class their file kind names, with the file, the field and what was expected. Writers go
through :func:`write_atomically` or, for files that belong together, :func:`write_unit`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import first_line

#: Writes one file: ``write(temporary_path)``.
Writer = Callable[[str], None]

#: Default limits of what a reader accepts.
MAX_JSON_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32


def read_bounded(path: str | os.PathLike, limit: int, error: type[Exception], what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Raises:
        error: the path is missing, not a regular file (a folder, ``/dev/zero``, a FIFO), larger
            than ``limit``, or unreadable; the message names ``what`` and the path.
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as problem:
        raise error(f"cannot read {what} {path}: {problem.strerror or problem}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file")
    if info.st_size > limit:
        raise error(f"{what} {path} has {info.st_size} bytes, more than the {limit} a {what} may have")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as problem:
        raise error(f"cannot read {what} {path}: {problem.strerror or problem}") from None
    if len(data) > limit:
        raise error(f"{what} {path} grew past {limit} bytes while it was read")
    return data


def _nesting(text: str) -> int:
    """The deepest nesting of JSON arrays and objects in ``text``, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json(data: bytes | str, error: type[Exception], origin: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: UTF-8, at most ``max_depth`` levels deep, no ``NaN``/``Infinity``, no repeated key.

    Raises:
        error: anything else, naming ``origin``.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as problem:
        raise error(f"{origin} is not UTF-8 text ({problem.reason} at byte {problem.start})") from None
    if _nesting(text) > max_depth:
        raise error(f"{origin} nests JSON more than {max_depth} levels deep")

    def refuse_constant(name: str):
        raise error(f"{origin} holds {name}, which JSON does not allow; numbers must be finite")

    def unique_keys(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            repeated = sorted({key for key in keys if keys.count(key) > 1})
            raise error(f"{origin} repeats the key(s) {', '.join(map(repr, repeated))}")
        return dict(pairs)

    try:
        return json.loads(text, parse_constant=refuse_constant, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as problem:
        raise error(f"{origin} is not valid JSON ({problem.msg} at line {problem.lineno} column {problem.colno})") \
            from None
    except RecursionError:
        raise error(f"{origin} nests JSON too deeply") from None
    except ValueError as problem:   # an integer of more digits than Python converts (sys.int_info)
        raise error(f"{origin} holds a value JSON cannot give ({first_line(problem)})") from None


def finite_number(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temporary_beside(path: Path) -> str:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)   # mkstemp makes files private; keep the usual mode
    return temporary


def write_atomically(path: Path, write: Writer) -> None:
    """``write(temporary_path)``, then rename it onto ``path``; nothing is left behind on failure."""
    write_unit({Path(path): write})


def write_unit(files: Mapping[Path, Writer]) -> None:
    """Write files that belong together: every one to a temporary beside it, then each renamed into place,
    in the order given (put the file that names the others last).

    If any write fails, no file is replaced and no temporary is left. The renames themselves are
    atomic one by one; a reader that must see a consistent unit checks what the last file names
    (a digest of the others, for instance).
    """
    temporaries: dict[Path, str] = {}
    try:
        for path, write in files.items():
            temporaries[Path(path)] = _temporary_beside(Path(path))
            write(temporaries[Path(path)])
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    except BaseException:
        for temporary in temporaries.values():
            Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """The folder ``path``, made (with its parents) if missing, for the block's outputs.

    If the block raises (Ctrl-C included), every folder this call made is removed again with
    whatever was written into it, so a failed run leaves nothing new behind; folders that existed
    before are left as they are (their files are the writers' to keep atomic).
    """
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise
