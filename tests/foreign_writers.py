"""Model folders quantized by other libraries, for tests/test_foreign.py.

compressed-tensors folders are written by compressed-tensors itself (the installed release, 0.20.1): its
preset schemes applied to a tiny transformers Llama, each weight's scales computed by compressed-tensors'
own qparam functions from the weight (what a min-max observer does without calibration data), then
``ModelCompressor.compress_model`` + ``save_pretrained`` + ``update_config``, as llm-compressor saves.
Libraries that do not install on CPU (GPTQ, AWQ, bitsandbytes, DeepSeek-style FP8) are written as their
writers lay them out: the config.json ``quantization_config`` and tensor names, dtypes and shapes of
gptqmodel/AutoGPTQ, AutoAWQ (GEMM), bitsandbytes via transformers, and DeepSeek-V3.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, FFN = 128, 256  # divisible by compressed-tensors' group 128 and FP8 block 128
CT_PRESETS = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "W4AFP8", "W2A16", "FP8", "FP8_DYNAMIC", "FP8_BLOCK",
              "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "MXFP8")


def tiny_llama() -> torch.nn.Module:
    """A deterministic one-layer bf16 Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, dtype="bfloat16")
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def _qparams(module: torch.nn.Module, args, global_scale):
    """Scale and zero point of a weight by its strategy, from compressed-tensors' own functions."""
    from compressed_tensors.quantization.quant_args import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp

    w = module.weight.float()
    if args.strategy == S.CHANNEL:
        return calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    if args.strategy == S.BLOCK:
        rows, cols = args.block_structure
        blocks = w.unflatten(0, (-1, rows)).unflatten(-1, (-1, cols))
        return calculate_qparams(blocks.amin((1, 3)), blocks.amax((1, 3)), args)
    if args.strategy == S.TENSOR:
        low, high = torch.aminmax(w)
        return calculate_qparams(low.reshape(1), high.reshape(1), args)
    return compute_dynamic_scales_and_zp(w, args, module, global_scale=global_scale)


def write_compressed_tensors(preset: str, dst: Path) -> Path:
    """A tiny Llama quantized with a compressed-tensors preset scheme and saved compressed, by compressed-tensors."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import generate_gparam

    model = tiny_llama()
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            global_scale = None
            if hasattr(module, "weight_global_scale"):
                low, high = torch.aminmax(module.weight.float())
                global_scale = generate_gparam(low.reshape(1), high.reshape(1))
                module.weight_global_scale.copy_(global_scale)
            scale, zero = _qparams(module, scheme.weights, global_scale)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point") and zero is not None:
                module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    return dst


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The decoder's linear layers (lm_head stays plain, as these writers leave it by default)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _gptq(w: torch.Tensor, group: int, *, g_idx: bool) -> dict[str, torch.Tensor]:
    """GPTQ's 4-bit tensors: qweight [in/8, out], qzeros [in/group, out/8] int32, scales [in/group, out] fp16."""
    out, inp = w.shape
    parts = {"qweight": torch.randint(-2**31, 2**31 - 1, (inp // 8, out), dtype=torch.int32),
             "qzeros": torch.full((inp // group, out // 8), 0x77777777, dtype=torch.int32),
             "scales": (w.float().abs().reshape(out, inp // group, group).amax(-1).T / 7).to(torch.float16)}
    if g_idx:
        parts["g_idx"] = (torch.arange(inp) // group).to(torch.int32)
    return parts


def _awq(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: qweight [in, out/8], qzeros [in/group, out/8] int32, scales [in/group, out] fp16."""
    parts = _gptq(w, group, g_idx=False)
    out, inp = w.shape
    parts["qweight"] = torch.randint(-2**31, 2**31 - 1, (inp, out // 8), dtype=torch.int32)
    return parts


def _bnb4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes NF4 with double quantization as transformers saves it (weight packed two per byte)."""
    blocks = w.numel() // 64
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(w.shape),
                        "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0}).encode()
    return {"weight": torch.randint(0, 256, (w.numel() // 2, 1), dtype=torch.uint8),
            "weight.absmax": torch.randint(0, 256, (blocks,), dtype=torch.uint8),
            "weight.quant_map": torch.linspace(-1, 1, 16),
            "weight.nested_absmax": torch.rand(max(blocks // 256, 1)),
            "weight.nested_quant_map": torch.linspace(-1, 1, 256),
            "weight.quant_state.bitsandbytes__nf4": torch.frombuffer(bytearray(state), dtype=torch.uint8)}


def _bnb8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes LLM.int8(): int8 weight, per-row SCB, and the weight_format byte."""
    scb = w.float().abs().amax(1)
    return {"weight": (w.float() / scb[:, None] * 127).round().to(torch.int8), "SCB": scb,
            "weight_format": torch.tensor(0, dtype=torch.uint8)}


def _fp8_block(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 FP8: float8_e4m3fn weight and a float32 weight_scale_inv per 128x128 block."""
    out, inp = w.shape
    scale = w.float().abs().reshape(out // 128, 128, inp // 128, 128).amax((1, 3)) / 448
    codes = (w.float() / scale.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
    return {"weight": codes, "weight_scale_inv": scale}


# method -> (its quantization_config as its writer records it, the per-linear tensors it stores)
HAND_WRITTEN = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
              "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq"},
             lambda w: _gptq(w, 128, g_idx=True)),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
             "modules_to_not_convert": None}, lambda w: _awq(w, 128)),
    "bitsandbytes_4bit": ({"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                           "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                           "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_threshold": 6.0}, _bnb4),
    "bitsandbytes_8bit": ({"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True,
                           "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False}, _bnb8),
    "fp8": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
            _fp8_block),
}


def write_hand(method: str, dst: Path) -> Path:
    """A tiny Llama folder laid out as `method`'s writer lays it out (config and tensor names)."""
    config, parts_of = HAND_WRITTEN[method]
    model = tiny_llama()
    model.save_pretrained(dst)
    state = {n: t.contiguous() for n, t in model.state_dict().items()}
    for name, linear in _linears(model).items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{leaf}": t.contiguous() for leaf, t in parts_of(linear.weight.detach()).items()})
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    data = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**data, "quantization_config": config}, indent=2))
    return dst
