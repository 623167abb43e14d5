"""Legacy torchao checkpoints (0.7-0.17) written by the real old releases: load safely, migrate exactly."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file
from torchao.prototype.quantization.int4 import Int4OpaqueTensor
from torchao.quantization.quant_primitives import _dequantize_affine_tinygemm, _quantize_affine_tinygemm
from torchao.quantization.utils import unpack_tinygemm_scales_and_zeros

from aockpt import codec, legacy, sources
from aockpt.codec import FlatTensor
from aockpt.relayout import cpu, relayout
from conftest import assert_close_in_bf16_ulps, dequantize
from mlp import run_mlp
from aockpt.errors import AockptError, CorruptCheckpointError, UnsupportedTensorError
from aockpt.unpickle import safe_load

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "legacy"
# Every fixture records its input, output and the old release's dequantized weights.
PICKLES = sorted(FIXTURES.glob("ao*/*.pt"))
# Their int4 is CUDA tinygemm-packed: it computes on CPU only after relayout (the pack/load test does that).
CUDA_PINNED = {"linear_int4_tc_tiled_g32", "linear_int4_tc_tiled_ik4_g64", "linear_AQInt4G64WeightOnlyQuantizedLinearWeight"}
# Their int8 runs anywhere; the CPU int4 folders need their packer and go through tests/test_interop.py.
HF_FOLDERS = sorted(p.parent for p in FIXTURES.glob("ao*/*/pytorch_model.bin") if "int4cpu" not in p.parent.name)

# Fixtures whose old output the migrated model reproduces bit for bit (same weight math, same matmul).
EXACT_OUTPUT = {"int8wo", "int8wo_legacy_container", "int4cpu", "intx4wo_qdq", "uint4wo", "uint6wo"}
# torchao 0.7 and 0.8 had no CPU int4 kernel dispatch: their output is dequantize() + F.linear, not the kernel's.
DEQUANTIZED_MATMUL = {"ao0.7/int4cpu.pt", "ao0.8/int4cpu.pt"}
# The rest quantize activations (torchao 0.18 uses the full int8 range where 0.13 used -127..127)
# or run float8 through another CPU path: their outputs agree to a few bf16 ulps of the largest output.
ULPS_OF_MAX = 4

# Dequantized weights exactly as the old release computed them: Int4OpaqueTensor has no dequantize(),
# so it goes through the old release's own path (kernel on an identity, tinygemm re-quantize/dequantize).
def _int4_cpu_dequantize(t: Int4OpaqueTensor) -> torch.Tensor:
    n, k = t.shape
    group = t.block_size[-1]
    plain = torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.eye(k, dtype=t.scale_and_zero.dtype), t.qdata, group, t.scale_and_zero
    ).t().contiguous()
    scale, zero = (x.reshape(x.shape[:-1]) for x in unpack_tinygemm_scales_and_zeros(t.scale_and_zero))
    q = _quantize_affine_tinygemm(plain, (1, group), scale, zero, torch.int32, 0, 15)
    return _dequantize_affine_tinygemm(q, (1, group), scale, zero, torch.int32, 0, 15, output_dtype=t.dtype)


def _dequantize(t: torch.Tensor) -> torch.Tensor:
    """CPU int4 as the old release computed it (the recorded weights came from there), the rest as the suite does."""
    return _int4_cpu_dequantize(t) if isinstance(t, Int4OpaqueTensor) else dequantize(t)


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def _params(paths: list[Path]) -> list:
    """Fixture paths as test parameters; CPU int4 ones carry the marker CI reruns under ATEN_CPU_CAPABILITY=avx2."""
    return [pytest.param(p, id=_id(p), marks=[pytest.mark.cpu_int4] if p.stem == "int4cpu" else []) for p in paths]


def cpu_packer_of(path: Path) -> str | None:
    """The CPU int4 packer of the machine that made a fixture, as its folder's manifest records it."""
    manifest = path.parent / "manifest.json"
    return json.loads(manifest.read_text()).get("cpu_packer") if manifest.is_file() else None


