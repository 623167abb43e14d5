"""Hub repos as aockpt reads them: one commit per load, whole through the cache or by range request; and the
huggingface_hub helpers reads and uploads (aockpt.hub) share: its transport errors and its progress bars.

The revision is resolved to one commit when a load opens, and every later request names that commit, so
a push in the middle of a load cannot mix two versions. Full loads go through huggingface_hub's
``snapshot_download`` (its cache, token, endpoint and offline mode, as users know them), fetching only the
files a load needs. Partial reads (`inspect`, ``keys=``, tensor-parallel slices) ask the ``resolve``
endpoint for byte ranges instead, through huggingface_hub's HTTP session and headers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

from .errors import RemoteReadError, UsageError, reason
from .locations import HubRepo, HubSettings, hub_settings
from .progress import enabled
from .remote_io import Changed, RemoteFile, Transient, safe

# Weights in formats aockpt does not read: never downloaded for a load.
OTHER_WEIGHTS = ("*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "*.tflite", "*.mlmodel", "*.keras")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@contextmanager
def hub_errors(repo: HubRepo, settings: HubSettings) -> Iterator[None]:
    """huggingface_hub's exceptions (and its HTTP client's, for an endpoint it cannot reach) as one line: a
    missing repo or revision is a UsageError, the rest a RemoteReadError naming the repo and endpoint."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        yield
    except GatedRepoError as e:
        raise RemoteReadError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN ({safe(reason(e))})") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{repo.repo_id} is not a local path, and {settings.endpoint} has no model repo "
                         f"{repo.repo_id} that this token can see; check the name, or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise UsageError(f"{repo}: the repo has no revision {repo.revision!r}; name a branch, tag or commit") from None
    except LocalEntryNotFoundError as e:
        if settings.offline:
            raise RemoteReadError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                                  "download it once online") from None
        raise RemoteReadError(f"{repo}: {settings.endpoint} could not be read "
                              f"({safe(reason(e.__cause__ or e))})") from None
    except (HfHubHTTPError, OSError, ValueError, *transport_errors()) as e:  # unreachable: the client's own errors
        raise RemoteReadError(f"{repo}: {settings.endpoint} could not be read ({safe(reason(e))})") from None


def pin(repo: HubRepo, settings: HubSettings) -> tuple[str, dict[str, int]]:
    """The one commit the revision names now, and the files under the subfolder (name -> size)."""
    from huggingface_hub import HfApi

    with hub_errors(repo, settings):
        info = HfApi(endpoint=settings.endpoint, token=settings.token).model_info(
            repo.repo_id, revision=repo.revision, files_metadata=True)
    prefix = f"{repo.subfolder}/" if repo.subfolder else ""
    files = {s.rfilename[len(prefix):]: s.size or 0 for s in info.siblings or []
             if s.rfilename.startswith(prefix) and "/" not in s.rfilename[len(prefix):]}
    return info.sha, files


def snapshot(repo: HubRepo, files: dict[str, int] | None = None) -> Path:
    """The repo folder in the Hugging Face cache, holding what a load reads (offline: as cached).

    ``snapshot_download`` resolves the revision to one commit and downloads every file at it (and records
    the branch, so a later offline load finds it). Weights in formats aockpt does not read are skipped, and
    pickles too where `files` (the listing) shows safetensors.
    """
    from huggingface_hub import snapshot_download

    settings = hub_settings()
    sub = f"{repo.subfolder}/" if repo.subfolder else ""
    skip = list(OTHER_WEIGHTS)
    if files is not None and any(n.endswith(".safetensors") for n in files):
        skip += _PICKLES
    with hub_errors(repo, settings), progress_bars(True):
        folder = snapshot_download(repo.repo_id, revision=repo.revision, endpoint=settings.endpoint,
                                   token=settings.token, cache_dir=settings.cache_dir,
                                   local_files_only=settings.offline, allow_patterns=[f"{sub}*"],
                                   ignore_patterns=[sub + p for p in skip])
    path = Path(folder) / repo.subfolder
    if not path.is_dir():
        raise UsageError(f"{repo}: the repo has no folder {repo.subfolder!r}")
    return path


