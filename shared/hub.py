"""Pretrained downloads that fail in seconds, in one line, when the hub cannot be reached.

open_clip, transformers and timm all download through ``huggingface_hub``. Offline, without
``HF_HUB_OFFLINE`` set, each file is retried for tens of seconds with a warning per try. Here
the hub is probed once per process (one TCP connection, a few seconds at most); if it cannot
be reached, or ``HF_HUB_OFFLINE`` is set, loading reads the local cache only, and a model that
is not cached fails at once with a message saying how to pass local files instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterator
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
