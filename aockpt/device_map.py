"""Spreading a model over several devices with accelerate's ``device_map`` conventions, without accelerate.

A map sends module names (prefixes of tensor names, ``""`` for the whole model) to devices: an int is
that CUDA device, otherwise anything ``torch.device`` reads. "auto"/"balanced" split the model's layers
evenly over the visible GPUs, "sequential" fills each GPU before the next; both stay under each GPU's
free memory and never split a module the model lists in ``_no_split_modules``. Each mapped module gets a
forward pre-hook that moves its inputs to its device, so activations follow the layers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map_only

from .errors import UsageError
from .portability import parse_device

STRATEGIES = ("auto", "balanced", "sequential")
HEADROOM = 0.9  # of a GPU's free memory, left for activations and the allocator's rounding


def resolve(device_map: str | dict[str, Any], model: torch.nn.Module, sizes: dict[str, int],
            tied: dict[str, str]) -> dict[str, torch.device]:
    """A user's device_map as module name -> device; strategies are computed from stored tensor sizes."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        free = [int(HEADROOM * torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]
        return _spread(model, sizes, tied, free, sequential=device_map == "sequential")
    if not isinstance(device_map, dict):
        device_map = {"": device_map}
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()} | \
        {n for n, _ in model.named_buffers()}
    unknown = [k for k in device_map if not isinstance(k, str) or k not in names]
    if unknown:
        raise UsageError(f"device_map names {', '.join(map(repr, unknown[:5]))}, which the model has no module or "
                         "parameter of; use names from model.named_modules() (\"\" for the whole model)")
    return {k: _device(v, k) for k, v in device_map.items()}


def _device(value: Any, key: str) -> torch.device:
    """One device_map value as a device this machine has; accelerate's "disk" offload is not something aockpt does."""
    if isinstance(value, str) and value == "disk":
        raise UsageError('device_map value "disk" is not supported by aockpt; map those modules to "cpu" or a GPU')
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise UsageError(f"device_map sends {key!r} to {value!r}, which is not a device; use a GPU index "
                         "(0, 1, ...), \"cpu\" or \"cuda:1\"")
    device = torch.device("cuda", min(value, 127)) if isinstance(value, int) else parse_device(value)
    asked = value if isinstance(value, int) else _index_in(value, device)
    if device.index is not None and asked != device.index:  # torch keeps indexes in 8 bits: 999 became -25
        raise UsageError(f"device_map sends {key!r} to {device.type}:{asked}, which is not a device; use an index "
                         "of a device this machine has")
    return device  # whether this machine has it is checked where the load is planned (aockpt.load)


def _index_in(value: Any, device: torch.device) -> int | None:
    """The device index a value asks for, as written (torch stores indexes in 8 bits)."""
    text = str(value) if isinstance(value, str) else ""
    written = text.partition(":")[2]
    return int(written) if written.isdigit() else device.index


def device_of(name: str, mapping: dict[str, torch.device]) -> torch.device:
    """The device of the longest module name in `mapping` that `name` lies inside."""
    for prefix in _prefixes(name):
        if prefix in mapping:
            return mapping[prefix]
    raise UsageError(f"device_map places no module holding {name}; add it (or \"\" for everything else)")


def _prefixes(name: str) -> list[str]:
    """"a.b.c" -> ["a.b.c", "a.b", "a", ""]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]


def units(model: torch.nn.Module) -> list[str]:
    """Modules kept whole on one device, in model order: each module of a `_no_split_modules` class, and
    outside those each module holding parameters or buffers of its own."""
    whole = set(getattr(model, "_no_split_modules", None) or ())
    out: list[str] = []
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and (name + ".").startswith(inside + "."):
            continue
        inside = None
        if type(module).__name__ in whole:
            out.append(name)
            inside = name
        elif module._parameters or module._buffers:
            out.append(name)
    return out


def _spread(model: torch.nn.Module, sizes: dict[str, int], tied: dict[str, str], free: list[int], *,
            sequential: bool) -> dict[str, torch.device]:
    """Units over the GPUs in order (`free` bytes each), each GPU up to its share (balanced) or its free
    memory (sequential); what fits on none goes to the CPU; a unit holding a tied name follows its tie."""
    gpus = len(free)
    if gpus == 0:
        return {"": torch.device("cpu")}
    owned = {u: [n for n in sizes if (n + ".").startswith(u + ".") or u == ""] for u in units(model)}
    need = {u: sum(sizes[n] for n in names if n not in tied) for u, names in owned.items()}
    share = float("inf") if sequential else sum(need.values()) / gpus
    mapping: dict[str, torch.device] = {}
    placed: dict[str, torch.device] = {}
    gpu, used = 0, 0
    for unit, names in owned.items():
        follow = next((placed[tied[n]] for n in names if tied.get(n) in placed), None)
        if follow is None:
            while gpu < gpus and used and (used + need[unit] > free[gpu]
                                           or (gpu < gpus - 1 and used + need[unit] / 2 > share)):
                gpu, used = gpu + 1, 0
            follow = torch.device("cuda", gpu) if gpu < gpus and need[unit] <= free[gpu] else torch.device("cpu")
            used += need[unit] if follow.type == "cuda" else 0
        mapping[unit] = follow
        placed.update(dict.fromkeys(names, follow))
    return mapping


def dispatch(model: torch.nn.Module, mapping: dict[str, torch.device]) -> None:
    """Move each mapped module's inputs to where its weights are (its first parameter, else its map entry)."""
    for name, device in mapping.items():
        if name == "":
            continue
        owner, _, leaf = name.rpartition(".")
        is_module = name in dict(model.named_modules())
        module = model.get_submodule(name if is_module else owner)  # a parameter's entry hooks its module
        first = next(module.parameters(), None) if is_module else getattr(module, leaf)
        target = first.device if first is not None else device
        module.register_forward_pre_hook(_mover(target), with_kwargs=True)


def _mover(device: torch.device) -> Callable[[torch.nn.Module, tuple, dict], tuple[tuple, dict]]:
    """A pre-hook moving every tensor in a call's arguments to `device`."""
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tree_map_only(torch.Tensor, lambda t: t.to(device, non_blocking=True), (args, kwargs))
    return hook
