"""On-disk layout rules: keys, records, index names, determinism, and old files read by this reader."""

import json
import random
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import aockpt
from aockpt import format as fmt
from aockpt.errors import AockptError, CorruptCheckpointError, UnsupportedTensorError
from conftest import CASES, K, N, weight
from hostile import mutate_record, rewrite_header

FIXTURES = Path(__file__).parent.parent / "fixtures" / "format"


@pytest.mark.parametrize("name, inner, key", [
    ("model.layers.0.proj.weight", "qdata", "model.layers.0.proj._weight_qdata"),
    ("weight", "scale", "_weight_scale"),
])
def test_part_key_follows_torchao(name, inner, key):
    assert fmt.part_key(name, inner) == key


@pytest.mark.parametrize("name", ["../evil.safetensors", "/abs.safetensors", "a/b.safetensors", "C:x", "..",
                                  "a\\b", "nul\x00.safetensors", "", 3])
def test_index_shard_names_stay_inside_the_folder(name):
    with pytest.raises(CorruptCheckpointError, match="plain file name"):
        fmt.index_from_json(json.dumps({"weight_map": {"a": name}}), "index")


@pytest.mark.parametrize("version, ok", [("1.0.0", True), ("1.7.2", True), ("2.0.0", False), ("1.0", False),
                                         (1, False)])
def test_format_versions(version, ok):
    if ok:
        assert fmt.check_version(version, "f") == version
    else:
        with pytest.raises(CorruptCheckpointError):
            fmt.check_version(version, "f")


def _record(tmp_path):
    aockpt.save({"w": CASES["int8-weight-only"][1]()}, tmp_path / "p")
    from aockpt.safetensors_io import SafetensorsFile

    with SafetensorsFile(tmp_path / "p" / fmt.WEIGHTS_NAME) as f:
        return json.loads(f.metadata[fmt.RECORD_KEY])


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(extra=1), "expected keys"),
    (lambda r: r["tensors"]["w"].update(type=7), "unexpected value"),
    (lambda r: r["tensors"]["w"].update(dtype="evil"), "unexpected value"),
    (lambda r: r["tensors"]["w"]["parts"]["qdata"].pop("digest"), "expected keys"),
    (lambda r: r["tensors"]["w"].update(shape=[-1]), "non-negative"),
    (lambda r: r.update(format_version="9.0.0"), "upgrade aockpt"),
    (lambda r: r.update(digest="md5"), "digest algorithm"),
])
def test_record_parser_refuses(tmp_path, mutate, message):
    record = _record(tmp_path)
    mutate(record)
    with pytest.raises(CorruptCheckpointError, match=message):
        fmt.record_from_json(json.dumps(record), "r")


def test_output_does_not_depend_on_dict_order(tmp_path):
    q, b = CASES["int8-dynamic"][1](), torch.ones(3)
    aockpt.save({"a.weight": q, "a.bias": b}, tmp_path / "one")
    aockpt.save({"a.bias": b, "a.weight": q}, tmp_path / "two")
    one, two = (tmp_path / d / fmt.WEIGHTS_NAME for d in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()


def test_format_1_0_0_file_reads_exactly():
    """Old file, new reader: a committed file written by format 1.0.0."""
    expected = load_file(FIXTURES / "v1.0.0.expected.safetensors")
    state = aockpt.load_quantized(FIXTURES / "v1.0.0", verify=True)
    assert state["tied"] is state["0.weight"]
    for name in ("0.weight", "1.weight"):
        assert torch.equal(state[name].dequantize(), expected[f"{name}.dequantized"])
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)).to(torch.bfloat16)
    model.load_state_dict({k: v for k, v in state.items() if k != "tied"}, assign=True)
    with torch.no_grad():
        assert torch.equal(model(expected["input"]), expected["output"])


