"""Publishing to the Hugging Face Hub: what may be uploaded, the model card, the upload, the git pre-push hook.

Rules (docs/hub.md): never upload a pickle (by extension or by zip/pickle magic), never upload safetensors
that lack aockpt's record or fail ``verify``. ``push`` packs an unpacked input into a temporary folder first,
writes the model card, and makes one atomic Hub commit. ``python -m aockpt.hub pre-push`` is the git
pre-push hook that applies the same rules to every commit being pushed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, NamedTuple

from .errors import AockptError, CorruptCheckpointError, HubError, UnsafeCheckpointError, UsageError
from .filenames import PICKLE_SUFFIXES
from .paths import is_inside, member

PathLike = str | os.PathLike
CARD_NAME = "README.md"
CARD_TAGS = ("aockpt", "torchao")
SECTION_BEGIN = "<!-- aockpt:begin (written by `aockpt push`; edits between these markers are replaced) -->"
SECTION_END = "<!-- aockpt:end -->"
CARD_DEVICES = ("cpu", "cuda")
_MAX_CARD_BYTES = 16 * 1024 * 1024  # the card is read whole and rewritten
HOOK_MARKER = "# installed by `aockpt hook install`"
_ZERO_SHA = re.compile(r"^0+$")
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
_CHECKPOINT_SUFFIXES = (".safetensors", ".safetensors.index.json")  # changing one re-verifies its folder
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"

# File content that means "pickle inside", whatever the file is called: (magic test, reason).
_PICKLE_MAGIC: tuple[tuple[re.Pattern[bytes], str], ...] = (
    (re.compile(rb"^PK\x03\x04"), "a zip archive, the container torch.save writes its pickle into"),
    (re.compile(rb"^\x80[\x02-\x05]"), "a raw pickle stream (legacy torch.save or pickle.dump)"),
)
_HEAD_BYTES = 8


# --- what may be published -------------------------------------------------------------------------

def pickle_reason(name: str, head: bytes) -> str | None:
    """Why a file is a pickle, from its name and first bytes; None when it is not one."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return f"{suffix} is a torch pickle extension"
    return next((reason for magic, reason in _PICKLE_MAGIC if magic.match(head)), None)


class Problem(NamedTuple):
    """One file that must not be published: the line to show and the error class it belongs to."""

    text: str
    error: type[AockptError]


def find_problems(root: Path, names: Iterable[str]) -> list[Problem]:
    """The files under `root` (given by relative posix name) that must not be published."""
    problems, checkpoints = [], set()
    for name in sorted(names):
        if not is_inside(root, root / name):
            problems.append(Problem(f"{name}: a link outside the folder (or a link loop); "
                                    "copy the file in if it belongs to the model", UnsafeCheckpointError))
            continue
        with open(root / name, "rb") as f:
            head = f.read(_HEAD_BYTES)
        reason = pickle_reason(name, head)
        if reason:
            problems.append(Problem(f"{name}: {reason}; convert it with `aockpt pack`, never publish pickles",
                                    UnsafeCheckpointError))
        elif name.endswith(_CHECKPOINT_SUFFIXES):
            checkpoints.add(str(PurePosixPath(name).parent))
    for folder in sorted(checkpoints):
        problems.extend(_checkpoint_problems(root, folder))
    return problems


def _checkpoint_problems(root: Path, folder: str) -> list[Problem]:
    """Problems of one folder of safetensors: not packed by aockpt, or failing verify."""
    from .api import verify
    from .reader import is_packed

    shown = folder if folder != "." else "the checkpoint folder"
    try:
        if not is_packed(root / folder):
            return [Problem(f"{shown}: safetensors without aockpt's record; run `aockpt pack` on it first",
                            UnsafeCheckpointError)]
        verify(root / folder)
    except AockptError as e:
        return [Problem(f"{shown}: fails verify: {e}", CorruptCheckpointError)]
    return []


def publishable_files(folder: Path) -> list[str]:
    """Relative names of the files `push` uploads: everything but hidden files and folders."""
    names = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix())
    return names


# --- model card ------------------------------------------------------------------------------------

def model_card(existing: str | None, info: Any, repo_id: str) -> str:
    """The card: the existing text kept, the aockpt section replaced or appended, tags and library set."""
    from huggingface_hub import ModelCard

    text = existing or ""
    card = ModelCard(text if text.startswith("---") else f"---\n{{}}\n---\n{text}")
    card.data.tags = sorted(set(card.data.tags or []) | set(CARD_TAGS))
    card.data.library_name = card.data.library_name or "transformers"
    section = f"{SECTION_BEGIN}\n{_card_section(info, repo_id)}{SECTION_END}\n"
    body = card.text
    if SECTION_BEGIN in body and SECTION_END in body:
        before, rest = body.split(SECTION_BEGIN, 1)
        card.text = before + section + rest.split(SECTION_END, 1)[1].lstrip("\n")
    else:
        card.text = body + ("\n" if body and not body.endswith("\n\n") else "") + section
    return str(card)


