"""Hostile checkpoint files, built at test time from hand-written pickle opcodes and containers.

``HOSTILE`` lists (id, builder); ``builder(dir)`` writes one file into ``dir`` and returns its path.
Convention: every payload, if it ran, would create ``dir / CANARY`` or delete ``dir / VICTIM``;
``untouched(dir)`` says neither happened. Loading any of these must raise an AockptError.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torchao.quantization import MappingType

CANARY = "CANARY"
VICTIM = "VICTIM"
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
_FLOAT = ("torch", "FloatStorage")

Builder = Callable[[Path], Path]


# ---- pickle opcodes (protocol 2 unless stated) ----
def g(module: str, name: str) -> bytes:
    """GLOBAL: push module.name."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    """BINUNICODE string."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def i(n: int) -> bytes:
    """BININT (signed 32-bit)."""
    return b"J" + struct.pack("<i", n)


def long1(n: int) -> bytes:
    """LONG1: an int of any size."""
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def t(*items: bytes) -> bytes:
    """MARK items TUPLE."""
    return b"(" + b"".join(items) + b"t"


def d(*pairs: tuple[bytes, bytes]) -> bytes:
    """EMPTY_DICT MARK k v ... SETITEMS."""
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def call(func: bytes, *args: bytes) -> bytes:
    """func(*args) via REDUCE."""
    return func + t(*args) + b"R"


def newobj(cls: bytes, *args: bytes) -> bytes:
    """cls.__new__(cls, *args) via NEWOBJ."""
    return cls + t(*args) + b"\x81"


def program(body: bytes, proto: int = 2) -> bytes:
    """A whole pickle: PROTO, body, STOP."""
    return b"\x80" + bytes([proto]) + body + b"."


def storage(key: str, numel: int, location: str = "cpu", *, legacy: bool = False) -> bytes:
    """BINPERSID of a float storage record, in the zip (4 fields) or legacy (5 fields) form."""
    return t(s("storage"), g(*_FLOAT), s(key), s(location), i(numel), *([b"N"] if legacy else [])) + b"Q"


def tensor(key: str, numel: int, size: int, *, offset: int = 0, location: str = "cpu", legacy: bool = False,
           stride: int = 1) -> bytes:
    """A 1-d float tensor via torch._utils._rebuild_tensor_v2 over one storage."""
    return call(
        g("torch._utils", "_rebuild_tensor_v2"),
        storage(key, numel, location, legacy=legacy), i(offset), t(i(size)), t(i(stride)), b"\x89",
        call(g("collections", "OrderedDict")),
    )


def state_dict(tensor_pickle: bytes) -> bytes:
    """{"w": <tensor>} as a whole pickle."""
    return program(d((s("w"), tensor_pickle)))


