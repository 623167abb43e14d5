"""The exceptions a user can cause; each message is one line: what, where, why, what to do."""

from __future__ import annotations


class AockptError(Exception):
    """Root of every error aockpt raises on purpose; the CLI prints it as one line."""


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
        return str(self.args[0]) if self.args else ""


class OutputError(AockptError, OSError):
    """An output could not be written (disk full, size limit, permissions); nothing was left behind."""


class HubError(AockptError):
    """An upload to the Hugging Face Hub failed; the message says whether anything was uploaded."""
