"""compressed-tensors export and import, against the real libraries as users call them.

Export: compressed-tensors' own model-free decompression (CompressedTensorsDequantizer over the folder) and
stock transformers ``from_pretrained`` (compressed-tensors decompressing) against torchao's dequantize().
Import: folders written by compressed-tensors' own lifecycle (apply_quantization_config, its qparams,
ModelCompressor.compress_model, save_pretrained, update_config) packed into torchao tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from conftest import CASES, assert_same_tensor, tiny_model

import aockpt
from aockpt import ct_codes, ct_table, registry
from aockpt.cli import main
from aockpt.ct_source import IMPORTED_FORMATS, importable
from aockpt.relayout import cpu_packer
from aockpt.relayout.canonical import Int4Canonical

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.model_compressors import ModelCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: E402
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam, is_module_quantized  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import per_tensor_amax_to_scale  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerBlock, PerGroup  # noqa: E402

GROUP = 32
T = registry.TENSOR_TYPES


def _via_config(config) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(w: torch.Tensor) -> torch.Tensor:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        layer.weight.data = w
        quantize_(layer, config)
        return layer.weight.detach()
    return make


def _tile_int4(zero_steps: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tinygemm tile-packed int4 of `w` with zero = zero_steps * scale (None: a float zero, no exact counterpart)."""
    def make(w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        blocks = w.float().view(n, k // GROUP, GROUP)
        scale = (blocks.abs().amax(-1) / 7.5).to(torch.bfloat16)  # [N, G]
        if zero_steps:  # power-of-two scales, so that zero = zero_steps * scale is exact in bf16
            scale = torch.exp2(torch.ceil(torch.log2(scale.float()))).to(torch.bfloat16)
        zero = scale * zero_steps if zero_steps is not None else blocks.mean(-1).to(torch.bfloat16)
        q = (blocks / scale.float().unsqueeze(-1) - (zero.float() / scale.float()).unsqueeze(-1)).round()
        values = (q.clamp(-8, 7) + 8).to(torch.uint8).view(n, k)
        canon = Int4Canonical(values, torch.stack((scale.T, zero.T), -1).contiguous(), GROUP, (n, k), torch.bfloat16)
        row = T["Int4TilePackedTo4dTensor"]
        parts, attrs, _ = row.relayout.from_canonical(canon, torch.device("cpu"))
        return row.build(row.cls, parts, attrs, torch.Size((n, k)))
    return make


def _nvfp4(per_tensor: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(w: torch.Tensor) -> torch.Tensor:
        scale = per_tensor_amax_to_scale(w.abs().max()) if per_tensor else None
        return T["NVFP4Tensor"].cls.to_nvfp4(w, per_tensor_scale=scale)
    return make


# model id -> what each Linear (but lm_head) becomes; every one exports exactly
EXACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8-weight-only": _via_config(Int8WeightOnlyConfig()),
    "int8-dynamic": _via_config(Int8DynamicActivationInt8WeightConfig()),
    "float8-weight-only": _via_config(Float8WeightOnlyConfig()),
    "float8-block-32x32": lambda w: T["Float8Tensor"].cls.from_hp(w, granularity=PerBlock([32, 32])),
    "intx-int4-sym": _via_config(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP))),
    "int4-tile-sym": _tile_int4(0),
    "int4-tile-int-zero": _tile_int4(3),
    "nvfp4": _nvfp4(False),
    "nvfp4-per-tensor": _nvfp4(True),
    "mxfp4": lambda w: T["MXTensor"].cls.to_mx(w, torch.float4_e2m1fn_x2, 32),
}


def _model(make: Callable[[torch.Tensor], torch.Tensor], *, tie: bool = False):
    """The suite's tiny Llama with every Linear but lm_head replaced by `make(weight)`."""
    model = tiny_model(tie=tie)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight = torch.nn.Parameter(make(module.weight.detach()), requires_grad=False)
    return model


def _reference(state: dict[str, torch.Tensor], packers: dict[str, str | None]) -> dict[str, torch.Tensor]:
    """torchao's dequantized weights (ct_codes.reference: torchao's own dequantize, or its kernel math for int4)."""
    return {n: t if type(t) is torch.Tensor else ct_codes.reference(t, packers.get(n)) for n, t in state.items()}


