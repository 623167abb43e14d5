"""The one load pipeline (aockpt/load.py, plan.py): every option with a shard, one error per cause whichever
path finds it, and arguments or slices that used to crash inside."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aockpt
from aockpt import dcp as adcp, device_map, tp
from aockpt.api import load_placed
from aockpt.errors import CorruptCheckpointError, KeyMismatchError, PortabilityError, UsageError
from aockpt.plan import Split
from conftest import CASES, dequantize, tiny_model
from test_safetensors_io import mutate_record, rewrite_header

CPU = torch.device("cpu")


def _state() -> dict[str, torch.Tensor]:
    return {"m.weight": CASES["int8-weight-only"][1](), "n.weight": CASES["float8-weight-only"][1](),
            "norm.weight": torch.linspace(0.5, 1.5, 64).to(torch.bfloat16)}


SHARD = tp.TPShard({"m": "rowwise", "n": "colwise"}, 1, 2)


def _sliced(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """The dequantized slice SHARD's rank holds of a whole tensor."""
    dim = {"m.weight": 1, "n.weight": 0}.get(name)
    full = dequantize(tensor) if tensor.__class__ is not torch.Tensor else tensor
    if dim is None:
        return full
    cut = Split(dim, SHARD.rank, SHARD.world_size).cut(full.shape[dim])
    return full.narrow(dim, cut.start, cut.stop - cut.start)


def _equal_slices(local: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]) -> None:
    for name, tensor in local.items():
        got = dequantize(tensor) if tensor.__class__ is not torch.Tensor else tensor
        assert torch.equal(got, _sliced(whole[name], name)), name


@pytest.mark.parametrize("option", ["none", "keys-list", "keys-predicate", "verify", "relayout", "device",
                                    "cpu_packer", "pickle", "tied-folder"])
def test_every_load_quantized_option_works_with_a_shard(option, tmp_path):
    state = _state()
    aockpt.save(state, tmp_path / "p")
    path, kwargs, names = tmp_path / "p", {}, set(state)
    if option == "keys-list":
        kwargs, names = {"keys": ["m.weight"]}, {"m.weight"}
    elif option == "keys-predicate":
        kwargs, names = {"keys": lambda n: n != "norm.weight"}, {"m.weight", "n.weight"}
    elif option in ("verify", "relayout", "device"):
        kwargs = {"verify": {"verify": True}, "relayout": {"relayout": True}, "device": {"device": "cpu:0"}}[option]
    elif option in ("cpu_packer", "pickle"):
        state["o.weight"] = CASES["int4-opaque"][1]()  # a pickle does not say which CPU packer wrote it
        torch.save(state, tmp_path / "model.pt")
        path, names = tmp_path / "model.pt", set(state)
        kwargs = {"cpu_packer": "native"} if option == "cpu_packer" else {"keys": ["m.weight", "n.weight"]}
        names = names if option == "cpu_packer" else {"m.weight", "n.weight"}
    elif option == "tied-folder":  # transformers omits the tied head of a torchao model; config.json ties it
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig

        tiny_model(tie=True).save_pretrained(tmp_path / "float")
        AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.bfloat16, quantization_config=TorchAoConfig(
            Int8WeightOnlyConfig())).save_pretrained(tmp_path / "hf")
        path = tmp_path / "hf"
        shard = tp.TPShard({"lm_head": "colwise", "model.embed_tokens": "vocab"}, 1, 2)
        local = aockpt.load_quantized(path, shard=shard)
        assert local["lm_head.weight"] is local["model.embed_tokens.weight"]
        assert torch.equal(local["lm_head.weight"], aockpt.load_quantized(path)["lm_head.weight"][64:])
        return
    local = aockpt.load_quantized(path, shard=SHARD, **kwargs)
    assert set(local) == names and set(local.slices) == names
    _equal_slices(local, state)
    if option == "cpu_packer":
        with pytest.raises(PortabilityError, match=r"do not record which CPU packer wrote them \(o\.weight\)"):
            aockpt.load_quantized(path, shard=SHARD)