# ---- containers ----
def zip_bytes(pkl: bytes, records: dict[str, bytes] | None = None, *, root: str = "archive",
              extra: list[tuple[str, bytes]] = (), compression: int = zipfile.ZIP_STORED) -> bytes:
    """A torch.save-style zip: root/data.pkl, byteorder, version, data/<key> records, extra members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        zf.writestr(f"{root}/data.pkl", pkl)
        zf.writestr(f"{root}/byteorder", b"little")
        zf.writestr(f"{root}/version", b"3\n")
        for key, data in (records or {}).items():
            zf.writestr(f"{root}/data/{key}", data)
        for name, data in extra:
            zf.writestr(name, data)
    return buf.getvalue()


def legacy_bytes(pkl: bytes, storages: dict[str, tuple[int, bytes]] | None = None) -> bytes:
    """A legacy (_use_new_zipfile_serialization=False) file: header pickles, pickle, keys, storages."""
    storages = storages or {}
    sys_info = {"protocol_version": _LEGACY_PROTOCOL, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = b"".join(pickle.dumps(x, protocol=2) for x in (_LEGACY_MAGIC, _LEGACY_PROTOCOL, sys_info))
    body = b"".join(struct.pack("<q", numel) + data for numel, data in storages.values())
    return head + pkl + pickle.dumps(list(storages), protocol=2) + body


def floats(*values: float) -> bytes:
    """Little-endian float32 bytes."""
    return struct.pack(f"<{len(values)}f", *values)


# ---- payloads: each a function of the target dir returning pickle bytes ----
def _cmd(dir: Path) -> str:
    return f"touch {dir / CANARY}"


def _py(dir: Path) -> str:
    return f"open({str(dir / CANARY)!r}, 'w').close()"


def _reexport(dir: Path) -> bytes:
    """torchao re-exports the os module: push it first, then getattr(it, 'system')(cmd)."""
    return g("torchao", "os") + b"q\x00" + call(call(g("builtins", "getattr"), b"h\x00", s("system")), s(_cmd(dir)))


def _memo_bomb(dir: Path, levels: int = 30, width: int = 10) -> bytes:
    """Each list holds `width` references to the previous one: width**levels nodes as a tree."""
    body = b"]q\x00"
    for level in range(1, levels + 1):
        body += b"](" + (b"h" + bytes([level - 1])) * width + b"eq" + bytes([level])
    return program(body)


_PAYLOADS: dict[str, Callable[[Path], bytes]] = {
    "os_system": lambda p: program(call(g("os", "system"), s(_cmd(p)))),
    "posix_system": lambda p: program(call(g("posix", "system"), s(_cmd(p)))),
    "builtins_eval": lambda p: program(call(g("builtins", "eval"), s(_py(p)))),
    "builtins_exec": lambda p: program(call(g("builtins", "exec"), s(_py(p)))),
    "builtins_getattr": lambda p: program(
        call(call(g("builtins", "getattr"), call(g("builtins", "__import__"), s("os")), s("system")), s(_cmd(p)))),
    "builtins_import": lambda p: program(
        call(g("builtins", "__import__"), s("os")) + b"q\x00"
        + call(call(g("builtins", "getattr"), b"h\x00", s("system")), s(_cmd(p)))),
    "subprocess_popen": lambda p: program(
        call(g("subprocess", "Popen"), b"](" + s("touch") + s(str(p / CANARY)) + b"e")),
    "runpy_run_code": lambda p: program(call(g("runpy", "_run_code"), s(_py(p)), b"}")),
    "shutil_rmtree": lambda p: program(call(g("shutil", "rmtree"), s(str(p / VICTIM)))),
    "webbrowser_open": lambda p: program(call(g("webbrowser", "open"), s(f"file://{p / CANARY}"))),
    "nested_torch_load": lambda p: program(call(g("torch", "load"), s(str(_inner_os_system(p))))),
    "nested_serialization_load": lambda p: program(
        call(g("torch.serialization", "load"), s(str(_inner_os_system(p))))),
    "dotted_global": lambda p: program(call(g("torch", "serialization.os.system"), s(_cmd(p)))),
    "stack_global_proto4": lambda p: program(
        call(s("torch") + s("serialization.os.system") + b"\x93", s(_cmd(p))), proto=4),
    "dotted_from_allowed_class": lambda p: program(
        call(g("torchao.quantization", "Int8Tensor.__init__.__globals__"), s(_cmd(p)))),
    "torchao_reexported_os": lambda p: program(_reexport(p)),
    "torchao_dotted_os": lambda p: program(call(g("torchao", "os.system"), s(_cmd(p)))),
    "lookalike_torch_underscore": lambda p: program(call(g("torch_", "load"), s(_cmd(p)))),
    "lookalike_space_in_module": lambda p: program(
        newobj(g("torchao .quantization", "Int8Tensor")) + call(g("os", "system"), s(_cmd(p)))),
    "lookalike_trailing_space": lambda p: program(newobj(g("torchao.quantization", "Int8Tensor "))),
    "lookalike_homoglyph": lambda p: program(call(g("t\u043erch._utils", "_rebuild_tensor_v2"), s(_cmd(p)))),
    "build_setstate_os_system": lambda p: program(
        newobj(g("torchao.quantization.granularity", "PerRow"))
        + d((s("__setstate__"), g("os", "system"))) + b"b" + s(_cmd(p)) + b"b"),
    "build_class_swap": lambda p: program(
        newobj(g("torchao.quantization.granularity", "PerRow"))
        + t(b"N", d((s("__class__"), g("collections", "OrderedDict")))) + b"b"),
    "build_enum_member": lambda p: program(
        call(g("torchao.quantization.quant_primitives", "MappingType"), i(MappingType.SYMMETRIC.value))
        + d((s("_value_"), i(99)), (s("_name_"), s("PWNED"))) + b"b"),
    "wrapper_without_parts": lambda p: program(_int8_wrapper(b"}")),
    "wrapper_junk_parts": lambda p: program(_int8_wrapper(d((s("qdata"), s("junk")), (s("scale"), i(1))))),
    "wrapper_huge_size": lambda p: program(_int8_wrapper(b"}", size=(2**31 - 1, 2**31 - 1))),
    "wrapper_of_ordereddict": lambda p: program(_int8_wrapper(b"}", cls=g("collections", "OrderedDict"))),
    "memo_bomb": _memo_bomb,
    "reference_cycle": lambda p: program(b"]q\x00h\x00a"),
    "deep_nesting": lambda p: program(b"]" * 2000 + b"a" * 1999),
}

# Storage records that disagree with the pickle (zip container; the legacy ones are below).
_ZIP_STORAGE: dict[str, Callable[[Path], bytes]] = {
    "storage_numel_exceeds_record": lambda p: state_dict(tensor("0", 1_000_000, 1_000_000)),
    "tensor_exceeds_storage": lambda p: state_dict(tensor("0", 4, 1000)),
    "offset_beyond_storage": lambda p: state_dict(tensor("0", 4, 4, offset=100)),
    "negative_size": lambda p: state_dict(tensor("0", 4, -4)),
    "wrong_inner_name": lambda p: state_dict(tensor("7", 4, 4)),
    "stride0_view_8gb": lambda p: state_dict(tensor("0", 4, 2**31 - 1, stride=0)),
    "shape_2**63": lambda p: state_dict(call(g("torch._utils", "_rebuild_tensor_v2"), storage("0", 4), i(0),
                                             t(long1(2**63)), t(i(1)), b"\x89", call(g("collections", "OrderedDict")))),
}

# Inputs that would make aockpt allocate gigabytes from a few bytes (each also in HOSTILE).
def _huge_argument(opcode: bytes, length: bytes, proto: int = 2) -> Callable[[Path], bytes]:
    """A pickle whose first opcode claims a string or bytes argument of `length` bytes, with 3 bytes following."""
    return lambda p: program(opcode + length + b"abc", proto)


_BUDGET: dict[str, Callable[[Path], bytes]] = {
    "bytearray_2gb": lambda p: state_dict(call(g("builtins", "bytearray"), i(2**31 - 1))),
    "binunicode_4gb": _huge_argument(b"X", struct.pack("<I", 2**32 - 1)),
    "binbytes_4gb": _huge_argument(b"B", struct.pack("<I", 2**32 - 1), 3),
    "binunicode8_2**40": _huge_argument(b"\x8d", struct.pack("<Q", 2**40), 4),
    "binbytes8_2**40": _huge_argument(b"\x8e", struct.pack("<Q", 2**40), 4),
    "bytearray8_2**40": _huge_argument(b"\x96", struct.pack("<Q", 2**40), 5),
}
BOMBS = ["zip-stride0_view_8gb", "zip-bytearray_2gb", "legacy-bytearray_2gb", "legacy_storage_claims_8gb",
         "zip-binunicode_4gb", "legacy-binunicode_4gb", "legacy_keys_binunicode_4gb", "zip-binunicode8_2**40"]


def _int8_wrapper(state: bytes, *, size: tuple[int, int] = (4, 4), cls: bytes | None = None) -> bytes:
    """torch's own subclass rebuild of an Int8Tensor wrapper with the given attribute state."""
    cls = cls or g("torchao.quantization", "Int8Tensor")
    args = t(cls, g("torch", "float32"), t(*map(i, size)), t(i(size[1]), i(1)), i(0),
             call(g("torch.serialization", "_get_layout"), s("torch.strided")),
             call(g("torch", "device"), s("cpu")), b"\x89")
    return call(g("torch._tensor", "_rebuild_from_type_v2"), g("torch._utils", "_rebuild_wrapper_subclass"),
                cls, args, state)


