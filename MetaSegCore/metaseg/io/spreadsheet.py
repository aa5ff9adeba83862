"""Cells of the tables MetaSeg writes (`volumes.tsv`, `prepare --qc`) that a spreadsheet will not run as formulas.

A batch id, a file name or an error message is text a user (or an attacker's file name) chose: written as it is,
`=1+1` or `+cmd|' -c calc'!A0` runs as a formula when the table is opened in Excel or LibreOffice. OWASP's rule
for CSV injection: a cell that starts with = + - @, a tab or a carriage return gets a leading apostrophe, which
spreadsheets show as text and hide. Numbers (a negative NCC) are left as they are, and a cell that starts with
an apostrophe gets one more, so that `unquote` restores exactly what was written: `metaseg batch` reads its own
tables (merge) and manifests made from them with the original ids.
"""
from __future__ import annotations

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def needs_quote(text: str) -> bool:
    """Whether a spreadsheet could read `text` as a formula (leading spaces included), or it starts with QUOTE."""
    if text.startswith((QUOTE, "\t", "\r")) or text.lstrip(" ").startswith(FORMULA_START[:4]):
        return not _is_number(text)
    return False


def quote(text: str) -> str:
    """`text` as a cell that no spreadsheet runs: QUOTE + text where `needs_quote`, else unchanged."""
    return QUOTE + text if needs_quote(text) else text


def unquote(text: str) -> str:
    """The text that `quote` wrote as `text` (any other text unchanged)."""
    return text[1:] if text.startswith(QUOTE) and needs_quote(text[1:]) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
