"""A new tensor type is one registry entry: a throwaway torchao-style subclass, registered for one test,
is flattened and rebuilt, unpickled, judged for portability, inspected and listed in the docs table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torchao.utils import TorchAOBaseTensor

import aockpt
from aockpt import codec, part_sizes, portability, registry, type_table
from aockpt.errors import UnsafeCheckpointError, UnsupportedTensorError
from aockpt.unpickle import safe_load


class ToyInt8Tensor(TorchAOBaseTensor):
    """int8 values with one bf16 scale per row, built the way torchao builds its own types."""

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["block_size", "dtype"]

    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, block_size: list[int], dtype: torch.dtype):
        toy = torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device)
        toy.qdata, toy.scale, toy.block_size = qdata, scale, block_size
        return toy

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, block_size: list[int], dtype: torch.dtype):
        pass


TOY = registry.TensorType(
    name="ToyInt8Tensor", cls=ToyInt8Tensor, family=registry.Family.INT8, portability=registry.Portability.PORTABLE,
    packed_for=None, kernels=frozenset({"cpu"}), stock_loadable=False,
    note="a throwaway int8 type (tests/test_registry.py)",
    tp=(registry.TpSplit.DIRECT, registry.TpSplit.DIRECT),
    tp_axes=(("qdata", (0, registry.Along.VALUES), (1, registry.Along.VALUES)),
             ("scale", (0, registry.Along.BLOCKS), (1, registry.Along.BLOCKS))),
    part_dtypes={"qdata": frozenset({"int8"}), "scale": registry.OUTER_DTYPES}, part_rules=part_sizes.BYTE_QDATA,
)


def test_a_row_checks_its_own_consistency():
    """A direct split must say how every required part follows it; a relayout split and a pinned type need
    their converter and packer: a row that forgets is refused when it is written, naming what is missing."""
    with pytest.raises(TypeError, match=r"ToyInt8Tensor: a direct split of dim 1 must say how parts \['scale'\]"):
        dataclasses.replace(TOY, tp_axes=(TOY.tp_axes[0], ("scale", (0, registry.Along.BLOCKS), None)))
    with pytest.raises(TypeError, match="a relayout split of dim 0 needs a converter"):
        dataclasses.replace(TOY, tp=(registry.TpSplit.RELAYOUT, registry.TpSplit.NONE))
    with pytest.raises(TypeError, match="a pinned type must say which device"):
        dataclasses.replace(TOY, portability=registry.Portability.PINNED)
    with pytest.raises(TypeError):
        registry.TensorType("ToyInt8Tensor", ToyInt8Tensor)  # keyword-only: no fact is passed by position


def _toy() -> ToyInt8Tensor:
    g = torch.Generator().manual_seed(13)
    qdata = torch.randint(-128, 128, (4, 8), dtype=torch.int8, generator=g)
    return ToyInt8Tensor(qdata, torch.rand(4, 1, generator=g).to(torch.bfloat16), [1, 8], torch.bfloat16)


@pytest.fixture
def toy(monkeypatch) -> ToyInt8Tensor:
    """The throwaway type's one registry entry, present for this test only."""
    monkeypatch.setitem(registry.TENSOR_TYPES, TOY.name, TOY)
    return _toy()


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert type(a) is type(b) is ToyInt8Tensor and a.block_size == b.block_size and a.dtype == b.dtype
    for part in ("qdata", "scale"):
        assert torch.equal(getattr(a, part).view(torch.uint8), getattr(b, part).view(torch.uint8)), part


def test_without_the_entry_the_type_is_refused(tmp_path):
    with pytest.raises(UnsupportedTensorError, match="ToyInt8Tensor, which aockpt has no codec for"):
        codec.flatten("w", _toy())
    torch.save({"w": _toy()}, tmp_path / "toy.pt")
    with pytest.raises(UnsafeCheckpointError, match="ToyInt8Tensor"):
        safe_load(tmp_path / "toy.pt")


def test_codec_flattens_and_rebuilds_it_byte_exact(toy):
    flat = codec.flatten("w", toy)
    assert flat.row is TOY and set(flat.parts) == {"qdata", "scale"}
    _assert_same(codec.rebuild(flat, "w"), toy)
    flat.parts["scale"] = flat.parts["scale"][:2]  # the row's part rules apply: one scale per row
    with pytest.raises(aockpt.CorruptCheckpointError, match="part 'scale' holds 2 values"):
        codec.rebuild(flat, "w")


def test_the_unpickling_allowlist_takes_it(toy, tmp_path):
    torch.save({"w": toy}, tmp_path / "toy.pt")
    _assert_same(safe_load(tmp_path / "toy.pt")["w"], toy)


def test_portability_verdicts_read_its_row(toy):
    assert portability.verdict(TOY, None, "cpu") == portability.Verdict(True, True, "portable")
    cuda = portability.verdict(TOY, None, "cuda")
    assert (cuda.loads, cuda.runs) == (True, False) and "no cuda kernel" in cuda.reason


def test_inspect_and_a_packed_round_trip_list_it(toy, tmp_path):
    aockpt.save({"w": toy}, tmp_path / "p")
    info = aockpt.inspect(tmp_path / "p", devices=["cpu", "cuda"])
    (t,) = info.tensors
    assert (t.type, t.portability, t.tp, t.shape, t.dtype) == ("ToyInt8Tensor", "portable", "direct", [4, 8],
                                                               "bfloat16")
    assert info.not_stock_loadable == ["ToyInt8Tensor"]
    assert t.devices["cpu"].runs and t.devices["cuda"].loads and not t.devices["cuda"].runs
    assert info.to_dict()["tensors"][0]["devices"] == {  # verdicts become text only at the edge (--json)
        "cpu": "runs: portable", "cuda": "loads: portable; no cuda kernel in torchao 0.18 (data only)"}
    _assert_same(aockpt.load_quantized(tmp_path / "p")["w"], toy)


def test_its_row_says_how_tensor_parallelism_slices_it(toy, tmp_path):
    aockpt.save({"m.weight": toy}, tmp_path / "p")
    rows = aockpt.load_quantized(tmp_path / "p", shard=aockpt.TPShard({"m": "colwise"}, 1, 2))["m.weight"]
    _assert_same(rows, ToyInt8Tensor(toy.qdata[2:], toy.scale[2:], [1, 8], torch.bfloat16))
    cols = aockpt.load_quantized(tmp_path / "p", shard=aockpt.TPShard({"m": "rowwise"}, 1, 2))["m.weight"]
    _assert_same(cols, ToyInt8Tensor(toy.qdata[:, 4:].contiguous(), toy.scale, [1, 4], torch.bfloat16))


def test_the_docs_table_lists_it(toy):
    assert ("| ToyInt8Tensor | int8 | portable | cpu | no | a throwaway int8 type (tests/test_registry.py) | "
            "direct |") in type_table.markdown().splitlines()


def test_the_readme_type_table_is_the_registry():
    """README.md carries exactly what `python -m aockpt.type_table` prints (regenerate it after a change)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert type_table.markdown() in readme


def test_the_plain_tensor_is_a_row():
    plain = registry.tensor_type_of(torch.zeros(2), "t")
    assert plain is registry.PLAIN and not plain.quantized and plain.portability is registry.Portability.PORTABLE
    assert plain.kernels == {d.value for d in registry.Device}
    assert registry.tensor_type_named("Tensor", "t") is plain