def test_sharded_checkpoint_in_the_hugging_face_cache_layout_loads(tmp_path):
    """snapshots/<rev>/ holds links into ../../blobs: the one place shards may live outside their folder."""
    state = {f"layers.{i}.weight": CASES["int8-weight-only"][1]() for i in range(3)}
    aockpt.save(state, tmp_path / "p", max_shard_size=20_000)
    repo = tmp_path / "hub" / "models--me--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "p").iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "blobs" / "cfg").write_text("{}")
    (snapshot / "config.json").symlink_to(Path("..") / ".." / "blobs" / "cfg")
    loaded = aockpt.load_quantized(snapshot, verify=True)
    assert sorted(loaded) == sorted(state)
    aockpt.pack(snapshot, tmp_path / "repacked")
    assert (tmp_path / "repacked" / "config.json").read_text() == "{}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for f in sorted((tmp_path / "p").iterdir()):
        (elsewhere / f.name).symlink_to(f)
    with pytest.raises(CorruptCheckpointError, match="points outside"):
        aockpt.load_quantized(elsewhere)


def test_format_1_0_0_file_passes_verify():
    """Old file, new verify: digests, structure and torchao records of a committed 1.0.0 file."""
    assert aockpt.verify(FIXTURES / "v1.0.0").tensors == 5


# ---- one source of truth: the record's part keys are exactly torchao's key convention ----

def _int8(seed: int) -> torch.Tensor:
    """A real Int8Tensor weight (same type and attributes for every seed, different bytes)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    layer.weight.data = weight(seed)
    quantize_(layer, Int8WeightOnlyConfig())
    return layer.weight.detach()


def _two_of_each(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A packed file with two quantized tensors and two plain ones whose torchao records are identical."""
    state = {"a.weight": _int8(1), "b.weight": _int8(2), "a.bias": torch.ones(N), "b.bias": torch.full((N,), 2.0)}
    aockpt.save(state, tmp_path / "p")
    return tmp_path / "p" / fmt.WEIGHTS_NAME, state


def _swap(first: str, second: str) -> Callable[[dict], None]:
    """Swap two tensors' parts maps (keys and digests) in the aockpt record."""
    def edit(record: dict) -> None:
        tensors = record["tensors"]
        tensors[first]["parts"], tensors[second]["parts"] = tensors[second]["parts"], tensors[first]["parts"]
    return edit


def _rename(old: str, new: str) -> Callable[[dict], None]:
    """Rename one tensor in the aockpt record only (its stored keys and torchao records stay)."""
    return lambda record: record["tensors"].update({new: record["tensors"].pop(old)})


def _rename_everywhere_but_keys(header: dict) -> None:
    """Rename a.weight in the aockpt record, torchao's records and tensor_names, leaving the stored keys."""
    meta = header["__metadata__"]
    meta["c.weight"] = meta.pop("a.weight")
    meta["tensor_names"] = json.dumps(sorted(n.replace("a.weight", "c.weight") for n in json.loads(meta["tensor_names"])))
    mutate_record(_rename("a.weight", "c.weight"))(header)


KEY_EDITS: dict[str, tuple[Callable[[dict], None], str]] = {
    "swap-quantized-parts-and-digests": (mutate_record(_swap("a.weight", "b.weight")), "a.weight"),
    "swap-plain-tensors": (mutate_record(_swap("a.bias", "b.bias")), "a.bias"),
    "rename-quantized-in-record": (mutate_record(_rename("a.weight", "c.weight")), "c.weight"),
    "rename-plain-in-record": (mutate_record(_rename("a.bias", "c.bias")), "c.bias"),
    "rename-everywhere-but-keys": (_rename_everywhere_but_keys, "c.weight"),
    "one-part-to-another-tensor": (
        mutate_record(lambda r: r["tensors"]["a.weight"]["parts"]["scale"].update(
            r["tensors"]["b.weight"]["parts"]["scale"])), "a.weight"),
}


