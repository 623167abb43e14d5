"""The git pre-push hook: `aockpt hook install` writes it, git runs ``python -m aockpt.hook pre-push``.

It applies publish_rules to every file each pushed commit adds or changes (exported from git, with
git-lfs pointers resolved from the local store), and to the whole folder of any checkpoint shard touched.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from .atomic import move_no_replace
from .errors import OutputError, UsageError
from .publish_rules import CHECKPOINT_SUFFIXES, Problem, find_problems

PathLike = str | os.PathLike
HOOK_MARKER = "# installed by `aockpt hook install`"
CHAINED = "pre-push.aockpt-chained"
_ZERO_SHA = re.compile(r"^0+$")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_HEAD = f"#!/bin/sh\n{HOOK_MARKER}: refuses pushes carrying torch pickles or safetensors that fail\n"
_RUN = 'PYTHONPATH=@PATH@${PYTHONPATH:+:$PYTHONPATH} exec @PYTHON@ -m aockpt.@MODULE@ pre-push "$@"\n'
# The hook text, newest first, then every text an earlier release wrote (@…@ are filled in at install).
TEMPLATES = (
    _HEAD + "# `aockpt verify`. Bypass once with `git push --no-verify`. The pre-push hook it replaced, if any, is\n"
    f"# kept as {CHAINED} and runs first; to uninstall, delete this file (and move that one back).\n"
    "input=$(cat; echo .) && input=${input%.}\n"
    f'chained="$(dirname "$0")/{CHAINED}"\n'
    """if [ -x "$chained" ]; then printf '%s' "$input" | "$chained" "$@" || exit; fi\n"""
    "printf '%s' \"$input\" | " + _RUN,
    _HEAD + "# `aockpt verify`. Bypass once with `git push --no-verify`; delete this file to uninstall.\n" + _RUN,
)
_QUOTED = r"""(?:[\w@%+=:,./-]+|'(?:[^'\n]|'"'"')*')"""  # a word as shlex.quote writes it
_WRITTEN_BY_AOCKPT = [re.compile(re.escape(t).replace("@PATH@", _QUOTED).replace("@PYTHON@", _QUOTED)
                                 .replace("@MODULE@", "(?:hook|hub)")) for t in TEMPLATES]


def install_hook(repo_dir: PathLike = ".", *, force: bool = False) -> Path:
    """Write `.git/hooks/pre-push` running this Python's aockpt; a hook it did not write is kept and chained.

    A pre-push hook that aockpt did not write (a file, a link, or aockpt's own edited by hand) is replaced
    only with `force`: it is moved, never copied or followed, to ``pre-push.aockpt-chained``, which the new
    hook runs first. Nothing is ever overwritten: with a chained hook already there, install is refused.
    """
    import aockpt

    hook = _hooks_dir(Path(repo_dir)) / "pre-push"
    try:
        hook.parent.mkdir(parents=True, exist_ok=True)
        keep = _keep_previous(hook, force)
        text = (TEMPLATES[0].replace("@PATH@", shlex.quote(str(Path(aockpt.__file__).resolve().parent.parent)))
                .replace("@PYTHON@", shlex.quote(sys.executable)).replace("@MODULE@", "hook"))
        fd, tmp = tempfile.mkstemp(prefix=".pre-push.aockpt-tmp-", dir=hook.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o755)
            if keep:
                move_no_replace(hook, hook.with_name(CHAINED))
            os.replace(tmp, hook)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"could not install the hook at {hook} ({e.strerror or e}); the hook that was there "
                          f"is unchanged or kept as {CHAINED}: check that the hooks folder is writable") from e
    return hook


def _hooks_dir(repo: Path) -> Path:
    """The repository's hooks folder (`core.hooksPath` or `.git/hooks`), refusing a folder that is not a clone."""
    try:
        hooks = Path(_git(repo, "rev-parse", "--git-path", "hooks").decode().strip())
    except (subprocess.CalledProcessError, OSError) as e:
        raise UsageError(f"{repo} is not a git repository; run `git init` or pass a clone's folder") from e
    return hooks if hooks.is_absolute() else repo / hooks


def _keep_previous(hook: Path, force: bool) -> bool:
    """Whether the entry at `hook` must be kept as the chained hook (True) or may be overwritten (False)."""
    if not os.path.lexists(hook):
        return False
    info = hook.lstat()
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{hook} is a folder, not a hook; move it away and rerun `aockpt hook install`")
    text = hook.read_bytes().decode(errors="replace") if stat.S_ISREG(info.st_mode) and info.st_size < 65536 else ""
    if any(t.fullmatch(text) for t in _WRITTEN_BY_AOCKPT):
        return False
    what = ("is a link" if stat.S_ISLNK(info.st_mode) else "is aockpt's hook edited by hand" if HOOK_MARKER in text
            else "was not written by aockpt")
    chained = hook.with_name(CHAINED)
    if os.path.lexists(chained):
        raise UsageError(f"{hook} {what} and {chained} already holds an earlier hook; combine the two into "
                         f"{CHAINED} by hand (or remove one) and rerun; nothing was changed")
    if not force:
        raise UsageError(f"{hook} {what}; pass --force to install aockpt's hook and keep this one as {CHAINED}, "
                         "which then runs first")
    return True


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
    for folder in {str(PurePosixPath(n).parent) for n in changed if n.endswith(CHECKPOINT_SUFFIXES)}:
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
    """Entry point of the hook: `python -m aockpt.hook pre-push <remote> <url>` with git's lines on stdin."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["pre-push"]:
        print("usage: python -m aockpt.hook pre-push <remote> <url>  (run by git)", file=sys.stderr)
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
