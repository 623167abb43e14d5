"""The round-trip matrix: every way users make a quantized folder x every loader they use.

Each cell is exact (logits ``torch.equal`` to the producer's and the same 16 greedy tokens) or a refusal
with an error that ``aockpt.inspect``'s verdict predicted; never a silent difference. docs/transformers.md
carries the same matrix as a table, checked against ``expected_table()`` here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TorchAoConfig

import aockpt
from aockpt.errors import AockptError, UnsupportedTensorError
from aockpt.hf_config import model_class, transformers_config
from conftest import tiny_config, with_recomputed_buffers
from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig, NVFP4WeightOnlyConfig
from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
from torchao.quantization import (
    Float8WeightOnlyConfig,
    FqnToConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerAxis, PerGroup
from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

ROOT = Path(__file__).parent.parent
LEGACY = ROOT / "fixtures" / "legacy"
DOC = ROOT / "docs" / "transformers.md"
NEW_TOKENS = 16

ARCHS = {
    "llama": lambda: tiny_config("llama", layers=1, tie=False),
    "qwen3": lambda: tiny_config("qwen3", layers=1, tie=True),
}


def _mix():
    return FqnToConfig({
        "_default": Int8WeightOnlyConfig(),
        "model.layers.0.self_attn.q_proj": Int8DynamicActivationInt8WeightConfig(),
        "model.layers.0.mlp.down_proj": None,
        "model.embed_tokens": IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
    })


KINDS = {
    "int8 weight-only": Int8WeightOnlyConfig,
    "int8 dynamic": Int8DynamicActivationInt8WeightConfig,
    "float8 weight-only": Float8WeightOnlyConfig,
    "intx weight-only": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    "8da-intx": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                              weight_granularity=PerGroup(32)),
    "cpu int4": lambda: PrototypeInt4WeightOnlyConfig(group_size=32),
    "mxfp8 dynamic (emulated)": lambda: MXDynamicActivationMXWeightConfig(kernel_preference=KernelPreference.EMULATED),
    "nvfp4 weight-only": NVFP4WeightOnlyConfig,
    "mix (skip + embeddings)": _mix,
}
# MX/NVFP4 kinds: torch.load(weights_only=True) cannot read them after `import torchao`, and torchao 0.18's
# CPU linear for them has no aten.expand, so they run one sequence at a time and lm_head stays bf16.
MICROSCALED = ("mxfp8", "nvfp4")
LEGACY_FOLDERS = {  # fixture folder -> what it holds
    "ao0.13/hf_llama_int8wo": "int8 weight-only", "ao0.13/hf_llama_int8dyn": "int8 dynamic",
    "ao0.13/hf_llama_fqn_mix": "int8 mix, one module skipped", "ao0.13/hf_llama_int4cpu": "cpu int4",
    "ao0.13/hf_llama_int4cpu_fqn_mix": "cpu int4 + int8 mix, one module skipped",
    "ao0.14-safetensors/hf_llama_float8wo": "float8 weight-only",
    "ao0.14-safetensors/hf_qwen3_float8wo": "float8 weight-only",
}
PRODUCERS = {
    "quantize_ + aockpt.save_pretrained": "saved",
    "Model(config).to(bfloat16), quantize_ + aockpt.save_pretrained": "from-config",
    "TorchAoConfig + stock save_pretrained": "stock",
    "stock save_pretrained -> aockpt pack": "stock-packed",
    "torch.save(state_dict) + config -> aockpt pack": "pickle-packed",
    "transformers 4.56 + torchao 0.13 folder -> aockpt pack": "ao0.13/",
    "transformers 4.57 + torchao 0.14 safetensors -> aockpt pack": "ao0.14-safetensors/",
}
# A model built from a config has no config.dtype; these rows check the dtype aockpt derives from the weights.
FROM_CONFIG_KINDS = ("int8 weight-only", "int8 dynamic", "intx weight-only", "cpu int4", "mix (skip + embeddings)")
CONSUMERS = ("stock from_pretrained", "aockpt.load_pretrained", "aockpt.load_quantized", "unpack + torch.load")


def _cases() -> list[tuple[str, str, str]]:
    """(producer, arch, kind) for every folder the matrix makes."""
    cases = []
    for producer, key in PRODUCERS.items():
        if key.endswith("/"):
            cases += [(producer, folder.split("_")[1], folder) for folder in LEGACY_FOLDERS if folder.startswith(key)]
            continue
        for arch in ARCHS:
            for kind in FROM_CONFIG_KINDS if key == "from-config" else KINDS:
                if key.startswith("stock") and kind == "cpu int4":
                    continue  # stock save_pretrained cannot write Int4OpaqueTensor: test_stock_save_refuses_cpu_int4
                cases.append((producer, arch, kind))
    return cases


def _refuses(producer: str, arch: str, kind: str, consumer: str) -> bool:
    """Which cells are refusals: stock cannot read CPU int4; torch.load(weights_only) has no Int4OpaqueTensor,
    MXTensor or NVFP4Tensor; transformers' own folder of a tied quantized embedding fails transformers' tie
    check (aten.equal)."""
    int4 = "cpu int4" in kind or "int4cpu" in kind
    stock_tie = PRODUCERS[producer] == "stock" and arch == "qwen3" and kind.startswith("mix")
    if consumer == "stock from_pretrained":
        return int4 or stock_tie
    return (int4 or kind.startswith(MICROSCALED)) and consumer == "unpack + torch.load"


def _model(arch: str, cast: bool = False):
    """The architecture in bf16: built by from_config(dtype=...), or (`cast`) by its class then `.to(bfloat16)`."""
    torch.manual_seed(0)
    if cast:
        return model_class(ARCHS[arch]())(ARCHS[arch]()).to(torch.bfloat16).eval()
    return AutoModelForCausalLM.from_config(ARCHS[arch](), dtype=torch.bfloat16).eval()


def _quantized_in_memory(arch: str, kind: str, cast: bool = False):
    """quantize_ as torchao's README teaches; tied heads re-tied so the tie reaches a quantized embedding."""
    model = _model(arch, cast)
    config = KINDS[kind]()
    head = not kind.startswith(MICROSCALED)
    quantize_(model, config, filter_fn=None if isinstance(config, FqnToConfig) else
              (lambda m, fqn: isinstance(m, torch.nn.Linear) and (head or fqn != "lm_head")))
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def _stock_quantized(arch: str, kind: str, tmp: Path):
    """A model quantized by from_pretrained(quantization_config=TorchAoConfig(...)), the path transformers teaches."""
    _model(arch).save_pretrained(tmp / "float")
    quant = TorchAoConfig(KINDS[kind](), include_input_output_embeddings=kind.startswith("mix"))
    return AutoModelForCausalLM.from_pretrained(tmp / "float", dtype=torch.bfloat16,
                                                quantization_config=quant).eval()


