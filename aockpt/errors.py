"""The exceptions a user can cause; each message is one line: what, where, why, what to do."""

from __future__ import annotations

import re


# C0 and C1 controls (newline, CR, ESC, BEL, ...), DEL, and Unicode line/paragraph separators and bidi
# overrides: a name from a file holding one could forge output lines or drive the terminal.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text safe for a terminal: every control character escaped (a newline shows as \\n), nothing else changed."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class AockptError(Exception):
    """Root of every error aockpt raises on purpose; its text is one line, with file-supplied names escaped."""

    def __str__(self) -> str:
        return printable(super().__str__())


class UsageError(AockptError, ValueError):
    """A bad argument: an unknown device, a destination that exists, an unknown option value."""


class UnsafeCheckpointError(AockptError):
    """A file asks to run or import something outside aockpt's allowlist; nothing was executed."""


class CorruptCheckpointError(AockptError, ValueError):
    """A file is malformed, truncated, inconsistent, or its bytes do not match its digests."""


class UnsupportedTensorError(AockptError, TypeError):
    """A tensor type or legacy layout that aockpt has no codec or migration for."""


class PortabilityError(AockptError):
    """One or more tensors cannot live or run on the requested device."""


class KeyMismatchError(AockptError, KeyError):
    """Missing or unexpected tensor names; the message lists every one."""

    def __str__(self) -> str:
        return printable(str(self.args[0])) if self.args else ""


class OutputError(AockptError, OSError):
    """An output could not be written (disk full, size limit, permissions); nothing was left behind."""


class HubError(AockptError):
    """An upload to the Hugging Face Hub failed; the message says whether anything was uploaded."""