def _card_section(info: Any, repo_id: str) -> str:
    """The aockpt section: types per module group, portability per device, how to load, versions."""
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for t in info.tensors:
        if t.alias_of is None:
            row = groups[(_LAYER_INDEX.sub("*", t.name), t.type, t.dtype)]
            row[0] += 1
            row[1] += t.nbytes
    lines = ["## aockpt quantization", "",
             f"Packed by aockpt (format {info.format_version}): safetensors only, no pickle; every tensor carries "
             "a sha256 digest (`aockpt verify`).", "",
             "| module group | torchao type | dtype | tensors | bytes |", "|---|---|---|---:|---:|"]
    lines += [f"| `{g}` | {ty} | {dt} | {n} | {b:,} |" for (g, ty, dt), (n, b) in sorted(groups.items())]
    lines += ["", f"Total: {info.total_bytes:,} bytes of tensor data ({info.bf16_bytes:,} as bf16).", "",
              "| device | tensors that run | load only (no kernel) | cannot load |", "|---|---:|---:|---:|"]
    for device in CARD_DEVICES:
        words = [t.devices[device].split(":", 1)[0] for t in info.tensors if t.alias_of is None]
        lines.append(f"| {device} | {words.count('runs')} | {words.count('loads')} | {words.count('no')} |")
    lines += ["", "Load with stock transformers (needs torchao installed):", "", "```python",
              "from transformers import AutoModelForCausalLM", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", "",
              "or with aockpt, which checks every digest and the target device first:", "", "```python",
              "import aockpt", "", f'model = aockpt.load_pretrained("{repo_id}", device="cpu")', "```", "",
              "| software | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in sorted(info.producer.items())]
    return "\n".join(lines) + "\n"


# --- upload ----------------------------------------------------------------------------------------

def push(path: PathLike, repo_id: str, *, revision: str | None = None, private: bool = False,
         create_pr: bool = False, commit_message: str | None = None, token: str | None = None,
         progress: bool = True, endpoint: str | None = None, cpu_packer: str | None = None) -> str:
    """Check, card and upload a checkpoint folder in one Hub commit; return the commit (or PR) URL.

    Args:
        path: a packed folder, or anything `aockpt.pack` reads (packed into a temporary folder first).
        repo_id: "namespace/name"; created if missing (``private`` applies only then).
        revision: branch to commit to (created from main if missing); ``create_pr`` opens a PR instead.
        token: Hub token; default HF_TOKEN or the one saved by ``hf auth login``.
        endpoint: Hub URL; default HF_ENDPOINT or https://huggingface.co.
        cpu_packer: as for `aockpt.pack`, when `path` is packed first.
    Returns:
        The URL of the commit, or of the pull request when ``create_pr``.
    Raises:
        UnsafeCheckpointError: a pickle or unpacked safetensors would be uploaded; nothing was sent.
        CorruptCheckpointError: a checkpoint fails verify; nothing was sent.
        HubError: the Hub refused or could not be reached; no commit was made.
    """
    from .api import inspect, pack
    from .reader import is_packed

    src = Path(path)
    with tempfile.TemporaryDirectory(prefix="aockpt-push-") as tmp:
        folder = src if src.is_dir() and is_packed(src) else pack(src, Path(tmp) / "packed", cpu_packer=cpu_packer)
        names = publishable_files(folder)
        problems = find_problems(folder, names)
        if problems:
            error = next((p.error for p in problems if p.error is UnsafeCheckpointError), problems[0].error)
            raise error(f"refusing to push {src}: " + "; ".join(p.text for p in problems))
        card_file = next((member(p, CARD_NAME) for p in (folder, src) if (p / CARD_NAME).is_file()), None)
        if card_file and card_file.stat().st_size > _MAX_CARD_BYTES:
            raise UsageError(f"{card_file} is {card_file.stat().st_size:,} bytes, more than a model card's "
                             f"{_MAX_CARD_BYTES:,}; shorten it or move the bulk into another file")
        existing = card_file.read_text(encoding="utf-8", errors="replace") if card_file else None
        card = model_card(existing, inspect(folder, devices=CARD_DEVICES), repo_id).encode("utf-8")
        files = {name: folder / name for name in names if name != CARD_NAME}
        with _progress_bars(progress):
            return _commit(files, card, repo_id, endpoint=endpoint, token=token, revision=revision,
                           private=private, create_pr=create_pr,
                           commit_message=commit_message or f"Upload {src.name} with aockpt")


def push_to_hub(model_or_path: Any, repo_id: str, **options: Any) -> str:
    """Push an in-memory quantized transformers model (packed by aockpt.save_pretrained first) or a folder."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return push(model_or_path, repo_id, **options)
    if not callable(getattr(model_or_path, "save_pretrained", None)):
        raise UsageError(f"cannot push a {type(model_or_path).__name__}: pass a transformers model or a folder")
    from .pretrained import save_pretrained

    with tempfile.TemporaryDirectory(prefix="aockpt-model-") as tmp:
        return push(save_pretrained(model_or_path, Path(tmp) / "model"), repo_id, **options)


def _commit(files: dict[str, Path], card: bytes, repo_id: str, *, endpoint: str | None, token: str | None,
            revision: str | None, private: bool, create_pr: bool, commit_message: str) -> str:
    """Create the repo if needed and make one commit; every failure becomes one HubError line."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    operations = [CommitOperationAdd(name, str(path)) for name, path in files.items()]
    operations.append(CommitOperationAdd(CARD_NAME, card))
    with _hub_errors(repo_id, api.endpoint):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)
    return info.pr_url or info.commit_url


