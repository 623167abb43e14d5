"""Tensor-parallel slices read from disk (aockpt/tp.py): every registry type, both splits, bytes counted.
The real 2-process runs are in tests/test_distributed.py."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

import aockpt
from aockpt import codec, relayout, tp
from aockpt.cli import main
from aockpt.errors import KeyMismatchError, PortabilityError, UnsupportedTensorError, UsageError
from aockpt.registry import TENSOR_TYPES, TpSplit
from aockpt.plan import Split
from conftest import CASES, assert_same_tensor, dequantize
from tp_worker import read_counted


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("style,dim", [("colwise", 0), ("rowwise", 1)])
def test_every_rank_slice_equals_the_full_tensors_slice(case, style, dim, world, tmp_path):
    case_id, type_name, tensor = case
    aockpt.save({"m.weight": tensor, "m.bias": torch.arange(tensor.shape[0], dtype=torch.bfloat16)}, tmp_path / "p")
    split = TENSOR_TYPES[type_name].tp[dim]
    if split is TpSplit.NONE:
        with pytest.raises(UnsupportedTensorError, match=r"m\.weight: a .* split of this " + type_name):
            aockpt.load_quantized(tmp_path / "p", shard=tp.TPShard({"m": style}, 0, world))
        return
    full = dequantize(tensor)
    for rank in range(world):
        local, read, total = read_counted(tmp_path / "p", tp.TPShard({"m": style}, rank, world))
        cut = Split(dim, rank, world).cut(tensor.shape[dim])
        start, stop = cut.start, cut.stop
        assert type(local["m.weight"]) is type(tensor)
        want = full.narrow(dim, start, stop - start)
        assert torch.equal(_bytes(dequantize(local["m.weight"])), _bytes(want))
        bias = torch.arange(tensor.shape[0], dtype=torch.bfloat16)
        assert torch.equal(local["m.bias"], bias[start:stop] if dim == 0 else bias)
        if split is TpSplit.DIRECT:
            assert read <= total * (1 / world + 0.05), (read, total)
        else:
            assert read >= codec.flatten("w", tensor).nbytes  # device-packed int4 is read whole, then re-laid out


def test_every_registry_type_says_how_it_splits():
    for entry in TENSOR_TYPES.values():
        required, _, _ = entry.inner_names()
        assert (TpSplit.DIRECT in entry.tp) == bool(entry.tp_axes), entry.name
        for dim, split in enumerate(entry.tp):
            along = {part for part, *axes in entry.tp_axes if axes[dim] is not None}
            assert split is not TpSplit.DIRECT or set(required) <= along, (entry.name, dim)
            assert split is not TpSplit.RELAYOUT or entry.relayout is not None, (entry.name, dim)


def test_inspect_reports_the_split(tmp_path):
    state = {name: make() for name, (_, make) in [("a.weight", CASES["int8-weight-only"]),
                                                   ("b.weight", CASES["int4-tile-packed"]), ("c.weight", CASES["nf4"])]}
    aockpt.save(state, tmp_path / "p")
    assert {t.name: t.tp for t in aockpt.inspect(tmp_path / "p").tensors} == {
        "a.weight": "direct", "b.weight": "direct rows, relayout cols", "c.weight": "none"}
    table = CliRunner().invoke(main, ["inspect", str(tmp_path / "p")]).output
    assert re.search(r"^c\.weight +NF4Tensor .* none$", table, re.M) and " tp split" in table


@pytest.mark.parametrize("world", [3, 5])
def test_a_split_inside_a_quantization_group_is_refused(world, tmp_path):
    aockpt.save({"m.weight": CASES["intx-weight-only"][1]()}, tmp_path / "p")  # K=128 in groups of 32
    with pytest.raises(UnsupportedTensorError, match=r"m\.weight: a rowwise split .* cut a quantization group of 32"):
        aockpt.load_quantized(tmp_path / "p", shard=tp.TPShard({"m": "rowwise"}, 1, world))


def test_torch_styles_patterns_and_bad_plans(tmp_path):
    w = CASES["int8-weight-only"][1]()  # [64, 128]
    state = {"layers.0.mlp.up_proj.weight": w, "layers.1.mlp.down_proj.weight": w, "embed.weight": w,
             "norm.weight": torch.ones(64)}
    aockpt.save(state, tmp_path / "p")
    plan = {"layers.*.mlp.up_proj": ColwiseParallel(), "layers.*.mlp.down_proj": RowwiseParallel(), "embed": "vocab"}
    local = aockpt.load_quantized(tmp_path / "p", shard=tp.TPShard(plan, 1, 2))
    assert {k: tuple(v.shape) for k, v in local.items()} == {
        "layers.0.mlp.up_proj.weight": (32, 128), "layers.1.mlp.down_proj.weight": (64, 64),
        "embed.weight": (32, 128), "norm.weight": (64,)}
    only_layers = aockpt.load_quantized(tmp_path / "p", shard=aockpt.TPShard(plan, 0, 2), keys=lambda n: "layers" in n)
    assert sorted(only_layers) == ["layers.0.mlp.up_proj.weight", "layers.1.mlp.down_proj.weight"]
    with pytest.raises(UsageError, match="'layers.*' has style 'diagonal'"):
        tp.load_shard(tmp_path / "p", shard=tp.TPShard({"layers.*": "diagonal"}, 0, 2))
    with pytest.raises(UsageError, match=r"embed.weight matches .* different styles \(rowwise, vocab\)"):
        tp.load_shard(tmp_path / "p", shard=tp.TPShard({"embed": "vocab", "emb*": "rowwise"}, 0, 2))
    with pytest.raises(UsageError, match="rank 2 / world size 2"):
        tp.TPShard(plan, 2, 2)
    with pytest.raises(KeyMismatchError, match="no tensor named nope"):
        tp.load_shard(tmp_path / "p", shard=tp.TPShard(plan, 0, 2), keys=["nope"])


def test_a_pickle_is_sliced_like_its_packed_folder(tmp_path):
    state = {"m.weight": CASES["int8-weight-only"][1](), "n.weight": CASES["float8-weight-only"][1]()}
    torch.save(state, tmp_path / "model.pt")
    aockpt.save(state, tmp_path / "p")
    shard = tp.TPShard({"m": "colwise", "n": "rowwise"}, 1, 2)
    from_pickle, from_packed = (tp.load_shard(tmp_path / src, shard=shard) for src in ("model.pt", "p"))
    for name in state:
        assert_same_tensor(from_pickle[name], from_packed[name])
    assert from_pickle.slices == from_packed.slices


def test_a_torchao_written_file_is_sliced_too(tmp_path):
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensor = CASES["intx-weight-only"][1]()
    tensors, metadata = flatten_tensor_state_dict({"m.weight": tensor})
    save_file(tensors, tmp_path / "model.safetensors", metadata=metadata)
    local = tp.load_shard(tmp_path, shard=tp.TPShard({"m": "rowwise"}, 1, 2))["m.weight"]
    assert torch.equal(_bytes(local.dequantize()), _bytes(tensor.dequantize()[:, 64:]))


@pytest.mark.parametrize("world", [2, 8])
def test_tile_packed_rows_read_directly_equal_the_re_laid_out_slices(world, tmp_path):
    """tinygemm tiles hold 8 whole rows, K padding included: a colwise cut is exact without re-packing."""
    gen = torch.Generator().manual_seed(0)
    n, k, g = 256, 2048, 128
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale_and_zero = torch.rand(k // g, n, 2, generator=gen).to(torch.bfloat16)
    canon = relayout.Int4Canonical(codes, scale_and_zero, g, (n, k), torch.bfloat16)

    def tile_tensor(c: relayout.Int4Canonical) -> torch.Tensor:
        parts, attrs, _ = relayout.tinygemm.from_canonical(c, torch.device("cpu"))
        tile = TENSOR_TYPES["Int4TilePackedTo4dTensor"]
        return codec.rebuild(codec.FlatTensor(tile, c.shape, torch.bfloat16, parts, attrs), "w")

    aockpt.save({"m.weight": tile_tensor(canon)}, tmp_path / "p")
    for rank in range(world):
        cut = Split(0, rank, world).cut(n)
        start, stop = cut.start, cut.stop
        local = read_counted(tmp_path / "p", tp.TPShard({"m": "colwise"}, rank, world))[0]["m.weight"]
        cut = relayout.Int4Canonical(canon.values[start:stop].contiguous(),
                                     canon.scale_and_zero[:, start:stop].contiguous(), g, (stop - start, k),
                                     torch.bfloat16)
        assert_same_tensor(local, tile_tensor(cut))


def test_device_rules_apply_to_slices(tmp_path):
    """A CUDA-packed int4 slice cannot live on the CPU: refused by name, or re-packed exactly with relayout."""
    tensor = CASES["int4-tile-packed"][1]()
    aockpt.save({"m.weight": tensor}, tmp_path / "p")
    shard = aockpt.TPShard({"m": "colwise"}, 1, 2)
    with pytest.raises(PortabilityError, match=r"m\.weight is Int4TilePackedTo4dTensor .* pass relayout=True"):
        aockpt.load_quantized(tmp_path / "p", "cpu", shard=shard)
    local = aockpt.load_quantized(tmp_path / "p", "cpu", shard=shard, relayout=True)["m.weight"]
    assert type(local).__name__ == "Int4OpaqueTensor"
    got = dequantize(local)
    assert torch.equal(_bytes(got), _bytes(dequantize(tensor)[32:]))
    verified = aockpt.load_quantized(tmp_path / "p", "cpu", shard=shard, relayout=True, verify=True)["m.weight"]
    assert_same_tensor(verified, local)
