"""Pretrained downloads that fail in seconds, in one line, when the hub cannot be reached.

open_clip, transformers and timm all download through ``huggingface_hub``. Offline, without
``HF_HUB_OFFLINE`` set, each file is retried for tens of seconds with a warning per try. Here
the hub is probed once per process (one TCP connection, a few seconds at most); if it cannot
be reached, or ``HF_HUB_OFFLINE`` is set, loading reads the local cache only, and a model that
is not cached fails at once with a message saying how to pass local files instead.

:func:`hub_file` fetches one named file of a hub repository (a neuron file, its scores) under
the same rules, through ``huggingface_hub``'s own cache, and nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from huggingface_hub import constants

from .errors import ModelLoadError
from .errors import first_line

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Seconds to wait for a TCP connection to the hub.
PROBE_TIMEOUT = 3.0


@functools.lru_cache(maxsize=None)
def _unreachable(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return None
    except OSError as error:
        return f"{host} cannot be reached ({error.strerror or type(error).__name__})"


#: Behind one of these proxies a direct connection proves nothing, so the hub is not probed.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def why_offline(url: str | None = None) -> str | None:
    """``None`` when downloads from ``url`` (default: the Hugging Face hub) can work, else why not.

    With a proxy variable set, downloads are left to try (through the proxy) rather than probed.
    """
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    parsed = urlparse(url or constants.ENDPOINT)
    if not parsed.hostname:
        return None
    return _unreachable(parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443))


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Within this context, ``huggingface_hub`` reads its local cache and never connects."""
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_pretrained(load: Callable[[], T], what: str, local_hint: str, url: str | None = None) -> T:
    """Run ``load()``, which may download ``what``; offline, read the local cache only.

    Args:
        load: the library's own loading call.
        what: names the weights in the error, e.g. ``"open_clip ViT-B-16 (laion2b_s34b_b88k)"``.
        local_hint: how to use local files instead, appended to the error.
        url: where the weights come from when not from the Hugging Face hub.

    Raises:
        ModelLoadError: offline and not in the local cache, or any loading error.
    """
    reason = why_offline(url)
    if reason is None:
        return load()
    log.info("%s; loading %s from the local cache only", reason, what)
    try:
        with hub_offline():
            return load()
    except Exception as error:  # each library raises its own kind of not-found error
        log.debug("loading %s from the local cache failed: %s", what, first_line(error))
        raise ModelLoadError(f"cannot download {what}: {reason} and it is not in the local cache. "
                             f"{local_hint}") from error


# ---- single files of a hub repository --------------------------------------------------------------

#: One part of a repository id ``ORG/NAME``: letters, digits, ``-``, ``_`` and ``.``, as the hub allows them.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: Files named in a message about what a repository holds, at most.
LISTED_FILES = 10


def is_repo_id(text: str) -> bool:
    """True for a hub repository id of the form ``ORG/NAME``."""
    parts = text.split("/")
    return len(parts) == 2 and all(_REPO_PART.fullmatch(part) and "--" not in part and ".." not in part
                                   for part in parts)


def hub_model_of(spec: str) -> str | None:
    """The hub repository ``ORG/NAME`` that a model spec loads, if its reference is one.

    ``dinov2:facebook/dinov2-large``, ``hf:llava-hf/llava-1.5-7b-hf`` and
    ``openclip:hf-hub:timm/ViT-B-16-SigLIP`` name one; a local folder that exists, a checkpoint
    path, an open_clip pretrained tag, the demo and neurons given by hand do not (``None``).
    """
    _, _, reference = spec.partition(":")
    reference = reference.removeprefix("hf-hub:").rstrip("/")
    if not is_repo_id(reference) or Path(reference).expanduser().exists():
        return None
    return reference


@dataclass(frozen=True)
class HubFile:
    """A file of a hub repository, in the local cache: its ``path`` there, and the ``commit`` it was read at."""

    path: Path
    commit: str | None


#: ``advice(files, where)``: what to add to a message about a missing file, given the files the repository
#: is known to hold (``None``: unknown) and what holds them ("org/repo", "the cached copy of org/repo").
MissingAdvice = Callable[[list[str] | None, str], str]


