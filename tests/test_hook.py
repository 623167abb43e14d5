"""`aockpt hook install` in real git clones: a user's pre-push hook is never destroyed, followed or copied;
it is moved aside with --force and runs first, with the same arguments and stdin git gave."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from aockpt import hook  # noqa: E402
from aockpt.cli import main  # noqa: E402
from test_hub import _git  # noqa: E402

# A user's own hook: logs its arguments and stdin beside itself, and says no when told to.
USER_HOOK = ('#!/bin/sh\necho "args: $*" >> "$(dirname "$0")/../user-hook.log"\n'
             'cat >> "$(dirname "$0")/../user-hook.log"\n[ ! -e "$(dirname "$0")/../user-says-no" ]\n')


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A clone of an empty bare remote, with no hook installed."""
    _git(tmp_path, "init", "--bare", "-b", "main", str(tmp_path / "remote.git"))
    _git(tmp_path, "clone", str(tmp_path / "remote.git"), str(tmp_path / "work"))
    return tmp_path / "work"


def install(work: Path, *flags: str) -> tuple[int, str]:
    """Run `aockpt hook install` through the CLI; returns (exit code, output)."""
    result = CliRunner().invoke(main, ["hook", "install", str(work), *flags])
    return result.exit_code, result.output


def push(work: Path, name: str, content: bytes) -> tuple[int, str]:
    """Commit one file on a new branch and push it; returns (git's exit code, its stderr)."""
    (work / name).write_bytes(content)
    _git(work, "add", name)
    _git(work, "commit", "-q", "-m", name)
    done = _git(work, "push", "origin", f"HEAD:{name.replace('.', '-')}", check=False)
    return done.returncode, done.stderr


def hooks(work: Path) -> Path:
    return work / ".git" / "hooks"


def _make_user_hook(work: Path, kind: str, outside: Path) -> None:
    """Put the user's pre-push in place: a file, a link to a file outside the clone, a dangling link, a FIFO."""
    target = hooks(work) / "pre-push"
    if kind == "file":
        target.write_text(USER_HOOK)
        target.chmod(0o755)
    elif kind == "link":
        outside.write_text(USER_HOOK)
        outside.chmod(0o755)
        target.symlink_to(outside)
    elif kind == "dangling link":
        target.symlink_to(outside)
    else:
        os.mkfifo(target)


@pytest.mark.parametrize("kind", ["file", "link", "dangling link", "fifo"])
def test_a_users_hook_is_moved_as_it_is_and_never_followed(work, tmp_path, kind):
    outside = tmp_path / "outside" / "hook"
    outside.parent.mkdir()
    _make_user_hook(work, kind, outside)
    entry = hooks(work) / "pre-push"
    before = entry.lstat()
    code, output = install(work)
    assert code == 2 and "pass --force" in output and len(output.strip().splitlines()) == 1
    assert entry.lstat().st_ino == before.st_ino

    code, output = install(work, "--force")
    assert code == 0, output
    chained = hooks(work) / hook.CHAINED
    moved = chained.lstat()
    assert moved.st_ino == before.st_ino and stat.S_IFMT(moved.st_mode) == stat.S_IFMT(before.st_mode)
    assert hook.HOOK_MARKER in entry.read_text() and not entry.is_symlink() and os.access(entry, os.X_OK)
    assert sorted(p.name for p in outside.parent.iterdir()) == (["hook"] if kind == "link" else [])
    if kind == "link":
        assert os.readlink(chained) == str(outside) and outside.read_text() == USER_HOOK


def test_the_chained_hook_runs_first_with_gits_arguments_and_input(work):
    _make_user_hook(work, "file", Path())
    assert install(work, "--force")[0] == 0
    code, err = push(work, "notes.txt", b"hello\n")
    assert code == 0, err
    log = (work / ".git" / "user-hook.log").read_text().splitlines()
    sha = _git(work, "rev-parse", "HEAD").stdout.strip()
    assert log == [f"args: origin {work.parent / 'remote.git'}", f"HEAD {sha} refs/heads/notes-txt {'0' * 40}"]

    code, err = push(work, "model.pt", b"not even a pickle")  # aockpt still refuses after the user's hook ran
    assert code != 0 and "model.pt: .pt is a torch pickle extension" in err
    assert len((work / ".git" / "user-hook.log").read_text().splitlines()) == 4

    (work / ".git" / "user-says-no").touch()  # the user's hook refusing refuses the push
    code, _ = push(work, "more.txt", b"x")
    assert code != 0 and _git(work.parent / "remote.git", "branch", "--list", "more-txt").stdout == ""


def test_reinstalling_never_overwrites_a_kept_hook(work):
    _make_user_hook(work, "file", Path())
    assert install(work, "--force")[0] == 0
    chained = hooks(work) / hook.CHAINED
    assert install(work, "--force")[0] == 0 and install(work)[0] == 0  # over aockpt's own hook: no change to it
    assert chained.read_text() == USER_HOOK

    (hooks(work) / "pre-push").write_text("#!/bin/sh\necho another tool's hook\n")  # e.g. a hook manager
    code, output = install(work, "--force")
    assert code == 2 and "already holds an earlier hook" in output and len(output.strip().splitlines()) == 1
    assert chained.read_text() == USER_HOOK
    assert (hooks(work) / "pre-push").read_text() == "#!/bin/sh\necho another tool's hook\n"


def test_aockpts_hook_edited_by_hand_is_kept(work):
    assert install(work)[0] == 0
    entry = hooks(work) / "pre-push"
    edited = entry.read_text().replace("#!/bin/sh\n", "#!/bin/sh\necho my own check\n")
    entry.write_text(edited)
    code, output = install(work)
    assert code == 2 and "edited by hand" in output and entry.read_text() == edited
    assert install(work, "--force")[0] == 0
    assert (hooks(work) / hook.CHAINED).read_text() == edited and entry.read_text() != edited


@pytest.mark.parametrize("module", ["hook", "hub"])
def test_hooks_written_by_earlier_releases_are_replaced_without_force(work, module):
    old = hook.TEMPLATES[1].replace("@PATH@", "'/opt/my env/lib'").replace("@PYTHON@", "/usr/bin/python3")
    (hooks(work) / "pre-push").write_text(old.replace("@MODULE@", module))
    assert install(work)[0] == 0
    assert not (hooks(work) / hook.CHAINED).exists() and sys.executable in (hooks(work) / "pre-push").read_text()


def test_a_folder_named_pre_push_is_a_usage_error(work):
    folder = hooks(work) / "pre-push"
    folder.mkdir()
    (folder / "mine").write_text("x")
    for flags in ((), ("--force",)):
        code, output = install(work, *flags)
        assert code == 2 and "is a folder, not a hook" in output and len(output.strip().splitlines()) == 1
    assert (folder / "mine").read_text() == "x" and not (hooks(work) / hook.CHAINED).exists()