def _ct_decompressed(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors' own model-free decompression of a folder (its CompressedTensorsDequantizer)."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return CompressedTensorsDequantizer(folder, ignore=["re:.*embed_tokens"], dtype=dtype).process(tensors)


@pytest.fixture(scope="module", params=sorted(EXACT))
def exported(request, tmp_path_factory) -> tuple[str, Path, Path, dict[str, torch.Tensor]]:
    """(model id, the torchao state dict, exported folder, torchao's dequantized weights)."""
    base = tmp_path_factory.mktemp(request.param)
    model = _model(EXACT[request.param])
    aockpt.save_pretrained(model, base / "src")
    report = aockpt.export(base / "src", base / "ct")
    assert {v.verdict for v in report.tensors} == {"exact", "dense"}
    state = model.state_dict()
    packers = {v.name: "cuda-tinygemm" for v in report.tensors if v.type == "Int4TilePackedTo4dTensor"}
    return request.param, state, base / "ct", _reference(state, packers)


def test_compressed_tensors_decompression_is_bit_identical_to_torchao(exported):
    _, _, folder, want = exported
    got = _ct_decompressed(folder, torch.bfloat16)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name], w), name


def test_stock_transformers_loads_the_same_weights_and_logits(exported):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model_id, _, folder, want = exported
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
    got = loaded.state_dict()
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    reference = tiny_model()
    reference.load_state_dict(want)
    ids = torch.tensor([[1, 5, 7, 9, 11, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_torchao_to_compressed_tensors_to_torchao_is_byte_identical(exported, tmp_path):
    model_id, before, folder, _ = exported
    stock = aockpt.inspect(folder).stock  # what stock from_pretrained does with the exported folder (measured above)
    assert stock.loads is (model_id != "int4-tile-int-zero"), stock
    aockpt.pack(folder, tmp_path / "back")
    after = aockpt.load_quantized(tmp_path / "back")
    assert set(before) == set(after)
    for name, t in before.items():
        if model_id.startswith("int4-tile"):  # comes back as the portable intx form of the same codes
            assert type(t) is torch.Tensor or torch.equal(after[name].dequantize(), ct_codes.reference(t, "cuda-tinygemm"))
        elif model_id == "nvfp4-per-tensor" and type(t) is not torch.Tensor:  # the scale may move within 4 ulps
            assert torch.equal(after[name].dequantize(), t.dequantize()) and torch.equal(after[name].qdata, t.qdata)
        else:
            assert_same_tensor(t, after[name])


def _ct_folder(path: Path, scheme: dict) -> Path:
    """A tiny Llama quantized and saved by compressed-tensors itself: its lifecycle, qparams and compressor."""
    model = tiny_model()
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **scheme)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        if not is_module_quantized(module):
            continue
        args, w = module.quantization_scheme.weights, module.weight.detach().float()
        if args.strategy == "block":
            (bn, bk), (n, k) = args.block_structure, w.shape
            blocks = w.view(n // bn, bn, k // bk, bk).transpose(1, 2).reshape(n // bn, k // bk, -1)
        else:
            blocks = w.view(w.shape[0], -1, args.group_size) if args.group_size else w.unsqueeze(1)
        global_scale = None
        if args.strategy == "tensor_group":
            global_scale = generate_gparam(w.min(), w.max())
            module.weight_global_scale.data.copy_(global_scale)
        scale, zero_point = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
        module.weight_scale.data = scale
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero_point
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return path


def _weights(**kw) -> dict:
    return dict(weights=QuantizationArgs(symmetric=True, **kw))


CT_SCHEMES = {
    "W8A8": PRESET_SCHEMES["INT8_W8A8"] if "INT8_W8A8" in PRESET_SCHEMES else PRESET_SCHEMES["W8A8"],
    "W8A16-channel": _weights(num_bits=8, type="int", strategy="channel"),
    "FP8-weight-only": _weights(num_bits=8, type="float", strategy="channel"),
    "FP8_DYNAMIC": PRESET_SCHEMES["FP8_DYNAMIC"],
    "FP8-block-32x32-weight-only": _weights(num_bits=8, type="float", strategy="block", block_structure=[32, 32]),
    "W4A16-group32": _weights(num_bits=4, type="int", strategy="group", group_size=GROUP),
    "W4A16_ASYM-group32": dict(weights=QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                                                        group_size=GROUP)),
    "NVFP4A16": PRESET_SCHEMES["NVFP4A16"],
    "MXFP4A16": PRESET_SCHEMES["MXFP4A16"],
}
IMPORT_TYPES = {"W8A8": "Int8Tensor", "W8A16-channel": "Int8Tensor", "FP8-weight-only": "Float8Tensor",
                "FP8_DYNAMIC": "Float8Tensor", "FP8-block-32x32-weight-only": "Float8Tensor", "W4A16-group32": "IntxUnpackedToInt8Tensor",
                "W4A16_ASYM-group32": "IntxUnpackedToInt8Tensor", "NVFP4A16": "NVFP4Tensor", "MXFP4A16": "MXTensor"}


@pytest.mark.parametrize("scheme", sorted(CT_SCHEMES))
def test_import_of_compressed_tensors_own_folders_dequantizes_bit_identically(scheme, tmp_path):
    folder = _ct_folder(tmp_path / "ct", CT_SCHEMES[scheme])
    assert importable(json.loads((folder / "config.json").read_text()))
    aockpt.pack(folder, tmp_path / "packed")
    got = aockpt.load_quantized(tmp_path / "packed")
    want = _ct_decompressed(folder, torch.bfloat16)
    assert set(got) == set(want)
    quantized = {n: t for n, t in got.items() if type(t) is not torch.Tensor}
    assert len(quantized) == 14 and {type(t).__name__ for t in quantized.values()} == {IMPORT_TYPES[scheme]}
    for name, t in got.items():
        assert torch.equal(t if type(t) is torch.Tensor else t.dequantize(), want[name]), name
    # stock transformers + torchao reads the packed folder, except weight-only MX: torchao 0.18 has no config for it
    assert aockpt.inspect(tmp_path / "packed").stock.loads is (scheme != "MXFP4A16")


def test_static_activation_scales_are_refused_with_nothing_written(tmp_path):
    folder = _ct_folder(tmp_path / "ct", PRESET_SCHEMES["FP8"])  # FP8 preset: static per-tensor input scale
    assert not importable(json.loads((folder / "config.json").read_text()))
    with pytest.raises(aockpt.ForeignCheckpointError, match="does not convert this format or scheme of compressed"):
        aockpt.pack(folder, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    assert aockpt.inspect(folder).foreign.format == "float-quantized"  # described, not half-read


def _float_zero_folder(tmp_path: Path) -> Path:
    aockpt.save_pretrained(_model(_tile_int4(None)), tmp_path / "src")
    return tmp_path / "src"


def test_float_zero_points_are_refused_naming_every_tensor(tmp_path):
    src = _float_zero_folder(tmp_path)
    with pytest.raises(aockpt.UnsupportedTensorError) as e:
        aockpt.export(src, tmp_path / "ct")
    assert "14 tensor(s)" in str(e.value) and "model.layers.0.self_attn.q_proj.weight" in str(e.value)
    assert "zero / scale is not an integer" in str(e.value) and not (tmp_path / "ct").exists()
    result = CliRunner().invoke(main, ["export", str(src), str(tmp_path / "ct")])
    assert result.exit_code == 6 and "model.layers.1.mlp.down_proj.weight" in result.output


def test_lossy_export_states_the_error_compressed_tensors_really_has(tmp_path):
    src = _float_zero_folder(tmp_path)
    report = aockpt.export(src, tmp_path / "ct", lossy=True)
    lossy = {v.name: v for v in report.tensors if v.verdict == "lossy"}
    assert len(lossy) == 14
    state = aockpt.load_quantized(src, relayout=True)  # tile-packed re-laid out exactly for this CPU
    want = {n: ct_codes.reference(t, cpu_packer()) if type(t) is not torch.Tensor else t for n, t in state.items()}
    got = _ct_decompressed(tmp_path / "ct", torch.bfloat16)
    for name, v in lossy.items():
        measured = float((got[name].float() - want[name].float()).abs().max())
        assert v.error == measured and measured > 0, name
        assert v.target == "pack-quantized int4 group 32"


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    aockpt.save_pretrained(_model(EXACT["int8-weight-only"], tie=True), tmp_path / "src")
    aockpt.export(tmp_path / "src", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["quantization_config"]["ignore"] == ["lm_head"]
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    assert len({"lm_head.weight", "model.embed_tokens.weight"} & set(stored)) == 1  # stored once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct",
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, aockpt.load_quantized(tmp_path / "src")["lm_head.weight"])


def test_cli_export_and_inspect_serving(tmp_path):
    aockpt.save_pretrained(_model(EXACT["intx-int4-sym"]), tmp_path / "src")
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(tmp_path / "src"), "--serving"])
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.output.splitlines() if x.startswith("model.layers.0.mlp.up_proj.weight"))
    assert "exact" in line and "pack-quantized int4 group 32" in line and "loads; runs on torchao's cpu/cuda kernels" in line
    as_json = json.loads(runner.invoke(main, ["inspect", str(tmp_path / "src"), "--serving", "--json"]).output)
    assert {v["verdict"] for v in as_json} == {"exact", "dense"} and all("codes" not in v for v in as_json)
    done = runner.invoke(main, ["export", str(tmp_path / "src"), str(tmp_path / "ct"), "--format",
                                "compressed-tensors"])
    assert done.exit_code == 0 and "14 exact" in done.output