def _inner_os_system(dir: Path) -> Path:
    """A plain-pickle file that would touch the canary if loaded unrestricted."""
    path = dir / "inner.pt"
    path.write_bytes(_PAYLOADS["os_system"](dir))
    return path


def _prepare(dir: Path) -> None:
    """Create the victim that a destructive payload would remove."""
    (dir / VICTIM).mkdir(exist_ok=True)
    (dir / VICTIM / "keep").write_bytes(b"keep")


def untouched(dir: Path) -> bool:
    """True when no payload ran: no canary, victim intact, torchao's enum members unchanged."""
    return (not (dir / CANARY).exists() and (dir / VICTIM / "keep").exists()
            and MappingType.SYMMETRIC.value == 1 and MappingType.SYMMETRIC.name == "SYMMETRIC")


def _write(dir: Path, name: str, data: bytes) -> Path:
    _prepare(dir)
    path = dir / name
    path.write_bytes(data)
    return path


_RECORD = {"0": floats(1, 2, 3, 4)}


def _in_zip(payload: Callable[[Path], bytes]) -> Builder:
    return lambda p: _write(p, "hostile.pt", zip_bytes(payload(p), _RECORD))


def _in_legacy(payload: Callable[[Path], bytes]) -> Builder:
    return lambda p: _write(p, "hostile.pt", legacy_bytes(payload(p)))


