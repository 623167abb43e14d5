"""The `aockpt` command: thin click commands over the library, one error table for all of them."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
from typing import TYPE_CHECKING

import click

from . import errors
from .cli_hub import CPU_PACKER, hook, push
from .cli_serving import export, print_verdicts

if TYPE_CHECKING:
    from . import api

class Terminated(BaseException):
    """SIGTERM, raised wherever the process is, so staged outputs are removed exactly as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


# Every exit status of the command, most specific first; the README's table is checked against this one.
EXIT_CODES: dict[type[BaseException], tuple[int, str]] = {
    errors.UsageError: (2, "bad argument or option (click's own usage errors exit 2 too)"),
    errors.UnsafeCheckpointError: (3, "the file asks to run or import something outside the allowlist"),
    errors.CorruptCheckpointError: (4, "malformed, truncated or changed file"),
    errors.KeyMismatchError: (4, "missing or unexpected tensor names"),
    errors.PortabilityError: (5, "a tensor cannot live or run on the requested device"),
    errors.UnsupportedTensorError: (6, "a tensor type or legacy layout aockpt has no codec for"),
    errors.HubError: (7, "the Hub refused the upload or could not be reached"),
    errors.OutputError: (8, "the output could not be written (disk full, permissions)"),
    errors.RemoteReadError: (9, "a remote checkpoint could not be read (unreachable, refused, or changed)"),
    errors.AockptError: (1, "any other error aockpt raises on purpose"),
    KeyboardInterrupt: (130, "interrupted (Ctrl-C); nothing was left at the destination"),
    Terminated: (143, "terminated (SIGTERM); nothing was left at the destination"),
    BrokenPipeError: (141, "stdout closed early (e.g. piped into `head -1`): output stops quietly"),
    Exception: (70, "internal error: a bug in aockpt (AOCKPT_DEBUG=1 shows the traceback)"),
}


