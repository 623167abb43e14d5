"""Shared test material: one real torchao tensor per registry type (and variant), built on CPU."""

from __future__ import annotations

import os
import warnings
from typing import Callable

import pytest
import torch

os.environ.setdefault("AOCKPT_NO_PROGRESS", "1")
warnings.filterwarnings("ignore")

from aockpt import registry  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerRow,
    PerTensor,
    quantize_,
)
from torchao.quantization.granularity import PerGroup  # noqa: E402
from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs  # noqa: E402

N, K, GROUP = 64, 128, 32


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight(seed: int = 0, n: int = N, k: int = K) -> torch.Tensor:
    """A deterministic bf16 weight."""
    return torch.randn(n, k, generator=_gen(seed), dtype=torch.float32).to(torch.bfloat16)


def _quantized(config) -> torch.Tensor:
    """Quantize a Linear's weight with a real torchao config."""
    layer = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    layer.weight.data = weight(1)
    quantize_(layer, config)
    return layer.weight.detach()


def _raw(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random bytes of a given dtype and shape, for types this machine cannot quantize into."""
    nbytes = torch.empty(shape, dtype=dtype).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (nbytes,), generator=_gen(seed), dtype=torch.uint8).view(dtype).reshape(shape)


def _float8_dynamic(granularity) -> torch.Tensor:
    cls = registry.TENSOR_TYPES["Float8Tensor"].cls
    from torchao.float8.inference import Float8MMConfig

    return cls.from_hp(weight(2), granularity=granularity, mm_config=Float8MMConfig(use_fast_accum=True),
                       act_quant_kwargs=QuantizeTensorToFloat8Kwargs(granularity=granularity))


def _tile_packed() -> torch.Tensor:
    cls = registry.TENSOR_TYPES["Int4TilePackedTo4dTensor"].cls
    return cls(_raw(3, (N // 8, 8, 32, 4), torch.int32), _raw(4, (K // GROUP, N, 2), torch.bfloat16).clamp(-4, 4),
               [1, GROUP], torch.Size([N, K]))


def _opaque() -> torch.Tensor:
    return registry.TENSOR_TYPES["Int4OpaqueTensor"].cls.from_hp(weight(5), [1, GROUP])


def _int4_plain() -> torch.Tensor:
    cls = registry.TENSOR_TYPES["Int4Tensor"].cls
    return cls(_raw(6, (N, K // 2), torch.int8), _raw(7, (K // GROUP, N), torch.bfloat16),
               _raw(8, (K // GROUP, N), torch.bfloat16), [1, GROUP], torch.Size([N, K]))


def _int4_preshuffled() -> torch.Tensor:
    cls = registry.TENSOR_TYPES["Int4PreshuffledTensor"].cls
    return cls(_raw(9, (N, K // 2), torch.int8), _raw(10, (K // GROUP, N), torch.bfloat16), [1, GROUP], [N, K],
               group_zero=_raw(11, (K // GROUP, N), torch.bfloat16))


def _int4_plain_int32() -> torch.Tensor:
    cls = registry.TENSOR_TYPES["Int4PlainInt32Tensor"].cls
    return cls(_raw(12, (N, K // 8), torch.int32), _raw(13, (K // GROUP, N), torch.bfloat16),
               _raw(14, (K // GROUP, N), torch.int8), [1, GROUP], torch.Size([N, K]))


def _mx(elem_dtype) -> torch.Tensor:
    return registry.TENSOR_TYPES["MXTensor"].cls.to_mx(weight(15), elem_dtype, 32)


def _nvfp4() -> torch.Tensor:
    return registry.TENSOR_TYPES["NVFP4Tensor"].cls.to_nvfp4(weight(16))


def _nf4() -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4(weight(17, 256, 256))


# case id -> (registry type name, maker). Every registry entry needs at least one case (tested below).
CASES: dict[str, tuple[str, Callable[[], torch.Tensor]]] = {
    "int8-weight-only": ("Int8Tensor", lambda: _quantized(Int8WeightOnlyConfig())),
    "int8-dynamic": ("Int8Tensor", lambda: _quantized(Int8DynamicActivationInt8WeightConfig())),
    "float8-weight-only": ("Float8Tensor", lambda: _quantized(Float8WeightOnlyConfig())),
    "float8-dynamic-per-row": ("Float8Tensor", lambda: _float8_dynamic(PerRow())),
    "float8-dynamic-per-tensor": ("Float8Tensor", lambda: _float8_dynamic(PerTensor())),
    "intx-weight-only": ("IntxUnpackedToInt8Tensor",
                         lambda: _quantized(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))),
    "intx-int8-dynamic": ("IntxUnpackedToInt8Tensor", lambda: _quantized(Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32)))),
    "int4-tile-packed": ("Int4TilePackedTo4dTensor", _tile_packed),
    "int4-opaque": ("Int4OpaqueTensor", _opaque),
    "int4-plain": ("Int4Tensor", _int4_plain),
    "int4-preshuffled": ("Int4PreshuffledTensor", _int4_preshuffled),
    "int4-plain-int32": ("Int4PlainInt32Tensor", _int4_plain_int32),
    "mxfp8": ("MXTensor", lambda: _mx(torch.float8_e4m3fn)),
    "mxfp4": ("MXTensor", lambda: _mx(torch.float4_e2m1fn_x2)),
    "nvfp4": ("NVFP4Tensor", _nvfp4),
    "nf4": ("NF4Tensor", _nf4),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> tuple[str, str, torch.Tensor]:
    """(case id, registry type name, tensor) for every case."""
    type_name, make = CASES[request.param]
    return request.param, type_name, make()


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same type, outer shape/dtype, inner tensors byte for byte, attributes equal."""
    assert type(a) is type(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    if type(a) is torch.Tensor:
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)) if a.numel() else True
        return
    names_a, attrs_a = a.__tensor_flatten__()
    names_b, attrs_b = b.__tensor_flatten__()
    assert names_a == names_b
    for name in names_a:
        ia, ib = getattr(a, name), getattr(b, name)
        assert ia.dtype == ib.dtype and ia.shape == ib.shape, name
        assert torch.equal(ia.contiguous().reshape(-1).view(torch.uint8), ib.contiguous().reshape(-1).view(torch.uint8)), name
    assert _normalise(attrs_a) == _normalise(attrs_b)


