"""The one containment rule for files a model folder names or holds: they must really live inside it.

A file is followed through its symlinks and must land inside the folder, or, for a Hugging Face cache
snapshot (``models--*/snapshots/<rev>``), inside the ``blobs`` folder of the same cached repo, where the
hub client puts the files its links point to. Anything else (a ``model.safetensors`` or ``config.json``
linked to ``~/.ssh/id_rsa``) is refused, so a cloned repo can never make aockpt read, pack or upload a
file from elsewhere. A file the user names directly on the command line is theirs to name.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CorruptCheckpointError


def file_homes(folder: Path) -> set[Path]:
    """Where a folder's files may really live: the folder itself, or, for a Hugging Face cache snapshot,
    the ``blobs`` folder of the same cached repo its links point into."""
    root = folder.resolve()
    homes = {root}
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        homes.add(root.parent.parent / "blobs")
    return homes


def is_inside(folder: Path, path: Path) -> bool:
    """Whether `path`, once every symlink is followed, lies inside `folder`'s homes (a link loop does not)."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11)
        return False
    return any(target.is_relative_to(home) for home in file_homes(folder))


def member(folder: Path, name: str) -> Path:
    """The path of a file the folder names (`name` is relative), refused if it leads outside the folder."""
    path = Path(folder) / name
    if not is_inside(Path(folder), path):
        raise CorruptCheckpointError(
            f"{path} points outside {folder} (or into a link loop); aockpt reads only files inside a model "
            "folder or its Hugging Face cache repo: copy the file into the folder instead of linking it"
        )
    return path