def _on_this_machine(t: torch.Tensor, packer: str | None) -> torch.Tensor:
    """A migrated Int4OpaqueTensor (still in its maker's packing) re-laid out exactly for this machine's kernel."""
    if not isinstance(t, Int4OpaqueTensor):
        return t
    flat = codec.flatten("w", t)
    parts, attrs, _ = relayout(cpu, cpu, flat.parts, flat.attrs, packer=packer, build_on="cpu")
    return codec.rebuild(FlatTensor(flat.row, flat.shape, flat.dtype, parts, attrs), "w")


@pytest.mark.parametrize("path", _params([p for p in PICKLES if p.stem not in CUDA_PINNED]))
def test_fixture_migrates_to_bit_identical_weights_and_recorded_outputs(path: Path) -> None:
    expected = load_file(str(path.with_suffix(".expected.safetensors")))
    loaded = safe_load(path)
    assert any(legacy.is_legacy(v) for v in loaded.values())
    packer = cpu_packer_of(path)
    migrated = {k: _on_this_machine(v, packer) for k, v in legacy.migrate_state_dict(loaded).items()}
    recorded = {k.split(":")[0]: v for k, v in expected.items() if k.endswith(":dequantized")}
    assert recorded, "the fixture records dequantized weights"
    for name, want in recorded.items():
        got = _dequantize(migrated[name])
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    out = run_mlp(migrated, expected["input"])
    if path.stem in EXACT_OUTPUT and _id(path) not in DEQUANTIZED_MATMUL:
        assert torch.equal(out.view(torch.uint8), expected["output"].view(torch.uint8))
    else:
        assert_close_in_bf16_ulps(out, expected["output"], ULPS_OF_MAX)