def _normalise(attrs: dict) -> dict:
    """Attributes compared by value; devices compared by type."""
    return {k: (v.type if isinstance(v, torch.device) else v) for k, v in attrs.items()}


def tiny_config(arch: str = "llama", *, layers: int = 2, tie: bool = False):
    """The suite's one tiny transformers config: a real architecture with dimensions small enough for CI."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    return Qwen3Config(head_dim=16, **common) if arch == "qwen3" else LlamaConfig(**common)


def tiny_model(arch: str = "llama", *, layers: int = 2, tie: bool = False, seed: int = 0):
    """A seeded bf16 causal LM of `tiny_config`, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, layers=layers, tie=tie), dtype=torch.bfloat16).eval()


def assert_close_in_bf16_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int = 4) -> None:
    """|got - want| <= ulps bf16 steps at the largest |want|: where two kernels accumulate differently."""
    top = want.float().abs().max()
    spacing = 2.0 ** (torch.floor(torch.log2(top)) - 7)
    worst = (got.float() - want.float()).abs().max()
    assert worst <= ulps * spacing, f"max diff {worst} > {ulps} ulps ({spacing}) of max output {top}"


def _int4_plain(t: torch.Tensor) -> torch.Tensor:
    """Int4Tensor (mslk) has no CPU dequantize: w = q * scale + zero, q signed, even k in the low nibble."""
    from aockpt.relayout.canonical import bytes_to_nibbles

    q = bytes_to_nibbles(t.qdata.view(torch.uint8)).to(torch.float32)
    q = torch.where(q >= 8, q - 16, q)
    g = t.block_size[-1]
    scale, zero = (p.float().T.repeat_interleave(g, 1) for p in (t.scale, t.zero_point))
    return (q * scale + zero).to(t.dtype)


def _int4_xpu(t: torch.Tensor) -> torch.Tensor:
    """Int4PlainInt32Tensor through aockpt's XPU layout math (torchao dequantizes it on XPU only)."""
    from aockpt.relayout import xpu
    from aockpt.relayout.canonical import bytes_to_nibbles

    codes = bytes_to_nibbles(t.qdata.contiguous().view(torch.uint8)).view(t.shape)
    return xpu._xpu_dequantize(codes, t.scale, t.zero_point, t.block_size[-1])


def _canonical(t: torch.Tensor, packer: str) -> torch.Tensor:
    """A device-packed int4 tensor through aockpt's canonical form, read as `packer` wrote it."""
    from aockpt import codec, relayout

    flat = codec.flatten("w", t)
    layout = flat.row.relayout
    return relayout.dequantize(layout.to_canonical(flat.parts, flat.attrs, packer)).to(t.dtype)


def dequantize(t: torch.Tensor, *, cpu_packer: str | None = None) -> torch.Tensor:
    """The suite's one dequantizer: torchao's own where it runs on CPU, aockpt's int4 math where it does not.

    CPU int4 is read as `cpu_packer` wrote it (default: this machine's packer, for tensors made here).
    """
    from aockpt import relayout

    by_type = {
        "Int4Tensor": _int4_plain,
        "Int4PlainInt32Tensor": _int4_xpu,
        "Int4TilePackedTo4dTensor": lambda x: _canonical(x, "cuda-tinygemm"),
        "Int4OpaqueTensor": lambda x: _canonical(x, cpu_packer or relayout.cpu_packer()),
    }
    return by_type.get(type(t).__name__, lambda x: x.dequantize())(t)


def with_recomputed_buffers(model):
    """The model as every loader rebuilds it: non-persistent buffers (rotary frequencies) are in no file, so
    transformers' own from_pretrained recomputes them (in float32) even where `.to(dtype)` had cast them."""
    import copy

    fresh = type(model)(copy.deepcopy(model.config))
    persistent = set(model.state_dict())
    for name, buffer in fresh.named_buffers():
        if name not in persistent:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buffer
    return model
