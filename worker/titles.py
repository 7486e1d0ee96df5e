"""The automatic conversation title: normalising and cutting a user's message.

The database picks which message titles a conversation (the earliest candidate);
this module decides what text a message would give, because cutting at
user-perceived characters needs Unicode grapheme segmentation.
"""

from __future__ import annotations

import re
import unicodedata

import regex

MAX_GRAPHEMES = 50
ELLIPSIS = "..."
# The title column is varchar(255), which counts code points. Fifty graphemes of
# stacked combining marks can exceed that, so the code point budget is checked too.
MAX_CODE_POINTS = 255

_WHITESPACE_RUN = re.compile(r"\s+")
_GRAPHEME = regex.compile(r"\X")


def normalise(content: str) -> str:
    """Drops non-whitespace control characters and folds whitespace runs to a space.

    U+0000 must go in any case: PostgreSQL text cannot hold it.
    """
    kept = "".join(
        ch for ch in content if ch.isspace() or unicodedata.category(ch) != "Cc"
    )
    return _WHITESPACE_RUN.sub(" ", kept).strip()


def candidate(message_type: str, content: str) -> str | None:
    """The title this message would give, or None when it can never title."""
    if message_type != "user":
        return None

    text = normalise(content)
    if not text:
        return None
    return truncate(text)


def truncate(text: str) -> str:
    graphemes = _GRAPHEME.findall(text)
    if len(graphemes) <= MAX_GRAPHEMES and len(text) <= MAX_CODE_POINTS:
        return text

    kept = graphemes[:MAX_GRAPHEMES]
    title = "".join(kept).rstrip() + ELLIPSIS
    while len(title) > MAX_CODE_POINTS:
        kept.pop()
        title = "".join(kept).rstrip() + ELLIPSIS
    return title