def _outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and 16 greedy tokens."""
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0)
    return logits, tokens


def _ids(kind: str = "") -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 128, (1 if kind.startswith(MICROSCALED) else 2, 8))


def _close_to_recorded(logits, recorded, ulps=4):
    """Within a few bf16 ulps of the recorded logits (old torchao and transformers 4.x made them)."""
    tolerance = ulps * torch.finfo(torch.bfloat16).eps * recorded.abs().max().item()
    assert (logits.float() - recorded.float()).abs().max().item() <= tolerance


def _cpu_packer(folder: Path) -> str | None:
    """The CPU int4 packer a legacy int4 folder was made with (its release's manifest records it)."""
    if "int4cpu" not in folder.name:
        return None
    return json.loads((folder.parent / "manifest.json").read_text())["cpu_packer"]


def _make(producer: str, arch: str, kind: str, out: Path) -> tuple[Path, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The folder a producer writes, the ids, and the producer's own logits and greedy tokens."""
    key, ids = PRODUCERS[producer], _ids(kind)
    if key.endswith("/"):
        src = LEGACY / kind
        expected = load_file(src / "expected.safetensors")
        ids = expected["input_ids"]
        packer = _cpu_packer(src)  # CPU int4 made elsewhere: re-laid out exactly for this machine's kernel
        reference = aockpt.load_pretrained(src, cpu_packer=packer, relayout=packer is not None)
        logits, tokens = _outputs(reference, ids)
        _close_to_recorded(logits, expected["logits"])
        aockpt.pack(src, out, cpu_packer=packer, device="cpu" if packer else None)
        return out, ids, logits, tokens
    if key in ("saved", "from-config"):
        model = _quantized_in_memory(arch, kind, cast=key == "from-config")
        aockpt.save_pretrained(model, out)
        with_recomputed_buffers(model)  # `.to()` cast the rotary buffers no file holds; every loader recomputes them
    elif key == "pickle-packed":
        model = _quantized_in_memory(arch, kind)
        (out.parent / "pickle").mkdir()
        torch.save(model.state_dict(), out.parent / "pickle" / "pytorch_model.bin")
        model.config.save_pretrained(out.parent / "pickle")
        here = aockpt.relayout.cpu_packer() if kind == "cpu int4" else None  # a pickle does not record it
        aockpt.pack(out.parent / "pickle", out, cpu_packer=here)
    else:
        model = _stock_quantized(arch, kind, out.parent)
        model.save_pretrained(out if key == "stock" else out.parent / "stock")
        if key == "stock-packed":
            aockpt.pack(out.parent / "stock", out)
    logits, tokens = _outputs(model, ids)
    return out, ids, logits, tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each producer's folder, made once per module."""
    made = {}

    def get(case):
        if case not in made:
            made[case] = _make(*case, tmp_path_factory.mktemp("p") / "out")
        return made[case]

    return get


def _load_into_architecture(folder: Path, state: dict[str, torch.Tensor]):
    """What a user does with aockpt.load_quantized: build the architecture and assign the tensors."""
    config = transformers_config(json.loads((folder / "config.json").read_text()))
    model = model_class(config)._from_config(config, dtype=torch.bfloat16).eval()
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _consume(consumer: str, folder: Path, tmp: Path):
    """A model from `folder` through one loader, as its users call it."""
    if consumer == "stock from_pretrained":  # no dtype: config.json's must be the weights'
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    if consumer == "aockpt.load_pretrained":
        return aockpt.load_pretrained(folder)
    if consumer == "aockpt.load_quantized":
        return _load_into_architecture(folder, aockpt.load_quantized(folder))
    aockpt.unpack(folder, tmp / "state.pt")
    return _load_into_architecture(folder, torch.load(tmp / "state.pt", weights_only=True))


def _case_params() -> list:
    """The cases; CPU int4 ones marked so CI reruns them as an AVX2 machine."""
    return [pytest.param(c, id="|".join(c), marks=[pytest.mark.cpu_int4] if "int4" in c[2] else [])
            for c in _cases()]


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("case", _case_params())
def test_round_trip(folders, tmp_path, case, consumer):
    folder, ids, logits, tokens = folders(case)
    info = aockpt.inspect(folder)
    verdict = info.stock
    assert verdict is not None and verdict.verdict != "loads wrong weights"
    refuses = _refuses(*case, consumer)
    if consumer == "stock from_pretrained":
        assert verdict.loads is not refuses, verdict
    if consumer.startswith("unpack"):
        assert bool(info.not_unpackable) is refuses, info.not_unpackable
    if refuses:
        errors = (AockptError,) if consumer.startswith("unpack") else (ValueError, NotImplementedError)
        with pytest.raises(errors):
            _consume(consumer, folder, tmp_path)
        return
    model = _consume(consumer, folder, tmp_path)
    got_logits, got_tokens = _outputs(model, ids)
    assert torch.equal(got_logits, logits)
    assert torch.equal(got_tokens, tokens)


@pytest.mark.cpu_int4
def test_stock_save_refuses_cpu_int4(tmp_path):
    """Why the stock producer has no CPU int4 row: transformers cannot write Int4OpaqueTensor."""
    model = _quantized_in_memory("llama", "cpu int4")
    model.config.quantization_config = TorchAoConfig(KINDS["cpu int4"]())
    with pytest.raises(Exception, match="Unsupported tensor type|invalid python storage"):
        model.save_pretrained(tmp_path / "hf")


@pytest.mark.cpu_int4
def test_unpack_refuses_what_torch_load_cannot_read(tmp_path):
    aockpt.save_pretrained(_quantized_in_memory("llama", "cpu int4"), tmp_path / "int4")
    with pytest.raises(UnsupportedTensorError, match="Int4OpaqueTensor.*weights_only"):
        aockpt.unpack(tmp_path / "int4", tmp_path / "state.pt")
    assert not (tmp_path / "state.pt").exists()


def test_registry_knows_what_torch_load_reads_after_import_torchao():
    import subprocess
    import sys

    from aockpt.registry import TENSOR_TYPES

    code = ("import torch, torchao; safe = set(torch.serialization.get_safe_globals()); "
            "print(' '.join(f'{c.__module__}.{c.__qualname__}' for c in safe))")
    safe = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
               .stdout.split())
    for entry in TENSOR_TYPES.values():
        assert (f"{entry.cls.__module__}.{entry.cls.__qualname__}" in safe) is entry.weights_only, entry.name


def test_quantize_then_save_writes_the_quantization_config(tmp_path):
    """The issue's symptom: quantize_ leaves the model's config without one; the folder must have it."""
    model = _quantized_in_memory("llama", "int8 weight-only")
    assert getattr(model.config, "quantization_config", None) is None
    aockpt.save_pretrained(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao"
    assert config["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"


def test_folder_without_quantization_config_is_called_wrong_then_fixed_by_pack(tmp_path):
    """The verdict for a folder stock loads silently wrong, checked against stock; `aockpt pack` fixes it."""
    from click.testing import CliRunner

    from aockpt.cli import main

    model = _quantized_in_memory("llama", "int8 weight-only")
    aockpt.save(model.state_dict(), tmp_path / "bare")
    model.config.save_pretrained(tmp_path / "bare")  # what a user writes by hand after quantize_
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "bare", dtype=torch.bfloat16).eval()(ids).logits
    assert aockpt.inspect(tmp_path / "bare").stock.verdict == "loads wrong weights"
    assert not torch.equal(stock, want)
    result = CliRunner().invoke(main, ["pack", str(tmp_path / "bare"), str(tmp_path / "packed")])
    assert result.exit_code == 0, result.output
    shown = json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "packed"), "--json"]).output)
    assert shown["stock"]["verdict"] == "loads exactly" and shown["stock"]["loads"] is True
    with torch.no_grad():
        fixed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.bfloat16).eval()(ids).logits
    assert torch.equal(fixed, want)


