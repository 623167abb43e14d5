"""Typed JSON round-trips every attribute value and refuses anything outside its tables."""

import json
import math
import time

import pytest
import torch

from aockpt import registry, typed_json
from aockpt.errors import CorruptCheckpointError
from aockpt.typed_json import loads_strict
from conftest import CASES


def test_attributes_of_every_case_round_trip(case):
    _, _, tensor = case
    _, attrs = tensor.__tensor_flatten__()
    for name, value in attrs.items():
        text = typed_json.dumps(typed_json.encode(value))
        back = typed_json.decode(typed_json.loads_strict(text, "t"), "t")
        assert back == value and type(back) is type(value), name


@pytest.mark.parametrize("value", [(1, 32), torch.Size([2, 3]), [1, (2, 3)], torch.int4, torch.float8_e4m3fn,
                                   *registry.VALUE_TYPES["IntxUnpackedToInt8TensorActivationQuantization"]])
def test_tuples_and_dtypes_keep_their_type(value):
    back = typed_json.decode(typed_json.encode(value), "t")
    assert back == value and type(back) is type(value)


def test_torchao_dialect_writes_tuples_as_lists():
    assert typed_json.encode((1, 32), tuples=False) == [1, 32]


@pytest.mark.parametrize("text, message", [
    ('{"a": 1, "a": 2}', "duplicate key"),
    ('{"a": NaN}', "non-standard"),
    ('{"a": Infinity}', "non-standard"),
    ("[" * 40 + "]" * 40, "nested deeper"),
    ("{not json", "invalid JSON"),
    ('{"a\\ud800": 1}', "invalid JSON"),
    ('["\\udfff"]', "invalid JSON"),
])
def test_strict_parser_refuses(text, message):
    with pytest.raises(CorruptCheckpointError, match=message):
        typed_json.loads_strict(text, "header")


@pytest.mark.parametrize("value, message", [
    ({"_type": "os.system", "_data": "id"}, "not in aockpt's allowlist"),
    ({"_type": "torch.dtype", "_data": "_C"}, "unknown dtype"),
    ({"_type": "MappingType", "_data": "__class__"}, "not a member"),
    ({"_type": "PerRow", "_data": {"dim": -1, "evil": 1}}, "takes fields"),
    ({"_type": "PerRow", "_data": {"dim": -1}, "x": 1}, "expected _type and _data"),
    ({"_type": "torch.Size", "_data": [-1]}, "non-negative"),
    ({"_type": "PerGroup", "_data": {"group_size": "x" * 3}}, None),
])
def test_decoder_refuses_values_outside_tables(value, message):
    if message is None:
        typed_json.decode(value, "t")  # a wrong field type is the class's business, but must not crash
        return
    with pytest.raises(CorruptCheckpointError, match=message):
        typed_json.decode(value, "t")


def test_encoder_refuses_unknown_objects_and_non_finite_floats():
    with pytest.raises(TypeError):
        typed_json.encode(object())
    with pytest.raises(ValueError):
        typed_json.encode(math.inf)


def test_every_dtype_name_round_trips():
    for name, (dtype, _) in registry.DTYPES.items():
        assert typed_json.decode(typed_json.encode(dtype), "t") is dtype, name


def test_json_that_would_build_millions_of_objects_is_refused_before_parsing():
    bomb = "[" + "[]," * 13_000_000 + "[]]"  # 39 MB, 26M objects: ~2.5 GB once parsed
    start = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match="more than the 4,000,000 any real checkpoint needs"):
        loads_strict(bomb, "header")
    assert time.perf_counter() - start < 5
    many_strings = json.dumps({"tensor_names": json.dumps([[]] * 3_000_000)})  # brackets inside strings
    assert len(json.loads(loads_strict(many_strings, "metadata")["tensor_names"])) == 3_000_000


@pytest.mark.parametrize("name", ["config.json", "pytorch_model.bin.index.json"])
def test_huge_config_or_index_is_refused_without_reading_it(tmp_path, name):
    import aockpt

    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    with open(folder / name, "wb") as f:
        f.truncate(4 * 1024**3)  # sparse: 4 GiB that costs no disk
    start = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match=rf"{name} is 4,294,967,296 bytes, larger than"):
        aockpt.pack(folder, tmp_path / "out")
    assert time.perf_counter() - start < 5 and not (tmp_path / "out").exists()
