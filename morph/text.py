"""Text that came from a file, printed as text: the one rule for every string morph did not write itself.

A checkpoint's metadata, a tensor name, a config's name, a path or an error message quoting any of them may
hold terminal escape sequences, bidirectional overrides or rich markup. :func:`printable` replaces every
control and format character with a visible escape, so the terminal shows the bytes instead of obeying
them; :func:`markup_safe` also escapes rich markup, for strings placed inside a rich markup template.
"""

from __future__ import annotations

import unicodedata

from rich.markup import escape as _escape_markup

__all__ = ["markup_safe", "printable"]

# Cc: C0/C1 controls and DEL; Cf: format characters (bidi overrides, zero-width joiners ...);
# Zl/Zp: line and paragraph separators; Cs/Co/Cn: surrogates, private use, unassigned.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def _visible(ch: str) -> str:
    o = ord(ch)
    if o <= 0xFF:
        return f"\\x{o:02x}"
    if o <= 0xFFFF:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def printable(text: object) -> str:
    """``str(text)`` with every control, format and unassigned character shown as a ``\\xNN``/``\\uNNNN`` escape.

    Plain ASCII, letters and symbols of any script, and the space pass through unchanged; a newline or a
    tab in a name is escaped too, so one record stays one line.
    """
    s = str(text)
    if s.isascii() and s.isprintable():
        return s
    return "".join(_visible(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in s)


def markup_safe(text: object) -> str:
    """:func:`printable`, then rich markup escaped: safe inside ``console.print(f"[bold]{...}[/]")``."""
    return _escape_markup(printable(text))