def _legacy_storage(numel_in_pickle: int, numel_in_file: int, data: bytes) -> Builder:
    pkl = state_dict(tensor("0", numel_in_pickle, min(numel_in_pickle, 4), legacy=True))
    return lambda p: _write(p, "hostile.pt", legacy_bytes(pkl, {"0": (numel_in_file, data)}))


def _flip_byte(data: bytes, marker: bytes) -> bytes:
    """Change one byte inside the first occurrence of `marker` (content after the local header)."""
    at = data.index(marker)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _zip_with(extra: list[tuple[str, bytes]], *, root: str = "archive", pkl: bytes | None = None) -> Builder:
    def build(p: Path) -> Path:
        body = pkl or _PAYLOADS["os_system"](p)
        return _write(p, "hostile.pt", zip_bytes(body, _RECORD, root=root, extra=extra))
    return build


def _torchscript(p: Path) -> Path:
    """A real TorchScript archive (it holds code) saved by torch.jit."""
    _prepare(p)
    path = p / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


def _tar(p: Path) -> Path:
    """The pre-1.6 .tar checkpoint layout, its `pickle` member carrying os.system."""
    _prepare(p)
    path = p / "hostile.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("sys_info", pickle.dumps({})), ("pickle", _PAYLOADS["os_system"](p)),
                           ("storages", pickle.dumps(0)), ("tensors", pickle.dumps(0))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


_CONTAINER_TRICKS: dict[str, Builder] = {
    "raw_pickle_os_system": lambda p: _write(p, "hostile.pt", _PAYLOADS["os_system"](p)),
    "zip_bad_crc_record": lambda p: _write(p, "hostile.pt", _flip_byte(
        zip_bytes(state_dict(tensor("0", 4, 4)), _RECORD), _RECORD["0"])),
    "zip_bad_crc_pickle": lambda p: _write(p, "hostile.pt", _flip_byte(
        zip_bytes(_PAYLOADS["os_system"](p), _RECORD), b"touch")),
    "zip_two_data_pkl": _zip_with([("archive/data.pkl", program(b"}"))]),
    "zip_unknown_member": _zip_with([("archive/extra.py", b"import os")]),
    "zip_dotdot_member": _zip_with([("archive/../evil.pkl", b"x")]),
    "zip_absolute_member": _zip_with([("/tmp/evil.pkl", b"x")]),
    "zip_two_roots": _zip_with([("other/data.pkl", b"x")]),
    "zip_data_pkl_nested": lambda p: _write(p, "hostile.pt", zip_bytes(
        program(b"}"), _RECORD, extra=[("archive/sub/data.pkl", _PAYLOADS["os_system"](p))])),
    "zip_torchscript_fake": _zip_with([("archive/constants.pkl", pickle.dumps(())),
                                       ("archive/code/__torch__.py", b"import os\nos.system('x')\n")]),
    "zip_torchscript_real": _torchscript,
    "zip_deflated_members": lambda p: _write(p, "hostile.pt", zip_bytes(
        state_dict(tensor("0", 4, 4)), {"0": floats(1, 2, 3, 4) * 64}, compression=zipfile.ZIP_DEFLATED)),
    "tar_checkpoint": _tar,
    "legacy_storage_short": _legacy_storage(4, 1000, floats(1, 2, 3, 4)),
    "legacy_storage_header_mismatch": _legacy_storage(1000, 4, floats(1, 2, 3, 4)),
    "legacy_storage_truncated": _legacy_storage(4, 4, floats(1, 2)),
    "legacy_storage_claims_8gb": _legacy_storage(2**31 - 1, 4, floats(1, 2, 3, 4)),
    # the pickle after the object (its storage keys), which torch also unpickles, claiming a 4 GB string
    "legacy_keys_binunicode_4gb": lambda p: _write(p, "hostile.pt", legacy_bytes(state_dict(
        tensor("0", 4, 4, legacy=True)))[:-len(pickle.dumps([], protocol=2))] + _BUDGET["binunicode_4gb"](p)),
}

