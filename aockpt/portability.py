"""Where a tensor's bytes can live and where a kernel can run it, decided from the registry table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from . import relayout
from .codec import FlatTensor
from .errors import PortabilityError, UsageError
from .registry import Device, Portability, TensorType, relayout_target
from .relayout import cpu

DEVICE_TYPES = tuple(d.value for d in Device)


class TensorKind(NamedTuple):
    """What a stored tensor is: its registry row and the packer that wrote it (None: unknown or none)."""

    row: TensorType
    packer: str | None


def parse_device(device: str | torch.device) -> torch.device:
    """A torch.device from user input, with one clear error for a typo."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"{device!r} is not a device; use cpu, cuda, cuda:1, xpu, ...") from e
    if parsed.type not in DEVICE_TYPES:
        raise UsageError(f"device type {parsed.type!r} is not supported; use one of {', '.join(DEVICE_TYPES)}")
    return parsed


def packer_here(row: TensorType) -> str | None:
    """The packer this process's kernel for a pinned type writes and reads (None for a portable type)."""
    return row.packer_here() if row.packer_here is not None else None


def _pinned_to_cpu(row: TensorType) -> bool:
    """Whether a type's bytes are in a CPU packing, which depends on the ISA of the machine that packed them."""
    return row.portability is Portability.PINNED and row.packed_for is Device.CPU


def settle_packers(types: dict[str, TensorKind], rows: Callable[[str], int | None], choice: str | None,
                   where: str) -> dict[str, TensorKind]:
    """Fill in the CPU int4 packer a file does not record: the user's `cpu_packer=` choice, else proof from
    the shape (`cpu.packings_agree`); where neither decides it stays None (unknown), never guessed."""
    stated = cpu.chosen_packer(choice)
    agreed = cpu.cpu_packer() if cpu.cpu_packer() in cpu.PACKINGS else next(iter(cpu.PACKINGS))
    settled = {}
    for name, (row, packer) in types.items():
        if _pinned_to_cpu(row):
            if packer is not None and stated is not None and packer != stated:
                raise UsageError(f"{where}: {name} records that {packer} packed it, but cpu_packer={choice!r} says "
                                 f"{stated}; drop cpu_packer (the file's record is used)")
            if packer is None:
                packer = stated or (agreed if _agree(rows(name)) else None)
        settled[name] = TensorKind(row, packer)
    return settled


def _agree(n: int | None) -> bool:
    """Whether an N-row CPU int4 weight reads the same under every packer (False where N is unknown)."""
    return n is not None and cpu.packings_agree(n)


def packer_candidates(row: TensorType, packer: str | None) -> list[str]:
    """The packers that may have written a CPU int4 tensor whose packer is unknown; [] where it is known."""
    return list(cpu.PACKINGS) if packer is None and _pinned_to_cpu(row) else []


_CHOOSE = (f"state it with cpu_packer= (CLI: --cpu-packer): {', '.join(cpu.PACKINGS)}, or {cpu.NATIVE} "
           "if the file was made on this machine")


def require_known_packers(types: dict[str, TensorKind], where: str) -> None:
    """Refuse CPU int4 tensors whose packer is unknown: read with the wrong one, their rows come out permuted."""
    unknown = [name for name, (row, packer) in types.items() if packer_candidates(row, packer)]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise PortabilityError(
            f"{where}: {len(unknown)} int4 tensor(s) do not record which CPU packer wrote them "
            f"({', '.join(unknown[:5])}{more}); {', '.join(cpu.PACKINGS)} lay them out differently and nothing "
            f"in the file tells which, so a wrong guess would permute the weights; {_CHOOSE} "
            f"(this machine's is {cpu.cpu_packer()})"
        )


@dataclass(frozen=True)
class Verdict:
    """Can a tensor's bytes live on a device, and can a kernel there run it."""

    loads: bool
    runs: bool
    reason: str

    def text(self) -> str:
        """One word and the reason, as `inspect` prints it (CLI table and --json)."""
        return f"{'runs' if self.runs else 'loads' if self.loads else 'no'}: {self.reason}"


def verdict(entry: TensorType, packer: str | None, device_type: str) -> Verdict:
    """Decide one tensor's fate on one device type."""
    runs = device_type in entry.kernels
    if entry.portability is Portability.PORTABLE:
        kernel = "" if runs else f"; no {device_type} kernel in torchao 0.18 (data only)"
        return Verdict(True, runs, f"portable{kernel}")
    if packer_candidates(entry, packer):
        return Verdict(False, False, f"CPU packer unknown ({' | '.join(cpu.PACKINGS)}): state it with "
                                     "cpu_packer= (CLI: --cpu-packer)")
    if entry.packed_for == device_type:
        expected = packer_here(entry)
        if packer != expected:
            return Verdict(False, False, f"{entry.note}, packed by {packer} but this machine's {device_type} "
                                         f"kernel reads the {expected} packing")
        return Verdict(True, runs, f"packed for {device_type} ({packer})")
    return Verdict(False, False, f"{entry.note}, packed for {entry.packed_for.value} ({packer})")


Converter = Callable[[FlatTensor, torch.device], tuple[FlatTensor, str]]


def _converter(entry: TensorType, packer: str | None, device_type: str) -> Converter | None:
    """An exact re-layout of a pinned int4 tensor into `device_type`'s layout, or None where none exists.

    The converter takes the device to build the new parts on (the target itself when loading, the CPU
    when packing for a device this machine lacks) and returns the new flat tensor and its packer.
    """
    target = relayout_target(device_type)
    if packer is None or entry.relayout is None or target is None:
        return None

    def convert(flat: FlatTensor, build_on: torch.device) -> tuple[FlatTensor, str]:
        parts, attrs, new_packer = relayout.relayout(entry.relayout, target.relayout, flat.parts, flat.attrs,
                                                     packer=packer, build_on=build_on)
        return FlatTensor(target, flat.shape, flat.dtype, parts, attrs), new_packer

    return convert


def plan_loading(types: dict[str, TensorKind], device: torch.device, *,
                 relayout: bool) -> dict[str, Converter]:
    """Check every tensor before any is built: converters for those that need a re-layout, or one error."""
    stuck = {}
    converters: dict[str, Converter] = {}
    for name, (row, packer) in types.items():
        v = verdict(row, packer, device.type)
        if v.loads:
            continue
        conv = _converter(row, packer, device.type) if relayout else None
        if conv is None:
            stuck[name] = (row.name, v.reason)
        else:
            converters[name] = conv
    if stuck:
        raise PortabilityError(_offenders_message(stuck, device.type, relayout))
    return converters


def _offenders_message(stuck: dict[str, tuple[str, str]], device_type: str, relayout: bool) -> str:
    """One line naming every tensor that cannot live on the device, and the remedy."""
    shown = "; ".join(f"{name} is {t} ({reason})" for name, (t, reason) in list(stuck.items())[:5])
    more = f"; and {len(stuck) - 5} more" if len(stuck) > 5 else ""
    remedy = (f"no exact re-layout to {device_type} exists for them: load them on the device they were packed for"
              if relayout else
              f"pass relayout=True to re-pack them exactly for {device_type} while loading, or re-pack the "
              f"checkpoint once with `aockpt pack SRC DST --device {device_type}`")
    return f"{len(stuck)} tensor(s) cannot load on {device_type}: {shown}{more}; {remedy}"