def test_every_registry_row_has_serving_facts_and_docs_show_them():
    assert set(ct_table.MAPPINGS) == {*registry.TENSOR_TYPES.values(), registry.PLAIN}
    docs = (Path(__file__).parent.parent / "docs" / "serving.md").read_text()
    assert ct_table.markdown() in docs, "regenerate with: python -m aockpt.ct_table"


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_vllm_slicing_facts_are_what_torchao_does(case_id):
    type_name, make = CASES[case_id]
    t = make()
    try:
        for dim in (0, 1):
            half = t.shape[dim] // 2
            t.narrow(dim, 0, half).copy_(t.narrow(dim, half, half))
        slices = True
    except NotImplementedError:
        slices = False
    assert ct_table.MAPPINGS[T[type_name]].slices is slices


_W4 = {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}
_NVFP4 = {"weights": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                      "group_size": 16}}
_FP8_DYN = {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                  "dynamic": True}}
_FP8_STATIC = {"weights": _FP8_DYN["weights"], "input_activations": {"num_bits": 8, "type": "float",
                                                                      "symmetric": True, "strategy": "tensor"}}


def _qc(fmt: str, **groups: dict) -> dict:
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": fmt,
                                    "config_groups": {k: {"targets": ["Linear"], **g} for k, g in groups.items()}}}