def test_verify_with_a_shard_names_a_changed_part(tmp_path):
    aockpt.save(_state(), tmp_path / "p")
    (shard,) = (tmp_path / "p").glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # the last stored byte: part of some tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="do not match their recorded digest"):
        aockpt.load_quantized(tmp_path / "p", shard=SHARD, verify=True)


def _corrupt(tmp_path) -> tuple:
    """A packed folder whose records of m.weight and n.weight declare shapes their bytes cannot have."""
    aockpt.save(_state(), tmp_path / "p")

    def lie(record: dict) -> None:
        record["tensors"]["m.weight"]["shape"] = [64, 256]
        record["tensors"]["n.weight"]["shape"] = [128, 128]

    rewrite_header(tmp_path / "p" / "model.safetensors", mutate_record(lie))
    return tmp_path / "p"


def test_a_corrupt_record_is_one_error_whichever_path_finds_it(tmp_path):
    path = _corrupt(tmp_path)
    template = {n: t for n, t in aockpt.load_quantized(aockpt.save(_state(), tmp_path / "good")).items()}
    paths = {
        "whole": lambda: aockpt.load_quantized(path),
        "sharded": lambda: aockpt.load_quantized(path, shard=SHARD),
        "device_map": lambda: load_placed(path, lambda n: device_map.device_of(n, {"": CPU})),
        "dcp": lambda: dcp.load(template, storage_reader=adcp.AockptStorageReader(path),
                                planner=adcp.AockptLoadPlanner()),
        "verify": lambda: aockpt.verify(path),
    }
    messages = {}
    for how, attempt in paths.items():
        with pytest.raises(CorruptCheckpointError) as caught:
            attempt()
        messages[how] = str(caught.value)
    assert len(set(messages.values())) == 1, messages
    message = messages["whole"]
    assert message.startswith(f"{path}: m.weight: ") and message.endswith("(also wrong: n.weight)"), message


# ---- arguments and slices that used to crash inside (issue 20) ----

def test_device_map_arguments_are_usage_errors(tmp_path):
    model = torch.nn.Module()
    model.m, model.n, model.norm = torch.nn.Linear(128, 64), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64)
    for mapping in ({"": -1}, {"": True}, {"": "cuda:999"}, {"": 999}, {"nope": "cpu", "": "cpu"}, {1: "cpu"},
                    {"": "disk"}, {"": "tpu"}):
        with pytest.raises(UsageError) as caught:
            device_map.resolve(mapping, model, {}, {})
        assert "\n" not in str(caught.value), mapping
    aockpt.save(_state(), tmp_path / "p")
    absent = torch.cuda.device_count()  # one past the last CUDA device this machine has
    for mapping in ({"": absent}, {"": f"cuda:{absent}"}, {"m": "cpu", "": absent}):
        resolved = device_map.resolve(mapping, model, {}, {})
        with pytest.raises(UsageError, match=f"cuda:{absent} is not a device of this machine"):
            load_placed(tmp_path / "p", lambda n: device_map.device_of(n, resolved))
    with pytest.raises(UsageError, match=f"cuda:{absent} is not a device of this machine"):
        aockpt.load_quantized(tmp_path / "p", f"cuda:{absent}", shard=SHARD)
    mapping = device_map.resolve({"m.weight": "cpu", "": "cpu"}, model, {}, {})  # a parameter's own name
    state = load_placed(tmp_path / "p", lambda n: device_map.device_of(n, mapping))
    model.m.weight = torch.nn.Parameter(state["m.weight"], requires_grad=False)
    device_map.dispatch(model, mapping)
    assert model.m(torch.ones(2, 128, dtype=torch.bfloat16)).shape == (2, 64)


