"""Flatten/rebuild is exact for every registry type, and refuses what a type does not declare."""

import dataclasses
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aockpt import codec, registry
from aockpt.errors import CorruptCheckpointError, UnsupportedTensorError
from conftest import CASES, assert_same_tensor


def test_every_registry_type_has_a_case():
    assert set(registry.TENSOR_TYPES) == {type_name for type_name, _ in CASES.values()}


@pytest.mark.parametrize("type_name", sorted(registry.TENSOR_TYPES))
def test_every_registry_constructor_hint_resolves(type_name):
    """Attribute checks read these hints: a class whose hints do not resolve must fail here, not skip checks."""
    cls = registry.TENSOR_TYPES[type_name].cls
    hints = codec._attribute_hints(cls)
    annotated = {**getattr(cls.__new__, "__annotations__", {}), **getattr(cls.__init__, "__annotations__", {})}
    assert set(annotated) <= set(hints)


@pytest.mark.parametrize("value_type", sorted(registry.VALUE_TYPES))
def test_every_value_type_field_hint_resolves(value_type):
    """Field checks of attribute objects read these hints: an unresolvable one must fail here, not skip checks."""
    codec._field_hints(registry.VALUE_TYPES[value_type])


def test_flatten_rebuild_is_exact(case):
    _, type_name, tensor = case
    flat = codec.flatten("layer.weight", tensor)
    assert flat.row is registry.TENSOR_TYPES[type_name]
    assert all(type(p) is torch.Tensor for p in flat.parts.values())
    assert_same_tensor(codec.rebuild(flat, "layer.weight"), tensor)


class _Ops(TorchDispatchMode):
    """Every aten op run while active (a kernel or a metadata op alike)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_rebuild_runs_no_op_on_the_parts(case, device):
    """Device loads build wrappers while the parts' bytes are still being copied (api._build): no registered
    type's rebuild may run any op on them, or it could read bytes that have not arrived."""
    _, _, tensor = case
    flat = codec.flatten("w", tensor)
    flat = codec.FlatTensor(flat.row, flat.shape, flat.dtype, {k: v.to(device) for k, v in flat.parts.items()},
                            flat.attrs)
    with _Ops() as seen:
        codec.rebuild(flat, "w", torch.device(device))
    assert seen.ops == []
    with _Ops() as seen:  # the recorder sees ops on the parts
        next(iter(flat.parts.values())).clone()
    assert seen.ops == ["aten.clone.default"]


def _devices_in(value) -> list:
    """Every torch.device anywhere in an attribute value (lists, tuples, named tuples, dataclasses)."""
    if isinstance(value, torch.device):
        return [value]
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in _devices_in(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [d for f in dataclasses.fields(value) for d in _devices_in(getattr(value, f.name))]
    return []


def test_every_recorded_device_is_set_to_the_target(case):
    """A load sets the device of every attribute (NF4 keeps one inside its tensor_meta dataclass): a device
    left at the CPU builds the tensor there however its parts were placed (found on a real GPU)."""
    _, _, tensor = case
    target = torch.device("cuda", 3)  # only a value here: nothing is allocated on it
    for name, value in codec.flatten("w", tensor).attrs.items():
        moved = codec.on_device(value, target)
        assert all(d == target for d in _devices_in(moved)), name
        assert len(_devices_in(moved)) == len(_devices_in(value))


def test_flatten_does_not_copy(case):
    _, _, tensor = case
    flat = codec.flatten("w", tensor)
    for name, part in flat.parts.items():
        assert part.data_ptr() == getattr(tensor, name).data_ptr()


def test_plain_tensor_round_trip():
    t = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    flat = codec.flatten("b", t)
    assert flat.row is registry.PLAIN and set(flat.parts) == {codec.PLAIN_PART}
    assert codec.rebuild(flat, "b") is flat.parts[codec.PLAIN_PART]


def test_unknown_subclass_is_refused():
    class Foreign(torch.Tensor):
        pass

    with pytest.raises(UnsupportedTensorError, match="layer.weight is a .*Foreign"):
        codec.flatten("layer.weight", torch.zeros(2).as_subclass(Foreign))


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.parts.pop("qdata"), "missing \\['qdata'\\]"),
    (lambda f: f.parts.__setitem__("evil", torch.zeros(1)), "unexpected \\['evil'\\]"),
    (lambda f: f.attrs.pop("block_size"), "attributes are"),
    (lambda f: f.attrs.__setitem__("extra", 1), "attributes are"),
])
def test_undeclared_parts_and_attributes_are_refused(mutate, message):
    flat = codec.flatten("w", CASES["int8-weight-only"][1]())
    mutate(flat)
    with pytest.raises(CorruptCheckpointError, match=message):
        codec.rebuild(flat, "w")


