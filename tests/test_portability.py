"""Checkpoints made on a real H100 (fixtures/cuda, fixtures/legacy/ao0.13-cuda): rules and exact re-layout."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import aockpt
from aockpt import relayout
from aockpt.errors import PortabilityError
from conftest import assert_close_in_bf16_ulps, dequantize
from mlp import run_mlp

ROOT = Path(__file__).parent.parent / "fixtures"
CUDA = ROOT / "cuda"
LEGACY_CUDA = ROOT / "legacy" / "ao0.13-cuda"
INT4 = ["linear_int4_tile_g32", "linear_int4_tile_g64"]
PORTABLE = ["linear_int8_wo", "linear_int8_dyn", "linear_float8_wo", "linear_float8_dyn_row", "linear_float8_dyn_tensor"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", INT4)
def test_cuda_int4_is_refused_on_cpu_then_relaid_out_exactly(name, suffix):
    path = CUDA / f"{name}{suffix}"
    with pytest.raises(PortabilityError, match=r"2 tensor\(s\) cannot load on cpu: 0.weight is Int4TilePackedTo4dTensor"):
        aockpt.load_quantized(path, "cpu")
    state = aockpt.load_quantized(path, "cpu", relayout=True)
    expected = load_file(CUDA / f"{name}.expected.safetensors")
    for layer in ("0.weight", "2.weight"):
        assert type(state[layer]).__name__ == "Int4OpaqueTensor"
        got, want = dequantize(state[layer]), expected[f"dequantized.{layer}"]
        assert torch.equal(got.float(), want.float()), layer
    assert_close_in_bf16_ulps(run_mlp(state, expected["input"]), expected["output"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", PORTABLE)
def test_cuda_int8_and_float8_load_on_cpu(name, suffix, tmp_path):
    aockpt.pack(CUDA / f"{name}{suffix}", tmp_path / "p")
    state = aockpt.load_quantized(tmp_path / "p", "cpu", verify=True)
    expected = load_file(CUDA / f"{name}.expected.safetensors")
    for layer in ("0.weight", "2.weight"):
        assert torch.equal(state[layer].dequantize(), expected[f"dequantized.{layer}"]), layer
    assert_close_in_bf16_ulps(run_mlp(state, expected["input"]), expected["output"])


@pytest.mark.parametrize("name", ["llama_int8_wo", "llama_int8_dyn", "llama_float8_wo", "llama_float8_dyn_row"])
def test_transformers5_cuda_folder_packs_and_loads_with_stock_transformers_on_cpu(name, tmp_path):
    aockpt.pack(CUDA / name, tmp_path / "p")
    expected = load_file(CUDA / f"{name}.expected.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    with torch.no_grad():
        assert_close_in_bf16_ulps(model(expected["input_ids"]).logits, expected["logits"], 8)


def test_transformers5_cuda_int4_folder_runs_on_cpu_with_relayout(tmp_path):
    folder = CUDA / "llama_int4_tile_g32"
    with pytest.raises(PortabilityError, match="relayout=True"):
        aockpt.load_pretrained(folder, "cpu")
    model = aockpt.load_pretrained(folder, "cpu", relayout=True)
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int4OpaqueTensor"
    expected = load_file(CUDA / "llama_int4_tile_g32.expected.safetensors")
    with torch.no_grad():
        assert_close_in_bf16_ulps(model(expected["input_ids"]).logits, expected["logits"], 8)


@pytest.mark.parametrize("name", ["linear_int4_tc_tiled_g32", "linear_int4_tc_tiled_ik4_g64", "linear_float8_wo_aqt",
                                  "linear_float8_dyn_row_aqt", "linear_float8_dyn_tensor_aqt"])
def test_legacy_cuda_pickles_migrate_and_run_on_cpu(name):
    state = aockpt.load_quantized(LEGACY_CUDA / f"{name}.pt", "cpu", relayout=True)
    if "dyn" in name:
        granularity = state["0.weight"].act_quant_kwargs.granularity
        assert type(granularity).__name__ == ("PerRow" if "row" in name else "PerTensor")
    expected = load_file(LEGACY_CUDA / f"{name}.expected.safetensors")
    assert_close_in_bf16_ulps(run_mlp(state, expected["input"]), expected["output"])


@pytest.mark.parametrize("name", ["linear_float8_dyn_row", "linear_float8_dyn_tensor"])
@pytest.mark.parametrize("shape", [(1, 192), (2, 3, 192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_dynamic_float8_runs_bare_f_linear_on_cpu(name, shape, dtype):
    """Measured for docs/portability.md: torch 2.13's CPU float8 scaled mm runs these (with their mm_config)."""
    weight = aockpt.load_quantized(CUDA / f"{name}.pt", "cpu")["0.weight"]
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert torch.nn.functional.linear(x, weight).shape == (*shape[:-1], 64)


