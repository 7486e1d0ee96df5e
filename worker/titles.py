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

# Unicode's White_Space property. Python's \s also counts U+001C..U+001F (the
# information separators), which Unicode classes as control characters only.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WHITESPACE_RUN = re.compile(f"[{_WHITE_SPACE}]+")
_GRAPHEME = regex.compile(r"\X")
# Control characters (category Cc) all sit below U+00A0. The whitespace among them
# (tab, newline, the information separators, NEL, ...) is folded, not dropped.
_CONTROL = re.compile(
    "["
    + "".join(
        re.escape(chr(c))
        for c in range(0xA0)
        if unicodedata.category(chr(c)) == "Cc"
        and not re.fullmatch(f"[{_WHITE_SPACE}]", chr(c))
    )
    + "]+"
)


def normalise(content: str) -> str:
    """Drops non-whitespace control characters and folds whitespace runs to a space.

    U+0000 must go in any case: PostgreSQL text cannot hold it.
    """
    kept = _CONTROL.sub("", content)
    return _WHITESPACE_RUN.sub(" ", kept).strip(" ")


def candidate(message_type: str, content: str) -> str | None:
    """The title this message would give, or None when it can never title."""
    if message_type != "user":
        return None

    text = normalise(content)
    if not text:
        return None
    return truncate(text)


def truncate(text: str) -> str:
    # A grapheme holds at least one code point, so short text needs no segmenting.
    if len(text) <= MAX_GRAPHEMES:
        return text

    graphemes = _GRAPHEME.findall(text)
    if len(graphemes) <= MAX_GRAPHEMES and len(text) <= MAX_CODE_POINTS:
        return text

    kept = graphemes[:MAX_GRAPHEMES]
    title = "".join(kept).rstrip() + ELLIPSIS
    while len(title) > MAX_CODE_POINTS:
        kept.pop()
        title = "".join(kept).rstrip() + ELLIPSIS
    return title
