"""The Python examples of a Markdown page (README.md, docs/**/*.md), as the tests run them.

A page's ```python blocks run in order, in one namespace. A block may be preceded by one
marker comment (invisible in the rendered page, visible in the source):

    <!-- test: requires transformers -->     the page's examples need this module: skipped
                                            (with that reason) where it is not installed
    <!-- test: skip (needs torchrun) -->     this block is only compiled, never run; the
                                            reason in brackets is required

Blocks must start at the beginning of a line (not inside a list or an admonition), so
that none escapes the tests: `blocks` refuses a page with an indented ```python fence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_BLOCK = re.compile(
    r"(?:^<!--\s*test:\s*(?P<marker>[^>]*?)\s*-->[ \t]*\n)?"
    r"^```python[^\n]*\n(?P<code>.*?)^```[ \t]*$",
    flags=re.S | re.M)
_SKIP = re.compile(r"skip \((?P<reason>[^)]+)\)")
_REQUIRES = re.compile(r"requires (?P<module>[\w.]+)")


@dataclass(frozen=True)
class Block:
    code: str
    line: int                     # 1-based line of the block's first code line
    skip: str | None = None       # the reason, for a block that is only compiled
    requires: str | None = None   # a module the page's examples need


def blocks(path: Path) -> list[Block]:
    """Every ```python block of the page, with its marker; ValueError for a bad marker or fence."""
    text = path.read_text()
    indented = re.findall(r"^[ \t]+```python", text, flags=re.M)
    if indented:
        raise ValueError(f"{path}: {len(indented)} indented ```python block(s): put examples at the start "
                         "of a line so that the tests run them")
    found = []
    for m in _BLOCK.finditer(text):
        skip = requires = None
        marker = m.group("marker")
        if marker is not None:
            if (s := _SKIP.fullmatch(marker)) is not None:
                skip = s.group("reason")
            elif (r := _REQUIRES.fullmatch(marker)) is not None:
                requires = r.group("module")
            else:
                raise ValueError(f"{path}: unknown test marker {marker!r}: use 'skip (REASON)' or 'requires MODULE'")
        line = text.count("\n", 0, m.start("code")) + 1
        found.append(Block(m.group("code"), line, skip, requires))
    fences = len(re.findall(r"^```python", text, flags=re.M))
    if len(found) != fences:
        raise ValueError(f"{path}: {fences} ```python fences but {len(found)} complete blocks")
    return found


def run_blocks(path: Path, page_blocks: list[Block]) -> dict:
    """Run the page's blocks in order in one namespace (skipped ones only compiled); return it."""
    namespace: dict = {"__name__": f"docs_example_{path.stem}"}
    for block in page_blocks:
        # Padding keeps the page's line numbers in a traceback.
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
        if block.skip is None:
            exec(code, namespace)  # noqa: S102 - our own documentation
    return namespace