# HTTP status -> what it means for a push and what to do.
_STATUS_ADVICE = {
    401: "the Hub rejected the token; set HF_TOKEN or run `hf auth login` with a token that has write access",
    403: "the token may not write to this repo; use a write token or a namespace you own",
    404: "the repo or revision does not exist or is not visible to this token",
    409: "the repo changed during the push (conflict); re-run to push onto the new head",
    413: "a file is larger than the Hub accepts",
}


@contextmanager
def _hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into one-line HubErrors saying nothing was committed."""
    from huggingface_hub.errors import HfHubHTTPError

    transport = _transport_errors()
    tail = "no commit was made; re-run the same command to retry (files already uploaded are skipped)"
    try:
        yield
    except (HfHubHTTPError, *transport, RuntimeError, ValueError) as e:
        cause = _root_cause(e, (HfHubHTTPError, *transport))
        response = getattr(cause, "response", None)
        if isinstance(cause, HfHubHTTPError) and response is not None:
            status = response.status_code
            why = f"HTTP {status}: {_STATUS_ADVICE.get(status, _first_line(cause))}"
        elif isinstance(cause, transport):
            why = f"could not talk to {endpoint} ({type(cause).__name__}: {_first_line(cause)})"
        else:
            why = f"{type(cause).__name__}: {_first_line(cause)}"
        raise HubError(f"push to {repo_id} failed: {why}; {tail}") from e


def _transport_errors() -> tuple[type, ...]:
    """The HTTP clients' error base classes: huggingface_hub 2.x talks through httpx2, 1.x through httpx."""
    import importlib

    errors = []
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


def _root_cause(exc: BaseException, wanted: tuple[type, ...]) -> BaseException:
    """The first exception of a wanted type along the cause chain, else the innermost one."""
    seen = exc
    while not isinstance(seen, wanted) and (seen.__cause__ or seen.__context__) is not None:
        seen = seen.__cause__ or seen.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


@contextmanager
def _progress_bars(wanted: bool) -> Iterator[None]:
    """huggingface_hub's bars only when asked for and a person is watching (aockpt.progress rules)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from .progress import enabled

    silence = not (wanted and enabled()) and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        yield
    finally:
        if silence:
            enable_progress_bars()


# --- git pre-push hook -----------------------------------------------------------------------------

def install_hook(repo_dir: PathLike = ".", *, force: bool = False) -> Path:
    """Write `.git/hooks/pre-push` running this Python's aockpt; refuse to replace a foreign hook unless forced."""
    import aockpt

    try:
        hooks = Path(_git(Path(repo_dir), "rev-parse", "--git-path", "hooks").decode().strip())
    except subprocess.CalledProcessError as e:
        raise UsageError(f"{repo_dir} is not a git repository; run `git init` or pass a clone's folder") from e
    hook = (hooks if hooks.is_absolute() else Path(repo_dir) / hooks) / "pre-push"
    if hook.exists() and HOOK_MARKER not in hook.read_text(errors="replace") and not force:
        raise UsageError(f"{hook} exists and was not written by aockpt; pass --force to replace it "
                         "(the old hook is kept as pre-push.aockpt-backup)")
    if hook.exists() and HOOK_MARKER not in hook.read_text(errors="replace"):
        hook.replace(hook.with_name("pre-push.aockpt-backup"))
    package_parent = str(Path(aockpt.__file__).resolve().parent.parent)
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(
        f"#!/bin/sh\n{HOOK_MARKER}: refuses pushes carrying torch pickles or safetensors that fail\n"
        "# `aockpt verify`. Bypass once with `git push --no-verify`; delete this file to uninstall.\n"
        f"PYTHONPATH={shlex.quote(package_parent)}${{PYTHONPATH:+:$PYTHONPATH}} "
        f"exec {shlex.quote(sys.executable)} -m aockpt.hub pre-push \"$@\"\n"
    )
    hook.chmod(0o755)
    return hook


