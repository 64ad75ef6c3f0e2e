"""MkDocs hooks for this site (``hooks:`` in ``mkdocs.yml``).

A table cell writes a pipe inside code as ``\\|``, as GitHub needs; Python-Markdown keeps the
backslash inside code spans, so it is dropped here, in table cells only.
"""

from __future__ import annotations

import re

_CELL = re.compile(r"<td>.*?</td>", re.DOTALL)


def on_page_content(html: str, **kwargs) -> str:
    return _CELL.sub(lambda cell: cell.group(0).replace("\\|", "|"), html)
