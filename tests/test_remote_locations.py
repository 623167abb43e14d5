"""aockpt.locations: what a string names, decided without any network; and remote_io's retries and redaction."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aockpt.errors import RemoteReadError, UsageError
from aockpt.locations import HubRepo, ObjectUrl, locate
from aockpt.remote_io import Changed, Retry, Transient, read_range, safe


@pytest.mark.parametrize("text,expected", [
    ("org/name", HubRepo("org/name")),
    ("org/name@v1.0", HubRepo("org/name", "v1.0")),
    ("hf://org/name", HubRepo("org/name")),
    ("hf://org/name@refs%2Fpr%2F1/sub/folder", HubRepo("org/name", "refs/pr/1", "sub/folder")),
    ("hf://models/org/name@0123abcd", HubRepo("org/name", "0123abcd")),
    ("s3://bucket/prefix/", ObjectUrl("s3://bucket/prefix")),
    ("gs://bucket/a/model.safetensors", ObjectUrl("gs://bucket/a/model.safetensors")),
    ("az://account/container/p", ObjectUrl("az://account/container/p")),
    ("https://host.example/models/x", ObjectUrl("https://host.example/models/x")),
])
def test_remote_locations_parse(text, expected):
    assert locate(text) == expected


def test_an_existing_local_path_wins_over_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert locate("org/name") == Path("org/name")
    assert locate(Path("missing/path")) == Path("missing/path")  # a Path object is always local


@pytest.mark.parametrize("text,says", [
    ("/no/such/folder", "does not exist; pass an existing file or folder"),
    ("a/b/c", "does not exist"),
    ("../org/name", "does not exist"),
    ("ftp://host/x", "cannot read ftp:// URLs"),
    ("s3://", "names no bucket or host"),
    ("hf://justaname", "is not a Hub URL"),
])
def test_what_is_neither_is_one_usage_line(text, says):
    with pytest.raises(UsageError, match=says) as error:
        locate(text)
    assert "\n" not in str(error.value)


def test_a_hub_location_prints_as_the_url_that_names_it():
    assert str(HubRepo("org/name", "refs/pr/1", "sub")) == "hf://org/name@refs%2Fpr%2F1/sub"
    assert locate(str(HubRepo("org/name", "refs/pr/1", "sub"))) == HubRepo("org/name", "refs/pr/1", "sub")


def _stream_of(answers: list):
    """A ranged-read function answering from a script: bytes, or an exception to raise."""
    calls = []

    def stream(start: int, end: int):
        calls.append((start, end))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        yield answer

    return stream, calls


def test_a_cut_body_resumes_where_it_stopped():
    stream, calls = _stream_of([b"abc", Transient("reset"), b"defgh"])
    buf = bytearray(8)
    read_range(stream, memoryview(buf), 100, "s3://b/k", Retry(first_wait_s=0))
    assert bytes(buf) == b"abcdefgh" and calls == [(100, 108), (103, 108), (103, 108)]


def test_changed_and_persistent_failures_are_one_line_naming_the_url():
    stream, _ = _stream_of([Changed("etag differs")])
    with pytest.raises(RemoteReadError, match=r"^s3://b/k changed while it was being read"):
        read_range(stream, memoryview(bytearray(4)), 0, "s3://b/k", Retry(first_wait_s=0))
    stream, calls = _stream_of([Transient("HTTP 503")] * 3)
    with pytest.raises(RemoteReadError, match=r"^s3://b/k: reading bytes 0-4 failed 3 times \(HTTP 503\)"):
        read_range(stream, memoryview(bytearray(4)), 0, "s3://b/k", Retry(attempts=3, first_wait_s=0))
    stream, _ = _stream_of([b"toolong"])
    with pytest.raises(RemoteReadError, match="sent more than the 4 bytes"):
        read_range(stream, memoryview(bytearray(4)), 0, "s3://b/k", Retry(first_wait_s=0))


def test_messages_lose_signed_queries_tokens_and_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    text = safe("GET https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Credential=AKIA failed; "
                "Authorization: Bearer hf_abcdefgh; key s3cr3t-value; hf_abcdefgh1 printed")
    assert text == ("GET https://b.s3.amazonaws.com/k?... failed; Authorization: Bearer ***; key ***; "
                    "hf_*** printed")


URL_PATH_CONTRACT = """
import os, pickle, sys, tempfile
from pathlib import Path
from aockpt.locations import UrlPath
tmp = Path(tempfile.mkdtemp())
(tmp / "config.json").write_text("{}")
root = UrlPath(tmp, "s3://bucket/model")
assert (os.fspath(root), str(root)) == (str(tmp), "s3://bucket/model"), (os.fspath(root), str(root))
child = root / "config.json"
assert (os.fspath(child), str(child)) == (str(tmp / "config.json"), "s3://bucket/model/config.json")
assert child.read_text() == "{}" and os.path.isdir(root)
assert [os.fspath(p) for p in root.iterdir()] == [str(tmp / "config.json")]
assert [os.fspath(p) for p in root.glob("*.json")] == [str(tmp / "config.json")]
assert os.fspath(root.parent) == str(tmp.parent)
back = pickle.loads(pickle.dumps(root))
assert (os.fspath(back), str(back)) == (os.fspath(root), str(root))
print("ok", sys.version_info[:2])
"""


def _other_pythons() -> list[str]:
    """Working CPython 3.12+ interpreters on this machine (pyenv's too) besides the one running the tests."""
    found = {p.resolve() for p in Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")).glob(
        "versions/3.1[2-9]*/bin/python3")}
    found |= {Path(w).resolve() for n in range(12, 20) if (w := shutil.which(f"python3.{n}"))}
    found.discard(Path(sys.executable).resolve())
    return sorted(str(p) for p in found if subprocess.run([p, "-c", ""], capture_output=True).returncode == 0)


OTHER_PYTHONS = _other_pythons()


def test_a_staging_folder_names_its_url_and_reads_its_local_files():
    """UrlPath prints the URL and opens local files (3.12 builds paths in __init__ from every argument and
    lists folders from str(): a staging root once became local/s3:/bucket/..., seen on the H200's 3.12)."""
    exec(URL_PATH_CONTRACT, {})


@pytest.mark.skipif(not OTHER_PYTHONS, reason="no other CPython 3.12+ on this machine")
@pytest.mark.parametrize("python", OTHER_PYTHONS or ["none"])
def test_url_paths_keep_their_contract_on_other_pythons(python):
    """aockpt.locations needs no torch, so the contract runs under each other Python this machine has."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([python, "-c", URL_PATH_CONTRACT], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo)}, cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr[-2000:]