@pytest.mark.parametrize("folder", HF_FOLDERS, ids=_id)
def test_hf_folder_from_transformers4_migrates_and_gives_recorded_logits(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((folder / "config.json").read_text())
    assert config.pop("quantization_config")["quant_type"]["default"]["_version"] == 1
    migrated = legacy.migrate_state_dict(safe_load(folder / "pytorch_model.bin"))
    assert {type(v).__name__ for v in migrated.values()} >= {"Int8Tensor", "Tensor"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).eval()
    model.load_state_dict(migrated, assign=True, strict=True)
    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    # transformers 5's Llama differs from 4.56's in op order; the quantized weights are identical.
    assert_close_in_bf16_ulps(logits, expected["logits"], ULPS_OF_MAX)


def test_fqn_mix_folder_keeps_each_module_config() -> None:
    folder = FIXTURES / "ao0.13" / "hf_llama_fqn_mix"
    migrated = legacy.migrate_state_dict(safe_load(folder / "pytorch_model.bin"))
    q_proj = migrated["model.layers.0.self_attn.q_proj.weight"]
    k_proj = migrated["model.layers.0.self_attn.k_proj.weight"]
    assert q_proj.act_quant_kwargs is not None and k_proj.act_quant_kwargs is None
    assert type(migrated["model.layers.1.mlp.down_proj.weight"]) is torch.Tensor


@pytest.mark.parametrize(
    ("fixture", "want"),
    [
        ("int8wo", "AffineQuantizedTensor/PlainLayout torch.int8 -> Int8Tensor"),
        ("int8dyn", "PlainLayout torch.int8 + _int8_symm_per_token_reduced_range_quant -> Int8Tensor"),
        ("int8dyn_int4", "PlainLayout torch.int8 + _int8_asymm_per_token_quant -> IntxUnpackedToInt8Tensor"),
        ("int4cpu", "Int4CPULayout torch.uint8 -> Int4OpaqueTensor"),
        ("uint6wo", "UintxLayout torch.uint8 -> IntxUnpackedToInt8Tensor"),
        ("float8wo", "Float8Layout torch.float8_e4m3fn -> Float8Tensor"),
        ("-cuda-sparse/linear_int4_marlin24", "MarlinSparseLayout torch.int32 -> IntxUnpackedToInt8Tensor"),
        ("-cuda-sparse/linear_int8dyn_semisparse",
         "SemiSparseLayout torch.int8 + _int8_symm_per_token_reduced_range_quant -> Int8Tensor"),
        ("-cuda-autoquant/linear_AQInt4G64WeightOnlyQuantizedLinearWeight",
         "TensorCoreTiledLayout torch.int32 -> Int4TilePackedTo4dTensor"),
    ],
)
def test_describe_names_legacy_layout_and_target(fixture: str, want: str) -> None:
    record = safe_load(FIXTURES / f"ao0.13{fixture if fixture.startswith('-') else '/' + fixture}.pt")["0.weight"]
    line = legacy.describe(record, "0.weight")
    assert line.startswith("torchao<=0.17 ") and line.endswith(want), line


def test_every_legacy_impl_has_a_migration_entry() -> None:
    impls = {n.rsplit(".", 1)[1] for n, role in legacy.LEGACY_GLOBALS.items() if role is legacy.Role.IMPL}
    assert impls == set(legacy.MIGRATIONS)


def _record(legacy_name: str, shape: tuple[int, ...], dtype: torch.dtype, state: object) -> torch.Tensor:
    """A stand-in built exactly the way torch's weights-only unpickler builds one from a pickle."""
    cls = legacy.STAND_INS[legacy_name]
    args = (cls, dtype, shape, (shape[-1], 1), 0, torch.strided, "cpu", False)
    return torch._tensor._rebuild_from_type_v2(torch._utils._rebuild_wrapper_subclass, cls, args, state)


def _int8wo_record() -> torch.Tensor:
    return safe_load(FIXTURES / "ao0.13" / "int8wo.pt")["0.weight"]


@pytest.mark.parametrize(
    "impl",
    [n for n, r in legacy.LEGACY_GLOBALS.items() if r is legacy.Role.IMPL
     and legacy.MIGRATIONS[n.rsplit(".", 1)[1]].becomes == ()],
    ids=lambda n: n.rsplit(".", 1)[1],
)
def test_uncovered_layouts_raise_unsupported_naming_them(impl: str) -> None:
    aqt = _int8wo_record()
    aqt.legacy_state["tensor_impl"] = _record(impl, (64, 128), torch.int8, {"int_data": torch.zeros(64, 128)})
    with pytest.raises(UnsupportedTensorError, match=impl.rsplit(".", 1)[1]):
        legacy.migrate("0.weight", aqt)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda cls: cls(1, 2, 3), CorruptCheckpointError),  # REDUCE with the class as callable
        (lambda cls: cls.__new__(cls, 10**12), CorruptCheckpointError),  # NEWOBJ with junk args
        (lambda cls: _record(cls.legacy_name, (4, 4), torch.int8, ["junk"]), CorruptCheckpointError),
        (lambda cls: _record(cls.legacy_name, (4, 4), torch.int8, {i: i for i in range(3)}),
         CorruptCheckpointError),
    ],
    ids=["reduce", "newobj", "state-list", "state-int-keys"],
)
def test_tensor_stand_in_refuses_junk_without_running_anything(call, error) -> None:
    cls = legacy.STAND_INS["torchao.dtypes.affine_quantized_tensor.AffineQuantizedTensor"]
    with pytest.raises(error):
        call(cls)


def test_other_stand_ins_refuse_junk() -> None:
    layout = legacy.STAND_INS["torchao.dtypes.utils.PlainLayout"]
    with pytest.raises(CorruptCheckpointError):
        layout.__new__(layout, *range(100))
    with pytest.raises(CorruptCheckpointError):
        layout().__setstate__("junk")
    with pytest.raises(CorruptCheckpointError):
        legacy.STAND_INS["torchao.quantization.quant_api._int8_asymm_per_token_quant"](torch.ones(2))
    with pytest.raises(ValueError):  # safe_load turns any unpickling failure into CorruptCheckpointError
        legacy.STAND_INS["torchao.quantization.quant_primitives.ZeroPointDomain"](9)


def test_stand_in_tensor_runs_no_torch_op() -> None:
    record = _int8wo_record()
    with pytest.raises(UnsupportedTensorError, match="migrate"):
        torch.mul(record, 2)
    assert "legacy" in repr(record)