@pytest.mark.parametrize("config, expected", [
    (_qc("pack-quantized", a=_W4), True),
    (_qc("mixed-precision", a={**_NVFP4, "format": "nvfp4-pack-quantized"},
         b={**_FP8_DYN, "format": "float-quantized"}), True),
    (_qc("float-quantized", a=_FP8_STATIC), False),  # static activation scale: no torchao counterpart
    (_qc("pack-quantized", a={"weights": {"num_bits": "four"}}), False),  # compressed-tensors refuses the scheme
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"}}, False),  # no groups
    (_qc("marlin-24", a=_W4), False),
    ({"quantization_config": {**_qc("pack-quantized", a=_W4)["quantization_config"],
                              "quantization_status": "frozen"}}, False),
    ({"quantization_config": {"quant_method": "torchao"}}, False),
    ({}, False),
    ([], False),
])
def test_importable_names_exactly_what_the_importer_reads(config, expected):
    assert importable(config) is expected
    assert "pack-quantized" in IMPORTED_FORMATS


@pytest.mark.parametrize("key, value", [
    ("model.layers.0.mlp.up_proj.weight_shape", torch.tensor([128, 96])),
    ("model.layers.0.mlp.up_proj.weight_shape", torch.tensor([128, 64, 1])),
    ("model.layers.0.mlp.up_proj.weight_scale", torch.ones(128, 3, dtype=torch.bfloat16)),
    ("model.layers.0.mlp.up_proj.weight_packed", torch.zeros(128, 8, dtype=torch.int64)),
])
def test_a_corrupt_compressed_tensors_part_is_named(key, value, tmp_path):
    from safetensors.torch import save_file

    folder = _ct_folder(tmp_path / "ct", CT_SCHEMES["W4A16-group32"])
    tensors = load_file(folder / "model.safetensors")
    tensors[key] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["pack", str(folder), str(tmp_path / "packed")])
    assert result.exit_code == 4, result.output
    assert "model.layers.0.mlp.up_proj.weight" in result.output and "corrupt" in result.output


def test_a_pickle_exports_as_mixed_precision_and_comes_back(tmp_path):
    state = {"a.weight": CASES["int8-weight-only"][1](), "b.weight": CASES["nvfp4"][1](),
             "b.bias": torch.zeros(64, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / "mixed.pt")
    aockpt.export(tmp_path / "mixed.pt", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["dtype"] == "bfloat16" and qc["format"] == "mixed-precision"
    assert sorted((g["targets"], g["format"]) for g in qc["config_groups"].values()) == [
        (["a"], "pack-quantized"), (["b"], "nvfp4-pack-quantized")]
    back = aockpt.load_quantized(tmp_path / "ct")
    for name, t in state.items():
        assert_same_tensor(back[name], t)