def test_inspect_answers_will_it_run(tmp_path):
    info = aockpt.inspect(CUDA / "linear_int4_tile_g32.pt", devices=["cpu", "cuda"])
    weight = next(t for t in info.tensors if t.name == "0.weight")
    assert not weight.devices["cpu"].loads and weight.devices["cuda"].runs


def test_pack_for_cpu_then_back_for_cuda_is_exact(tmp_path):
    """CUDA tile layout -> packed for cpu -> packed for cuda (on a machine without CUDA): same bytes as torch's."""
    source = CUDA / "linear_int4_tile_g32.pt"
    aockpt.pack(source, tmp_path / "cpu", device="cpu")
    info = {t.name: t for t in aockpt.inspect(tmp_path / "cpu").tensors}
    assert info["0.weight"].type == "Int4OpaqueTensor" and info["0.weight"].packer == relayout.cpu_packer()
    state = aockpt.load_quantized(tmp_path / "cpu", "cpu")
    expected = load_file(CUDA / "linear_int4_tile_g32.expected.safetensors")
    assert_close_in_bf16_ulps(run_mlp(state, expected["input"]), expected["output"])
    aockpt.pack(tmp_path / "cpu", tmp_path / "cuda", device="cuda")
    original = aockpt.inspect(source)
    again = {t.name: t for t in aockpt.inspect(tmp_path / "cuda").tensors}
    assert again["0.weight"].type == "Int4TilePackedTo4dTensor" and again["0.weight"].packer == "cuda-tinygemm"
    from aockpt.sources import open_source

    first, second = open_source(source), open_source(tmp_path / "cuda")
    for layer in ("0.weight", "2.weight"):
        a, b = first.flat(layer), second.flat(layer)
        for part in ("qdata", "scale_and_zero"):
            assert torch.equal(a.parts[part].view(torch.uint8), b.parts[part].view(torch.uint8)), (layer, part)
    assert {t.name for t in original.tensors} == set(again)


