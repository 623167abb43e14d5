"""pack/save -> load_quantized/unpack is bit-exact for every registry type; verify names what changed."""

import json

import pytest
import torch

import aockpt
from aockpt import format as fmt, registry
from aockpt.errors import CorruptCheckpointError, KeyMismatchError, PortabilityError, UnsupportedTensorError, UsageError
from aockpt.safetensors_io import SafetensorsFile
from conftest import CASES, assert_same_tensor


def _state(tensor):
    return {"model.layers.0.proj.weight": tensor, "model.layers.0.proj.bias": torch.arange(4.0)}


def _loads_on_cpu(type_name):
    entry = registry.TENSOR_TYPES[type_name]
    return entry.portability is registry.Portability.PORTABLE or entry.packed_for == "cpu"


def test_save_then_load_is_exact(case, tmp_path):
    _, type_name, tensor = case
    state = _state(tensor)
    aockpt.save(state, tmp_path / "p")
    if not _loads_on_cpu(type_name):
        with pytest.raises(PortabilityError, match="model.layers.0.proj.weight is " + type_name):
            aockpt.load_quantized(tmp_path / "p", "cpu")
        return
    loaded = aockpt.load_quantized(tmp_path / "p", "cpu", verify=True)
    assert sorted(loaded) == sorted(state)
    for name in state:
        assert_same_tensor(loaded[name], state[name])