class _Failure(click.ClickException):
    """A one-line error on stderr with a chosen exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _exit_code(exc: BaseException) -> int:
    """The exit status of the most specific row of EXIT_CODES that matches."""
    return next(code for cls, (code, _) in EXIT_CODES.items() if isinstance(exc, cls))


class _Group(click.Group):
    """Turns every error into one line: AockptError as itself, anything else as an internal error."""

    def invoke(self, ctx: click.Context):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except errors.AockptError as e:
            raise _Failure(str(e), _exit_code(e)) from e
        except (KeyboardInterrupt, Terminated) as e:
            word = "terminated" if isinstance(e, Terminated) else "interrupted"
            raise _Failure(f"{word}; nothing was left at the destination", _exit_code(e)) from None
        except Exception as e:
            if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is quiet too
                raise click.exceptions.Exit(_exit_code(e)) from None
            if os.environ.get("AOCKPT_DEBUG"):
                raise
            raise _Failure(errors.printable(f"internal error {type(e).__name__}: {errors.reason(e, 300)} (set "
                                            "AOCKPT_DEBUG=1 for the traceback and please report it)"),
                           _exit_code(e)) from e


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (a broken pipe from elsewhere is a real error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _say(text: str) -> None:
    """Print a line of human output whose names and strings come from a file, control characters escaped."""
    click.echo(errors.printable(text))


def _mb(n: int) -> str:
    """Bytes as MB with two decimals."""
    return f"{n / 1e6:,.2f} MB"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aockpt")
def main() -> None:
    """Safe, portable, bit-exact checkpoints for torchao-quantized models.

    \b
    aockpt pack model.pt packed/          # any torchao checkpoint -> safetensors folder
    aockpt inspect packed/ --device cpu   # what is inside, will it run on cpu?
    aockpt verify packed/                 # every byte matches its digest
    aockpt unpack packed/ model.pt        # back to a torch pickle state dict
    """


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--max-shard-size", default=None, metavar="SIZE",
              help='Largest shard, e.g. "5GB" or "500MB" (huggingface_hub rules). Default 5GB.')
@click.option("--device", default=None, metavar="DEV",
              help="Re-lay out device-pinned int4 exactly for DEV's kernel (cpu, cuda, xpu); nothing is re-quantized.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes writing shards in parallel; the output is byte-identical for any value.")
@CPU_PACKER
def pack(src: str, dst: str, force: bool, max_shard_size: str | None, device: str | None, workers: int,
         cpu_packer: str | None) -> None:
    """Convert SRC into a packed safetensors folder DST.

    SRC may be a torch pickle state dict (.pt/.bin, any torchao release), a Hugging Face model folder, or
    a torchao/aockpt safetensors checkpoint. Nothing in SRC is executed; DST appears only when complete.

    \b
    Example: aockpt pack llama-int8.pt llama-int8/
    Example: aockpt pack cuda-int4/ cpu-int4/ --device cpu
    Example: aockpt pack old-int4cpu.pt packed/ --cpu-packer cpu-avx2
    """
    from . import api  # here, not at the top: `aockpt --help` need not import torch

    api.pack(src, dst, force=force, max_shard_size=max_shard_size, device=device, workers=workers,
             cpu_packer=cpu_packer)
    info = api.inspect(dst)
    click.echo(f"packed {len(info.tensors)} tensors ({_mb(info.total_bytes)}) into {dst}")


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@CPU_PACKER
def unpack(src: str, dst: str, force: bool, cpu_packer: str | None) -> None:
    """Write SRC back as a torch pickle state dict.

    DST loads with torch.load(DST, weights_only=True) once torchao is imported, tensor subclasses included.
    A model folder unpacks into a folder DST (pytorch_model.bin plus config and the other files) unless
    DST ends in .pt/.bin/.pth.

    \b
    Example: aockpt unpack llama-int8/ llama-int8.pt
    Example: aockpt unpack llama-int8/ llama-int8-pickle/
    """
    from . import api

    api.unpack(src, dst, force=force, cpu_packer=cpu_packer)
    click.echo(f"unpacked {src} into {dst}")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--device", "devices", multiple=True, metavar="DEV",
              help="Also say, per tensor, whether it loads and runs on DEV (repeatable): cpu, cuda, xpu.")
@click.option("--serving", is_flag=True, help="Say per tensor what `aockpt export --format compressed-tensors` does "
              "(exact / lossy with its error / refused) and what vLLM's torchao path does (reads every tensor).")
@CPU_PACKER
def inspect(path: str, as_json: bool, devices: tuple[str, ...], serving: bool, cpu_packer: str | None) -> None:
    """Show what a checkpoint holds: per tensor type, shape, dtype, bytes, origin and portability.

    \b
    Example: aockpt inspect llama-int4/ --device cpu
    Example: aockpt inspect llama-int4/ --serving
    """
    from . import api

    if serving:
        return print_verdicts(path, cpu_packer, as_json)

    info = api.inspect(path, devices=devices, cpu_packer=cpu_packer)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2))
        return
    _say(f"{info.path}: {info.kind}" + (f", producer {info.producer}" if info.producer else ""))
    header = ["name", "type", "shape", "dtype", "bytes", "made on", "portability", "tp split", *devices]
    rows = [[errors.printable(c) for c in (
             t.name if not t.alias_of else f"{t.name} -> {t.alias_of}", t.type, "x".join(map(str, t.shape)),
             t.dtype, str(t.nbytes), t.device, t.portability + _packer_text(t), t.tp,
             *(t.devices[d].text() for d in devices))] for t in info.tensors]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _say("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for t in info.tensors:
        if t.origin:
            _say(f"  {t.name}: {t.origin}")
    unknown = [t.name for t in info.tensors if t.packer_candidates and not t.alias_of]
    if unknown:
        click.echo(f"CPU packer unknown for {len(unknown)} int4 tensor(s): the file does not say and nothing in it "
                   "decides; pass --cpu-packer (cpu-avx512, cpu-avx2, cpu-default, or native if made on this machine)")
    share = info.total_bytes / info.bf16_bytes if info.bf16_bytes else 1.0
    click.echo(f"total: {len(info.tensors)} tensors, {_mb(info.total_bytes)} stored, "
               f"{_mb(info.bf16_bytes)} as bf16 ({share:.2f}x the bf16 size)")
    if info.stock is not None:
        _say(f"stock from_pretrained: {info.stock.verdict} ({info.stock.reason})")
    elif info.not_stock_loadable:
        click.echo(f"stock transformers + torchao: cannot read {', '.join(info.not_stock_loadable)}")
    if info.not_unpackable:
        click.echo(f"aockpt unpack: refuses ({', '.join(info.not_unpackable)}: torch.load(weights_only=True) "
                   "cannot read them)")


def _packer_text(t: api.TensorInfo) -> str:
    """The packer column suffix: the packer, or the candidates where it is unknown."""
    if t.packer_candidates:
        return f" (packer unknown: {' | '.join(t.packer_candidates)})"
    return f" ({t.packer})" if t.packer else ""


@main.command()
@click.argument("path", type=click.Path())
def verify(path: str) -> None:
    """Check a packed checkpoint's structure and every tensor's digest.

    Exits non-zero naming each tensor whose bytes changed since it was packed.

    \b
    Example: aockpt verify llama-int8/
    """
    from . import api

    report = api.verify(path)
    click.echo(f"ok: {report.tensors} tensors, {_mb(report.bytes)} verified in {path}")


main.add_command(push)
main.add_command(hook)
main.add_command(export)

if __name__ == "__main__":
    sys.exit(main())
