"""Exact int4 re-layout: CPU packers vs torch's, tile packing vs bytes torch packed on an H100, round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torchao.prototype.quantization.int4 import Int4OpaqueTensor
from torchao.quantization.quant_primitives import (
    MappingType,
    _choose_qparams_affine_tinygemm,
    _dequantize_affine_tinygemm,
    _quantize_affine_tinygemm,
)
from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

from aockpt.errors import PortabilityError
from aockpt.relayout import Int4Canonical, cpu, cpu_packer, dequantize, relayout, tinygemm
from aockpt.relayout import xpu as xpu_layout

CUDA_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cuda"


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _codes(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _opaque(n: int, k: int, group: int, seed: int) -> Int4OpaqueTensor:
    w = torch.randn(n, k, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))
    return Int4OpaqueTensor.from_hp(w, [1, group])


def _flat(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    names, attrs = t.__tensor_flatten__()
    return {name: getattr(t, name) for name in names}, attrs


@pytest.mark.cpu_int4
@pytest.mark.parametrize("n", [16, 32, 48, 64, 80, 208])
@pytest.mark.parametrize("k", [2, 64, 1000])
def test_cpu_packing_matches_torch_on_this_machine(n: int, k: int) -> None:
    codes = _codes(n, k, n * k)
    ref = cpu.torch_pack_cpu(codes)
    layout = cpu.PACKINGS[cpu_packer()]
    assert _bytes_equal(cpu.pack_cpu(codes, layout), ref)
    assert _bytes_equal(cpu.unpack_cpu(ref, n, k, layout), codes)


@pytest.mark.parametrize("n", [16, 32, 48, 64, 96, 4096])
def test_packings_agree_exactly_where_every_packer_writes_the_same_bytes(n: int) -> None:
    """The only evidence a file without a packer record carries: at 16 rows all packings coincide, beyond never."""
    codes = _codes(n, 64, n)
    written = {cpu.pack_cpu(codes, packing).numpy().tobytes() for packing in cpu.PACKINGS.values()}
    assert cpu.packings_agree(n) == (len(written) == 1) == (n == 16)


def test_cpu_packing_matches_torch_without_simd() -> None:
    """torch's fallback (non-AVX) packer, selected with ATEN_CPU_CAPABILITY, against our 'cpu-default'."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    script = CUDA_FIXTURES / "gpu_evidence.py"
    out = subprocess.run([sys.executable, str(script), "cpu-check"], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["packer"] == "cpu-default" and result["cases"] > 40 and result["mismatches"] == []


@pytest.mark.parametrize("ik", tinygemm.INNER_K_TILES)
def test_tile_unpack_matches_bytes_packed_on_h100(ik: int) -> None:
    with safe_open(CUDA_FIXTURES / "tile_golden.safetensors", "pt") as f:
        codes, qdata = f.get_tensor(f"codes_ik{ik}"), f.get_tensor(f"qdata_ik{ik}")
    assert _bytes_equal(tinygemm.unpack_tiles(qdata), codes)
    assert _bytes_equal(tinygemm.pack_tiles(codes, ik), qdata)


@pytest.mark.parametrize(("n", "k", "group"), [(64, 256, 32), (48, 512, 64), (96, 1024, 128), (32, 2048, 128)])
@pytest.mark.parametrize("ik", tinygemm.INNER_K_TILES)
def test_cpu_opaque_to_tile_and_back_is_bit_identical(n: int, k: int, group: int, ik: int) -> None:
    opaque = _opaque(n, k, group, seed=n + k + ik)
    parts, attrs = _flat(opaque)
    canon = cpu.to_canonical(parts, attrs, cpu_packer())
    codes, sz = tinygemm.padded(canon, torch.device("cpu"))
    tile_parts = {"qdata": tinygemm.pack_tiles(codes, ik), "scale_and_zero": sz}
    tile_attrs = {"block_size": [1, group], "shape": torch.Size((n, k))}
    back_parts, back_attrs, _ = relayout(tinygemm, cpu, tile_parts, tile_attrs, packer="cuda-tinygemm", build_on="cpu")
    assert _bytes_equal(back_parts["qdata"], parts["qdata"])
    assert _bytes_equal(back_parts["scale_and_zero"], parts["scale_and_zero"])
    again = cpu.to_canonical(back_parts, back_attrs, cpu_packer())
    assert _bytes_equal(dequantize(again), dequantize(canon))


def test_canonical_dequantize_is_torchaos_tinygemm_math() -> None:
    canon = cpu.to_canonical(*_flat(_opaque(64, 256, 32, seed=7)), cpu_packer())
    sz = canon.scale_and_zero
    ref = _dequantize_affine_tinygemm(canon.values.to(torch.int32), (1, 32), sz[..., 0].t(), sz[..., 1].t(),
                                      torch.int32, 0, 15, output_dtype=torch.float32).to(torch.bfloat16)
    assert _bytes_equal(dequantize(canon), ref)


@pytest.mark.parametrize(("n", "k", "group"), [(100, 1088, 64), (20, 96, 32), (16, 200, 64), (64, 1024, 128)])
def test_tile_padding_reproduces_torchaos(n: int, k: int, group: int) -> None:
    """Re-packing for CUDA pads exactly as torchao's Int4TilePackedTo4dTensor.from_hp does (its own functions)."""
    w = torch.randn(n, k, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(k))
    n_pad, k_pad = -(-n // 8) * 8, -(-k // 1024) * 1024
    hp = torch.nn.functional.pad(w, (0, k_pad - k, 0, n_pad - n))
    s, z = _choose_qparams_affine_tinygemm(hp, MappingType.ASYMMETRIC, (1, group), torch.int32, 0, 15,
                                           scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
    q = _quantize_affine_tinygemm(hp, (1, group), s, z, torch.int32, 0, 15).to(torch.uint8)
    sz = pack_tinygemm_scales_and_zeros(s.reshape(n_pad, -1), z.reshape(n_pad, -1), torch.bfloat16)
    canon = Int4Canonical(q[:n, :k].contiguous(), sz[: -(-k // group), :n].contiguous(), group, (n, k), torch.bfloat16)
    parts, attrs, packer = tinygemm.from_canonical(canon, torch.device("cpu"))
    assert packer == "cuda-tinygemm" and attrs["shape"] == torch.Size((n, k))
    assert _bytes_equal(parts["qdata"], tinygemm.pack_tiles(q, 8))
    assert _bytes_equal(parts["scale_and_zero"], sz)


def _cuda_linear_fixture(name: str) -> tuple[dict, dict]:
    """A torchao-flattened safetensors file made on the H100 and its recorded outputs."""
    with safe_open(CUDA_FIXTURES / f"linear_{name}.safetensors", "pt") as f:
        meta = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    with safe_open(CUDA_FIXTURES / f"linear_{name}.expected.safetensors", "pt") as f:
        expected = {key: f.get_tensor(key) for key in f.keys()}
    layers = {}
    for layer in ("0", "2"):
        record = json.loads(meta[f"{layer}.weight"])
        parts = {p: tensors[f"{layer}._weight_{p}"] for p in record["_tensor_data_names"]}
        layers[layer] = (record["_type"], parts, record["_data"], tensors[f"{layer}.bias"])
    return layers, expected


@pytest.mark.parametrize("name", ["int4_tile_g32", "int4_tile_g64"])
def test_cuda_made_int4_runs_on_cpu_after_relayout(name: str) -> None:
    layers, expected = _cuda_linear_fixture(name)
    h = expected["input"]
    for layer, act in (("0", torch.relu), ("2", lambda t: t)):
        type_name, parts, attrs, bias = layers[layer]
        assert type_name == "Int4TilePackedTo4dTensor"
        canon = tinygemm.to_canonical(parts, attrs, "cuda-tinygemm")
        assert _bytes_equal(dequantize(canon), expected[f"dequantized.{layer}.weight"])  # tinygemm's own weights
        p, a, packer = relayout(tinygemm, cpu, parts, attrs, packer="cuda-tinygemm", build_on="cpu")
        assert packer == cpu_packer()
        weight = Int4OpaqueTensor(p["qdata"], p["scale_and_zero"], a["block_size"], a["shape"])
        h = act(torch.nn.functional.linear(h, weight, bias))
    gpu = expected["output"].float()
    assert torch.allclose(h.float(), gpu, rtol=2**-7, atol=2**-7 * float(gpu.abs().max()))


def test_unknown_packers_are_refused() -> None:
    parts, attrs = _flat(_opaque(32, 64, 32, seed=3))
    with pytest.raises(PortabilityError, match="cpu-neon"):
        cpu.to_canonical(parts, attrs, "cpu-neon")
    with pytest.raises(PortabilityError, match="rocm-tinygemm"):
        tinygemm.to_canonical({}, {}, "rocm-tinygemm")


def _xpu_friendly(seed: int, exact: bool) -> Int4Canonical:
    """A canonical int4 weight; when `exact`, power-of-two scales and zeros (8 - integer) * scale, so that
    (q - 8) * s + z and (q - zp) * s round alike (an integer z / s alone is not enough: z is rounded to bf16)."""
    gen = torch.Generator().manual_seed(seed)
    n, k, g = 32, 128, 32
    if exact:
        scale = torch.exp2(-torch.randint(3, 8, (k // g, n), generator=gen).float()).to(torch.bfloat16)
    else:
        scale = (torch.rand(k // g, n, generator=gen) * 0.1 + 0.01).to(torch.bfloat16)
    zp = torch.randint(0, 16, (k // g, n), generator=gen)
    zero = ((8 - zp) * scale.float()).to(torch.bfloat16) if exact else (torch.rand(k // g, n, generator=gen) - 0.5).to(torch.bfloat16)
    return Int4Canonical(_codes(n, k, seed), torch.stack((scale, zero), -1), g, (n, k), torch.bfloat16)


def test_xpu_layout_is_exact_only_for_integer_zero_points() -> None:
    exact = _xpu_friendly(1, exact=True)
    parts, attrs, err = xpu_layout.measured_from_canonical(exact, torch.device("cpu"))
    assert err == 0.0 and parts["qdata"].dtype == torch.int32 and parts["qdata"].shape == (32, 16)
    back, err = xpu_layout.measured_to_canonical(parts, attrs)
    assert err == 0.0 and _bytes_equal(back.values, exact.values)
    assert _bytes_equal(dequantize(back), dequantize(exact))
    inexact = _xpu_friendly(2, exact=False)
    with pytest.raises(PortabilityError, match="allow_inexact"):
        xpu_layout.from_canonical(inexact, torch.device("cpu"))
    _, _, err = xpu_layout.measured_from_canonical(inexact, torch.device("cpu"), allow_inexact=True)
    assert 0.0 < err < 0.1
