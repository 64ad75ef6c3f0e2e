"""Small file helpers shared by every writer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, write) -> None:
    """``write(temporary_path)``, then rename it onto ``path``; nothing is left behind on failure."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)   # mkstemp makes files private; keep the usual mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