def test_unpack_is_pack_inverse(case, tmp_path):
    _, _, tensor = case
    state = _state(tensor)
    aockpt.save(state, tmp_path / "p")
    if not registry.tensor_type_of(tensor, "t").weights_only:  # torch.load would refuse the pickle: unpack says so first
        with pytest.raises(UnsupportedTensorError, match="weights_only"):
            aockpt.unpack(tmp_path / "p", tmp_path / "back.pt")
        return
    aockpt.unpack(tmp_path / "p", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert sorted(back) == sorted(state)
    for name in state:
        assert_same_tensor(back[name], state[name])


def test_packed_file_is_readable_by_stock_torchao(tmp_path):
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from safetensors.torch import load_file
    from safetensors import safe_open

    state = {name: CASES[name][1]() for name in ("int8-dynamic", "float8-weight-only", "intx-weight-only")}
    state = {f"m.{k.replace('-', '_')}.weight": v for k, v in state.items()}
    aockpt.save(state, tmp_path / "p")
    with safe_open(tmp_path / "p" / fmt.WEIGHTS_NAME, "pt") as f:
        metadata = f.metadata()
    result, leftover = unflatten_tensor_state_dict(load_file(tmp_path / "p" / fmt.WEIGHTS_NAME), metadata)
    assert not leftover and set(result) == set(state)
    for name in state:
        torch.testing.assert_close(result[name].dequantize(), state[name].dequantize(), rtol=0, atol=0)


def test_tied_tensors_are_stored_once_and_restored_shared(tmp_path):
    q = CASES["int8-weight-only"][1]()
    emb = torch.randn(8, 4)
    state = {"embed.weight": emb, "lm_head.weight": emb, "a.weight": q, "b.weight": q}
    aockpt.save(state, tmp_path / "p")
    with SafetensorsFile(tmp_path / "p" / fmt.WEIGHTS_NAME) as f:
        assert "lm_head.weight" not in f.keys() and "b._weight_qdata" not in f.keys()
    loaded = aockpt.load_quantized(tmp_path / "p")
    assert loaded["lm_head.weight"] is loaded["embed.weight"] and loaded["b.weight"] is loaded["a.weight"]
    aockpt.unpack(tmp_path / "p", tmp_path / "x.pt")
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert back["lm_head.weight"].data_ptr() == back["embed.weight"].data_ptr()


def test_names_that_prefix_each_other_and_have_no_dot(tmp_path):
    q1, q2 = CASES["int8-weight-only"][1](), CASES["int8-dynamic"][1]()
    state = {"weight": q1, "layer.w": q2, "layer.w_scale": torch.ones(3), "layer.ww": q1.dequantize()}
    aockpt.save(state, tmp_path / "p")
    loaded = aockpt.load_quantized(tmp_path / "p")
    for name in state:
        assert_same_tensor(loaded[name], state[name])


def test_key_collision_is_refused(tmp_path):
    state = {"m.w": CASES["int8-weight-only"][1](), "m._w_qdata": torch.zeros(1)}
    with pytest.raises(aockpt.UnsupportedTensorError, match="both need the stored key"):
        aockpt.save(state, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_sharding_keeps_parts_together_and_loads(tmp_path):
    state = {f"layers.{i}.weight": CASES["int8-weight-only"][1]() for i in range(6)}
    aockpt.save(state, tmp_path / "p", max_shard_size=20_000)
    index = json.loads((tmp_path / "p" / fmt.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == "model-00001-of-%05d.safetensors" % len(shards)
    for i in range(6):
        assert len({index["weight_map"][k] for k in index["weight_map"] if k.startswith(f"layers.{i}.")}) == 1
    loaded = aockpt.load_quantized(tmp_path / "p", keys=["layers.3.weight"])
    assert list(loaded) == ["layers.3.weight"]
    assert_same_tensor(loaded["layers.3.weight"], state["layers.3.weight"])


def test_unknown_keys_are_reported(tmp_path):
    aockpt.save({"a": torch.ones(2)}, tmp_path / "p")
    with pytest.raises(KeyMismatchError, match="no tensor named b, c"):
        aockpt.load_quantized(tmp_path / "p", keys=["a", "b", "c"])


def test_verify_names_the_tensor_whose_byte_flipped(tmp_path):
    state = {"x.weight": CASES["int8-weight-only"][1](), "y.bias": torch.ones(16)}
    aockpt.save(state, tmp_path / "p")
    assert aockpt.verify(tmp_path / "p").tensors == 2
    path = tmp_path / "p" / fmt.WEIGHTS_NAME
    with SafetensorsFile(path) as f:
        slot, start = f.slots["x._weight_qdata"], f._data_start
    data = bytearray(path.read_bytes())
    data[start + slot.begin + 7] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"x.weight \(part qdata\)"):
        aockpt.verify(tmp_path / "p")
    with pytest.raises(CorruptCheckpointError, match="x.weight"):
        aockpt.load_quantized(tmp_path / "p", verify=True)


def test_verify_names_every_changed_tensor_in_order(tmp_path):
    """Tensors are hashed several at a time; the error still names every changed one, in stored order."""
    aockpt.save({f"t{i:02d}": torch.full((4096,), float(i)) for i in range(24)}, tmp_path / "p")
    path = tmp_path / "p" / fmt.WEIGHTS_NAME
    with SafetensorsFile(path) as f:
        starts = {k: f._data_start + f.slots[k].begin for k in ("t03", "t11", "t17")}
    data = bytearray(path.read_bytes())
    for at in starts.values():
        data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"3 tensor part\(s\) .*: t03 \(part data\), t11 \(part data\), "
                       r"t17 \(part data\);"):
        aockpt.verify(tmp_path / "p")


def test_destination_is_never_replaced_without_force(tmp_path):
    aockpt.save({"a": torch.ones(2)}, tmp_path / "p")
    with pytest.raises(UsageError, match="already exists"):
        aockpt.save({"a": torch.zeros(2)}, tmp_path / "p")
    aockpt.save({"a": torch.zeros(2)}, tmp_path / "p", force=True)
    assert torch.equal(aockpt.load_quantized(tmp_path / "p")["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_inspect_reports_every_tensor(tmp_path):
    state = {"q.weight": CASES["int4-tile-packed"][1](), "e.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}
    aockpt.save(state, tmp_path / "p")
    info = aockpt.inspect(tmp_path / "p", devices=["cpu", "cuda"])
    rows = {t.name: t for t in info.tensors}
    assert rows["q.weight"].type == "Int4TilePackedTo4dTensor" and rows["q.weight"].portability == "pinned"
    assert rows["q.weight"].packer == "cuda-tinygemm" and not rows["q.weight"].devices["cpu"].loads
    assert rows["q.weight"].devices["cuda"].runs
    assert rows["e.weight"].nbytes == 32 and info.producer["aockpt"] == aockpt.__version__
    assert info.total_bytes == sum(t.nbytes for t in info.tensors) and info.bf16_bytes == 2 * (64 * 128 + 16)


def test_bad_device_is_a_usage_error(tmp_path):
    aockpt.save({"a": torch.ones(2)}, tmp_path / "p")
    with pytest.raises(UsageError, match="not a device"):
        aockpt.load_quantized(tmp_path / "p", "gpu0")


def test_verify_refuses_torchao_records_that_disagree_with_aockpts(tmp_path):
    """Stock loaders read torchao's records: a file whose records lie to them must not pass verify."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    aockpt.save({"x.weight": CASES["int8-dynamic"][1]()}, tmp_path / "p")
    path = tmp_path / "p" / fmt.WEIGHTS_NAME
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(metadata["x.weight"])
    record["_data"]["act_quant_kwargs"] = None  # stock loaders would now see a weight-only tensor
    save_file(tensors, path, metadata={**metadata, "x.weight": json.dumps(record)})
    aockpt.load_quantized(tmp_path / "p", verify=True)  # aockpt's own record and digests are intact
    with pytest.raises(CorruptCheckpointError, match="torchao's record of x.weight disagrees"):
        aockpt.verify(tmp_path / "p")