def test_docs_table_matches_the_registry():
    """docs/portability.md's rules table is kept beside the registry: one row per type, same facts."""
    from aockpt.registry import TENSOR_TYPES, Portability

    text = (ROOT.parent / "docs" / "portability.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in TENSOR_TYPES}
    assert set(rows) == set(TENSOR_TYPES)
    for name, entry in TENSOR_TYPES.items():
        lives, packed_for, kernels, _ = rows[name]
        assert lives == ("any device" if entry.portability is Portability.PORTABLE else entry.packed_for), name
        assert packed_for == (entry.packed_for or "-"), name
        assert kernels == ", ".join(sorted(entry.kernels)), name


def test_inspect_and_pack_record_where_a_pickle_was_made(tmp_path):
    """torch pickles keep each storage's location; aockpt reads it from the opcodes and records it."""
    assert {t.device for t in aockpt.inspect(CUDA / "linear_int8_wo.pt").tensors} == {"cuda"}
    aockpt.pack(CUDA / "linear_int8_wo.pt", tmp_path / "p")
    assert {t.device for t in aockpt.inspect(tmp_path / "p").tensors} == {"cuda"}
    assert {t.device for t in aockpt.inspect(ROOT / "legacy" / "ao0.13" / "int8wo_legacy_container.pt").tensors} == {"cpu"}


def test_cpu_int4_packed_for_another_instruction_set_is_refused_then_relaid_out(tmp_path):
    """AVX512 and AVX2 interleave int4 rows differently: loading the other ISA's bytes would be silently wrong."""
    from aockpt.relayout import cpu
    from aockpt.writer import SourceTensor, write_packed
    from conftest import CASES

    original = CASES["int4-opaque"][1]()
    names, attrs = original.__tensor_flatten__()
    canon = cpu.to_canonical({n: getattr(original, n) for n in names}, attrs, relayout.cpu_packer())
    other = next(p for p in cpu.PACKINGS if p != relayout.cpu_packer())
    parts, new_attrs, packer = cpu.from_canonical(canon, packer=other)
    foreign = type(original)(parts["qdata"], parts["scale_and_zero"], new_attrs["block_size"], new_attrs["shape"])
    write_packed([SourceTensor("w", foreign, "cpu", packer)], tmp_path)
    with pytest.raises(PortabilityError, match=f"packed by {other} but this machine"):
        aockpt.load_quantized(tmp_path, "cpu")
    fixed = aockpt.load_quantized(tmp_path, "cpu", relayout=True)["w"]
    assert torch.equal(fixed.qdata, original.qdata) and torch.equal(fixed.scale_and_zero, original.scale_and_zero)


# --- CPU int4 files that do not say which packer wrote them (issue: AVX512 vs AVX2) -----------------

LEGACY_INT4 = ROOT / "legacy" / "ao0.13" / "int4cpu.pt"  # packed by an AVX2 torch (its manifest says cpu-avx2)
_MAKE_INT4_PICKLE = """
import sys, torch
from torchao.prototype.quantization.int4 import Int4OpaqueTensor
from aockpt.relayout import cpu_packer
w = torch.randn(96, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
torch.save({"w": Int4OpaqueTensor.from_hp(w, [1, 32]), "b": torch.ones(96)}, sys.argv[1])
print(cpu_packer())
"""


def _here_from_hp():
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    return Int4OpaqueTensor.from_hp(w, [1, 32])


@pytest.fixture(scope="module")
def int4_pickles(tmp_path_factory):
    """A torchao 0.18 Int4OpaqueTensor pickle (no packer recorded) made by torch under each x86 capability."""
    import os
    import subprocess
    import sys

    made = {}
    for capability in ("avx512", "avx2"):
        path = tmp_path_factory.mktemp(capability) / "int4.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, PYTHONPATH=str(ROOT.parent))
        out = subprocess.run([sys.executable, "-c", _MAKE_INT4_PICKLE, str(path)], env=env, capture_output=True,
                             text=True, check=True)
        made[capability] = (path, out.stdout.strip().splitlines()[-1])
    return made


@pytest.mark.cpu_int4
@pytest.mark.parametrize("capability", ["avx512", "avx2"])
def test_cpu_int4_pickle_is_refused_unless_its_packer_is_stated_then_exact(int4_pickles, capability, tmp_path):
    """Made under AVX512 or AVX2, read on this machine (AVX512 natively, AVX2 under CI's rerun): bit-identical
    with the packer stated, a refusal naming the choice without it, and never a permuted tensor."""
    path, packer = int4_pickles[capability]
    if packer != f"cpu-{capability}":
        pytest.skip(f"this CPU cannot run torch's {capability} kernels")
    for attempt in (lambda: aockpt.load_quantized(path, "cpu"), lambda: aockpt.pack(path, tmp_path / "p"),
                    lambda: aockpt.unpack(path, tmp_path / "u.pt")):
        with pytest.raises(PortabilityError, match=r"int4 tensor\(s\) do not record which CPU packer wrote "
                                                   r"them \(w\).*cpu_packer=.*cpu-avx2.*native"):
            attempt()
    want = _here_from_hp()
    aockpt.pack(path, tmp_path / "p", cpu_packer=packer)
    assert {t.name: t.packer for t in aockpt.inspect(tmp_path / "p").tensors}["w"] == packer
    for loaded in (aockpt.load_quantized(path, "cpu", cpu_packer=packer, relayout=True)["w"],
                   aockpt.load_quantized(tmp_path / "p", "cpu", relayout=True)["w"]):
        assert torch.equal(loaded.qdata, want.qdata) and torch.equal(loaded.scale_and_zero, want.scale_and_zero)
    if packer != relayout.cpu_packer():  # what guessing "this machine" would have done: rows permuted
        with pytest.raises(PortabilityError, match=f"packed by {packer} but this machine"):
            aockpt.load_quantized(path, "cpu", cpu_packer=packer)
        guessed = aockpt.load_quantized(path, "cpu", cpu_packer="native")["w"]
        assert not torch.equal(guessed.qdata, want.qdata)


@pytest.mark.cpu_int4
def test_native_names_this_machines_packer(tmp_path):
    torch.save({"w": _here_from_hp()}, tmp_path / "here.pt")
    loaded = aockpt.load_quantized(tmp_path / "here.pt", "cpu", cpu_packer="native")["w"]
    assert torch.equal(loaded.qdata, _here_from_hp().qdata)
    assert aockpt.inspect(tmp_path / "here.pt", cpu_packer="native").tensors[0].packer == relayout.cpu_packer()


@pytest.mark.cpu_int4
def test_inspect_lists_the_candidate_packers_per_tensor():
    info = {t.name: t for t in aockpt.inspect(LEGACY_INT4, devices=["cpu"]).tensors}
    assert info["0.weight"].packer is None and info["0.weight"].packer_candidates == ["cpu-avx512", "cpu-avx2", "cpu-default"]
    assert not info["0.weight"].devices["cpu"].loads
    assert info["0.weight"].devices["cpu"].reason.startswith("CPU packer unknown")
    assert info["0.bias"].packer_candidates == []
    stated = {t.name: t for t in aockpt.inspect(LEGACY_INT4, devices=["cpu"], cpu_packer="cpu-avx2").tensors}
    assert stated["0.weight"].packer == "cpu-avx2" and stated["0.weight"].packer_candidates == []


@pytest.mark.cpu_int4
def test_a_recorded_packer_wins_and_a_contradiction_or_typo_is_a_usage_error(tmp_path):
    from aockpt.errors import UsageError

    aockpt.pack(LEGACY_INT4, tmp_path / "p", cpu_packer="cpu-avx2")
    assert aockpt.load_quantized(tmp_path / "p", "cpu", cpu_packer="cpu-avx2", relayout=True)
    with pytest.raises(UsageError, match="0.weight records that cpu-avx2 packed it, but cpu_packer='cpu-default'"):
        aockpt.load_quantized(tmp_path / "p", "cpu", cpu_packer="cpu-default")
    with pytest.raises(UsageError, match="'cpu-neon' is not a CPU int4 packer; use one of native, cpu-avx512"):
        aockpt.inspect(LEGACY_INT4, cpu_packer="cpu-neon")


@pytest.mark.cpu_int4
def test_a_16_row_weight_reads_the_same_under_every_packer_so_needs_no_choice(tmp_path):
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    small = Int4OpaqueTensor.from_hp(torch.randn(16, 64, dtype=torch.bfloat16), [1, 32])
    torch.save({"w": small}, tmp_path / "small.pt")
    assert aockpt.inspect(tmp_path / "small.pt").tensors[0].packer_candidates == []
    assert torch.equal(aockpt.load_quantized(tmp_path / "small.pt", "cpu")["w"].qdata, small.qdata)
