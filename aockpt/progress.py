"""Progress bars on a terminal, silence in pipes and CI."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import click

T = TypeVar("T")


def enabled() -> bool:
    """Show bars only to a person: stderr is a terminal, not CI, not switched off."""
    return sys.stderr.isatty() and not os.environ.get("CI") and not os.environ.get("AOCKPT_NO_PROGRESS")


def track(items: Iterable[T], label: str, length: int | None = None) -> Iterator[T]:
    """Iterate with a bar on stderr when a person is watching."""
    if not enabled():
        yield from items
        return
    with click.progressbar(items, length=length, label=label, file=sys.stderr) as bar:
        yield from bar


@contextmanager
def bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar moved to a position (bytes done, say) by work the caller waits on; a no-op when nobody watches."""
    if not enabled():
        yield lambda _: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as b:
        yield lambda done: b.update(done - b.pos)
