"""The exceptions a user can cause; each message is one line: what, where, why, what to do."""

from __future__ import annotations

import re


# C0 and C1 controls (newline, CR, ESC, BEL, ...), DEL, and Unicode line/paragraph separators and bidi
# overrides: a name from a file holding one could forge output lines or drive the terminal.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text safe for a terminal: every control character escaped (a newline shows as \\n), nothing else changed."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(text: str, limit: int = 1000) -> str:
    """An error text as one bounded line: controls escaped, the middle of an overlong text (a value echoed
    from a file) elided so the what and the what-to-do at its ends survive."""
    text = printable(text)
    return text if len(text) <= limit else f"{text[:limit * 3 // 4]} ... {text[-limit // 4:]}"


_BACKTRACE = re.compile(r"\s*(Exception raised from |frame #\d|Traceback \(most recent call last\)).*", re.S)


def reason(e: BaseException | str, limit: int = 200) -> str:
    """Why a library call failed, in one bounded line: the exception's text without the C++ backtrace torch
    appends (``Exception raised from ... frame #0 ...``), whitespace collapsed; an exception's type name if
    it has no text."""
    text = " ".join(_BACKTRACE.sub("", str(e)).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text or ("" if isinstance(e, str) else type(e).__name__)


class AockptError(Exception):
    """Root of every error aockpt raises on purpose; its text is one bounded line, file-supplied names escaped."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class UsageError(AockptError, ValueError):
    """A bad argument: an unknown device, a destination that exists, an unknown option value."""


class UnsafeCheckpointError(AockptError):
    """A file asks to run or import something outside aockpt's allowlist; nothing was executed."""


class CorruptCheckpointError(AockptError, ValueError):
    """A file is malformed, truncated, inconsistent, or its bytes do not match its digests."""


class UnsupportedTensorError(AockptError, TypeError):
    """A tensor type or legacy layout that aockpt has no codec or migration for."""


class ForeignCheckpointError(UnsupportedTensorError):
    """A checkpoint quantized by another library (compressed-tensors, GPTQ, AWQ, bitsandbytes, ...); nothing written."""


class PortabilityError(AockptError):
    """One or more tensors cannot live or run on the requested device."""


class DeviceMemoryError(PortabilityError):
    """The tensors bound for a device do not fit in its free memory; nothing was read."""


class KeyMismatchError(AockptError, KeyError):
    """Missing or unexpected tensor names; the message lists every one."""

    def __str__(self) -> str:
        return one_line(str(self.args[0])) if self.args else ""


class OutputError(AockptError, OSError):
    """An output could not be written (disk full, size limit, permissions); nothing was left behind."""


class RemoteReadError(AockptError, OSError):
    """A remote checkpoint could not be read: unreachable, refused, cut short, or changed while loading."""


class HubError(AockptError):
    """An upload to the Hugging Face Hub failed; the message says whether anything was uploaded."""
