"""The README's table of supported tensor types, rendered from the registry (`python -m aockpt.type_table`)."""

from __future__ import annotations

from .registry import TENSOR_TYPES, Portability, TensorType

_HEADER = ("| type | family | portability | kernels (torchao 0.18) | stock transformers reads it | what it is "
           "| tp split |\n|---|---|---|---|---|---|---|")


def _row(t: TensorType) -> str:
    """One type's line: its registry facts, formatted."""
    lives = "portable" if t.portability is Portability.PORTABLE else f"pinned to {t.packed_for.value}"
    cells = (t.name, t.family.value, lives, ", ".join(sorted(t.kernels)), "yes" if t.stock_loadable else "no",
             t.note, t.tp_text())
    return f"| {' | '.join(cells)} |"


def markdown() -> str:
    """The whole table, one line per registry row, in table order."""
    return "\n".join([_HEADER, *(_row(t) for t in TENSOR_TYPES.values())])


if __name__ == "__main__":
    print(markdown())
