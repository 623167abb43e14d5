"""`aockpt export` and the serving verdicts `aockpt inspect --serving` prints: thin commands over ct_export."""

from __future__ import annotations

import click

from . import errors
from .cli_hub import CPU_PACKER


def _error_text(error: float | None) -> str:
    """A stated max error, or nothing."""
    return "" if error is None else f"max error {error:.6g}"


def print_verdicts(path: str, cpu_packer: str | None, as_json: bool = False) -> None:
    """Per tensor: what `aockpt export --format compressed-tensors` does, and what vLLM's torchao path does."""
    import json
    from dataclasses import asdict

    from .ct_export import serving_verdicts

    verdicts = serving_verdicts(path, lossy=True, cpu_packer=cpu_packer)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in asdict(x).items() if k != "codes"} for x in verdicts], indent=2))
        return
    header = ["name", "export to compressed-tensors", "as", "vLLM torchao path"]
    rows = []
    for v in verdicts:
        said = {"refused": f"refused: {v.reason}", "lossy": f"lossy with --lossy, {_error_text(v.error)} ({v.reason})"
                }.get(v.verdict, v.verdict)
        rows.append([errors.printable(c) for c in (v.name, said, v.target, v.vllm)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    lossy = [v.name for v in verdicts if v.verdict == "lossy"]
    if lossy:
        click.echo(f"{len(lossy)} tensor(s) have no exact compressed-tensors counterpart: `aockpt export` refuses "
                   "them unless --lossy, which writes what is shown with the stated error")


@click.command("export")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--format", "fmt", default="compressed-tensors", show_default=True,
              type=click.Choice(["compressed-tensors"]), help="The serving format to write.")
@click.option("--lossy", is_flag=True,
              help="Re-quantize tensors that have no exact counterpart instead of refusing; states each one's error.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@CPU_PACKER
def export(src: str, dst: str, fmt: str, lossy: bool, force: bool, cpu_packer: str | None) -> None:
    """Write SRC as a compressed-tensors model folder DST (what vLLM and SGLang serve natively).

    Every quantized weight is written exactly (compressed-tensors' decompression equals torchao's
    dequantize() bit for bit) or refused naming the tensor and why; --lossy re-quantizes those instead
    and prints each one's measured max error. `aockpt inspect SRC --serving` shows the plan first.

    \b
    Example: aockpt export llama-int8/ llama-int8-ct/ --format compressed-tensors
    Example: aockpt export llama-int4/ llama-w4a16/ --lossy
    """
    from .ct_export import export as run

    report = run(src, dst, format=fmt, lossy=lossy, force=force, cpu_packer=cpu_packer)
    counts: dict[str, int] = {}
    for v in report.tensors:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
        if v.verdict == "lossy":
            click.echo(errors.printable(f"lossy: {v.name} -> {v.target}, {_error_text(v.error)} ({v.reason})"))
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    click.echo(f"exported {len(report.tensors)} tensors ({summary}) to {dst} as {fmt}")
