"""Hostile and broken safetensors inputs: every reading rule of docs/format.md refused with a clear error,
quickly and without large allocations."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import aockpt
from aockpt import format as fmt
from aockpt.errors import AockptError, CorruptCheckpointError, UnsupportedTensorError
from aockpt.fetch import MAX_HEADER_BYTES
from aockpt.registry import STORAGE_CODES, TENSOR_TYPES, Portability
from aockpt.safetensors_io import SafetensorsFile
from aockpt.typed_json import MAX_FILE_BYTES
from conftest import CASES
from hostile import mutate_record, raw_file, rewrite_header

PEAK_BYTES = 16 << 20  # Python-side allocations while refusing a file
SECONDS = 5.0
F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@contextmanager
def bounded() -> Iterator[None]:
    """Fail if the block allocates more than PEAK_BYTES through Python or runs longer than SECONDS."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak Python allocation {peak} bytes"
    assert time.perf_counter() - start < SECONDS


NO_DIGESTS = "|was not packed by aockpt"  # verify's answer for files that record no digests


def refused(path: Path, message: str, error: type[AockptError] = CorruptCheckpointError, *,
            inspect: bool = True) -> None:
    """load_quantized, verify (and inspect) refuse `path` with `error` matching `message`, boundedly.

    inspect reports what the records say without rebuilding tensors, so it is exempt for lies that
    only rebuilding can see (attributes, part sizes); it must still not fail in any other way.
    """
    for operation in (aockpt.load_quantized, aockpt.verify, aockpt.inspect):
        if operation is aockpt.inspect and not inspect:
            operation(path)
            continue
        expected = message + NO_DIGESTS if operation is aockpt.verify else message
        with bounded(), pytest.raises(AockptError, match=expected) as info:
            operation(path)
        assert isinstance(info.value, CorruptCheckpointError if "not packed" in str(info.value) else error)
        assert "\n" not in str(info.value)