def test_tied_quantized_embedding_is_stored_once(tmp_path):
    model = _quantized_in_memory("qwen3", "mix (skip + embeddings)")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    aockpt.save_pretrained(model, tmp_path / "hf")
    info = aockpt.inspect(tmp_path / "hf")
    alias_of = {t.name: t.alias_of for t in info.tensors}
    assert {alias_of["lm_head.weight"], alias_of["model.embed_tokens.weight"]} == {None, "lm_head.weight"}
    loaded = aockpt.load_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_omitted_weight_that_is_not_tied_is_named(tmp_path):
    """transformers may omit a tied weight; a missing untied one is still a corrupt checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _stock_quantized("llama", "int8 weight-only", tmp_path)
    model.save_pretrained(tmp_path / "stock")
    path = tmp_path / "stock" / "model.safetensors"
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != "lm_head.weight"}
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(AockptError, match="lm_head.weight is listed but none of its data is stored"):
        aockpt.load_pretrained(tmp_path / "stock")


def expected_table() -> list[str]:
    """The docs table: one row per producer and tensor kind, one column per consumer."""
    rows = ["| producer | model | tensor type | " + " | ".join(CONSUMERS) + " |",
            "|---|---|---|" + "---|" * len(CONSUMERS)]
    for producer, arch, kind in _cases():
        cells = ["refuses" if _refuses(producer, arch, kind, c) else "exact" for c in CONSUMERS]
        rows.append(f"| {producer} | {arch} | {LEGACY_FOLDERS.get(kind, kind)} | " + " | ".join(cells) + " |")
    return rows


def test_docs_table_is_the_matrix():
    lines = DOC.read_text().splitlines()
    expected = expected_table()
    start = lines.index(expected[0])
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    assert lines[start:end] == expected


if __name__ == "__main__":
    print("\n".join(expected_table()))