@pytest.mark.parametrize(
    ("field", "junk"),
    [("int_data", "not a tensor"), ("scale", torch.ones(3)), ("int_data", torch.ones(64, 128))],
    ids=["string-data", "scale-count", "float-data"],
)
def test_junk_fields_give_an_aockpt_error(field: str, junk: object) -> None:
    aqt = _int8wo_record()
    aqt.legacy_state["tensor_impl"].legacy_state[field] = junk
    with pytest.raises(AockptError):
        legacy.migrate("0.weight", aqt)


def test_non_legacy_value_is_refused() -> None:
    with pytest.raises(UnsupportedTensorError, match="not a legacy torchao"):
        legacy.migrate("w", legacy.STAND_INS["torchao.dtypes.utils.PlainLayout"]())


def test_safe_load_returns_legacy_records() -> None:
    loaded = safe_load(FIXTURES / "ao0.13" / "int8dyn.pt")
    assert all(legacy.is_legacy(v) for k, v in loaded.items() if k.endswith("weight"))


@pytest.mark.parametrize("name", ["float8wo", "intx4wo"])
def test_torchao_014_safetensors_pack_into_the_current_format(name: str, tmp_path: Path) -> None:
    """torchao 0.14 wrote `name:inner` keys that 0.15+ cannot read; aockpt reads and repacks them exactly."""
    import aockpt

    source = FIXTURES / "ao0.14-safetensors" / f"{name}.safetensors"
    assert aockpt.inspect(source).kind.startswith("torchao 0.14 safetensors")
    aockpt.pack(source, tmp_path / "packed")
    state = aockpt.load_quantized(tmp_path / "packed", verify=True)
    expected = load_file(str(source.with_name(f"{name}.expected.safetensors")))
    for layer in ("0.weight", "2.weight"):
        assert torch.equal(state[layer].dequantize(), expected[f"{layer}:dequantized"]), layer
    assert_close_in_bf16_ulps(run_mlp(state, expected["input"]), expected["output"], ULPS_OF_MAX)


@pytest.mark.parametrize("path", _params(PICKLES))
def test_every_fixture_packs_and_loads_back_exactly(path: Path, tmp_path: Path) -> None:
    """Through the public pipeline: pack (migrating on read, CPU int4 with its maker's packer stated)
    -> load_quantized re-laying out for this machine's kernels, weights still bit-identical."""
    import aockpt

    aockpt.pack(path, tmp_path / "packed", cpu_packer=cpu_packer_of(path))
    aockpt.verify(tmp_path / "packed")
    state = aockpt.load_quantized(tmp_path / "packed", "cpu", relayout=True)
    expected = load_file(str(path.with_suffix(".expected.safetensors")))
    for name, want in ((k.split(":")[0], v) for k, v in expected.items() if k.endswith(":dequantized")):
        got = _dequantize(state[name])
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    assert_close_in_bf16_ulps(run_mlp(state, expected["input"]), expected["output"], ULPS_OF_MAX)


def _sparse_record(name: str) -> torch.Tensor:
    return safe_load(FIXTURES / "ao0.13-cuda-sparse" / f"{name}.pt")["0.weight"]


def _impl_of(record: torch.Tensor) -> torch.Tensor:
    return record.legacy_state.get("original_weight_tensor", record).legacy_state["tensor_impl"]


@pytest.mark.parametrize(
    ("name", "field", "junk"),
    [
        ("linear_int8dyn_semisparse", "int_data", torch.zeros(256, 300, dtype=torch.int8)),
        ("linear_int8dyn_semisparse", "int_data", torch.zeros(256, 320, dtype=torch.int16)),
        ("linear_int4_marlin24", "meta", torch.zeros(8, 512, dtype=torch.int16)),
        ("linear_int4_marlin24", "int_data", torch.zeros(16, 512, dtype=torch.int64)),
        ("linear_int4_marlin24", "zero", torch.full((256, 4), 7.0, dtype=torch.bfloat16)),
        ("linear_int4_marlin24", "group_size", 100),
        ("linear_int4_marlin24", "num_bits", 8),
        ("linear_int4_marlin24", "scale", torch.ones(3, dtype=torch.float16)),
    ],
    ids=["cslt-size", "cslt-dtype", "marlin-meta", "marlin-dtype", "marlin-zero", "marlin-group", "marlin-bits",
         "marlin-scale"],
)
def test_junk_sparse_fields_give_an_aockpt_error(name: str, field: str, junk: object) -> None:
    record = _sparse_record(name)
    _impl_of(record).legacy_state[field] = junk
    with pytest.raises(AockptError, match="0.weight"):
        legacy.migrate("0.weight", record)


