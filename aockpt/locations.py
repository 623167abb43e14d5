"""Where a checkpoint lives: a local path, a Hugging Face Hub repo, or an object-store URL.

One parser for every entry point. A local path wins when it exists; ``org/name``, ``org/name@revision`` and
``hf://org/name[@revision][/subfolder]`` name Hub repos, read through huggingface_hub as its users know it
(its cache, token, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``); ``s3://``, ``gs://``, ``az://``, ``http(s)://`` name
object-store prefixes or files (aockpt/object_files.py). Anything else is one UsageError line. A remote
folder's small files are staged in a local folder that names itself by its URL (``UrlPath``).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PosixPath
from typing import Any, Iterator
from urllib.parse import quote, unquote

from .errors import UsageError

OBJECT_SCHEMES = ("s3", "gs", "az", "abfs", "abfss", "https", "http")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_ID = re.compile(rf"({_NAME}/{_NAME})(?:@([^\s@]+))?")
_HF_URL = re.compile(rf"hf://(?:models/)?({_NAME}/{_NAME})(?:@([^/\s]+))?(?:/(.*))?")
WHAT_WORKS = ("pass an existing file or folder, a Hub repo id (org/name or org/name@revision, hf://org/name), "
              "or a URL (s3://, gs://, az://, https://)")


@dataclass(frozen=True)
class HubRepo:
    """A model repo on the Hub, at a revision (branch, tag or commit; None is main), maybe a subfolder of it."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    def __str__(self) -> str:
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"hf://{self.repo_id}{rev}" + (f"/{self.subfolder}" if self.subfolder else "")


@dataclass(frozen=True)
class ObjectUrl:
    """An object-store prefix (a folder) or object (a file), as a URL without a trailing slash."""

    url: str

    @property
    def scheme(self) -> str:
        """s3, gs, az, https, ..."""
        return self.url.split("://", 1)[0]

    def __str__(self) -> str:
        return self.url


Location = Path | HubRepo | ObjectUrl


def locate(where: str | os.PathLike[str] | Location) -> Location:
    """What `where` names: an existing path first, then a Hub repo or an object URL; nothing else.

    Raises:
        UsageError: `where` is none of them, in one line saying what is accepted.
    """
    if isinstance(where, (HubRepo, ObjectUrl)):
        return where
    if not isinstance(where, str):
        return Path(where)  # a Path object is always a local path
    if Path(where).exists():
        return Path(where)
    scheme = where.split("://", 1)[0].lower() if "://" in where else ""
    if scheme == "hf":
        match = _HF_URL.fullmatch(where)
        if match is None:
            raise UsageError(f"{where} is not a Hub URL: write hf://org/name[@revision][/subfolder]")
        repo_id, revision, subfolder = match.groups()
        return HubRepo(repo_id, unquote(revision) if revision else None, (subfolder or "").strip("/"))
    if scheme in OBJECT_SCHEMES:
        if not where.split("://", 1)[1].strip("/"):
            raise UsageError(f"{where} names no bucket or host; {WHAT_WORKS}")
        return ObjectUrl(where.rstrip("/"))
    if scheme:
        raise UsageError(f"{where}: aockpt cannot read {scheme}:// URLs; {WHAT_WORKS}")
    match = _REPO_ID.fullmatch(where)
    if match is None or ".." in where:
        raise UsageError(f"{where} does not exist; {WHAT_WORKS}")
    return HubRepo(match.group(1), match.group(2))


@dataclass(frozen=True)
class HubSettings:
    """huggingface_hub's settings, read when a load starts (so a process can change them between loads)."""

    endpoint: str
    offline: bool
    cache_dir: str | None
    token: str | None


def hub_settings() -> HubSettings:
    """HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE / HF_HOME and HF_TOKEN as huggingface_hub reads them."""
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else None)
    return HubSettings(endpoint, offline or constants.HF_HUB_OFFLINE, cache, os.environ.get("HF_TOKEN"))


class UrlPath(PosixPath):
    """A path to a local staging folder that names itself by the remote URL in every message."""

    url: str = ""

    def __new__(cls, local: str | os.PathLike[str], url: str) -> "UrlPath":
        self = super().__new__(cls, local)
        self.url = url
        return self

    def __init__(self, local: str | os.PathLike[str], url: str) -> None:
        """Python 3.12+ builds a path in __init__ from every argument: give it the local folder alone."""
        if sys.version_info >= (3, 12):
            super().__init__(local)

    def with_segments(self, *segments: str | os.PathLike[str]) -> PosixPath:
        """Paths derived from it (Python 3.12+: parent, resolve, ...) are plain local paths, as on 3.11."""
        return PosixPath(*segments)

    def local(self) -> PosixPath:
        """The staging folder as a plain path (what listing it must start from: 3.12+ lists from ``str``)."""
        return PosixPath(os.fspath(self))

    def iterdir(self) -> Iterator[Path]:
        """The staged files, as local paths."""
        return self.local().iterdir()

    def glob(self, pattern: str, **kwargs: Any) -> Iterator[Path]:
        """Staged files matching `pattern`, as local paths."""
        return self.local().glob(pattern, **kwargs)

    def rglob(self, pattern: str, **kwargs: Any) -> Iterator[Path]:
        """Staged files matching `pattern` at any depth, as local paths."""
        return self.local().rglob(pattern, **kwargs)

    def __str__(self) -> str:
        return self.url or super().__str__()

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __fspath__(self) -> str:
        return PosixPath.__str__(self)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return UrlPath, (os.fspath(self), self.url)

    def __truediv__(self, name: Any) -> "UrlPath":
        return UrlPath(self.local() / name, f"{self.url}/{name}")