HOSTILE: list[tuple[str, Builder]] = (
    [(f"zip-{name}", _in_zip(payload)) for name, payload in {**_PAYLOADS, **_ZIP_STORAGE, **_BUDGET}.items()]
    + [(f"legacy-{name}", _in_legacy(payload)) for name, payload in {**_PAYLOADS, **_BUDGET}.items()]
    + list(_CONTAINER_TRICKS.items())
)


def _named(name: str) -> Builder:
    """A valid zip checkpoint whose one tensor has the given name."""
    return lambda p: _write(p, "hostile.pt", zip_bytes(program(d((s(name), tensor("0", 4, 4)))), _RECORD))


def _saved(value: Callable[[], torch.Tensor]) -> Builder:
    """A real torch.save file holding one tensor of a kind aockpt cannot store."""
    def build(p: Path) -> Path:
        _prepare(p)
        torch.save({"w": value()}, p / "hostile.pt")
        return p / "hostile.pt"
    return build


def _int4_cpu(edit: Callable[[torch.Tensor], None]) -> Callable[[], torch.Tensor]:
    """A real CPU int4 weight with one field edited into junk, as a crafted pickle could hold it."""
    def make() -> torch.Tensor:
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        torch.manual_seed(0)
        w = Int4OpaqueTensor.from_hp(torch.randn(64, 128, dtype=torch.bfloat16), [1, 32])
        edit(w)
        return w
    return make


# Files that load (they are valid torch checkpoints) but that `pack` must refuse, writing nothing.
PACK_REFUSED: list[tuple[str, Builder]] = [
    *[(f"reserved_name_{n}", _named(n)) for n in ("__metadata__", "tensor_names", "aockpt", "format")],
    ("complex128", _saved(lambda: torch.ones(4, dtype=torch.complex128))),
    ("sparse_coo", _saved(lambda: torch.ones(4).to_sparse())),
    ("meta", _saved(lambda: torch.empty(4, device="meta"))),
    ("int4_cpu_float_qdata", _saved(_int4_cpu(lambda w: setattr(w, "qdata", w.qdata.view(torch.float32))))),
    ("int4_cpu_doubled_rows", _saved(_int4_cpu(lambda w: setattr(w, "qdata", torch.cat([w.qdata, w.qdata]))))),
    ("int4_cpu_group_size_0", _saved(_int4_cpu(lambda w: setattr(w, "block_size", [1, 0])))),
]


def junk_calls(name: str) -> list[tuple[str, bytes]]:
    """Pickles that abuse one allowlisted global: junk REDUCE args, junk NEWOBJ args plus junk BUILD state."""
    module, _, attr = name.rpartition(".")
    cls = g(module, attr)
    return [
        ("reduce", program(call(cls, s("junk"), i(-1)))),
        ("reduce-noargs", program(call(cls))),
        ("newobj", program(newobj(cls, s("junk"), i(-1)) + d((s("junk"), i(1))) + b"b")),
        ("newobj-noargs", program(newobj(cls) + t(b"N", d((s("__class__"), cls))) + b"b")),
    ]


# ---- safetensors files: raw headers and header edits ----

def raw_file(path: Path, header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file from a header (dict or raw bytes) and data, optionally lying about the length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def rewrite_header(path: Path, mutate: Callable[[dict], None]) -> None:
    """Rewrite a safetensors file's header JSON through `mutate`, keeping its data bytes."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    mutate(header)
    raw_file(path, json.dumps(header).encode(), raw[8 + length:])


def mutate_record(mutate: Callable[[dict], None], key: str = "aockpt") -> Callable[[dict], None]:
    """A header mutation applied to one JSON value of the metadata (by default the aockpt record)."""
    def apply(header: dict) -> None:
        record = json.loads(header["__metadata__"][key])
        mutate(record)
        header["__metadata__"][key] = json.dumps(record)
    return apply
