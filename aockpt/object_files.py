"""Object storage (S3, GCS, Azure, plain HTTPS) through obstore, the Rust object_store binding.

Credentials, regions and endpoints come from the environment as the cloud SDKs read them (``AWS_*`` with
``AWS_ENDPOINT_URL``, ``GOOGLE_*``, ``AZURE_*``); an ``http://`` endpoint is allowed when the user set one.
Each object is pinned to its ETag (or version id) when opened, and every range is asked for with
``If-Match`` on it. obstore retries a request twice itself; aockpt.remote_io resumes cut bodies and
retries what is left the same way for every source.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RemoteReadError, UsageError, reason
from .filenames import INDEX_NAME, WEIGHTS_NAME
from .locations import ObjectUrl, locate
from .remote_io import Changed, RemoteFile, Transient, safe

REQUEST_TIMEOUT = "60s"
_TRANSIENT = re.compile(r"\b(408|429|5\d\d)\b|connect|reset|timed? ?out|timeout|incomplete|body|eof|broken pipe|"
                        r"closed|hyper|error sending request|decoding", re.I)


def obstore_modules() -> tuple[Any, Any]:
    """obstore and its store constructors, or one line saying how to install them."""
    try:
        import obstore
        import obstore.store as stores
    except ImportError as e:
        raise UsageError("reading or writing s3://, gs://, az:// or https:// checkpoints needs obstore: "
                         "pip install 'aockpt[remote]'") from e
    return obstore, stores


def _client_options(scheme: str) -> dict[str, Any]:
    """HTTP client options: plain http only where the user's endpoint (or URL) says http."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    allow_http = scheme == "http" or (scheme == "s3" and endpoint.startswith("http://"))
    return {"timeout": REQUEST_TIMEOUT, "connect_timeout": "10s", "allow_http": allow_http}


def _ranges(store: Any, key: str, url: str, pin: dict[str, str]) -> Callable[[int, int], Iterator[memoryview]]:
    """One ranged GET of an object at its pinned version, chunk by chunk."""
    def stream(start: int, end: int) -> Iterator[memoryview]:
        obstore, _ = obstore_modules()
        with _errors(url):
            for chunk in obstore.get(store, key, options={"range": (start, end), **pin}):
                yield memoryview(chunk)

    return stream


@contextmanager
def _errors(url: str) -> Iterator[None]:
    """obstore's exceptions as Changed (retry useless), Transient (retry) or one RemoteReadError line."""
    from obstore.exceptions import NotFoundError, PermissionDeniedError, PreconditionError, UnauthenticatedError

    try:
        yield
    except (Changed, Transient, RemoteReadError):
        raise
    except PreconditionError:
        raise Changed("its ETag no longer matches the one the load opened") from None
    except (FileNotFoundError, NotFoundError):
        raise RemoteReadError(f"{url} does not exist (or was deleted while loading)") from None
    except (PermissionDeniedError, UnauthenticatedError) as e:
        raise RemoteReadError(f"{url}: access denied ({safe(reason(e, 300))}); check the credentials in the "
                              "environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, AZURE_*)") from None
    except Exception as e:  # obstore's GenericError and transport errors carry the cause only in their text
        text = safe(reason(str(e).split(" Debug source:", 1)[0], 300))
        if isinstance(e, (ConnectionError, TimeoutError)) or _TRANSIENT.search(str(e)):
            raise Transient(text) from None
        raise RemoteReadError(f"{url}: {text}") from None


@contextmanager
def _once(url: str) -> Iterator[None]:
    """For metadata calls (obstore retried them already): a transient failure is one clear line."""
    try:
        with _errors(url):
            yield
    except Transient as e:
        raise RemoteReadError(f"{url}: the store did not answer ({e}); check the endpoint and retry") from None