def _stock_torchao(path: Path) -> dict[str, torch.Tensor]:
    """What stock torchao reads: safetensors' load_file, then torchao's own unflatten over the header metadata."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    built, _ = unflatten_tensor_state_dict(load_file(path), metadata)
    return built


@pytest.mark.parametrize("edit", sorted(KEY_EDITS))
def test_a_record_that_stock_readers_read_differently_is_refused(tmp_path, edit):
    """Edits that keep every digest right but make aockpt and stock torchao read different tensors."""
    mutate, tensor = KEY_EDITS[edit]
    path, state = _two_of_each(tmp_path)
    rewrite_header(path, mutate)
    stock = _stock_torchao(path)  # stock follows the key convention, not aockpt's record
    for name in set(stock) & set(state):
        assert torch.equal(stock[name].dequantize() if hasattr(stock[name], "qdata") else stock[name],
                           state[name].dequantize() if hasattr(state[name], "qdata") else state[name])
    for operation in (aockpt.verify, aockpt.load_quantized, aockpt.inspect):
        with pytest.raises(CorruptCheckpointError) as info:
            operation(path.parent)
        message = str(info.value)
        assert tensor in message and str(path) in message and "\n" not in message


def test_swapping_both_records_and_their_keys_consistently_is_read_alike(tmp_path):
    """Swapping the stored keys too gives a file every reader reads the same way: verify passes, loads agree."""
    path, state = _two_of_each(tmp_path)

    def swap_stored(header: dict) -> None:
        for inner in ("qdata", "scale"):
            a, b = f"a._weight_{inner}", f"b._weight_{inner}"
            header[a], header[b] = header[b], header[a]
        mutate_record(_swap("a.weight", "b.weight"))(header)
        mutate_record(lambda r: [p.update(key=p["key"].replace("b.", "@").replace("a.", "b.").replace("@", "a."))
                                 for n in ("a.weight", "b.weight") for p in r["tensors"][n]["parts"].values()])(header)

    rewrite_header(path, swap_stored)
    aockpt.verify(path.parent)
    ours, stock = aockpt.load_quantized(path.parent), _stock_torchao(path)
    for name in ("a.weight", "b.weight"):
        assert torch.equal(ours[name].qdata, stock[name].qdata)
    assert torch.equal(ours["a.weight"].qdata, state["b.weight"].qdata)


def test_a_key_under_another_tensors_prefix_is_refused_on_write_and_read(tmp_path):
    """Stock torchao collects `m._w_*` as m.w's parts: a second tensor there makes it skip m.w silently."""
    with pytest.raises(UnsupportedTensorError, match="m._w_"):
        aockpt.save({"m.w": _int8(1), "m.w_x": _int8(2)}, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    aockpt.save({"m.w": _int8(1), "m.y": torch.ones(3)}, tmp_path / "p")
    path = tmp_path / "p" / fmt.WEIGHTS_NAME

    def rename_plain(header: dict) -> None:
        header["m._w_x"] = header.pop("m.y")
        meta = header["__metadata__"]
        meta["m._w_x"] = meta.pop("m.y")
        meta["tensor_names"] = json.dumps(["m._w_x", "m.w"])
        mutate_record(lambda r: r["tensors"].update({"m._w_x": r["tensors"].pop("m.y")}))(header)
        mutate_record(lambda r: r["tensors"]["m._w_x"]["parts"]["data"].update(key="m._w_x"))(header)

    rewrite_header(path, rename_plain)
    assert "m.w" not in _stock_torchao(path)  # stock drops it without a word
    for operation in (aockpt.verify, aockpt.load_quantized):
        with pytest.raises(CorruptCheckpointError, match=r"'m._w_x' starts with the prefix of tensor 'm.w'"):
            operation(path.parent)


def test_every_part_of_every_registry_type_is_stored_under_the_convention_key(tmp_path):
    """The writer's keys pass the reader's check for every conftest case (one rule, both sides)."""
    state = {f"layer{i}.weight": make() for i, (_, make) in enumerate(CASES.values())}
    aockpt.save(state, tmp_path / "p")
    assert aockpt.verify(tmp_path / "p").tensors == len(state)


def test_stock_from_pretrained_reads_each_tensor_by_its_own_keys_where_aockpt_refuses(tmp_path):
    """transformers finds a tensor's parts by the key convention: with two layers' parts maps swapped in the
    record it loads each layer's own bytes, so aockpt refusing the file is what keeps the two readers one."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    from conftest import tiny_model

    model = tiny_model(layers=2)
    quantize_(model, Int8WeightOnlyConfig())
    aockpt.save_pretrained(model, tmp_path / "p")
    first, second = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    path = tmp_path / "p" / fmt.WEIGHTS_NAME
    rewrite_header(path, mutate_record(_swap(first, second)))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.bfloat16).state_dict()
    original = model.state_dict()
    assert all(torch.equal(stock[n].qdata, original[n].qdata) for n in (first, second))
    for operation in (aockpt.verify, aockpt.load_quantized, aockpt.load_pretrained):
        with pytest.raises(CorruptCheckpointError, match=f"{first}.*{path}|{path}.*{first}"):
            operation(tmp_path / "p")


# ---- property: whatever is edited, verify passes only if stock torchao reads what aockpt reads ----

def _pick_two(rng: random.Random, names: list[str]) -> tuple[str, str]:
    first, second = rng.sample(sorted(names), 2)
    return first, second


def _record_of(header: dict) -> dict:
    return json.loads(header["__metadata__"][fmt.RECORD_KEY])


def _edit(header: dict, rng: random.Random) -> None:
    """One hostile edit of a shard header: the record, torchao's records, or the stored entries."""
    record, meta = _record_of(header), header["__metadata__"]
    tensors = record["tensors"]
    stored = [k for k in header if k != "__metadata__"]
    parts = [(n, i) for n, e in tensors.items() for i in e["parts"]]
    kind = rng.randrange(7)
    if kind == 0:  # swap two tensors' parts maps (keys and digests move together)
        a, b = _pick_two(rng, list(tensors))
        tensors[a]["parts"], tensors[b]["parts"] = tensors[b]["parts"], tensors[a]["parts"]
    elif kind == 1:  # swap two parts' digests
        (a, i), (b, j) = rng.sample(parts, 2)
        pa, pb = tensors[a]["parts"][i], tensors[b]["parts"][j]
        pa["digest"], pb["digest"] = pb["digest"], pa["digest"]
    elif kind == 2:  # rename a tensor in the record, maybe onto another's name
        old = rng.choice(sorted(tensors))
        tensors[rng.choice(["c.weight", "c.bias", *sorted(tensors)])] = tensors.pop(old)
    elif kind == 3:  # swap two stored entries (same bytes layout where dtype and shape agree)
        a, b = _pick_two(rng, stored)
        header[a], header[b] = header[b], header[a]
    elif kind == 4:  # point one part at another stored key
        n, i = rng.choice(parts)
        tensors[n]["parts"][i]["key"] = rng.choice(stored)
    elif kind == 5:  # swap two tensors' torchao records
        a, b = _pick_two(rng, [n for n in json.loads(meta["tensor_names"]) if n in meta])
        meta[a], meta[b] = meta[b], meta[a]
    else:  # rename a stored key, and maybe the record's part that names it
        old = rng.choice(stored)
        new = old.replace("a.", "c.", 1) if rng.random() < 0.5 else old + "_x"
        header[new] = header.pop(old)
        for entry in tensors.values():
            for part in entry["parts"].values():
                if part["key"] == old and rng.random() < 0.5:
                    part["key"] = new
    meta[fmt.RECORD_KEY] = json.dumps(record)


def _same(ours: torch.Tensor, stock: torch.Tensor) -> bool:
    """Same type and, part by part, the same bytes."""
    if type(ours) is not type(stock):
        return False
    if type(ours) is torch.Tensor:
        return ours.dtype == stock.dtype and torch.equal(ours, stock)
    names, _ = ours.__tensor_flatten__()
    return all(torch.equal(getattr(ours, n), getattr(stock, n)) for n in names)


@settings(derandomize=True, database=None, deadline=None, max_examples=150)
@given(seed=st.integers(0, 2**32 - 1), edits=st.integers(1, 3))
def test_verify_passes_only_when_stock_torchao_reads_the_same_tensors(tmp_path_factory, seed, edits):
    folder = tmp_path_factory.mktemp("edit")
    path, _ = _two_of_each(folder)
    rng = random.Random(seed)
    for _ in range(edits):
        rewrite_header(path, lambda header: _edit(header, rng))
    try:
        aockpt.verify(path.parent)
    except AockptError as e:
        assert "\n" not in str(e)
        return
    ours, stock = aockpt.load_quantized(path.parent), _stock_torchao(path)
    assert sorted(ours) == sorted(stock)
    assert all(_same(ours[name], stock[name]) for name in ours)
