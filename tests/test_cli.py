"""The CLI: each verb works, and every user mistake is one line on stderr with no traceback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import aockpt
from aockpt import format as fmt
from aockpt.cli import main
from conftest import CASES


@pytest.fixture
def packed(tmp_path):
    aockpt.save({"m.weight": CASES["int8-weight-only"][1](), "m.bias": torch.ones(64)}, tmp_path / "p")
    return tmp_path / "p"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output + (result.stderr or "")
    return result


def test_inspect_table_and_json(packed):
    table = run("inspect", packed, "--device", "cpu")
    assert table.exit_code == 0
    assert "Int8Tensor" in table.output and "runs: portable" in table.output and "x the bf16 size" in table.output
    assert "stock from_pretrained" not in table.output  # not a model folder: no verdict
    data = json.loads(run("inspect", packed, "--json").output)
    assert {t["name"] for t in data["tensors"]} == {"m.weight", "m.bias"} and data["total_bytes"] > 0
    assert data["stock"] is None


def test_verify_ok_and_corrupt(packed):
    assert run("verify", packed).exit_code == 0
    path = packed / fmt.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run("verify", packed)
    assert result.exit_code == 4 and "m.weight (part zero_point)" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_pack_unpack_round_trip(packed, tmp_path):
    assert run("unpack", packed, tmp_path / "x.pt").exit_code == 0
    result = run("pack", tmp_path / "p", tmp_path / "again")
    assert result.exit_code == 0 and "packed 2 tensors" in result.output
    a, b = aockpt.load_quantized(packed), aockpt.load_quantized(tmp_path / "again")
    assert torch.equal(a["m.weight"].qdata, b["m.weight"].qdata)


@pytest.mark.parametrize("args, code, message", [
    (["pack", "{p}", "{p}"], 2, "overlaps the source"),  # refused even with --force (docs/security.md)
    (["pack", "{p}", "{t}/junk.safetensors"], 2, "already exists"),
    (["inspect", "{t}/missing"], 2, "does not exist"),
    (["inspect", "{t}/junk.safetensors"], 4, "too short"),
    (["inspect", "{p}", "--device", "gpu"], 2, "not a device"),
    (["pack", "{p}", "{t}/out", "--max-shard-size", "5XB"], 2, "is not a size"),
    (["pack", "{p}", "{t}/out", "--device", "tpu"], 2, "not a device"),
])
def test_errors_are_one_line(packed, tmp_path, args, code, message):
    (tmp_path / "junk.safetensors").write_bytes(b"\x01")
    result = run(*[a.format(p=packed, t=tmp_path) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("verb", [["pack"], ["unpack"], ["inspect"], ["verify"], ["push"], ["hook", "install"]])
def test_help_teaches_with_examples(verb):
    result = run(*verb, "--help")
    assert result.exit_code == 0 and "aockpt " + " ".join(verb) + " " in result.output


@pytest.mark.parametrize("verb", ["pack", "unpack", "inspect", "verify"])
def test_hostile_files_are_refused_by_every_verb(tmp_path, verb):
    """Every hostile pickle of the corpus: non-zero exit, one line, no payload effect, nothing written."""
    import hostile

    for case_id, build in hostile.HOSTILE:
        folder = tmp_path / case_id
        folder.mkdir()
        path = build(folder)
        args = [verb, path] + ([folder / "out"] if verb in ("pack", "unpack") else [])
        result = run(*args)
        assert result.exit_code not in (0, 70), (case_id, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, (case_id, result.stderr)
        assert hostile.untouched(folder), case_id
        assert not (folder / "out").exists() and not list(folder.glob(".out*")), case_id


def test_inspect_and_pack_a_legacy_pickle(tmp_path):
    from pathlib import Path

    legacy_file = Path(__file__).parent.parent / "fixtures" / "legacy" / "ao0.13" / "int8dyn.pt"
    shown = run("inspect", legacy_file)
    assert shown.exit_code == 0 and "written by torchao <= 0.17" in shown.output
    assert "AffineQuantizedTensor/PlainLayout" in shown.output and "-> Int8Tensor" in shown.output
    assert run("pack", legacy_file, tmp_path / "p").exit_code == 0
    assert run("verify", tmp_path / "p").exit_code == 0
    assert type(aockpt.load_quantized(tmp_path / "p")["0.weight"]).__name__ == "Int8Tensor"


def test_portability_advice_names_a_command_that_works(tmp_path):
    """The remedy a PortabilityError prints is a real CLI command, and following it makes the load work."""
    import re
    import shlex

    from aockpt.errors import PortabilityError

    folder = Path(__file__).parent.parent / "fixtures" / "cuda" / "llama_int4_tile_g32"
    with pytest.raises(PortabilityError) as caught:
        aockpt.load_quantized(folder, "cpu")
    command = shlex.split(re.search(r"`aockpt (pack [^`]+)`", str(caught.value)).group(1))
    args = [str(folder) if a == "SRC" else str(tmp_path / "cpu") if a == "DST" else a for a in command]
    assert run(*args).exit_code == 0
    state = aockpt.load_quantized(tmp_path / "cpu", "cpu")
    assert type(state["model.layers.0.mlp.up_proj.weight"]).__name__ == "Int4OpaqueTensor"


@pytest.mark.cpu_int4
def test_cpu_packer_of_a_legacy_int4_pickle_is_asked_for_then_used(tmp_path):
    from pathlib import Path

    legacy_file = Path(__file__).parent.parent / "fixtures" / "legacy" / "ao0.13" / "int4cpu.pt"
    refused = run("pack", legacy_file, tmp_path / "p")
    assert refused.exit_code == 5 and "--cpu-packer" in refused.output and len(refused.output.strip().splitlines()) == 1
    shown = run("inspect", legacy_file)
    assert "packer unknown: cpu-avx512 | cpu-avx2 | cpu-default" in shown.output and "pass --cpu-packer" in shown.output
    rows = {t["name"]: t for t in json.loads(run("inspect", legacy_file, "--json").output)["tensors"]}
    assert rows["0.weight"]["packer_candidates"] == ["cpu-avx512", "cpu-avx2", "cpu-default"]
    assert run("pack", legacy_file, tmp_path / "p", "--cpu-packer", "cpu-avx2", "--device", "cpu").exit_code == 0
    packed = {t["name"]: t for t in json.loads(run("inspect", tmp_path / "p", "--json").output)["tensors"]}
    assert packed["0.weight"]["packer"] == aockpt.relayout.cpu_packer()  # re-laid out for this machine
    unpacked = run("unpack", legacy_file, tmp_path / "u.pt", "--cpu-packer", "cpu-avx2")
    assert unpacked.exit_code == 6 and "weights_only" in unpacked.output  # packer known; torch.load could not read it
    assert run("inspect", legacy_file, "--cpu-packer", "avx9").exit_code == 2


def test_readme_lists_every_exit_code():
    """The README's exit-status table is the CLI's EXIT_CODES table, row for row."""
    from pathlib import Path

    from aockpt.cli import EXIT_CODES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = [f"| {code} | {cls.__name__} | {meaning} |" for cls, (code, meaning) in EXIT_CODES.items()]
    assert "\n".join(rows) in readme


EVIL = "w\nTr4ceback (most recent call last):\n\x1b]0;owned\x07\r\x1b[2J\u2028x\x9b"


def test_file_supplied_names_cannot_forge_lines_or_drive_the_terminal(tmp_path):
    aockpt.save({EVIL: CASES["int8-weight-only"][1](), "ok": torch.ones(2)}, tmp_path / "p")
    table = run("inspect", tmp_path / "p")
    assert table.exit_code == 0
    assert not any(c in table.output.replace("\n", "") for c in "\x1b\x07\r\u2028\x9b")
    assert len(table.output.splitlines()) == 5  # title, header, two tensors, total (not a model folder: no verdict)
    assert "w\\nTr4ceback (most recent call last):\\n\\x1b]0;owned\\x07\\r" in table.output
    assert {t["name"] for t in json.loads(run("inspect", tmp_path / "p", "--json").output)["tensors"]} == {EVIL, "ok"}
    path = tmp_path / "p" / fmt.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    failed = run("verify", tmp_path / "p")
    assert failed.exit_code == 4 and len(failed.stderr.strip().splitlines()) == 1
    assert "\x1b" not in failed.stderr and "w\\nTr4ceback" in failed.stderr


def test_internal_errors_are_one_escaped_line(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("shape overflow\nException raised from at::native (C++ backtrace)\n\x1b[2J")

    monkeypatch.setattr(aockpt.api, "inspect", boom)
    result = run("inspect", tmp_path)
    assert result.exit_code == 70 and result.stderr.count("\n") == 1 and "\x1b" not in result.stderr


@pytest.mark.parametrize("sig, workers, code, word", [(signal.SIGTERM, 1, 143, "terminated"),
                                                      (signal.SIGINT, 2, 130, "interrupted")],
                         ids=["sigterm", "ctrl-c-with-workers"])
def test_a_signal_mid_pack_leaves_nothing_and_says_one_line(tmp_path, sig, workers, code, word):
    torch.manual_seed(0)
    torch.save({f"w{i}": torch.randn(1024, 1024) for i in range(24)}, tmp_path / "src.pt")  # 96 MB
    proc = subprocess.Popen([sys.executable, "-m", "aockpt.cli", "pack", tmp_path / "src.pt", tmp_path / "out",
                             "--max-shard-size", "8MB", "--workers", str(workers)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while not any(p.suffix == ".safetensors" for p in tmp_path.glob(".out.aockpt-tmp-*/*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the whole process group, workers included
    else:
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.decode().strip().splitlines() == [f"Error: {word}; nothing was left at the destination"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


def test_help_does_not_import_torch():
    """`aockpt --help` and `aockpt pack --help` answer at once: the library is imported when a command runs."""
    import subprocess
    import sys

    code = ("import sys; from aockpt.cli import main\n"
            "for args in (['--help'], ['pack', '--help'], ['push', '--help']):\n"
            "    main(args, standalone_mode=False)\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`aockpt inspect ... | head -1`: exit 141 like a tool killed by SIGPIPE, and nothing on stderr."""
    folder = aockpt.save({f"t{i}": torch.zeros(1) for i in range(1500)}, tmp_path / "many")
    proc = subprocess.Popen([sys.executable, "-m", "aockpt.cli", "inspect", folder], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(str(folder).encode())  # 1500 rows, more than a pipe holds, follow
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141 and proc.stderr.read() == b""