def check_push(updates: str, remote: str, repo: Path) -> list[str]:
    """Problems in the commits of a push, from git's pre-push stdin (`<lref> <lsha> <rref> <rsha>` lines)."""
    problems = []
    for line in updates.splitlines():
        if not line.strip():
            continue
        _, local_sha, _, remote_sha = line.split()
        if _ZERO_SHA.match(local_sha):
            continue  # a branch deletion carries no files
        for sha in _new_commits(repo, local_sha, remote_sha, remote):
            problems += [f"{sha[:12]} {p.text}" for p in _commit_problems(repo, sha)]
    return problems


def _new_commits(repo: Path, local_sha: str, remote_sha: str, remote: str) -> list[str]:
    """Commits the push sends: those not on the remote's head, else not on any of its tracking refs."""
    probe = ["git", "cat-file", "-e", f"{remote_sha}^{{commit}}"]
    known = not _ZERO_SHA.match(remote_sha) and subprocess.run(probe, cwd=repo, capture_output=True).returncode == 0
    exclude = [f"^{remote_sha}"] if known else ["--not", f"--remotes={remote}"]
    return _git(repo, "rev-list", local_sha, *exclude).decode().split()


def _commit_problems(repo: Path, sha: str) -> list[Problem]:
    """Problems in the files a commit adds or changes, checked on an export of that commit."""
    parents = _git(repo, "rev-list", "--parents", "-n", "1", sha).decode().split()[1:]
    listing = (["diff-tree", "-r", "-z", "--name-only", "--no-commit-id", "--diff-filter=ACMRT", parents[0], sha]
               if parents else ["ls-tree", "-r", "-z", "--name-only", sha])
    changed = [n for n in _git(repo, *listing).decode().split("\0") if n]
    if not changed:
        return []
    export = set(changed)
    for folder in {str(PurePosixPath(n).parent) for n in changed if n.endswith(_CHECKPOINT_SUFFIXES)}:
        export.update(_folder_files(repo, sha, folder))
    with tempfile.TemporaryDirectory(prefix="aockpt-pre-push-") as tmp:
        _export(repo, sha, sorted(export), Path(tmp))
        return find_problems(Path(tmp), changed)


def _folder_files(repo: Path, sha: str, folder: str) -> list[str]:
    """Files directly in one folder of a commit (the rest of a checkpoint whose shard changed)."""
    spec = [] if folder == "." else [f"{folder}/"]
    out = _git(repo, "ls-tree", "-z", "--full-tree", sha, "--", *spec).decode().split("\0")
    return [entry.split("\t", 1)[1] for entry in out if entry and entry.split()[1] == "blob"]


def _export(repo: Path, sha: str, names: list[str], dst: Path) -> None:
    """Write the named files of a commit under `dst`, with git-lfs pointers replaced by their local objects."""
    proc = subprocess.Popen(["git", "--literal-pathspecs", "archive", "--format=tar", sha, "--", *names],
                            cwd=repo, stdout=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        tar.extractall(dst, filter="data")
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, "git archive")
    lfs_store = Path(_git(repo, "rev-parse", "--git-path", "lfs/objects").decode().strip())
    for name in names:
        _resolve_lfs_pointer(dst / name, lfs_store if lfs_store.is_absolute() else repo / lfs_store)


def _resolve_lfs_pointer(path: Path, store: Path) -> None:
    """Replace a git-lfs pointer file by the object it names, when the object is in the local store."""
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) != _LFS_POINTER:
            return
        match = re.search(rb"^oid sha256:([0-9a-f]{64})$", f.read(1024), re.M)
    oid = match.group(1).decode() if match else ""
    obj = store / oid[:2] / oid[2:4] / oid
    if oid and obj.is_file():
        path.unlink()
        path.symlink_to(obj)


def _git(repo: Path, *args: str) -> bytes:
    """Run git in `repo` and return its stdout; raise CalledProcessError on failure."""
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    """Entry point of the hook: `python -m aockpt.hub pre-push <remote> <url>` with git's lines on stdin."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["pre-push"]:
        print("usage: python -m aockpt.hub pre-push <remote> <url>  (run by git)", file=sys.stderr)
        return 2
    try:
        problems = check_push(sys.stdin.read(), args[1] if len(args) > 1 else "", Path.cwd())
    except (subprocess.CalledProcessError, OSError, tarfile.TarError, ValueError) as e:
        print(f"aockpt: push refused: could not inspect the pushed commits ({e}); "
              "bypass once with `git push --no-verify`", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"aockpt: refused {problem}", file=sys.stderr)
    if problems:
        print(f"aockpt: push refused ({len(problems)} problem(s)); pack checkpoints with `aockpt pack`, "
              "or bypass once with `git push --no-verify`", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
