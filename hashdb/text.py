"""Untrusted text made safe to print: keys, paths, tensor names and error messages come from file names and
file contents, and a newline or an ESC sequence in them must not forge output lines or drive the terminal."""

from __future__ import annotations

import re

# C0 and C1 controls (newlines, ESC, backspace ...), DEL, the Unicode line/paragraph separators, and the
# bidirectional overrides that make text display in another order than it is stored.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def shown(text: str) -> str:
    """``text`` as one printable line: control characters escaped (``\\n``, ``\\x1b``), and a file name that
    is not valid UTF-8 with its bytes as ``\\xNN`` escapes."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(_escape, text)


def is_plain(text: str) -> bool:
    """True when ``text`` prints as itself (``shown(text) == text``): no control character, valid UTF-8."""
    return shown(text) == text