def test_declared_shape_must_match_rebuilt_tensor():
    flat = codec.flatten("w", CASES["int8-weight-only"][1]())
    flat.shape = (1, 2)
    with pytest.raises(CorruptCheckpointError, match="declares"):
        codec.rebuild(flat, "w")


@pytest.mark.parametrize("case_id, attr, junk", [
    ("int4-tile-packed", "block_size", "junk"),
    ("int4-tile-packed", "shape", [1.5, 2]),
    ("int8-weight-only", "dtype", 3),
    ("intx-weight-only", "block_size", [True, "x"]),
    ("mxfp8", "elem_dtype", None),
])
def test_attribute_of_wrong_type_is_refused(case_id, attr, junk):
    flat = codec.flatten("w", CASES[case_id][1]())
    flat.attrs[attr] = junk
    with pytest.raises(CorruptCheckpointError, match=f"attribute {attr}="):
        codec.rebuild(flat, "w")


def test_aliases_find_tied_tensors():
    w = torch.ones(3)
    q = CASES["int8-weight-only"][1]()
    assert codec.aliases([("a", w), ("b", w), ("c", q), ("d", q), ("e", w.clone())]) == {"b": "a", "d": "c"}


def _unstorable() -> dict[str, torch.Tensor]:
    """Ordinary torch tensors of kinds a safetensors folder cannot hold (built quietly: some are deprecated)."""
    import warnings

    x = torch.arange(4, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"complex128": x.to(torch.complex128), "torch-quantized (qint8)": torch.quantize_per_tensor(
                    x, 0.1, 0, torch.qint8), "sparse (sparse_coo)": x.to_sparse(),
                "sparse (sparse_csr)": x.reshape(2, 2).to_sparse_csr(), "nested": torch.nested.nested_tensor([x, x[:2]]),
                "meta (data-less)": torch.empty(3, device="meta")}


@pytest.mark.parametrize("kind", list(_unstorable()))
def test_tensor_kinds_aockpt_cannot_store_are_named_in_pack_and_save(tmp_path, kind):
    import aockpt

    tensor = _unstorable()[kind]
    torch.save({"w": tensor}, tmp_path / "src.pt")
    for write in (lambda: aockpt.pack(tmp_path / "src.pt", tmp_path / "dst"), lambda: aockpt.save({"w": tensor}, tmp_path / "dst")):
        with pytest.raises(UnsupportedTensorError, match=rf"w.*aockpt does not store {re.escape(kind)} tensors"):
            write()
    assert not (tmp_path / "dst").exists()


def test_stride0_view_is_refused_not_expanded():
    view = torch.ones(1).expand(2**40)
    with pytest.raises(UnsupportedTensorError, match="overlapping or stride-0 strides.*save .clone"):
        codec.flatten("w", view)