def hub_file(repo_id: str, filename: str, *, what: str, local_hint: str, limit: int,
             error: type[Exception] = ModelLoadError, revision: str | None = None, optional: bool = False,
             missing: MissingAdvice | None = None) -> HubFile | None:
    """The file ``filename`` of the hub model repository ``repo_id``, through ``huggingface_hub``'s cache.

    With the hub reachable (:func:`why_offline`), the file's size is asked first and a file larger
    than ``limit`` bytes is refused before any of it is downloaded; then ``hf_hub_download`` fetches
    it into the cache (or finds it there, current). Without, or with ``HF_HUB_OFFLINE`` set, the
    cache alone is read. Only ``filename`` is ever downloaded. ``revision`` (a branch, tag or
    commit; default ``main``) pins it, e.g. to the commit another file of the repository was read at.

    Args:
        what: names the file in messages, e.g. ``"neuron file hf-hub:org/repo/register_neurons.json"``.
        local_hint: how to use a local file instead, appended to the messages that cannot be helped otherwise.
        optional: a file the repository lacks (or, offline, the cache lacks) returns ``None`` instead of raising.
        missing: adds advice to the message about a missing file, from the files the repository holds.

    Raises:
        error: the repository, the revision or the file does not exist (with ``missing``'s advice),
            is gated or private, is too large, or cannot be downloaded and is not in the cache.
    """
    import huggingface_hub
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    reason = why_offline()
    options = dict(revision=revision, cache_dir=constants.HF_HUB_CACHE, library_name="test-time-registers")
    if reason is not None:
        log.info("%s; reading %s from the local cache only", reason, what)
        try:
            path = huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=True, **options)
        except (EntryNotFoundError, FileNotFoundError) as problem:   # not cached (LocalEntryNotFoundError)
            log.debug("%s is not in the local cache: %s", what, first_line(problem))
            if optional:
                return None
            advice = missing(_cached_files(repo_id, revision), f"the cached copy of {repo_id}") if missing else ""
            raise error(f"cannot download {what}: {reason} and it is not in the local cache{advice}. "
                        f"{local_hint}") from None
        except Exception as problem:   # a damaged cache, a revision the cache cannot resolve
            raise error(f"cannot read {what} from the local cache: {first_line(problem)}. {local_hint}") from None
        return HubFile(Path(path), _snapshot_commit(Path(path), filename))

    try:
        url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision, endpoint=constants.ENDPOINT)
        size = huggingface_hub.get_hf_file_metadata(url, library_name="test-time-registers").size
        if size is not None and size > limit:
            raise error(f"{what} has {size} bytes on the hub, more than the {limit} it may have; "
                        "it was not downloaded")
        path = huggingface_hub.hf_hub_download(repo_id, filename, endpoint=constants.ENDPOINT, **options)
    except GatedRepoError:
        raise error(f"cannot download {what}: {repo_id} is gated; accept its conditions on its page on the hub "
                    "and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise error(f"cannot download {what}: the hub has no repository {repo_id}, or it is private and you "
                    "are not logged in (hf auth login)") from None
    except RevisionNotFoundError:
        raise error(f"cannot download {what}: {repo_id} has no revision {revision}") from None
    except EntryNotFoundError as problem:
        if isinstance(problem, LocalEntryNotFoundError):   # the download failed, and it is not cached
            raise error(f"cannot download {what}: {first_line(problem)}. {local_hint}") from None
        if optional:
            return None
        advice = missing(_hub_files(repo_id, revision), repo_id) if missing else ""
        raise error(f"{what}: {repo_id} has no file {filename}{advice}") from None
    except error:
        raise
    except Exception as problem:   # HTTP errors, a dropped connection, a full disk
        raise error(f"cannot download {what}: {first_line(problem)}. {local_hint}") from None
    return HubFile(Path(path), _snapshot_commit(Path(path), filename))


def list_files(files: list[str], limit: int = LISTED_FILES) -> str:
    """``a, b and 3 more``: at most ``limit`` names of ``files``."""
    shown = ", ".join(files[:limit])
    return shown if len(files) <= limit else f"{shown} and {len(files) - limit} more"


def _snapshot_commit(path: Path, filename: str) -> str | None:
    """The commit of the cache snapshot ``.../snapshots/COMMIT/FILENAME`` that ``path`` is, if it is one."""
    snapshot = path
    for _ in filename.split("/"):
        snapshot = snapshot.parent
    if snapshot.parent.name == "snapshots" and _COMMIT.fullmatch(snapshot.name):
        return snapshot.name
    return None


def _cached_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The files of ``repo_id`` that the local cache holds at ``revision`` (default ``main``), or ``None``
    if it holds no snapshot of it; read from the cache's layout (``refs/REVISION``, ``snapshots/COMMIT/``)."""
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    try:
        commit = revision if revision and _COMMIT.fullmatch(revision) else \
            (folder / "refs" / (revision or "main")).read_text().strip()
        snapshot = folder / "snapshots" / commit
        if not commit or not snapshot.is_dir():
            return None
        return sorted(item.relative_to(snapshot).as_posix() for item in snapshot.rglob("*") if item.is_file())
    except (OSError, ValueError):
        return None


def _hub_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The files of ``repo_id`` on the hub (one listing request, nothing downloaded), or ``None`` if it fails."""
    import huggingface_hub

    try:
        api = huggingface_hub.HfApi(endpoint=constants.ENDPOINT, library_name="test-time-registers")
        return sorted(api.list_repo_files(repo_id, revision=revision))
    except Exception as problem:   # the listing only improves a message
        log.debug("cannot list the files of %s: %s", repo_id, first_line(problem))
        return None
