"""Byte ranges of remote files: the interface Hub and object-store files share, and how a range is read.

A `RemoteFile` (an aockpt.fetch.ByteFile) is pinned to one version when it is opened (a Hub commit, an object's ETag); every range is
asked for under that version, so an object replaced mid-load fails naming it instead of mixing bytes. A
range is read exactly: a body cut short or a reset connection resumes where it stopped, throttling and 5xx
answers are retried with backoff, and a body longer than asked is refused. Error lines name the file's URL
and never a credential, a query string (signed URLs) or a token.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Protocol, Sequence

from .errors import CorruptCheckpointError, RemoteReadError, reason

SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
               "GOOGLE_SERVICE_ACCOUNT_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN")
_QUERY = re.compile(r"(https?://[^\s?#]+)\?[^\s'\"]*")
_BEARER = re.compile(r"\b(Bearer|Basic|AWS4-HMAC-SHA256)\s+[^\s;,]+", re.I)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{6,}")


class RangeSource(Protocol):
    """What a remote file supplies to `RemoteFile`: one ranged GET at the pinned version, as body chunks."""

    def __call__(self, start: int, end: int) -> Iterable[memoryview | bytes]: ...


@dataclass
class RemoteFile:
    """One remote file pinned to one version: an aockpt.fetch.ByteFile read by range requests.

    `stream(start, end)` makes one ranged request at the pinned version; this class makes reads exact
    (resume, retry) and counts the bytes received (`bytes_read`), so tests and benchmarks can show what
    a load transferred.
    """

    where: str
    size: int
    version: str
    stream: RangeSource
    bytes_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read_into(self, reads: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each buffer from its offset; the reads (rows of a slice, a long read cut into REQUEST_BYTES
        ranges) go out concurrently."""
        ranges = [(offset + at, view[at:at + REQUEST_BYTES]) for offset, view in reads
                  for at in range(0, len(view), REQUEST_BYTES)]
        if len(ranges) <= 1:
            for offset, view in ranges:
                self._read(offset, view)
            return
        with ThreadPoolExecutor(min(concurrency(), len(ranges)), thread_name_prefix="aockpt-range") as pool:
            for done in [pool.submit(self._read, offset, view) for offset, view in ranges]:
                done.result()

    def _read(self, offset: int, view: memoryview) -> None:
        """One exact range; bytes past the end of the file are the file's fault, not the network's."""
        if offset + len(view) > self.size:
            raise CorruptCheckpointError(f"{self.where} ends at byte {self.size}, before the {len(view)} bytes "
                                         f"asked for at {offset}; the header does not match the file")
        read_range(self.stream, view, offset, self.where)
        with self._lock:
            self.bytes_read += len(view)

    def mapped(self) -> memoryview | None:
        """Remote bytes are never mapped: the CPU gets them through read_into too."""
        return None

    def close(self) -> None:
        """Nothing stays open between requests."""


class Transient(Exception):
    """A failure worth retrying: throttled, a 5xx, a reset or cut connection."""


class Changed(Exception):
    """The file is no longer the version the load opened (a precondition failed)."""


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a range is retried (exponential backoff, capped)."""

    attempts: int = 4
    first_wait_s: float = 0.1
    max_wait_s: float = 4.0

    def wait(self, attempt: int) -> None:
        """Sleep before retry `attempt` (1-based)."""
        time.sleep(min(self.max_wait_s, self.first_wait_s * 2 ** (attempt - 1)))


RETRY = Retry()
DEFAULT_CONCURRENCY = 16
REQUEST_BYTES = 8 << 20  # the longest range one request asks for: longer reads go out as several, concurrently


def concurrency() -> int:
    """Range requests in flight at once: AOCKPT_CONCURRENCY, else 16."""
    value = os.environ.get("AOCKPT_CONCURRENCY", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_CONCURRENCY


def safe(text: str) -> str:
    """A message from a client library with query strings, bearer tokens and credential values taken out."""
    text = _HF_TOKEN.sub("hf_***", _BEARER.sub(r"\1 ***", _QUERY.sub(r"\1?...", text)))
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def read_range(stream: Callable[[int, int], Iterable[memoryview | bytes]], view: memoryview, offset: int,
               url: str, retry: Retry = RETRY) -> None:
    """Fill `view` from `stream(start, end)` answers, resuming after a cut and retrying transient failures.

    Raises:
        RemoteReadError: the file changed since it was opened, a failure persisted, or the server sent
            more bytes than asked.
    """
    got, attempt, total = 0, 0, len(view)
    while got < total:
        try:
            for chunk in stream(offset + got, offset + total):
                n = len(chunk)
                if got + n > total:
                    raise RemoteReadError(f"{url}: the server sent more than the {total} bytes asked for at "
                                          f"byte {offset}; it does not honour range requests")
                view[got:got + n] = chunk
                got += n
            if got < total:
                raise Transient(f"the body ended after {got} of {total} bytes")
        except Changed as e:
            raise RemoteReadError(f"{url} changed while it was being read ({safe(reason(e))}); nothing from "
                                  "it was used: load again to read the new version whole") from None
        except Transient as e:
            attempt += 1
            if attempt >= retry.attempts:
                raise RemoteReadError(f"{url}: reading bytes {offset + got}-{offset + total} failed {attempt} "
                                      f"times ({safe(reason(e))}); check the connection and retry") from None
            retry.wait(attempt)