def _rewrite(folder, edit) -> None:
    """Edit a single-file packed folder's header in place: `edit(header, record)` on the parsed JSON, where
    `record` is the aockpt record of tensor "m.weight" (data and digests stay)."""
    import json
    import struct

    path = folder / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    record = json.loads(header["__metadata__"]["aockpt"])
    edit(header, record["tensors"]["m.weight"], record)
    header["__metadata__"]["aockpt"] = json.dumps(record).replace("12345678901", "1e999")
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def _retype(part: str, dtype: str, code: str, shape: list[int]):
    """An edit storing one part under another dtype and shape (same byte count)."""
    def edit(header, w, record):
        key = w["parts"][part]["key"]
        header[key].update(dtype=code, shape=shape)
        w["parts"][part].update(dtype=dtype, shape=shape)
    return edit


def _attr(name: str, value):
    def edit(header, w, record):
        w["attrs"][name] = value
    return edit


JUNK_RECORDS = {
    "int4-group-size-0": ("int4-tile-packed", _attr("block_size", [1, 0])),
    "int4-empty-block-size": ("int4-tile-packed", _attr("block_size", [])),
    "int4-3d-shape": ("int4-tile-packed", _attr("shape", {"_type": "torch.Size", "_data": [2, 64, 128]})),
    "int4-absurd-group-size": ("int4-opaque", _attr("block_size", [1, 2**40])),
    "cpu-int4-float-qdata": ("int4-opaque", _retype("qdata", "float32", "F32", [64, 16])),
    "cpu-int4-scale-and-zero-transposed": ("int4-opaque", _retype("scale_and_zero", "bfloat16", "BF16", [64, 4, 2])),
    "cpu-int4-doubled-rows": ("int4-opaque", _attr("shape", {"_type": "torch.Size", "_data": [32, 128]})),
    "outer-dtype-int4": ("int8-weight-only", lambda h, w, r: w.update(dtype="int4")),
    "unknown-granularity-in-kwargs": ("int8-dynamic", lambda h, w, r: w["attrs"]["act_quant_kwargs"]["_data"].update(
        granularity="PerFoo")),
    "granularity-field-junk": ("int8-dynamic", lambda h, w, r: w["attrs"]["act_quant_kwargs"]["_data"].update(
        granularity={"_type": "PerRow", "_data": {"dim": "x"}})),
    "version-5000-digits": ("int8-weight-only", lambda h, w, r: r.update(format_version="1" * 5000 + ".0.0")),
    "attribute-1e999": ("int8-weight-only", _attr("block_size", [1, 12345678901])),
    "shape-2**63": ("int8-weight-only", lambda h, w, r: w.update(shape=[2**63, 1])),
    "int4-shape-2**63": ("int4-opaque", _attr("shape", {"_type": "torch.Size", "_data": [2**63, 128]})),
}


@pytest.mark.parametrize("junk", list(JUNK_RECORDS))
def test_junk_records_are_refused_by_load_pack_and_verify_before_any_converter(tmp_path, junk):
    import aockpt
    from aockpt import tp
    from aockpt.errors import AockptError

    case, edit = JUNK_RECORDS[junk]
    aockpt.save({"m.weight": CASES[case][1]()}, tmp_path / "src")
    _rewrite(tmp_path / "src", edit)
    calls = {"load": lambda: aockpt.load_quantized(tmp_path / "src"),
             "load-relayout": lambda: aockpt.load_quantized(tmp_path / "src", relayout=True),
             "pack": lambda: aockpt.pack(tmp_path / "src", tmp_path / "dst"),
             "pack-cpu": lambda: aockpt.pack(tmp_path / "src", tmp_path / "dst", device="cpu"),
             "verify": lambda: aockpt.verify(tmp_path / "src"),
             "load-shard": lambda: tp.load_shard(tmp_path / "src", shard=tp.TPShard({"m": "colwise"}, 0, 2),
                                                 relayout=True)}
    for what, call in calls.items():
        with pytest.raises(AockptError) as info:
            call()
        assert "\n" not in str(info.value) and len(str(info.value)) < 600, (what, str(info.value))
    assert not (tmp_path / "dst").exists()