@pytest.mark.parametrize("shard", [
    lambda: tp.TPShard({"m": "rowwise"}, 0.5, 2), lambda: tp.TPShard({"m": "rowwise"}, True, 2),
    lambda: tp.TPShard({"m": "rowwise"}, 0, 2.0), lambda: tp.TPShard([("m", "rowwise")], 0, 2),
    lambda: tp.TPShard("m", 0, 2), lambda: tp.TPShard({1: "rowwise"}, 0, 2)])
def test_bad_shards_are_one_usage_error(shard):
    with pytest.raises(UsageError, match="tensor-parallel"):
        shard()


def test_a_1d_scale_is_split_exactly_and_an_empty_tensor_too(tmp_path):
    tensor = CASES["int8-weight-only"][1]()
    one_d = type(tensor)(tensor.qdata, tensor.scale.reshape(-1), tensor.block_size, tensor.dtype)
    aockpt.save({"m.weight": one_d, "e.weight": torch.empty(0, 0), "f.weight": torch.ones(4, 0)}, tmp_path / "p")
    assert aockpt.verify(tmp_path / "p")
    for world in (2, 3):
        for rank in range(world):
            shard = tp.TPShard({"m": "rowwise", "e": "rowwise", "f": "colwise"}, rank, world)
            local = aockpt.load_quantized(tmp_path / "p", shard=shard)
            cut = Split(1, rank, world).cut(128)
            want = dequantize(one_d)[:, cut.start:cut.stop]
            assert torch.equal(dequantize(local["m.weight"]), want)
            assert local["e.weight"].shape == (0, 0)
            assert local["f.weight"].shape == (Split(0, rank, world).cut(4).stop - Split(0, rank, world).cut(4).start, 0)


@pytest.mark.parametrize("case", ["int8-weight-only", "float8-weight-only", "intx-weight-only"])
def test_more_ranks_than_columns_gives_empty_slices_not_corrupt(case, tmp_path):
    tensor = CASES[case][1]()  # [64, 128]
    aockpt.save({"m.weight": tensor}, tmp_path / "p")
    world = 96  # colwise: 64 rows over 96 ranks; ranks 64.. hold none
    for rank in (0, 63, 64, 95):
        local = aockpt.load_quantized(tmp_path / "p", shard=tp.TPShard({"m": "colwise"}, rank, world))["m.weight"]
        cut = Split(0, rank, world).cut(64)
        assert local.shape == (cut.stop - cut.start, 128)
        assert torch.equal(dequantize(local), dequantize(tensor)[cut.start:cut.stop])


@pytest.mark.parametrize("value", [torch.zeros(64, 128, dtype=torch.bfloat16), 3, None])
def test_a_dcp_template_of_the_wrong_kind_is_refused_by_name(value, tmp_path):
    """DCP hands a planner's error to every rank wrapped in its CheckpointException: aockpt's one line is its end."""
    aockpt.save(_state(), tmp_path / "p")
    template = {**aockpt.load_quantized(tmp_path / "p"), "m.weight": value}
    with pytest.raises(BaseException) as caught:
        dcp.load(template, storage_reader=adcp.AockptStorageReader(tmp_path / "p"), planner=adcp.AockptLoadPlanner())
    last = str(caught.value).strip().splitlines()[-1]
    assert re.fullmatch(r"aockpt\.errors\.UsageError: m\.weight: the (template|state dict) holds a .*", last), last


def test_a_hostile_folder_through_dcp_is_aockpts_error_not_an_assertion(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}       ")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        dcp.load({"a": torch.zeros(1)}, storage_reader=adcp.AockptStorageReader(tmp_path / "p"),
                 planner=adcp.AockptLoadPlanner())


def test_unknown_names_are_listed_with_a_shard(tmp_path):
    aockpt.save(_state(), tmp_path / "p")
    with pytest.raises(KeyMismatchError, match=re.escape("has no tensor named nope")):
        aockpt.load_quantized(tmp_path / "p", shard=SHARD, keys=["nope"])
