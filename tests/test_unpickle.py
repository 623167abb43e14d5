"""safe_load: real torchao checkpoints load bit-exact; every hostile file is refused and runs nothing."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from aockpt import legacy, registry, unpickle
from aockpt.errors import AockptError, CorruptCheckpointError, UnsafeCheckpointError
from aockpt.unpickle import allowlist, safe_load

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402

CONTAINERS = {"zip": True, "legacy": False}  # value: torch.save's _use_new_zipfile_serialization


def _quantized(config, dtype=torch.float32, shape=(32, 64)) -> torch.Tensor:
    """One Linear weight quantized in place by torchao's own quantize_."""
    from torchao.quantization import quantize_

    layer = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False)).to(dtype)
    quantize_(layer, config)
    return layer[0].weight


def _cpu_tensors() -> dict[str, torch.Tensor]:
    """One tensor of every registry type that can be built on a CPU-only machine."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    torch.manual_seed(0)
    return {
        "int8_weight_only": _quantized(Int8WeightOnlyConfig()),
        "int8_dynamic": _quantized(Int8DynamicActivationInt8WeightConfig()),
        "float8_weight_only": _quantized(Float8WeightOnlyConfig(), torch.bfloat16),
        "intx_weight_only": _quantized(IntxWeightOnlyConfig()),
        "int4_opaque": Int4OpaqueTensor.from_hp(torch.randn(32, 64, dtype=torch.bfloat16), [1, 32]),
        "nf4": to_nf4(torch.randn(128, 128, dtype=torch.bfloat16)),
        "plain": torch.randn(3, 5),
    }


@pytest.fixture(scope="module")
def cpu_tensors() -> dict[str, torch.Tensor]:
    return _cpu_tensors()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a fresh dense copy, so any stride works)."""
    return t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_raw(a), _raw(b))


def _assert_identical(loaded: torch.Tensor, saved: torch.Tensor) -> None:
    """Same class, every inner tensor byte-identical, every attribute equal."""
    assert type(loaded) is type(saved)
    entry = registry.tensor_type_of(saved, "saved")
    if not entry.quantized:
        assert _same_bytes(loaded, saved)
        return
    required, optional, attributes = entry.inner_names()
    for name in required + optional:
        a, b = getattr(loaded, name, None), getattr(saved, name, None)
        assert (a is None and b is None) or _same_bytes(a, b), name
    for name in attributes:  # NF4's registry entry names `tensor_meta`, which NF4Tensor itself lacks
        assert getattr(loaded, name, None) == getattr(saved, name, None), name


def test_cpu_tensors_cover_the_cpu_buildable_registry(cpu_tensors):
    built = {registry.tensor_type_of(t, k).name for k, t in cpu_tensors.items() if k != "plain"}
    assert built == {"Int8Tensor", "Float8Tensor", "IntxUnpackedToInt8Tensor", "Int4OpaqueTensor", "NF4Tensor"}


@pytest.mark.parametrize("container", CONTAINERS)
def test_registry_tensors_load_back_byte_identical(tmp_path, cpu_tensors, container):
    # torch cannot write float8 storages in the legacy container readably (its own load fails too)
    tensors = {k: v for k, v in cpu_tensors.items() if container == "zip" or k != "float8_weight_only"}
    path = tmp_path / "sd.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=CONTAINERS[container])
    loaded = safe_load(path)
    assert list(loaded) == list(tensors)
    for key, saved in tensors.items():
        _assert_identical(loaded[key], saved)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("fixtures/legacy/*/*.pt")), ids=str)
def test_legacy_fixtures_load_as_inert_records(path):
    """Real torchao 0.13/0.14 checkpoints load into legacy stand-ins, every weight one of them."""
    sd = safe_load(path)
    assert any(legacy.is_legacy(v) for v in sd.values())


@pytest.mark.parametrize("container", CONTAINERS)
def test_cuda_tagged_checkpoint_loads_on_cpu(tmp_path, container):
    legacy = container == "legacy"
    pkl = hostile.state_dict(hostile.tensor("0", 4, 4, location="cuda:0", legacy=legacy))
    data = hostile.floats(1.0, -2.5, 3.25, 0.0)
    raw = hostile.legacy_bytes(pkl, {"0": (4, data)}) if legacy else hostile.zip_bytes(pkl, {"0": data})
    path = tmp_path / "cuda.pt"
    path.write_bytes(raw)
    if torch.cuda.is_available():
        pytest.skip("this test checks the no-CUDA default of map_location")
    with pytest.raises(RuntimeError):  # what plain torch.load does with it here
        torch.load(path, weights_only=True)
    out = safe_load(path)
    assert out["w"].device.type == "cpu"
    assert _same_bytes(out["w"], torch.tensor([1.0, -2.5, 3.25, 0.0]))


