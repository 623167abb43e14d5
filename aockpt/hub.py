"""Publishing to the Hugging Face Hub: the model card and the upload, under aockpt's publish_rules.

``push`` packs an unpacked input into a temporary folder first, refuses what publish_rules refuses, writes
the model card, and makes one atomic Hub commit. The git pre-push hook applying the same rules lives in
aockpt/hook.py.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import HubError, UnsafeCheckpointError, UsageError
from .hub_files import progress_bars, transport_errors
from .paths import member
from .publish_rules import find_problems, publishable_files

PathLike = str | os.PathLike
CARD_NAME = "README.md"
CARD_TAGS = ("aockpt", "torchao")
SECTION_BEGIN = "<!-- aockpt:begin (written by `aockpt push`; edits between these markers are replaced) -->"
SECTION_END = "<!-- aockpt:end -->"
CARD_DEVICES = ("cpu", "cuda")
_MAX_CARD_BYTES = 16 * 1024 * 1024  # the card is read whole and rewritten
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


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
        fates = [t.devices[device] for t in info.tensors if t.alias_of is None]
        runs, loads = sum(v.runs for v in fates), sum(v.loads and not v.runs for v in fates)
        lines.append(f"| {device} | {runs} | {loads} | {sum(not v.loads for v in fates)} |")
    lines += ["", "Load with stock transformers (needs torchao installed):", "", "```python",
              "from transformers import AutoModelForCausalLM", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", "",
              "or with aockpt (`pip install aockpt`), which refuses a tensor the device cannot hold before "
              "reading any, and with `verify=True` checks every tensor's sha256 digest:", "", "```python",
              "import aockpt", "",
              f'model = aockpt.load_pretrained("{repo_id}", device="cpu", verify=True)', "```", "",
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
        with progress_bars(progress):
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

    transport = transport_errors()
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


def _root_cause(exc: BaseException, wanted: tuple[type, ...]) -> BaseException:
    """The first exception of a wanted type along the cause chain, else the innermost one."""
    seen = exc
    while not isinstance(seen, wanted) and (seen.__cause__ or seen.__context__) is not None:
        seen = seen.__cause__ or seen.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


if __name__ == "__main__":  # hooks installed by aockpt 0.1 run `python -m aockpt.hub pre-push`
    from .hook import main

    sys.exit(main())
