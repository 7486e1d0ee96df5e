"""The auto-title text rules: normalising and cutting at grapheme clusters."""

from __future__ import annotations

import pytest

from worker import titles


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("Hello", "Hello"),
        ("  padded  ", "padded"),
        ("line one\nline two", "line one line two"),
        ("tab\there", "tab here"),
        ("no\u00a0break", "no break"),
        ("ideographic\u3000space", "ideographic space"),
        ("line\u2028separator\u2029paragraph", "line separator paragraph"),
        ("many \n\t\r\n  spaces", "many spaces"),
        ("nul\x00byte", "nulbyte"),
        ("bell\x07and\x1bescape", "bellandescape"),
        # Information separators are control characters, not Unicode whitespace.
        ("a\x1cb\x1fc", "abc"),
        ("next\x85line", "next line"),
        ("ogham\u1680space", "ogham space"),
    ],
)
def test_normalise(content: str, expected: str) -> None:
    assert titles.normalise(content) == expected


@pytest.mark.parametrize("content", ["", "   ", "\n\t", "\x00", "\u00a0\u3000", "\x07"])
def test_blank_user_message_is_no_candidate(content: str) -> None:
    assert titles.candidate("user", content) is None


@pytest.mark.parametrize("message_type", ["assistant", "system"])
def test_only_user_messages_are_candidates(message_type: str) -> None:
    assert titles.candidate(message_type, "What about ES?") is None


def test_fifty_characters_fit_whole() -> None:
    text = "x" * 50

    assert titles.candidate("user", text) == text


def test_longer_text_keeps_first_fifty_and_an_ellipsis() -> None:
    title = titles.candidate("user", "y" * 51)

    assert title == "y" * 50 + "..."


def test_trailing_space_is_trimmed_before_the_ellipsis() -> None:
    title = titles.candidate("user", "a" * 49 + " and more")

    assert title == "a" * 49 + "..."


@pytest.mark.parametrize(
    "grapheme",
    [
        "\U0001f1eb\U0001f1f7",  # a flag: two regional indicators
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # a family: ZWJ sequence
        "e\u0301",  # e with a combining acute accent
        "\U0001f44d\U0001f3fd",  # thumbs up with a skin tone
    ],
)
def test_cut_never_splits_a_grapheme(grapheme: str) -> None:
    title = titles.candidate("user", grapheme * 60)

    assert title == grapheme * 50 + "..."


def test_stacked_marks_still_fit_the_column() -> None:
    # Fifty graphemes of one letter and thirty combining marks each are 1,550 code
    # points; the column holds 255.
    heavy = "a" + "\u0300" * 30

    title = titles.candidate("user", heavy * 60)

    assert title is not None
    assert len(title) <= titles.MAX_CODE_POINTS
    assert title.endswith("...")
    assert title[:-3] == heavy * (len(title[:-3]) // len(heavy))


def test_right_to_left_text_is_kept_in_logical_order() -> None:
    text = "שלום, מה שלומך היום? אני רוצה לדבר על העסקאות שלי היום"

    title = titles.candidate("user", text)

    assert title == text[:50].rstrip() + "..."
