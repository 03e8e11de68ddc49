"""Griffe extension: render the library's reST-flavoured docstrings as Markdown, without rewriting them.

The docstrings are Google style (``Args:``, ``Returns:``, ...) but use a few reST constructs, converted here on
the fly for mkdocstrings:

* ``.. math::`` directives (one-line or indented block) -> ``$$ ... $$`` blocks (MathJax via pymdownx.arithmatex);
* ``:math:`x``` -> ``$x$``;
* ``:func:`a.b```, ``:class:`~a.B```, ``:meth:`B.f <a.B.f>``` ... -> a code span (``~`` keeps the last part);
* doctest lines (``>>>`` and their output) -> a fenced ``pycon`` block;
* reST literal blocks (a paragraph ending in ``::`` and an indented block) -> a fenced ``text`` block;
* a module attribute documented by ``#:`` comment lines just above it (the Sphinx convention) gets them as its
  docstring.

Double backticks are already a Markdown code span and are left alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from griffe import Attribute, Docstring, Extension, Object

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|attr|data|exc|obj|const):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _role(match: re.Match[str]) -> str:
    text = match.group(2).strip()
    explicit = re.fullmatch(r"(.*?)\s*<([^>]+)>", text)
    if explicit:
        return f"`{explicit.group(1)}`"
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return f"`{text}`"


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The lines after ``start`` indented deeper than ``base`` (blank lines inside kept); returns them and the end."""
    out: list[str] = []
    i = start
    while i < len(lines):
        line = lines[i]
        if line.strip() and _indent(line) <= base:
            break
        out.append(line)
        i += 1
    while out and not out[-1].strip():
        out.pop()
        i -= 1
    while out and not out[0].strip():
        out.pop(0)
    return out, i


def _fence(pad: str, lang: str, body: list[str]) -> list[str]:
    common = min((_indent(b) for b in body if b.strip()), default=0)
    return ["", f"{pad}```{lang}", *[pad + b[common:] if b.strip() else "" for b in body], f"{pad}```", ""]


def convert(text: str) -> str:
    """The Markdown form of one docstring (see the module docstring for what changes)."""
    lines = _inline(text).splitlines()  # roles first: their text may run over a line break
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        math = _MATH_DIRECTIVE.match(line)
        if math:
            pad, first = math.group(1), math.group(2)
            body, i = _block(lines, i + 1, len(pad))
            formula = [first.strip()] if first.strip() else []
            formula += [b.strip() for b in body if b.strip()]
            out += ["", f"{pad}$$", *[pad + f for f in formula], f"{pad}$$", ""]
            continue
        if line.lstrip().startswith(">>>"):
            pad = " " * _indent(line)
            body = []
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= len(pad):
                body.append(lines[i])
                i += 1
            out += _fence(pad, "pycon", body)
            continue
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):
            body, end = _block(lines, i + 1, _indent(line))
            if body:
                head = line.rstrip()[:-2].rstrip()
                text_before = head.strip()
                if text_before and not text_before.endswith(":"):
                    head += ":"
                if text_before:
                    out.append(head)
                out += _fence(" " * _indent(line), "text", body)
                i = end
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _inline(line: str) -> str:
    line = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", line)
    return _ROLE.sub(_role, line)


def _comment_above(obj: Object) -> str:
    """The ``#:`` comment lines right above an attribute's definition, joined (empty if none)."""
    if obj.lineno is None or not isinstance(obj.filepath, Path) or obj.filepath not in obj.lines_collection:
        return ""
    lines = obj.lines_collection[obj.filepath]
    found: list[str] = []
    i = obj.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        found.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    return "\n".join(found)


class RstToMarkdown(Extension):
    """Convert every loaded object's docstring with :func:`convert` before mkdocstrings parses its sections."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:  # noqa: D102
        if isinstance(obj, Attribute) and obj.docstring is None:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = Docstring(comment, parent=obj)
        done = obj.extra.setdefault("rst_to_markdown", {})
        if obj.docstring is not None and not done.get("converted"):
            obj.docstring.value = convert(obj.docstring.value)
            done["converted"] = True