def test_a_record_whose_shape_its_bytes_cannot_hold_is_refused_before_allocating() -> None:
    aqt = _int8wo_record()
    huge = _record("torchao.dtypes.affine_quantized_tensor.AffineQuantizedTensor", (2**31, 2**20), torch.bfloat16,
                   {**aqt.legacy_state, "block_size": (1, 2**20)})
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CorruptCheckpointError, match=r"cannot be held in the \d+ bytes its record stores"):
        legacy.migrate("0.weight", huge)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start < 100_000


def _int4_impl(record: torch.Tensor) -> Any:
    return record.legacy_state["tensor_impl"]


# Junk a crafted legacy int4 record can hold: each refused (naming the tensor) when migrated, which is what
# inspect, pack and load all do first, instead of passing as loadable and failing in the kernel.
INT4_JUNK: dict[str, Callable[[torch.Tensor], None]] = {
    "float-qdata": lambda r: _int4_impl(r).legacy_state.update(
        packed_weight=_int4_impl(r).legacy_state["packed_weight"].view(torch.float16)),
    "doubled-rows": lambda r: _int4_impl(r).legacy_state.update(
        packed_weight=torch.cat([_int4_impl(r).legacy_state["packed_weight"]] * 2)),
    "scale-and-zero-one-group": lambda r: _int4_impl(r).legacy_state.update(
        scale_and_zero=_int4_impl(r).legacy_state["scale_and_zero"][:1]),
    "scale-and-zero-2d": lambda r: _int4_impl(r).legacy_state.update(
        scale_and_zero=_int4_impl(r).legacy_state["scale_and_zero"].reshape(-1, 2)),
    "group-size-2**40": lambda r: r.legacy_state.update(block_size=(1, 2**40)),
    "group-size-7": lambda r: r.legacy_state.update(block_size=(1, 7)),
    "group-size-disagrees-with-scales": lambda r: r.legacy_state.update(block_size=(1, 64)),
    "block-over-rows": lambda r: r.legacy_state.update(block_size=(2, 32)),
}


@pytest.mark.parametrize("junk", sorted(INT4_JUNK))
@pytest.mark.parametrize("fixture", ["ao0.13/int4cpu.pt", "ao0.13-cuda/linear_int4_tc_tiled_g32.pt"])
def test_junk_int4_records_are_refused_naming_the_tensor(fixture: str, junk: str) -> None:
    state = safe_load(FIXTURES / fixture)
    INT4_JUNK[junk](state["0.weight"])
    with pytest.raises((CorruptCheckpointError, UnsupportedTensorError), match="0.weight"):
        legacy.migrate("0.weight", state["0.weight"])
    with pytest.raises((CorruptCheckpointError, UnsupportedTensorError), match="0.weight"):
        sources.from_state_dict(state, FIXTURES / fixture, "torch pickle")  # what inspect reads


def test_a_junk_int4_file_is_one_error_line_from_the_cli(tmp_path: Path) -> None:
    """The real int4cpu fixture with its pickled group size edited to 7: inspect and pack refuse it, exit 4."""
    import zipfile

    from click.testing import CliRunner

    from aockpt.cli import main

    source, path = FIXTURES / "ao0.13" / "int4cpu.pt", tmp_path / "junk.pt"
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(path, "w") as out:
        for name in z.namelist():
            data = z.read(name)
            out.writestr(name, data.replace(b"K\x01K\x20\x86", b"K\x01K\x07\x86") if name.endswith("data.pkl") else data)
    for args in (["inspect", path], ["pack", path, tmp_path / "out"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 4 and "block_size [1, 7]" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