@pytest.mark.parametrize("name,build", hostile.HOSTILE, ids=[n for n, _ in hostile.HOSTILE])
def test_hostile_file_is_refused_and_runs_nothing(tmp_path, name, build):
    path = build(tmp_path)
    with pytest.raises(AockptError) as info:
        safe_load(path)
    assert hostile.untouched(tmp_path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "frame #" not in message  # no C++ backtrace


@pytest.mark.parametrize("name,build", [h for h in hostile.HOSTILE if h[0].endswith("os_system")])
def test_env_override_cannot_reopen_unrestricted_load(tmp_path, monkeypatch, name, build):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = build(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        safe_load(path)
    assert hostile.untouched(tmp_path)


_TENSOR_CLASSES = {t.cls for t in registry.TENSOR_TYPES.values()}


@pytest.mark.parametrize("obj,name", allowlist(), ids=[name for _, name in allowlist()])
@pytest.mark.parametrize("abuse", ["reduce", "reduce-noargs", "newobj", "newobj-noargs"])
def test_allowlisted_global_abused_gives_clean_error(tmp_path, obj, name, abuse):
    """Junk calls/states give an AockptError, or at most an inert object of exactly the class named."""
    path = tmp_path / "abuse.pt"
    path.write_bytes(hostile.zip_bytes(dict(hostile.junk_calls(name))[abuse]))
    try:
        out = safe_load(path)
    except AockptError:
        return
    assert obj not in _TENSOR_CLASSES, f"{name} {abuse} loaded"
    assert type(out) is obj, f"{name} {abuse} loaded {out!r}"


def test_allowlist_is_exact_and_restored(tmp_path):
    before = set(torch.serialization.get_safe_globals())
    assert any("OptimState4bit" in repr(g) for g in before)  # torchao registered it at import
    pkl = hostile.program(hostile.newobj(hostile.g("torchao.optim.subclass_4bit", "OptimState4bit")))
    path = tmp_path / "optim.pt"
    path.write_bytes(hostile.zip_bytes(pkl))
    with pytest.raises(UnsafeCheckpointError, match="OptimState4bit"):
        safe_load(path)
    assert set(torch.serialization.get_safe_globals()) == before


def test_allowlist_names_are_exact_dotted_names():
    names = [name for _, name in allowlist()]
    assert len(names) == len(set(names))
    assert set(names) >= set(legacy.STAND_INS)
    assert "torchao.quantization.Int8Tensor" in names
    assert "torchao.dtypes.nf4tensor.NF4Tensor" in names  # how torchao 0.13-0.17 pickled NF4
    assert all(" " not in n and not n.endswith(".") and "*" not in n for n in names)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "truncated-zip", "truncated-legacy",
                                  "not-a-checkpoint"])
def test_unreadable_files_name_the_path(tmp_path, kind):
    path = tmp_path / "ckpt.pt"
    buf = io.BytesIO()
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind.startswith("truncated"):
        torch.save({"w": torch.arange(1000.0)}, buf, _use_new_zipfile_serialization=kind.endswith("zip"))
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "not-a-checkpoint":
        path.write_bytes(b"hello, I am a text file\n")
    with pytest.raises(CorruptCheckpointError) as info:
        safe_load(path)
    assert str(path) in str(info.value)


def _rezipped(src: Path, dst: Path, compression: int) -> Path:
    """The same zip members, written again with another storage method (a legal zip torch.load reads)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=compression)
    return dst


def test_deflated_zip_members_are_refused_not_read_as_wrong_bytes(tmp_path):
    weights = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64) % 7}
    torch.save(weights, tmp_path / "plain.pt")
    deflated = _rezipped(tmp_path / "plain.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    assert torch.equal(torch.load(deflated, weights_only=True)["w"], weights["w"])  # legal: torch reads it
    with pytest.raises(CorruptCheckpointError, match=r"compressed .*torch.save stores members uncompressed"):
        safe_load(deflated)
    stored = _rezipped(deflated, tmp_path / "stored.pt", zipfile.ZIP_STORED)
    assert _same_bytes(safe_load(stored, mmap=True)["w"], weights["w"])


def test_zip_member_checks_are_linear_and_bounded(tmp_path, monkeypatch):
    names = ["archive/data.pkl"] + [f"archive/data/{i}" for i in range(200_000)]
    start = time.perf_counter()
    unpickle._check_zip_names(tmp_path / "x.pt", names)
    assert time.perf_counter() - start < 2
    with pytest.raises(CorruptCheckpointError, match="duplicate zip members"):
        unpickle._check_zip_names(tmp_path / "x.pt", names + names[-1:])
    monkeypatch.setattr(unpickle, "_MAX_ZIP_MEMBERS", 1000)
    with pytest.raises(CorruptCheckpointError, match="zip members, more than the 1,000"):
        unpickle._check_zip_names(tmp_path / "x.pt", names)


_BOMB_RUNNER = """
import resource, sys
from pathlib import Path
sys.path.insert(0, "tests")
import aockpt, hostile
from aockpt.errors import AockptError
builds = dict(hostile.HOSTILE)
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in hostile.BOMBS:
    d = Path(sys.argv[1]) / name
    d.mkdir()
    try:
        aockpt.pack(builds[name](d), d / "out")
        print("ACCEPTED", name)
    except AockptError as e:
        print("refused", name, type(e).__name__)
print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start)
"""


def test_memory_bombs_are_refused_without_allocating(tmp_path):
    out = subprocess.run([sys.executable, "-c", _BOMB_RUNNER, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "ACCEPTED" not in out.stdout and out.stdout.count("refused") == len(hostile.BOMBS), out.stdout
    assert int(out.stdout.split("grew_kb")[1]) < 200_000, out.stdout  # each bomb claims 2-8 GB


@pytest.mark.parametrize("name,build", hostile.PACK_REFUSED, ids=[n for n, _ in hostile.PACK_REFUSED])
def test_loadable_files_pack_refuses_leave_nothing(tmp_path, name, build):
    import aockpt

    path = build(tmp_path)
    with pytest.raises(AockptError) as info:
        aockpt.pack(path, tmp_path / "out", cpu_packer="native")  # say the packer: the junk itself must be refused
    assert isinstance(info.value, (CorruptCheckpointError, aockpt.UnsupportedTensorError)), info.value
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists() and hostile.untouched(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
