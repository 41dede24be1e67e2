"""Untrusted text (manifest values, column names, paths) made safe to put into the Markdown cxrgen writes.

The dataset card and the evaluation report are rendered by the Hugging Face Hub and Markdown viewers, many of
which also render HTML: a label value `x\n## y` would start a heading, a column named `<img onerror=...>` an
element. Every such string goes through `md_text` (running text and table cells) or `md_code` (code spans).
"""
from __future__ import annotations

import re

# Characters that start Markdown syntax inside a line (emphasis, code, links, tables, headings, HTML, escapes).
_SYNTAX = re.compile(r"([\\`*_\[\]{}|~#!])")


def md_text(value) -> str:
    """The value as one line of literal Markdown text: line breaks become spaces, HTML and syntax are escaped."""
    text = " ".join(str(value).split())  # no line break: nothing can start a heading, list or code block
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _SYNTAX.sub(r"\\\1", text)


def md_code(value) -> str:
    """The value as one inline code span, fenced with more backticks than it holds (CommonMark's rule)."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"
