"""What reaches the terminal: names escaped, encoding errors replaced.

Patient ids, folder names and paths come from the user's disk, and a folder name may hold
control sequences (ESC ] 0; re-titles the terminal, ESC [2J clears it, a carriage return can
overwrite a line with a forged "done"). Every line the engine prints goes through
:func:`printable`: non-printable characters are shown escaped (``\\x1b``, ``\\r``, ``\\u202e``).
:func:`safe_streams` puts that one helper under stdout and stderr for a whole command (click's
echo, print, tqdm's ``write``), and replaces what the terminal's encoding cannot show instead of
failing (an ASCII-only locale and a patient named ``Müller``).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, TextIO

_KEEP = {"\n", "\t"}


def printable(text: str) -> str:
    """``text`` with every non-printable character but newline and tab escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in _KEEP else c.encode("unicode_escape").decode("ascii") for c in text)


class SafeTextStream:
    """A text stream that escapes non-printable characters and never fails on encoding.

    A carriage return is kept only as the first character of a write: that is how progress
    bars (tqdm) redraw their line; one inside a message (from a name) is escaped. No
    ``buffer`` attribute: click then writes through this stream, not around it.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        lead = ""
        while text.startswith("\r"):
            lead, text = lead + "\r", text[1:]
        safe = lead + printable(text)
        try:
            self._stream.write(safe)
        except UnicodeEncodeError:
            self._stream.write(safe.encode(self.encoding, "backslashreplace").decode(self.encoding, "replace"))
        return len(text) + len(lead)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._stream, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str):
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self._stream, name)


@contextmanager
def safe_streams() -> Iterator[None]:
    """stdout and stderr through :class:`SafeTextStream` for the duration of a command."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, SafeTextStream):
        sys.stdout = SafeTextStream(sys.stdout)
    if not isinstance(sys.stderr, SafeTextStream):
        sys.stderr = SafeTextStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
