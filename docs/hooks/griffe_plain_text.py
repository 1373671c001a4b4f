"""Griffe extension: docstrings are plain text with math, not HTML.

The docstrings write inner products as `<g_i, S>`, which Markdown would take for an HTML tag
and drop from the page. Outside code spans and fenced blocks, `<` becomes `&lt;`.
"""
from __future__ import annotations

import re

import griffe

_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", flags=re.S)


def escape(text: str) -> str:
    parts = _CODE.split(text)
    return "".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


class PlainTextDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = escape(obj.docstring.value)