HEADERS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "shorter-than-length-prefix": (lambda p: (p.write_bytes(b"\x01\x02"), p)[1], "too short"),
    "header-over-100MB": (lambda p: raw_file(p, {}, length=MAX_HEADER_BYTES + 1), "header claims"),
    "header-longer-than-file": (lambda p: raw_file(p, {"a": F32}, bytes(8), length=1000), "header claims"),
    "header-length-2**64-1": (lambda p: raw_file(p, {}, length=2**64 - 1), "header claims"),
    "not-utf8": (lambda p: raw_file(p, b'{"a\xff": 1}'), "not UTF-8"),
    "utf16": (lambda p: raw_file(p, json.dumps({"a": F32}).encode("utf-16"), bytes(8)), "not UTF-8|invalid JSON"),
    "not-json": (lambda p: raw_file(p, b"{nope"), "invalid JSON"),
    "not-an-object": (lambda p: raw_file(p, b"[]"), "not a JSON object"),
    "duplicate-key": (lambda p: raw_file(p, b'{"a": %s, "a": %s}' % ((json.dumps(F32).encode(),) * 2), bytes(8)),
                      "duplicate key"),
    "nan": (lambda p: raw_file(p, b'{"__metadata__": {"a": NaN}}'), "non-standard JSON constant"),
    "deep-nesting": (lambda p: raw_file(p, b'{"__metadata__": ' + b"[" * 40 + b"]" * 40 + b"}"), "deeper than"),
    "unknown-dtype": (lambda p: raw_file(p, {"a": {**F32, "dtype": "F128"}}, bytes(8)), "unknown dtype"),
    "dtype-not-string": (lambda p: raw_file(p, {"a": {**F32, "dtype": ["F32"]}}, bytes(8)), "unknown dtype"),
    "extra-entry-key": (lambda p: raw_file(p, {"a": {**F32, "x": 1}}, bytes(8)), "exactly dtype"),
    "missing-offsets": (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "exactly dtype"),
    "negative-dim": (lambda p: raw_file(p, {"a": {**F32, "shape": [-2]}}, bytes(8)), "malformed"),
    "bool-dim": (lambda p: raw_file(p, {"a": {**F32, "shape": [True, 2]}}, bytes(8)), "malformed"),
    "float-offset": (lambda p: raw_file(p, {"a": {**F32, "data_offsets": [0, 8.0]}}, bytes(8)), "malformed"),
    "three-offsets": (lambda p: raw_file(p, {"a": {**F32, "data_offsets": [0, 4, 8]}}, bytes(8)), "malformed"),
    "begin-after-end": (lambda p: raw_file(p, {"a": {**F32, "shape": [0], "data_offsets": [8, 0]}}, bytes(8)),
                        "malformed"),
    "not-starting-at-0": (lambda p: raw_file(p, {"a": {**F32, "data_offsets": [4, 12]}}, bytes(12)), "gap"),
    "gap": (lambda p: raw_file(p, {"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, bytes(20)), "gap"),
    "overlap": (lambda p: raw_file(p, {"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12)), "overlaps"),
    "duplicate-span": (lambda p: raw_file(p, {"a": F32, "b": F32}, bytes(8)), "overlaps"),
    "trailing-bytes": (lambda p: raw_file(p, {"a": F32}, bytes(9)), "end at byte 8 of a 9-byte"),
    "truncated-data": (lambda p: raw_file(p, {"a": F32}, bytes(7)), "header claims|end at byte 8 of a 7-byte"),
    "dtype-x-shape-too-small": (lambda p: raw_file(p, {"a": {**F32, "shape": [3]}}, bytes(8)), "spans 8 bytes"),
    "dtype-x-shape-too-big": (lambda p: raw_file(p, {"a": {**F32, "shape": [1]}}, bytes(8)), "spans 8 bytes"),
    "shape-overflowing-int64": (lambda p: raw_file(p, {"a": {**F32, "shape": [2**62] * 4}}, bytes(8)), "spans 8"),
    "shape-beyond-any-int": (lambda p: raw_file(p, {"a": {**F32, "shape": [10**30] * 20_000}}, bytes(8)), "spans 8"),
    "empty-with-int64-overflow": (lambda p: raw_file(p, {"a": {**F32, "shape": [2**40, 2**40, 0],
                                                              "data_offsets": [0, 0]}}), "spans 0"),
    "tensor-named-__metadata__": (lambda p: raw_file(p, {"__metadata__": F32}, bytes(8)), "strings to strings"),
    "metadata-value-not-string": (lambda p: raw_file(p, {"__metadata__": {"format": 1}}), "strings to strings"),
    "metadata-is-a-list": (lambda p: raw_file(p, {"__metadata__": []}), "strings to strings"),
    "directory": (lambda p: (p.mkdir(), p)[1], "not a regular file"),
    "fifo": (lambda p: (os.mkfifo(p), p)[1], "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_malformed_safetensors_header_is_refused(tmp_path, case):
    make, message = HEADERS[case]
    path = make(tmp_path / "model.safetensors")
    with bounded(), pytest.raises(CorruptCheckpointError, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)
    refused(path, f"{message}|has no weights")  # the API never opens a directory or FIFO as a file


def test_unsorted_spans_that_tile_the_data_are_read_exactly(tmp_path):
    data = struct.pack("<4f", 1, 2, 3, 4)
    path = raw_file(tmp_path / "x.safetensors", {"b": {**F32, "data_offsets": [8, 16]}, "a": F32}, data)
    state = aockpt.load_quantized(path)
    assert torch.equal(state["a"], torch.tensor([1.0, 2.0])) and torch.equal(state["b"], torch.tensor([3.0, 4.0]))


def test_huge_index_file_is_refused_before_reading(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with open(folder / fmt.INDEX_NAME, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    refused(folder, "larger than")


# ---- sharded folders: index names, symlinks, keys in two shards, unlisted keys ----

def _plain_shards(folder: Path, shards: dict[str, list[str]], weight_map: dict[str, str]) -> Path:
    """A folder of plain safetensors shards holding 2-float tensors, and an index with this weight map."""
    folder.mkdir(exist_ok=True)
    for name, keys in shards.items():
        header = {k: {**F32, "data_offsets": [8 * i, 8 * i + 8]} for i, k in enumerate(keys)}
        raw_file(folder / name, header, bytes(8 * len(keys)))
    (folder / fmt.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "C:x.safetensors", "a\\b.safetensors",
                                  "nul\x00.safetensors", "..", "sub/x.safetensors", ""])
def test_index_shard_names_must_stay_in_the_folder(tmp_path, name):
    folder = _plain_shards(tmp_path / "c", {"s.safetensors": ["a"]}, {"a": name})
    refused(folder, "plain file name")


def test_index_symlink_pointing_out_of_the_folder_is_refused(tmp_path):
    outside = raw_file(tmp_path / "secret.safetensors", {"a": F32}, bytes(8))
    folder = _plain_shards(tmp_path / "c", {}, {"a": "s.safetensors"})
    (folder / "s.safetensors").symlink_to(outside)
    refused(folder, "points outside")


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    refused(_plain_shards(tmp_path / "c", {}, {"a": "gone.safetensors"}), "missing")


@pytest.mark.parametrize("shards, weight_map, message", [
    ({"1.safetensors": ["a"], "2.safetensors": ["a", "b"]}, {"a": "1.safetensors", "b": "2.safetensors"},
     "two shards"),
    ({"1.safetensors": ["a", "b"]}, {"a": "1.safetensors"}, "not listed"),
    ({"1.safetensors": ["a"], "2.safetensors": ["b"]}, {"a": "1.safetensors", "b": "1.safetensors"},
     "no shard holds"),
    ({"1.safetensors": ["a"]}, {"a": "1.safetensors", "ghost": "1.safetensors"}, "no shard holds"),
], ids=["key-in-two-shards", "unlisted-key", "key-listed-in-the-wrong-shard", "listed-key-not-stored"])
def test_index_and_shards_must_agree(tmp_path, shards, weight_map, message):
    refused(_plain_shards(tmp_path / "c", shards, weight_map), message)


# ---- aockpt and torchao records that lie ----

def as_torchao_file(mutate: Callable[[dict], None]) -> Callable[[dict], None]:
    """A header mutation that drops the aockpt record (leaving torchao's) and changes the record of `w`."""
    def apply(header: dict) -> None:
        del header["__metadata__"][fmt.RECORD_KEY]
        record = json.loads(header["__metadata__"]["w"])
        mutate(record)
        header["__metadata__"]["w"] = json.dumps(record)
    return apply


def _int8(record: dict) -> dict:
    return record["tensors"]["w"]


def packed(tmp_path: Path, case: str = "int8-weight-only", **extra: torch.Tensor) -> Path:
    """A one-file packed checkpoint holding tensor `w` of a conftest case (plus extra plain tensors)."""
    folder = tmp_path / "p"
    aockpt.save({"w": CASES[case][1](), **extra}, folder)
    return folder


RECORD_LIES: dict[str, tuple[Callable[[dict], None], str, type[AockptError]]] = {
    "part-dtype": (mutate_record(lambda r: _int8(r)["parts"]["qdata"].update(dtype="uint8")), "is declared",
                   CorruptCheckpointError),
    "part-shape": (mutate_record(lambda r: _int8(r)["parts"]["qdata"].update(shape=[128, 64])), "is declared",
                   CorruptCheckpointError),
    "part-key-missing": (mutate_record(lambda r: _int8(r)["parts"]["qdata"].update(key="nope")), "read it from",
                         CorruptCheckpointError),
    "two-tensors-one-key": (mutate_record(lambda r: r["tensors"].update(v=r["tensors"]["w"])), "read it from",
                            CorruptCheckpointError),
    "stored-key-unclaimed": (mutate_record(lambda r: r["tensors"].pop("b")), "belong to no tensor",
                             CorruptCheckpointError),
    "alias-of-missing": (mutate_record(lambda r: r["tensors"].update(t={"alias_of": "ghost"})), "alias of missing",
                         CorruptCheckpointError),
    "outer-shape": (mutate_record(lambda r: _int8(r).update(shape=[64, 64])), "declares", CorruptCheckpointError),
    "unknown-type": (mutate_record(lambda r: _int8(r).update(type="os.system")), "allowlist",
                     UnsupportedTensorError),
    "unknown-part": (mutate_record(lambda r: _int8(r)["parts"].update(evil=_int8(r)["parts"].pop("qdata"))),
                     "read it from", CorruptCheckpointError),
    "attribute-wrong-type": (mutate_record(lambda r: _int8(r)["attrs"].update(block_size="1,128")), "not a valid",
                             CorruptCheckpointError),
    "attribute-wrong-item-type": (mutate_record(lambda r: _int8(r)["attrs"].update(block_size=[1.5, 128])),
                                  "not a valid", CorruptCheckpointError),
    "attribute-value-type-not-allowed": (
        mutate_record(lambda r: _int8(r)["attrs"].update(dtype={"_type": "builtins.eval", "_data": "1"})),
        "allowlist", CorruptCheckpointError),
    "attribute-unknown-dtype": (
        mutate_record(lambda r: _int8(r)["attrs"].update(dtype={"_type": "torch.dtype", "_data": "__class__"})),
        "unknown dtype", CorruptCheckpointError),
    "attribute-missing": (mutate_record(lambda r: _int8(r)["attrs"].pop("block_size")), "attributes are",
                          CorruptCheckpointError),
    "block-size-zero": (mutate_record(lambda r: _int8(r)["attrs"].update(block_size=[0, 128])), "block_size",
                        CorruptCheckpointError),
    "torchao-unknown-_type": (as_torchao_file(lambda r: r.update(_type="EvilTensor")), "unsupported torchao record",
                              CorruptCheckpointError),
    "torchao-dotted-_type": (as_torchao_file(lambda r: r.update(_type="torch.nn.Module")),
                             "unsupported torchao record", CorruptCheckpointError),
    "torchao-extra-field": (as_torchao_file(lambda r: r.update(_evil=1)), "unsupported torchao record",
                            CorruptCheckpointError),
    "torchao-data-names-not-list": (as_torchao_file(lambda r: r.update(_tensor_data_names="qdata")), "malformed",
                                    CorruptCheckpointError),
    "torchao-attribute-wrong-type": (as_torchao_file(lambda r: r["_data"].update(block_size={"a": 1})),
                                     "not a valid", CorruptCheckpointError),
}


SEEN_ONLY_WHEN_REBUILT = {"attribute-missing", "attribute-wrong-item-type", "attribute-wrong-type",
                          "block-size-zero", "outer-shape"}


@pytest.mark.parametrize("lie", sorted(RECORD_LIES))
def test_records_that_lie_are_refused(tmp_path, lie):
    mutate, message, error = RECORD_LIES[lie]
    folder = packed(tmp_path, b=torch.ones(3))
    rewrite_header(folder / fmt.WEIGHTS_NAME, mutate)
    refused(folder, message, error, inspect=lie not in SEEN_ONLY_WHEN_REBUILT)


# ---- per-type consistency: parts that disagree with the outer shape or block size ----

def _with_parts(tensor: torch.Tensor, **changes: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The same torchao tensor with some inner tensors replaced (torchao's constructors do not check)."""
    names, attrs = tensor.__tensor_flatten__()
    parts = {n: changes.get(n, lambda t: t)(getattr(tensor, n)) for n in names}
    return type(tensor).__tensor_unflatten__(parts, attrs, tensor.shape, None)


INCONSISTENT: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor], str]] = {
    "int8-scale-missing-rows": ("int8-weight-only", lambda t: _with_parts(t, scale=lambda s: s[:32]), "'scale'"),
    "int8-zero-point-extra-rows": ("int8-dynamic", lambda t: _with_parts(t, zero_point=lambda z: z.repeat(2, 1)),
                                   "'zero_point'"),
    "float8-scale-per-tensor-for-per-row": ("float8-weight-only", lambda t: _with_parts(t, scale=lambda s: s[:1]),
                                            "'scale'"),
    "int4-tile-scale-and-zero-short": ("int4-tile-packed",
                                       lambda t: _with_parts(t, scale_and_zero=lambda s: s[:, :32]), "scale_and_zero"),
    "int4-tile-qdata-doubled-rows": ("int4-tile-packed", lambda t: _with_parts(t, qdata=lambda q: torch.cat([q, q])),
                                     "not tinygemm tiles"),
    "int4-tile-scale-and-zero-2d": ("int4-tile-packed",
                                    lambda t: _with_parts(t, scale_and_zero=lambda s: s.reshape(-1, 2)),
                                    "not tinygemm tiles"),
    "int4-plain-qdata-half": ("int4-plain", lambda t: _with_parts(t, qdata=lambda q: q[:32]), "'qdata'"),
    "mx-scale-missing-rows": ("mxfp8", lambda t: _with_parts(t, scale=lambda s: s[:32]), "'scale'"),
    "nvfp4-scale-short": ("nvfp4", lambda t: _with_parts(t, scale=lambda s: s[:, :4]), "'scale'"),
    "nf4-scalers-short": ("nf4", lambda t: _with_parts(t, quantized_scalers=lambda s: s[:512]), "quantized_scalers"),
}


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_parts_inconsistent_with_the_outer_shape_are_refused(tmp_path, case):
    source, change, message = INCONSISTENT[case]
    aockpt.save({"w": change(CASES[source][1]())}, tmp_path / "p")
    with pytest.raises(CorruptCheckpointError, match=message):
        aockpt.verify(tmp_path / "p")
    with pytest.raises(AockptError):  # pinned int4 types are refused on CPU even before their parts are checked
        aockpt.load_quantized(tmp_path / "p")


def _shape_attr(shape: list[int]) -> Callable[[dict], None]:
    """Set both the int4 tensor's `shape` attribute and its declared outer shape."""
    def apply(record: dict) -> None:
        _int8(record)["attrs"]["shape"] = {"_type": "torch.Size", "_data": shape}
        _int8(record)["shape"] = shape
    return apply


@pytest.mark.parametrize("mutate, operation", [
    (mutate_record(_shape_attr([128, 128])), aockpt.verify),
    (as_torchao_file(lambda r: r["_data"].update(shape=[64, 4096])), aockpt.inspect),  # rebuilt for its shape
], ids=["aockpt-record", "torchao-record"])
def test_int4_shape_attribute_larger_than_its_parts_is_refused(tmp_path, mutate, operation):
    folder = packed(tmp_path, "int4-tile-packed")
    rewrite_header(folder / fmt.WEIGHTS_NAME, mutate)
    with bounded(), pytest.raises(CorruptCheckpointError, match="holds|not tinygemm tiles"):
        operation(folder)


def test_every_type_has_part_size_rules_for_its_packed_parts():
    """Every quantized row checks the size of the part holding its values."""
    for entry in TENSOR_TYPES.values():
        assert {"qdata", "quantized_data"} & set(entry.part_rules), entry.name


def test_consistent_tensors_pass_the_rules(tmp_path, case):
    """The rules refuse nothing real: every conftest case saves, loads and verifies."""
    _, type_name, tensor = case
    aockpt.save({"w": tensor}, tmp_path / "p")
    aockpt.verify(tmp_path / "p")  # rebuilds every tensor on CPU, whatever device it is pinned to
    if TENSOR_TYPES[type_name].portability is Portability.PORTABLE:
        assert type(aockpt.load_quantized(tmp_path / "p")["w"]) is type(tensor)


def test_copy_of_a_packed_folder_still_verifies(tmp_path):
    """Sanity for the helpers above: an unmodified rewrite is accepted."""
    folder = packed(tmp_path)
    shutil.copytree(folder, tmp_path / "copy")
    rewrite_header(tmp_path / "copy" / fmt.WEIGHTS_NAME, lambda h: None)
    aockpt.verify(tmp_path / "copy")


@pytest.mark.parametrize("dim,start,stop", [(0, 1, 4), (1, 2, 5), (2, 1, 3), (1, 0, 5)])
def test_read_slice_reads_exactly_the_slice(tmp_path, dim, start, stop):
    from safetensors.torch import save_file

    t = torch.arange(4 * 5 * 3, dtype=torch.int16).reshape(4, 5, 3)
    save_file({"t": t, "s": torch.tensor(2.5)}, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        got = f.read_slice("t", dim, start, stop)
        assert torch.equal(got, t.narrow(dim, start, stop - start))
        assert f.bytes_read == got.numel() * 2
        assert f.read_slice("s").item() == 2.5 and f.bytes_read == got.numel() * 2 + 4


# ---- differential: aockpt's parser against the reference reader (the safetensors package) ----

def _entry(dtype: str, shape: list, end: int, begin: int = 0) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _text(header: str) -> bytes:
    """A raw header written by hand, for literals json.dumps never writes (`-0`, duplicates)."""
    return header.encode()


# (header, data): each read by safetensors.safe_open (torch) and by aockpt's parser.
DIFFERENTIAL: dict[str, tuple[dict | bytes, bytes]] = {
    "f4-values-two-a-byte": ({"x": _entry("F4", [4, 16], 32)}, bytes(range(32))),
    "f4-packed-shape-over-its-bytes": ({"x": _entry("F4", [4, 8], 32)}, bytes(32)),  # what aockpt 1.0 wrote
    "f4-odd-last-dim": ({"x": _entry("F4", [2, 3], 3)}, bytes(3)),
    "f4-odd-count": ({"x": _entry("F4", [3], 2)}, bytes(2)),
    "f4-scalar": ({"x": _entry("F4", [], 1)}, bytes(1)),
    "f4-empty": ({"x": _entry("F4", [0], 0)}, b""),
    "f4-empty-odd-last-dim": ({"x": _entry("F4", [0, 3], 0)}, b""),
    "f6-not-a-torch-dtype": ({"x": _entry("F6_E2M3", [4], 3)}, bytes(3)),
    "minus-zero-dim": (_text('{"x":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'), b""),
    "minus-zero-offset": (_text('{"x":{"dtype":"F32","shape":[0],"data_offsets":[-0,0]}}'), b""),
    "minus-zero-in-a-metadata-string": (_text('{"__metadata__":{"a":"-0"},"x":{"dtype":"U8","shape":[1],'
                                              '"data_offsets":[0,1]}}'), b"\x07"),
    "float-dim": (_text('{"x":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}'), bytes(4)),
    "dim-2**64": ({"x": _entry("F32", [0, 2**64], 0)}, b""),
    "dim-2**63": ({"x": _entry("F32", [0, 2**63], 0)}, b""),
    "empty-with-dim-2**62": ({"x": _entry("F32", [0, 2**62], 0)}, b""),
    "empty-torch-stride-overflow": ({"x": _entry("F32", [0, 2**62, 2], 0)}, b""),
    "empty-u64-product-overflow": ({"x": _entry("F32", [2**62, 4, 0], 0)}, b""),
    "empty-product-2**62": ({"x": _entry("F32", [2**31, 2**31, 0], 0)}, b""),
    "sixty-five-dims": ({"x": _entry("U8", [1] * 65, 1)}, b"\x01"),
    "metadata-null": ({"__metadata__": None}, b""),
    "metadata-string": ({"__metadata__": "x"}, b""),
    "metadata-value-null": ({"__metadata__": {"a": None}}, b""),
    "no-tensors": ({}, b""),
    "whitespace-around": (b"  {}  ", b""),
    "nul-padding": (b"{}\x00\x00", b""),
    "utf8-bom": (b"\xef\xbb\xbf{}", b""),
    "empty-name": ({"": _entry("F32", [2], 8)}, bytes(8)),
    "lower-case-dtype": ({"x": _entry("f32", [2], 8)}, bytes(8)),
    "lone-surrogate-name": (_text('{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'), bytes(8)),
    "offsets-as-object": (_text('{"x":{"dtype":"F32","shape":[2],"data_offsets":{"0":0,"1":8}}}'), bytes(8)),
    "zero-size-before-a-tensor": ({"a": _entry("F32", [0], 0), "b": _entry("F32", [2], 8)}, bytes(8)),
    "unsorted-spans": ({"b": _entry("F32", [1], 8, 4), "a": _entry("F32", [1], 4)}, bytes(range(8))),
    "duplicate-metadata-slot": (_text('{"__metadata__":{"a":"1"},"__metadata__":{"b":"2"}}'), b""),
    "duplicate-entry-field": (_text('{"x":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}'),
                              bytes(4)),
    "e8m0-and-c64": ({"a": _entry("F8_E8M0", [1], 1), "b": _entry("C64", [1], 9, 1)}, bytes(9)),
    # aockpt is deliberately stricter here (STRICTER): the reference takes the last duplicate, ignores extras
    "duplicate-tensor": (_text('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                               '"x":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}}'), b"\xff"),
    "duplicate-metadata-key": (_text('{"__metadata__":{"a":"1","a":"2"}}'), b""),
    "extra-entry-field": ({"x": {**_entry("F32", [2], 8), "byte_order": "big"}}, bytes(8)),
}
STRICTER = {"duplicate-tensor", "duplicate-metadata-key", "extra-entry-field"}


def _fingerprint(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    """dtype, shape and bytes of a tensor, for comparing two readers."""
    return t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _reference_reads(path: Path) -> tuple[dict, dict] | None:
    """Every tensor (dtype, shape, bytes) and the metadata the reference reader gives, or None if it refuses."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - any refusal of the reference counts as refusing
        return None
    return {k: _fingerprint(t) for k, t in tensors.items()}, metadata


def _aockpt_reads(path: Path) -> tuple[dict, dict] | None:
    """The same from aockpt's parser, or None if it refuses (always as a CorruptCheckpointError naming the file)."""
    try:
        with SafetensorsFile(path) as f:
            tensors = {k: f.tensor(k) for k in f.keys()}
            metadata = f.metadata
    except CorruptCheckpointError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return None
    return {k: _fingerprint(t) for k, t in tensors.items()}, metadata


@pytest.mark.parametrize("case", sorted(DIFFERENTIAL))
def test_aockpt_and_the_reference_reader_accept_the_same_files_with_the_same_tensors(tmp_path, case):
    header, data = DIFFERENTIAL[case]
    path = raw_file(tmp_path / "x.safetensors", header, data)
    reference, ours = _reference_reads(path), _aockpt_reads(path)
    if case in STRICTER:
        assert reference is not None and ours is None
    else:
        assert ours == reference


def test_header_length_limit_is_the_references(tmp_path):
    """100,000,000 header bytes are read by both; one more is refused by both, before any is read."""
    path = tmp_path / "x.safetensors"
    raw_file(path, b"{}" + b" " * (MAX_HEADER_BYTES - 2))
    assert _reference_reads(path) == _aockpt_reads(path) == ({}, {})
    raw_file(path, b"{}" + b" " * (MAX_HEADER_BYTES - 1))
    assert _reference_reads(path) is None and _aockpt_reads(path) is None
    path.unlink()


def test_f4_written_by_the_reference_reads_in_aockpt_and_the_reverse(tmp_path):
    """F4: the header counts 4-bit values (two a byte); torch's float4_e2m1fn_x2 packs them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    packed = torch.arange(32, dtype=torch.uint8).reshape(4, 8).view(torch.float4_e2m1fn_x2)
    save_file({"x": packed}, tmp_path / "ref.safetensors")
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert f.tensor("x").shape == (4, 8) and torch.equal(f.tensor("x").view(torch.uint8), packed.view(torch.uint8))
    aockpt.save({"m.x": packed}, tmp_path / "p")
    shard = tmp_path / "p" / fmt.WEIGHTS_NAME
    with safe_open(str(shard), "pt") as f:
        assert f.get_slice("m.x").get_shape() == [4, 16]
    stock = load_file(shard)["m.x"]
    assert stock.dtype == torch.float4_e2m1fn_x2 and torch.equal(stock.view(torch.uint8), packed.view(torch.uint8))
    assert torch.equal(aockpt.load_quantized(tmp_path / "p", verify=True)["m.x"].view(torch.uint8),
                       packed.view(torch.uint8))
    old = raw_file(tmp_path / "old.safetensors", {"x": _entry("F4", [4, 8], 32)}, bytes(32))  # format 1.0.0's F4
    with pytest.raises(CorruptCheckpointError, match="two a byte.*re-pack"):
        SafetensorsFile(old)
    with pytest.raises(UnsupportedTensorError, match="0-dim"):
        aockpt.save({"s": torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, tmp_path / "scalar")


@pytest.mark.parametrize("dtype", sorted(STORAGE_CODES, key=str), ids=str)
def test_every_storable_dtype_round_trips_with_the_reference_both_ways(tmp_path, dtype):
    """Written by safetensors.torch and read by aockpt, and written by aockpt and read by safetensors: same bytes."""
    from safetensors.torch import load_file, save_file

    raw = torch.arange(48, dtype=torch.uint8).reshape(3, 16)
    tensor = raw.view(dtype)  # every dtype's bytes, whatever its element size
    save_file({"m.x": tensor}, tmp_path / "ref.safetensors")
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert _fingerprint(f.tensor("m.x")) == _fingerprint(tensor)
    aockpt.save({"m.x": tensor}, tmp_path / "p")
    assert _fingerprint(load_file(tmp_path / "p" / fmt.WEIGHTS_NAME)["m.x"]) == _fingerprint(tensor)
