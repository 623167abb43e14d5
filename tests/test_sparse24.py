"""2:4 sparse decoders against packings made by the real packers: cuSPARSELt on an H100, torchao 0.13's Marlin."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aockpt.legacy import sparse24
from aockpt.errors import CorruptCheckpointError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CSLT = load_file(str(FIXTURES / "cuda" / "cslt" / "cslt_int8.safetensors"))
MARLIN = FIXTURES / "legacy" / "marlin24" / "marlin24.safetensors"


def _generator(path: Path):
    """The fixture's own generator module: it regenerates the seeded inputs the packer was given."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CSLT_GEN = _generator(FIXTURES / "cuda" / "legacy_gpu.py")
MARLIN_GEN = _generator(FIXTURES / "legacy" / "make_marlin24_golden.py")


def _cslt_case(key: str) -> tuple[int, int, int]:
    shape, sample = key.split(":")
    rows, cols = (int(x) for x in shape.split("x"))
    return rows, cols, int(sample)


@pytest.mark.parametrize("key", sorted(CSLT), ids=str)
def test_cusparselt_packing_decodes_to_the_matrix_given_to_the_gpu(key: str) -> None:
    rows, cols, sample = _cslt_case(key)
    want = CSLT_GEN.random_2_4_int8(rows, cols, seed=rows * 100_000 + cols * 100 + sample)
    packed = CSLT[key]
    assert packed.numel() == sparse24.cusparselt_size(rows, cols)
    assert torch.equal(sparse24.cusparselt_to_dense(packed, rows, cols, key), want)


def test_golden_covers_padded_and_multi_tile_shapes() -> None:
    shapes = {key.split(":")[0] for key in CSLT}
    meta = json.loads(safe_open(str(FIXTURES / "cuda" / "cslt" / "cslt_int8.safetensors"), "pt").metadata()["meta"])
    assert {"32x64", "96x160", "256x512", "512x256"} <= shapes and not any("error" in v for v in meta["shapes"].values())


@pytest.mark.parametrize("case", MARLIN_GEN.CASES, ids=lambda c: "{}x{}g{}".format(*c))
def test_marlin24_packing_decodes_to_codes_and_scales_given_to_torchao(case: tuple[int, int, int]) -> None:
    k, n, group = case
    codes, scales = MARLIN_GEN.marlin_case(k, n, group)
    parts = {name: t for name, t in load_file(str(MARLIN)).items() if name.startswith(f"{k}x{n}g{group}:")}
    key = f"{k}x{n}g{group}"
    got_codes, got_scales = sparse24.marlin24_to_dense(parts[f"{key}:int_data"], parts[f"{key}:scale"],
                                                       parts[f"{key}:meta"], k, n, group, key)
    assert torch.equal(got_codes, codes.t().to(got_codes.dtype))
    assert torch.equal(got_scales, scales.t())


def test_cusparselt_wrong_size_is_corrupt() -> None:
    packed = CSLT["64x128:0"]
    with pytest.raises(CorruptCheckpointError, match="layer.weight: .*cannot hold a 64x256"):
        sparse24.cusparselt_to_dense(packed, 64, 256, "layer.weight")


def test_cusparselt_impossible_position_code_is_corrupt() -> None:
    packed = CSLT["64x64:0"].clone()
    packed.view(-1)[64 * 64 // 2:] = 0  # code 0: both kept values at position 0
    with pytest.raises(CorruptCheckpointError, match="same or a reversed position"):
        sparse24.cusparselt_to_dense(packed, 64, 64, "w")


def test_marlin24_parts_that_disagree_with_the_shape_are_corrupt() -> None:
    parts = load_file(str(MARLIN))
    with pytest.raises(CorruptCheckpointError, match="do not describe a 64x256 int4 weight"):
        sparse24.marlin24_to_dense(parts["128x64g32:int_data"], parts["128x64g32:scale"], parts["128x64g32:meta"],
                                   256, 64, 32, "w")
