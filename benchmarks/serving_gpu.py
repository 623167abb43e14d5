"""Issue 23 on a GPU: a model quantized by torchao on CUDA, exported by aockpt to compressed-tensors, run through
compressed-tensors on CUDA (stock transformers) and compared with torchao's own CUDA kernels on the source.

Per model (a 2-layer Llama, hidden 1024, bf16, every Linear but lm_head quantized on CUDA by a torchao config):
  - torchao: logits of the quantized model (torchao's kernels) and of its dequantized twin (plain bf16 matmuls);
  - export: aockpt.export(..., lossy=True) verdict counts and the largest stated lossy error;
  - compressed-tensors: stock from_pretrained of the exported folder on CUDA, compressed (compressed-tensors
    decompresses on the first forward) and dequantize=True; weights vs torchao's dequantize(), logits vs both;
  - vLLM, when importable: greedy tokens from the exported folder vs torchao's greedy tokens.
One JSON line per model. The GPU image (torch 2.11, transformers 5.17) has no torchao, compressed-tensors or
pydantic: pass the folder of wheels to install first. Fetch them here (the image has psutil; pydantic-core is
the one binary wheel, cp312):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl torchao==0.18.0 compressed-tensors==0.20.1 loguru==0.7.3 \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0

then, on the GPU machine (carry .whl):

    PYTHONPATH=. python3 benchmarks/serving_gpu.py --wheels .whl --out $OUT/serving_gpu_h200.jsonl
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

SITE = "/tmp/aockpt-serving-site"


def install(wheels: str) -> None:
    """pip-install every wheel in `wheels` (no index, no deps) into SITE and put it first on sys.path."""
    files = sorted(glob.glob(str(Path(wheels) / "*.whl")))
    if not files:
        raise SystemExit(f"no wheels in {wheels}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", SITE, *files], check=True)
    sys.path.insert(0, SITE)


def configs() -> dict:
    """Model id -> torchao config (imported after the wheels are installed)."""
    from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerRow,
    )
    from torchao.quantization.granularity import PerGroup

    import torch

    return {
        "int8-weight-only": Int8WeightOnlyConfig(),
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig(),
        "float8-weight-only": Float8WeightOnlyConfig(),
        "float8-dynamic-per-row": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "intx-int4-sym-g128": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)),
        "int4-tile-g128 (float zero: lossy)": Int4WeightOnlyConfig(group_size=128,
                                                                   int4_packing_format="tile_packed_to_4d"),
        "nvfp4-weight-only": NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=True),
    }


def _model(device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False)
    return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).to(device).eval()


def _ct_config(dequantize: bool):
    """compressed-tensors loading options across transformers versions (5.17 has run_compressed only)."""
    import inspect

    from transformers import CompressedTensorsConfig

    if "dequantize" in inspect.signature(CompressedTensorsConfig.__init__).parameters:
        return CompressedTensorsConfig(dequantize=dequantize)
    return CompressedTensorsConfig(run_compressed=not dequantize)


def _diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def row(model_id: str, config, folder: Path, device: str) -> dict:
    """One model through torchao on CUDA, aockpt export, and compressed-tensors on CUDA."""
    import torch
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    import aockpt
    from aockpt import ct_codes

    model = _model(device)
    quantize_(model, config, filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and n != "lm_head")
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    state = model.state_dict()
    dequantized = {n: t if type(t) is torch.Tensor else ct_codes.reference(t, "cuda-tinygemm")
                   for n, t in state.items()}
    twin = _model(device)
    twin.load_state_dict(dequantized)
    with torch.no_grad():
        ao_logits = model(ids).logits
        twin_logits = twin(ids).logits
        ao_tokens = model.generate(ids, max_new_tokens=16, do_sample=False)
    aockpt.save_pretrained(model, folder / "src", force=True)
    report = aockpt.export(folder / "src", folder / "ct", lossy=True, force=True)
    verdicts: dict[str, int] = {}
    for v in report.tensors:
        verdicts[v.verdict] = verdicts.get(v.verdict, 0) + 1
    errors = [v.error for v in report.tensors if v.error is not None]
    out = {"model": model_id, "verdicts": verdicts, "max_stated_lossy_error": max(errors) if errors else None,
           "torchao_kernels_vs_dequantized_twin": _diff(ao_logits, twin_logits)}
    for mode in ("dequantize", "compressed"):
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                folder / "ct", quantization_config=_ct_config(mode == "dequantize")).to(device).eval()
            on = next(loaded.parameters()).device  # dequantize=True stayed on the CPU after .to("cuda") (H200 run)
            with torch.no_grad():
                logits = loaded(ids.to(on)).logits.to(twin_logits.device)
                tokens = loaded.generate(ids.to(on), max_new_tokens=16, do_sample=False).to(ao_tokens.device)
            weights = loaded.state_dict()
            same = [torch.equal(weights[n].to(w.device), w) for n, w in dequantized.items() if n in weights]
            out[mode] = {"weights_equal_torchao_dequantize": f"{sum(same)}/{len(same)}",
                         "weight_devices": sorted({str(weights[n].device) for n in dequantized if n in weights}),
                         "logits_equal_dequantized_twin": bool(torch.equal(logits, twin_logits)),
                         "max_diff_vs_dequantized_twin": _diff(logits, twin_logits),
                         "max_diff_vs_torchao_kernels": _diff(logits, ao_logits),
                         "greedy_tokens_equal_torchao": bool(torch.equal(tokens, ao_tokens))}
        except Exception as e:  # recorded: the row says what compressed-tensors / transformers did
            out[mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    out["vllm"] = _vllm(folder / "ct", ids, ao_tokens)
    return out


def _vllm(folder: Path, ids, ao_tokens) -> dict | str:
    """Greedy tokens from vLLM serving the exported folder, when vLLM is importable."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return "not installed"
    try:
        llm = LLM(model=str(folder), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3)
        result = llm.generate([{"prompt_token_ids": ids[0].tolist()}],
                              SamplingParams(max_tokens=16, temperature=0.0))
        tokens = result[0].outputs[0].token_ids
        return {"greedy_tokens_equal_torchao": list(tokens) == ao_tokens[0, ids.shape[1]:].tolist()}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", help="folder of wheels to install first (torchao, compressed-tensors, loguru)")
    parser.add_argument("--out", required=True, help="JSON lines file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", nargs="*", help="model ids to run (default: all)")
    args = parser.parse_args()
    if args.wheels:
        install(args.wheels)
    import torch

    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with open(args.out, "w") as out, tempfile.TemporaryDirectory() as tmp:
        for i, (model_id, config) in enumerate(configs().items()):
            if args.only and model_id not in args.only:
                continue
            try:
                line = {**env, **row(model_id, config, Path(tmp) / f"model{i}", args.device)}
            except Exception as e:
                line = {**env, "model": model_id, "error": f"{type(e).__name__}: {e}",
                        "trace": traceback.format_exc()[-1500:]}
            print(json.dumps(line), flush=True)
            out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
