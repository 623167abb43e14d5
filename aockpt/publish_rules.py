"""What may be published, for `push` and the git pre-push hook alike (docs/hub.md).

Never a pickle (by extension or by zip/pickle magic), never a link leading outside the folder, never
safetensors that lack aockpt's record or fail ``verify``. Importing this module does not import torch:
the hook refuses pickles before paying for it.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Iterable, NamedTuple

from .errors import AockptError, CorruptCheckpointError, ForeignCheckpointError, UnsafeCheckpointError
from .filenames import PICKLE_SUFFIXES
from .paths import is_inside

CHECKPOINT_SUFFIXES = (".safetensors", ".safetensors.index.json")  # changing one re-verifies its folder

# File content that means "pickle inside", whatever the file is called: (magic test, reason).
_PICKLE_MAGIC: tuple[tuple[re.Pattern[bytes], str], ...] = (
    (re.compile(rb"^PK\x03\x04"), "a zip archive, the container torch.save writes its pickle into"),
    (re.compile(rb"^\x80[\x02-\x05]"), "a raw pickle stream (legacy torch.save or pickle.dump)"),
)
_HEAD_BYTES = 8


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
        elif name.endswith(CHECKPOINT_SUFFIXES):
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
    except ForeignCheckpointError as e:  # packed from another library's checkpoint by an older aockpt
        return [Problem(f"{shown}: {e}", ForeignCheckpointError)]
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