def _ranges(http_url: str, where: str, size: int, commit: str, token: str | None
            ) -> Callable[[int, int], Iterator[bytes]]:
    """One ranged GET of a file at the pinned commit through huggingface_hub's session (headers, token,
    redirects), chunk by chunk."""
    def stream(start: int, end: int) -> Iterator[bytes]:
        from huggingface_hub.utils import build_hf_headers, get_session

        headers = {**build_hf_headers(token=token), "Range": f"bytes={start}-{end - 1}"}
        try:
            with get_session().stream("GET", http_url, headers=headers, follow_redirects=True) as response:
                _check_status(response.status_code, start, end, where, size, commit,
                              response.headers.get("X-Repo-Commit"))
                yield from response.iter_bytes()
        except transport_errors() as e:
            raise Transient(f"{type(e).__name__}: {reason(e)}") from None

    return stream


def _check_status(status: int, start: int, end: int, where: str, size: int, pinned: str, served: str | None) -> None:
    """206 at the pinned commit, or a 200 that is the whole file; throttling and 5xx retried; else one line."""
    if served and served != pinned:
        raise Changed(f"the Hub served commit {served[:12]} instead of {pinned[:12]}")
    if status == 206 or (status == 200 and start == 0 and end == size):
        return
    if status in (408, 429) or status >= 500:
        raise Transient(f"HTTP {status}")
    if status == 200:
        raise RemoteReadError(f"{where}: the server ignored the range request (HTTP 200 for bytes "
                              f"{start}-{end - 1}); it cannot serve partial reads")
    if status in (401, 403):
        raise RemoteReadError(f"{where}: HTTP {status}; set HF_TOKEN to a token that can read the repo")
    raise RemoteReadError(f"{where}: HTTP {status} for bytes {start}-{end - 1}")


@dataclass
class HubFolder:
    """A repo (sub)folder at one commit: its files and ranged reads of them."""

    repo: HubRepo
    commit: str
    files: dict[str, int]
    settings: HubSettings

    @property
    def url(self) -> str:
        """hf://org/name@commit[/subfolder], as error lines name it."""
        return str(HubRepo(self.repo.repo_id, self.commit, self.repo.subfolder))

    def list(self) -> dict[str, int]:
        """Names and sizes of the folder's files."""
        return dict(self.files)

    def open(self, name: str) -> RemoteFile:
        """One file at the pinned commit (its size from the listing, or from a HEAD request)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        path = f"{self.repo.subfolder}/{name}" if self.repo.subfolder else name
        http_url = hf_hub_url(self.repo.repo_id, path, revision=self.commit, endpoint=self.settings.endpoint)
        size = self.files.get(name) or 0
        if not size:
            with hub_errors(self.repo, self.settings):
                size = get_hf_file_metadata(http_url, token=self.settings.token).size or 0
        where = f"{self.url}/{quote(name)}"
        return RemoteFile(where, size, self.commit, _ranges(http_url, where, size, self.commit, self.settings.token))

    def read(self, name: str) -> bytes:
        """A small file whole."""
        file = self.open(name)
        buf = bytearray(file.size)
        if file.size:
            file.read_into([(0, memoryview(buf))])
        return bytes(buf)


def open_hub(repo: HubRepo) -> HubFolder:
    """Pin the repo's revision to one commit and list its folder."""
    settings = hub_settings()
    commit, files = pin(repo, settings)
    return HubFolder(repo, commit, files, settings)


def transport_errors() -> tuple[type, ...]:
    """The HTTP clients' error base classes: huggingface_hub 2.x talks through httpx2, 1.x through httpx."""
    import importlib

    errors = []
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


@contextmanager
def progress_bars(wanted: bool) -> Iterator[None]:
    """huggingface_hub's bars only when asked for and a person is watching (aockpt.progress rules)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not (wanted and enabled()) and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        yield
    finally:
        if silence:
            enable_progress_bars()