@dataclass
class ObjectFolder:
    """An object-store prefix holding a checkpoint's files (or one object, for a single-file URL)."""

    url: str
    store: Any

    def list(self) -> dict[str, int]:
        """Names and sizes of the objects directly under the prefix (one LIST request)."""
        obstore, _ = obstore_modules()
        with _once(self.url):
            listing = obstore.list_with_delimiter(self.store)
        return {o["path"].rsplit("/", 1)[-1]: o["size"] for o in listing["objects"]}

    def open(self, name: str) -> RemoteFile:
        """Pin one object: its size and ETag (version id where the bucket keeps versions)."""
        obstore, _ = obstore_modules()
        url = f"{self.url}/{name}"
        with _once(url):
            meta = obstore.head(self.store, name)
        version = meta.get("version") or meta.get("e_tag")
        if not version:
            raise RemoteReadError(f"{url}: the server gives the object no ETag or version, so a load cannot be "
                                  "pinned to one version of it; serve it from a store that does")
        pin = {"version": version} if meta.get("version") else {"if_match": version}
        return RemoteFile(url, meta["size"], version, _ranges(self.store, name, url, pin))

    def read(self, name: str) -> bytes:
        """A small object whole (config and index files), pinned like any other read."""
        file = self.open(name)
        buf = bytearray(file.size)
        file.read_into([(0, memoryview(buf))])
        return bytes(buf)

    def put(self, name: str, data: bytes | Path) -> None:
        """Write one object (bytes or a local file); multipart for large files."""
        obstore, _ = obstore_modules()
        url = f"{self.url}/{name}"
        with _once(url):
            obstore.put(self.store, name, data)

    def delete(self, name: str) -> None:
        """Remove one object."""
        obstore, _ = obstore_modules()
        url = f"{self.url}/{name}"
        with _once(url):
            obstore.delete(self.store, name)


def open_folder(location: ObjectUrl) -> ObjectFolder:
    """A store rooted at the URL's prefix, configured from the environment."""
    _, stores = obstore_modules()
    from datetime import timedelta

    retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=30),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=4),
                         "base": 2}}
    try:
        store = stores.from_url(location.url, client_options=_client_options(location.scheme), retry_config=retry)
    except Exception as e:  # obstore reports a bad URL or configuration as one of several types
        raise UsageError(f"{location.url}: cannot open this store ({safe(reason(e))})") from None
    return ObjectFolder(location.url, store)


def output_url(dst: Any) -> ObjectUrl | None:
    """The object-store URL an output names (s3://, gs://, az://, http(s)://), or None for a local path."""
    if not isinstance(dst, str) or "://" not in dst:
        return None
    location = locate(dst)
    return location if isinstance(location, ObjectUrl) else None


def destination(dst: Any) -> Any:
    """What a writer returns: the URL it wrote under, or the local Path."""
    return dst.rstrip("/") if output_url(dst) is not None else Path(dst)


@contextmanager
def staged_upload(dst: ObjectUrl, *, force: bool, folder: bool) -> Iterator[Path]:
    """Yield a local staging path; on success upload it under `dst`, commit marker last; on error nothing
    is uploaded. Shards go first, then the other files, then the index (or the single model.safetensors):
    a reader refuses a prefix without its marker, so it never sees a half-written checkpoint."""
    import shutil
    import tempfile

    target = open_folder(dst if folder else ObjectUrl(dst.url.rsplit("/", 1)[0]))
    name = None if folder else dst.url.rsplit("/", 1)[1]
    existing = target.list()
    if (existing if folder else name in existing) and not force:
        raise UsageError(f"{dst} already exists; pass --force (force=True) to replace it")
    tmp = Path(tempfile.mkdtemp(prefix="aockpt-upload-"))
    try:
        out = tmp / "out"
        if folder:
            out.mkdir()
        yield out
        if not folder:
            target.put(name, out)
            return
        markers = [m for m in (INDEX_NAME, WEIGHTS_NAME) if m in existing]
        for marker in markers:  # replacing: readers see "incomplete" until the new marker is written
            target.delete(marker)
        files = sorted(p.name for p in out.iterdir())
        order = sorted(files, key=lambda n: (n == INDEX_NAME or (n == WEIGHTS_NAME and INDEX_NAME not in files),
                                             not n.endswith(".safetensors"), n))
        for file_name in order:
            target.put(file_name, out / file_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
